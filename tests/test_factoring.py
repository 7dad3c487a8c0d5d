"""The exact landscape by factoring (dpalogic.analysis.factoring), against independent computations:

* n ≤ 3: exhaustive enumeration (``loss_classes``: every structure's ρ on an exact grid), class by class;
* n = 4: sampled structures, whose class is found by a direct search over all 65,536 candidate ✓ sides — for each
  ``T'``, the ✗ side that would give the same ρ is ``WMC(T')·WMC(✗)/WMC(✓)`` on the grid, looked up among all
  truth tables' WMC vectors — and a count of coprime pairs from the sets' own factorizations (no generating
  functions);
* the factorization itself: the WMC of a set equals the product of its blocks' WMCs, as SymPy polynomials.
"""

from __future__ import annotations

import itertools
import json
import random
from math import comb

import numpy as np
import pytest
import sympy

from dpalogic.analysis import factoring
from dpalogic.analysis.landscape import _world_weights, landscape, loss_classes
from dpalogic.cli import main
from dpalogic.logic.structure import full_mask


@pytest.mark.parametrize("n", [1, 2, 3])
def test_counts_equal_enumeration(n):
    classes, degenerate = loss_classes(n)
    info = landscape(n)
    assert info.loss_functions == len(classes) == factoring.loss_function_count(n)
    sizes: dict[int, int] = {}
    for members in classes.values():
        sizes[len(members)] = sizes.get(len(members), 0) + 1
    assert info.class_sizes == sizes
    assert {d["kind"]: d["structures"] for d in info.degenerate} == degenerate


def test_every_class_at_three_atoms_has_one_canonical_member_and_the_predicted_members():
    classes, _ = loss_classes(3)
    for members in classes.values():
        canon = {factoring.canonical_structure(t, b, 3) for t, b in members}
        assert len(canon) == 1
        (t, b), size = factoring.class_of(*members[0], 3)
        assert (t, b) in members and size == len(members)
        assert sorted(factoring.class_members(*members[-1], 3)) == sorted(members)


def test_known_values():
    # sides over one atom are p, 1 − p, 1; the prime ones p and 1 − p; over two atoms 6 (two XOR-like, four 3-world)
    assert factoring.prime_sides(2)[1:] == (2, 6)
    assert [factoring.loss_function_count(n) for n in range(4)] == [1, 7, 187, 63475]
    # the paper's question: 4 atoms, M(yw), M(yl), Ref(yw), Ref(yl)
    assert factoring.loss_function_count(4) == 4294246507


@pytest.mark.parametrize("n", range(1, 9))
def test_counts_add_up_for_every_size(n):
    hist = factoring.class_size_histogram(n)
    assert sum(hist.values()) == factoring.loss_function_count(n)
    assert sum(m * c for m, c in hist.items()) == factoring.nonempty_sides(n) ** 2  # every structure in one class
    # the prime counts rebuild every set: Σ over (free atoms, partition of the rest into prime blocks)
    p = factoring.prime_sides(n)

    @__import__("functools").cache
    def set_partitions(m: int) -> int:  # Σ over partitions of m labelled atoms of Π P[block size]
        if m == 0:
            return 1
        return sum(comb(m - 1, k - 1) * p[k] * set_partitions(m - k) for k in range(1, m + 1))

    assert sum(comb(n, m) * set_partitions(m) for m in range(n + 1)) == factoring.nonempty_sides(n)


# --------------------------------------------------------------------------------------------------- n = 4


@pytest.fixture(scope="module")
def four():
    """Every truth table over 4 atoms with its WMC vector on the grid {1,2,3}^4 (× 4^4), and a lookup back."""
    n = 4
    weights = np.array(_world_weights(n), dtype=np.int64)  # [16 worlds, 81 points]
    masks = np.arange(1 << 16, dtype=np.int64)
    bits = (masks[:, None] >> np.arange(16)) & 1
    table = bits @ weights  # [65536, 81]
    index = {row.tobytes(): m for m, row in enumerate(table)}
    return table, index


def direct_class(top: int, bottom: int, four) -> set[tuple[int, int]]:
    """Every (T', B') with WMC(T')·WMC(B) = WMC(B')·WMC(T) on the exact grid (hence as polynomials)."""
    table, index = four
    num, den = table[top], table[bottom]
    prod = table * den
    ok = np.flatnonzero(((prod % num) == 0).all(axis=1))
    out = set()
    for t2 in ok[ok > 0]:
        b2 = index.get((prod[t2] // num).tobytes())
        if b2:
            out.add((int(t2), b2))
    return out


def sampled_structures(count: int, seed: int) -> list[tuple[int, int]]:
    rng = random.Random(seed)
    full = full_mask(4)
    out = [(rng.randint(1, full), rng.randint(1, full)) for _ in range(count)]
    # most random structures depend on all 4 atoms; also build ones with a shared factor on some atoms
    for _ in range(count):
        k = rng.randint(0, 3)
        support = rng.sample(range(4), k)
        rest = [i for i in range(4) if i not in support]
        t = factoring.lift(rng.randint(1, (1 << (1 << k)) - 1), support, 4)
        b = factoring.lift(rng.randint(1, (1 << (1 << k)) - 1), support, 4)
        g = factoring.lift(rng.randint(1, (1 << (1 << len(rest))) - 1), rest, 4)
        out.append((t & g, b & g))
    return out


def test_four_atoms_sampled_classes_equal_a_direct_search(four):
    sizes_seen = set()
    for top, bottom in sampled_structures(10, seed=4):
        found = direct_class(top, bottom, four)
        (t, b), size = factoring.class_of(top, bottom, 4)
        assert (top, bottom) in found
        assert size == len(found)
        sizes_seen.add(size)
        # the canonical structure is the class member with the largest sides: every member's sides lie inside it
        assert (t, b) in found and all(t2 | t == t and b2 | b == b for t2, b2 in found)
        if size <= 300:
            assert set(factoring.class_members(top, bottom, 4)) == found
    assert len(sizes_seen) >= 3


def test_four_atoms_count_from_the_sets_own_factorizations():
    """Coprime pairs counted over all 65,535 sets from their prime blocks, by inclusion–exclusion over tallies."""
    n, full = 4, full_mask(4)
    factors = [frozenset(factoring.prime_blocks(m, n)) for m in range(1, full + 1)]
    having: dict[frozenset, int] = {}  # #{B : S ⊆ factors(B)} for every S that occurs
    for f in factors:
        for r in range(len(f) + 1):
            for sub in itertools.combinations(sorted(f, key=repr), r):
                key = frozenset(sub)
                having[key] = having.get(key, 0) + 1
    coprime = 0
    for f in factors:
        for r in range(len(f) + 1):
            for sub in itertools.combinations(sorted(f, key=repr), r):
                coprime += (-1) ** r * having[frozenset(sub)]
    assert coprime == factoring.loss_function_count(4) == 4294246507


def test_blocks_multiply_to_the_wmc_polynomial():
    n = 4
    xs = sympy.symbols("x0:4")
    rng = random.Random(1)

    def wmc(worlds, atoms):
        return sum(sympy.Mul(*[xs[i] if (w >> i) & 1 else 1 - xs[i] for i in atoms]) for w in worlds)

    for top, _ in sampled_structures(8, seed=rng.randint(0, 99)):
        blocks = factoring.prime_blocks(top, n)
        worlds = [w for w in range(16) if (top >> w) & 1]
        product = sympy.Mul(*[wmc(proj, [i for i in range(n) if (blk >> i) & 1]) for blk, proj in blocks])
        assert sympy.expand(product - wmc(worlds, range(n))) == 0
        # blocks are prime: none splits further
        for blk, proj in blocks:
            atoms = [i for i in range(n) if (blk >> i) & 1]
            assert factoring.prime_blocks(factoring.lift(_table(proj, atoms), atoms, n), n) == [(blk, proj)]


def _table(projection, atoms) -> int:
    """A projection (restrictions of worlds to ``atoms``) as a truth table over those atoms."""
    out = 0
    for w in projection:
        u = sum(((w >> a) & 1) << j for j, a in enumerate(atoms))
        out |= 1 << u
    return out


def test_landscape_json_is_exact_for_big_atoms(capsys):
    assert main(["landscape", "--atoms", "5", "--json", "--examples", "1"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["structures"] == 4**32 and out["loss_functions"] == factoring.loss_function_count(5)
    assert out["loss_functions"] == 18446744017873493971
    assert sum(int(k) * v for k, v in out["class_sizes"].items()) == (2**32 - 1) ** 2
    assert out["largest_classes"][0]["structures"] == 2**32 - 1
    assert main(["landscape", "--atoms", "4"]) == 0
    text = capsys.readouterr().out
    assert "M(yw), M(yl), Ref(yw), Ref(yl)" in text and "4294246507" in text


def test_readme_landscape_output_is_what_the_command_prints(capsys):
    from pathlib import Path

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text(encoding="utf-8")
    block = readme.split("$ dpalogic landscape --atoms 4 --examples 0\n", 1)[1].split("```", 1)[0]
    assert main(["landscape", "--atoms", "4", "--examples", "0"]) == 0
    assert capsys.readouterr().out == block
    share = 4293993702 / ((2**16 - 1) ** 2)
    assert f"{100 * share:.2f}% of the" in readme  # the README's "almost every structure" figure
