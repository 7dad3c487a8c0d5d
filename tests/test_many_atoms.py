"""Structures over many atoms (up to the 12-atom cap) stay cheap to print, compare and combine: the readable form
of a large truth table falls back to its circuit when Quine–McCluskey would start from many terms, and witnesses
are searched on a bounded sample. Checked against truth tables and direct loss evaluation, not timings."""

from __future__ import annotations

import random

from dpalogic.analysis.order import compare, meet, semantic_loss
from dpalogic.language.syntax import Atom
from dpalogic.logic.structure import Structure, readable, truth_table

ATOMS = tuple(Atom("M", f"y{i}") for i in range(1, 11))


def test_readable_forms_of_large_truth_tables_have_that_truth_table():
    rng = random.Random(3)
    for _ in range(6):
        mask = rng.getrandbits(1 << len(ATOMS)) | 1
        formula = readable(mask, ATOMS)
        assert truth_table(formula, ATOMS) == mask


def test_compare_and_meet_over_twelve_atoms():
    chain = " & ".join(f"M(y{i})" for i in range(1, 12)) + " -> M(y12)"
    other = "M(y1) | M(y12)"
    result = compare(chain, other)
    assert result.relation == "incomparable"
    a, b = Structure.parse(chain), Structure.parse(other)
    sides = set()
    for w in result.witnesses:
        la, lb = semantic_loss(a, w["logps"]), semantic_loss(b, w["logps"])  # recomputed from the rounded inputs
        assert (la > lb) == (w["larger"] == "a") and abs(la - lb) > 1e-6
        sides.add(w["larger"])
    assert sides == {"a", "b"}  # a witness each way, as incomparable structures must have
    m = meet(a, b)
    assert m.top == (a.over(m.atoms).top & b.over(m.atoms).top)
