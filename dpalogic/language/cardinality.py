"""Constructs over many answers: cardinality (``ExactlyOne``, ``AtMost``, ``AtLeast``, ``Exactly``) and ``Ranked``.

Both are SymPy Boolean functions, so they live in the same IR as ``And``/``Or`` and every consumer sees them as
one node (a 64-answer formula stays one node, prints in one line and compiles without expanding):

* ``Count(lo, hi, a1, …, an)`` — between ``lo`` and ``hi`` of the ``a_i`` are true. ``ExactlyOne(…)`` is
  ``Count(1, 1, …)``, ``AtMost(k, …)`` is ``Count(0, k, …)``, ``AtLeast(k, …)`` is ``Count(k, n, …)`` and
  ``Exactly(k, …)`` is ``Count(k, k, …)``. Trivial bounds simplify at once (``AtLeast(0, …)`` is ``true``).
* ``Ranked(a1, …, an)`` — ``∧_i (a_{i+1} → a_i)``: the true arguments form a prefix ``a1 … aj``.
"""

from __future__ import annotations

import sympy
from sympy.core.basic import Basic
from sympy.logic.boolalg import And, Boolean, BooleanFunction, Implies


class Count(BooleanFunction):
    """Between ``lo`` and ``hi`` (inclusive) of the operands are true."""

    def __new__(cls, lo: int, hi: int, *operands: Boolean) -> Boolean:
        n = len(operands)
        lo, hi = max(int(lo), 0), min(int(hi), n)
        if lo > hi:
            return sympy.false
        if lo == 0 and hi == n:
            return sympy.true
        return Basic.__new__(cls, sympy.Integer(lo), sympy.Integer(hi), *operands)

    @property
    def lo(self) -> int:
        return int(self.args[0])

    @property
    def hi(self) -> int:
        return int(self.args[1])

    @property
    def operands(self) -> tuple[Boolean, ...]:
        return self.args[2:]

    def expanded(self) -> Boolean:
        """The same function in ``And``/``Or``/``Not`` (exponential in general: only for small tests)."""
        from itertools import combinations

        ops = self.operands
        terms = []
        for k in range(self.lo, self.hi + 1):
            for chosen in combinations(range(len(ops)), k):
                terms.append(And(*[ops[i] if i in chosen else ~ops[i] for i in range(len(ops))]))
        return sympy.Or(*terms)

    @property
    def construct(self) -> tuple[str, int | None]:
        """The user-facing name and its number argument: ``("AtMost", 2)``, ``("ExactlyOne", None)``."""
        n, lo, hi = len(self.operands), self.lo, self.hi
        if lo == hi == 1:
            return "ExactlyOne", None
        if lo == 0:
            return "AtMost", hi
        if hi == n:
            return "AtLeast", lo
        if lo == hi:
            return "Exactly", lo
        return "Between", None  # printed as AtLeast(lo, …) ∧ AtMost(hi, …)

    def _eval_subs(self, old, new):
        # None lets SymPy substitute argument by argument: the bounds are Integers, which no substitution of an atom
        # (the only use: formulas are substituted for atoms) can match, so only the operands change
        return None


class Ranked(BooleanFunction):
    """``a1 ← a2 ← … ← an``: whenever an answer is valid, every higher-ranked one is too."""

    def __new__(cls, *operands: Boolean) -> Boolean:
        if len(operands) < 2:
            return sympy.true
        return Basic.__new__(cls, *operands)

    @property
    def operands(self) -> tuple[Boolean, ...]:
        return self.args

    def expanded(self) -> Boolean:
        ops = self.operands
        return And(*[Implies(ops[i + 1], ops[i]) for i in range(len(ops) - 1)])


def exactly_one(*ops: Boolean) -> Boolean:
    return Count(1, 1, *ops)


def at_most(k: int, *ops: Boolean) -> Boolean:
    return Count(0, k, *ops)


def at_least(k: int, *ops: Boolean) -> Boolean:
    return Count(k, len(ops), *ops)


def exactly(k: int, *ops: Boolean) -> Boolean:
    return Count(k, k, *ops)


# name → (builder, takes a number first); the parser and the printers read this one table
CONSTRUCTS = {
    "ExactlyOne": (exactly_one, False),
    "AtMost": (at_most, True),
    "AtLeast": (at_least, True),
    "Exactly": (exactly, True),
    "Ranked": (Ranked, False),
}


def expand_constructs(e: Boolean) -> Boolean:
    """Replace every Count/Ranked by its And/Or/Not form (small formulas only: the brute-force reference)."""
    if isinstance(e, (Count, Ranked)):
        return expand_constructs(e.expanded())
    if not e.args or isinstance(e, sympy.Symbol):
        return e
    return e.func(*[expand_constructs(a) for a in e.args])
