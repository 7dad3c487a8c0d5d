"""Order, meet/join and compare: the paper's reference-free lattice, witnesses that really flip, random checks."""

from __future__ import annotations

import itertools
import json

import pytest
import torch

from dpalogic.analysis.order import compare, join, meet, relation, witnesses
from dpalogic.cli import main
from dpalogic.logic.structure import Structure
from dpalogic.runtime.preference_loss import PreferenceLoss
from dpalogic.semantics.catalog import entries

REF_FREE = ["ce", "ceunl", "cunl", "cpo", "orpo", "ccpo", "uncpo"]
# docs/semantics.md §5, stronger → weaker (the Hasse diagram), written out by hand
HASSE = {("ceunl", "ce"), ("ceunl", "cunl"), ("cunl", "cpo"), ("cunl", "orpo"), ("ce", "ccpo"), ("cpo", "ccpo"),
         ("orpo", "ccpo"), ("ccpo", "uncpo")}  # fmt: skip


def closure(edges):
    reach = set(edges)
    changed = True
    while changed:
        changed = False
        for (a, b), (c, d) in itertools.product(list(reach), list(reach)):
            if b == c and (a, d) not in reach:
                reach.add((a, d))
                changed = True
    return reach


STRONGER = closure(HASSE)


def S(name):
    return entries()[name].program.structure


@pytest.mark.parametrize("a,b", list(itertools.permutations(REF_FREE, 2)))
def test_reference_free_lattice_is_the_papers(a, b):
    want = "stronger" if (a, b) in STRONGER else "weaker" if (b, a) in STRONGER else "incomparable"
    assert relation(S(a), S(b)) == want


def semantic_losses(s1, s2, n=400, seed=0):
    g = torch.Generator().manual_seed(seed)
    atoms = sorted({a.name for a in s1.atoms + s2.atoms})
    logps = {a: -(torch.rand(n, generator=g, dtype=torch.float64) * 8.0) for a in atoms}
    l1 = PreferenceLoss(s1, reduction="none")(logps={k: v for k, v in logps.items() if k in {x.name for x in s1.atoms}})
    l2 = PreferenceLoss(s2, reduction="none")(logps={k: v for k, v in logps.items() if k in {x.name for x in s2.atoms}})
    return l1, l2


@pytest.mark.parametrize("a,b", sorted(STRONGER))
def test_stronger_means_larger_loss_on_random_inputs(a, b):
    l1, l2 = semantic_losses(S(a), S(b))
    assert (l1 >= l2 - 1e-12).all()
    assert (l1 > l2 + 1e-6).any()  # and the order is strict somewhere


@pytest.mark.parametrize("a,b", [(a, b) for a, b in itertools.combinations(REF_FREE, 2)
                                 if (a, b) not in STRONGER and (b, a) not in STRONGER])  # fmt: skip
def test_witnesses_really_flip_the_order(a, b):
    ws = witnesses(S(a), S(b))
    assert {w["larger"] for w in ws} == {"a", "b"}
    for w in ws:
        lp = {k: torch.tensor([v], dtype=torch.float64) for k, v in w["logps"].items()}
        la = PreferenceLoss(S(a), reduction="none")(logps={k: lp[k] for k in (x.name for x in S(a).atoms)}).item()
        lb = PreferenceLoss(S(b), reduction="none")(logps={k: lp[k] for k in (x.name for x in S(b).atoms)}).item()
        assert (la > lb) == (w["larger"] == "a")


def test_meet_and_join():
    m, j = meet(S("cpo"), S("orpo")), join(S("cpo"), S("orpo"))
    assert (m.top, m.bottom) == (S("cunl").top, S("cunl").bottom)
    assert (j.top, j.bottom) == (S("ccpo").top, S("ccpo").bottom)
    for s in (S("cpo"), S("orpo")):
        assert relation(m, s) == "stronger" and relation(j, s) == "weaker"


def test_compare_dpo_ipo():
    c = compare(entries()["dpo"].program, entries()["ipo"].program, "dpo", "ipo")
    assert c.relation == "equivalent" and not c.same_loss
    assert c.links == ["logistic", "squared"]
    assert any("not monotone" in n and "1/(2*beta)" in n for n in c.notes)


def test_compare_same_loss_different_structures(capsys):
    assert main(["compare", "(M(yw) & M(yl), M(yl))", "(M(yw), true)", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["same_loss"] is True and out["relation"] == "incomparable" and out["witnesses"] == []


def test_adding_the_reference_strengthens_nothing_away():
    # DPO and CPO live on different atom sets: compared on the union, they are incomparable
    assert relation(S("dpo"), S("cpo")) == "incomparable"
    assert relation(Structure.parse("M(yw) & Ref(yl)"), Structure.parse("M(yw)")) == "stronger"


def test_compare_plot_writes_a_png(tmp_path, capsys):
    out = tmp_path / "cmp.png"
    assert main(["compare", "dpo", "ipo", "--plot", str(out), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["plot"] == str(out)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert main(["compare", "dpo", "ipo", "--plot", str(tmp_path / "cmp.txt")]) == 2


def test_cpo_and_orpo_share_a_core_formula():
    c = compare(entries()["cpo"].program, entries()["orpo"].program, "cpo", "orpo")
    assert c.relation == "incomparable"
    assert any("same core formula P = M(yl) → M(yw)" in n for n in c.notes)
