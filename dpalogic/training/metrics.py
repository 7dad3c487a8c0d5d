"""Preference metrics: the implicit rewards, their margins and accuracy, computed one way for every trainer.

The training loop sums them over pairs (exactly, across processes); the TRL adapter gathers and averages them under
TRL's metric names. Both call :func:`pair_rewards`, so a reward means the same thing in either log.
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
    """Per-pair metrics ``[B]`` from summed answer log-probs (detached, in float32).

    The reward of an answer is ``β·(log π − log π_ref)`` when reference log-probs are given (DPO's implicit reward)
    and ``β·log π`` without them; with lengths, both log-probs are divided by the answer's token count first (the
    length-normalized losses' reward). Returns ``chosen_logps``, ``rejected_logps``, ``chosen_rewards``,
    ``rejected_rewards``, ``margins`` (chosen − rejected reward), ``accuracy`` (1 where the chosen reward is higher)
    and ``logp_accuracy`` (1 where the chosen log-prob is higher).
    """
    c, r = chosen.detach().float(), rejected.detach().float()
    rc, rr = c, r
    if ref_chosen is not None and ref_rejected is not None:
        rc, rr = c - ref_chosen.detach().float(), r - ref_rejected.detach().float()
    if chosen_lengths is not None and rejected_lengths is not None:
        rc, rr = rc / chosen_lengths.float().clamp(min=1.0), rr / rejected_lengths.float().clamp(min=1.0)
    rc, rr = beta * rc, beta * rr
    return {
        "chosen_logps": c,
        "rejected_logps": r,
        "chosen_rewards": rc,
        "rejected_rewards": rr,
        "margins": rc - rr,
        "accuracy": (rc > rr).float(),
        "logp_accuracy": (c > r).float(),
    }
