"""The vocabulary-wide work of the fused LM-head loss on one float32 logits buffer.

:mod:`dpalogic.runtime.fused` walks the batch chunk by chunk and owns the loss; this module does what happens to each
chunk's ``[rows, V]`` buffer (steps 1, 2 and 4 of that module's description): the LM-head matmul into it, the label
log-probs and ``logsumexp`` read from it in place, its conversion into ``∂loss/∂logits`` and the ``∂h``/``∂W``/``∂b``
matmuls, and the two-pass variants for token slices when one chunk does not fit the buffer. :func:`sequence_logps`
(the reference model's log-probs, no gradients) is built from the same pieces.
"""

from __future__ import annotations

import torch
from torch import Tensor


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """The accumulation dtype: float64 stays float64, everything else is accumulated in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


# torch.mm/addmm(..., out_dtype=torch.float32) on bfloat16/float16 inputs: the tensor-core product accumulated and
# written in float32, with no rounding to the inputs' dtype in between (CUDA only, torch ≥ 2.8)
_MM_OUT_DTYPE = torch.__version__ >= "2.8"


def fp32_out_matmul(a: torch.Tensor) -> bool:
    """Whether a matmul of low-precision ``a`` can write float32 directly (``out_dtype``)."""
    return _MM_OUT_DTYPE and a.is_cuda and a.dtype in (torch.float16, torch.bfloat16)


def chunk_logits(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, buf: torch.Tensor) -> torch.Tensor:
    """``h @ Wᵀ + b`` into the accumulation-dtype buffer ``buf``.

    float32/float64 inputs: one (add)mm into the buffer. bfloat16/float16 inputs on CUDA: the tensor-core product
    written to the float32 buffer directly; elsewhere computed in the input dtype, then copied into the buffer.
    """
    if h.dtype == buf.dtype:
        if bias is None:
            return torch.mm(h, weight.t(), out=buf)
        return torch.addmm(bias, h, weight.t(), out=buf)
    if fp32_out_matmul(h):
        torch.mm(h, weight.t(), out_dtype=buf.dtype, out=buf)
        if bias is not None:
            buf.add_(bias)
        return buf
    logits = h @ weight.t()
    if bias is not None:
        logits += bias
    buf.copy_(logits)  # the low-precision logits die here: one float32 buffer is what stays alive
    return buf


def token_logps_inplace(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Token log-probs at ``labels``, the row sums of ``exp(logits − max)`` and ``logsumexp``.

    Leaves ``exp(logits − max)`` in ``logits``: everything is in place on the float32 buffer, no second
    vocabulary-sized tensor is allocated.
    """
    label_logit = logits.gather(1, labels[:, None]).squeeze(1)
    mx = logits.amax(dim=1)
    logits.sub_(mx[:, None]).exp_()
    total = logits.sum(dim=1)
    lse = mx + total.log()
    return label_logit - lse, total, lse


def sequence_logps(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    ignore_index: int = -100,
    chunk_rows: int = 2,
    max_chunk_tokens: int | None = None,
    use_triton: bool = False,
    token_weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed label log-probs ``[N]`` and token counts ``[N]`` of every row of ``hidden [N, T, H]``, no gradients.

    With ``token_weights [N, T]`` the sums are weighted, ``Σ_t w_t log π(y_t)``, and the counts are ``Σ_t w_t``
    (over non-ignored labels). Used for the reference model. The token rows are processed ``chunk_rows·T`` at a time (at most
    ``max_chunk_tokens``) in one float32 logits buffer. With ``use_triton`` the label log-probs come from
    :func:`dpalogic.runtime.fused_kernels.label_logprobs` (the buffer is only read), otherwise from in-place torch ops.
    """
    N, T, H = hidden.shape
    valid = labels != ignore_index
    flat_h = hidden.reshape(N * T, H)
    flat_labels = labels.reshape(N * T)
    safe = torch.where(valid, labels, 0).reshape(N * T)
    acc = acc_dtype(hidden.dtype)
    tok = torch.zeros(N * T, dtype=acc, device=hidden.device)
    step = max(1, min(N * T, chunk_rows * T, max_chunk_tokens or N * T))
    buf = torch.empty(step, weight.shape[0], dtype=acc, device=hidden.device)
    with torch.no_grad():
        for a in range(0, N * T, step):
            b = min(N * T, a + step)
            logits = chunk_logits(flat_h[a:b], weight, bias, buf[: b - a])
            if use_triton:
                from dpalogic.runtime import fused_kernels

                tok[a:b] = fused_kernels.label_logprobs(logits, flat_labels[a:b].contiguous(), ignore_index)[1]
            else:
                tok[a:b] = token_logps_inplace(logits, safe[a:b])[0]
    if token_weights is not None:
        w = token_weights.to(acc) * valid
        return (tok.view(N, T) * w).sum(1), w.sum(1)
    return (tok.view(N, T) * valid).sum(1), valid.sum(1)


def logps_phase(
    logits: Tensor, lbl: Tensor, raw: Tensor, ignore_index: int, use_triton: bool
) -> tuple[Tensor, Tensor, Tensor | None]:
    """Token log-probs and ``logsumexp`` of a logits buffer (and, on the torch path, the row sums of
    ``exp(logit − max)`` the buffer is left holding; the Triton kernel leaves the raw logits and returns None)."""
    if use_triton:  # imported here: the torch path never imports triton
        from dpalogic.runtime import fused_kernels

        lse, tok = fused_kernels.label_logprobs(logits, raw, ignore_index)
        return tok, lse, None
    tok, total, lse = token_logps_inplace(logits, lbl)
    return tok, lse, total


def grad_phase(
    logits: Tensor,
    lbl: Tensor,
    raw: Tensor,
    lse: Tensor,
    total: Tensor | None,
    coef: Tensor,
    ignore_index: int,
    use_triton: bool,
) -> None:
    """Turn the buffer into ``∂loss/∂logits = c_t · (onehot(label) − softmax)``, in place.

    The buffer holds the raw logits (Triton path, or a recomputed slice: ``total`` is None) or ``exp(logit − max)``
    with row sums ``total`` (torch path, one pass).
    """
    if use_triton:
        from dpalogic.runtime import fused_kernels

        fused_kernels.logprob_grad_inplace(logits, raw, lse, coef.contiguous(), ignore_index)
        return
    if total is None:  # raw logits → softmax = exp(logit − logsumexp) → −c·softmax
        logits.sub_(lse[:, None]).exp_().mul_(-coef[:, None])
    else:  # exp(logit − max) → softmax → −c·softmax
        logits.mul_((-coef / total)[:, None])
    logits.scatter_add_(1, lbl[:, None], coef[:, None])


class GradAccumulators:
    """The gradient accumulators of the hidden states, the weight and the bias, fed one ∂logits buffer at a time."""

    def __init__(self, weight: Tensor, grad_h: Tensor | None, grad_w: Tensor | None, grad_b: Tensor | None) -> None:
        self.weight, self.grad_h, self.grad_w, self.grad_b = weight, grad_h, grad_w, grad_b

    def add(self, dlogits: Tensor, h: Tensor) -> Tensor | None:
        """``∂W += Gᵀ h`` and ``∂b += Σ G``; returns ``∂h = G W`` for these rows (None if not needed)."""
        G = dlogits if h.dtype == dlogits.dtype else dlogits.to(h.dtype)
        gh = G @ self.weight if self.grad_h is not None else None
        if self.grad_w is not None:  # accumulated in float32/64
            if G is not dlogits and fp32_out_matmul(G):  # bf16 tensor cores, float32 accumulation and output
                torch.addmm(self.grad_w, G.t(), h, out_dtype=torch.float32, out=self.grad_w)
            else:  # float32/64 inputs, or low precision off CUDA: the float32 buffer times h in float32
                self.grad_w.addmm_(dlogits.t(), h if h.dtype == dlogits.dtype else h.to(dlogits.dtype))
        if self.grad_b is not None:
            self.grad_b += dlogits.sum(0)
        return gh


def sliced_logps(
    h: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    buf: Tensor,
    lbl: Tensor,
    raw: Tensor,
    slices: list[tuple[int, int]],
    ignore_index: int,
    use_triton: bool,
) -> tuple[Tensor, Tensor, Tensor | None, Tensor]:
    """Pass 1 over token slices that do not fit the buffer together: per-row label log-probs and logsumexps."""
    rows = h.shape[0]
    tok = torch.empty(rows, dtype=buf.dtype, device=h.device)
    lse = torch.empty(rows, dtype=buf.dtype, device=h.device)
    total = logits = None
    for a, z in slices:
        logits = chunk_logits(h[a:z], weight, bias, buf[: z - a])
        tok[a:z], lse[a:z], total = logps_phase(logits, lbl[a:z], raw[a:z], ignore_index, use_triton)
    return tok, lse, total, logits


def sliced_grads(
    grads: GradAccumulators,
    logits: Tensor,
    h: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    buf: Tensor,
    lbl: Tensor,
    raw: Tensor,
    lse: Tensor,
    total: Tensor | None,
    coef: Tensor,
    slices: list[tuple[int, int]],
    ignore_index: int,
    use_triton: bool,
) -> Tensor | None:
    """Pass 2: each slice's logits again (the last one is still in the buffer: it goes first, without a matmul),
    turned into ∂logits in place, then into ∂h and ∂W; returns ∂h of the chunk's rows (None when not needed)."""
    gh = torch.empty_like(h) if grads.grad_h is not None else None
    for i, (a, z) in enumerate(reversed(slices)):
        if i:
            logits = chunk_logits(h[a:z], weight, bias, buf[: z - a])
        last = total if i == 0 else None
        grad_phase(logits, lbl[a:z], raw[a:z], lse[a:z], last, coef[a:z], ignore_index, use_triton)
        gh_slice = grads.add(logits, h[a:z])
        if gh is not None:
            gh[a:z] = gh_slice
    return gh
