"""Decompilation: from a loss equation back to its program of structures (docs/semantics.md §4).

A loss written in SymPy syntax is split into terms ``c · f(z)``; each link ``f`` is recognised by its shape
(``log(1 + e^u)`` logistic, ``max(0, ·)`` hinge, ``(·)²`` squared, ``1/(1 + e^u)`` sigmoid, ``e^u`` exponential,
and a bare ``log X`` as a likelihood term), and ``z = β·log ρ − γ`` is read off as a sum of logarithms. ``ρ = N/D``
is reduced to lowest terms and ✓, ✗ are rebuilt from the corner values of ``N`` and ``D``: a polynomial is the WMC
of a formula exactly when it is multilinear and its corner values are 0 or 1. Anything else is reported with the
factor and the corner value that put it outside the fragment.

Variables: ``logp_w, logp_l`` (or ``p_w, p_l``), ``ref_logp_w, ref_logp_l`` (or ``ref_p_w, ref_p_l``), lengths
``len_w, len_l`` for length normalization, any other name is a hyperparameter. Functions: those of
:data:`FUNCTIONS` (``log, exp, log1p, expm1, sigmoid, logsigmoid, softplus, log1mexp, relu, max, min, abs, sqrt,
tanh, clamp``), optionally written ``torch.``/``F.``/``math.``-prefixed. The text is read by Python's parser and a
whitelist walk, never evaluated.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import sympy

from dpalogic.errors import DPALogicError, unknown
from dpalogic.language.equation import parse_expression
from dpalogic.language.syntax import Atom
from dpalogic.logic.structure import Structure
from dpalogic.semantics.program import Program, Term, rho_sympy, weight_symbol


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


def _simplify_logs(expr: sympy.Expr) -> sympy.Expr:
    """``log(1/X)`` → ``−log X`` (what ``-log(sigmoid(z))`` parses to), everywhere in the expression."""
    return expr.replace(
        lambda e: isinstance(e, sympy.log) and isinstance(e.args[0], sympy.Pow) and e.args[0].exp == -1,
        lambda e: -sympy.log(e.args[0].base),
    )


# --------------------------------------------------------------------------------------------------- parsing


# Bounds on the work one equation can cause: SymPy's printers and simplifier recurse once or more per level, and
# integer arithmetic on a literal or a power grows with its digits (9**9**9 alone would take hours).
def _names() -> dict[str, sympy.Symbol]:
    d: dict[str, sympy.Symbol] = {}
    for k in _ATOMS:
        d[f"logp_{k}"], d[f"ref_logp_{k}"], d[f"len_{k}"] = LOGP[k], REF_LOGP[k], LEN[k]
        d[f"p_{k}"], d[f"ref_p_{k}"], d[f"r_{k}"] = P[k], R[k], R[k]
    return d


def parse_equation(text: str) -> sympy.Expr:
    """Parse a loss equation without evaluating it; names that are neither variables nor functions are (positive)
    hyperparameters, whatever they are called (``I``, ``E``, ``N``, ``pi`` included)."""
    if not isinstance(text, str):
        raise DPALogicError(f"expected the text of a loss equation, got {type(text).__name__}")
    if not text.strip():
        raise DPALogicError("empty equation: write a loss such as -logsigmoid(beta*(logp_w - logp_l))")
    expr = parse_expression(text, variables=_names())
    # a name that looks like a variable (logp_q, ref_p_x, len_y) is a typo, not a hyperparameter
    variable_names = sorted(v.name for v in VARIABLES)
    for s in expr.free_symbols:
        if s not in VARIABLES and s.name.startswith(("logp_", "ref_logp_", "p_", "ref_p_", "r_", "len_")):
            raise unknown("variable", s.name, variable_names, "variables end in _w (chosen) or _l (rejected)")
    return _simplify_logs(expr)


# --------------------------------------------------------------------------------------------------- z = β·log ρ − γ


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


# --------------------------------------------------------------------------------------------------- links


def _as_exponent(e: sympy.Expr) -> sympy.Expr | None:
    """``e`` as ``exp(A)``: returns ``A = log e`` (expanded later, when log-probs become logs of probabilities).

    SymPy folds ``exp(β·(a − b))`` and friends into products and powers as it parses, so the exponent is recovered
    by taking the logarithm rather than by matching ``exp(·)``.
    """
    if isinstance(e, sympy.exp):
        return e.args[0]
    if e.free_symbols & VARIABLES and not e.has(sympy.Max) and not isinstance(e, sympy.Add):
        return sympy.log(e)
    return None


def _logistic_argument(u: sympy.Expr) -> sympy.Expr | None:
    """``log(1 + e^A)`` → ``z = −A`` (−log σ(z))."""
    if isinstance(u, sympy.log):
        inner = u.args[0]
        if isinstance(inner, sympy.Add) and 1 in inner.args:
            rest = sympy.Add(*[a for a in inner.args if a != 1])
            if rest.could_extract_minus_sign():  # log(1 − p) is a likelihood factor, not a logistic
                return None
            a = _as_exponent(rest)
            if a is not None:
                return -a
    return None


@dataclass
class DecompiledTerm:
    link: str
    coef: sympy.Expr
    structure: Structure
    scale: sympy.Expr
    shift: sympy.Expr
    normalized: bool
    link_params: dict = field(default_factory=dict)
    source: str = ""
    likelihood: sympy.Expr | None = None  # X of a likelihood term c·(−log X), for merging −log a − log b

    def as_term(self) -> Term:
        return Term(
            self.structure,
            self.link,
            self.coef,
            self.scale,
            self.shift,
            tuple(self.link_params.items()),
            self.normalized,
        )


def _from_z(link: str, coef, z: sympy.Expr, source, params=None, orient: bool = True) -> DecompiledTerm:
    lr = log_ratio(z, orient=orient)
    s = structure_of_ratio(lr.numerator, lr.denominator)
    return DecompiledTerm(link, coef, s, lr.scale, lr.shift, lr.normalized, params or {}, str(source))


def _likelihood_term(coef, u: sympy.Expr, source) -> DecompiledTerm:
    """``k · log(N/D)`` read as ``c · (−log X)``, the semantic loss of ρ = X / (1 − X) (a likelihood term).

    Two readings exist: ``c = −k, X = N/D`` or ``c = k, X = D/N``; the one whose ρ has 0/1 corner values wins
    (the one with a positive coefficient is tried first).
    """
    lr = log_ratio(u, orient=False)
    k = coef * lr.scale
    const = sympy.exp(-lr.shift)  # a constant inside log X stays in X (and is then reported)
    readings = [(-k, const * lr.numerator / lr.denominator), (k, lr.denominator / (const * lr.numerator))]
    if k.could_extract_minus_sign() is False and not (k.is_number and k < 0):
        readings.reverse()
    first_error = None
    for c, x in readings:
        try:
            s = structure_of_ratio(x, 1 - x)
        except OutsideFragmentError as e:
            first_error = first_error or e
            continue
        return DecompiledTerm(
            "logistic", c, s, sympy.Integer(1), sympy.Integer(0), lr.normalized, {}, str(source), sympy.expand(x)
        )
    raise first_error


def _decompile_term(coef, u: sympy.Expr, source) -> list[DecompiledTerm]:
    if isinstance(u, sympy.Add):  # a coefficient times a sum: distribute
        out = []
        for t in u.args:
            c, rest = t.as_independent(*VARIABLES)
            if rest == 1:
                continue
            out += _decompile_term(coef * c, rest, t)
        return out
    weight = _policy_weight(u)
    if weight is not None:  # (EXO and DiscoPOP, products of two link shapes, are recognized as a whole later)
        raise OutsideFragmentError(
            f"the term {source} multiplies a link by {weight}, a weight that depends on the log-probabilities (as "
            "WPO's policy-dependent weight does): a term of a program is c·f(β·log ρ − γ) with c a constant, so "
            "the weighted loss is outside the fragment"
        )
    z = _logistic_argument(u)
    if z is not None:
        return [_from_z("logistic", coef, z, source)]
    if isinstance(u, sympy.Max) and len(u.args) == 2 and 0 in u.args:
        b = next(a for a in u.args if a != 0)
        margin, rest = b.as_independent(*VARIABLES, as_Add=True)
        return [_from_z("hinge", coef, -rest, source, {"margin": margin})]
    if isinstance(u, sympy.Pow) and u.exp == 2:
        return [_from_z("squared", coef, u.base, source)]
    if isinstance(u, sympy.Pow) and u.exp == -1 and isinstance(u.base, sympy.Add) and 1 in u.base.args:
        rest = sympy.Add(*[a for a in u.base.args if a != 1])
        a = _as_exponent(rest)
        if a is not None:
            return [_from_z("sigmoid", coef, a, source)]
    linear, _ = _to_probabilities(u)
    # log-probs inside exp are probabilities (log(1 − exp(logp_l)) is log(1 − p_l)): look for exp after rewriting
    if _log_factors(linear) is not None and not linear.has(sympy.exp):
        try:
            return [_likelihood_term(coef, u, source)]
        except OutsideFragmentError:
            bt = _bradley_terry(coef, u, source)
            if bt is None:
                raise
            return [bt]
    bt = _bradley_terry(coef, u, source)
    if bt is not None:
        return [bt]
    a = _as_exponent(u)
    if a is not None:
        return [_from_z("exponential", coef, -a, source)]
    found = _identify_link(coef, u, source)
    if found is not None:
        return [found]
    raise OutsideFragmentError(
        f"the term {source} matches no link (logistic log(1+e^u), hinge max(0,·), squared (·)², sigmoid 1/(1+e^u), "
        "exponential e^u, or a log-likelihood log X)"
    )


def _bradley_terry(coef, u: sympy.Expr, source) -> DecompiledTerm | None:
    """``k·log(A/(A + B))`` (Bradley–Terry, ``A = p_w**β``) as ``−k·(−log σ(log A − log B))``: the logistic link of
    ``z = log A − log B``, whatever the exponents (they become β when log A − log B is read as β·log ρ)."""
    if not isinstance(u, sympy.log):
        return None
    n, d = sympy.fraction(sympy.together(u.args[0]))
    d = sympy.expand(d)
    if not (n.free_symbols & VARIABLES) or not isinstance(d, sympy.Add):
        return None
    rest = sympy.expand(d - sympy.expand(n))
    if rest == 0 or len(sympy.Add.make_args(rest)) >= len(d.args) or not rest.free_symbols & VARIABLES:
        return None
    return _from_z("logistic", -coef, sympy.log(n) - sympy.log(rest), source)


def _policy_weight(u: sympy.Expr) -> sympy.Expr | None:
    """In a product of two or more factors that depend on log-probs, the one that is not a link: the weight."""
    if not isinstance(u, sympy.Mul):
        return None
    factors = [f for f in u.args if f.free_symbols & VARIABLES]
    if len(factors) < 2:
        return None

    def link_shaped(g: sympy.Expr) -> bool:
        return (
            isinstance(g, (sympy.log, sympy.Max))
            or (isinstance(g, sympy.Pow) and g.exp == 2)
            or (isinstance(g, sympy.Pow) and g.exp == -1 and isinstance(g.base, sympy.Add))
        )

    links = [f for f in factors if link_shaped(f)]
    if len(links) != 1:
        return None
    return sympy.Mul(*[f for f in factors if f is not links[0]])


def _is_log_linear(e: sympy.Expr) -> bool:
    if not (e.free_symbols & VARIABLES) or isinstance(e, sympy.Symbol):
        return False
    try:
        zp, _ = _to_probabilities(e)
    except OutsideFragmentError:
        return False
    parsed = _log_factors(zp)
    return parsed is not None and bool(parsed[0])


def _identify_link(coef, u: sympy.Expr, source) -> DecompiledTerm | None:
    """Last resort for links with no simple shape (EXO, DiscoPOP): find z inside the term, replace it by a symbol,
    and compare the remaining one-variable function with every known link numerically (random z and parameters)."""
    import random

    from dpalogic.semantics.program import LINKS

    cands: list[sympy.Expr] = []

    def visit(e):
        if _is_log_linear(e):
            cands.append(e)
            return
        for a in e.args:
            visit(a)

    visit(u)
    if not cands:
        return None
    # z itself is the candidate with the fewest hyperparameters (z/τ also occurs inside DiscoPOP)
    z0 = min(cands, key=lambda c: (len(c.free_symbols - VARIABLES), sympy.count_ops(c)))
    Z = sympy.Symbol("z_", real=True)
    mapping = {}
    f0, _ = _log_factors(_to_probabilities(z0)[0])
    key = next(iter(f0))
    for c in dict.fromkeys(cands):
        fc, _ = _log_factors(_to_probabilities(c)[0])
        k = sympy.simplify(fc.get(key, 0) / f0[key])  # c = k·z0 + const, e.g. z/τ inside DiscoPOP
        diff, _ = _to_probabilities(c - k * z0)
        if k == 0 or diff.free_symbols & VARIABLES:
            return None
        mapping[c] = k * Z + diff
    g = u.xreplace(mapping)
    if g.free_symbols & VARIABLES:
        return None
    hyper = sorted(g.free_symbols - {Z}, key=lambda x: x.name)
    rng = random.Random(0)
    samples = [({h: rng.uniform(0.05, 0.4) for h in hyper}, rng.uniform(-3, 3)) for _ in range(6)]
    for name, info in LINKS.items():
        param_choices = [{}] if not info.params else [{info.params[0][0]: h} for h in hyper]
        for params in param_choices:
            for orient in (1, -1):
                f = info.sympy(orient * Z, **params)
                ok = True
                for hv, zv in samples:
                    try:
                        a = complex(g.subs(hv).subs(Z, zv).evalf())
                        b = complex(f.subs(hv).subs(Z, zv).evalf())
                    except (TypeError, ValueError, ArithmeticError):  # SymPy cannot compare or evaluate it there
                        ok = False
                        break
                    if not abs(a - b) <= 1e-9 * (1 + abs(b)):
                        ok = False
                        break
                if ok:
                    t = _from_z(name, coef, orient * z0, source, params, orient=False)
                    return t
    return None


def _normalize(terms: list[DecompiledTerm]) -> tuple[list[DecompiledTerm], sympy.Expr]:
    """Equivalent spellings to one form, and the constant they leave:

    * ``−c·σ(−z)`` is ``c·σ(z) − c`` (1 − σ(x) = σ(−x)): a sigmoid term keeps a positive coefficient, on the
      reversed structure with the shift negated;
    * ``(z)²`` is ``(−z)²``: a squared term's shift is kept non-negative (SPPO's ``(b + 0.5/β)²`` is the reversed
      ``rejected`` structure with shift 1/(2β), as in the catalog);
    * ``−c·log a − c·log b`` is ``−c·log(ab)``: likelihood terms with one coefficient merge when the product is
      the likelihood of one structure (``−log p_w − log(1 − p_l)`` is ceunl).
    """
    constant = sympy.Integer(0)
    for t in terms:
        if t.link == "sigmoid" and sympy.sympify(t.coef).could_extract_minus_sign():
            constant += t.coef
            t.coef, t.structure, t.shift = -t.coef, t.structure.reversed(), -t.shift
        if t.link == "squared" and sympy.sympify(t.shift).could_extract_minus_sign():
            t.structure, t.shift = t.structure.reversed(), -t.shift
    groups: dict[tuple, list[DecompiledTerm]] = {}
    for t in terms:
        if t.likelihood is not None:
            groups.setdefault((sympy.simplify(t.coef), t.normalized), []).append(t)
    for (coef, normalized), group in groups.items():
        if len(group) < 2:
            continue
        x = sympy.expand(sympy.Mul(*[t.likelihood for t in group]))
        try:
            s = structure_of_ratio(x, 1 - x)
        except OutsideFragmentError:
            continue
        source = " + ".join(t.source for t in group)
        merged = DecompiledTerm("logistic", coef, s, sympy.Integer(1), sympy.Integer(0), normalized, {}, source, x)
        terms = [merged if t is group[0] else t for t in terms if t is group[0] or t not in group]
    return terms, constant


def _merge(terms: list[DecompiledTerm]) -> list[DecompiledTerm]:
    """Terms with the same link, structure, scale and shift are one term with the summed coefficient."""
    out: list[DecompiledTerm] = []
    for t in terms:
        for o in out:
            same = (o.link, o.structure, o.normalized, tuple(o.link_params.items())) == (
                t.link,
                t.structure,
                t.normalized,
                tuple(t.link_params.items()),
            )
            if same and sympy.simplify(o.scale - t.scale) == 0 and sympy.simplify(o.shift - t.shift) == 0:
                o.coef = sympy.simplify(o.coef + t.coef)
                break
        else:
            out.append(t)
    return [t for t in out if sympy.simplify(t.coef) != 0]


@dataclass
class Decompiled:
    equation: str
    terms: list[DecompiledTerm]
    constant: sympy.Expr

    @property
    def program(self) -> Program:
        hp = sorted({s.name for t in self.terms for e in (t.coef, t.scale, t.shift) for s in e.free_symbols})
        return Program(tuple(t.as_term() for t in self.terms), tuple((h, float("nan")) for h in hp))


def decompile(text: str) -> Decompiled:
    """Decompile a loss equation (SymPy syntax) into terms with structures; raises OutsideFragmentError."""
    return decompile_expression(parse_equation(text), text)


def decompile_expression(expr: sympy.Expr, text: str | None = None) -> Decompiled:
    """Decompile a SymPy loss over :data:`VARIABLES` (hyperparameters: any other symbol), e.g. a traced function."""
    text = str(expr) if text is None else text
    expr = _simplify_logs(expr)
    if not expr.free_symbols & VARIABLES:
        raise DPALogicError(f"{text!r} mentions no log-probability (logp_w, logp_l, ref_logp_w, ...)")
    try:
        return _decompile(text, expr)
    except DPALogicError:
        raise
    except (TypeError, ValueError, ArithmeticError) as e:
        # SymPy refuses to compare or order a value that turned complex or infinite once log-probs became logs of
        # probabilities (log(−e^p), log(1 − e^{log p − log p})): no real loss on (0, 1) probabilities does that
        raise OutsideFragmentError(
            f"{text!r} takes a complex or infinite value once log-probs are written as logs of probabilities in "
            f"(0, 1), so it is not a program of structures (SymPy: {e})"
        ) from None


def _decompile(text: str, expr: sympy.Expr) -> Decompiled:
    terms: list[DecompiledTerm] = []
    constant = sympy.Integer(0)
    try:
        for t in sympy.Add.make_args(expr):
            c, rest = t.as_independent(*VARIABLES)
            if rest == 1:
                constant += c
                continue
            terms += _decompile_term(c, rest, t)
        terms, moved = _normalize(terms)
        constant += moved
    except OutsideFragmentError:
        # a link whose expanded form is itself a sum (EXO, DiscoPOP): try the whole expression as one term
        try:
            whole = _identify_link(sympy.Integer(1), expr, expr)
        except OutsideFragmentError:
            whole = None
        if whole is None:
            raise
        return Decompiled(text, [whole], sympy.Integer(0))
    return Decompiled(text, _merge(terms), constant)


# --------------------------------------------------------------------------------------------------- catalog


def program_equation(program: Program) -> str:
    """A catalog program's closed form as an equation over ``logp_w, ref_logp_w, len_w, …`` (for round trips)."""
    parts = []
    for t in program.terms:
        reps = {}
        for a in t.structure.atoms:
            k = a.answer[1]
            lp = LOGP[k] if a.pred == "M" else REF_LOGP[k]
            reps[weight_symbol(a)] = sympy.exp(lp / LEN[k] if t.normalized else lp)
        parts.append(t.sympy().xreplace(reps))
    return str(sympy.Add(*parts))


def _plain(e, dummies: dict[str, sympy.Symbol] | None = None) -> sympy.Expr:
    """Hyperparameters by name only (the decompiler's are positive, the catalog's plain); ``dummies`` renames them."""
    e = sympy.sympify(e)
    return e.xreplace({s: (dummies or {}).get(s.name, sympy.Symbol(s.name)) for s in e.free_symbols})


def _zero(e: sympy.Expr) -> bool:
    return sympy.simplify(e) == 0


def _same_structure(s1: Structure, s2: Structure) -> bool:
    from dpalogic.logic.structure import align

    a, b = align(s1, s2)
    return (a.top, a.bottom) == (b.top, b.bottom)


def _equations(mine: list[DecompiledTerm], theirs: list[Term], dummies: dict) -> list[sympy.Expr] | None:
    """The equations that make ``mine`` equal to ``theirs`` term by term (the first pairing whose links, weights
    and structures agree; their unpaired terms must vanish), or None when no pairing exists."""
    from itertools import permutations

    from dpalogic.semantics.links import LINKS

    for chosen in permutations(range(len(theirs)), len(mine)):
        pairs = list(zip(mine, [theirs[j] for j in chosen]))
        if not all(
            t.link == u.link and t.normalized == u.normalized and _same_structure(t.structure, u.structure)
            for t, u in pairs
        ):
            continue
        eqs = []
        for t, u in pairs:
            eqs += [_plain(t.coef) - _plain(u.coef, dummies), _plain(t.scale) - _plain(u.scale, dummies)]
            eqs.append(_plain(t.shift) - _plain(u.shift, dummies))
            given = dict(u.link_params)
            for k, default in LINKS[t.link].params if t.link in LINKS else ():
                eqs.append(_plain(t.link_params.get(k, default)) - _plain(given.get(k, default), dummies))
        eqs += [_plain(theirs[j].coef, dummies) for j in range(len(theirs)) if j not in chosen]
        return eqs
    return None


def matches(d: Decompiled) -> dict:
    """Catalog entries with the same structure per term; whole programs equal for *all* hyperparameter values
    (``program``), or equal once the entry's hyperparameters are expressed in the equation's (``program_with``:
    "robust with label_smoothing := −ε/(1 − 2ε)"), or equal once one of the equation's hyperparameters is 0
    (``program_at``: cDPO is "dpo at label_smoothing = 0"). Constants are ignored: they do not change the loss's
    gradients."""
    from dpalogic.semantics.catalog import entries

    per_term = [
        [
            n
            for n, e in entries().items()
            if e.program.structure is not None and _same_structure(t.structure, e.program.structure)
        ]
        for t in d.terms
    ]
    exact, with_sub, at_zero = [], [], []
    mine_hp = sorted(
        {s.name for t in d.terms for e in (t.coef, t.scale, t.shift) for s in sympy.sympify(e).free_symbols}
    )
    for name, e in entries().items():
        theirs = list(e.program.terms)
        if len(theirs) < len(d.terms):
            continue
        eqs = _equations(d.terms, theirs, {})
        if eqs is not None and all(_zero(q) for q in eqs):
            exact.append(name)
            continue
        hp = {h: sympy.Dummy(h) for h, _ in e.program.hyperparameters}
        eqs = _equations(d.terms, theirs, hp)
        unknowns = [x for x in hp.values() if eqs and any(q.has(x) for q in eqs)]
        if eqs is not None and unknowns:
            try:
                solutions = sympy.solve(eqs, unknowns, dict=True)
            except (NotImplementedError, TypeError, ValueError):
                solutions = []
            for sol in solutions:
                if set(sol) == set(unknowns) and all(_zero(q.xreplace(sol)) for q in eqs):
                    sub = {k.name: str(sympy.simplify(v)) for k, v in sol.items() if str(sympy.simplify(v)) != k.name}
                    text = ", ".join(f"{k} := {v}" for k, v in sub.items())
                    with_sub.append({"name": name, "substitution": sub, "text": f"{name} with {text}"})
                    break
    if exact:  # equal for all values: the substitutions (robust at label_smoothing := 0 …) say nothing more
        with_sub = []
    else:
        for h in mine_hp:  # an extra hyperparameter at 0 (label smoothing, a margin, an auxiliary weight)
            zero = {
                s: 0
                for t in d.terms
                for s in sympy.sympify(t.coef).free_symbols | sympy.sympify(t.shift).free_symbols
                if s.name == h
            }
            if not zero:
                continue
            terms = [
                DecompiledTerm(
                    t.link,
                    sympy.sympify(t.coef).xreplace(zero),
                    t.structure,
                    sympy.sympify(t.scale).xreplace(zero),
                    sympy.sympify(t.shift).xreplace(zero),
                    t.normalized,
                    t.link_params,
                )
                for t in d.terms
            ]
            terms = [t for t in terms if not _zero(t.coef)]
            if not terms:
                continue
            for name, e in entries().items():
                eqs = _equations(terms, list(e.program.terms), {})
                if eqs is not None and all(_zero(q) for q in eqs):
                    at_zero.append({"name": name, "substitution": {h: "0"}, "text": f"{name} at {h} = 0"})
    return {"terms": per_term, "program": exact, "program_with": with_sub, "program_at": at_zero}


def report(d: Decompiled) -> dict:
    """JSON-ready description: each term's link, β, γ, structure parts and ρ; catalog matches."""
    from dpalogic.language.syntax import to_ascii

    m = matches(d)
    terms = []
    for t, names in zip(d.terms, m["terms"]):
        core, given, additive = t.structure.readable_triple()
        terms.append(
            {
                "link": t.link,
                "coef": str(t.coef),
                "beta": str(t.scale),
                "gamma": str(t.shift),
                "link_params": {k: str(v) for k, v in t.link_params.items()},
                "normalized": t.normalized,
                "structure": t.structure.text("ascii"),
                "core": to_ascii(core),
                "given": to_ascii(given),
                "additive": to_ascii(additive),
                "top": to_ascii(t.structure.top_formula),
                "bottom": to_ascii(t.structure.bottom_formula),
                "rho": str(rho_sympy(t.structure)),
                "same_structure_as": names,
                "source": t.source,
            }
        )
    return {
        "equation": d.equation,
        "terms": terms,
        "constant": str(d.constant),
        "matches": m["program"],
        "matches_with": [x["text"] for x in m["program_with"] + m["program_at"]],
    }


# --------------------------------------------------------------------------------------------------- by name or equation


def decompile_spec(spec: str) -> dict:
    """``dpalogic decompile EXPR|NAME``: a catalog name is decompiled from its own closed form."""
    from dpalogic.semantics.catalog import _alias_map, lookup

    # a name never starts with "-": "-logp_w" is an equation, not the loss "_logp_w"
    key = spec.strip().lower().replace("-", "_")
    plain = key.isidentifier() and not spec.strip().startswith(("-", "+"))
    if key in _alias_map() or (plain and not key.startswith(("logp", "ref_", "p_", "len"))):
        entry = lookup(key)
        out = report(decompile(program_equation(entry.program)))
        out["name"] = entry.name
        return out
    return report(decompile(spec))


__all__ = ["Decompiled", "OutsideFragmentError", "decompile", "matches", "program_equation", "report"]
