"""Reading ``z = β·log ρ − γ`` off an expression, and ✓, ✗ off the corner values of ``ρ = N/D``.

Log-probs become logarithms of probabilities (per-token ones when lengths appear), ``z`` must then be a sum of
logarithms of polynomials; ``ρ`` is reduced to lowest terms and is ``WMC(✓)/WMC(✗)`` exactly when ``N`` and ``D`` are
multilinear with corner values 0 or 1 (docs/semantics.md §4). The variables of an equation are defined here.
"""

from __future__ import annotations

from dataclasses import dataclass

import sympy

from dpalogic.errors import DPALogicError
from dpalogic.language.syntax import Atom
from dpalogic.logic.structure import Structure
from dpalogic.semantics.program import weight_symbol


class OutsideFragmentError(DPALogicError):
    """The equation is a loss, but not a program of structures; the message says which factor and why."""


# policy/reference probabilities as the semantics' own weight symbols (p_w, p_l, r_w, r_l)
_ATOMS = {"w": "yw", "l": "yl"}
P = {k: weight_symbol(Atom("M", v)) for k, v in _ATOMS.items()}
R = {k: weight_symbol(Atom("Ref", v)) for k, v in _ATOMS.items()}
PROB_SYMBOLS = {**{p: Atom("M", _ATOMS[k]) for k, p in P.items()}, **{r: Atom("Ref", _ATOMS[k]) for k, r in R.items()}}
LOGP = {k: sympy.Symbol(f"logp_{k}", real=True) for k in _ATOMS}
REF_LOGP = {k: sympy.Symbol(f"ref_logp_{k}", real=True) for k in _ATOMS}
LEN = {k: sympy.Symbol(f"len_{k}", positive=True) for k in _ATOMS}
VARIABLES = set(LOGP.values()) | set(REF_LOGP.values()) | set(LEN.values()) | set(P.values()) | set(R.values())


def _hold_constants(expr: sympy.Expr) -> tuple[sympy.Expr, dict]:
    """Each largest symbol-free part (``log(log(2))``, ``exp(-2)``) as a stand-in symbol, and the way back.

    A constant needs no expanding, and SymPy's ``expand_log(force=True)`` can loop forever on nested logarithms of
    numbers such as ``log(log(1 - 1/(1 + e^-2)))``.
    """
    reps: dict = {}
    stack = [expr]
    while stack:
        e = stack.pop()
        if not e.args:
            continue
        if not e.free_symbols and not e.is_Number:
            reps.setdefault(e, sympy.Dummy("c"))
            continue
        stack.extend(e.args)
    if not reps:
        return expr, {}
    return expr.xreplace(reps), {d: e for e, d in reps.items()}


def _to_probabilities(expr: sympy.Expr) -> tuple[sympy.Expr, bool]:
    """Replace log-probs by logs of probabilities; with lengths present, by per-token (normalized) probabilities."""
    normalized = any(LEN[k] in expr.free_symbols for k in _ATOMS)
    reps = {}
    for k in _ATOMS:
        scale = LEN[k] if normalized else 1
        reps[LOGP[k]] = scale * sympy.log(P[k])
        reps[REF_LOGP[k]] = scale * sympy.log(R[k])
    held, back = _hold_constants(expr.xreplace(reps))
    out = sympy.expand(sympy.expand_log(held, force=True), log=False).xreplace(back)
    if any(LEN[k] in out.free_symbols for k in _ATOMS):
        raise OutsideFragmentError(
            f"the lengths do not cancel in {expr}: sequence-level and length-normalized log-probs are mixed in one "
            "log-ratio, which is not the log of a ratio of WMCs over one kind of weight"
        )
    return out, normalized


def _log_factors(expr: sympy.Expr) -> tuple[dict[sympy.Expr, sympy.Expr], sympy.Expr] | None:
    """``Σ c_F·log F + const`` → ({F: c_F}, const); None when ``expr`` is not a sum of logarithms."""
    factors: dict[sympy.Expr, sympy.Expr] = {}
    const = sympy.Integer(0)
    for t in sympy.Add.make_args(expr):
        c, rest = t.as_independent(*PROB_SYMBOLS)
        if rest == 1:
            const += c
            continue
        if isinstance(rest, sympy.log) and rest.args[0].free_symbols <= set(PROB_SYMBOLS):
            arg = rest.args[0]
            parts = [(arg, c)]
            if not arg.is_polynomial(*PROB_SYMBOLS):
                # log(1 + r/p) (f-DPO's JS score) is log(p + r) − log p: a rational function splits into two factors
                n, d = sympy.fraction(sympy.together(arg))
                if not (n.is_polynomial(*PROB_SYMBOLS) and d.is_polynomial(*PROB_SYMBOLS)):
                    return None
                parts = [(sympy.expand(n), c), (sympy.expand(d), -c)]
            for arg, k in parts:
                if arg.is_number:
                    const += k * sympy.log(arg)
                    continue
                # keep each factor positive on (0,1)^n (p − 1 → 1 − p): a stray log(−1) would be an imaginary constant
                if arg.subs({p: sympy.Rational(1, 2) for p in arg.free_symbols}) < 0:
                    arg = sympy.expand(-arg)
                factors[arg] = factors.get(arg, 0) + k
            continue
        return None
    return factors, const


@dataclass
class LogRatio:
    scale: sympy.Expr
    shift: sympy.Expr
    numerator: sympy.Expr
    denominator: sympy.Expr
    normalized: bool


def log_ratio(z: sympy.Expr, *, orient: bool = True) -> LogRatio:
    """Read ``z`` as ``β·log(N/D) − γ`` with N, D polynomials (integer powers of the logged factors)."""
    zp, normalized = _to_probabilities(z)
    parsed = _log_factors(zp)
    if parsed is None:
        raise OutsideFragmentError(
            f"{z} is not β·log ρ − γ: after writing log-probs as log p it is {zp}, which is not a sum of "
            "logarithms of polynomials in the probabilities"
        )
    factors, const = parsed
    factors = {f: c for f, c in factors.items() if sympy.simplify(c) != 0}
    if not factors:
        raise OutsideFragmentError(f"{z} does not depend on any log-probability")

    # β: the coefficient of the first factor (policy atoms first), with its sign chosen positive, so that the
    # structure carries the orientation (−log σ(−β·log ρ) is read as the reversed structure, never as a β < 0)
    def order(f):
        syms = sorted(PROB_SYMBOLS[s].sort_key for s in f.free_symbols)
        return (syms, sympy.count_ops(f), str(f))

    first = sorted(factors, key=order)[0]
    beta = factors[first]
    if orient and beta.could_extract_minus_sign():
        beta = -beta
    ratios = {f: sympy.nsimplify(sympy.simplify(c / beta)) for f, c in factors.items()}
    if all(r.is_Rational for r in ratios.values()):
        # the largest β that leaves integer exponents: 2·log p_w − log p_l is β = 1, ρ = p_w²/p_l (then reported
        # as not multilinear), rather than β = 2 with a square root
        q = sympy.ilcm(1, 1, *[r.q for r in ratios.values()])
        beta = beta / q
        ratios = {f: r * q for f, r in ratios.items()}
    for f, r in ratios.items():
        if not (r.is_Rational and r.is_integer):
            raise OutsideFragmentError(
                f"the factor {f} has exponent {r} relative to β = {beta}: ρ would need a non-integer power, so it "
                "is not a ratio of WMC polynomials"
            )
    num = sympy.Mul(*[f**r for f, r in ratios.items() if r > 0])
    den = sympy.Mul(*[f ** (-r) for f, r in ratios.items() if r < 0])
    return LogRatio(beta, -const, num, den, normalized)


# --------------------------------------------------------------------------------------------------- corners


def _table(poly: sympy.Expr, atoms: tuple[Atom, ...], which: str) -> tuple[list[int], sympy.Expr]:
    syms = [weight_symbol(a) for a in atoms]
    if syms:
        pp = sympy.Poly(sympy.expand(poly), *syms)
        for s in syms:
            if pp.degree(s) > 1:
                raise OutsideFragmentError(
                    f"the {which} {sympy.factor(poly)} has degree {pp.degree(s)} in {s}: a WMC polynomial is "
                    "multilinear, so this ratio is outside the single-structure fragment"
                )
    values = []
    for w in range(1 << len(atoms)):
        corner = {s: (w >> i) & 1 for i, s in enumerate(syms)}
        values.append(sympy.nsimplify(sympy.expand(poly).subs(corner)))
    return values, poly


def _corner_masks(num: sympy.Expr, den: sympy.Expr) -> tuple[tuple[Atom, ...], int, int]:
    other = (num.free_symbols | den.free_symbols) - set(PROB_SYMBOLS)
    if other:  # a hyperparameter inside ρ (log(N·p_w) read as a likelihood): its corners are not numbers
        raise OutsideFragmentError(
            f"ρ = ({num})/({den}) depends on {', '.join(sorted(map(str, other)))}: a WMC's corner values are 0 or 1, "
            "not a hyperparameter"
        )
    atoms = tuple(sorted({PROB_SYMBOLS[s] for s in (num.free_symbols | den.free_symbols)}, key=lambda a: a.sort_key))
    nv, _ = _table(num, atoms, "numerator")
    dv, _ = _table(den, atoms, "denominator")
    # ρ = N/D is defined up to a common constant: scale it so the corner values are 0/1 if any scale can
    nonzero = {abs(v) for v in nv + dv if v != 0}
    if len(nonzero) == 1:
        c = nonzero.pop()
        signs = {sympy.sign(v) for v in nv + dv if v != 0}
        if len(signs) == 1:
            s = signs.pop()
            nv = [v / (c * s) for v in nv]
            dv = [v / (c * s) for v in dv]
    for vals, which, poly in ((nv, "numerator", num), (dv, "denominator", den)):
        for w, v in enumerate(vals):
            if v not in (0, 1):
                world = ", ".join(f"{a.name}={(w >> i) & 1}" for i, a in enumerate(atoms))
                raise OutsideFragmentError(
                    f"the {which} {sympy.factor(poly)} takes the value {v} at the corner {world}: corner values of "
                    "a WMC are 0 or 1, so this ratio is not WMC(✓)/WMC(✗) of any structure"
                )
    top = sum(1 << w for w, v in enumerate(nv) if v == 1)
    bottom = sum(1 << w for w, v in enumerate(dv) if v == 1)
    return atoms, top, bottom


def structure_of_ratio(num: sympy.Expr, den: sympy.Expr) -> Structure:
    """✓ and ✗ from ρ = num/den (reduced to lowest terms first)."""
    n, d = sympy.fraction(sympy.cancel(sympy.together(num / den)))
    if n == 0:
        raise OutsideFragmentError("ρ is identically 0: the ✓ side is empty (an infinite loss)")
    atoms, top, bottom = _corner_masks(n, d)
    if not atoms:
        raise OutsideFragmentError(f"ρ = {n}/{d} does not depend on any probability")
    return Structure(atoms, top, bottom)
