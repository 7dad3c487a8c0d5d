"""Exact landscape counts by factoring WMC polynomials (docs/semantics.md §7): no enumeration of structures.

A side ``✓`` or ``✗`` is a set of worlds ``T ⊆ {0,1}^n`` (a bit mask over the ``2^n`` worlds); its WMC polynomial
is multilinear with corner values 0/1. Such a polynomial factors only into polynomials on disjoint sets of atoms,
each again the WMC of a set of worlds, so **``WMC(T)`` factors exactly as ``T`` splits into a product of sets on
disjoint blocks of atoms**. Two structures give the same loss iff their ratios in lowest terms agree; lowest terms
remove the factors common to ✓ and ✗, i.e. the blocks on which ✓ and ✗ have the same component. Hence

* every loss function has one *canonical* structure ``(T, B)`` with no common block, and its class is
  ``{(T ∩ G, B ∩ G)}`` for ``G`` any non-empty set of worlds over the atoms the loss does not depend on:
  ``2^(2^(n−k)) − 1`` structures when the loss depends on ``k`` atoms;
* the number of loss functions over ``n`` atoms is the number of coprime pairs of non-empty sets, counted by
  inclusion–exclusion over shared prime blocks with exponential generating functions.

Everything here is integer arithmetic on Python's big integers.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from functools import cache, lru_cache
from math import comb

MAX_FACTOR_ATOMS = 8  # 2^8 = 256 worlds: masks of 256 bits, blocks searched over at most 2^7 subsets


# --------------------------------------------------------------------------------------------------- counts


def nonempty_sides(n: int) -> int:
    """Non-empty sets of worlds over ``n`` atoms: ``2^(2^n) − 1``."""
    return (1 << (1 << n)) - 1


@cache
def prime_sides(n: int) -> tuple[int, ...]:
    """``P[s]``: sets of worlds on ``s`` atoms that are *prime* (not full, not a product over two disjoint blocks).

    Every non-empty set is uniquely its inessential atoms (left free) times prime sets on the blocks of a partition
    of the other atoms. With ``p(x) = Σ P[s] x^s/s!`` the exponential formula says
    ``Σ_n (2^(2^n) − 1) x^n/n! = e^x · e^(p(x))``; read off ``G = e^p`` by binomial inversion, then ``P`` from
    ``G[m] = Σ_k C(m−1, k−1) P[k] G[m−k]``.
    """
    g = [0] * (n + 1)
    for m in range(n + 1):
        g[m] = nonempty_sides(m) - sum(comb(m, j) * g[j] for j in range(m))
    p = [0] * (n + 1)
    for m in range(1, n + 1):
        p[m] = g[m] - sum(comb(m - 1, k - 1) * p[k] * g[m - k] for k in range(1, m))
    return tuple(p)


@cache
def _signed_prime_packings(n: int) -> tuple[int, ...]:
    """``a[m] = m!·[x^m] e^(−p(x))``: collections of disjoint prime blocks covering ``m`` atoms, signed ``(−1)^count``."""
    p = prime_sides(n)
    a = [1] + [0] * n
    for m in range(1, n + 1):
        a[m] = -sum(comb(m - 1, k - 1) * p[k] * a[m - k] for k in range(1, m + 1))
    return tuple(a)


def loss_function_count(n: int) -> int:
    """Distinct loss functions of the non-degenerate structures over ``n`` atoms: the coprime pairs of sides.

    Inclusion–exclusion over the set of shared prime blocks: pairs sharing a given collection of blocks covering
    ``m`` atoms number ``(2^(2^(n−m)) − 1)^2``.
    """
    a = _signed_prime_packings(n)
    return sum(comb(n, m) * a[m] * nonempty_sides(n - m) ** 2 for m in range(n + 1))


def depending_on_all(k: int) -> int:
    """Loss functions over ``k`` atoms that depend on every one of them (binomial inversion of the counts)."""
    return sum((-1) ** (k - j) * comb(k, j) * loss_function_count(j) for j in range(k + 1))


def class_size(n: int, k: int) -> int:
    """Structures over ``n`` atoms sharing a loss function that depends on exactly ``k`` atoms."""
    return nonempty_sides(n - k)


def class_size_histogram(n: int) -> dict[int, int]:
    """``{m: how many loss functions are shared by exactly m structures}``; ``m`` is determined by the support."""
    return {class_size(n, k): comb(n, k) * depending_on_all(k) for k in range(n, -1, -1)}


# --------------------------------------------------------------------------------------------------- sets of worlds


@cache
def _low_half(n: int, i: int) -> int:
    """The worlds whose atom ``i`` is false, as a mask."""
    return sum(1 << w for w in range(1 << n) if not (w >> i) & 1)


def _flip(mask: int, n: int, i: int) -> int:
    """The set with atom ``i`` negated in every world."""
    lo, s = _low_half(n, i), 1 << i
    return ((mask & lo) << s) | ((mask >> s) & lo)


def essential_atoms(mask: int, n: int) -> int:
    """The atoms (a bit mask) whose value matters to the set: those it is not closed under flipping."""
    return sum(1 << i for i in range(n) if _flip(mask, n, i) != mask)


def _worlds(mask: int) -> list[int]:
    out = []
    while mask:
        low = mask & -mask
        out.append(low.bit_length() - 1)
        mask ^= low
    return out


def _splits(worlds: list[int], block: int, all_atoms: int) -> bool:
    """Is the set the product of its projections on ``block`` and on the other atoms?"""
    on = {w & block for w in worlds}
    off = {w & (all_atoms & ~block) for w in worlds}
    return len(on) * len(off) == len(worlds)


@lru_cache(maxsize=1 << 17)
def prime_blocks(mask: int, n: int) -> list[tuple[int, frozenset[int]]]:
    """The finest product decomposition of a non-empty set: ``[(block of atoms, projection onto it), …]``.

    The blocks partition the essential atoms; each projection is a prime set (the irreducible WMC factors). The
    smallest block holding an atom is found by trying the subsets that contain it, smallest first; product
    decompositions are closed under intersection, so it is unique.
    """
    if not 1 <= n <= MAX_FACTOR_ATOMS:
        raise ValueError(f"factoring works on 1 to {MAX_FACTOR_ATOMS} atoms, got {n}")
    if mask == 0:
        raise ValueError("the empty set has no factorization (its WMC is 0)")
    worlds = _worlds(mask)
    all_atoms = (1 << n) - 1
    rest = [i for i in range(n) if (essential_atoms(mask, n) >> i) & 1]
    blocks = []
    while rest:
        v, others = rest[0], rest[1:]
        found = None
        for size in range(len(others) + 1):
            for extra in itertools.combinations(others, size):
                block = (1 << v) | sum(1 << i for i in extra)
                if _splits(worlds, block, all_atoms):
                    found = block
                    break
            if found is not None:
                break
        assert found is not None  # the whole remaining set of essential atoms always splits off
        blocks.append((found, frozenset(w & found for w in worlds)))
        rest = [i for i in rest if not (found >> i) & 1]
    return blocks


def _cylinder(projection: frozenset[int], block: int, n: int) -> int:
    """The worlds whose restriction to ``block`` lies in ``projection``."""
    return sum(1 << w for w in range(1 << n) if (w & block) in projection)


def _without_blocks(mask: int, n: int, blocks: int) -> int:
    """The set with its components on ``blocks`` replaced by everything (divide out those WMC factors)."""
    keep = ((1 << n) - 1) & ~blocks
    return _cylinder(frozenset(w & keep for w in _worlds(mask)), keep, n)


def canonical_structure(top: int, bottom: int, n: int) -> tuple[int, int]:
    """The one structure of the loss function's class whose sides share no prime block: ``ρ`` in lowest terms."""
    shared = set(prime_blocks(top, n)) & set(prime_blocks(bottom, n))
    common = 0
    for block, _ in shared:
        common |= block
    return _without_blocks(top, n, common), _without_blocks(bottom, n, common)


def support(top: int, bottom: int, n: int) -> int:
    """The atoms a loss function depends on (a bit mask), from its canonical structure."""
    t, b = canonical_structure(top, bottom, n)
    return essential_atoms(t, n) | essential_atoms(b, n)


def class_of(top: int, bottom: int, n: int) -> tuple[tuple[int, int], int]:
    """``((canonical ✓, canonical ✗), number of structures with this loss function)`` of a non-degenerate structure."""
    t, b = canonical_structure(top, bottom, n)
    k = (essential_atoms(t, n) | essential_atoms(b, n)).bit_count()
    return (t, b), class_size(n, k)


def lift(table: int, atoms: list[int], n: int) -> int:
    """A truth table over ``atoms`` (bit ``u`` ↔ the assignment ``u`` to them, first atom lowest) as a set of
    worlds over all ``n`` atoms (a cylinder: the other atoms are free)."""
    allowed = frozenset(
        sum(((u >> j) & 1) << a for j, a in enumerate(atoms)) for u in range(1 << len(atoms)) if (table >> u) & 1
    )
    return _cylinder(allowed, sum(1 << a for a in atoms), n)


def class_members(top: int, bottom: int, n: int) -> Iterator[tuple[int, int]]:
    """Every structure with the loss function of ``(top, bottom)``, lazily: ``(T ∩ G, B ∩ G)`` for non-empty ``G``
    over the atoms outside the support, ``G`` in increasing order of its truth table (the canonical one last)."""
    t, b = canonical_structure(top, bottom, n)
    used = essential_atoms(t, n) | essential_atoms(b, n)
    free = [i for i in range(n) if not (used >> i) & 1]
    for g in range(1, 1 << (1 << len(free))):
        cyl = lift(g, free, n)
        yield t & cyl, b & cyl


def smallest_support_classes(n: int, limit: int) -> Iterator[tuple[int, int]]:
    """Canonical structures of the largest classes first: by support size, then support, then truth tables.

    Supports of up to two atoms are searched (15 truth tables a side each), which is where examples come from.
    """
    count = 0
    for k in range(min(n, 2) + 1):
        for atoms in itertools.combinations(range(n), k):
            block = sum(1 << i for i in atoms)
            sides = [lift(table, list(atoms), n) for table in range(1, 1 << (1 << k))]
            for t in sides:
                for b in sides:
                    if (essential_atoms(t, n) | essential_atoms(b, n)) != block:
                        continue
                    if canonical_structure(t, b, n) != (t, b):
                        continue
                    yield t, b
                    count += 1
                    if count >= limit:
                        return
