"""Structures, ρ and compiled losses against the brute-force enumeration of worlds in ``brute.py``."""

from __future__ import annotations

import math

import brute
import pytest
import sympy
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from sympy.logic.boolalg import And, Equivalent, Implies, Not, Or, Xor

from dpalogic import PreferenceLoss, Structure
from dpalogic.language.syntax import Atom, parse_formula
from dpalogic.semantics.catalog import entries
from dpalogic.semantics.program import rho_sympy, same_ratio, weight_symbol

A = {n: sympy.Symbol(n) for n in ["M(yw)", "M(yl)", "Ref(yw)", "Ref(yl)", "M(y1)", "M(y2)", "M(y3)"]}
yw, yl, rw, rl = A["M(yw)"], A["M(yl)"], A["Ref(yw)"], A["Ref(yl)"]

# docs/semantics.md §5: the paper's losses as (✓, ✗), typed independently of the catalog
PAPER_SIDES = {
    "ce": (yw, Not(yw)),
    "ceunl": (And(yw, Not(yl)), Not(And(yw, Not(yl)))),
    "cunl": (And(yw, Not(yl)), yl),
    "cpo": (yw, yl),
    "orpo": (And(yw, Not(yl)), And(yl, Not(yw))),
    "ccpo": (yw, And(yl, Not(yw))),
    "uncpo": (Implies(yl, yw), And(yl, Not(yw))),
    "dpo": (And(yw, rl), And(yl, rw)),
    "modified_dpo": (And(yw, Not(yl), rl), And(yl, Not(yw), rw)),
}

# docs/semantics.md §5's ρ column, as functions of the probabilities
PAPER_RHO = {
    "ce": lambda pw, pl, rw, rl: pw / (1 - pw),
    "ceunl": lambda pw, pl, rw, rl: pw * (1 - pl) / (1 - pw * (1 - pl)),
    "cunl": lambda pw, pl, rw, rl: pw * (1 - pl) / pl,
    "cpo": lambda pw, pl, rw, rl: pw / pl,
    "orpo": lambda pw, pl, rw, rl: pw * (1 - pl) / (pl * (1 - pw)),
    "ccpo": lambda pw, pl, rw, rl: pw / (pl * (1 - pw)),
    "uncpo": lambda pw, pl, rw, rl: (pw * pl + 1 - pl) / (pl * (1 - pw)),
    "dpo": lambda pw, pl, rw, rl: pw * rl / (pl * rw),
    "modified_dpo": lambda pw, pl, rw, rl: pw * (1 - pl) * rl / (pl * (1 - pw) * rw),
}

PROBS = [(0.3, 0.6, 0.5, 0.2), (0.9, 0.05, 0.7, 0.4), (0.01, 0.02, 0.99, 0.5)]


@pytest.mark.parametrize("name", list(PAPER_SIDES))
def test_catalog_structure_has_the_papers_sides(name):
    s = entries()[name].program.structure
    top, bottom = PAPER_SIDES[name]
    want = Structure.from_sides(top, bottom, atoms=s.atoms)
    assert (s.top, s.bottom) == (want.top, want.bottom)


@pytest.mark.parametrize("name", list(PAPER_SIDES))
@pytest.mark.parametrize("probs", PROBS)
def test_rho_matches_brute_force_and_the_table(name, probs):
    s = entries()[name].program.structure
    top, bottom = PAPER_SIDES[name]
    pw, pl, rw_, rl_ = probs
    named = {"M(yw)": pw, "M(yl)": pl, "Ref(yw)": rw_, "Ref(yl)": rl_}
    names = {str(x) for x in top.free_symbols | bottom.free_symbols}
    brute_rho = brute.wmc(top, {k: v for k, v in named.items() if k in names}) / brute.wmc(
        bottom, {k: v for k, v in named.items() if k in names}
    )
    subs = {weight_symbol(a): named[a.name] for a in s.atoms}
    ours = float(rho_sympy(s).subs(subs))
    assert ours == pytest.approx(brute_rho, rel=1e-12)
    assert ours == pytest.approx(PAPER_RHO[name](pw, pl, rw_, rl_), rel=1e-12)


@pytest.mark.parametrize("name", list(PAPER_SIDES))
def test_compiled_paper_loss_matches_brute_force(name):
    """The catalog structure compiled as a plain semantic loss −log σ(log ρ), β = 1."""
    top, bottom = PAPER_SIDES[name]
    beta = 1.0
    loss_fn = PreferenceLoss(entries()[name].program.structure, reduction="none")
    for pw, pl, rw_, rl_ in PROBS:
        lp = {
            k: torch.tensor([math.log(v)], dtype=torch.float64)
            for k, v in zip(["w", "l", "rw", "rl"], (pw, pl, rw_, rl_))
        }
        got = loss_fn(lp["w"], lp["l"], lp["rw"], lp["rl"]).item()
        named = {"M(yw)": pw, "M(yl)": pl, "Ref(yw)": rw_, "Ref(yl)": rl_}
        names = {str(x) for x in top.free_symbols | bottom.free_symbols}
        p = {k: v for k, v in named.items() if k in names}
        rho = brute.wmc(top, p) / brute.wmc(bottom, p)
        want = math.log1p(rho ** (-beta))
        assert got == pytest.approx(want, rel=1e-10)


def test_paper_example_same_loss_different_structures():
    s1 = Structure.parse("(M(yw) & M(yl), M(yl))")
    s2 = Structure.parse("(M(yw), true)")
    assert s1 != s2
    assert same_ratio(s1, s2)
    assert not same_ratio(Structure.parse("M(yw)"), Structure.parse("M(yw) & ~M(yl)"))


def test_reference_model_turns_cpo_into_dpo():
    cpo = entries()["cpo"].program.structure
    with_ref = Structure.from_sides(And(cpo.top_formula, rl), And(cpo.bottom_formula, rw))
    dpo = entries()["dpo"].program.structure
    assert (with_ref.top, with_ref.bottom) == (dpo.top, dpo.bottom)


@pytest.mark.parametrize(
    "text,top,bottom",
    [
        ("M(yw)", yw, Not(yw)),
        ("(M(yl) -> M(yw), M(yw) | M(yl), M(yw) & M(yl))", yw, yl),
        ("(M(yl) -> M(yw), M(yw) ^ M(yl))", And(yw, Not(yl)), And(yl, Not(yw))),
        ("((M(yl) & Ref(yw)) -> M(yw), (M(yw) & ~M(yl) & Ref(yl)) | (M(yl) & ~M(yw) & Ref(yw)))",
         And(yw, Not(yl), rl), And(yl, Not(yw), rw)),
    ],
)  # fmt: skip
def test_sides_of_written_structures(text, top, bottom):
    s = Structure.parse(text)
    want = Structure.from_sides(top, bottom, atoms=s.atoms)
    assert (s.top, s.bottom) == (want.top, want.bottom)


@pytest.mark.parametrize("name", list(PAPER_SIDES))
def test_readable_triple_rebuilds_the_same_sides(name):
    s = entries()[name].program.structure
    again = Structure.parse(s.text("ascii"))
    assert (again.over(s.atoms).top, again.over(s.atoms).bottom) == (s.top, s.bottom)


def test_readable_forms_of_the_semantics_table():
    S = entries()
    assert S["cpo"].program.structure.text() == "(M(yl) → M(yw), M(yw) ∨ M(yl), M(yw) ∧ M(yl))"
    assert S["orpo"].program.structure.text() == "(M(yl) → M(yw), M(yw) ⊕ M(yl))"
    assert S["cunl"].program.structure.text() == "(¬M(yl), M(yw) ∨ M(yl))"
    assert S["ccpo"].program.structure.text() == "(M(yl) → M(yw), M(yw) ∨ M(yl))"
    assert S["uncpo"].program.structure.text() == "M(yl) → M(yw)"
    assert S["ceunl"].program.structure.text() == "M(yw) ∧ ¬M(yl)"
    assert S["modified_dpo"].program.structure.text().startswith("((M(yl) ∧ Ref(yw)) → M(yw), ")


# ------------------------------------------------------------------------------------ hypothesis: random structures

ATOM_POOLS = {
    2: [yw, yl],
    3: [yw, yl, rw],
    4: [yw, yl, rw, rl],
}


def formulas(atoms):
    leaves = st.sampled_from(atoms) | st.sampled_from([sympy.true, sympy.false])
    return st.recursive(
        leaves,
        lambda sub: st.one_of(
            sub.map(Not),
            st.tuples(sub, sub).map(lambda t: And(*t)),
            st.tuples(sub, sub).map(lambda t: Or(*t)),
            st.tuples(sub, sub).map(lambda t: Xor(*t)),
            st.tuples(sub, sub).map(lambda t: Implies(*t)),
            st.tuples(sub, sub).map(lambda t: Equivalent(*t)),
        ),
        max_leaves=6,
    )


@st.composite
def structures(draw):
    n = draw(st.sampled_from([2, 3, 4]))
    atoms = ATOM_POOLS[n]
    f = formulas(atoms)
    core = draw(f)
    given_ = draw(st.one_of(st.just(sympy.true), f))
    additional = draw(st.one_of(st.just(sympy.false), f))
    probs = {str(a): draw(st.floats(0.02, 0.98)) for a in atoms}
    beta = draw(st.sampled_from([1.0, 0.5, 2.0]))
    return core, given_, additional, probs, beta


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(structures())
def test_compiler_matches_brute_force_on_random_structures(case):
    core, given_, additional, probs, beta = case
    top, bottom = brute.sides(core, given_, additional)
    assume(brute.wmc(top, probs) > 0 and brute.wmc(bottom, probs) > 0)
    s = Structure.from_parts(core, given_, additional)
    assume(s.top != 0 and s.bottom != 0)  # degenerate symbolically even if numerically fine: reported instead
    want = brute.semantic_loss(core, given_, additional, probs, beta=beta)
    loss_fn = PreferenceLoss(s, beta=beta, reduction="none")
    logps = {k: torch.tensor([math.log(v)], dtype=torch.float64) for k, v in probs.items()}
    got = loss_fn(logps=logps).item()
    assert got == pytest.approx(want, rel=1e-9, abs=1e-12)


@settings(max_examples=40, deadline=None)
@given(structures())
def test_readable_triple_is_equivalent(case):
    core, given_, additional, _, _ = case
    s = Structure.from_parts(core, given_, additional)
    rebuilt = Structure.from_parts(*s.readable_triple(), atoms=s.atoms)
    assert (rebuilt.top, rebuilt.bottom) == (s.top, s.bottom)
    assert (Structure.from_sides(s.top_formula, s.bottom_formula, atoms=s.atoms).top) == s.top


def test_multi_answer_atoms():
    # a ranking over three answers: y1 preferred to y2 preferred to y3
    s = Structure.parse("(M(y2) -> M(y1)) & (M(y3) -> M(y2))")
    assert [a.name for a in s.atoms] == ["M(y1)", "M(y2)", "M(y3)"]
    probs = {"M(y1)": 0.7, "M(y2)": 0.4, "M(y3)": 0.2}
    want = brute.semantic_loss(parse_formula(s.text("ascii")), sympy.true, sympy.false, probs)
    got = PreferenceLoss(s, reduction="none")(
        logps={k: torch.tensor([math.log(v)], dtype=torch.float64) for k, v in probs.items()}
    )
    assert got.item() == pytest.approx(want, rel=1e-10)
    assert Atom("M", "y3").sort_key > Atom("M", "y1").sort_key
