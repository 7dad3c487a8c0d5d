"""Matching a decompiled loss against the catalog: the same structure per term, and whole programs equal for all
hyperparameter values, after a substitution of the entry's hyperparameters, or with one of the equation's at 0."""

from __future__ import annotations

import sympy

from dpalogic.analysis.ratio import LEN, LOGP, REF_LOGP
from dpalogic.analysis.terms import Decompiled, DecompiledTerm
from dpalogic.logic.structure import Structure
from dpalogic.semantics.program import Program, Term, weight_symbol


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
