"""Lifted weighted model counting: answers that a structure treats alike are counted, not enumerated (§8).

Atoms that occur only as direct operands (or negated operands) of the same commutative nodes — ``And``, ``Or``,
``Xor``, ``Iff``, ``ExactlyOne``/``AtMost``/``AtLeast``/``Exactly`` — are interchangeable: swapping two of them
leaves ``P``, ``P_C`` and ``P_A`` unchanged. Such a *group* ``g`` enters a side only through how many of its atoms
are true, and the worlds with ``c`` of them true weigh, together,

    Π_{a∈g} (1 − p_a) · e_c(o_g),      o_a = p_a / (1 − p_a)  (the odds),

``e_c`` the elementary symmetric polynomial. So a side's WMC is a sum over *configurations* — a truth value for
each remaining (singleton) atom and a count for each group — of products of singleton weights and ``e_c``'s. The
factor ``Π (1 − p_a)`` of each group is common to every configuration of both sides and cancels in ρ.

``(M(y1), ExactlyOne(M(y1..yK)))`` has the singleton ``M(y1)`` and the group ``M(y2..yK)``: ✓ is one
configuration (``M(y1)``, count 0) and ✗ one (``¬M(y1)``, count 1), so ``ρ = o_1 / e_1(o_2, …, o_K)`` — a softmax
over log-odds. Structures with no such symmetry (``Ranked`` orders its operands) use the OBDD circuit instead.
"""

from __future__ import annotations

import itertools
import math
from collections import Counter
from dataclasses import dataclass

import sympy
from sympy.logic.boolalg import And, Boolean, BooleanFalse, BooleanTrue, Equivalent, Implies, Not, Or, Xor

from dpalogic.language.cardinality import Count, Ranked
from dpalogic.language.syntax import Atom

MAX_SINGLETONS = 12
MAX_CONFIGS = 1 << 15  # configurations enumerated once, when the structure compiles
_SYMMETRIC = (And, Or, Xor, Equivalent, Count)

Config = tuple[tuple[int, ...], tuple[int, ...]]  # (truth of each singleton, count of each group)


@dataclass(frozen=True)
class Lifted:
    """A structure's sides as configurations over singleton atoms and counted groups (indices into ``atoms``)."""

    atoms: tuple[Atom, ...]
    singletons: tuple[int, ...]
    groups: tuple[tuple[int, ...], ...]
    top: tuple[Config, ...]
    bottom: tuple[Config, ...]

    def counts_needed(self, g: int) -> list[int]:
        """The counts ``c`` of group ``g`` that some configuration uses (the ``e_c`` to compute)."""
        return sorted({c[g] for _, c in self.top + self.bottom})


def _signatures(formulas: tuple[Boolean, ...]) -> dict[str, list]:
    """Where each atom occurs: ``(node, polarity)`` under a commutative node, a unique tag anywhere else."""
    sig: dict[str, list] = {}
    ids = itertools.count()

    def walk(e: Boolean) -> None:
        if isinstance(e, sympy.Symbol):
            sig.setdefault(e.name, []).append(("alone", next(ids)))
            return
        if isinstance(e, _SYMMETRIC):
            node = next(ids)
            for a in e.args:
                if isinstance(a, sympy.Symbol):
                    sig.setdefault(a.name, []).append((node, True))
                elif isinstance(a, Not) and isinstance(a.args[0], sympy.Symbol):
                    sig.setdefault(a.args[0].name, []).append((node, False))
                elif isinstance(a, Boolean):
                    walk(a)
            return
        for a in e.args:
            if isinstance(a, Boolean):
                walk(a)

    for f in formulas:
        walk(f)
    return sig


def _groups(atoms: tuple[Atom, ...], formulas: tuple[Boolean, ...]) -> tuple[list[int], list[list[int]]]:
    sig = _signatures(formulas)
    classes: dict[tuple, list[int]] = {}
    singles = []
    for i, a in enumerate(atoms):
        s = sorted(sig.get(a.name, []), key=repr)
        if any(tag == "alone" for tag, _ in s):
            singles.append(i)
        else:
            classes.setdefault(tuple(s), []).append(i)
    groups = []
    for members in classes.values():
        if len(members) > 1:
            groups.append(members)
        else:
            singles.extend(members)
    return sorted(singles), groups


def _lift(e: Boolean, where: dict[str, tuple[str, int]]):
    """The formula as a tree over singletons and group counts (the form :func:`_holds` evaluates)."""
    if isinstance(e, BooleanTrue) or isinstance(e, BooleanFalse):
        return ("const", isinstance(e, BooleanTrue))
    if isinstance(e, sympy.Symbol):
        return ("atom", where[e.name][1])
    if isinstance(e, _SYMMETRIC):
        others, counted = [], Counter()
        operands = e.operands if isinstance(e, Count) else e.args
        for a in operands:
            atom = a if isinstance(a, sympy.Symbol) else a.args[0] if isinstance(a, Not) else None
            if isinstance(atom, sympy.Symbol) and where[atom.name][0] == "group":
                counted[(where[atom.name][1], isinstance(a, sympy.Symbol))] += 1
            else:
                others.append(_lift(a, where))
        kind = {And: "and", Or: "or", Xor: "xor", Equivalent: "iff"}.get(e.func, "count")
        lo, hi = (e.lo, e.hi) if isinstance(e, Count) else (0, 0)
        return ("sym", kind, lo, hi, len(operands), tuple(others), tuple(counted.items()))
    if isinstance(e, Not):
        return ("not", _lift(e.args[0], where))
    if isinstance(e, Implies):
        return ("implies", _lift(e.args[0], where), _lift(e.args[1], where))
    if isinstance(e, Ranked):
        return ("ranked", tuple(_lift(a, where) for a in e.operands))
    raise TypeError(f"unsupported connective {e.func}")  # pragma: no cover - the parser builds only the above


def _holds(t, sigma: tuple[int, ...], counts: tuple[int, ...], sizes: tuple[int, ...]) -> bool:
    op = t[0]
    if op == "const":
        return t[1]
    if op == "atom":
        return bool(sigma[t[1]])
    if op == "not":
        return not _holds(t[1], sigma, counts, sizes)
    if op == "implies":
        return (not _holds(t[1], sigma, counts, sizes)) or _holds(t[2], sigma, counts, sizes)
    if op == "ranked":
        vals = [_holds(x, sigma, counts, sizes) for x in t[1]]
        return all(a or not b for a, b in zip(vals, vals[1:]))
    _, kind, lo, hi, n, others, counted = t
    true = sum(_holds(x, sigma, counts, sizes) for x in others)
    for (g, positive), mult in counted:
        true += (mult // sizes[g]) * (counts[g] if positive else sizes[g] - counts[g])
    if kind == "and":
        return true == n
    if kind == "or":
        return true >= 1
    if kind == "xor":
        return true % 2 == 1
    if kind == "iff":
        return true in (0, n)
    return lo <= true <= hi


def lift(atoms: tuple[Atom, ...], source: tuple[Boolean, Boolean, Boolean]) -> Lifted | None:
    """The lifted form of a structure ``(P, P_C, P_A)``, or None when it has too little symmetry to pay off."""
    singles, groups = _groups(atoms, source)
    if len(singles) > MAX_SINGLETONS or not groups:
        return None
    sizes = tuple(len(g) for g in groups)
    n_configs = (1 << len(singles)) * math.prod(s + 1 for s in sizes)
    if n_configs > MAX_CONFIGS:
        return None
    where = {atoms[i].name: ("single", k) for k, i in enumerate(singles)}
    where.update({atoms[i].name: ("group", g) for g, members in enumerate(groups) for i in members})
    core, given, additional = (_lift(e, where) for e in source)
    top, bottom = [], []
    for sigma in itertools.product((0, 1), repeat=len(singles)):
        for counts in itertools.product(*(range(s + 1) for s in sizes)):
            p, c, a = (_holds(t, sigma, counts, sizes) for t in (core, given, additional))
            if p and c:
                top.append((sigma, counts))
            if (c and not p) or a:
                bottom.append((sigma, counts))
    return Lifted(atoms, tuple(singles), tuple(tuple(g) for g in groups), tuple(top), tuple(bottom))
