"""Closed forms of structures over many answers, without expanding them (docs/semantics.md §8).

A lifted structure (:mod:`dpalogic.semantics.lifted`) prints its ratio with one elementary symmetric polynomial per
group of interchangeable answers — ``ρ = p_1 / ((1 − p_1)·e_1(o[M(y2..y64)]))`` — where ``o[S]`` are the odds
``p/(1 − p)`` of the answers in ``S``; a structure without that symmetry reports its OBDD circuit's size.
"""

from __future__ import annotations

from typing import Any

import sympy

from dpalogic.language.syntax import atoms_text
from dpalogic.logic.listwise import ListStructure
from dpalogic.semantics.lifted import Lifted, lift
from dpalogic.semantics.program import latex_names, weight_symbol

LEGEND = (
    "o[S] are the odds p/(1 − p) of the answers in S; e_c(o[S]) is their elementary symmetric polynomial of degree c "
    "(the sum over c-subsets of products of odds); each group's factor Π(1 − p) is common to ✓ and ✗ and cancels"
)


def _group_symbols(lf: Lifted) -> tuple[list[dict[int, sympy.Expr]], dict[sympy.Symbol, str]]:
    """``e_c(o[S])`` for each group and count used, as SymPy symbols, and their LaTeX."""
    out, latex = [], {}
    for g, members in enumerate(lf.groups):
        text = atoms_text([lf.atoms[i].symbol for i in members])
        syms: dict[int, sympy.Expr] = {}
        for c in lf.counts_needed(g):
            if c == 0:
                syms[c] = sympy.Integer(1)
                continue
            sym = sympy.Symbol(f"e_{c}(o[{text}])", positive=True)
            latex[sym] = rf"e_{{{c}}}\left(o[\mathrm{{{text}}}]\right)"
            syms[c] = sym
        out.append(syms)
    return out, latex


def lifted_rho(lf: Lifted) -> tuple[sympy.Expr, dict[sympy.Symbol, str]]:
    """ρ = WMC(✓)/WMC(✗) with the groups' common factors cancelled, as a SymPy expression."""
    esym, latex = _group_symbols(lf)

    def side(configs) -> sympy.Expr:
        # grouped by the singletons' truth values: Σ_σ w(σ) · Σ_counts Π_g e_c — the sums stay as people write them
        by_sigma: dict[tuple[int, ...], list[tuple[int, ...]]] = {}
        for sigma, counts in configs:
            by_sigma.setdefault(sigma, []).append(counts)
        total = sympy.Integer(0)
        for sigma, all_counts in by_sigma.items():
            weight = sympy.Integer(1)
            for k, i in enumerate(lf.singletons):
                p = weight_symbol(lf.atoms[i])
                weight *= p if sigma[k] else sympy.Add(1, -p, evaluate=False)
            inner = sympy.Add(*[sympy.Mul(*[esym[g][c] for g, c in enumerate(counts)]) for counts in all_counts])
            total += weight * inner
        return total

    return side(lf.top) / side(lf.bottom), latex


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
