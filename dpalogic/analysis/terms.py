"""Recognizing the terms of a loss: each ``c · f(z)`` with its link ``f`` found by shape (logistic, hinge, squared,
sigmoid, exponential, a log-likelihood, Bradley–Terry) or, for links with no simple shape (EXO, DiscoPOP), by
comparing the one-variable function left around ``z`` with every known link; then equivalent spellings are brought
to one form and equal terms merged."""

from __future__ import annotations

from dataclasses import dataclass, field

import sympy

from dpalogic.analysis.ratio import (
    VARIABLES,
    OutsideFragmentError,
    _log_factors,
    _to_probabilities,
    log_ratio,
    structure_of_ratio,
)
from dpalogic.logic.structure import Structure
from dpalogic.semantics.program import Program, Term


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
