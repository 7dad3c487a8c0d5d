"""The canonical key of a structure's loss function: equal keys ⇔ the same loss (exact, not probabilistic).

**Same loss function, decided exactly by evaluation.** Two structures give the same loss exactly when
``ρ1 ≡ ρ2`` as rational functions, i.e. when ``C = N1·D2 − N2·D1 ≡ 0`` with ``N = WMC(✓)``, ``D = WMC(✗)``
(multilinear, so ``C`` has degree ≤ 2 in each variable). Every atom probability is evaluated on the product grid
``{1/4, 1/2, 3/4}^n``: three distinct values per variable, so ``C`` vanishes on the grid only if ``C ≡ 0`` (a
non-zero polynomial of degree ≤ d_i in x_i cannot vanish on a product grid with d_i + 1 values per variable,
by induction on the variables). Inside the open unit cube a non-empty side has ``WMC > 0``, so ``ρ`` is a
positive rational at every grid point and ``C(x) = 0 ⇔ ρ1(x) = ρ2(x)``. Hence the tuple of ``ρ`` values on the
grid, each reduced to lowest terms, is a canonical key: equal keys ⇔ the same loss function. Not probabilistic.
Scaled by ``4^n`` each ``WMC`` is an integer (a world's weight is a product of 1s, 2s and 3s), so the key needs
only small-integer arithmetic: no SymPy, no ``cancel``.
"""

from __future__ import annotations

import itertools
import math
from functools import cache, lru_cache
from operator import add

from dpalogic.logic.structure import Structure

# the grid values are a/Q with a ∈ GRID: three distinct interior points per variable (see the module docstring)
GRID = (1, 2, 3)
Q = 4


@cache
def _world_weights(n: int) -> tuple[tuple[int, ...], ...]:
    """``Q^n ×`` the weight of each world at each grid point: ``Π_i (a_i if atom i is true else Q − a_i)``."""
    points = list(itertools.product(GRID, repeat=n))
    out = []
    for w in range(1 << n):
        row = []
        for pt in points:
            v = 1
            for i, a in enumerate(pt):
                v *= a if (w >> i) & 1 else Q - a
            row.append(v)
        out.append(tuple(row))
    return tuple(out)


def wmc_vector(mask: int, n: int) -> tuple[int, ...]:
    """``Q^n · WMC(mask)`` at every grid point (integers; all positive when the mask is non-empty)."""
    ws = _world_weights(n)
    acc = [0] * len(ws[0])
    for w in range(1 << n):
        if (mask >> w) & 1:
            acc = list(map(add, acc, ws[w]))
    return tuple(acc)


def _subset_vectors(base: int, free: int, n: int) -> list[tuple[int, tuple[int, ...]]]:
    """``(mask, wmc_vector(mask))`` for ``mask = base | sub`` over every ``sub ⊆ free``, one vector add each."""
    ws = _world_weights(n)
    bits = [w for w in range(1 << n) if (free >> w) & 1]
    masks = [base]
    vecs = [wmc_vector(base, n)]
    for k in range(1, 1 << len(bits)):
        low = (k & -k).bit_length() - 1  # k = (k with its lowest bit cleared) + that bit's world
        prev = k & (k - 1)
        masks.append(masks[prev] | (1 << bits[low]))
        vecs.append(tuple(map(add, vecs[prev], ws[bits[low]])))
    return list(zip(masks, vecs))


@lru_cache(maxsize=4)
def _ratio_ids(n: int) -> list[int]:
    """``ids[a·(T+1) + b]`` = a canonical integer for the fraction ``a/b`` (``1 ≤ a, b ≤ T = Q^n``).

    The reduced fraction ``a'/b'`` is encoded as ``a'·(T+1) + b'``, injective because ``b' ≤ T``.
    """
    t = Q**n
    ids = [0] * ((t + 1) * (t + 1))
    for a in range(1, t + 1):
        for b in range(1, t + 1):
            g = math.gcd(a, b)
            ids[a * (t + 1) + b] = (a // g) * (t + 1) + b // g
    return ids


def _key(top_vec: tuple[int, ...], bottom_vec: tuple[int, ...], n: int) -> tuple[int, ...]:
    """The canonical loss key of a non-degenerate structure from its two WMC vectors."""
    if n <= 4:
        ids, t1 = _ratio_ids(n), Q**n + 1
        return tuple(ids[a * t1 + b] for a, b in zip(top_vec, bottom_vec))
    out = []
    for a, b in zip(top_vec, bottom_vec):
        g = math.gcd(a, b)
        out.extend((a // g, b // g))
    return tuple(out)


def loss_key(s: Structure) -> tuple:
    """A canonical key of a structure's loss function over its atoms: equal keys ⇔ ``ρ1 ≡ ρ2`` (exact).

    Compare keys of structures over the same atoms (``align`` them first); degenerate structures get the
    markers ``("infinite",)``, ``("zero",)`` and ``("undefined",)``.
    """
    if s.top == 0 or s.bottom == 0:
        return ("undefined",) if s.top == s.bottom else ("infinite",) if s.top == 0 else ("zero",)
    return _key(wmc_vector(s.top, s.n), wmc_vector(s.bottom, s.n), s.n)
