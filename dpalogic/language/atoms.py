"""Atoms: the propositions ``M(yw)``, ``Ref(y3)`` — predicates, answers and their canonical SymPy symbols."""

from __future__ import annotations

import re
from dataclasses import dataclass

import sympy
from sympy.logic.boolalg import Boolean

PREDICATES = ("M", "Ref")
PREDICATE_READING = {"M": "the policy deems {y} valid", "Ref": "the reference model deems {y} valid"}
ANSWER_ALIASES = {"yw": "yw", "y_w": "yw", "yl": "yl", "y_l": "yl"}
PROMPTS = ("x",)
MAX_ANSWERS = 256  # y1 … y256: lists of answers (best-of-n, group sampling) reach 64 and beyond


@dataclass(frozen=True, order=True)
class Atom:
    """A prediction ``pred(answer)``: ``M(yw)`` reads "the policy deems yw valid"."""

    pred: str
    answer: str

    @property
    def name(self) -> str:
        return f"{self.pred}({self.answer})"

    @property
    def sort_key(self) -> tuple[int, int]:
        """Canonical order: policy atoms before reference atoms, then yw, yl, y1, y2, ..."""
        return (PREDICATES.index(self.pred), answer_index(self.answer))

    @property
    def symbol(self) -> sympy.Symbol:
        return sympy.Symbol(self.name)

    def __str__(self) -> str:
        return self.name


def answer_index(answer: str) -> int:
    if answer == "yw":
        return 0
    if answer == "yl":
        return 1
    return 1 + int(answer[1:])


def canonical_answer(name: str) -> str | None:
    """``yw``/``y_w`` → ``yw``; ``y3``/``y_3`` → ``y3``; anything else → None."""
    if name in ANSWER_ALIASES:
        return ANSWER_ALIASES[name]
    m = re.fullmatch(r"y_?([1-9][0-9]*)", name)
    # the length test first: int() of thousands of digits is refused by Python itself (a ValueError)
    if m and len(m.group(1)) <= len(str(MAX_ANSWERS)) and int(m.group(1)) <= MAX_ANSWERS:
        return f"y{int(m.group(1))}"
    return None


_ATOM_RE = re.compile(r"(M|Ref)\((yw|yl|y[1-9][0-9]*)\)")


def atom_of(symbol: sympy.Symbol) -> Atom:
    m = _ATOM_RE.fullmatch(symbol.name)
    if not m:
        raise ValueError(f"not an atom symbol: {symbol}")
    return Atom(m.group(1), m.group(2))


def atoms_of(*exprs: Boolean) -> tuple[Atom, ...]:
    """The atoms of the expressions, in canonical order."""
    found = set()
    for e in exprs:
        found.update(atom_of(s) for s in e.free_symbols)
    return tuple(sorted(found, key=lambda a: a.sort_key))


def atom_symbol(pred: str, answer: str) -> sympy.Symbol:
    return Atom(pred, answer).symbol
