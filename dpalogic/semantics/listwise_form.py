"""Closed forms of structures over many answers, without expanding them (docs/semantics.md §8).

A lifted structure (:mod:`dpalogic.semantics.lifted`) prints its ratio with one elementary symmetric polynomial per
group of interchangeable answers — ``ρ = p_1 / ((1 − p_1)·e_1(o[M(y2..y64)]))`` — where ``o[S]`` are the odds
``p/(1 − p)`` of the answers in ``S``; a structure without that symmetry reports its OBDD circuit's size.
"""

from __future__ import annotations

import math
from typing import Any

import sympy

from dpalogic.language.syntax import atoms_text
from dpalogic.logic.listwise import ListStructure
from dpalogic.semantics.lifted import Lifted, lift
from dpalogic.semantics.program import latex_names, weight_symbol

LEGEND = (
    "o[S] are the odds p/(1 − p) of the answers in S; e_c(o[S]) is their elementary symmetric polynomial of degree c "
    "(the sum over c-subsets of products of odds), e_{a..b} = e_a + … + e_b; each group's factor Π(1 − p) is common "
    "to ✓ and ✗ and cancels"
)


MIN_RANGE = 3  # e_a + … + e_b with at least this many terms prints as one range symbol e_{a..b}


class _Symbols:
    """``e_c(o[S])`` and range sums ``e_{a..b}(o[S]) = e_a + … + e_b`` of each group, made once, with their LaTeX."""

    def __init__(self, lf: Lifted) -> None:
        self.texts = [atoms_text([lf.atoms[i].symbol for i in members]) for members in lf.groups]
        self.latex: dict[sympy.Symbol, str] = {}
        self._made: dict[tuple[int, int, int], sympy.Expr] = {}

    def sum(self, g: int, a: int, b: int) -> sympy.Expr:
        """``e_a + … + e_b`` of group ``g`` (``e_0 = 1``), one symbol when the range is long."""
        if a != b and b - a + 1 < MIN_RANGE:
            return sympy.Add(*[self.sum(g, c, c) for c in range(a, b + 1)])
        if a == b == 0:
            return sympy.Integer(1)
        if a == 0:  # e_0 = 1 stays visible: 1 + e_{1..b}
            return 1 + self.sum(g, 1, b)
        key = (g, a, b)
        if key not in self._made:
            label = f"{a}" if a == b else f"{{{a}..{b}}}"
            sym = sympy.Symbol(f"e_{label}(o[{self.texts[g]}])", positive=True)
            self.latex[sym] = rf"e_{{{a if a == b else f'{a}..{b}'}}}\left(o[\mathrm{{{self.texts[g]}}}]\right)"
            self._made[key] = sym
        return self._made[key]


def _runs(values: list[int]) -> list[tuple[int, int]]:
    """Sorted integers as maximal runs ``(first, last)`` of consecutive values."""
    out: list[tuple[int, int]] = []
    for v in sorted(values):
        if out and v == out[-1][1] + 1:
            out[-1] = (out[-1][0], v)
        else:
            out.append((v, v))
    return out


def _counts_sum(syms: _Symbols, tuples: list[tuple[int, ...]]) -> sympy.Expr:
    """``Σ_{(c_g) ∈ tuples} Π_g e_{c_g}``: a product of per-group range sums when the tuples are all combinations of
    their per-group counts (independent constraints on each group), else the last group's counts as ranges."""
    per_group = [sorted({t[g] for t in tuples}) for g in range(len(tuples[0]))]
    if len(tuples) == math.prod(len(cs) for cs in per_group):  # a Cartesian product: it factors
        return sympy.Mul(*[sympy.Add(*[syms.sum(g, a, b) for a, b in _runs(cs)]) for g, cs in enumerate(per_group)])
    by_rest: dict[tuple[int, ...], list[int]] = {}
    for t in tuples:
        by_rest.setdefault(t[:-1], []).append(t[-1])
    last = len(per_group) - 1
    return sympy.Add(
        *[
            sympy.Mul(*[syms.sum(g, c, c) for g, c in enumerate(rest)], syms.sum(last, a, b))
            for rest, lasts in by_rest.items()
            for a, b in _runs(lasts)
        ]
    )


def lifted_rho(lf: Lifted) -> tuple[sympy.Expr, dict[sympy.Symbol, str]]:
    """ρ = WMC(✓)/WMC(✗) with the groups' common factors cancelled, as a SymPy expression.

    Each side is ``Σ_σ w(σ) · Σ_counts Π_g e_{c_g}``, grouped by the singletons' truth values σ; the last group's
    counts are summed as ranges (``e_{1..255}`` for ``e_1 + … + e_255``), so AtLeast(2, …) over 256 answers prints
    in a line instead of 255 terms.
    """
    syms = _Symbols(lf)

    def side(configs) -> sympy.Expr:
        by_sigma: dict[tuple[int, ...], dict[tuple[int, ...], list[int]]] = {}
        for sigma, counts in configs:
            by_sigma.setdefault(sigma, {}).setdefault(counts[:-1], []).append(counts[-1])  # the counts, per σ
        total = sympy.Integer(0)
        for sigma, by_rest in by_sigma.items():
            weight = sympy.Integer(1)
            for k, i in enumerate(lf.singletons):
                p = weight_symbol(lf.atoms[i])
                weight *= p if sigma[k] else sympy.Add(1, -p, evaluate=False)
            total += weight * _counts_sum(syms, [rest + (c,) for rest, lasts in by_rest.items() for c in lasts])
        return total

    return side(lf.top) / side(lf.bottom), syms.latex


def list_rho(s: ListStructure) -> sympy.Expr:
    """ρ of a structure over many answers in closed form; a clear error when it has no lifted form."""
    from dpalogic.errors import DPALogicError

    lf = lift(s.atoms, s.source)
    if lf is None:
        raise DPALogicError(
            f"{s.text()} has no closed form dpalogic can print without expanding (no interchangeable answers): "
            "its sides are OBDD circuits; `dpalogic derive` reports their size"
        )
    return lifted_rho(lf)[0]


def list_structure_info(s: ListStructure) -> dict[str, Any]:
    """What ``derive`` reports about a structure over many answers (the keys of the truth-table report, and sizes)."""
    lf = lift(s.atoms, s.source)
    sizes = s.sizes()
    info: dict[str, Any] = {
        **s.text_fields(),
        "atoms": [a.name for a in s.atoms],
        "atom_count": s.n,
        "worlds": f"2^{s.n}",
        "obdd_nodes": {"top": sizes["bdd_top"], "bottom": sizes["bdd_bottom"]},
        "circuit_nodes": sizes["circuit"],
        "method": "lifted" if lf is not None else "circuit",
    }
    if lf is not None:
        rho, latex = lifted_rho(lf)
        names = {**latex_names(s.atoms), **latex}
        info["rho"] = str(rho)
        info["rho_latex"] = sympy.latex(rho, symbol_names=names)
        info["log_rho"] = f"log({rho})"
        num, den = sympy.fraction(rho)
        info["loss"] = f"log(1 + {sympy.sstr(den / num)})"
        info["latex"] = r"\log\left(1 + \frac{1}{\rho}\right),\quad \rho = " + info["rho_latex"]
        info["legend"] = LEGEND
        info["groups"] = [atoms_text([s.atoms[i].symbol for i in g]) for g in lf.groups]
    else:
        info["rho"] = f"WMC(✓)/WMC(✗), each side an OBDD circuit ({sizes['circuit']} nodes together)"
        info["rho_latex"] = r"\mathrm{WMC}(\checkmark)/\mathrm{WMC}(\times)"
        info["log_rho"] = "log WMC(✓) − log WMC(✗) (circuits: sums of log p, log(1 − p) and logaddexp)"
        info["loss"] = "log(1 + WMC(✗)/WMC(✓))"
        info["latex"] = r"-\log\sigma(\log\rho)"
    return info
