"""Semantics: weighted model counts, the ratio ρ, links and loss programs (docs/semantics.md §1, §3, §6).

* ``wmc_poly``      — WMC of a truth table as an exact multilinear polynomial (integer coefficients).
* ``wmc_sympy``     — the same polynomial as a factored SymPy expression, for display and closed forms.
* ``side_circuit``  — a side's ``log WMC`` as a log-space circuit (:mod:`dpalogic.semantics.circuit`, the IR every backend
                      folds): ``log p``, ``log(1 − p)`` (log1mexp), sums of logs for products and ``logaddexp``
                      only where a side really is a sum. DPO's circuit is four log-probs, ORPO's has no sum.
* ``Term``/``Program`` — ``loss = Σ_k c_k · f_k(β_k · log ρ_k − γ_k)``; coefficients, scales, shifts and link
                      parameters are SymPy expressions in the hyperparameters.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace
from functools import cache

import sympy

from dpalogic.language.syntax import Atom
from dpalogic.logic.structure import Structure, align
from dpalogic.semantics import circuit
from dpalogic.semantics.links import LINKS  # one registry of links as SymPy expressions in z

# --------------------------------------------------------------------------------------------------- weights


@cache
def weight_symbol(atom: Atom) -> sympy.Symbol:
    """``M(yw)`` → ``p_w`` (πθ(yw)), ``Ref(yl)`` → ``r_l`` (πref(yl)), ``M(y3)`` → ``p_3``."""
    letter = "p" if atom.pred == "M" else "r"
    sub = {"yw": "w", "yl": "l"}.get(atom.answer, atom.answer[1:])
    return sympy.Symbol(f"{letter}_{sub}", positive=True)


def weight_latex(atom: Atom) -> str:
    sub = {"yw": "y_w", "yl": "y_l"}.get(atom.answer, f"y_{{{atom.answer[1:]}}}")
    return (r"\pi_\theta" if atom.pred == "M" else r"\pi_{\mathrm{ref}}") + f"({sub})"


def latex_names(atoms: tuple[Atom, ...], expr: sympy.Expr | None = None) -> dict[sympy.Symbol, str]:
    """How to typeset the atoms' weights and, given the expression, its hyperparameters: the catalog's by their
    usual letters (``label_smoothing`` → ε_ls), any other name with an underscore upright (``\\mathrm{my\\_gamma}``)
    rather than as SymPy's subscript (``my_{gamma}``)."""
    names: dict[sympy.Symbol, str] = {weight_symbol(a): weight_latex(a) for a in atoms}
    by_name = {k.name: v for k, v in LATEX_HYPERPARAMETERS.items()}
    for sym in getattr(expr, "free_symbols", ()):
        if sym not in names and sym.name in by_name:
            names[sym] = by_name[sym.name]
        elif sym not in names and "_" in sym.name:
            names[sym] = r"\mathrm{" + sym.name.replace("_", r"\_") + "}"
    return names


# --------------------------------------------------------------------------------------------------- exact polynomials

Poly = dict  # exponent tuple → int coefficient


def wmc_poly(mask: int, n: int) -> Poly:
    """WMC of a truth table as a multilinear polynomial in the atom probabilities.

    ``WMC(f) = Σ_S c_S Π_{i∈S} p_i`` with ``c_S = Σ_{T⊆S} (−1)^{|S∖T|} f(T)`` (Möbius inversion of the corner
    values), computed with the fast subset transform.
    """
    size = 1 << n
    c = [(mask >> w) & 1 for w in range(size)]
    for i in range(n):
        bit = 1 << i
        for w in range(size):
            if w & bit:
                c[w] -= c[w ^ bit]
    return {tuple((w >> i) & 1 for i in range(n)): v for w, v in enumerate(c) if v}


def poly_mul(a: Poly, b: Poly) -> Poly:
    out: Poly = {}
    for ea, ca in a.items():
        for eb, cb in b.items():
            e = tuple(x + y for x, y in zip(ea, eb))
            out[e] = out.get(e, 0) + ca * cb
    return {e: v for e, v in out.items() if v}


def same_ratio(s1: Structure, s2: Structure) -> bool:
    """Do two structures give the same loss function? ``WMC(✓1)·WMC(✗2) ≡ WMC(✓2)·WMC(✗1)`` as polynomials.

    The pairwise test, exact and polynomial in the number of worlds (12 atoms included). Grouping many structures
    uses the hashable form of the same question, :func:`dpalogic.semantics.loss_keys.loss_key` (a test checks that
    equal keys and this test agree); the landscape counts with :mod:`dpalogic.analysis.factoring`.
    """
    a, b = align(s1, s2)
    n = a.n
    return poly_mul(wmc_poly(a.top, n), wmc_poly(b.bottom, n)) == poly_mul(wmc_poly(b.top, n), wmc_poly(a.bottom, n))


# --------------------------------------------------------------------------------------------------- SymPy forms


def wmc_sympy(mask: int, atoms: tuple[Atom, ...], factored: bool = True) -> sympy.Expr:
    """WMC of a truth table as a SymPy expression in ``p_w, p_l, r_w, …`` (factored by default)."""
    n = len(atoms)
    syms = [weight_symbol(a) for a in atoms]
    expr = sympy.Integer(0)
    for exps, coef in wmc_poly(mask, n).items():
        term = sympy.Integer(coef)
        for s, e in zip(syms, exps):
            if e:
                term *= s
        expr += term
    return sympy.factor(expr) if factored else expr


def side_sympy(mask: int, atoms: tuple[Atom, ...]) -> sympy.Expr:
    """WMC of one side in the factored form of its log-space plan: ``p_w·(1 − p_l)``, ``p_w + (1 − p_w)(1 − p_l)``."""
    if mask == 0:
        return sympy.Integer(0)
    return circuit_sympy(side_circuit(mask, len(atoms)), atoms)


def rho_sympy(s: Structure) -> sympy.Expr:
    """ρ = WMC(✓) / WMC(✗) in factored form (common factors cancel)."""
    if hasattr(s, "side_circuit"):  # a ListStructure: the lifted closed form, when it has one
        from dpalogic.semantics.listwise_form import list_rho

        return list_rho(s)
    num, den = side_sympy(s.top, s.atoms), side_sympy(s.bottom, s.atoms)
    if den == 0:
        return sympy.oo
    return num / den


def semantic_loss_sympy(s: Structure) -> sympy.Expr:
    """``−log σ(log ρ) = −log(WMC(✓) / (WMC(✓) + WMC(✗)))`` as a SymPy expression."""
    if hasattr(s, "side_circuit"):
        return sympy.log(1 + 1 / rho_sympy(s))
    num, den = sympy.fraction(rho_sympy(s))
    if s.top & s.bottom == 0:  # disjoint sides: WMC(✓) + WMC(✗) = WMC(✓ ∨ ✗), often much simpler
        total = side_sympy(s.top | s.bottom, s.atoms) / (side_sympy(s.top, s.atoms) / num)
        return -sympy.log(num / total)
    return -sympy.log(num / (num + den))


# --------------------------------------------------------------------------------------------------- circuits
# the IR of a side's log WMC is dpalogic.semantics.circuit; these are two of its folds (closed form and text)


def side_circuit(mask: int, n: int) -> circuit.Node:
    """``log WMC`` of a non-empty truth table over ``n`` atoms as a log-space circuit."""
    return circuit.from_truth_table(mask, n)


def structure_circuits(s) -> tuple[circuit.Node, circuit.Node]:
    """``log WMC`` of ✓ and ✗ as circuits, for a truth-table Structure or a ListStructure (OBDD sides)."""
    if hasattr(s, "side_circuit"):
        return s.side_circuit("top"), s.side_circuit("bottom")
    return side_circuit(s.top, s.n), side_circuit(s.bottom, s.n)


def circuit_sympy(node: circuit.Node, atoms: tuple[Atom, ...]) -> sympy.Expr:
    """exp(circuit) as a SymPy product/sum of ``p`` and ``(1 − p)`` factors."""

    def leaf(i: int, positive: bool) -> sympy.Expr:
        p = weight_symbol(atoms[i])
        return p if positive else 1 - p

    return circuit.fold(
        node, lit=leaf, one=lambda: sympy.Integer(1), prod=lambda xs: sympy.Mul(*xs), sum=lambda xs: sympy.Add(*xs)
    )


MAX_CIRCUIT_TEXT = 400  # characters: a shared DAG printed as a tree grows with every reuse (an OBDD's, quadratically)


def circuit_text(node: circuit.Node, atoms: tuple[Atom, ...]) -> str:
    """A circuit as readable math: ``log p_w + log1mexp(log p_l)``; a summary when that would be too long to read."""
    size = len(circuit.topological(node))
    if size > MAX_CIRCUIT_TEXT // 4:
        return f"an OBDD circuit of {size} nodes (dpalogic derive reports its sizes)"

    def leaf(i: int, positive: bool) -> str:
        s = f"log {weight_symbol(atoms[i])}"
        return s if positive else f"log1mexp({s})"

    return circuit.fold(
        node, lit=leaf, one=lambda: "0", prod=" + ".join, sum=lambda xs: "logaddexp(" + ", ".join(xs) + ")"
    )


# --------------------------------------------------------------------------------------------------- programs

Num = sympy.Expr | float | int


def _sym(x: Num | str) -> sympy.Expr:
    return sympy.Symbol(x) if isinstance(x, str) else sympy.sympify(x)


@dataclass(frozen=True)
class Term:
    """One term ``c · f(β · log ρ − γ)`` of a loss program.

    ``normalized`` uses per-token (length-normalized) log-probabilities as the atom weights, as SimPO and IPO do.
    ``role`` is ``"preference"`` for the main terms, ``"smoothing"`` for label-smoothing companions and ``"nll"``
    for auxiliary likelihood terms; only preference terms define what a program *means* (its structure).
    """

    structure: Structure
    link: str = "logistic"
    coef: sympy.Expr = sympy.Integer(1)
    scale: sympy.Expr = sympy.Integer(1)
    shift: sympy.Expr = sympy.Integer(0)
    link_params: tuple[tuple[str, sympy.Expr], ...] = ()
    normalized: bool = False
    role: str = "preference"

    def __post_init__(self) -> None:
        for name in ("coef", "scale", "shift"):
            object.__setattr__(self, name, _sym(getattr(self, name)))
        object.__setattr__(self, "link_params", tuple((k, _sym(v)) for k, v in self.link_params))
        if self.link not in LINKS:
            from dpalogic.errors import unknown

            raise unknown("link", self.link, LINKS)

    @property
    def free_hyperparameters(self) -> set[str]:
        syms: set[sympy.Symbol] = set()
        for e in (self.coef, self.scale, self.shift, *(v for _, v in self.link_params)):
            syms |= e.free_symbols
        return {s.name for s in syms}

    def log_ratio_sympy(self) -> sympy.Expr:
        return sympy.log(rho_sympy(self.structure))

    def sympy(self, rho: sympy.Expr | None = None) -> sympy.Expr:
        """``c · f(β · log ρ − γ)`` with ρ in closed form (or the symbol given)."""
        r = rho_sympy(self.structure) if rho is None else rho
        z = self.scale * sympy.log(r) - self.shift
        return self.coef * LINKS[self.link].sympy(z, **dict(self.link_params))

    def text(self) -> str:
        """Readable: ``0.1·(−log σ(β·log ρ − γ))`` with the symbols, not the values."""
        z = _affine_text(self.scale, self.shift, "log ρ")
        body = LINKS[self.link].render(z, {k: _expr_text(v) for k, v in self.link_params})
        if self.coef == 1:
            return body
        c = _expr_text(self.coef)
        c = c if c.replace(".", "").replace("_", "").isalnum() or c.startswith("(") else f"({c})"
        return f"{c}·[{body}]"


_GREEK = {"beta": "β", "gamma": "γ", "alpha": "α", "label_smoothing": "ε_ls", "discopop_tau": "τ"}


def _expr_text(e: sympy.Expr) -> str:
    # whole names only: TPO's tpo_alpha and tpo_l_gamma keep the names a user passes them by
    s = re.sub(r"\b\w+\b", lambda m: _GREEK.get(m.group(), m.group()), str(e))
    return s.replace("**", "^").replace("*", "·")


def _affine_text(scale: sympy.Expr, shift: sympy.Expr, x: str) -> str:
    s = x if scale == 1 else f"{_expr_text(scale)}·{x}"
    if shift != 0:
        neg = shift.could_extract_minus_sign()
        s += f" + {_expr_text(-shift)}" if neg else f" − {_expr_text(shift)}"
    return s


@dataclass(frozen=True)
class Program:
    """``loss = Σ_k c_k · f_k(β_k · log ρ_k − γ_k)`` with named hyperparameters and their defaults."""

    terms: tuple[Term, ...]
    hyperparameters: tuple[tuple[str, float], ...] = ()
    name: str | None = None

    @property
    def defaults(self) -> dict[str, float]:
        return dict(self.hyperparameters)

    @property
    def preference_terms(self) -> tuple[Term, ...]:
        return tuple(t for t in self.terms if t.role == "preference")

    @property
    def structures(self) -> list[Structure]:
        """The distinct structures of the preference terms, in order."""
        out: list[Structure] = []
        for t in self.preference_terms:
            if t.structure not in out:
                out.append(t.structure)
        return out

    @property
    def structure(self) -> Structure | None:
        """The program's single structure, or None when its preference terms use several."""
        s = self.structures
        return s[0] if len(s) == 1 else None

    @property
    def atoms(self) -> tuple[Atom, ...]:
        from dpalogic.logic.structure import common_atoms

        return common_atoms(*(t.structure for t in self.terms))

    def bind(self, **overrides: float) -> dict[str, float]:
        """Hyperparameter values: the defaults updated with ``overrides`` (unknown names are an error)."""
        values = self.defaults
        for k, v in overrides.items():
            if k not in values:
                from dpalogic.errors import unknown

                raise unknown("hyperparameter", k, values or ["(none: this loss has no hyperparameters)"])
            try:
                values[k] = float(v)
            except (TypeError, ValueError):
                from dpalogic.errors import DPALogicError

                raise DPALogicError(f"hyperparameter {k} must be a number, got {v!r}") from None
        return values

    def sympy(self) -> sympy.Expr:
        return sympy.Add(*(t.sympy() for t in self.terms))

    def with_hyperparameters(self, **defaults: float) -> Program:
        hp = dict(self.hyperparameters)
        hp.update(defaults)
        return replace(self, hyperparameters=tuple(hp.items()))

    def _repr_latex_(self) -> str:
        """Jupyter: the loss in closed form, ``L_name = …``, with the default hyperparameters."""
        names = latex_names(self.atoms, self.sympy())
        lhs = r"\mathcal{L}" + (r"_{\mathrm{" + self.name.replace("_", r"\_") + "}}" if self.name else "")
        hp = ", ".join(f"{sympy.latex(sympy.Symbol(k), symbol_names=names)} = {v:g}" for k, v in self.hyperparameters)
        return f"$${lhs} = {sympy.latex(self.sympy(), symbol_names=names)}" + (rf"\qquad ({hp})" if hp else "") + "$$"


# how the catalog's hyperparameters are typeset (SymPy would write label_{smoothing}); the rest SymPy knows (β, γ, α)
LATEX_HYPERPARAMETERS = {
    sympy.Symbol("label_smoothing"): r"\varepsilon_{\mathrm{ls}}",
    sympy.Symbol("discopop_tau"): r"\tau",
    sympy.Symbol("tpo_alpha"): r"\alpha_{\mathrm{TPO}}",
    sympy.Symbol("tpo_l_gamma"): r"\gamma_{\mathrm{TPO}}",
}


def single_structure_program(s: Structure, beta: float = 1.0, gamma: float = 0.0) -> Program:
    """A derived structure as a program: one logistic term ``−log σ(β·log ρ − γ)`` (defaults β=1, γ=0)."""
    return Program(
        (Term(s, "logistic", scale=sympy.Symbol("beta"), shift=sympy.Symbol("gamma")),),
        (("beta", beta), ("gamma", gamma)),
    )


def with_link(program: Program, text: str, values: dict[str, float] | None = None) -> Program:
    """The program with its preference terms' link replaced by the user's expression in ``z`` (docs/semantics.md §3).

    The link's parameters become hyperparameters whose defaults are the ``values`` given (``margin=0.5`` for
    ``softplus(margin - z)``); the structures, scales and shifts stay, so ``z = β·log ρ − γ`` as before.
    """
    from dpalogic.semantics.links import user_link

    link = user_link(text, values)
    params = tuple((k, sympy.Symbol(k)) for k, _ in link.params)
    terms = tuple(
        replace(t, link=link.name, link_params=params) if t.role == "preference" else t for t in program.terms
    )
    hp = dict(program.hyperparameters)
    # this call's values, not those the registered link was first made with (one registry entry per link text)
    hp.update((k, float((values or {})[k])) for k, _ in link.params)
    return Program(terms, tuple(hp.items()), name=None)


@dataclass(frozen=True)
class OutsideFragment:
    """A published loss that is not a program of this fragment, and exactly why."""

    name: str
    reason: str
    citation: str
    aliases: tuple[str, ...] = field(default=())
