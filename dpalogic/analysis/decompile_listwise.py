"""Decompiling listwise losses: a softmax over log-odds is ``ExactlyOne`` conditioning (docs/semantics.md §8).

The pairwise decompiler (:mod:`dpalogic.analysis.decompile`) rebuilds ✓ and ✗ from the 2^n corner values of ρ; over
K answers that is out of reach, and a softmax's denominator expands into exponentially many monomials. Here the
equation is read *lifted*: ``logsumexp`` stays one opaque node, and the loss must be a sum of softmax cross-entropy
terms over per-answer scores,

    c · (logsumexp(s_a, s_b, …) − s_a)   =   c · (−log σ(s_a − logsumexp(s_b, …)))
    c · (−log σ(β·(s_a − logsumexp(s_b, …)) − γ))      (also written softplus(−z))

Each term is one structure, because ``logsumexp`` of log-odds is ``log e_1`` of the odds, and ``e_1(o_S)·Π_S(1 − p)``
is the weight of "exactly one answer of S is valid":

==========================================  ==========================================================  =============
score ``s_j``                               structure of the term                                       ρ
==========================================  ==========================================================  =============
``logodds(logp_j)`` = log p − log(1 − p)    ``(M(ya), ExactlyOne(M(ya), M(yb), …))``                    o_a / e_1(o)
log-odds minus reference log-odds            the same, conditioned also on ``Xor(M(yj), Ref(yj))``, each j  (o_a/ō_a) / Σ o_b/ō_b
``logp_j`` or ``logp_j − ref_logp_j``       a single structure only against one other answer (CPO, DPO)  p_a / p_b …
==========================================  ==========================================================  =============

A softmax over log-probabilities (or over DPO's implicit rewards) with three answers or more is *not* a structure:
its denominator ``Σ_b p_b`` takes the value 2 or more at the all-true corner, and a WMC's corner values are 0 or 1
(multiplying ρ's numerator and denominator by any WMC keeps that corner value). A temperature inside the softmax
(``logsumexp(β·s)``) is not one either (``Σ o^β`` is no polynomial). Both are reported as such.

Variables: ``logp_1 … logp_256`` (policy log-probs of answers y1 …), ``ref_logp_1 …``; any other name is a
hyperparameter. Functions: the equation vocabulary plus ``logsumexp(x1, …, xK)`` and ``logodds(x)`` (x − log(1 − eˣ)).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import sympy

from dpalogic.errors import DPALogicError, unknown
from dpalogic.language.equation import FUNCTIONS, parse_expression

MAX_ANSWERS = 256
LOGP = {j: sympy.Symbol(f"logp_{j}", real=True) for j in range(1, MAX_ANSWERS + 1)}
REF_LOGP = {j: sympy.Symbol(f"ref_logp_{j}", real=True) for j in range(1, MAX_ANSWERS + 1)}
_LISTWISE = re.compile(r"\b(logsumexp|logodds|(ref_)?logp_\d+)\b")


class LogSumExp(sympy.Function):
    """``log Σ exp(x_i)``, kept as one node (expanding it is what makes the pairwise decompiler exponential)."""

    is_real = True  # one argument stays a node too: −logsigmoid(s_1 − logsumexp(s_2)) is a two-answer softmax


class Softplus(sympy.Function):
    """``log(1 + eˣ)``, kept as one node: SymPy would otherwise fold the log-odds inside ``e^x`` into a sum."""

    is_real = True


def _log1mexp(x: sympy.Expr) -> sympy.Expr:
    return sympy.log(1 - sympy.exp(x))


_FUNCTIONS = {
    **FUNCTIONS,
    "logsumexp": (1, MAX_ANSWERS, LogSumExp),
    "logodds": (1, 1, lambda x: x - _log1mexp(x)),
    "softplus": (1, 1, Softplus),
    "logsigmoid": (1, 1, lambda x: -Softplus(-x)),
}


def is_listwise(text: str) -> bool:
    """Does the equation use K-answer variables or functions (``logp_3``, ``logsumexp``)?"""
    return bool(_LISTWISE.search(text))


class OutsideListwiseError(DPALogicError):
    """A listwise equation that is not a program of structures; the message says which part and why."""


# --------------------------------------------------------------------------------------------------- scores

# a score's coefficients on (log p_j, log(1 − p_j), log r_j, log(1 − r_j)) → its kind
_KINDS = {
    (1, -1, 0, 0): "odds",
    (1, -1, -1, 1): "odds_vs_ref",
    (1, 0, 0, 0): "logp",
    (1, 0, -1, 0): "reward",
}


def _features(j: int) -> tuple[sympy.Expr, ...]:
    return (LOGP[j], _log1mexp(LOGP[j]), REF_LOGP[j], _log1mexp(REF_LOGP[j]))


def _linear(expr: sympy.Expr) -> tuple[dict[sympy.Expr, sympy.Expr], sympy.Expr]:
    """``expr`` as ``Σ c_f · f + const`` over the features (per-answer logs and logsumexp nodes)."""
    expr = sympy.expand(expr, log=False, power_exp=False)
    coefs: dict[sympy.Expr, sympy.Expr] = {}
    const = sympy.Integer(0)
    variables = set(LOGP.values()) | set(REF_LOGP.values())
    for t in sympy.Add.make_args(expr):
        c, f = t.as_independent(*variables, LogSumExp, as_Add=False)
        if f == 1:
            const += c
        elif f.has(*variables) and (f in variables or isinstance(f, (LogSumExp, sympy.log))):
            coefs[f] = coefs.get(f, 0) + c
        else:
            raise OutsideListwiseError(
                f"{t} is not a multiple of a log-prob, log(1 − exp(log-prob)) or logsumexp: a listwise term is "
                "−log σ(β·(s_a − logsumexp(s_b, …)) − γ) over per-answer scores"
            )
    return {f: c for f, c in coefs.items() if c != 0}, const


@dataclass(frozen=True)
class Score:
    answer: int
    kind: str
    scale: sympy.Expr


def _score(expr: sympy.Expr) -> Score:
    coefs, const = _linear(expr)
    if const != 0:
        raise OutsideListwiseError(f"the score {expr} has a constant part {const}: scores are per-answer log-odds")
    answers = {j for f in coefs for j in LOGP if f.has(LOGP[j]) or f.has(REF_LOGP[j])}
    if len(answers) != 1 or any(isinstance(f, LogSumExp) for f in coefs):
        raise OutsideListwiseError(f"the score {expr} must depend on exactly one answer (it mentions {len(answers)})")
    j = answers.pop()
    vec = [coefs.get(f, 0) for f in _features(j)]
    scale = next(v for v in vec if v != 0)
    kind = _KINDS.get(tuple(sympy.nsimplify(v / scale) for v in vec))
    if kind is None:
        raise OutsideListwiseError(
            f"the score {expr} of y{j} is not log-odds (logodds(logp_{j})), log-odds against the reference, "
            f"logp_{j} or logp_{j} − ref_logp_{j}"
        )
    return Score(j, kind, scale)


# --------------------------------------------------------------------------------------------------- terms


@dataclass(frozen=True)
class ListwiseTermInfo:
    """One decompiled term ``coef · (−log σ(scale·log ρ − shift))``: its structure and ρ in words."""

    coef: sympy.Expr
    scale: sympy.Expr
    shift: sympy.Expr
    top: int
    others: tuple[int, ...]
    kind: str
    structure: object  # a Structure (≤ 12 atoms) or a ListStructure
    rho: str


def _structure(kind: str, a: int, others: tuple[int, ...]):
    """The structure of a softmax term (docs/semantics.md §8), and its ρ as text."""
    from dpalogic.language.syntax import Atom, atoms_text, parse_formula
    from dpalogic.logic.listwise import parse_any
    from dpalogic.logic.structure import Structure

    if kind in ("logp", "reward"):  # one other answer (checked): CPO's sides, DPO's sides
        (b,) = others
        if kind == "logp":
            top, bottom, rho = f"M(y{a})", f"M(y{b})", f"p_{a} / p_{b}"
        else:
            top, bottom, rho = f"M(y{a}) & Ref(y{b})", f"M(y{b}) & Ref(y{a})", f"(p_{a}·r_{b}) / (p_{b}·r_{a})"
        return Structure.from_sides(parse_formula(top), parse_formula(bottom)), rho
    m = [Atom("M", f"y{j}").symbol for j in (a, *others)]
    given = f"ExactlyOne({atoms_text(m)})"
    rho = f"o_{a} / e_1(o[{atoms_text(m[1:])}])"
    if kind == "odds_vs_ref":
        given += "".join(f" & Xor(M(y{j}), Ref(y{j}))" for j in sorted((a, *others)))
        rho = f"(o_{a}/ō_{a}) / Σ_b o_b/ō_b, b in {atoms_text(m[1:])} (ō: the reference's odds)"
    return parse_any(f"(M(y{a}), {given})"), rho


def _term(coef, scale, shift, top: Score, rest: list[Score]) -> ListwiseTermInfo:
    kinds = {s.kind for s in (top, *rest)}
    if len(kinds) != 1:
        raise OutsideListwiseError(f"the scores mix kinds ({', '.join(sorted(kinds))}): one softmax, one kind of score")
    kind = kinds.pop()
    if any(s.scale != top.scale for s in rest) or top.scale != 1:
        raise OutsideListwiseError(
            "a temperature inside the softmax (scores times a factor): Σ o^β is not a polynomial in the "
            "probabilities, so no structure has this ratio; put β outside: −logsigmoid(β·(s_a − logsumexp(…)))"
        )
    others = tuple(s.answer for s in rest)
    if top.answer in others or len(set(others)) != len(others):
        raise OutsideListwiseError("an answer appears twice in one softmax")
    if kind in ("logp", "reward") and len(others) > 1:
        what = "log-probabilities" if kind == "logp" else "implicit rewards log p − log r"
        raise OutsideListwiseError(
            f"a softmax over {what} of {len(others) + 1} answers is not a structure: its denominator "
            f"{'Σ p_b' if kind == 'logp' else 'Σ p_b·Π r'} takes the value {len(others)} at the corner where every "
            "atom is true, and a WMC's corner values are 0 or 1; over log-odds (logodds(logp_j)) it is "
            "ExactlyOne conditioning"
        )
    structure, rho = _structure(kind, top.answer, others)
    return ListwiseTermInfo(coef, scale, shift, top.answer, others, kind, structure, rho)


def _logistic_term(coef: sympy.Expr, body: sympy.Expr) -> ListwiseTermInfo:
    """``coef · softplus(−z)`` with ``z = β·(s_a − logsumexp(…)) − γ``."""
    coefs, const = _linear(-body.args[0])
    lses = [f for f in coefs if isinstance(f, LogSumExp)]
    if len(lses) != 1:
        raise OutsideListwiseError(f"z = {-body.args[0]} must have exactly one logsumexp (it has {len(lses)})")
    (lse,) = lses
    beta = -coefs.pop(lse)
    if not beta.is_positive:
        raise OutsideListwiseError(f"z = {-body.args[0]}: logsumexp must enter as −β·logsumexp(…) with β > 0")
    top = _score(sympy.Add(*[c * f for f, c in coefs.items()]) / beta)
    return _term(coef, beta, -const, top, [_score(a) for a in lse.args])


def _softmax_terms(lses: dict, rest: sympy.Expr) -> list[ListwiseTermInfo]:
    """``Σ_k c_k·logsumexp(A_k) − Σ_j t_j·s_j`` with each ``s_j`` among the arguments of a set. SymPy merges equal
    ``logsumexp`` nodes (ListNet's ``Σ_j t_j·(L − s_j)`` arrives as ``(Σ t_j)·L − Σ t_j·s_j``), so a set's coefficient
    is split among the scores of its arguments that the rest subtracts. Sets are matched from the smallest up, so
    Plackett–Luce's nested sets match their one way."""
    remaining, const = _linear(rest)
    out = []
    for lse, c in sorted(lses.items(), key=lambda x: len(x[0].args)):
        scores = [_score(a) for a in lse.args]
        needs = [_linear(a)[0] for a in lse.args]
        weights = _split(c, [_available(remaining, need) for need in needs])
        if weights is None:
            raise OutsideListwiseError(
                f"{fmt(c)}·logsumexp(…) over {', '.join(f'y{s.answer}' for s in scores)} is not matched by −t_j·s_j "
                f"for scores s_j among its arguments with Σ t_j = {fmt(c)}: a softmax cross-entropy is "
                "logsumexp(s_a, s_b, …) − s_a"
            )
        for i, (w, need) in enumerate(zip(weights, needs)):
            if w == 0:
                continue
            for f, v in need.items():
                remaining[f] = sympy.expand(remaining.get(f, sympy.Integer(0)) + w * v)
            out.append(_term(w, sympy.Integer(1), sympy.Integer(0), scores[i], scores[:i] + scores[i + 1 :]))
    left = " + ".join(f"({fmt(v)})·{f}" for f, v in remaining.items() if v != 0)
    if left or const != 0:
        raise OutsideListwiseError(f"left over besides the softmax terms: {left or fmt(const)}")
    return out


def _available(remaining: dict, need: dict) -> sympy.Expr:
    """How many times ``−s`` the rest holds, read on the score's first feature (the leftover check confirms it)."""
    f, v = next(iter(need.items()))
    return sympy.expand(-remaining.get(f, sympy.Integer(0)) / v)


def _split(c: sympy.Expr, avail: list[sympy.Expr]) -> list[sympy.Expr] | None:
    """Weights ``t_j`` with ``Σ t_j = c``, ``t_j`` at most what the rest holds of score j; None if there are none."""
    if sympy.expand(sum(avail) - c) == 0:  # every score subtracted belongs to this set: ListNet's target weights
        return avail
    for i, a in enumerate(avail):  # one score carries the whole set (the others belong to other sets)
        if sympy.expand(a - c) == 0:
            return [c if k == i else sympy.Integer(0) for k in range(len(avail))]
    if not (c.is_number and all(a.is_number for a in avail)):
        return None
    weights, left = [], c  # numbers: take what each score has, up to c, in the order written
    for a in avail:
        take = min(a, left) if c > 0 and a > 0 else max(a, left) if c < 0 and a < 0 else sympy.Integer(0)
        weights.append(take)
        left -= take
    return weights if left == 0 else None


def fmt(e: sympy.Expr) -> str:
    """A number or expression as a person writes it: 0.5, 1, 2·beta — decimals where they end, 1/3 where not."""
    e = sympy.sympify(e)

    def decimal(q: sympy.Rational) -> bool:
        d = q.q
        while d % 2 == 0:
            d //= 2
        while d % 5 == 0:
            d //= 5
        return d == 1 and q.q != 1

    e = e.xreplace({q: sympy.Float(q, 30) for q in e.atoms(sympy.Rational) if decimal(q)})
    return sympy.sstr(e, full_prec=False)


def _rationals(expr: sympy.Expr) -> sympy.Expr:
    """Decimals written in the equation as the exact fractions they name (0.1 is 1/10), so that 0.1 + 0.2 = 0.3."""
    floats = {f: sympy.Rational(repr(float(f))) for f in expr.atoms(sympy.Float) if sympy.Float(f).is_finite}
    return expr.xreplace(floats)


_NAME = re.compile(r"(ref_)?logp_(\w+)$")


def _check_names(expr: sympy.Expr) -> None:
    """A name that looks like a log-prob but names no answer is a mistake, not a hyperparameter."""
    for s in sorted(expr.free_symbols, key=lambda s: s.name):
        m = _NAME.match(s.name)
        if m is None or s in LOGP.values() or s in REF_LOGP.values():
            continue
        j = m.group(2)
        if j.isdigit():
            if int(j) == 0:
                raise OutsideListwiseError(f"{s.name}: y0 is not an answer; answers are y1 … y{MAX_ANSWERS}")
            raise OutsideListwiseError(
                f"{s.name}: unknown answer y{int(j)} (answers go up to y{MAX_ANSWERS}, logp_{MAX_ANSWERS})"
            )
        if j in ("w", "l"):
            raise OutsideListwiseError(
                f"{s.name}: listwise softmaxes use logp_1 … logp_K (answers y1 … yK, best first); for yw and yl "
                f"write logp_1 and logp_2, or write the pairwise form without logsumexp (logp_w − logp_l)"
            )
        raise unknown(
            "variable",
            s.name,
            ["logp_1", "logp_2", "ref_logp_1", "ref_logp_2"],
            f"listwise variables are logp_1 … logp_{MAX_ANSWERS} and ref_logp_1 … ref_logp_{MAX_ANSWERS}",
        )


# ------------------------------------------------------------------------------------------------ catalog


def _same_structure_as(t: ListwiseTermInfo) -> list[str]:
    """Catalog losses whose (one) structure this term's is, up to renaming the answers."""
    from dpalogic.analysis.matching import _same_structure
    from dpalogic.semantics.catalog import entries

    names = []
    if len(t.others) == 1:  # two answers: the pairwise catalog's structures, y_top as yw and the other as yl
        s, _ = _structure(t.kind, "w", ("l",))
        rename = f" (y{t.top} as yw, y{t.others[0]} as yl)"
        names += [
            n + rename
            for n, e in entries().items()
            if e.program.structure is not None and _same_structure(s, e.program.structure)
        ]
    if t.kind == "odds":
        K = len(t.others) + 1
        plain = t.top == 1 and t.others == tuple(range(2, K + 1))
        names.append(f"top1_softmax K={K}" + ("" if plain else f" (y{t.top} as y1)"))
    return names


def _program_matches(terms: list[ListwiseTermInfo]) -> list[str]:
    """The listwise catalog programs (top1_softmax, listnet, plackett_luce) equal to the decompiled one, at its β."""
    from dpalogic.analysis.matching import _plain
    from dpalogic.semantics import listwise_catalog as lc

    if not terms or any(t.kind != "odds" for t in terms) or len({(t.scale, t.shift) for t in terms}) != 1:
        return []
    if terms[0].shift != 0:
        return []
    K = max(max(t.top, *t.others) for t in terms)
    mine = sorted((t.structure.text("ascii"), str(_plain(t.coef))) for t in terms)
    candidates = []
    if len(terms) == 1:
        candidates.append(("top1_softmax", lc.top1_softmax(K)))
    if len(terms) == K - 1:
        candidates.append(("plackett_luce", lc.plackett_luce(K)))
    weights = [sum((t.coef for t in terms if t.top == j), sympy.Integer(0)) for j in range(1, K + 1)]
    listnet_name = f"listnet with target weights ({', '.join(fmt(w) for w in weights)})"  # no [ ]: rich markup
    candidates.append((listnet_name, lc.listnet(weights)))
    out = []
    for name, program in candidates:
        theirs = sorted((u.structure.text("ascii"), str(_plain(u.coef))) for u in program.terms)
        if theirs == mine:
            out.append(f"{name} (beta = {fmt(terms[0].scale)})")
    return out


def decompile_listwise(text: str) -> list[ListwiseTermInfo]:
    """The terms of a listwise loss equation (see the module docstring); raises OutsideListwiseError."""
    variables = {s.name: s for s in (*LOGP.values(), *REF_LOGP.values())}
    expr = _rationals(parse_expression(text, variables=variables, functions=_FUNCTIONS))
    _check_names(expr)
    if not expr.has(LogSumExp):
        raise OutsideListwiseError(
            f"{text!r} has no logsumexp: listwise losses are softmax cross-entropies, "
            "logsumexp(s_1, …, s_K) − s_1 or −logsigmoid(s_1 − logsumexp(s_2, …, s_K))"
        )
    terms: list[ListwiseTermInfo] = []
    lses: dict = {}
    rest = sympy.Integer(0)
    for t in sympy.Add.make_args(sympy.expand(expr, log=False, power_exp=False)):
        c, body = t.as_independent(*LOGP.values(), *REF_LOGP.values(), LogSumExp, as_Add=False)
        if isinstance(body, LogSumExp):
            lses[body] = lses.get(body, 0) + c
            continue
        if isinstance(body, Softplus):
            terms.append(_logistic_term(c, body))
        else:
            rest += t
    if lses:
        terms += sorted(_softmax_terms(lses, rest), key=lambda t: t.top)
    elif rest != 0:
        raise OutsideListwiseError(f"{rest} is not a softmax or logistic term over logsumexp")
    return terms


def listwise_report(text: str) -> dict:
    """``dpalogic decompile`` of a listwise equation: the keys of the pairwise report (``decompile --json``)."""
    from dpalogic.analysis.decompile import structure_fields  # the pairwise report's fields, one definition

    decompiled = decompile_listwise(text)
    terms = []
    for t in decompiled:
        terms.append(
            {
                "link": "logistic",
                "coef": fmt(t.coef),
                "beta": fmt(t.scale),
                "gamma": fmt(t.shift),
                "link_params": {},
                "normalized": False,
                **structure_fields(t.structure),
                "rho": t.rho,
                "same_structure_as": _same_structure_as(t),
                "source": f"softmax over {t.kind.replace('_', ' ')} scores, y{t.top} against "
                + ", ".join(f"y{j}" for j in t.others),
            }
        )
    matches = _program_matches(decompiled)
    return {"equation": text, "terms": terms, "constant": "0", "matches": matches, "matches_with": []}
