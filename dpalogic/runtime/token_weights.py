"""Per-token weights and per-pair margins: the checks the loss paths share, and weighted sequence log-probs.

A token-weighted atom has the log-weight ``Σ_t w_t log π(y_t)`` (Mask-DPO's sentence masks and fixed SparsePO masks
are weights 0/1); a length-normalized term divides it by ``Σ_t w_t`` instead of the token count. Weights are ≥ 0, so
a weighted log-prob is still a log-weight (≤ 0). A per-pair margin ``m_i`` shifts the link of every preference term,
``z − m_i`` (docs/semantics.md, per-example margins).
"""

from __future__ import annotations

import torch

from dpalogic.errors import DPALogicError


def _kind(t: object) -> str:
    return f"a {t.dtype} tensor" if isinstance(t, torch.Tensor) else type(t).__name__


def check_float_tensor(name: str, t: object, shape: tuple[int, ...], device: torch.device) -> None:
    """``t`` is a finite floating-point tensor of ``shape`` on ``device``, or a clear error."""
    if not isinstance(t, torch.Tensor) or not t.is_floating_point():
        raise DPALogicError(f"{name} must be a floating-point tensor of shape {shape}, got {_kind(t)}")
    if tuple(t.shape) != tuple(shape):
        raise DPALogicError(f"{name} must have shape {tuple(shape)}, got {tuple(t.shape)}")
    if t.device != device:
        raise DPALogicError(f"{name} is on {t.device}, the other inputs on {device}")
    if not bool(torch.isfinite(t.detach()).all()):
        raise DPALogicError(f"{name} holds a NaN or an infinite value")


def check_token_weights(t: object, shape: tuple[int, ...], device: torch.device) -> None:
    """Token weights: finite, ≥ 0, one per label position."""
    check_float_tensor("token_weights", t, shape, device)
    if bool((t.detach() < 0).any()):  # type: ignore[union-attr]
        raise DPALogicError("token_weights must not be negative (0 leaves a token out, 1 counts it once)")


def weighted_sequence_logps(
    logits: torch.Tensor,
    labels: torch.Tensor,
    token_weights: torch.Tensor | None = None,
    *,
    ignore_index: int = -100,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(Σ_t w_t log π(labels_t), Σ_t w_t)`` per row of ``logits [N, T, V]``, both ``[N]`` in float32 (float64 stays).

    Labels are used as given: ``logits[:, t]`` scores ``labels[:, t]`` (shift them first for a causal LM's logits, as
    for the fused loss). Positions labelled ``ignore_index`` count 0; without ``token_weights`` every other position
    weighs 1 (the plain summed log-prob and the token count). Differentiable in ``logits``.
    """
    if logits.dim() != 3 or tuple(labels.shape) != tuple(logits.shape[:2]):
        raise DPALogicError(
            f"logits must be [N, T, V] and labels [N, T]: got {tuple(logits.shape)} and {tuple(labels.shape)}"
        )
    valid = labels != ignore_index
    if token_weights is not None:
        check_token_weights(token_weights, tuple(labels.shape), logits.device)
    dt = torch.float64 if logits.dtype == torch.float64 else torch.float32
    safe = labels.masked_fill(~valid, 0)
    token_lp = torch.gather(logits.to(dt).log_softmax(-1), 2, safe.unsqueeze(-1)).squeeze(-1)
    w = valid.to(dt) if token_weights is None else token_weights.to(dt) * valid
    return (token_lp * w).sum(-1), w.sum(-1)
