"""K answers: constructs, the OBDD compiler, lifted counting and the [B, K] loss, against brute force.

References are independent of the code under test: worlds enumerated one by one and formulas evaluated by the small
interpreter below (counting true operands directly), e_c from polynomial multiplication, softmax from torch, and
gradients from finite differences.
"""

from __future__ import annotations

import itertools
import json
import math
import warnings

import pytest
import sympy
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from sympy.logic.boolalg import And, Equivalent, Implies, Not, Or, Xor

from dpalogic import PreferenceLoss
from dpalogic.cli import main
from dpalogic.errors import DPALogicError, FormulaSyntaxError
from dpalogic.language.cardinality import Count, Ranked
from dpalogic.language.syntax import atoms_of, parse_formula, parse_structure_text, to_ascii, to_latex, to_unicode
from dpalogic.logic.listwise import ListStructure, parse_any
from dpalogic.logic.structure import Structure
from dpalogic.runtime.listwise import ListwiseTerm
from dpalogic.semantics import circuit
from dpalogic.semantics.lifted import lift

# --------------------------------------------------------------------------------------------------- references


def holds(e, world: dict[str, bool]) -> bool:
    """The truth of a formula in one world, read off its definition."""
    if e is sympy.true:
        return True
    if e is sympy.false:
        return False
    if isinstance(e, sympy.Symbol):
        return world[e.name]
    if isinstance(e, Count):
        k = sum(holds(a, world) for a in e.operands)
        return e.lo <= k <= e.hi
    if isinstance(e, Ranked):
        v = [holds(a, world) for a in e.operands]
        return all(v[i] or not v[i + 1] for i in range(len(v) - 1))
    vals = [holds(a, world) for a in e.args]
    f = e.func
    if f is Not:
        return not vals[0]
    if f is And:
        return all(vals)
    if f is Or:
        return any(vals)
    if f is Xor:
        return sum(vals) % 2 == 1
    if f is Implies:
        return (not vals[0]) or vals[1]
    if f is Equivalent:
        return all(vals) or not any(vals)
    raise AssertionError(f)


def brute_log_sides(text: str, lp: dict[str, float]) -> tuple[float, float]:
    """log WMC(✓), log WMC(✗) by enumerating every world (float64)."""
    ps = parse_structure_text(text)
    core = ps.core
    given_ = sympy.true if ps.given is None else ps.given
    add = sympy.false if ps.additional is None else ps.additional
    atoms = [a.name for a in atoms_of(core, given_, add)]
    top = bot = 0.0
    for bits in itertools.product((False, True), repeat=len(atoms)):
        w = dict(zip(atoms, bits))
        weight = math.prod(math.exp(lp[a]) if w[a] else -math.expm1(lp[a]) for a in atoms)
        p, c, a = holds(core, w), holds(given_, w), holds(add, w)
        top += weight * (p and c)
        bot += weight * (((not p) and c) or a)
    return math.log(top), math.log(bot)


def esym_reference(odds: list[float]) -> list[float]:
    """Elementary symmetric polynomials as the coefficients of Π (1 + o_j t)."""
    coef = [1.0]
    for o in odds:
        coef = [a + o * b for a, b in zip(coef + [0.0], [0.0] + coef)]
    return coef


def circuit_value(node: circuit.Node, lps: list[float]) -> float:
    return circuit.fold(
        node,
        lit=lambda i, pos: lps[i] if pos else math.log(-math.expm1(lps[i])),
        one=lambda: 0.0,
        prod=sum,
        sum=lambda xs: math.log(sum(math.exp(x) for x in xs)),
    )


# --------------------------------------------------------------------------------------------------- the language


def test_ranges_expand_and_print_compactly():
    e = parse_formula("ExactlyOne(M(y1..y64))")
    assert isinstance(e, Count) and (e.lo, e.hi) == (1, 1) and len(e.operands) == 64
    assert to_ascii(e) == "ExactlyOne(M(y1..y64))" and to_unicode(e) == "ExactlyOne(M(y1..y64))"
    assert r"\ldots" in to_latex(e) and "\n" not in to_latex(e)
    s = parse_formula("AtMost(2, M(y1..y3), Ref(y1..y256))")
    assert len(s.operands) == 259 and to_ascii(s) == "AtMost(2, M(y1..y3), Ref(y1..y256))"
    assert to_ascii(parse_formula("Ranked(M(y3..y5), M(y1))")) == "Ranked(M(y3..y5), M(y1))"  # order kept
    assert to_ascii(parse_formula("And(M(x, y1..y4))")) == "And(M(y1..y4))"
    assert parse_formula("AtLeast(0, M(y1..y4))") is sympy.true and parse_formula("AtMost(5, M(y1..y4))") is sympy.true
    assert parse_formula("AtLeast(5, M(y1..y4))") is sympy.false
    # "all equal" over many answers: one call, not 63 pairs, and it reads back to the same function
    iff = parse_formula("Iff(M(y1..y64))")
    assert to_ascii(iff) == "Iff(M(y1..y64))" and to_unicode(iff) == "Iff(M(y1..y64))"
    three = parse_formula("Iff(M(y1), Ref(y2), M(y3) & M(y4))")
    back = parse_formula(to_ascii(three))
    names = sorted(a.name for a in three.free_symbols)
    for bits in itertools.product((False, True), repeat=len(names)):
        w = dict(zip(names, bits))
        assert holds(three, w) == holds(back, w) == (len({bits[0], bits[3], bits[1] and bits[2]}) == 1)


@pytest.mark.parametrize(
    "text, message",
    [
        ("M(y1..y3)", "stands for several atoms"),
        ("~M(y1..y3)", "stands for several atoms"),
        ("AtMost(M(y1), M(y2))", "takes a count first"),
        ("AtMost(2)", "needs formulas after its count"),
        ("And(2, M(y1))", "only allowed as the count"),
        ("M(y4..y2)", "runs downward"),
        ("M(yw..y3)", "numbered answers"),
        ("M(y1..y300)", "go up to y256"),
        ("ExactlyOen(M(y1..y3))", "ExactlyOne"),
    ],
)
def test_bad_constructs_are_reported_with_a_caret(text, message, capsys):
    with pytest.raises(FormulaSyntaxError, match=message) as info:
        parse_formula(text)
    assert 0 <= info.value.pos <= len(text)
    assert main(["derive", text]) == 2
    assert "^" in capsys.readouterr().err


# random formulas over a few answers, with every construct
ATOMS = [sympy.Symbol(f"{p}(y{j})") for j in range(1, 5) for p in ("M", "Ref")][:7]


def formulas(depth: int = 2):
    leaf = st.sampled_from(ATOMS)
    if depth == 0:
        return leaf
    sub = formulas(depth - 1)
    ops = st.lists(sub, min_size=1, max_size=4)
    return st.one_of(
        leaf,
        sub.map(Not),
        ops.map(lambda xs: And(*xs)),
        ops.map(lambda xs: Or(*xs)),
        ops.map(lambda xs: Xor(*xs)),
        st.tuples(sub, sub).map(lambda ab: Implies(*ab)),
        st.tuples(st.integers(0, 3), st.integers(0, 4), ops).map(lambda t: Count(t[0], t[0] + t[1], *t[2])),
        ops.map(lambda xs: Ranked(*xs)),
    )


@settings(max_examples=60, deadline=None)
@given(formulas())
def test_printed_formulas_read_back_to_the_same_function(e):
    back = parse_formula(to_ascii(e))
    atoms = sorted({s.name for s in e.free_symbols | back.free_symbols})
    for bits in itertools.product((False, True), repeat=len(atoms)):
        w = dict(zip(atoms, bits))
        assert holds(e, w) == holds(back, w)


@settings(max_examples=60, deadline=None)
@given(formulas(), formulas(), st.lists(st.floats(-6.0, -1e-3), min_size=7, max_size=7))
def test_obdd_lifted_and_truth_table_sides_equal_brute_force(core, cond, lps):
    text = f"({to_ascii(core)}, {to_ascii(cond)})"
    ps = parse_structure_text(text)
    if not (ps.core.free_symbols | ps.given.free_symbols):
        return
    try:
        small = Structure.parse(text).check()
    except DPALogicError:
        return  # degenerate: nothing to compare
    lp = {a.name: v for a, v in zip(ATOMS, lps)}
    top, bot = brute_log_sides(text, lp)
    big = ListStructure.from_parts(ps.core, ps.given, ps.additional).check()
    x = [lp[a.name] for a in big.atoms]
    assert circuit_value(big.side_circuit("top"), x) == pytest.approx(top, rel=1e-9, abs=1e-9)
    assert circuit_value(big.side_circuit("bottom"), x) == pytest.approx(bot, rel=1e-9, abs=1e-9)
    term = ListwiseTerm(big)
    got = float(term.log_ratio(torch.tensor([x], dtype=torch.float64))[0])
    assert got == pytest.approx(top - bot, rel=1e-9, abs=1e-9)
    loss = PreferenceLoss(small, reduction="none")(logps={a.name: torch.tensor([lp[a.name]]) for a in small.atoms})
    assert float(loss[0]) == pytest.approx(math.log1p(math.exp(bot - top)), rel=1e-4, abs=1e-5)


# --------------------------------------------------------------------------------------------------- large K


@pytest.mark.parametrize(
    "text",
    [
        "(M(y1), ExactlyOne(M(y1..y14)))",
        "(M(y1) & M(y2), AtMost(3, M(y1..y14)))",
        "(AtLeast(2, M(y1..y13)), M(y1) | M(y14))",
        "(M(y1), ExactlyOne(M(y1..y7)) & And(M(y1) | Ref(y1), M(y2) | Ref(y2), M(y3) | Ref(y3), M(y4) | Ref(y4), "
        "M(y5) | Ref(y5), M(y6) | Ref(y6), M(y7) | Ref(y7)))",
        "(Ranked(M(y1..y14)), M(y1) | M(y2))",
        "(Exactly(2, M(y1..y13)) ^ M(y14), true, M(y1) & M(y2) & M(y3))",
    ],
)
def test_large_structures_equal_brute_force_enumeration(text):
    s = parse_any(text)
    assert isinstance(s, ListStructure) and s.n > 12
    g = torch.Generator().manual_seed(len(text))
    B = 3
    K = max(int(a.answer[1:]) for a in s.atoms)
    logps = -torch.rand(B, K, generator=g, dtype=torch.float64) * 4 - 1e-3
    ref = -torch.rand(B, K, generator=g, dtype=torch.float64) * 4 - 1e-3
    uses_ref = any(a.pred == "Ref" for a in s.atoms)
    loss = PreferenceLoss(text, reduction="none", beta=1.0)(logps=logps, ref_logps=ref if uses_ref else None)
    for b in range(B):
        lp = {f"M(y{j + 1})": float(logps[b, j]) for j in range(K)}
        lp.update({f"Ref(y{j + 1})": float(ref[b, j]) for j in range(K)})
        top, bot = brute_log_sides(text, lp)
        assert float(loss[b]) == pytest.approx(math.log1p(math.exp(bot - top)), rel=1e-9)


def test_top1_exactly_one_is_a_softmax_over_log_odds_up_to_k256():
    for K in (13, 64, 256):
        s = parse_any(f"(M(y1), ExactlyOne(M(y1..y{K})))")
        lf = lift(s.atoms, s.source)
        assert lf is not None and len(lf.top) == 1 and len(lf.bottom) == 1  # one configuration a side: no 2^K
        logps = -torch.rand(5, K, dtype=torch.float64) * 10
        lo = logps - torch.log(-torch.expm1(logps))
        got = PreferenceLoss(f"(M(y1), ExactlyOne(M(y1..y{K})))", reduction="none")(logps=logps)
        torch.testing.assert_close(got, -torch.log_softmax(lo, dim=1)[:, 0], rtol=1e-10, atol=1e-10)


def test_at_most_k_conditioning_equals_its_closed_form_at_k64():
    K, k = 64, 3
    logps = -torch.rand(4, K, dtype=torch.float64) * 3 - 0.5
    got = PreferenceLoss(f"(M(y1), AtMost({k}, M(y1..y{K})))", reduction="none")(logps=logps)
    for b in range(4):
        p = logps[b].exp().tolist()
        odds = [q / (1 - q) for q in p[1:]]
        e = esym_reference(odds)
        top = p[0] * sum(e[:k])  # y1 true: at most k−1 of the others
        bot = (1 - p[0]) * sum(e[: k + 1])
        assert float(got[b]) == pytest.approx(math.log1p(bot / top), rel=1e-9)


def test_each_k_answer_structure_takes_the_evaluation_it_states():
    """Closed-form counts are lifted; other counts and Ranked run the OBDD by levels (values: the tests above)."""
    assert ListwiseTerm(parse_any("(M(y1), ExactlyOne(M(y1..y64)))")).method == "lifted"
    assert ListwiseTerm(parse_any("(M(y1), AtLeast(13, M(y1..y14)))")).method == "lifted"  # e_{n-1}, e_n
    assert ListwiseTerm(parse_any("(M(y1), AtMost(3, M(y1..y64)))")).method == "obdd levels"
    assert ListwiseTerm(parse_any("Ranked(M(y1..y20))")).method == "obdd levels"


@pytest.mark.parametrize(
    "text",
    [
        "(M(y1), AtMost(2, M(y1..y14)))",  # the counting recurrence, through autograd
        "(Ranked(M(y1..y13)), M(y1) | M(y2))",  # the OBDD circuit
        "(M(y1), ExactlyOne(M(y1..y14)))",  # the fused leaves: e_0, e_1
        "(M(y3) & Ref(y2), ExactlyOne(M(y1..y14)))",  # a singleton inside the range: gathered columns
        "(M(y1), AtLeast(13, M(y1..y14)))",  # e_{n-1}, e_n
    ],
)
def test_gradients_match_finite_differences(text):
    K = max(int(a.answer[1:]) for a in parse_any(text).atoms)
    logps = (-torch.rand(2, K, dtype=torch.float64) * 3 - 0.1).requires_grad_()
    ref = (-torch.rand(2, K, dtype=torch.float64) * 3 - 0.1).requires_grad_()
    fn = PreferenceLoss(text, reduction="sum", beta=0.7)
    if "Ref" in text:
        assert torch.autograd.gradcheck(lambda x, r: fn(logps=x, ref_logps=r), (logps, ref))
    else:
        assert torch.autograd.gradcheck(lambda x: fn(logps=x), (logps,))


def test_values_and_gradients_finite_at_the_extremes_and_low_precision_accumulates_in_float32():
    K = 64
    edge = torch.tensor([0.0, -1e-12, -1e-4, -0.69, -5.0, -80.0, -1e3, -1e4])
    logps = edge[torch.randint(0, len(edge), (16, K))]
    for text in [f"(M(y1), ExactlyOne(M(y1..y{K})))", f"(M(y1), AtMost(3, M(y1..y{K})))", "Ranked(M(y1..y20))"]:
        x = logps[:, : max(int(a.answer[1:]) for a in parse_any(text).atoms)].clone().requires_grad_()
        loss = PreferenceLoss(text, beta=0.5)(logps=x)
        loss.backward()
        assert torch.isfinite(loss) and torch.isfinite(x.grad).all(), text
    half = logps.to(torch.bfloat16)
    out = PreferenceLoss(f"(M(y1), ExactlyOne(M(y1..y{K})))", reduction="none")(logps=half)
    assert out.dtype == torch.float32


def test_bad_list_inputs_are_clear_errors():
    fn = PreferenceLoss("(M(y1), ExactlyOne(M(y1..y20)))")
    with pytest.raises(DPALogicError, match=r"\[B, K\]"):
        fn(logps=torch.zeros(4))
    with pytest.raises(DPALogicError, match="K = 10"):
        fn(logps=-torch.ones(4, 10))
    with pytest.raises(DPALogicError, match="K = 21 columns but this loss is over y1 … y20"):
        fn(logps=-torch.ones(4, 21))  # extra answers are a mistake, not silently left out
    with pytest.raises(DPALogicError, match="not y1 … yK"):
        PreferenceLoss("dpo")(logps=-torch.ones(4, 2))
    # NaN log-probs (a diverged model) give a NaN loss, which the training loop stops on, as for pairs
    assert torch.isnan(fn(logps=torch.full((4, 20), float("nan"))))
    with pytest.raises(DPALogicError, match="<= 0"):
        fn(logps=torch.ones(4, 20))
    with pytest.raises(DPALogicError, match="must match"):
        fn(logps=-torch.ones(4, 20), ref_logps=-torch.ones(3, 20))
    with pytest.raises(DPALogicError, match="ref_logps"):
        PreferenceLoss("(M(y1) & Ref(y2), ExactlyOne(M(y1..y20)))")(logps=-torch.ones(2, 20))


def test_truth_table_structures_give_the_same_numbers_compiled_and_vectorized():
    """Up to 12 atoms a structure is a truth table with a compiled module (named inputs run it); [B, K] inputs of one
    with 8 atoms or more run the vectorized evaluator on the CPU. Both must agree, values and gradients."""
    text = "(M(y1), AtMost(2, M(y1..y6)) & Ranked(Ref(y1..y6)))"
    s = Structure.parse(text)
    fn = PreferenceLoss(s, reduction="none")
    logps = (-torch.rand(7, 6, dtype=torch.float64) * 3).requires_grad_()
    ref = (-torch.rand(7, 6, dtype=torch.float64) * 3).requires_grad_()
    vectorized = fn(logps=logps, ref_logps=ref)
    compiled = fn(
        logps={f"M(y{j + 1})": logps[:, j] for j in range(6)} | {f"Ref(y{j + 1})": ref[:, j] for j in range(6)}
    )
    torch.testing.assert_close(vectorized, compiled, rtol=1e-10, atol=1e-10)
    g_vec = torch.autograd.grad(vectorized.sum(), (logps, ref))
    g_comp = torch.autograd.grad(compiled.sum(), (logps, ref))
    for a, b in zip(g_vec, g_comp):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)
    assert fn._list_evaluator is not None  # the [B, K] call did run the evaluator


def test_small_k_triton_kernel_in_the_interpreter(monkeypatch):
    pytest.importorskip("triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    text = "(M(y1), ExactlyOne(M(y1..y4)))"
    logps = -torch.rand(5, 4, dtype=torch.float32) * 4
    a = PreferenceLoss(text, reduction="none", backend="triton")(logps=logps)
    lo = logps.double() - torch.log(-torch.expm1(logps.double()))
    torch.testing.assert_close(a.double(), -torch.log_softmax(lo, 1)[:, 0], rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------------------------------- sizes, derive


def test_circuits_grow_polynomially_in_k():
    sizes = {}
    for K in (16, 32, 64, 128):
        sizes[K] = parse_any(f"(M(y1), AtMost(3, M(y1..y{K})) & Ranked(Ref(y1..y{K})))").sizes()["circuit"]
    # a counting DP times a chain: linear in K for a fixed count (doubling K at most doubles the size, plus slack)
    for K in (32, 64, 128):
        assert sizes[K] <= 2.25 * sizes[K // 2]


def test_derive_prints_a_compact_closed_form_for_k64(capsys):
    assert main(["derive", "(M(y1), ExactlyOne(M(y1..y64)))", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["method"] == "lifted" and out["groups"] == ["M(y2..y64)"]
    assert out["rho"] == "p_1/(e_1(o[M(y2..y64)])*(1 - p_1))"
    assert out["structure"] == "(M(y1), ExactlyOne(M(y1..y64)))" and out["worlds"] == "2^64"
    assert main(["derive", "Ranked(M(y1..y64))", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["method"] == "circuit" and out["circuit_nodes"] < 64 * 64


def test_degenerate_large_structures_are_reported(capsys):
    assert main(["derive", "(M(y1), ExactlyOne(M(y1..y20)) & AtLeast(2, M(y1..y20)))"]) == 2
    assert "degenerate" in capsys.readouterr().err


def test_compile_writes_a_module_for_a_large_structure_torch_and_triton(monkeypatch):
    """Beyond truth tables the OBDD circuit is emitted like any other: the torch twin and the Triton kernel."""
    pytest.importorskip("triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    from dpalogic.compile.codegen import compile_spec, load

    text = "(M(y1), ExactlyOne(M(y1..y13)))"
    mod = load(compile_spec(text, "top1_k13"))
    logps = -torch.rand(6, 13, dtype=torch.float32) * 4 - 1e-3
    lo = logps.double() - torch.log(-torch.expm1(logps.double()))
    expected = -torch.log_softmax(lo, 1)[:, 0]
    for backend in ("torch", "triton"):
        cols = [c.clone().requires_grad_() for c in logps.unbind(1)]
        out = mod.per_pair_loss(*cols, beta=1.0, gamma=0.0, backend=backend)
        torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-5)
        out.sum().backward()
        ref = logps.double().clone().requires_grad_()
        (-torch.log_softmax(ref - torch.log(-torch.expm1(ref)), 1)[:, 0]).sum().backward()
        got = torch.stack([c.grad for c in cols], 1).double()
        torch.testing.assert_close(got, ref.grad, rtol=1e-4, atol=1e-5)


def test_matrix_inputs_name_the_atoms_they_cannot_carry():
    """[B, K] columns are y1 … yK: a structure beyond truth tables that also mentions yw is told to use names."""
    text = "(M(yw), ExactlyOne(M(y1..y13)) & M(yw))"
    with pytest.raises(DPALogicError, match="M\\(yw\\)"):
        PreferenceLoss(text)(logps=-torch.rand(2, 13))


def test_named_inputs_equal_matrix_inputs_and_compile_has_a_stated_limit(capsys):
    text = "(M(y1), AtMost(3, M(y1..y64)))"
    fn = PreferenceLoss(text, reduction="none")
    x = -torch.rand(3, 64, dtype=torch.float64) * 5
    named = fn(logps={f"M(y{j + 1})": x[:, j] for j in range(64)})
    torch.testing.assert_close(named, fn(logps=x), rtol=1e-12, atol=1e-12)
    assert main(["compile", text]) == 2  # 1155 circuit nodes: PreferenceLoss runs it, no module is written
    assert "at most 400" in capsys.readouterr().err


def test_derive_takes_a_link_for_k_answer_structures(capsys):
    assert main(["derive", "(M(y1), ExactlyOne(M(y1..y64)))", "--link", "softplus(margin - z)", "--hp", "margin=0.5",
                 "--json"]) == 0  # fmt: skip
    out = json.loads(capsys.readouterr().out)
    # softplus(m − log ρ) = log(1 + e^m / ρ), ρ = p_1 / ((1 − p_1) e_1)
    assert out["loss"] == "log(e_1(o[M(y2..y64)])*(1 - p_1)*exp(margin)/p_1 + 1)"
    assert out["hyperparameters"] == {"margin": 0.5}
    assert main(["derive", "(M(yl) -> M(yw), M(yw) | M(yl))", "--link", "exp(-z)", "--json"]) == 0
    ccpo = json.loads(capsys.readouterr().out)  # CCPO's structure, another link: the same ρ, not the same loss
    assert "ccpo" in ccpo["equivalent_to"] and ccpo["same_loss_as"] == []
    assert main(["derive", "Ranked(M(y1..y20))", "--link", "exp(-z)", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["loss"] == "1/rho"  # no lifted form: ρ stays a symbol


def test_derive_is_compact_at_every_k(capsys):
    """Counts summed as ranges; a structure over 12 atoms written with constructs prints its lifted form too."""
    assert main(["derive", "(M(y1), AtLeast(2, M(y1..y256)))", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    # ✓: y1 and at least one other (c = 1 … 255); ✗: not y1 and at least two others
    assert out["rho"] == "e_{1..255}(o[M(y2..y256)])*p_1/(e_{2..255}(o[M(y2..y256)])*(1 - p_1))"
    assert main(["derive", "(M(y1), ExactlyOne(M(y1..y12)))", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["rho"] == "p_1/(e_1(o[M(y2..y12)])*(1 - p_1))" and out["method"] == "lifted"
    assert out["worlds"] == "2^12" and out["circuit_nodes"] > 0
    # two groups constrained independently: their sums factor, and the Ref group's factor cancels in ρ
    assert main(["derive", "(M(y1), AtLeast(2, M(y1..y64)) & AtMost(3, Ref(y1..y64)))", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["rho"] == "e_{1..63}(o[M(y2..y64)])*p_1/(e_{2..63}(o[M(y2..y64)])*(1 - p_1))"


def test_review_findings_stay_fixed():
    """From a code review: infix operators take no ranges (M(y1..y2) <-> M(y3) would silently mean "all equal");
    counts with leading zeros; Xor folds bottom-up; −inf log-probs give no NaN; mixed input forms are refused."""
    with pytest.raises(FormulaSyntaxError, match="stands for several atoms"):
        parse_formula("M(y1..y2) <-> M(y3)")
    with pytest.raises(FormulaSyntaxError, match="stands for several atoms"):
        parse_formula("M(y1..y3) & M(y4)")
    e = parse_formula("AtMost(0000001, M(y1..y3))")
    assert isinstance(e, Count) and (e.lo, e.hi) == (0, 1)
    s = parse_any("Xor(M(y1..y256), Ref(y1..y256))")
    assert len(s.bdd) < 4 * 512  # parity of 512 atoms: a few nodes per variable, also while it is built
    x = -torch.rand(2, 13, dtype=torch.float64) * 3
    x[0, 3] = float("-inf")  # an answer masked out
    x[1, :] = float("-inf")
    for text in ["(M(y1), ExactlyOne(M(y1..y13)))", "(M(y1), Exactly(12, M(y1..y13)))", "Ranked(M(y1..y13))"]:
        y = x.clone().requires_grad_()
        loss = PreferenceLoss(text, reduction="none")(logps=y)
        loss.sum().backward()
        assert not torch.isnan(loss).any() and torch.isfinite(y.grad).all(), text
    # row 0 of Exactly(12 of 13) with y4 impossible: the one world left has y1 valid, so the loss is 0
    assert float(PreferenceLoss("(M(y1), Exactly(12, M(y1..y13)))", reduction="none")(logps=x)[0]) == pytest.approx(0)
    with pytest.raises(DPALogicError, match="not both"):
        PreferenceLoss("(M(y1), ExactlyOne(M(y1..y13)))")(x[:, 0], logps=x)


@pytest.mark.parametrize(
    "text",
    [
        "(M(y1), ExactlyOne(M(y1..y14)))",
        "(M(y1) & M(y2), AtMost(1, M(y1..y14)))",
        "(M(y1), AtLeast(13, M(y1..y14)))",
        "(M(y1) ^ M(y2) ^ Ref(y1), ExactlyOne(M(y3..y14)) & (Ref(y2) | M(y1)))",
    ],
)
def test_lifted_sides_by_columns_and_by_matmul_agree(text, monkeypatch):
    """Each side's configurations are summed column by column (few) or by one incidence matmul (many): both give the
    same log ρ and gradients, and a second backward (retain_graph) recomputes what the first one overwrote."""
    import dpalogic.runtime.lifted_eval as lifted_eval

    s = parse_any(text)
    term = ListwiseTerm(s)
    assert term.lifted is not None
    g = torch.Generator().manual_seed(5)
    x = (-torch.rand(4, len(s.atoms), generator=g, dtype=torch.float64) * 5 - 1e-3).requires_grad_()
    results = []
    for threshold in (0, 1000):
        monkeypatch.setattr(lifted_eval, "MATMUL_CONFIGS", threshold)
        value = term.log_ratio(x)
        (g1,) = torch.autograd.grad(value.sum(), x, retain_graph=True)
        (g2,) = torch.autograd.grad(value.sum(), x)
        torch.testing.assert_close(g1, g2, rtol=0, atol=0)
        results.append((value.detach(), g1))
    torch.testing.assert_close(results[0][0], results[1][0], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(results[0][1], results[1][1], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(
    "text",
    [
        "(M(y1), ExactlyOne(M(y1..y14)))",
        "(M(y1) | M(y2), AtMost(1, M(y1..y14)))",
        "(M(y3) & Ref(y2), ExactlyOne(M(y1..y14)))",
        "(M(y1), ExactlyOne(M(y1..y7)) & ExactlyOne(Ref(y1..y7)))",
    ],
)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_fused_terms_equal_the_general_evaluator(text, dtype):
    """Odds-only structures run as one fused term (loss and gradient in one pass): the same values and gradients as
    the general evaluator (log ρ node, then the link), with a margin, at the clamp (log p = 0) and at −inf."""
    K = max(int(a.answer[1:]) for a in parse_any(text).atoms)
    g = torch.Generator().manual_seed(K)
    logps = -torch.rand(3, K, generator=g, dtype=torch.float64) * 6 - 1e-3
    logps[0, 1], logps[1, 2], logps[2, 0] = 0.0, float("-inf"), -1e4
    ref = -torch.rand(3, K, generator=g, dtype=torch.float64) * 6 - 1e-3
    margin = torch.tensor([0.3, -0.2, 0.0], dtype=torch.float64)
    fused = PreferenceLoss(text, reduction="none", beta=0.7, link="softplus(m - z)", m=0.25)
    plain = PreferenceLoss(text, reduction="none", beta=0.7, link="softplus(m - z)", m=0.25)
    assert all(ev.fused for ev in fused._listwise.evals)
    for ev in plain._listwise.evals:
        ev.fused = False
    out = []
    for fn in (fused, plain):
        x = logps.to(dtype).requires_grad_()
        r = ref.to(dtype).requires_grad_()
        kw = {"ref_logps": r} if "Ref" in text else {}
        loss = fn(logps=x, margin=margin.to(dtype), **kw)
        gx, *gr = torch.autograd.grad(loss.sum(), [x, *kw.values()])
        assert torch.isfinite(loss).all() and torch.isfinite(gx).all()
        out.append((loss, gx, *gr))
    tol = {"rtol": 1e-10, "atol": 1e-12} if dtype == torch.float64 else {"rtol": 2e-5, "atol": 1e-6}
    for a, b in zip(*out):
        torch.testing.assert_close(a, b, **tol)
    # margins are data on both paths: no gradient reaches one
    for fn in (fused, plain):
        m = margin.to(dtype).requires_grad_()
        x = logps.to(dtype).requires_grad_()
        kw = {"ref_logps": ref.to(dtype)} if "Ref" in text else {}
        fn(logps=x, margin=m, **kw).sum().backward()
        assert m.grad is None


def test_compile_falls_back_to_the_same_pass_when_it_cannot_compile(monkeypatch):
    """compile=True where torch.compile fails (no C++ compiler, say): one warning, then the eager fused pass, with
    the same values and gradients as compile=False."""
    import dpalogic.runtime.lifted_fused as lifted_fused

    def broken(*args, **kwargs):
        raise RuntimeError("no compiler here")

    monkeypatch.setattr(lifted_fused.torch, "compile", broken)
    monkeypatch.setattr(lifted_fused.Compiled, "failed", False)  # process-wide once it fails: restored after
    text = "(M(y1) | M(y2), AtMost(1, M(y1..y20)))"  # not one against the rest, which never compiles on the CPU
    x = (-torch.rand(5, 20, dtype=torch.float64) * 4 - 1e-3).requires_grad_()
    eager = PreferenceLoss(text, reduction="none", beta=0.5)
    comp = PreferenceLoss(text, reduction="none", beta=0.5, compile=True)
    want = eager(logps=x)
    torch.testing.assert_close(comp(logps=x), want, rtol=0, atol=0)  # the first call runs eagerly, compiling nothing
    with pytest.warns(RuntimeWarning, match="torch.compile failed .*no compiler here"):
        got = comp(logps=x)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    torch.testing.assert_close(torch.autograd.grad(got.sum(), x)[0], torch.autograd.grad(want.sum(), x)[0])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warned once: later calls run eagerly in silence
        comp(logps=x)


@pytest.mark.slow
def test_compiled_fused_terms_equal_eager():
    """compile=True (torch.compile of the fused term, where this machine can compile): the same loss and gradients."""
    text = "(M(y1) | M(y2), AtMost(1, M(y1..y20)))"  # one against the rest never compiles on the CPU
    x = (-torch.rand(64, 20, dtype=torch.float32) * 6 - 1e-3).requires_grad_()
    x.data[0, 3] = 0.0
    eager = PreferenceLoss(text, reduction="none", beta=0.5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a machine without a compiler falls back (tested above)
        comp = PreferenceLoss(text, reduction="none", beta=0.5, compile=True)
        comp(logps=x)  # eager: fills the plan's caches
        got = comp(logps=x)  # compiled
    want = eager(logps=x)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(torch.autograd.grad(got.sum(), x)[0], torch.autograd.grad(want.sum(), x)[0],
                               rtol=1e-4, atol=1e-6)  # fmt: skip


def test_the_compiled_path_expm1_is_accurate_near_zero():
    """torch.compile lowers expm1 as e^x − 1 on the CPU; the compiled fused term takes its own series instead."""
    from dpalogic.runtime.lifted_fused import _expm1_series

    x = -torch.logspace(-20, 4, 2000, dtype=torch.float64)
    torch.testing.assert_close(_expm1_series(x), torch.expm1(x), rtol=1e-14, atol=0)


def test_compile_is_declined_for_many_fused_terms_and_unused_without_gradients():
    from dpalogic.semantics.listwise_catalog import plackett_luce

    with pytest.warns(RuntimeWarning, match="fused terms, and torch.compile would specialize"):
        many = PreferenceLoss(plackett_luce(14), compile=True)
    assert all(c is None for c in many._listwise.compiled)
    # no gradient wanted (torch.no_grad, or inputs that need none): the general evaluator, no gradient computed
    text = "(M(y1), ExactlyOne(M(y1..y20)))"
    x = -torch.rand(4, 20, dtype=torch.float64) * 3 - 1e-3
    fn = PreferenceLoss(text, reduction="none")
    with torch.no_grad():
        a = fn(logps=x.clone().requires_grad_())
    b = fn(logps=x)
    c = fn(logps=x.clone().requires_grad_())
    torch.testing.assert_close(a, c, rtol=1e-12, atol=0)
    torch.testing.assert_close(b, c, rtol=1e-12, atol=0)
