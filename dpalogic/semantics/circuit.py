"""The IR: a log-space arithmetic circuit for ``log WMC`` of a set of worlds (docs/semantics.md §6).

A circuit is a DAG of :class:`Node` objects, each denoting a *log*-value:

==========  ===================================  =========================================
``lit``     ``log p_i`` or ``log(1 − p_i)``       a literal of atom ``i`` (``positive`` or not)
``one``     ``log 1 = 0``                         a side that holds in every world
``prod``    ``Σ children``                        a product of independent weights
``sum``     ``logaddexp(a, b)``                   a sum of the weights of two disjoint world sets
==========  ===================================  =========================================

Nodes are interned (built once per distinct meaning), so equal subcircuits are the same object and a fold visits
each once: the circuit of a side is a DAG whose size can stay far below its number of worlds. :func:`fold` is the
one interpreter every consumer uses — SymPy closed forms, text, numeric evaluation, torch, and the code emitter
(forward values and reverse-mode adjoints via :func:`topological`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any, TypeVar

T = TypeVar("T")


@dataclass(frozen=True, eq=False)
class Node:
    """One circuit node; build nodes with :func:`lit`, :func:`prod`, :func:`sum_` (interned), never directly."""

    op: str
    children: tuple[Node, ...] = ()
    atom: int = -1
    positive: bool = True
    key: tuple = field(default=(), repr=False)

    def __hash__(self) -> int:
        return hash(self.key)

    def __eq__(self, other: object) -> bool:
        return self is other or (isinstance(other, Node) and self.key == other.key)


_INTERNED: dict[tuple, Node] = {}


def _intern(op: str, children: tuple[Node, ...] = (), atom: int = -1, positive: bool = True) -> Node:
    key = (op, atom, positive, tuple(id(c) for c in children))
    node = _INTERNED.get(key)
    if node is None:
        node = Node(op, children, atom, positive, key)
        _INTERNED[key] = node
    return node


ONE = _intern("one")


def lit(atom: int, positive: bool) -> Node:
    """``log p_atom`` (positive) or ``log(1 − p_atom)``."""
    return _intern("lit", (), atom, positive)


def prod(*factors: Node) -> Node:
    """The product of independent weights: flattened, ``one`` dropped."""
    parts: list[Node] = []
    for f in factors:
        if f.op == "one":
            continue
        parts.extend(f.children if f.op == "prod" else (f,))
    if not parts:
        return ONE
    return parts[0] if len(parts) == 1 else _intern("prod", tuple(parts))


def sum_(*terms: Node) -> Node:
    """The sum of the weights of disjoint sets of worlds; more than two terms nest as a balanced binary tree, so
    every ``sum`` node is one two-way ``logaddexp`` in every backend."""
    if not terms:
        raise ValueError("a sum needs at least one term")
    if len(terms) == 1:
        return terms[0]
    if len(terms) > 2:
        half = len(terms) // 2
        return sum_(sum_(*terms[:half]), sum_(*terms[half:]))
    return _intern("sum", tuple(terms))


# --------------------------------------------------------------------------------------------------- folds


def topological(root: Node) -> list[Node]:
    """Every node of the DAG once, children before parents (iterative: deep circuits need no recursion)."""
    order: list[Node] = []
    seen: set[int] = set()
    stack: list[tuple[Node, bool]] = [(root, False)]
    while stack:
        node, expanded = stack.pop()
        if expanded:
            order.append(node)
            continue
        if id(node) in seen:
            continue
        seen.add(id(node))
        stack.append((node, True))
        stack.extend((c, False) for c in reversed(node.children) if id(c) not in seen)
    return order


def fold(
    root: Node,
    *,
    lit: Callable[[int, bool], T],
    one: Callable[[], T],
    prod: Callable[[list[T]], T],
    sum: Callable[[list[T]], T],  # noqa: A002 - named after the node type
) -> T:
    """Evaluate the circuit bottom-up with one function per node type, each shared node evaluated once."""
    value: dict[int, Any] = {}
    for node in topological(root):
        if node.op == "lit":
            value[id(node)] = lit(node.atom, node.positive)
        elif node.op == "one":
            value[id(node)] = one()
        else:
            args = [value[id(c)] for c in node.children]
            value[id(node)] = prod(args) if node.op == "prod" else sum(args)
    return value[id(root)]


def size(root: Node) -> int:
    """Nodes in the DAG (shared subcircuits counted once)."""
    return len(topological(root))


def atoms_used(root: Node) -> set[int]:
    return {n.atom for n in topological(root) if n.op == "lit"}


# --------------------------------------------------------------------------------------------------- from truth tables


def _cofactors(mask: int, i: int, n: int) -> tuple[int, int]:
    """The truth table with atom ``i`` set true / false (as tables over all ``n`` atoms, ``i`` then irrelevant)."""
    shift = 1 << i
    hi_worlds = _atom_true(n, i)
    hi = mask & hi_worlds
    lo = mask & ~hi_worlds & ((1 << (1 << n)) - 1)
    return hi | (hi >> shift), lo | (lo << shift)


@lru_cache(maxsize=64)
def _atom_true(n: int, i: int) -> int:
    return sum(1 << w for w in range(1 << n) if (w >> i) & 1)


@lru_cache(maxsize=1 << 16)
def from_truth_table(mask: int, n: int) -> Node:
    """``log WMC`` of a non-empty truth table over ``n`` atoms, by Shannon expansion.

    Literals that every world of the table fixes become factors (a product, no enumeration); a genuine split on an
    atom becomes a ``sum`` of its two cofactors. Equal cofactors are shared (this function is cached and nodes are
    interned), so DPO's sides are four literals and ORPO's need no ``sum`` at all.
    """
    if mask == 0:
        raise ValueError("log WMC of an unsatisfiable side is -inf; check the structure first")
    full = (1 << (1 << n)) - 1
    if mask == full:
        return ONE
    splits = []
    for i in range(n):
        f1, f0 = _cofactors(mask, i, n)
        if f1 != f0:
            splits.append((i, f1, f0))
    for i, f1, f0 in splits:  # a literal every world agrees on is a factor
        if f0 == 0:
            return prod(lit(i, True), from_truth_table(f1, n))
        if f1 == 0:
            return prod(lit(i, False), from_truth_table(f0, n))
    i, f1, f0 = splits[0]
    return sum_(prod(lit(i, True), from_truth_table(f1, n)), prod(lit(i, False), from_truth_table(f0, n)))


def literals(root: Node) -> Iterable[Node]:
    return (n for n in topological(root) if n.op == "lit")
