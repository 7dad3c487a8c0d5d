"""Order, meet, join, same-loss and witnesses on OBDDs (dpalogic.analysis.order_large): the same answers as the
truth tables at small K (random formulas with cardinalities and rankings), closed forms and exact rational
evaluation at large K, and the CLI on structures beyond 12 atoms."""

from __future__ import annotations

import itertools
import json
import math
import random
from fractions import Fraction

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dpalogic.analysis import order, order_large
from dpalogic.cli import main
from dpalogic.language.syntax import to_ascii
from dpalogic.logic.bdd import compile_formula
from dpalogic.logic.listwise import ListStructure, as_list_structure, parse_any
from dpalogic.logic.structure import Structure
from dpalogic.semantics import circuit
from dpalogic.semantics.program import same_ratio as same_ratio_tables

# ------------------------------------------------------------------------------------------ random small formulas

SMALL_ATOMS = ["M(y1)", "M(y2)", "M(y3)", "M(y4)", "Ref(y1)", "Ref(y2)"]


def _formula(depth: int) -> st.SearchStrategy[str]:
    atom = st.sampled_from(SMALL_ATOMS)
    if depth == 0:
        return atom
    sub = _formula(depth - 1)
    operands = st.lists(st.one_of(atom, sub), min_size=2, max_size=4)
    return st.one_of(
        atom,
        sub.map(lambda a: f"~({a})"),
        st.tuples(sub, sub, st.sampled_from(["&", "|", "->", "^"])).map(lambda t: f"({t[0]}) {t[2]} ({t[1]})"),
        operands.map(lambda ops: f"ExactlyOne({', '.join(ops)})"),
        operands.map(lambda ops: f"Ranked({', '.join(ops)})"),
        st.tuples(st.integers(1, 3), operands).map(lambda t: f"AtMost({t[0]}, {', '.join(t[1])})"),
        st.tuples(st.integers(1, 3), operands).map(lambda t: f"AtLeast({t[0]}, {', '.join(t[1])})"),
        st.tuples(st.integers(1, 3), operands).map(lambda t: f"Exactly({t[0]}, {', '.join(t[1])})"),
    )


structures = st.tuples(_formula(2), st.one_of(st.just(None), _formula(2)), st.one_of(st.just(None), _formula(1))).map(
    lambda t: "(" + ", ".join([t[0], t[1] or "true", *([t[2]] if t[2] else [])]) + ")"
)


def _both(text: str) -> tuple[Structure, ListStructure]:
    s = Structure.parse(text)
    return s, as_list_structure(s)  # the same structure compiled from its formulas (not from the truth table)


def _table(ls: ListStructure, node: int) -> int:
    """The truth table of an OBDD node over ``ls.atoms`` by evaluating it in every world (brute force)."""
    level = {a: i for i, a in enumerate(ls.order)}
    pos = [level[a] for a in ls.atoms]
    mask = 0
    for w in range(1 << ls.n):
        truth = {pos[i]: bool((w >> i) & 1) for i in range(ls.n)}
        if ls.bdd.evaluate(node, truth.__getitem__):
            mask |= 1 << w
    return mask


FAST = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@FAST
@given(structures, structures)
def test_relation_meet_join_agree_with_truth_tables(t1, t2):
    s1, l1 = _both(t1)
    s2, l2 = _both(t2)
    assert order_large.relation(l1, l2) == order.relation(s1, s2)
    assert order_large.relation(s1, l2) == order.relation(s1, s2)  # a truth-table structure meets a ListStructure
    for op in ("meet", "join"):
        big = getattr(order_large, op)(l1, l2)
        small = getattr(order, op)(s1, s2)
        assert big.atoms == small.atoms
        assert (_table(big, big.top), _table(big, big.bottom)) == (small.top, small.bottom)
        again = Structure.from_parts(*big.source, atoms=big.atoms)  # its text means its sides
        assert (again.top, again.bottom) == (small.top, small.bottom)


@FAST
@given(structures, structures)
def test_same_ratio_agrees_with_polynomials(t1, t2):
    s1, l1 = _both(t1)
    s2, l2 = _both(t2)
    if s1.problems() or s2.problems():
        return
    assert order_large.same_ratio(l1, l2) == same_ratio_tables(s1, s2)


def _padded(text: str, x: str) -> str:
    """``(P ∧ X, P_C ∧ X, P_A ∧ X)``: both sides times X, whose WMC cancels in ρ when X has atoms of its own."""
    core, cond, *extra = Structure.parse(text).source
    parts = [f"({to_ascii(core)}) & ({x})", f"({to_ascii(cond)}) & ({x})"] + [f"({to_ascii(e)}) & ({x})" for e in extra]
    return "(" + ", ".join(parts) + ")"


@FAST
@given(structures, st.sampled_from(["M(y5)", "~Ref(y3)", "M(y5) ^ Ref(y3)", "AtLeast(1, M(y5), Ref(y3), M(y6))"]))
def test_same_ratio_of_structures_padded_with_a_factor(t1, x):
    s1 = Structure.parse(t1)
    if s1.problems():
        return
    s2 = Structure.parse(_padded(t1, x))
    assert same_ratio_tables(s1, s2)  # the reference agrees that X cancels
    assert order_large.same_ratio(as_list_structure(s1), as_list_structure(s2))
    assert order_large.relation(as_list_structure(s1), as_list_structure(s2)) == order.relation(s1, s2)


def test_same_ratio_finds_equal_losses_of_different_structures():
    # ORPO's ratio o1/o2: conditioning on ExactlyOne, on XOR, and with a third answer's factor on both sides
    texts = ["(M(y1), ExactlyOne(M(y1), M(y2)))", "(M(y1), M(y1) ^ M(y2))", "(M(y1) & M(y3), (M(y1) ^ M(y2)) & M(y3))"]
    for a, b in itertools.combinations(texts, 2):
        s1, s2 = Structure.parse(a), Structure.parse(b)
        assert same_ratio_tables(s1, s2)  # the reference says equal
        assert order_large.same_ratio(as_list_structure(s1), as_list_structure(s2))
    assert not order_large.same_ratio(Structure.parse(texts[0]), Structure.parse("(M(y1), AtMost(1, M(y1), M(y2)))"))


# ------------------------------------------------------------------------------------------ large K


def _exact_products(a: ListStructure, b: ListStructure, point: list[Fraction]) -> tuple[Fraction, Fraction]:
    """``WMC(✓a)·WMC(✗b)`` and ``WMC(✓b)·WMC(✗a)`` at a rational point, folding the circuits exactly."""

    def wmc(s: ListStructure, which: str) -> Fraction:
        if (s.top if which == "top" else s.bottom) == 0:
            return Fraction(0)
        return circuit.fold(
            s.side_circuit(which),
            lit=lambda i, pos: point[i] if pos else 1 - point[i],
            one=lambda: Fraction(1),
            prod=math.prod,
            sum=sum,
        )

    return wmc(a, "top") * wmc(b, "bottom"), wmc(b, "top") * wmc(a, "bottom")


K = 24


@pytest.mark.parametrize(
    "a, b, same",
    [
        # "or none of y2..yK" adds the world with no valid answer to ✗: ρ = o1 / (1 + e1), not o1 / e1
        (f"(M(y1), ExactlyOne(M(y1..y{K})))", f"(M(y1), ExactlyOne(M(y1..y{K})) | AtMost(0, M(y2..y{K})))", False),
        (f"(M(y1), ExactlyOne(M(y1..y{K})))", f"(M(y1), AtMost(1, M(y1..y{K})) & AtLeast(1, M(y1..y{K})))", True),
        # a factor over answers the structure does not mention cancels in ρ: a different structure, the same loss
        (f"(M(y1), ExactlyOne(M(y1..y{K})))", f"(M(y1) & M(y{K + 1}), ExactlyOne(M(y1..y{K})) & M(y{K + 1}))", True),
        (f"(M(y1), AtMost(2, M(y1..y{K})))", f"(M(y1), AtMost(3, M(y1..y{K})))", False),
        (f"Ranked(M(y1..y{K}))", f"(Ranked(M(y1..y{K})), Ranked(M(y1..y{K})) | M(y1))", False),
    ],
)
def test_same_ratio_at_large_k_against_exact_evaluation(a, b, same):
    la, lb = order_large.shared(parse_any(a), parse_any(b))
    assert order_large.same_ratio(la, lb) == same
    rng = random.Random(5)
    for _ in range(3):  # different products at a point prove "different"; equal ones at 3 random points agree
        point = [Fraction(rng.randint(1, 10**6), 10**6 + 1) for _ in la.atoms]
        left, right = _exact_products(la, lb, point)
        assert (left == right) == same


def test_order_at_large_k_by_inclusion_of_the_conditioning():
    exactly_one = parse_any(f"(M(y1), ExactlyOne(M(y1..y{K})))")
    at_most_one = parse_any(f"(M(y1), AtMost(1, M(y1..y{K})))")
    # same ✓ (y1 alone), ✗ of AtMost(1) also holds when no answer is valid: a larger ✗, so a stronger loss
    assert order.relation(at_most_one, exactly_one) == "stronger"
    assert order.relation(exactly_one, at_most_one) == "weaker"
    assert order.relation(exactly_one, parse_any(f"(M(y1), Exactly(1, M(y1..y{K})))")) == "equivalent"
    # y1 valid given "at most 2 valid" against "exactly one": neither side contains the other
    assert order.relation(exactly_one, parse_any(f"(M(y1), AtMost(2, M(y1..y{K})))")) == "incomparable"
    # a large structure against a catalog one (atoms yw, yl and y1..yK together)
    assert order.relation(exactly_one, Structure.parse("M(yw)")) == "incomparable"


def test_meet_and_join_at_large_k_are_the_sides_combined():
    a = parse_any(f"(M(y1), ExactlyOne(M(y1..y{K})))")
    b = parse_any(f"(M(y1), AtMost(2, M(y1..y{K})))")
    m, j = order.meet(a, b), order.join(a, b)
    for r in (m, j):  # its text, compiled again, gives its sides
        assert isinstance(r, ListStructure)
        index = {x.name: i for i, x in enumerate(r.order)}
        core, cond, extra = (compile_formula(r.bdd, e, index) for e in r.source)
        assert r.bdd.apply("and", core, cond) == r.top
        assert r.bdd.apply("or", r.bdd.apply("and", r.bdd.neg(core), cond), extra) == r.bottom
    assert order.relation(m, a) in ("stronger", "equivalent") and order.relation(m, b) in ("stronger", "equivalent")
    assert order.relation(j, a) in ("weaker", "equivalent") and order.relation(j, b) in ("weaker", "equivalent")
    # the closed forms: meet ✓ = y1 alone, ✗ = ¬y1 with at most 2 others; ρ = o1 / (1 + e1 + e2)
    rng = random.Random(1)
    p = [rng.uniform(0.05, 0.95) for _ in range(K)]
    o = [x / (1 - x) for x in p]
    e1 = sum(o[1:])
    e2 = (e1**2 - sum(x * x for x in o[1:])) / 2
    logps = {f"M(y{i + 1})": math.log(x) for i, x in enumerate(p)}
    assert order_large.semantic_loss(m, logps) == pytest.approx(math.log1p((1 + e1 + e2) / o[0]), rel=1e-9)
    # join ✓ = y1 with at most one other, ✗ = ¬y1 with exactly one other: ρ = o1 (1 + e1) / e1
    assert order_large.semantic_loss(j, logps) == pytest.approx(math.log1p(e1 / (o[0] * (1 + e1))), rel=1e-9)
    # comparable structures meet in the stronger one, kept as written
    stronger = parse_any(f"(M(y1), AtMost(1, M(y1..y{K})))")
    assert order.meet(a, stronger).text() == stronger.text()


def _softmax_loss(logps: dict[str, float], k: int) -> float:
    """−log softmax over log-odds at y1: the closed form of (M(y1), ExactlyOne(M(y1..yK)))."""
    lo = [v - math.log(-math.expm1(v)) for v in (logps[f"M(y{i})"] for i in range(1, k + 1))]
    m = max(lo)
    return m + math.log(sum(math.exp(x - m) for x in lo)) - lo[0]


def test_witnesses_of_incomparable_large_structures():
    a = f"(M(y1), ExactlyOne(M(y1..y{K})))"
    b = f"(M(y1), ExactlyOne(M(y1), M(y3..y{K + 1})))"  # the softmax with y2 swapped for yK+1: ρ = o1 / e1(o3…)
    result = order.compare(a, b)
    assert result.relation == "incomparable" and not result.same_loss
    assert {w["larger"] for w in result.witnesses} == {"a", "b"}
    for w in result.witnesses:
        lp = w["logps"]
        la = _softmax_loss(lp, K)
        lo = {i: lp[f"M(y{i})"] - math.log(-math.expm1(lp[f"M(y{i})"])) for i in range(1, K + 2)}
        lb = math.log1p(sum(math.exp(lo[i]) for i in range(3, K + 2)) / math.exp(lo[1]))
        assert w["loss_a"] == pytest.approx(la, rel=1e-6, abs=1e-6)
        assert w["loss_b"] == pytest.approx(lb, rel=1e-6, abs=1e-6)
        assert (la > lb) == (w["larger"] == "a")


def test_compare_and_meet_on_the_command_line(capsys):
    a, b = f"(M(y1), ExactlyOne(M(y1..y{K})))", f"(M(y1), AtMost(1, M(y1..y{K})))"
    assert main(["compare", b, a, "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["relation"] == "stronger" and out["same_loss"] is False
    assert main(["meet", a, b, "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["structure"] == f"(M(y1), AtMost(1, M(y1..y{K})))"  # the stronger one, as written
    assert main(["join", a, f"(M(y1), AtMost(2, M(y1..y{K})))"]) == 0
    assert "OBDD" in capsys.readouterr().out
    # a meet with no ✓ world is a clear error, not a traceback
    assert main(["meet", a, f"(~M(y1), ExactlyOne(M(y1..y{K})))"]) == 2
    assert "unsatisfiable" in capsys.readouterr().err


def test_witnesses_over_many_answers_are_a_line_and_hold(capsys):
    """Compare prints each witness with runs of equal values as ranges; the losses shown are those at the point."""
    from dpalogic.cli import main as cli_main

    a, b = "(M(y1), ExactlyOne(M(y1..y64)))", "(M(y1), AtMost(2, M(y1..y64)))"
    assert cli_main(["compare", a, b]) == 0
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("witness:")]
    assert len(lines) == 2 and all(len(ln) < 400 for ln in lines)
    for ln in lines:  # "log M(y1) = u, log M(y2..y64) = v: ... of A = la, of B = lb": recompute la from the closed form
        if "log M(y1..y64) = " in ln:  # every answer the same value: one range
            u = v = float(ln.split("log M(y1..y64) = ")[1].split(":")[0])
        else:
            u = float(ln.split("log M(y1) = ")[1].split(",")[0])
            v = float(ln.split("log M(y2..y64) = ")[1].split(":")[0])
        odds = lambda lp: math.exp(lp) / -math.expm1(lp)  # noqa: E731
        la = math.log1p(63 * odds(v) / odds(u))  # ρ = o_1 / e_1(63 equal odds)
        shown = float(ln.split(f"of {a} = ")[1].split(",")[0])
        assert shown == pytest.approx(la, abs=1e-4)
