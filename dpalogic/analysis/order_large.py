"""The order, meet, join and same-loss test for structures beyond truth tables, decided on OBDDs (docs/semantics.md §8).

:mod:`dpalogic.analysis.order` decides everything on truth tables (``2^n`` bits), which stops at 12 atoms. Here both
structures are compiled into one fresh OBDD manager over the union of their atoms (the answer order of
:func:`~dpalogic.logic.listwise.bdd_order`), so that equal functions are equal node ids:

* order:  ``✓1 ⊨ ✓2`` and ``✗2 ⊨ ✗1`` are ``✓1 ∧ ¬✓2 = ⊥`` and ``✗2 ∧ ¬✗1 = ⊥`` (BDD apply);
* meet ``(✓1 ∧ ✓2, ✗1 ∨ ✗2)`` and join ``(✓1 ∨ ✓2, ✗1 ∧ ✗2)``: two applies each;
* same loss function, ``WMC(✓1)·WMC(✗2) ≡ WMC(✓2)·WMC(✗1)`` as polynomials: decided *exactly*, by the equivalence
  of two weighted automata (:func:`same_ratio`), in time polynomial in the OBDD widths — no 2^n worlds, no
  random points.

Every step is polynomial in the OBDDs' sizes, which stay polynomial in K for cardinalities, rankings and their
conjunctions (:mod:`dpalogic.logic.bdd`).
"""

from __future__ import annotations

import itertools
import math
from fractions import Fraction

from sympy.logic.boolalg import And, Boolean, BooleanFalse, BooleanTrue, Implies, Or

from dpalogic.logic.bdd import BDD, FALSE, TRUE, compile_formula
from dpalogic.logic.listwise import ListStructure, bdd_order
from dpalogic.logic.structure import MAX_ATOMS, Structure, atom_mask, full_mask
from dpalogic.semantics import circuit

AnyStructure = Structure | ListStructure


def is_large(*structures: AnyStructure) -> bool:
    """Does deciding these need OBDDs: a ListStructure among them, or more atoms together than a truth table takes?"""
    if any(isinstance(s, ListStructure) for s in structures):
        return True
    return len({a for s in structures for a in s.atoms}) > MAX_ATOMS


def _from_truth_table(bdd: BDD, s: Structure, mask: int, level_of: dict) -> int:
    """A truth table over ``s.atoms`` as an OBDD node (Shannon expansion in the manager's order; ≤ 2^12 worlds)."""
    n, full = s.n, full_mask(s.n)
    by_level = sorted(range(n), key=lambda i: level_of[s.atoms[i]])
    memo: dict[tuple[int, int], int] = {}

    def build(k: int, m: int) -> int:
        if m == 0:
            return FALSE
        if m == full:
            return TRUE
        key = (k, m)
        if key not in memo:
            i = by_level[k]
            shift, hi_worlds = 1 << i, atom_mask(i, n)
            hi, lo = m & hi_worlds, m & ~hi_worlds & full
            f1, f0 = hi | (hi >> shift), lo | (lo << shift)  # cofactors, as tables over all n atoms
            memo[key] = bdd.mk(level_of[s.atoms[i]], build(k + 1, f0), build(k + 1, f1))
        return memo[key]

    return build(0, mask)


def shared(*structures: AnyStructure) -> list[ListStructure]:
    """The structures recompiled into one fresh OBDD manager over the union of their atoms (node ids comparable).

    A ListStructure is compiled from its source formulas; a truth-table Structure from its sides' truth tables (exact
    whatever it was built from), keeping its readable triple as the source for text.
    """
    atoms = tuple(sorted({a for s in structures for a in s.atoms}, key=lambda a: a.sort_key))
    order = bdd_order(atoms)
    level_of = {a: i for i, a in enumerate(order)}
    index = {a.name: i for i, a in enumerate(order)}
    bdd = BDD(len(order))
    out = []
    for s in structures:
        if isinstance(s, ListStructure):
            core, given, additional = s.source
            p, c, x = (compile_formula(bdd, e, index) for e in s.source)
            top = bdd.apply("and", p, c)
            bottom = bdd.apply("or", bdd.apply("and", bdd.neg(p), c), x)
            source = (core, given, additional)
        else:
            top = _from_truth_table(bdd, s, s.top, level_of)
            bottom = _from_truth_table(bdd, s, s.bottom, level_of)
            source = s.source if s.source is not None else s.readable_triple()
        out.append(ListStructure(atoms, source, s.given_is_literal_false, bdd, top, bottom, order))
    return out


def relation(s1: AnyStructure, s2: AnyStructure) -> str:
    """As :func:`dpalogic.analysis.order.relation`: ``equivalent``, ``stronger``, ``weaker`` or ``incomparable``."""
    a, b = shared(s1, s2)
    bdd = a.bdd
    le = bdd.implies(a.top, b.top) and bdd.implies(b.bottom, a.bottom)
    ge = bdd.implies(b.top, a.top) and bdd.implies(a.bottom, b.bottom)
    if le and ge:
        return "equivalent"
    return "stronger" if le else "weaker" if ge else "incomparable"


def _from_sides(
    a: ListStructure, top: int, bottom: int, top_f: Boolean, bottom_f: Boolean, *others: ListStructure
) -> ListStructure:
    """A structure with the given sides (nodes of ``a``'s manager) and the paper's triple ``(✗ → ✓, ✓ ∨ ✗, ✓ ∧ ✗)``
    as its text, dropping ``P_A`` when the sides are disjoint and ``P_C`` when they cover every world."""
    for s in (a, *others):  # a meet or join of comparable structures is one of them: keep its text as written
        if (s.top, s.bottom) == (top, bottom):
            return s
    for s in (a, *others):  # a side equal to an input's side keeps that side's text (no conjunction of both)
        top_f = s.top_formula if s.top == top else top_f
        bottom_f = s.bottom_formula if s.bottom == bottom else bottom_f
    bdd = a.bdd
    disjoint = bdd.apply("and", top, bottom) == FALSE
    cover = bdd.apply("or", top, bottom) == TRUE
    core = top_f if disjoint else Implies(bottom_f, top_f)
    given = BooleanTrue() if cover else Or(top_f, bottom_f)
    additional = BooleanFalse() if disjoint else And(top_f, bottom_f)
    return ListStructure(a.atoms, (core, given, additional), False, bdd, top, bottom, a.order, (top_f, bottom_f))


def meet(s1: AnyStructure, s2: AnyStructure) -> ListStructure:
    """The weakest structure stronger than both: ``(✓1 ∧ ✓2, ✗1 ∨ ✗2)``."""
    a, b = shared(s1, s2)
    top, bottom = a.bdd.apply("and", a.top, b.top), a.bdd.apply("or", a.bottom, b.bottom)
    return _from_sides(a, top, bottom, And(a.top_formula, b.top_formula), Or(a.bottom_formula, b.bottom_formula), b)


def join(s1: AnyStructure, s2: AnyStructure) -> ListStructure:
    """The strongest structure weaker than both: ``(✓1 ∨ ✓2, ✗1 ∧ ✗2)``."""
    a, b = shared(s1, s2)
    top, bottom = a.bdd.apply("or", a.top, b.top), a.bdd.apply("and", a.bottom, b.bottom)
    return _from_sides(a, top, bottom, Or(a.top_formula, b.top_formula), And(a.bottom_formula, b.bottom_formula), b)


# --------------------------------------------------------------------------------------------------- same loss
# WMC(f)·WMC(g) = Σ_{w, w'} f(w) g(w') Π_i p_i^{w_i + w'_i} (1 − p_i)^{2 − w_i − w'_i}: the monomial of a pair of
# worlds depends only on s = w + w' ∈ {0, 1, 2}^n, and the products of the Bernstein polynomials (1 − p)², p(1 − p),
# p² are a basis of the polynomials of degree ≤ 2 in each variable. So the product is the function
# N(s) = #{(w, w') : f(w), g(w'), w + w' = s} in that basis, and two products are equal polynomials exactly when
# their N agree on all 3^n words s. N is computed by a weighted automaton whose states are pairs of OBDD nodes read
# level by level (letter 0: both low; 1: one high, one low, either way; 2: both high), and the equivalence of
# weighted automata over ℚ is decided by linear algebra on the reachable vectors (Schützenberger; Tzeng 1992): the
# difference of the two is zero on every word exactly when the final weight vanishes on the span of every vector
# reachable from the start, and a basis of that span has at most as many vectors as the level has states.


def _step(bdd: BDD, vec: dict, level: int, letter: int) -> dict:
    out: dict = {}
    for (tag, u, v), c in vec.items():
        u0, u1 = (bdd.lo[u], bdd.hi[u]) if bdd.var[u] == level else (u, u)
        v0, v1 = (bdd.lo[v], bdd.hi[v]) if bdd.var[v] == level else (v, v)
        moves = {0: ((u0, v0),), 1: ((u1, v0), (u0, v1)), 2: ((u1, v1),)}[letter]
        for x, y in moves:
            if x != FALSE and y != FALSE:  # a pair with an unsatisfiable half counts nothing from here on
                key = (tag, x, y)
                out[key] = out.get(key, 0) + c
    return {k: c for k, c in out.items() if c}


def _reduce(basis: list[tuple[tuple, dict]], vec: dict) -> dict:
    """``vec`` minus its projection on the echelon ``basis`` (pivot key, vector with pivot coefficient 1)."""
    vec = dict(vec)
    for pivot, b in basis:
        c = vec.get(pivot)
        if c:
            for k, x in b.items():
                y = vec.get(k, 0) - c * x
                if y:
                    vec[k] = y
                else:
                    vec.pop(k, None)
    return vec


def same_ratio(s1: AnyStructure, s2: AnyStructure) -> bool:
    """Do two structures give the same loss function — ``WMC(✓1)·WMC(✗2) ≡ WMC(✓2)·WMC(✗1)`` as polynomials?

    Exact (rational arithmetic, no sampling), on the OBDDs: see the comment above. Agrees with
    :func:`dpalogic.semantics.program.same_ratio` wherever both apply.
    """
    a, b = shared(s1, s2)
    bdd = a.bdd
    start = {}
    for tag, key in ((0, (a.top, b.bottom)), (1, (b.top, a.bottom))):
        if FALSE not in key:
            start[(tag, *key)] = Fraction(1 if tag == 0 else -1)
    basis = [start] if start else []
    for level in range(bdd.n):
        echelon: list[tuple[tuple, dict]] = []
        for vec in basis:
            for letter in (0, 1, 2):
                r = _reduce(echelon, _step(bdd, vec, level, letter))
                if r:
                    pivot = min(r)
                    c = r[pivot]
                    r = {k: x / c for k, x in r.items()}
                    echelon = [(p, _reduce([(pivot, r)], e)) for p, e in echelon]  # keep it reduced
                    echelon.append((pivot, r))
        basis = [e for _, e in echelon]
    # every state now is a pair of terminals, and only (TRUE, TRUE) pairs remain: the word's count is the sum
    return all(sum(vec.values()) == 0 for vec in basis)


# --------------------------------------------------------------------------------------------------- witnesses

WITNESS_SAMPLES = 4096  # random points of the witness grid, evaluated together (numpy, one pass per circuit node)


def _log1mexp(x):
    import numpy as np

    x = np.minimum(x, -1e-300)
    return np.where(x > -math.log(2), np.log(-np.expm1(x)), np.log1p(-np.exp(x)))


def _side_values(s: ListStructure, which: str, lp):
    """``log WMC`` of a side at every row of ``lp`` ([N, n] log-probs, columns in ``s.atoms`` order)."""
    import numpy as np

    if (s.top if which == "top" else s.bottom) == FALSE:
        return np.full(lp.shape[0], -np.inf)
    l1m = _log1mexp(lp)
    return circuit.fold(
        s.side_circuit(which),
        lit=lambda i, pos: lp[:, i] if pos else l1m[:, i],
        one=lambda: np.zeros(lp.shape[0]),
        prod=lambda xs: sum(xs[1:], xs[0]),
        sum=lambda xs: np.logaddexp(xs[0], xs[1]),
    )


def _losses(s: ListStructure, lp):
    import numpy as np

    z = _side_values(s, "top", lp) - _side_values(s, "bottom", lp)
    return np.logaddexp(0.0, -z)  # −log σ(z)


def semantic_loss(s: ListStructure, logps: dict[str, float]) -> float:
    """``−log σ(log ρ)`` at one point (plain floats), as :func:`dpalogic.analysis.order.semantic_loss` does."""
    from dpalogic.analysis.order import _eval

    lp = [logps[a.name] for a in s.atoms]
    top = _eval(s.side_circuit("top"), lp) if s.top != FALSE else -math.inf
    bottom = _eval(s.side_circuit("bottom"), lp) if s.bottom != FALSE else -math.inf
    z = top - bottom
    return math.log1p(math.exp(-z)) if z > -30 else -z + math.log1p(math.exp(z))


def witnesses(s1: AnyStructure, s2: AnyStructure, samples: int = WITNESS_SAMPLES) -> list[dict]:
    """As :func:`dpalogic.analysis.order.witnesses`, on a fixed-seed sample of the same grid: inputs where loss 1 >
    loss 2 and where loss 2 > loss 1, each evaluated again, point by point, on the circuits."""
    import numpy as np

    from dpalogic.analysis.order import _GRID

    a, b = shared(s1, s2)
    rng = np.random.default_rng(0)
    # first the points that give every answer but the first of each predicate one shared value (a witness over 64
    # answers then reads as a few ranges), then random points of the grid
    first = {}
    for i, atom in enumerate(a.atoms):
        first.setdefault(atom.pred, i)
    classes = [(atom.pred, i == first[atom.pred]) for i, atom in enumerate(a.atoms)]
    kinds = sorted(set(classes))
    combos = np.array(list(itertools.product(_GRID, repeat=len(kinds))))
    structured = combos[:, [kinds.index(c) for c in classes]]
    lp = np.concatenate([structured, rng.choice(np.array(_GRID), size=(samples, a.n))])
    d = _losses(a, lp) - _losses(b, lp)
    n_structured = len(structured)
    out = []
    picks = []
    for sign in (1, -1):
        head = sign * d[:n_structured]
        k = int(np.argmax(head)) if head.size and head.max() > 1e-9 else int(np.argmax(sign * d))
        picks.append(k)
    for k in picks:
        point = {atom.name: round(float(v), 6) for atom, v in zip(a.atoms, lp[k])}  # the losses of what is shown
        la, lb = semantic_loss(a, point), semantic_loss(b, point)  # the float path, not the vectorized one
        if abs(la - lb) > 1e-9:
            out.append(
                {
                    "logps": point,
                    "loss_a": la,
                    "loss_b": lb,
                    "larger": "a" if la > lb else "b",
                }
            )
    return out
