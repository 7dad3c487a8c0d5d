"""How one optimizer step turns micro-batch losses into an update: the backward pass, gradient accumulation, the
gradient norm (and clipping), and the step, for plain torch (one process, DDP, FSDP2) and for a DeepSpeed ZeRO engine.

The training loop calls the same four methods on either; the gradient norm is always measured *before* the step, so a
non-finite one stops the run without touching the weights.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext

import torch

from dpalogic.training import zero


class TorchUpdate:
    """accelerate's backward, ``no_sync`` (DDP) or FSDP2's sync switch, ``clip_grad_norm_`` and the AdamW step."""

    def __init__(self, acc, policy: torch.nn.Module, model: torch.nn.Module, optimizer, *, fsdp: bool, clip: float):
        self.acc, self.policy, self.model, self.optimizer = acc, policy, model, optimizer
        self.fsdp = fsdp
        self.clip = clip if clip > 0 else float("inf")

    def accumulating(self, last: bool) -> AbstractContextManager:
        """Gradients stay local until the last micro-batch of a step (accelerate's ``no_sync`` for DDP; FSDP2's own
        switch, which accelerate does not drive for a model it did not shard)."""
        if self.fsdp:
            self.model.set_requires_gradient_sync(last)
            return nullcontext()
        return nullcontext() if last else self.acc.no_sync(self.policy)

    def backward(self, loss: torch.Tensor) -> None:
        self.acc.backward(loss)

    def grad_norm(self) -> float:
        """The global norm before clipping (the gradients are clipped in place)."""
        trained = [p for p in self.model.parameters() if p.requires_grad]
        norm = torch.nn.utils.clip_grad_norm_(trained, self.clip)
        if hasattr(norm, "full_tensor"):  # FSDP: a DTensor norm over every rank's shards
            norm = norm.full_tensor()
        return float(norm)

    def step(self) -> None:
        self.optimizer.step()
        self.discard()

    def discard(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def weights_finite(self) -> bool:
        """This rank's weights (its shards under FSDP) are all finite."""
        local = (p.to_local() if hasattr(p, "to_local") else p for p in self.model.parameters())
        return all(bool(torch.isfinite(p).all()) for p in local)


class ZeroUpdate:
    """The DeepSpeed engine's: its accumulation boundary, backward (reducing and partitioning the gradients), the
    norm its step will clip by, and its step over this rank's partition of AdamW."""

    def __init__(self, engine) -> None:
        self.engine = engine

    def accumulating(self, last: bool) -> AbstractContextManager:
        self.engine.set_gradient_accumulation_boundary(last)
        return nullcontext()

    def backward(self, loss: torch.Tensor) -> None:
        self.engine.backward(loss, scale_wrt_gas=False)  # the loss is already divided by the micro-batch count

    def grad_norm(self) -> float:
        return zero.grad_norm(self.engine)

    def step(self) -> None:
        self.engine.step()  # clips, steps AdamW on this rank's partition and clears the gradients

    def discard(self) -> None:
        self.engine.zero_grad()

    def weights_finite(self) -> bool:
        return zero.masters_finite(self.engine)
