"""Ordered binary decision diagrams: the knowledge compiler for structures over many answers (docs/semantics.md §8).

Beyond 12 atoms a truth table (2^n bits) is out of reach, but the formulas people write over K answers —
cardinalities, rankings, their conjunctions — have OBDDs whose size grows polynomially in K under the order
``M(y1), Ref(y1), M(y2), Ref(y2), …``: ``Count(lo, hi, …)`` is the counting DP (one node per answer and count
so far), ``Ranked(…)`` a chain. An OBDD is turned into a log-space circuit (:mod:`dpalogic.semantics.circuit`)
one node for one node, so every backend that folds circuits evaluates it.

Why a small OBDD of our own rather than ``dd`` or PySDD: weighted model counting in log space needs a circuit
without negation (``log(1 − x)`` of a sub-count would cancel catastrophically), and both libraries use complement
edges; an SDD on a right-linear vtree is an OBDD for these constructs anyway (benchmarks/listwise.py compares sizes).
Skipped variables need no smoothing: a world's weights ``p`` and ``1 − p`` of a free atom sum to 1.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import sympy
from sympy.logic.boolalg import And, Boolean, BooleanFalse, BooleanTrue, Equivalent, Implies, Not, Or, Xor

from dpalogic.errors import DPALogicError
from dpalogic.language.cardinality import Count, Ranked

FALSE, TRUE = 0, 1
MAX_NODES = 1_000_000  # a bound on the work a hostile formula can cause (an unlucky Xor/Iff mix can blow up)


class BDD:
    """A reduced OBDD manager over variables ``0 … n−1`` (0 at the top); nodes are ints, 0 and 1 the terminals."""

    def __init__(self, n: int, max_nodes: int = MAX_NODES) -> None:
        self.n = n
        self.var = [n, n]  # terminals sit below every variable
        self.lo = [FALSE, TRUE]
        self.hi = [FALSE, TRUE]
        self.max_nodes = max_nodes
        self._unique: dict[tuple[int, int, int], int] = {}
        self._apply: dict[tuple[str, int, int], int] = {}
        self._neg: dict[int, int] = {FALSE: TRUE, TRUE: FALSE}

    def __len__(self) -> int:
        return len(self.var)

    def mk(self, v: int, lo: int, hi: int) -> int:
        if lo == hi:
            return lo
        key = (v, lo, hi)
        u = self._unique.get(key)
        if u is None:
            if len(self.var) >= self.max_nodes:
                raise DPALogicError(
                    f"the formula's decision diagram passed {self.max_nodes:,} nodes: it does not compile to a "
                    "polynomial-size circuit in the answer order (cardinalities, rankings and their conjunctions do)"
                )
            u = len(self.var)
            self.var.append(v)
            self.lo.append(lo)
            self.hi.append(hi)
            self._unique[key] = u
        return u

    def variable(self, v: int) -> int:
        return self.mk(v, FALSE, TRUE)

    def neg(self, u: int) -> int:
        r = self._neg.get(u)
        if r is None:
            r = self.mk(self.var[u], self.neg(self.lo[u]), self.neg(self.hi[u]))
            self._neg[u] = r
        return r

    def apply(self, op: str, f: int, g: int) -> int:
        """``f op g`` for op in ``and``, ``or``, ``xor`` (recursion depth at most the number of variables)."""
        if op == "and":
            if f == FALSE or g == FALSE:
                return FALSE
            if f == TRUE or f == g:
                return g
            if g == TRUE:
                return f
        elif op == "or":
            if f == TRUE or g == TRUE:
                return TRUE
            if f == FALSE or f == g:
                return g
            if g == FALSE:
                return f
        else:  # xor
            if f == g:
                return FALSE
            if f == FALSE:
                return g
            if g == FALSE:
                return f
            if f == TRUE:
                return self.neg(g)
            if g == TRUE:
                return self.neg(f)
        if f > g:  # every op is commutative: one cache entry per pair
            f, g = g, f
        key = (op, f, g)
        r = self._apply.get(key)
        if r is None:
            vf, vg = self.var[f], self.var[g]
            v = min(vf, vg)
            f0, f1 = (self.lo[f], self.hi[f]) if vf == v else (f, f)
            g0, g1 = (self.lo[g], self.hi[g]) if vg == v else (g, g)
            r = self.mk(v, self.apply(op, f0, g0), self.apply(op, f1, g1))
            self._apply[key] = r
        return r

    def ite(self, c: int, t: int, e: int) -> int:
        """if c then t else e; a variable above both branches is one node (the counting DP's common case)."""
        if self.lo[c] == FALSE and self.hi[c] == TRUE and self.var[c] < min(self.var[t], self.var[e]):
            return self.mk(self.var[c], e, t)
        return self.apply("or", self.apply("and", c, t), self.apply("and", self.neg(c), e))

    def conjoin(self, us: Sequence[int]) -> int:
        out = TRUE
        for u in sorted(us, key=lambda x: -self.var[x]):  # bottom-up: each step adds nodes above the others
            out = self.apply("and", out, u)
        return out

    def disjoin(self, us: Sequence[int]) -> int:
        out = FALSE
        for u in sorted(us, key=lambda x: -self.var[x]):
            out = self.apply("or", out, u)
        return out

    def count(self, lo: int, hi: int, us: Sequence[int]) -> int:
        """Between ``lo`` and ``hi`` of ``us`` hold: the counting DP, built from the last operand up."""
        us = sorted(us, key=lambda x: self.var[x])
        n = len(us)
        # after operand i, with c of the first i true: the rest must bring the count into [lo, hi]
        layer = [TRUE if lo <= c <= hi else FALSE for c in range(n + 1)]
        for i in range(n - 1, -1, -1):
            layer = [
                FALSE if c > hi or c + (n - i) < lo else self.ite(us[i], layer[c + 1], layer[c]) for c in range(i + 1)
            ]
        return layer[0]

    def support(self, u: int) -> list[int]:
        """Reachable non-terminal nodes, children before parents (ids grow with creation)."""
        seen, todo = set(), [u]
        while todo:
            x = todo.pop()
            if x > TRUE and x not in seen:
                seen.add(x)
                todo += [self.lo[x], self.hi[x]]
        return sorted(seen)

    def evaluate(self, u: int, assignment: Callable[[int], bool]) -> bool:
        while u > TRUE:
            u = self.hi[u] if assignment(self.var[u]) else self.lo[u]
        return u == TRUE

    def implies(self, f: int, g: int) -> bool:
        return self.apply("and", f, self.neg(g)) == FALSE


def compile_formula(bdd: BDD, expr: Boolean, index: dict[str, int]) -> int:
    """A SymPy formula (with Count/Ranked) as an OBDD node; ``index`` maps atom names to variables."""
    if isinstance(expr, BooleanTrue):
        return TRUE
    if isinstance(expr, BooleanFalse):
        return FALSE
    if isinstance(expr, sympy.Symbol):
        return bdd.variable(index[expr.name])
    if isinstance(expr, Count):
        return bdd.count(expr.lo, expr.hi, [compile_formula(bdd, a, index) for a in expr.operands])
    if isinstance(expr, Ranked):
        ops = [compile_formula(bdd, a, index) for a in expr.operands]
        return bdd.conjoin([bdd.apply("or", bdd.neg(ops[i + 1]), ops[i]) for i in range(len(ops) - 1)])
    args = [compile_formula(bdd, a, index) for a in expr.args]
    f = expr.func
    if f is Not:
        return bdd.neg(args[0])
    if f is And:
        return bdd.conjoin(args)
    if f is Or:
        return bdd.disjoin(args)
    if f is Xor:
        out = FALSE
        for a in sorted(args, key=lambda x: -bdd.var[x]):  # bottom-up, as conjoin: intermediate diagrams stay small
            out = bdd.apply("xor", out, a)
        return out
    if f is Implies:
        return bdd.apply("or", bdd.neg(args[0]), args[1])
    if f is Equivalent:  # n-ary: all equal
        return bdd.apply("or", bdd.conjoin(args), bdd.conjoin([bdd.neg(a) for a in args]))
    raise TypeError(f"unsupported connective {f}")  # pragma: no cover - the parser builds only the above


def to_circuit(bdd: BDD, u: int, atom_of_var: Sequence[int]):
    """``log WMC`` of a satisfiable OBDD node as a log-space circuit: ``p·W(hi) + (1 − p)·W(lo)`` per node."""
    from dpalogic.semantics import circuit

    if u == FALSE:
        raise ValueError("log WMC of an unsatisfiable side is -inf; check the structure first")
    built: dict[int, circuit.Node | None] = {FALSE: None, TRUE: circuit.ONE}
    for x in bdd.support(u):
        a = atom_of_var[bdd.var[x]]
        parts = [
            circuit.prod(circuit.lit(a, positive), built[child])
            for positive, child in ((True, bdd.hi[x]), (False, bdd.lo[x]))
            if built[child] is not None
        ]
        built[x] = circuit.sum_(*parts)
    return built[u]
