"""One optimizer step's pieces and the evaluation: the schedule, the order of the pairs, the forward pass that turns
a batch into per-pair losses, and the metrics summed over pairs."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from dpalogic.runtime.metrics import pair_rewards
from dpalogic.training import scaling
from dpalogic.training.data import IGNORE_INDEX, Example, TokenizedData, collate
from dpalogic.training.model import sequence_logps
from dpalogic.training.reference import Reference, batch_reference_logps

STAT_NAMES = ("logps_chosen", "logps_rejected", "reward_accuracy", "reward_margin", "logp_accuracy")
_STAT_KEYS = ("chosen_logps", "rejected_logps", "accuracy", "margins", "logp_accuracy")  # pair_rewards' names


def lr_lambda(total: int, warmup: int, min_ratio: float) -> Callable[[int], float]:
    """Linear warmup to 1, then a cosine down to ``min_ratio`` at ``total`` steps."""

    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return f


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    """The order of the pairs in ``epoch``: a function of ``(seed, epoch)`` only (so resume needs no sampler state)."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=g).tolist()


def micro_batches(
    examples: list[Example],
    *,
    step: int,
    steps_per_epoch: int,
    seed: int,
    batch_size: int,
    grad_accum: int,
    world: int,
    rank: int,
    ordered: bool = False,
) -> list[list[Example]]:
    """This rank's micro-batches for optimizer step ``step`` (its slice of each global micro-batch); ``ordered``
    keeps the data's order in every epoch (a curriculum) instead of shuffling."""
    epoch, k = divmod(step, steps_per_epoch)
    order = list(range(len(examples))) if ordered else epoch_order(len(examples), seed, epoch)
    b, w, r = batch_size, world, rank
    out = []
    for a in range(grad_accum):
        m = k * grad_accum + a
        glob = order[m * b * w : (m + 1) * b * w]
        out.append([examples[i] for i in glob[r * b : (r + 1) * b]])
    return out


class Policy(torch.nn.Module):
    """The model's forward as DDP sees it: all parameters used for the loss go through this ``forward``."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, hidden_only: bool = False):
        if hidden_only:  # the fused path: final hidden states, the LM head is applied inside the fused loss
            hf = scaling.hf_model(self.model)
            backbone = getattr(hf, hf.base_model_prefix)
            return backbone(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
        return self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits


@dataclass
class PairForward:
    """Batches of pairs → per-pair losses and metrics, with the run's loss, model, reference and precision."""

    loss_fn: Any
    fused: Any  # a FusedLinearPreferenceLoss, or None
    model: torch.nn.Module  # the unwrapped policy (its LM head, its adapter)
    reference: Reference
    needs_ref: bool
    acc: Any  # the run's Accelerator: device and autocast
    pad: int

    def batch(self, examples: list[Example]) -> dict[str, torch.Tensor]:
        from accelerate.utils import send_to_device

        if getattr(self.loss_fn, "structure_free", False):  # unpaired rows, KTO's mismatched pairs
            from dpalogic.training.unpaired import collate_any

            return send_to_device(collate_any(examples, self.pad, kl=self.loss_fn.needs_kl), self.acc.device)
        return send_to_device(collate(examples, self.pad), self.acc.device)

    @staticmethod
    def eval_text(ev: dict[str, float]) -> str:
        """The held-out metric of the per-step progress line (nan when the fused loss reported no log-probs)."""
        return f"eval reward accuracy {ev.get('reward_accuracy', float('nan')):.3f}"

    def pair_losses(self, module, batch: dict[str, torch.Tensor], cache: torch.Tensor | None):
        """Per-pair losses ``[B]`` (or the fused mean loss) and the per-pair log-probs for metrics."""
        if getattr(self.loss_fn, "structure_free", False):  # KTO, BCO, f-DPO, …: plain torch, no structure
            from dpalogic.training.unpaired import structure_free_losses

            return structure_free_losses(self, module, batch, cache)
        ref_c = ref_r = None
        if self.needs_ref:
            ref_c, ref_r = batch_reference_logps(batch, cache, self.reference.model, self.model, self.acc.autocast)
        if self.fused is not None:
            return (*self._fused_losses(module, batch, ref_c, ref_r), ref_c, ref_r)
        with self.acc.autocast():
            logits = module(batch["input_ids"], batch["attention_mask"])
        lp = sequence_logps(logits, batch["labels"], batch.get("token_weights"))
        n = lp.shape[0] // 2
        chosen, rejected = lp[:n], lp[n:]
        lc, lr = answer_lengths(batch)
        margin = {"margin": batch["margin"]} if "margin" in batch else {}  # --margin-from
        per = self.loss_fn(chosen, rejected, ref_c, ref_r, lc, lr, **margin)
        return per, chosen, rejected, ref_c, ref_r

    def _fused_losses(self, module, batch, ref_c, ref_r):
        with self.acc.autocast():
            hidden = module(batch["input_ids"], batch["attention_mask"], hidden_only=True)
        head = scaling.hf_model(self.model).get_output_embeddings()
        # the fused loss scores hidden[t] against labels[t] as given: shift so hidden[t] predicts token t+1, as
        # sequence_logps does with logits; under autocast the head is cast to the hidden states' dtype
        weight = head.weight.to(hidden.dtype)
        bias = head.bias.to(hidden.dtype) if head.bias is not None else None
        w = batch.get("token_weights")
        loss, metrics = self.fused(
            hidden[:, :-1], weight, batch["labels"][:, 1:], bias=bias, ref_chosen_logps=ref_c, ref_rejected_logps=ref_r,
            margin=batch.get("margin"), token_weights=None if w is None else w[:, 1:],
        )  # fmt: skip
        chosen = metrics.get("chosen_logps") if isinstance(metrics, dict) else None
        rejected = metrics.get("rejected_logps") if isinstance(metrics, dict) else None
        return loss, chosen, rejected

    def stats(self, chosen, rejected, ref_c, ref_r) -> torch.Tensor:
        """Sums over pairs of :data:`STAT_NAMES`, from :func:`~dpalogic.runtime.metrics.pair_rewards` at β = 1
        (zeros when the fused loss reported no log-probs).

        The reward is ``log π − log π_ref`` when the loss uses a reference (DPO's implicit reward), else ``log π``.
        """
        if chosen is None or rejected is None:
            return torch.zeros(5, dtype=torch.float64, device=self.acc.device)
        m = pair_rewards(chosen, rejected, ref_c, ref_r)
        return torch.stack([m[k].sum() for k in _STAT_KEYS]).double()


def answer_lengths(batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """The lengths length-normalized terms divide by: token counts, or with span weights ``Σ_t w_t`` of each answer."""
    w = batch.get("token_weights")
    if w is None:
        return batch["chosen_lengths"].float(), batch["rejected_lengths"].float()
    total = (w * (batch["labels"] != IGNORE_INDEX)).sum(1)
    n = total.shape[0] // 2
    return total[:n], total[n:]


@torch.no_grad()
def evaluate(fwd: PairForward, module, data: TokenizedData, batch_size: int, *, fsdp: bool) -> dict[str, float]:
    """Held-out loss and metrics over the whole of ``data`` (split across ranks, summed exactly)."""
    acc = fwd.acc
    fwd.model.eval()
    ex = data.examples
    mine = ex[acc.process_index :: acc.num_processes]
    bs = batch_size
    # under FSDP every forward is collective (all-gathers), so every rank runs as many batches as the rank with
    # the most; one that has run out scores a stand-in pair and counts nothing
    batches = math.ceil(math.ceil(len(ex) / acc.num_processes) / bs) if fsdp else math.ceil(len(mine) / bs)
    names = getattr(fwd, "stat_names", STAT_NAMES)  # a RankedForward has its own
    totals = torch.zeros(2 + len(names), dtype=torch.float64, device=acc.device)
    try:
        for i in range(batches):
            chunk = mine[i * bs : (i + 1) * bs]
            batch = fwd.batch(chunk or ex[:1])
            per, c, r, rc, rr = fwd.pair_losses(module, batch, fwd.reference.eval)
            if not chunk:
                continue
            n = batch["index"].numel()
            loss_sum = per.float().sum() if per.dim() else per.float() * n
            totals += torch.cat([torch.stack([loss_sum, loss_sum.new_tensor(n)]), fwd.stats(c, r, rc, rr)])
    finally:
        fwd.model.train()
    totals = acc.reduce(totals, "sum")
    n = totals[1].item()
    out = {"loss": totals[0].item() / n}
    if fwd.fused is None or totals[2:].abs().sum() > 0:
        out.update({k: totals[2 + i].item() / n for i, k in enumerate(names)})
    out["pairs"] = int(n)
    return out
