"""The landscape (how many loss functions) and explore (what lies between two losses), against independent references.

References written here: SymPy ``cancel`` on world-by-world WMC sums (never dpalogic's polynomials or grid),
truth tables as sets of worlds, hand counts from docs/semantics.md §2/§5.
"""

from __future__ import annotations

import itertools
import json
import math
import random

import pytest
import sympy

from dpalogic.analysis.landscape import explore, landscape, loss_classes, loss_key
from dpalogic.cli import main
from dpalogic.errors import DPALogicError
from dpalogic.language.syntax import Atom
from dpalogic.logic.structure import Structure, align
from dpalogic.semantics.catalog import entries
from dpalogic.semantics.program import same_ratio

XS = sympy.symbols("x0:4", positive=True)


def wmc_expr(mask: int, n: int) -> sympy.Expr:
    """WMC by enumeration of worlds: Σ over worlds in the mask of Π p_i or (1 − p_i)."""
    total = sympy.Integer(0)
    for w in range(1 << n):
        if (mask >> w) & 1:
            total += sympy.Mul(*(XS[i] if (w >> i) & 1 else 1 - XS[i] for i in range(n)))
    return sympy.expand(total)


def cancelled(top: int, bottom: int, n: int) -> tuple:
    """ρ = WMC(✓)/WMC(✗) in lowest terms, normalised so the denominator's leading coefficient is 1."""
    num, den = sympy.fraction(sympy.cancel(wmc_expr(top, n) / wmc_expr(bottom, n)))
    gens = XS[:n]
    pn, pd = sympy.Poly(num, *gens, domain="QQ"), sympy.Poly(den, *gens, domain="QQ")
    lc = pd.LC()
    return tuple(sorted(pn.quo_ground(lc).terms())), tuple(sorted(pd.quo_ground(lc).terms()))


def partition(groups) -> set[frozenset]:
    return {frozenset(g) for g in groups}


@pytest.fixture(scope="module")
def three():
    """The three-atom landscape and its classes, computed once for the module."""
    return landscape(3), loss_classes(3)[0]


# --------------------------------------------------------------------------------------------------- landscape


def test_two_atoms_give_187_loss_functions_as_sympy_cancel_groups_them():
    classes, degenerate = loss_classes(2)
    assert len(classes) == 187  # docs/semantics.md §5
    by_sympy: dict[tuple, list] = {}
    for top, bottom in itertools.product(range(1, 16), repeat=2):
        by_sympy.setdefault(cancelled(top, bottom, 2), []).append((top, bottom))
    assert len(by_sympy) == 187
    assert partition(classes.values()) == partition(by_sympy.values())
    assert degenerate == {"empty ✓": 15, "empty ✗": 15, "both empty": 1}


def test_one_atom_by_hand():
    # sides ∈ {p, 1 − p, 1}: ρ ∈ {1 (three ways), p/(1−p), p, (1−p)/p, 1−p, 1/p, 1/(1−p)}
    info = landscape(1)
    assert (info.structures, info.non_degenerate_structures, info.loss_functions) == (16, 9, 7)
    assert info.class_sizes == {1: 6, 3: 1}


@pytest.mark.parametrize("n", [1, 2, 3])
def test_counts_add_up(n, three):
    info = three[0] if n == 3 else landscape(n)
    sides = 2 ** (2**n)
    assert info.structures == 4 ** (2**n) == sum(d["structures"] for d in info.degenerate) + (sides - 1) ** 2
    assert {d["kind"]: d["structures"] for d in info.degenerate} == {
        "empty ✓": sides - 1,
        "empty ✗": sides - 1,
        "both empty": 1,
    }
    assert sum(k * v for k, v in info.class_sizes.items()) == info.non_degenerate_structures == (sides - 1) ** 2
    assert sum(info.class_sizes.values()) == info.loss_functions


def test_three_atoms_count(three):
    info = three[0]
    # the number this module computes; cross-checked against SymPy below (sampled) and in the report (in full)
    assert info.loss_functions == 63475
    # ρ ≡ 1 exactly when ✓ = ✗: one class holding all 255 such structures
    assert max(info.class_sizes) == 255
    size, members = info.largest[0]
    assert size == 255 and members and all(t == b for t, b in members)


def test_three_atoms_classes_agree_with_sympy_on_a_sample(three):
    classes = three[1]
    rng = random.Random(0)
    cls_of = {m: k for k, members in classes.items() for m in members}
    sample = set(rng.sample(sorted(cls_of), 120))
    multi = [members for members in classes.values() if len(members) > 1]
    for members in rng.sample(multi, 12):  # whole classes, so that "same class" pairs are tested too
        sample.update(members[:15])
    by_sympy: dict[tuple, set] = {}
    for top, bottom in sample:
        by_sympy.setdefault(cancelled(top, bottom, 3), set()).add((top, bottom))
    by_module: dict[tuple, set] = {}
    for m in sample:
        by_module.setdefault(cls_of[m], set()).add(m)
    assert partition(by_module.values()) == partition(by_sympy.values())
    assert any(len(g) > 1 for g in by_sympy.values())


def test_three_atoms_every_class_member_has_the_same_ratio_polynomially(three):
    classes = three[1]
    atoms = tuple(Atom("M", f"y{i}") for i in (1, 2, 3))
    for members in classes.values():
        if len(members) > 1:
            first = Structure(atoms, *members[0])
            for t, b in members[1:]:
                assert same_ratio(first, Structure(atoms, t, b))


def test_loss_key_matches_same_ratio_on_the_catalog():
    singles = {n: e.program.structure for n, e in entries().items() if e.program.structure is not None}
    for (na, a), (nb, b) in itertools.combinations(singles.items(), 2):
        a2, b2 = align(a, b)
        assert (loss_key(a2) == loss_key(b2)) == same_ratio(a2, b2), (na, nb)


def test_loss_key_semantics_example():
    # docs/semantics.md §5: (M(yw) ∧ M(yl), M(yl)) and (M(yw), true) are different structures with the same loss
    s1, s2 = align(Structure.parse("(M(yw) & M(yl), M(yl))"), Structure.parse("M(yw)"))
    assert (s1.top, s1.bottom) != (s2.top, s2.bottom)
    assert loss_key(s1) == loss_key(s2)
    assert loss_key(Structure(s1.atoms, 0, 5)) == ("infinite",)
    assert loss_key(Structure(s1.atoms, 5, 0)) == ("zero",)


def test_landscape_cli(capsys):
    assert main(["landscape", "--atoms", "2", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["structures"] == 256 and out["loss_functions"] == 187 and out["classes"] == 190
    assert main(["landscape", "--atoms", "5", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["structures"] == 4**32 and out["loss_functions"] == 18446744017873493971
    assert main(["landscape", "--atoms", "2"]) == 0
    assert "187" in capsys.readouterr().out
    assert main(["landscape", "--atoms", "0"]) == 2
    assert "--atoms" in capsys.readouterr().err
    assert main(["landscape", "--atoms", "2", "--examples", "-1"]) == 2
    assert "--examples must be ≥ 0" in capsys.readouterr().err
    assert main(["landscape", "--atoms", "2", "--examples", "0", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["largest_classes"] == []


# --------------------------------------------------------------------------------------------------- explore


def worlds(mask: int) -> set[int]:
    return {w for w in range(mask.bit_length()) if (mask >> w) & 1}


def strictly_between(a: Structure, b: Structure) -> set[tuple[int, int]]:
    """Brute force over all 256 two-atom structures: ✓_A ⊆ ✓ ⊆ ✓_B, ✗_B ⊆ ✗ ⊆ ✗_A, endpoints excluded."""
    out = set()
    for t, f in itertools.product(range(16), repeat=2):
        if worlds(a.top) <= worlds(t) <= worlds(b.top) and worlds(b.bottom) <= worlds(f) <= worlds(a.bottom):
            if (t, f) not in {(a.top, a.bottom), (b.top, b.bottom)}:
                out.add((t, f))
    return out


def S(name: str) -> Structure:
    return entries()[name].program.structure


def test_explore_between_ceunl_and_ccpo():
    info = explore("ceunl", "ccpo", limit=100)
    a, b = align(S("ceunl"), S("ccpo"))
    want = strictly_between(a, b)
    got = {(Structure.parse(r["structure"]).over(a.atoms).top, Structure.parse(r["structure"]).over(a.atoms).bottom)
           for r in info["listed"]}  # fmt: skip
    assert got == want and info["strictly_between"] == len(want) == 6 and info["interval"] == 8
    assert not info["swapped"]
    assert {"ce", "cunl", "cpo", "orpo"} <= set(info["catalog_between"])
    named = {r["structure"]: r["catalog"] for r in info["listed"]}
    for name in ("ce", "cunl", "cpo", "orpo"):
        assert name in named[S(name).over(a.atoms).text("ascii")]
    sizes = [r["size"] for r in info["listed"]]
    assert sizes == sorted(sizes)
    for r in info["listed"]:
        # size = atom occurrences in the printed triple
        assert r["size"] == r["structure"].count("M(")


def test_explore_closed_forms_match_enumeration():
    info = explore("ceunl", "ccpo", limit=100)
    pw, pl = 0.37, 0.81
    p = {"p_w": pw, "p_l": pl}
    for r in info["listed"]:
        s = Structure.parse(r["structure"]).over(S("ceunl").atoms)
        num = float(wmc_expr(s.top, 2).subs({XS[0]: pw, XS[1]: pl}))
        den = float(wmc_expr(s.bottom, 2).subs({XS[0]: pw, XS[1]: pl}))
        rho, loss = (sympy.sympify(r[k]) for k in ("rho", "loss"))
        rho = float(rho.subs({x: p[x.name] for x in rho.free_symbols}))
        loss = float(loss.subs({x: p[x.name] for x in loss.free_symbols}))
        assert math.isclose(rho, num / den, rel_tol=1e-12)
        assert math.isclose(loss, -math.log(num / (num + den)), rel_tol=1e-12)


def test_explore_swaps_and_limits():
    info = explore("ccpo", "ceunl", limit=2)
    assert info["swapped"] and info["stronger"] == "ceunl" and info["weaker"] == "ccpo"
    assert len(info["listed"]) == 2
    assert [r["structure"] for r in info["listed"]] == [r["structure"] for r in explore("ceunl", "ccpo")["listed"][:2]]


def test_explore_distinct_keeps_one_structure_per_loss():
    # (M(yw) ∧ M(yl), M(yl)) has CE's loss: both lie strictly between their meet and join
    x = Structure.parse("(M(yw) & M(yl), M(yl))")
    ce = S("ce").over(x.atoms)
    lo = Structure(x.atoms, ce.top & x.top, ce.bottom | x.bottom)
    hi = Structure(x.atoms, ce.top | x.top, ce.bottom & x.bottom)
    every = explore(lo, hi, limit=100)
    assert {r["structure"] for r in every["listed"]} == {ce.text("ascii"), x.text("ascii")}
    assert every["strictly_between"] == len(strictly_between(lo, hi)) == 2
    one = explore(lo, hi, limit=100, distinct=True)
    assert one["distinct_losses"] == 1 and len(one["listed"]) == 1
    assert one["listed"][0]["structure"] == "M(yw)" and one["listed"][0]["structures_with_this_loss"] == 2


def test_explore_distinct_count_matches_sympy():
    info = explore("ceunl", "uncpo", limit=0)
    a, b = align(S("ceunl"), S("uncpo"))
    want = strictly_between(a, b)
    assert info["strictly_between"] == len(want) == 14
    assert info["distinct_losses"] == len({cancelled(t, f, 2) for t, f in want})


def test_explore_with_extra_atoms_lists_structures_between():
    from dpalogic.analysis.order import relation

    info = explore("ceunl", "ccpo", atoms=["Ref(yw)", "Ref(yl)"], limit=8)
    assert info["atoms"] == ["M(yw)", "M(yl)", "Ref(yw)", "Ref(yl)"]
    assert info["interval"] == 2**12 and info["strictly_between"] == 2**12 - 2
    for r in info["listed"]:
        s = Structure.parse(r["structure"])
        assert relation(S("ceunl"), s) == "stronger" and relation(s, S("ccpo")) == "stronger"


WIDE = ("M(yw) & ~M(yl) & Ref(yl) & ~Ref(yw)", "~(M(yl) & ~M(yw) & Ref(yw) & ~Ref(yl))")  # 14 + 14 free worlds


def test_explore_a_huge_interval_counts_exactly_and_lists_lazily():
    from dpalogic.analysis.landscape import loss_key
    from dpalogic.analysis.order import relation

    lo, hi = (Structure.parse(x) for x in WIDE)
    info = explore(*WIDE, limit=40, closed_forms=False)
    assert not info["enumerated"] and info["distinct_losses"] is None
    assert info["interval"] == 2**28 and info["strictly_between"] == 2**28 - 2
    assert "dpo" in info["catalog_between"] and "cpo" in info["catalog_between"]
    structures = [Structure.parse(r["structure"]).over(lo.atoms) for r in info["listed"]]
    assert len({(s.top, s.bottom) for s in structures}) == 40
    moved = []
    for s in structures:
        assert relation(lo, s) == "stronger" and relation(s, hi) == "stronger"
        moved.append((s.top & ~lo.top).bit_count() + (lo.bottom & ~s.bottom).bit_count())
    assert moved == sorted(moved) and moved[0] == 1  # lazily from the stronger end
    # "same loss as #j" marks agree with the exact grid keys of the listed structures
    keys = [loss_key(s) for s in structures]
    for i, row in enumerate(info["listed"]):
        first = keys.index(keys[i])
        assert row["same_loss_as_listed"] == (None if first == i else first + 1)


def test_explore_lazy_marks_shared_loss_functions(monkeypatch):
    """(M(yw), ¬M(yw)) and (M(yw) ∧ M(yl), ¬M(yw) ∧ M(yl)) both have ρ = p_w/(1 − p_w): the second is marked."""
    a, b = "(M(yw), M(yw) -> M(yl))", "ccpo"
    enumerated = explore(a, b, limit=10)
    assert enumerated["strictly_between"] == 2 and enumerated["distinct_losses"] == 1
    monkeypatch.setattr("dpalogic.analysis.landscape.MAX_INTERVAL", 1)  # force the lazy path on a small interval
    lazy = explore(a, b, limit=10)
    assert not lazy["enumerated"] and lazy["strictly_between"] == 2
    assert [r["same_loss_as_listed"] for r in lazy["listed"]] == [None, 1]
    assert [r["class_size"] for r in lazy["listed"]] == [3, 3]  # G ∈ {M(yl), ¬M(yl), true} over 2 atoms
    assert len(explore(a, b, limit=10, distinct=True)["listed"]) == 1


@pytest.mark.parametrize(
    "a,b,fragment",
    [
        ("cpo", "orpo", "incomparable"),
        ("cpo", "slic", "same structure"),
        ("nca_pair", "dpo", "several structures"),
        ("ceunl", "nonsense_loss", "unknown loss name"),
    ],
)
def test_explore_errors(a, b, fragment):
    with pytest.raises(DPALogicError, match=fragment):
        explore(a, b)


def test_explore_cli(capsys):
    assert main(["explore", "--between", "ceunl", "ccpo", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["strictly_between"] == 6 and len(out["listed"]) == 6
    assert out["listed"][1]["top"] == "M(yw) & ~M(yl)" and out["listed"][1]["top_unicode"] == "M(yw) ∧ ¬M(yl)"
    assert main(["explore", "--between", "ceunl", "ccpo"]) == 0
    text = capsys.readouterr().out
    assert "cunl" in text and "ρ = p_w/p_l" in text
    assert "✓ M(yw) ∧ ¬M(yl)    ✗ ¬M(yw)" in text and "ccpo: (M(yl) → M(yw), M(yw) ∨ M(yl))" in text
    assert main(["explore", "--between", "cpo", "orpo"]) == 2
    err = capsys.readouterr().err
    assert "incomparable" in err and "meet" in err
    assert main(["explore", "--between", "ceunl", "ccpo", "--atoms", "M(yw) | M(yl)"]) == 2
    assert "atoms such as" in capsys.readouterr().err
