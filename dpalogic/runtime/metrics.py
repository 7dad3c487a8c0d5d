"""Preference metrics: the implicit rewards, their margins and accuracy, computed one way for every caller.

The fused LM-head loss reports them with its loss, the training loop sums them over pairs (exactly, across
processes), and the TRL adapter gathers and averages them under TRL's metric names. All three call
:func:`pair_rewards`, so a reward means the same thing in every log.
"""

from __future__ import annotations

import torch


def pair_rewards(
    chosen: torch.Tensor,
    rejected: torch.Tensor,
    ref_chosen: torch.Tensor | None = None,
    ref_rejected: torch.Tensor | None = None,
    *,
    beta: float = 1.0,
    chosen_lengths: torch.Tensor | None = None,
    rejected_lengths: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """Per-pair metrics ``[B]`` from summed answer log-probs (detached; float32, float64 for float64 inputs).

    The reward of an answer is ``β·(log π − log π_ref)`` when reference log-probs are given (DPO's implicit reward)
    and ``β·log π`` without them; with lengths, both log-probs are divided by the answer's token count (clamped to
    ≥ 1) first (the length-normalized losses' reward). Returns ``chosen_logps``, ``rejected_logps``,
    ``chosen_rewards``, ``rejected_rewards``, ``margins`` (chosen − rejected reward), ``accuracy`` (1 where the
    chosen reward is higher) and ``logp_accuracy`` (1 where the chosen log-prob is higher).
    """
    dt = torch.float64 if chosen.dtype == torch.float64 else torch.float32
    c, r = chosen.detach().to(dt), rejected.detach().to(dt)
    rc, rr = c, r
    if ref_chosen is not None and ref_rejected is not None:
        rc, rr = c - ref_chosen.detach().to(dt), r - ref_rejected.detach().to(dt)
    if chosen_lengths is not None and rejected_lengths is not None:
        rc, rr = rc / chosen_lengths.to(dt).clamp(min=1.0), rr / rejected_lengths.to(dt).clamp(min=1.0)
    rc, rr = beta * rc, beta * rr
    return {
        "chosen_logps": c,
        "rejected_logps": r,
        "chosen_rewards": rc,
        "rejected_rewards": rr,
        "margins": rc - rr,
        "accuracy": (rc > rr).to(dt),
        "logp_accuracy": (c > r).to(dt),
    }
