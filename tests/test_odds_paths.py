"""The K-answer odds paths against independent references: closed forms at 50 digits (mpmath), finite differences,
and each other on hostile rows (log p = 0, −1e4, −inf, one answer far ahead of the rest).

- :func:`shifted_odds`: ``log e_1 = log Σ_j p_j / (1 − p_j)`` over a group and its gradient, for any row;
- the one-against-the-rest pass (top-1 ExactlyOne, each Plackett–Luce stage): ``ρ = o_t / Σ_{j≠t} o_j``;
- the fused term's reductions, in-place backward and second backward.
"""

from __future__ import annotations

import math

import mpmath
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import dpalogic.runtime.lifted_fused as lifted_fused
from dpalogic import PreferenceLoss
from dpalogic.runtime.lifted_eval import LOG_FLOOR, _clamp_bound, shifted_odds

DIGITS = 50
# answers more than 87 nats (float32; 700 in float64) below their row's best count as the smallest normal odds, not
# as subnormal ones (odds_range): their gradients are off by at most this, absolute
GRAD_FLOOR = {torch.float32: 1e-28, torch.float64: 1e-280}


def _mp(v: float, dtype: torch.dtype):
    """A log-prob as the evaluators see it: clamped to [LOG_FLOOR, −√tiny] (p = 1 finite), −inf floored."""
    return mpmath.mpf(min(max(v, LOG_FLOOR), -_clamp_bound(dtype)))


def ref_log_e1_and_grad(row: list[float], group: list[bool], dtype: torch.dtype):
    """``log Σ_{j∈G} o_j`` and its gradient ``o_j / Σ o / (1 − p_j)`` (0 where the clamp holds x), at 50 digits."""
    with mpmath.workdps(DIGITS):
        eps = _clamp_bound(dtype)
        xs = [_mp(v, dtype) for v in row]
        odds = [mpmath.exp(x) / -mpmath.expm1(x) if g else mpmath.mpf(0) for x, g in zip(xs, group)]
        total = mpmath.fsum(odds)
        grad = [
            float(o / total / -mpmath.expm1(x)) if g and v <= -eps and v != -math.inf else 0.0
            for o, x, v, g in zip(odds, xs, row, group)
        ]
        return float(mpmath.log(total)), grad


LOGPS = st.one_of(
    st.floats(-1e4, 0.0),
    st.floats(-40.0, -1e-9),
    st.sampled_from([0.0, -1e-30, -1e-12, -1e-6, -0.5, -25.0, -80.0, -1e4, -math.inf]),
)


@settings(max_examples=150, deadline=None)
@given(
    st.lists(st.tuples(LOGPS, st.booleans()), min_size=1, max_size=9), st.sampled_from([torch.float64, torch.float32])
)
def test_shifted_odds_equal_the_closed_form(cells, dtype):
    row = [v for v, _ in cells]
    group = [g for _, g in cells]
    if not any(g for g in group):
        group[0] = True
    x = torch.tensor([row], dtype=dtype)
    row = x[0].tolist()  # the values as the dtype holds them
    outside = torch.tensor([0.0 if g else -math.inf for g in group], dtype=dtype)
    # out of place (torch.compile's form) and in a buffer (the evaluators'; float32 takes exp2 when no p > 0.95)
    for out in (None, torch.empty_like(x)):
        a, total, s, _ = shifted_odds(x, outside, out=out)
        got = float(total.log()[0, 0] + s[0, 0])
        grad = (a * (1 + a) / total).masked_fill(x > -_clamp_bound(dtype), 0.0)[0].tolist()  # callers zero clamped
        if all(v == -math.inf for v, g in zip(row, group) if g):  # none can be valid: as if floored at LOG_FLOOR
            assert got < -1e29
            n = sum(group)
            assert grad == pytest.approx([1 / n if g else 0.0 for g in group], rel=1e-6, abs=0)
            continue
        want, want_grad = ref_log_e1_and_grad(row, group, dtype)
        rtol = 1e-12 if dtype == torch.float64 else 5e-6
        assert got == pytest.approx(want, rel=rtol, abs=rtol)
        for g_got, g_want in zip(grad, want_grad):
            assert g_got == pytest.approx(g_want, rel=10 * rtol, abs=GRAD_FLOOR[dtype])


TOP1 = "(M(y1), ExactlyOne(M(y1..y{K})))"


def ref_one_against_rest(row: list[float], t: int, beta: float, margin: float, dtype: torch.dtype):
    """``−log σ(β log ρ − margin)`` with ``ρ = o_t / Σ_{j≠t} o_j``, and its gradient, at 50 digits."""
    with mpmath.workdps(DIGITS):
        eps = _clamp_bound(dtype)
        xs = [_mp(v, dtype) for v in row]
        odds = [mpmath.exp(x) / -mpmath.expm1(x) for x in xs]
        rest = mpmath.fsum(o for j, o in enumerate(odds) if j != t)
        z = beta * (mpmath.log(odds[t]) - mpmath.log(rest)) - margin
        loss = mpmath.log1p(mpmath.exp(-z))
        dz = -beta / (1 + mpmath.exp(z))  # d loss / d log ρ, times β
        grad = []
        for j, (x, o, v) in enumerate(zip(xs, odds, row)):
            d = 1 / -mpmath.expm1(x) if j == t else -(o / rest) / -mpmath.expm1(x)
            grad.append(float(dz * d) if v <= -eps and v != -math.inf else 0.0)
        return float(loss), grad


def general_evaluator(text: str, **kwargs) -> PreferenceLoss:
    """The same loss on the general evaluator (a log ρ node, then the link), none of its terms fused."""
    fn = PreferenceLoss(text, **kwargs)
    K = max(int(a.answer[1:]) for a in fn._running_atoms)
    fn(logps=-torch.ones(1, K))  # builds the K-answer evaluator of a truth-table structure (K ≤ 12)
    for ev in (fn._listwise or fn._list_evaluator).evals:
        ev.fused = False
    return fn


def _count_passes(monkeypatch) -> list[str]:
    calls: list[str] = []
    fast, general = lifted_fused.odds_softmax_loss_and_grad, lifted_fused.term_loss_and_grad
    monkeypatch.setattr(lifted_fused, "odds_softmax_loss_and_grad", lambda *a: calls.append("fast") or fast(*a))
    monkeypatch.setattr(lifted_fused, "term_loss_and_grad", lambda *a: calls.append("general") or general(*a))
    return calls


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_one_against_the_rest_equals_the_closed_form_and_takes_its_pass(dtype, monkeypatch):
    K, beta = 9, 0.7  # from 8 answers on, the K-answer evaluator (below, a generated module)
    g = torch.Generator().manual_seed(3)
    x = -torch.rand(8, K, generator=g, dtype=torch.float64) * 30 - 1e-4
    x[0, 0] = 0.0  # p = 1 for the answer conditioned on: clamped, zero gradient
    x[1, 3] = 0.0  # and for one of the rest
    x[2, :] = -1e4 + torch.rand(K, generator=g, dtype=torch.float64)  # every answer impossible but one shifted row
    x[3, 2] = -math.inf  # an answer masked out
    x[4, :] = -1e-7 * torch.arange(1, K + 1, dtype=torch.float64)  # every answer near certain: odds ~1e7
    x[5, 0] = -1e4  # the conditioned answer far behind
    margin = torch.linspace(-0.5, 0.5, 8, dtype=torch.float64)
    calls = _count_passes(monkeypatch)
    fn = PreferenceLoss(TOP1.format(K=K), reduction="none", beta=beta)
    y = x.to(dtype).requires_grad_()
    loss = fn(logps=y, margin=margin.to(dtype))
    (grad,) = torch.autograd.grad(loss.sum(), y)
    assert calls == ["fast"]  # every row above is the one-against-the-rest pass's
    rtol = 1e-11 if dtype == torch.float64 else 3e-5
    for b in range(len(x)):
        row = y[b].tolist()
        want, want_grad = ref_one_against_rest(row, 0, beta, float(margin[b]), dtype)
        assert float(loss[b]) == pytest.approx(want, rel=rtol, abs=rtol), b
        for j in range(K):
            assert float(grad[b, j]) == pytest.approx(want_grad[j], rel=rtol, abs=rtol * 1e-3), (b, j)


def test_one_against_the_rest_matches_finite_differences():
    K = 9
    x = (-torch.rand(4, K, dtype=torch.float64) * 8 - 1e-3).requires_grad_()
    fn = PreferenceLoss(TOP1.format(K=K), reduction="sum", beta=1.3, link="softplus(m - z)", m=0.25)
    assert torch.autograd.gradcheck(lambda v: fn(logps=v), (x,), eps=1e-6, atol=1e-8)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_rows_the_fast_pass_declines_go_to_the_general_pass(dtype, monkeypatch):
    """A conditioned answer ahead of every other by more than ~60 nats (its row's shift would underflow the rest's
    odds) and a row all at −inf go to the general pass, with the general pass's values."""
    K = 9
    g = torch.Generator().manual_seed(9)
    x = -torch.rand(3, K, generator=g, dtype=torch.float64) * 5 - 1e-3
    x[0, 1:] -= 200.0  # y1 200 nats ahead of the rest
    x[1, :] = -math.inf
    calls = _count_passes(monkeypatch)
    fn = PreferenceLoss(TOP1.format(K=K), reduction="none")
    y = x.to(dtype).requires_grad_()
    loss = fn(logps=y)
    (grad,) = torch.autograd.grad(loss.sum(), y)
    assert calls == ["fast", "general"]
    assert torch.isfinite(loss).all() and torch.isfinite(grad).all()
    rtol = 1e-11 if dtype == torch.float64 else 3e-5
    for b in (0, 2):
        want, want_grad = ref_one_against_rest(y[b].tolist(), 0, 1.0, 0.0, dtype)
        assert float(loss[b]) == pytest.approx(want, rel=rtol, abs=rtol)
        want_grad = torch.tensor(want_grad, dtype=torch.float64)
        torch.testing.assert_close(grad[b].double(), want_grad, rtol=rtol, atol=GRAD_FLOOR[dtype])


@pytest.mark.parametrize("text", [TOP1.format(K=14), "(M(y1) | M(y2), AtMost(1, M(y1..y14)))"])
def test_reductions_backward_scaling_and_a_second_backward(text):
    """The fused term reduces itself ('mean' folds 1/B into its gradient) and scales its gradient in place: the same
    numbers as reducing the per-row loss by hand, for any grad_output, and again on a second backward."""
    g = torch.Generator().manual_seed(1)
    x = -torch.rand(6, 14, generator=g, dtype=torch.float64) * 6 - 1e-3  # beyond 12 atoms: _listwise holds it
    per_row = PreferenceLoss(text, reduction="none")
    y = x.clone().requires_grad_()
    rows = per_row(logps=y)
    for reduction, want in (("mean", rows.mean()), ("sum", rows.sum())):
        (want_grad,) = torch.autograd.grad(2.5 * want, y, retain_graph=True)
        fn = PreferenceLoss(text, reduction=reduction)
        v = x.clone().requires_grad_()
        got = fn(logps=v)
        torch.testing.assert_close(got, want, rtol=1e-13, atol=0)
        (g1,) = torch.autograd.grad(2.5 * got, v, retain_graph=True)
        (g2,) = torch.autograd.grad(2.5 * got, v)
        torch.testing.assert_close(g1, want_grad, rtol=1e-12, atol=1e-15)
        torch.testing.assert_close(g2, g1, rtol=0, atol=0)  # recomputed by the same pass, bit for bit
    # per row, a grad_output per row: as the general evaluator's autograd graph (log ρ node, then the link)
    w = torch.linspace(0.5, 2.0, 6, dtype=torch.float64)
    (g_rows,) = torch.autograd.grad((rows * w).sum(), y)
    plain = PreferenceLoss(text, reduction="none")
    for ev in plain._listwise.evals:
        ev.fused = False
    v = x.clone().requires_grad_()
    (want,) = torch.autograd.grad((plain(logps=v) * w).sum(), v)
    torch.testing.assert_close(g_rows, want, rtol=1e-11, atol=1e-15)


@settings(max_examples=80, deadline=None)
@given(st.lists(LOGPS, min_size=9, max_size=9), st.sampled_from([torch.float64, torch.float32]))
def test_top1_rows_of_any_kind_equal_the_closed_form(row, dtype):
    """Whatever a row holds (log p = 0, −1e4, −inf, ties, one answer far ahead), the loss and its gradient are the
    closed form's, whichever pass runs it."""
    x = torch.tensor([row], dtype=dtype, requires_grad=True)
    row = x[0].tolist()
    loss = PreferenceLoss(TOP1.format(K=9), reduction="sum", beta=0.7)(logps=x)
    (grad,) = torch.autograd.grad(loss, x)
    if row[0] == -math.inf or all(v == -math.inf for v in row[1:]):  # ρ = 0 or ∞: floored, as the general evaluator
        plain = general_evaluator(TOP1.format(K=9), reduction="sum", beta=0.7)
        y = x.detach().clone().requires_grad_()
        want = plain(logps=y)
        torch.testing.assert_close(loss, want, rtol=1e-6, atol=0)
        torch.testing.assert_close(grad, torch.autograd.grad(want, y)[0], rtol=1e-6, atol=GRAD_FLOOR[dtype])
        return
    want, want_grad = ref_one_against_rest(row, 0, 0.7, 0.0, dtype)
    rtol = 1e-10 if dtype == torch.float64 else 1e-4
    assert float(loss) == pytest.approx(want, rel=rtol, abs=rtol * max(1.0, abs(min(row))) * 1e-2)
    for j, g in enumerate(grad[0].tolist()):
        assert g == pytest.approx(want_grad[j], rel=rtol, abs=GRAD_FLOOR[dtype]), j


def test_the_fast_pass_checks_values_as_preference_loss_does(monkeypatch):
    """PreferenceLoss leaves the value check to the one-against-the-rest pass (it takes the row maxima anyway): the
    same refusals, with the same message, as the check it skips — also a positive value hidden beside a NaN."""
    from dpalogic.errors import DPALogicError

    calls = _count_passes(monkeypatch)
    fn = PreferenceLoss(TOP1.format(K=9))
    x = -torch.rand(4, 9, dtype=torch.float64) - 0.1
    for value, nan in ((0.5, False), (3.0, True), (0.02, False)):
        bad = x.clone()
        bad[2, 4] = value
        if nan:
            bad[1, 1] = math.nan
        with pytest.raises(DPALogicError, match=f"log-probabilities must be <= 0: logps has {value:g}"):
            fn(logps=bad.requires_grad_())
    ok = x.clone()
    ok[0, 0] = 0.005  # rounding in a log-softmax sum: accepted, as the skipped check accepts it
    assert torch.isfinite(fn(logps=ok.requires_grad_()))
    nan = x.clone()
    nan[3, 3] = math.nan  # a NaN alone passes and gives a NaN loss (the training loop stops on it)
    assert torch.isnan(fn(logps=nan.requires_grad_()))
    assert calls == ["fast"] * 5
    # where the pass does not run (no gradient wanted), PreferenceLoss checks up front: the same message
    with pytest.raises(DPALogicError, match="logps has 0.5"):
        bad = x.clone()
        bad[0, 0] = 0.5
        fn(logps=bad)


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 140), st.integers(1, 5), st.sampled_from([None, "nan", "-inf", "inf"]))
def test_row_max_is_amax(n, b, special):
    """row_max (two overlapping windows, or folded halves, where ATen's row max is slow) is amax, NaN and ±inf
    included."""
    from dpalogic.runtime.lifted_eval import row_max

    x = torch.randn(b, n, dtype=torch.float64)
    if special is not None:
        x[b // 2, (7 * n) // 11] = float(special)
    torch.testing.assert_close(row_max(x), x.amax(1, keepdim=True), rtol=0, atol=0, equal_nan=True)


def test_reciprocal_expm1_fast_and_exact_paths():
    """float32 odds from exp2 (a batch with no answer above p = 0.95) within the rounding of u·log2 e (~u·6e−8
    relative) of 1/expm1(u) in float64; a batch with one takes expm1 itself (a few ulp); float64 is exact."""
    from dpalogic.runtime.lifted_eval import NEAR_ONE, reciprocal_expm1_

    u64 = torch.cat([torch.linspace(NEAR_ONE, 87.0, 50_000, dtype=torch.float64), torch.tensor([0.06, 1.0, 30.0])])
    u = u64.float().view(-1, 1)
    exact_u = u.double().view(-1)  # the float32 inputs, exactly
    want = 1 / torch.expm1(exact_u)
    far = torch.full((len(u), 1), -1.0)  # every row's best answer at log p = −1: the exp2 path
    got = reciprocal_expm1_(u.clone(), far).double().view(-1)
    rel = (got - want).abs() / want
    assert bool((rel <= 2e-6 + 5e-8 * exact_u).all()), float(rel.max())
    assert float(rel.max()) > 1e-7  # it is the exp2 path (expm1 is within a few ulp)
    near = far.clone()
    near[7] = -0.01  # one answer at p = 0.99 anywhere: expm1 for the batch
    got = reciprocal_expm1_(u.clone(), near).double().view(-1)
    assert float(((got - want).abs() / want).max()) < 3e-7
    got = reciprocal_expm1_(exact_u.clone().view(-1, 1), far).view(-1)  # float64: expm1
    torch.testing.assert_close(got, want, rtol=1e-15, atol=0)


STRUCTURES = [TOP1.format(K=9), "(M(y1) | M(y2), AtMost(1, M(y1..y14)))"]


@pytest.mark.parametrize("text", STRUCTURES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_an_empty_batch(text, dtype):
    K = max(int(a.answer[1:]) for a in PreferenceLoss(text)._running_atoms)
    for grad in (True, False):
        for reduction in ("none", "sum", "mean"):
            x = torch.zeros(0, K, dtype=dtype, requires_grad=grad)
            loss = PreferenceLoss(text, reduction=reduction)(logps=x)
            assert loss.shape == ((0,) if reduction == "none" else ())
            if reduction == "sum":
                assert float(loss) == 0.0
            if reduction == "mean":
                assert math.isnan(float(loss))  # as torch's mean of nothing
            if grad and reduction != "mean":
                (g,) = torch.autograd.grad(loss.sum(), x)
                assert g.shape == (0, K)


@pytest.mark.parametrize("text", STRUCTURES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_a_nan_row_leaves_the_other_rows_alone(text, dtype):
    """A NaN gives its own row a NaN loss; the rows beside it keep their values and gradients (answers near p = 1
    and one at p = 1 exactly included: the batch's NaN max must not switch their paths or their clamp mask)."""
    K = max(int(a.answer[1:]) for a in PreferenceLoss(text)._running_atoms)
    g = torch.Generator().manual_seed(2)
    good = -torch.rand(2, K, generator=g, dtype=torch.float64) * 5 - 1e-3
    good[0, 0], good[0, 3], good[0, 5] = -1e-8, -1e-7, 0.0
    good[1, 0], good[1, 1:] = -1.0, good[1, 1:] - (150.0 if dtype == torch.float32 else 900.0)  # far ahead: general
    bad = good[:1].clone()
    bad[0, 2] = math.nan
    fn = PreferenceLoss(text, reduction="none")
    alone = good.to(dtype).requires_grad_()
    both = torch.cat([good, bad]).to(dtype).requires_grad_()
    (g_alone,) = torch.autograd.grad(fn(logps=alone).sum(), alone)
    loss = fn(logps=both)
    (g_both,) = torch.autograd.grad(loss.sum(), both)
    assert math.isnan(float(loss[2]))
    torch.testing.assert_close(loss[:2], fn(logps=alone.detach()), rtol=1e-6, atol=0)
    torch.testing.assert_close(g_both[:2], g_alone, rtol=1e-6, atol=GRAD_FLOOR[dtype])


def test_create_graph_and_a_second_derivative():
    """A gradient penalty elsewhere (create_graph=True) works through the fused term; a second derivative through the
    term itself, which its saved gradient cannot give, is refused rather than silently 0."""
    text = STRUCTURES[0]
    x = (-torch.rand(3, 9, dtype=torch.float64) * 4 - 1e-3).requires_grad_()
    w = torch.tensor(2.0, dtype=torch.float64, requires_grad=True)
    loss = PreferenceLoss(text)(logps=x) + w**2
    gx, gw = torch.autograd.grad(loss, (x, w), create_graph=True)
    (gw**2).backward()
    assert float(w.grad) == pytest.approx(8.0 * 2.0)  # d/dw (2w)^2
    with pytest.raises(RuntimeError, match="does not require grad"):  # no graph through the term's gradient
        gx.sum().backward()
    loss = PreferenceLoss(text)(logps=x) * w  # its grad_output needs a graph: the error names the term
    (gx,) = torch.autograd.grad(loss, x, create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable"):
        gx.sum().backward()


def test_an_input_changed_before_a_second_backward_is_an_error():
    text = STRUCTURES[0]
    x = (-torch.rand(3, 9, dtype=torch.float64) * 4 - 1e-3).requires_grad_()
    y = x * 1.0  # an intermediate, changed in place below
    loss = PreferenceLoss(text)(logps=y)
    torch.autograd.grad(loss, x, retain_graph=True)
    with torch.no_grad():
        y.sub_(1.0)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        torch.autograd.grad(loss, x)


def test_float32_exp2_odds_equal_the_closed_form(monkeypatch):
    """Whole-answer log-probs, none near certain: float32 takes the exp2 odds (a spy says so), within ~u·6e−8 of the
    50-digit closed form."""
    import dpalogic.runtime.lifted_eval as lifted_eval

    paths = []
    real = lifted_eval.reciprocal_expm1_

    def spy(u, m, worst=None):
        fast = u.dtype == torch.float32 and (float(m.max()) if worst is None else worst) <= -lifted_eval.NEAR_ONE
        paths.append("exp2" if fast else "expm1")
        return real(u, m, worst)

    monkeypatch.setattr(lifted_fused, "reciprocal_expm1_", spy)
    g = torch.Generator().manual_seed(4)
    x = -torch.rand(6, 9, generator=g, dtype=torch.float64) * 150 - 1.0
    x[1] -= 2000.0  # a shifted row
    x[2, 0] = -300.0  # the answer conditioned on far behind
    margin = torch.linspace(-0.3, 0.3, 6, dtype=torch.float64)
    y = x.float().requires_grad_()
    loss = PreferenceLoss(TOP1.format(K=9), reduction="none", beta=0.7)(logps=y, margin=margin.float())
    (grad,) = torch.autograd.grad(loss.sum(), y)
    assert paths == ["exp2"]
    for b in range(len(x)):
        want, want_grad = ref_one_against_rest(y[b].tolist(), 0, 0.7, float(margin.float()[b]), torch.float32)
        assert float(loss[b]) == pytest.approx(want, rel=2e-5, abs=2e-5), b
        torch.testing.assert_close(grad[b].double(), torch.tensor(want_grad, dtype=torch.float64), rtol=2e-5,
                                   atol=GRAD_FLOOR[torch.float32])  # fmt: skip


@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
def test_many_fused_terms_as_one_node_equal_one_node_per_term(reduction):
    """Plackett–Luce over 14 answers (13 one-against-the-rest stages, the last one a pair) runs its fused stages as one
    node that adds each stage's gradient into one [B, K] buffer: the same losses and gradients as a node per term,
    with margins, a grad_output that is not 1, and a second backward."""
    from dpalogic.semantics.listwise_catalog import plackett_luce

    g = torch.Generator().manual_seed(6)
    x = -torch.rand(5, 14, generator=g, dtype=torch.float64) * 8 - 1e-3
    x[0, 3] = 0.0
    x[1, 5] = -math.inf
    margin = torch.linspace(-0.4, 0.4, 5, dtype=torch.float64)
    one = PreferenceLoss(plackett_luce(14), reduction=reduction)
    assert one._listwise._runs is not None and sum(r is not None for r in one._listwise._runs) >= 12
    per_term = PreferenceLoss(plackett_luce(14), reduction=reduction)
    per_term._listwise._runs = None
    out = []
    for fn in (one, per_term):
        y = x.clone().requires_grad_()
        loss = fn(logps=y, margin=margin)
        w = (
            torch.linspace(0.5, 1.5, 5, dtype=torch.float64)
            if reduction == "none"
            else torch.tensor(2.5, dtype=y.dtype)
        )
        (g1,) = torch.autograd.grad(loss, y, w, retain_graph=True)
        (g2,) = torch.autograd.grad(loss, y, w)
        torch.testing.assert_close(g1, g2, rtol=0, atol=0)
        out.append((loss.detach(), g1))
    torch.testing.assert_close(out[0][0], out[1][0], rtol=1e-12, atol=0)
    torch.testing.assert_close(out[0][1], out[1][1], rtol=1e-11, atol=1e-300)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_masked_answers_change_nothing_at_any_k(dtype):
    """Answers at −inf (masked out) add nothing: the same two live answers give the same loss whether the list is
    padded to K = 3 (a generated module runs it), 7, 9 (the K-answer evaluator) or 64, and the masked answers get
    no gradient (the module's was NaN before they were floored, as the evaluator floors them); a row with every
    answer masked gives the same value at every K."""
    want = None
    for K in (3, 7, 9, 64):
        x = torch.full((2, K), -math.inf, dtype=dtype)
        x[0, 0], x[0, 1] = -1.0, -2.5
        x.requires_grad_()
        loss = PreferenceLoss(TOP1.format(K=K), reduction="none")(logps=x)
        (grad,) = torch.autograd.grad(loss.sum(), x)
        assert torch.isfinite(loss).all() and torch.isfinite(grad).all(), K
        assert float(grad[:, 2:].abs().max()) <= GRAD_FLOOR[dtype], K
        if want is None:
            want = (loss.detach(), grad[0, :2])
        torch.testing.assert_close(loss.detach(), want[0], rtol=1e-6, atol=0)
        torch.testing.assert_close(grad[0, :2], want[1], rtol=1e-6, atol=0)
    # the closed form: ρ = o_1 / o_2 for the live answers
    o1, o2 = math.exp(-1.0) / -math.expm1(-1.0), math.exp(-2.5) / -math.expm1(-2.5)
    assert float(want[0][0]) == pytest.approx(math.log1p(o2 / o1), rel=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_plackett_luce_stages_at_once_equal_stage_by_stage(dtype, monkeypatch):
    """Plackett–Luce's stages from one reverse cumulative sum of the odds (in the input's dtype, else float64, else
    stage by stage when a rest is too far below its row's best for one shift): the same losses and gradients as each
    stage's own pass, on rows that take each of the three routes."""
    from dpalogic.semantics.listwise_catalog import plackett_luce

    routes = []
    real = lifted_fused._suffix_stages

    def spy(x, ks, *args):
        out = real(x, ks, *args)
        routes.append((args[-2], out is not None))
        return out

    monkeypatch.setattr(lifted_fused, "_suffix_stages", spy)
    g = torch.Generator().manual_seed(8)
    K = 16
    base = -torch.rand(4, K, generator=g, dtype=torch.float64) * 10 - 1e-3
    base[1, 2] = 0.0  # p = 1: clamped
    base[2, 7] = -math.inf  # masked
    batches = {
        "dtype": base,
        "near −1e4": base - 1e4,  # whole-sequence log-probs: float32 keeps its digits (log-odds − the shift first)
        "float64": base - torch.linspace(0, 300, K, dtype=torch.float64),  # rests ~300 nats below the best
        "by stage": base - torch.linspace(0, 3000, K, dtype=torch.float64),  # beyond one shift even in float64
    }
    margin = torch.tensor([0.2, -0.1, 0.0, 0.3], dtype=torch.float64)
    for name, x in batches.items():
        routes.clear()
        out = []
        for batched in (True, False):
            fn = PreferenceLoss(plackett_luce(K), reduction="none", beta=0.8)
            if not batched:
                fn._listwise._stage_groups = lambda terms, device: []
            y = x.to(dtype).requires_grad_()
            loss = fn(logps=y, margin=margin.to(dtype))
            (grad,) = torch.autograd.grad(loss.sum(), y)
            assert torch.isfinite(loss).all() and torch.isfinite(grad).all()
            out.append((loss, grad))
        want = {"dtype": [(dtype, True)], "near −1e4": [(dtype, True)]}.get(
            name, [(dtype, False), (torch.float64, True)]
        )
        if dtype == torch.float64 and name == "float64":
            want = [(torch.float64, True)]
        if name == "by stage":
            want = [(dtype, False)] + ([(torch.float64, False)] if dtype == torch.float32 else [])
        assert routes == want, (name, routes)
        rtol = 1e-10 if dtype == torch.float64 else 2e-5
        torch.testing.assert_close(out[0][0], out[1][0], rtol=rtol, atol=rtol)
        # float32 rounding, on gradients of order 1 (at −1e4 the stage-by-stage pass is the less exact of the two)
        atol = 1e-6 if dtype == torch.float32 else GRAD_FLOOR[dtype] + rtol * 1e-3
        torch.testing.assert_close(out[0][1], out[1][1], rtol=rtol, atol=atol)


def test_a_stage_that_comes_twice():
    """A program may hold the same stage twice (Plackett–Luce plus an extra top-1 term): both stages' gradients
    count, as two separate losses give them."""
    from dataclasses import replace

    from dpalogic.semantics.listwise_catalog import plackett_luce, top1_softmax

    K = 10
    pl, top1 = plackett_luce(K), top1_softmax(K)
    both = replace(pl, terms=pl.terms + top1.terms, name="pl+top1")
    x = -torch.rand(3, K, dtype=torch.float64) * 5 - 1e-3
    y = x.clone().requires_grad_()
    (g,) = torch.autograd.grad(PreferenceLoss(both, reduction="sum")(logps=y), y)
    z = x.clone().requires_grad_()
    want = PreferenceLoss(pl, reduction="sum")(logps=z) + PreferenceLoss(top1, reduction="sum")(logps=z)
    torch.testing.assert_close(g, torch.autograd.grad(want, z)[0], rtol=1e-12, atol=1e-14)
