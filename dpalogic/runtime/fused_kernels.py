"""Triton kernels for the fused LM-head path: label log-probs and ``∂ log p(label) / ∂ logits`` on one logits buffer.

:class:`~dpalogic.runtime.fused.FusedLinearPreferenceLoss` computes one chunk's logits ``[rows, V]`` into a float32 (float64
for float64 inputs) buffer with a torch matmul, as Liger-Kernel does for its fused linear cross-entropy. These kernels
do the vocabulary-wide work on that buffer, one program per row, ``BLOCK_V`` columns at a time:

1. :func:`label_logprobs` reads the row once: an online max/sum gives ``logsumexp`` (stable for logits of any
   magnitude: every exponent is ``logit − running max ≤ 0``), and the label's logit is one extra load; the token
   log-prob is ``logit[label] − logsumexp`` (0 where the label is ``ignore_index``). The buffer is not written.
2. :func:`logprob_grad_inplace` overwrites the buffer with ``c_r · (onehot(label) − softmax)``, the gradient of
   ``c_r · log p(label)`` with respect to the row's logits, where ``c_r`` is the upstream gradient of the row's
   token log-prob (known only once the per-pair loss and its gradient are); ignored rows become 0. The caller's
   matmuls then turn the buffer into the gradients of the hidden states, the weight and the bias.

Between the two phases the buffer still holds the raw logits, so phase 2 recomputes ``exp(logit − logsumexp)``
instead of keeping a second ``[rows, V]`` tensor: one buffer per chunk is the whole memory cost.

:mod:`dpalogic.runtime.fused` imports this module only on its Triton path, and this module imports without triton
(calling a kernel then raises :class:`~dpalogic.errors.DPALogicError`). The kernels are wrapped by ``triton.jit`` on
first use, once per mode (compiled, or Triton's CPU interpreter under ``TRITON_INTERPRET=1``, which ``triton.jit``
reads when it decorates), so a process may use both. Only ``tl.exp``, ``tl.log``, ``tl.maximum`` and ``tl.reduce``
(with combiners of our own, the ones ``tl.max``/``tl.sum`` use) appear: nothing libdevice-only that the interpreter
could not run, and no private Triton name.
"""

from __future__ import annotations

import os
from typing import Any

import torch

from dpalogic.errors import DPALogicError

try:  # optional: without triton this module still imports, and only calling a kernel fails (clearly)
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - the test environment has triton
    triton = tl = None

MAX_BLOCK_V = 4096
"""Widest vocabulary tile (a power of two); narrower vocabularies use one tile of ``next_power_of_2(V)``."""

_KERNELS: dict[bool, tuple[Any, Any]] = {}  # interpreter mode → (label-log-prob kernel, gradient kernel)


def _max_combine(a, b):
    """The combiner of ``tl.max`` over floats (``tl.maximum``), for ``tl.reduce``."""
    return tl.maximum(a, b)


def _sum_combine(a, b):
    """The combiner of ``tl.sum``, for ``tl.reduce``."""
    return a + b


if triton is not None:
    # Our own combiners, wrapped as JITFunction whatever TRITON_INTERPRET says: compiled, tl.reduce with them is the
    # same reduction as tl.max/tl.sum (the same combiners); interpreted, tl.reduce calls their plain Python function.
    # tl.max/tl.sum themselves are @triton.jit'd when triton is imported, in that moment's mode, so a kernel could not
    # run interpreted in a process that imported triton before setting TRITON_INTERPRET=1 (the tests do).
    _max_combine = triton.JITFunction(_max_combine)
    _sum_combine = triton.JITFunction(_sum_combine)


def _label_logprob_kernel(
    logits_ptr,
    labels_ptr,
    lse_ptr,
    logp_ptr,
    stride_row,
    V,
    ignore_index,
    BLOCK_V: tl.constexpr,
):
    """One row: ``lse = logsumexp(logits[row])`` and ``logp = logits[row, label] − lse`` (0 for ignored rows)."""
    row = tl.program_id(0).to(tl.int64)  # int64 offsets: rows · V can pass 2³¹ for large chunks and vocabularies
    base = logits_ptr + row * stride_row
    offs = tl.arange(0, BLOCK_V)
    # the first tile initializes the running max and sum, so they have the buffer's dtype from the start (a
    # loop-carried value must keep one type) and no −inf − (−inf) = NaN can occur; V ≥ 1, so it holds a finite entry
    x = tl.load(base + offs, mask=offs < V, other=-float("inf"))
    # tl.reduce with our combiners: tl.max/tl.sum for float32/float64, in either mode (see _max_combine)
    m = tl.reduce(x, 0, _max_combine)
    s = tl.reduce(tl.exp(x - m), 0, _sum_combine)
    for start in range(BLOCK_V, V, BLOCK_V):
        cols = start + offs
        x = tl.load(base + cols, mask=cols < V, other=-float("inf"))
        m_new = tl.maximum(m, tl.reduce(x, 0, _max_combine))
        # rescale the sum so far to the new max; every exponent stays ≤ 0, whatever the logits' magnitude
        s = s * tl.exp(m - m_new) + tl.reduce(tl.exp(x - m_new), 0, _sum_combine)
        m = m_new
    lse = m + tl.log(s)
    label = tl.load(labels_ptr + row)
    valid = label != ignore_index
    safe = tl.where(valid, label, 0).to(tl.int64)  # never dereference ignore_index (e.g. −100)
    label_logit = tl.load(base + safe)
    tl.store(lse_ptr + row, lse)
    tl.store(logp_ptr + row, tl.where(valid, label_logit - lse, 0.0))


def _logprob_grad_kernel(
    logits_ptr,
    labels_ptr,
    lse_ptr,
    coef_ptr,
    stride_row,
    V,
    ignore_index,
    BLOCK_V: tl.constexpr,
):
    """One row, in place: ``logits ← c · (onehot(label) − exp(logits − lse))``; ignored rows become 0."""
    row = tl.program_id(0).to(tl.int64)
    base = logits_ptr + row * stride_row
    offs = tl.arange(0, BLOCK_V)
    label = tl.load(labels_ptr + row)
    valid = label != ignore_index
    lse = tl.load(lse_ptr + row)
    c = tl.load(coef_ptr + row)
    for start in range(0, V, BLOCK_V):
        cols = start + offs
        inside = cols < V
        # masked lanes read −inf: exp(−inf − lse) = 0, where 0 − lse could overflow for a row of very negative logits
        x = tl.load(base + cols, mask=inside, other=-float("inf"))
        p = tl.exp(x - lse)  # the softmax from the saved logsumexp: no second pass for the max
        hit = (cols == label) & valid
        g = c * (tl.where(hit, 1.0, 0.0) - p)
        # an ignored row has no log-prob term: exactly 0, whatever its coefficient and even if its logits are inf/NaN
        g = tl.where(valid, g, 0.0)
        tl.store(base + cols, g, mask=inside)


def _kernels() -> tuple[Any, Any]:
    """The two kernels wrapped by ``triton.jit`` for the current mode (compiled, or the interpreter)."""
    mode = os.environ.get("TRITON_INTERPRET") == "1"
    if mode not in _KERNELS:
        if triton is None:  # the dispatcher in dpalogic.runtime.fused checks first; this guards direct callers
            raise DPALogicError("the fused Triton kernels need the triton package (pip install triton)")
        _KERNELS[mode] = (triton.jit(_label_logprob_kernel), triton.jit(_logprob_grad_kernel))
    return _KERNELS[mode]


def block_v_for(V: int, block_v: int | None = None) -> int:
    """The vocabulary tile: ``block_v`` if given (a power of two), else ``min(MAX_BLOCK_V, next_power_of_2(V))``."""
    if block_v is None:
        return min(MAX_BLOCK_V, 1 << max(0, V - 1).bit_length())
    if block_v < 1 or block_v & (block_v - 1):
        raise DPALogicError(f"block_v must be a positive power of two, got {block_v}")
    return block_v


def _num_warps(block_v: int) -> int:
    # 4096 float32 columns per tile: 8 warps keep 16 values per thread; small tiles need fewer threads
    return 8 if block_v >= 4096 else 4 if block_v >= 1024 else 2 if block_v >= 256 else 1


def _check(logits: torch.Tensor, labels: torch.Tensor, *extra: tuple[str, torch.Tensor]) -> None:
    if logits.dim() != 2 or logits.stride(1) != 1:
        raise DPALogicError(f"logits must be a [rows, V] buffer with contiguous rows, got shape {tuple(logits.shape)}")
    if logits.dtype not in (torch.float32, torch.float64):
        raise DPALogicError(f"the logits buffer must be float32 (or float64), got {logits.dtype}")
    if logits.shape[1] < 1:
        raise DPALogicError("the logits buffer needs at least one vocabulary column")
    rows = logits.shape[0]
    for name, t in (("labels", labels), *extra):
        if t.dim() != 1 or t.shape[0] != rows or not t.is_contiguous():
            raise DPALogicError(f"{name} must be a contiguous [rows] = ({rows},) tensor, got {tuple(t.shape)}")
        if t.device != logits.device:
            raise DPALogicError(f"{name} is on {t.device} but the logits buffer is on {logits.device}")
    if labels.dtype not in (torch.int32, torch.int64):
        raise DPALogicError(f"labels must be integer token ids, got {labels.dtype}")


def label_logprobs(
    logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100, *, block_v: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row of ``logits [rows, V]``: ``(logsumexp, log-prob of the label)``, both ``[rows]`` in the buffer's dtype.

    One pass over the vocabulary; ``logits`` is only read. Rows whose label is ``ignore_index`` get log-prob 0 (their
    logsumexp is still computed; :func:`logprob_grad_inplace` ignores it). Labels other than ``ignore_index`` must be
    in ``[0, V)``: the kernel does not bounds-check them (the caller validates them once for the whole batch).
    """
    _check(logits, labels)
    rows, V = logits.shape
    lse = torch.empty(rows, dtype=logits.dtype, device=logits.device)
    logp = torch.empty_like(lse)
    if rows:
        bv = block_v_for(V, block_v)
        kernel, _ = _kernels()
        kernel[(rows,)](
            logits, labels, lse, logp, logits.stride(0), V, ignore_index, BLOCK_V=bv, num_warps=_num_warps(bv)
        )
    return lse, logp


def logprob_grad_inplace(
    logits: torch.Tensor,
    labels: torch.Tensor,
    lse: torch.Tensor,
    coef: torch.Tensor,
    ignore_index: int = -100,
    *,
    block_v: int | None = None,
) -> torch.Tensor:
    """Overwrite ``logits`` with ``coef[:, None] · (onehot(labels) − softmax(logits))``; returns ``logits``.

    ``lse`` is :func:`label_logprobs`'s logsumexp of the same (unchanged) buffer, ``coef [rows]`` the upstream
    gradient of each row's label log-prob. Rows with label ``ignore_index`` become 0 whatever their ``coef``.
    """
    _check(logits, labels, ("lse", lse), ("coef", coef))
    if lse.dtype != logits.dtype or coef.dtype != logits.dtype:
        raise DPALogicError(f"lse ({lse.dtype}) and coef ({coef.dtype}) must have the buffer's dtype {logits.dtype}")
    rows, V = logits.shape
    if rows:
        bv = block_v_for(V, block_v)
        _, kernel = _kernels()
        kernel[(rows,)](
            logits, labels, lse, coef, logits.stride(0), V, ignore_index, BLOCK_V=bv, num_warps=_num_warps(bv)
        )
    return logits
