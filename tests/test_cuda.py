"""The compiled (not interpreted) Triton paths on a CUDA GPU; skipped on machines without one.

Every other test checks the kernels in Triton's CPU interpreter. These run the same checks with the kernels compiled
for the GPU, against float64 references computed on the CPU: every catalog loss's generated kernel through
``PreferenceLoss(backend="triton")`` (values and gradients, float32 and float64 inputs, extreme log-probs), bf16
inputs, and ``FusedLinearPreferenceLoss`` with the fused-path kernels, one pass and token slices, against the
full-logits reference and Liger-Kernel. Each check is a function of the device, so the same code can be exercised on
the CPU under ``TRITON_INTERPRET=1`` when these tests are edited.
"""

from __future__ import annotations

import pytest
import torch
from test_codegen import hp_for, inputs
from test_fused import full_logits_reference, fused_and_liger, liger_case, make

from dpalogic import FusedLinearPreferenceLoss, PreferenceLoss
from dpalogic.semantics.catalog import entries

pytest.importorskip("triton")

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture
def compiled_mode(monkeypatch):
    """Kernels compiled for the GPU: the generated modules are loaded (once per mode) without the interpreter."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)


def per_pair_values_and_grads(loss: PreferenceLoss, lp: dict, lens: dict, device: str, dtype: torch.dtype):
    leaves = {k: v.detach().to(device=device, dtype=dtype).clone().requires_grad_() for k, v in lp.items()}
    out = loss.per_pair(leaves, {k: v.to(device) for k, v in lens.items()})
    if not out.requires_grad:
        return out.detach().cpu().double(), {k: torch.zeros(v.shape, dtype=torch.float64) for k, v in leaves.items()}
    grads = torch.autograd.grad(out.sum(), list(leaves.values()), allow_unused=True)
    return out.detach().cpu().double(), {
        k: (torch.zeros(v.shape, dtype=torch.float64) if g is None else g.cpu().double())
        for (k, v), g in zip(leaves.items(), grads)
    }


def check_catalog_kernel(name: str, device: str) -> None:
    """The generated kernel of one catalog loss on ``device`` vs the torch evaluation in float64 on the CPU."""
    program = entries()[name].program
    hp = hp_for(name)
    answers = sorted({a.answer for a in program.atoms})
    lp, lens = inputs(program.atoms, answers, B=257, seed=5)  # 257: a partial block
    want_v, want_g = per_pair_values_and_grads(
        PreferenceLoss(program, reduction="none", backend="torch", **hp), lp, lens, "cpu", torch.float64
    )
    tri = PreferenceLoss(program, reduction="none", backend="triton", **hp)
    # float64: the kernels' float arguments (hyperparameters) are float32 on the compiled path
    for dtype, rtol, atol in ((torch.float32, 2e-5, 1e-5), (torch.float64, 1e-6, 1e-7)):
        got_v, got_g = per_pair_values_and_grads(tri, lp, lens, device, dtype)
        ok = torch.isfinite(want_v)
        torch.testing.assert_close(got_v[ok], want_v[ok], rtol=rtol, atol=atol, msg=f"{name} {dtype}: loss")
        for k in want_g:
            torch.testing.assert_close(
                got_g[k][ok], want_g[k][ok], rtol=rtol, atol=atol, msg=f"{name} {dtype}: d loss / d {k}"
            )


def check_fused(spec: str, device: str, dtype: torch.dtype, max_tokens: int | None) -> None:
    """The fused path with the Triton kernels on ``device`` vs the float64 full-logits reference on the CPU."""
    uses_ref = spec == "dpo"
    hidden, weight, bias, labels, extra = make(B=3, T=47, H=31, V=123, seed=31, ref=uses_ref)
    labels[1] = -100  # a chosen answer without tokens
    dev = [t.to(device=device, dtype=dtype).clone().requires_grad_() for t in (hidden, weight, bias)]
    dev_extra = {k: v.to(device=device, dtype=dtype) for k, v in extra.items()}
    fused = FusedLinearPreferenceLoss(spec, backend="triton", chunk_size=2, max_chunk_tokens=max_tokens)
    loss, metrics = fused(dev[0], dev[1], labels.to(device), dev[2], **dev_extra)
    loss.backward()
    ref = [t.clone().requires_grad_() for t in (hidden, weight, bias)]
    want = full_logits_reference(spec, *ref, labels, **extra)
    want.backward()
    tol = {torch.float64: (1e-9, 1e-12), torch.float32: (2e-5, 1e-6)}.get(dtype)
    if tol is None:  # bf16 inputs: the loss is float32; the gradients are bf16
        assert loss.dtype == torch.float32 and all(x.grad.dtype == torch.bfloat16 for x in dev)
        assert loss.item() == pytest.approx(want.item(), rel=3e-2)
        for x, r in zip(dev, ref):
            cos = torch.nn.functional.cosine_similarity(x.grad.double().cpu().flatten(), r.grad.flatten(), dim=0)
            assert cos > 0.99
        return
    assert loss.item() == pytest.approx(want.item(), rel=tol[0])
    for what, x, r in zip(("hidden", "weight", "bias"), dev, ref):
        torch.testing.assert_close(x.grad.cpu().double(), r.grad, rtol=tol[0], atol=tol[1], msg=what)
    assert metrics["chosen_logps"][1].item() == 0.0


@requires_cuda
@pytest.mark.parametrize("name", sorted(n for n, e in entries().items() if e.program is not None))
def test_generated_kernels_compiled(compiled_mode, name):
    check_catalog_kernel(name, "cuda")


@requires_cuda
@pytest.mark.parametrize("spec", ["dpo", "orpo", "simpo", "cpo"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("max_tokens", [None, 20])
def test_fused_kernels_compiled(compiled_mode, spec, dtype, max_tokens):
    check_fused(spec, "cuda", dtype, max_tokens)


@requires_cuda
@pytest.mark.parametrize("name", ["dpo", "orpo", "simpo", "cpo"])
def test_fused_matches_liger_on_cuda(compiled_mode, name):
    pytest.importorskip("liger_kernel")
    liger, uses_ref = liger_case(name)
    B, T, H, V = 2, 64, 64, 1000
    hidden, weight, bias, labels, extra = make(B=B, T=T, H=H, V=V, seed=32, dtype=torch.float32, ref=uses_ref)
    labels[:B] = torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(33))  # equal chosen lengths
    labels[:B, :4] = -100
    loss, _, ours, out, theirs = fused_and_liger(name, liger, uses_ref, hidden, weight, bias, labels, extra, "cuda")
    assert loss.item() == pytest.approx(out[0].item(), rel=1e-4)
    for a, b, what in zip(ours, theirs, ("hidden", "weight", "bias")):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-3, atol=1e-5, msg=what)
