"""Training on K answers per prompt: a loss over ``y1 … yK`` on ``[B, K]`` log-probs, and its held-out metrics.

A micro-batch of B prompts is one forward pass over its B·K sequences (prompt + answer, row-major: sequence
``b·K + j`` is answer ``y(j+1)`` of prompt b), so ``--batch-size`` counts prompts and a micro-batch costs as much
memory as B·K/2 pairs; lower ``--batch-size`` and raise ``--grad-accum`` to fit. The summed answer log-probs,
reshaped to ``[B, K]``, go to ``PreferenceLoss(logps=…, ref_logps=…, lengths=…)``, with ``margin=[B]`` under
``--margin-from`` (:func:`~dpalogic.training.ranked.list_margins`: the row's ``margin``, or its best score minus the
runner-up's).

The reference is live (a frozen copy, ``--ref-model``, or under LoRA the policy with its adapter off): the
``--reference cache`` file holds two log-probs per row (chosen, rejected), so these runs do not use it.

Metrics, averaged over prompts (:func:`ranked_metrics`): ``top1_accuracy``, the best-scored answer has the highest
policy log-prob (the issue's definition; length and reference play no part); ``reward_top1_accuracy``, the same with
the implicit reward ``log π − log π_ref`` (``log π`` for a reference-free loss); ``rank_correlation``, Spearman's ρ
between the scores and the implicit rewards (average ranks for ties; 0 for a prompt whose rewards all tie, such as
every prompt at step 0 of a run with a reference, where π = π_ref); ``logps_best`` and ``logps_mean``, the best
answer's log-prob and the mean over the K answers.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from dpalogic.errors import DPALogicError
from dpalogic.training.data import PreferenceRows, stack_answers
from dpalogic.training.model import sequence_logps
from dpalogic.training.ranked import RankedExample, RankedRows, list_margins, listwise_rows, to_pairs
from dpalogic.training.reference import Reference, batch_reference_logps

RANKED_STAT_NAMES = ("logps_best", "logps_mean", "top1_accuracy", "reward_top1_accuracy", "rank_correlation")
_LIST_ATOM = re.compile(r"(M|Ref)\(y(\d+)\)")


def list_size(loss_fn: Any, fused: bool = False) -> int | None:
    """K for a loss over ``y1 … yK`` (its highest answer), None for a pair loss (``yw``/``yl``) or one with no
    structure."""
    if getattr(loss_fn, "structure_free", False):
        return None
    found = [_LIST_ATOM.fullmatch(a.name) for a in loss_fn.atoms]
    if not any(found):
        return None
    if not all(found):
        raise DPALogicError("this loss mixes answers y1 … yK with yw/yl: a training row has one or the other")
    if not any(m.group(1) == "M" for m in found):
        raise DPALogicError("this loss has no policy atom M(y…): it would not train the model")
    if fused:
        raise DPALogicError("--fused trains pairs; a loss over y1 … yK runs unfused: drop --fused")
    return max(int(m.group(2)) for m in found)


def prepare_rows(rows: PreferenceRows | None, cfg: Any, k: int | None, needs_ref: bool, say) -> PreferenceRows | None:
    """The rows a run trains on: K-answer rows kept for a loss over ``y1 … yk`` (with their margins under
    ``--margin-from``), turned into pairs (``--pairs``, ``--curriculum``) for a pairwise loss; a mismatch between the
    loss and the data is refused with the reason."""
    if rows is None:
        return None
    ranked = isinstance(rows, RankedRows)
    if k is not None:
        if not ranked:
            raise DPALogicError(
                f"the loss is over answers y1…y{k}; the data {rows.source} is not K-answer rows "
                '{"prompt", "responses": [...], "scores": [...]}'
            )
        for flag, value in (("--pairs", cfg.pairs), ("--curriculum", cfg.curriculum)):
            if value is not None:
                raise DPALogicError(f"{flag} applies to pairwise losses; this loss is over y1…y{k} (drop {flag})")
        if needs_ref and cfg.reference == "cache":
            say(f"{cfg.loss}: a live reference model, not a reference cache (the cache holds pairs only)")
            cfg.reference = "model"
        rows = listwise_rows(rows, k, cfg.strict_data)
        return (
            rows if cfg.margin_from is None else list_margins(rows, cfg.margin_from, cfg.margin_scale, cfg.strict_data)
        )
    if not ranked:
        if cfg.pairs is not None:
            raise DPALogicError(f"--pairs makes pairs from K-answer rows; {rows.source} has pairs already")
        return rows
    if cfg.pairs is None:
        raise DPALogicError(
            f"{rows.source} has K answers per prompt (responses, scores): pass --pairs all, adjacent or best-vs-rest "
            "to train this pairwise loss on pairs made from them, or use a loss over y1 … yK"
        )
    if cfg.margin_from == "margin":  # a row's margin is the list's (y1 over the rest), not any one pair's
        raise DPALogicError(
            "--margin-from margin with --pairs: a K-answer row's margin is for a loss over y1 … yK; the pairs made "
            "from it take --margin-from scores (each pair's score gap)"
        )
    pairs = to_pairs(rows, cfg.pairs, cfg.curriculum, cfg.strict_data)
    say(
        f"{rows.source}: {len(pairs.rows)} pairs ({cfg.pairs}) from {len(set(pairs.row_numbers))} K-answer rows"
        + (", ordered easy to hard (largest score gap first)" if cfg.curriculum else "")
    )
    return pairs


def dry_run_rows(rows: PreferenceRows, cfg: Any, say) -> tuple[PreferenceRows, int | None]:
    """:func:`prepare_rows` with the run's loss, for ``dpalogic train --dry-run`` (which builds no Trainer), and the
    loss's K (None for a pair loss)."""
    from dpalogic.runtime.preference_loss import PreferenceLoss

    loss_fn = PreferenceLoss(cfg.loss, **cfg.hp)
    k = list_size(loss_fn, cfg.fused)
    return prepare_rows(rows, cfg, k, loss_fn.needs_reference, say), k


def examples_text(n: int, k: int | None) -> str:
    """``"14 lists of 4 answers"`` for a loss over y1 … yK, ``"14 pairs"`` otherwise (what a run counts)."""
    return f"{n} pairs" if k is None else f"{n} {'list' if n == 1 else 'lists'} of {k} answers"


def steps_per_epoch(n: int, cfg: Any, world: int, k: int | None) -> int:
    """Optimizer steps in one pass over ``n`` examples (the last incomplete global batch is dropped, so every rank
    gets as many), or the error that they do not fill one global batch."""
    steps = n // (cfg.batch_size * world * cfg.grad_accum)
    if steps == 0:
        raise DPALogicError(
            f"{examples_text(n, k)} to train on: fewer than one global batch ({cfg.batch_size} per device × {world} "
            f"processes × {cfg.grad_accum} accumulation steps); lower --batch-size or --grad-accum, or add data"
        )
    return steps


# --------------------------------------------------------------------------------------------------- batches


def collate_ranked(examples: Sequence[RankedExample], pad_token_id: int) -> dict[str, torch.Tensor]:
    """``input_ids``/``attention_mask``/``labels`` ``[B·K, T]`` (row-major), ``lengths`` and ``scores`` ``[B, K]``,
    ``index`` ``[B]``, and ``margin`` ``[B]`` when the rows have margins."""
    out = {
        **stack_answers([(ex.prompt_ids, a) for ex in examples for a in ex.answer_ids], pad_token_id),
        "lengths": torch.tensor([[len(a) for a in ex.answer_ids] for ex in examples]),
        "scores": torch.tensor([ex.scores for ex in examples], dtype=torch.float64),
        "index": torch.tensor([ex.index for ex in examples]),
    }
    if any(ex.margin is not None for ex in examples):  # --margin-from: every row of the run has one
        out["margin"] = torch.tensor([ex.margin for ex in examples], dtype=torch.float32)
    return out


# --------------------------------------------------------------------------------------------------- metrics


def average_ranks(x: torch.Tensor) -> torch.Tensor:
    """1-based ranks along the last dimension, tied values sharing the mean of their ranks (``[B, K]`` → ``[B, K]``)."""
    below = (x.unsqueeze(-1) > x.unsqueeze(-2)).sum(-1)
    same = (x.unsqueeze(-1) == x.unsqueeze(-2)).sum(-1)
    return below.double() + (same.double() + 1) / 2


def spearman(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Spearman's ρ of every row of ``x`` and ``y`` (``[B, K]`` → ``[B]``): Pearson's correlation of their average
    ranks; 0 for a row where either side has all values tied (no order to correlate)."""
    rx, ry = average_ranks(x.detach().double()), average_ranks(y.detach().double())
    rx, ry = rx - rx.mean(-1, keepdim=True), ry - ry.mean(-1, keepdim=True)
    den = (rx.square().sum(-1) * ry.square().sum(-1)).sqrt()
    return torch.where(den > 0, (rx * ry).sum(-1) / den.clamp_min(1e-300), torch.zeros_like(den))


def ranked_metrics(logps: torch.Tensor, scores: torch.Tensor, ref_logps: torch.Tensor | None = None) -> dict:
    """Per-prompt metrics ``[B]`` from ``[B, K]`` log-probs with answers sorted best first (column 0 is the best):
    the names of :data:`RANKED_STAT_NAMES` (see the module's docstring)."""
    lp = logps.detach().double()
    reward = lp - ref_logps.detach().double() if ref_logps is not None else lp
    return {
        "logps_best": lp[:, 0],
        "logps_mean": lp.mean(-1),
        "top1_accuracy": (lp[:, 0] > lp[:, 1:].amax(-1)).double(),
        "reward_top1_accuracy": (reward[:, 0] > reward[:, 1:].amax(-1)).double(),
        "rank_correlation": spearman(scores, reward),
    }


# --------------------------------------------------------------------------------------------------- the step


@dataclass
class RankedForward:
    """:class:`~dpalogic.training.steps.PairForward`'s interface for K answers: batches of prompts → per-prompt
    losses ``[B]``, and metric sums over prompts."""

    loss_fn: Any
    fused: Any  # always None: a K-answer loss runs unfused
    model: torch.nn.Module
    reference: Reference
    needs_ref: bool
    acc: Any
    pad: int
    stat_names: ClassVar[tuple[str, ...]] = RANKED_STAT_NAMES

    def batch(self, examples: list[RankedExample]) -> dict[str, torch.Tensor]:
        from accelerate.utils import send_to_device

        return send_to_device(collate_ranked(examples, self.pad), self.acc.device)

    def pair_losses(self, module, batch: dict[str, torch.Tensor], cache: torch.Tensor | None):
        """``(per-prompt losses [B], logps [B, K], scores [B, K], ref_logps [B, K] or None, None)``; the last four
        are what :meth:`stats` takes (the pair step's chosen, rejected and reference slots)."""
        b, k = batch["scores"].shape
        with self.acc.autocast():
            logits = module(batch["input_ids"], batch["attention_mask"])
        lp = sequence_logps(logits, batch["labels"]).view(b, k)
        ref = None
        if self.needs_ref:  # live: cache is None (prepare_rows switched the run to a reference model)
            parts = batch_reference_logps(batch, None, self.reference.model, self.model, self.acc.autocast)
            ref = torch.cat(parts).view(b, k)
        per = self.loss_fn(logps=lp, ref_logps=ref, lengths=batch["lengths"].float(), margin=batch.get("margin"))
        return per, lp, batch["scores"], ref, None

    @staticmethod
    def eval_text(ev: dict[str, float]) -> str:
        """The held-out metrics of the per-step progress line."""
        return f"eval top-1 accuracy {ev['top1_accuracy']:.3f}, rank correlation {ev['rank_correlation']:.3f}"

    def stats(self, logps, scores, ref_logps, _unused=None) -> torch.Tensor:
        """Sums over prompts of :data:`RANKED_STAT_NAMES`."""
        m = ranked_metrics(logps, scores, ref_logps)
        return torch.stack([m[name].sum() for name in RANKED_STAT_NAMES]).double()
