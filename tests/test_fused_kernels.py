"""The fused LM-head Triton kernels (dpalogic/runtime/fused_kernels.py), run in Triton's CPU interpreter.

The kernels' logsumexp, label log-probs and in-place gradient are checked against torch.logsumexp / log_softmax and
autograd in float64 (odd shapes, vocabulary tiles narrower than V, extreme logits, ignored rows), and
FusedLinearPreferenceLoss(backend="triton") against backend="torch" and a plain full-logits reference for DPO, ORPO
and SimPO: loss, metrics and the gradients of hidden, weight and bias. Interpret mode follows tests/test_codegen.py:
a fixture sets TRITON_INTERPRET=1, and the kernels are wrapped by triton.jit on first use in that mode.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from test_fused import full_logits_reference, make

from dpalogic import DPALogicError, FusedLinearPreferenceLoss
from dpalogic.runtime import backend as backend_module

pytest.importorskip("triton")

from dpalogic.runtime import fused_kernels  # noqa: E402 - after the skip: the module's kernels need triton

IGNORE = -100


@pytest.fixture
def interpret(monkeypatch):
    """Triton's CPU interpreter (as in tests/test_codegen.py): kernels wrapped now run interpreted."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")


def reference(logits: torch.Tensor, labels: torch.Tensor, coef: torch.Tensor, ignore_index: int = IGNORE):
    """Independent float64 reference: logsumexp, label log-probs (0 if ignored), ∂(Σ coef·logp)/∂logits by autograd."""
    x = logits.detach().double().requires_grad_()
    valid = labels != ignore_index
    logp = torch.log_softmax(x, dim=-1).gather(1, torch.where(valid, labels, 0)[:, None]).squeeze(1) * valid
    (logp * coef.double()).sum().backward()
    return torch.logsumexp(x.detach(), dim=-1), logp.detach(), x.grad


def run_kernels(logits: torch.Tensor, labels: torch.Tensor, coef: torch.Tensor, block_v: int | None):
    buf = logits.clone()
    lse, logp = fused_kernels.label_logprobs(buf, labels, IGNORE, block_v=block_v)
    torch.testing.assert_close(buf, logits, rtol=0, atol=0, equal_nan=True, msg="phase 1 must only read the buffer")
    out = fused_kernels.logprob_grad_inplace(buf, labels, lse, coef.to(buf.dtype), IGNORE, block_v=block_v)
    assert out.data_ptr() == buf.data_ptr(), "phase 2 writes the gradient into the caller's buffer"
    return lse, logp, buf


def check(logits, labels, coef, block_v, rtol, atol):
    lse, logp, grad = run_kernels(logits, labels, coef, block_v)
    want_lse, want_logp, want_grad = reference(logits, labels, coef)
    assert lse.dtype == logp.dtype == grad.dtype == logits.dtype
    torch.testing.assert_close(lse.double(), want_lse, rtol=rtol, atol=atol, msg="logsumexp")
    torch.testing.assert_close(logp.double(), want_logp, rtol=rtol, atol=atol, msg="label log-prob")
    torch.testing.assert_close(grad.double(), want_grad, rtol=rtol, atol=atol, msg="in-place gradient")
    ignored = labels == IGNORE
    assert torch.all(logp[ignored] == 0) and torch.all(grad[ignored] == 0), "ignored rows: log-prob 0, no gradient"
    return lse, logp, grad


# --------------------------------------------------------------------------------------------------- the kernels


@pytest.mark.parametrize(
    "rows,V,block_v",
    [
        (5, 123, 32),  # 4 tiles, the last one 27 wide: online max/sum across tiles and the column mask
        (3, 64, 16),  # V a multiple of the tile: no partial tile
        (4, 7, 16),  # V narrower than one tile
        (2, 1, 1),  # a one-token vocabulary: log-prob 0, gradient 0
        (5, 123, None),  # the default tile (one power-of-two tile here)
    ],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_kernels_match_log_softmax_and_autograd(interpret, rows, V, block_v, dtype):
    g = torch.Generator().manual_seed(rows * 1000 + V)
    logits = (torch.randn(rows, V, generator=g, dtype=torch.float64) * 4).to(dtype)
    labels = torch.randint(0, V, (rows,), generator=g)
    labels[0] = V - 1  # the last column: in the partial tile where there is one
    labels[1 % rows] = IGNORE if rows > 2 else labels[1 % rows]
    coef = torch.randn(rows, generator=g, dtype=torch.float64)
    tol = dict(rtol=1e-12, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-6)
    check(logits, labels, coef, block_v, **tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_extreme_logits_are_stable(interpret, dtype):
    V = 123
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(7, V, generator=g, dtype=torch.float64)
    logits[0] = 1e4  # all equal and huge: log-prob −log V, softmax uniform
    logits[1] = -1e4  # all equal and very negative (exp(−1e4) underflows without the max)
    logits[2] = -1e4
    logits[2, 100] = 1e4  # the max only in the last tile, after tiles of −1e4: the running sum must be rescaled
    logits[3] = 1e4
    logits[3, 5] = -1e4  # the label at the minimum: log-prob −2e4
    logits[4, ::2], logits[4, 1::2] = 1e4, -1e4  # alternating extremes
    logits[5, 0] = 1e4  # one huge logit in the first tile, ordinary ones later
    logits[6] = 0.0
    logits[6, 64] = 3e4  # exp(3e4) overflows even float64 without the max
    logits = logits.to(dtype)
    labels = torch.tensor([17, 0, 100, 5, 3, 50, 64])
    coef = torch.linspace(-2.0, 2.0, 7, dtype=torch.float64)
    # float32 at |x| = 1e4 has a spacing of 1e-3: the logsumexp's last rounding is worth ~5e-4 absolute
    tol = dict(rtol=1e-12, atol=1e-9) if dtype == torch.float64 else dict(rtol=1e-6, atol=2e-3)
    lse, logp, grad = check(logits, labels, coef, 32, **tol)
    assert torch.isfinite(lse).all() and torch.isfinite(logp).all() and torch.isfinite(grad).all()
    assert logp[3].item() == pytest.approx(-2e4 - math.log(V - 1), rel=1e-7)  # the other 122 logits hold the mass
    assert logp[2].item() == pytest.approx(0.0, abs=1e-3) and logp[6].item() == pytest.approx(0.0, abs=1e-3)


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # numpy on the inf/NaN row
def test_all_rows_ignored_and_other_ignore_index(interpret):
    logits = torch.randn(3, 40, generator=torch.Generator().manual_seed(4))
    labels = torch.full((3,), IGNORE)
    lse, logp, grad = run_kernels(logits, labels, torch.ones(3), 16)
    assert torch.all(logp == 0) and torch.all(grad == 0)
    torch.testing.assert_close(lse, torch.logsumexp(logits, -1))
    # an ignored row's logits do not matter, even non-finite ones (e.g. an overflowed padding position)
    bad = logits.clone()
    bad[1, 3], bad[2, 30] = float("nan"), float("inf")
    _, logp, grad = run_kernels(bad, labels, torch.full((3,), 2.0), 16)
    assert torch.all(logp == 0) and torch.all(grad == 0)
    # a non-default ignore_index (here 0, a valid token id elsewhere) and int32 labels
    labels = torch.tensor([0, 7, 39], dtype=torch.int32)
    buf = logits.clone()
    lse, logp = fused_kernels.label_logprobs(buf, labels, 0, block_v=16)
    fused_kernels.logprob_grad_inplace(buf, labels, lse, torch.ones(3), 0, block_v=16)
    _, want_logp, want_grad = reference(logits, labels.long(), torch.ones(3), ignore_index=0)
    torch.testing.assert_close(logp.double(), want_logp, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(buf.double(), want_grad, rtol=1e-5, atol=1e-6)
    assert torch.all(buf[0] == 0)


@settings(max_examples=12, deadline=None)
@given(
    rows=st.integers(1, 4),
    V=st.integers(1, 70),
    log2_block=st.integers(0, 6),
    scale=st.sampled_from([1e-3, 1.0, 30.0, 1e3]),
    seed=st.integers(0, 2**16),
)
def test_kernels_random_shapes(rows, V, log2_block, scale, seed):
    # hypothesis re-runs the body without fixtures: set interpret mode with a context manager instead
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TRITON_INTERPRET", "1")
        g = torch.Generator().manual_seed(seed)
        logits = torch.randn(rows, V, generator=g, dtype=torch.float64) * scale
        labels = torch.randint(0, V, (rows,), generator=g)
        labels[torch.rand(rows, generator=g) < 0.3] = IGNORE
        coef = torch.randn(rows, generator=g, dtype=torch.float64)
        check(logits, labels, coef, 1 << log2_block, rtol=1e-10, atol=1e-10)


def test_kernels_when_triton_is_first_imported_in_interpret_mode():
    # the other import order than this process's (where triton may be imported before the fixture sets the
    # variable): a fresh interpreter with TRITON_INTERPRET=1 before anything imports triton
    code = textwrap.dedent(
        """
        import torch
        from dpalogic.runtime import fused_kernels
        x = torch.randn(3, 45, dtype=torch.float64) * 10
        y = torch.tensor([44, -100, 0])
        lse, logp = fused_kernels.label_logprobs(x.clone(), y, block_v=16)
        want = torch.log_softmax(x, -1)
        assert torch.allclose(lse, torch.logsumexp(x, -1)), lse
        assert torch.allclose(logp, torch.stack([want[0, 44], torch.zeros((), dtype=x.dtype), want[2, 0]])), logp
        print("ok")
        """
    )
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]


def test_kernel_input_errors(interpret):
    x = torch.zeros(3, 10)
    lab = torch.zeros(3, dtype=torch.long)
    with pytest.raises(DPALogicError, match="float32"):
        fused_kernels.label_logprobs(x.bfloat16(), lab)
    with pytest.raises(DPALogicError, match="power of two"):
        fused_kernels.label_logprobs(x, lab, block_v=24)
    with pytest.raises(DPALogicError, match="labels must be a contiguous"):
        fused_kernels.label_logprobs(x, lab[:2])
    with pytest.raises(DPALogicError, match="integer token ids"):
        fused_kernels.label_logprobs(x, lab.float())
    with pytest.raises(DPALogicError, match="contiguous rows"):
        fused_kernels.label_logprobs(x.t(), torch.zeros(10, dtype=torch.long))
    lse, _ = fused_kernels.label_logprobs(x, lab)
    with pytest.raises(DPALogicError, match="buffer's dtype"):
        fused_kernels.logprob_grad_inplace(x, lab, lse, torch.ones(3, dtype=torch.float64))
    # no rows: nothing to launch
    lse, logp = fused_kernels.label_logprobs(torch.zeros(0, 10), torch.zeros(0, dtype=torch.long))
    assert lse.shape == logp.shape == (0,)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the compiled kernels need a GPU")
def test_compiled_kernels_on_cuda(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    g = torch.Generator().manual_seed(5)
    logits = (torch.randn(64, 32000 + 17, generator=g) * 5).cuda()
    logits[3, 7] = 1e4
    labels = torch.randint(0, logits.shape[1], (64,), generator=g).cuda()
    labels[::5] = IGNORE
    coef = torch.randn(64, generator=g).cuda()
    lse, logp, grad = run_kernels(logits, labels, coef, None)
    want_lse, want_logp, want_grad = reference(logits, labels, coef)
    torch.testing.assert_close(lse.double(), want_lse, rtol=1e-5, atol=1e-3)
    torch.testing.assert_close(logp.double(), want_logp, rtol=1e-5, atol=1e-3)
    torch.testing.assert_close(grad.double(), want_grad, rtol=1e-4, atol=1e-6)


# --------------------------------------------------------------------------------------------------- the fused loss


class Spy:
    """Counts calls into the kernels' launchers, so a test knows which path actually ran."""

    def __init__(self, monkeypatch):
        self.calls = {"label_logprobs": 0, "logprob_grad_inplace": 0}
        for name in self.calls:
            real = getattr(fused_kernels, name)

            def wrapped(*args, _real=real, _name=name, **kwargs):
                self.calls[_name] += 1
                return _real(*args, **kwargs)

            monkeypatch.setattr(fused_kernels, name, wrapped)


def fused_run(spec, data, backend, chunk_size, hp, max_chunk_tokens=None):
    hidden, weight, bias, labels, extra = data
    leaves = [t.clone().requires_grad_() for t in (hidden, weight, bias)]
    module = FusedLinearPreferenceLoss(
        spec, backend=backend, chunk_size=chunk_size, max_chunk_tokens=max_chunk_tokens, **hp
    )
    loss, metrics = module(leaves[0], leaves[1], labels, leaves[2], **extra)
    loss.backward()
    return loss.detach(), metrics, [x.grad for x in leaves]


@pytest.mark.parametrize("spec", ["dpo", "orpo", "simpo"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_fused_triton_matches_torch_and_full_logits(interpret, monkeypatch, spec, dtype):
    monkeypatch.setattr(fused_kernels, "MAX_BLOCK_V", 32)  # V = 97: three full tiles and a partial one
    spy = Spy(monkeypatch)
    data = make(B=2, T=7, H=16, V=97, seed=11, dtype=dtype, ref=spec == "dpo")
    data[3][1] = IGNORE  # a chosen answer without tokens: log-prob 0, no gradient
    chunk_size = 1 if dtype == torch.float64 else 2
    hp = {"beta": 0.3} if spec == "dpo" else {}
    loss_t, m_t, g_t = fused_run(spec, data, "triton", chunk_size, hp)
    chunks = 2 // chunk_size
    ref_chunks = chunks if spec == "dpo" else 0  # the reference model's log-probs also come from the kernel
    assert spy.calls == {"label_logprobs": chunks + ref_chunks, "logprob_grad_inplace": chunks}
    loss_p, m_p, g_p = fused_run(spec, data, "torch", chunk_size, hp)
    assert spy.calls["logprob_grad_inplace"] == chunks, "backend='torch' must not run the kernels"

    hidden, weight, bias, labels, extra = data
    leaves = [t.clone().double().requires_grad_() for t in (hidden, weight, bias)]
    extra64 = {k: v.double() for k, v in extra.items()}
    want = full_logits_reference(spec, *leaves, labels, **extra64, **hp)
    want.backward()

    tol = dict(rtol=1e-9, atol=1e-12) if dtype == torch.float64 else dict(rtol=2e-5, atol=1e-6)
    assert loss_t.item() == pytest.approx(want.item(), rel=tol["rtol"])
    assert loss_t.item() == pytest.approx(loss_p.item(), rel=tol["rtol"])
    for what, a, b, ref in zip(("hidden", "weight", "bias"), g_t, g_p, (x.grad for x in leaves)):
        assert a.dtype == dtype
        torch.testing.assert_close(a.double(), ref, **tol, msg=f"triton vs full logits: {what}")
        torch.testing.assert_close(a, b, **tol, msg=f"triton vs torch: {what}")
    for key in ("chosen_logps", "rejected_logps", "chosen_rewards", "margins", "losses"):
        torch.testing.assert_close(m_t[key], m_p[key], **tol, msg=key)
    assert m_t["chosen_logps"][1].item() == 0.0 and g_t[0][1].abs().max().item() == 0.0


@pytest.mark.parametrize("spec", ["dpo", "simpo"])
def test_fused_triton_token_slices(interpret, monkeypatch, spec):
    """max_chunk_tokens below a pair: the kernels run on every slice, in both passes, and agree with torch."""
    monkeypatch.setattr(fused_kernels, "MAX_BLOCK_V", 32)
    spy = Spy(monkeypatch)
    data = make(B=2, T=7, H=16, V=97, seed=14, ref=spec == "dpo")
    loss_t, m_t, g_t = fused_run(spec, data, "triton", 1, {}, max_chunk_tokens=5)
    slices = 2 * -(-14 // 5)  # two pairs of 14 token rows, 3 slices each
    ref_slices = -(-28 // 5) if spec == "dpo" else 0
    assert spy.calls == {"label_logprobs": slices + ref_slices, "logprob_grad_inplace": slices}
    loss_p, m_p, g_p = fused_run(spec, data, "torch", 1, {}, max_chunk_tokens=5)
    hidden, weight, bias, labels, extra = data
    leaves = [t.clone().requires_grad_() for t in (hidden, weight, bias)]
    want = full_logits_reference(spec, *leaves, labels, **extra)
    want.backward()
    assert loss_t.item() == pytest.approx(want.item(), rel=1e-9)
    assert loss_p.item() == pytest.approx(want.item(), rel=1e-9)
    for what, a, b, ref in zip(("hidden", "weight", "bias"), g_t, g_p, (x.grad for x in leaves)):
        torch.testing.assert_close(a, ref, rtol=1e-9, atol=1e-12, msg=f"triton: {what}")
        torch.testing.assert_close(b, ref, rtol=1e-9, atol=1e-12, msg=f"torch: {what}")
    torch.testing.assert_close(m_t["chosen_logps"], m_p["chosen_logps"], rtol=1e-12, atol=1e-12)


def test_fused_triton_bf16_accumulates_in_float32(interpret):
    hidden, weight, bias, labels, _ = make(B=2, T=6, H=16, V=50, seed=12, dtype=torch.float32, ref=False)
    data = tuple(t.bfloat16() for t in (hidden, weight, bias)) + (labels, {})
    loss_t, _, g_t = fused_run("simpo", data, "triton", 1, {})
    loss_p, _, g_p = fused_run("simpo", data, "torch", 1, {})
    assert loss_t.dtype == torch.float32 and all(g.dtype == torch.bfloat16 for g in g_t)
    # the same float32 buffer from the same bf16 matmul: only the kernels' float32 rounding differs
    assert loss_t.item() == pytest.approx(loss_p.item(), rel=1e-5)
    for a, b in zip(g_t, g_p):
        torch.testing.assert_close(a.float(), b.float(), rtol=1e-2, atol=1e-3)


def test_backend_dispatch(monkeypatch):
    spy = Spy(monkeypatch)
    hidden, weight, bias, labels, _ = make(B=1, T=4, H=5, V=11, seed=13, ref=False)
    # auto on CPU tensors is the torch path, even where the interpreter is on
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    FusedLinearPreferenceLoss("simpo")(hidden, weight, labels, bias)
    FusedLinearPreferenceLoss("simpo", backend="torch")(hidden, weight, labels, bias)
    assert sum(spy.calls.values()) == 0
    # triton on the CPU without the interpreter: a clear error, before any work
    monkeypatch.delenv("TRITON_INTERPRET")
    with pytest.raises(DPALogicError, match="TRITON_INTERPRET=1"):
        FusedLinearPreferenceLoss("simpo", backend="triton")(hidden, weight, labels, bias)
    monkeypatch.setattr(backend_module, "triton_installed", lambda: False)
    with pytest.raises(DPALogicError, match="needs the triton package"):
        FusedLinearPreferenceLoss("simpo", backend="triton")(hidden, weight, labels, bias)
    assert not backend_module.use_triton("auto", hidden)  # auto without triton: torch, no error
    with pytest.raises(DPALogicError, match="backend must be"):
        FusedLinearPreferenceLoss("simpo", backend="cuda")
