"""Unstructured losses with batch statistics: KTO (a KL reference point per batch) and BCO (a running mean δ of the
rewards across batches), and the registry of every unstructured loss. Plain torch with **no structure**: see
:mod:`dpalogic.runtime.unstructured`.

Both take pairs (each pair is one desirable and one undesirable answer, as TRL's ``unpair_preference_dataset`` makes
them) or, through :meth:`~KTO.unpaired`, unpaired answers with a label. The statistics are computed as TRL computes
them; BCO's running mean is state of the loss module, saved with a run's checkpoints (:meth:`stats_state`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F

from dpalogic.errors import DPALogicError, unknown
from dpalogic.runtime.unstructured import PAIRWISE, UnstructuredLoss, checked


def _distributed() -> bool:
    return (
        torch.distributed.is_available()
        and torch.distributed.is_initialized()
        and torch.distributed.get_world_size() > 1
    )


def _as_labels(labels: Any, n: int) -> torch.Tensor:
    t = torch.as_tensor(labels)
    if t.dim() != 1 or t.numel() != n:
        raise DPALogicError(f"labels must be a 1-D tensor of {n} booleans (one per answer), got shape {tuple(t.shape)}")
    if t.dtype != torch.bool and not ((t == 0) | (t == 1)).all():
        raise DPALogicError("labels must be booleans (True: desirable, False: undesirable)")
    return t.bool()


class _Unpaired(UnstructuredLoss):
    """Losses over single answers with a desirable/undesirable label; pairs are two such answers."""

    accepts_unpaired = True
    margin_why = (
        "it scores each answer on its own (desirable or undesirable), so there is no pair difference for a margin "
        "to shift (the paper defines no per-pair margin)"
    )

    def takes(self) -> str:
        return (
            f"{super().takes()}, or unpaired answers [N] with a label each through .unpaired(logps, ref_logps, labels)"
        )

    def per_pair(self, x: dict[str, torch.Tensor], **extra: Any) -> torch.Tensor:
        b = x["chosen_logps"].shape[0]
        labels = torch.cat([torch.ones(b, dtype=torch.bool), torch.zeros(b, dtype=torch.bool)]).to(
            x["chosen_logps"].device
        )
        per = self.per_example(
            torch.cat([x["chosen_logps"], x["rejected_logps"]]),
            torch.cat([x["ref_chosen_logps"], x["ref_rejected_logps"]]),
            labels,
            **extra,
        )
        return self.pair_of(per[:b], per[b:])

    def pair_of(self, chosen: torch.Tensor, rejected: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def unpaired(self, logps: torch.Tensor, ref_logps: torch.Tensor, labels: Any, **extra: Any) -> torch.Tensor:
        """The loss of unpaired answers: summed log-probs ``[N]`` under the policy and the reference, and a label each
        (True: desirable). Reduced as the module's ``reduction`` says (``"none"``: one loss per answer)."""
        self.check_extra(extra)
        x = checked({"logps": logps, "ref_logps": ref_logps}, ["logps", "ref_logps"], self.name)
        return self.reduce(self.per_example(x["logps"], x["ref_logps"], _as_labels(labels, logps.shape[0]), **extra))

    def per_example(self, logps, ref_logps, labels, **extra: Any) -> torch.Tensor:
        raise NotImplementedError


class KTO(_Unpaired):
    """Kahneman–Tversky Optimization (Ethayarajh et al. 2024, arXiv:2402.01306, Eq. 7), as TRL's KTOTrainer:

    desirable ``λ_D·(1 − σ(β·(log ρ − z₀)))``, undesirable ``λ_U·(1 − σ(β·(z₀ − log ρ)))``, ρ = π/π_ref, averaged over
    the answers. The reference point z₀ is the batch's KL estimate: the mean of ``log π − log π_ref`` over mismatched
    (prompt, completion) pairs (``kl_logps``, ``ref_kl_logps``; TRL pairs prompt i with completion i − 1), detached,
    averaged over processes (in training) and clamped at 0. ``kl=`` passes an estimate of one's own instead.

    As pairs, each pair is a desirable and an undesirable answer; the pair's loss is their mean, so the mean over
    pairs is TRL's mean over answers. ``desirable_weight``/``undesirable_weight`` are λ_D and λ_U.
    """

    name = "kto"
    defaults = {"beta": 0.1, "desirable_weight": 1.0, "undesirable_weight": 1.0}
    needs_kl = True
    extra_inputs = ("kl_logps", "ref_kl_logps", "kl")

    def __init__(self, **kw: Any) -> None:
        super().__init__(**kw)
        self.last_kl: float | None = None  # the reference point of the latest batch, for the log

    def check(self) -> None:
        super().check()
        for k in ("desirable_weight", "undesirable_weight"):
            if self.hyperparameters[k] < 0:
                raise DPALogicError(f"kto: {k} must not be negative, got {self.hyperparameters[k]:g}")

    def kl_estimate(self, kl_logps=None, ref_kl_logps=None, kl=None) -> torch.Tensor:
        if kl is not None:
            if (
                isinstance(kl, bool)
                or not isinstance(kl, (int, float, torch.Tensor))
                or torch.as_tensor(kl).numel() != 1
            ):
                got = f"a tensor of shape {tuple(kl.shape)}" if isinstance(kl, torch.Tensor) else type(kl).__name__
                raise DPALogicError(f"kto: kl= is one number, the batch's KL estimate; got {got}")
            if not math.isfinite(float(kl)):
                raise DPALogicError(f"kto: kl= must be a finite number, got {float(kl)}")
            return torch.as_tensor(kl, dtype=torch.float64).detach().clamp(min=0)
        if kl_logps is None or ref_kl_logps is None:
            raise DPALogicError(
                "kto needs its reference point: pass kl_logps and ref_kl_logps (summed log-probs of mismatched "
                "prompt/completion pairs under the policy and the reference), or kl= an estimate"
            )
        x = checked({"kl_logps": kl_logps, "ref_kl_logps": ref_kl_logps}, ["kl_logps", "ref_kl_logps"], self.name)
        est = (x["kl_logps"] - x["ref_kl_logps"]).mean().detach()
        # TRL gathers every process's estimate and averages them; only in training, where every process runs the
        # same batches (an evaluation's processes may run different numbers of them: a collective could hang)
        if _distributed() and torch.is_grad_enabled():
            est = est.clone()
            torch.distributed.all_reduce(est)
            est = est / torch.distributed.get_world_size()
        return est.clamp(min=0)

    def per_example(self, logps, ref_logps, labels, kl_logps=None, ref_kl_logps=None, kl=None) -> torch.Tensor:
        z0 = self.kl_estimate(kl_logps, ref_kl_logps, kl).to(logps.dtype).to(logps.device)
        self.last_kl = float(z0)
        h = self.hyperparameters
        lr = logps - ref_logps
        desirable = h["desirable_weight"] * (1 - torch.sigmoid(h["beta"] * (lr - z0)))
        undesirable = h["undesirable_weight"] * (1 - torch.sigmoid(h["beta"] * (z0 - lr)))
        return torch.where(labels.to(lr.device), desirable, undesirable)

    def pair_of(self, chosen: torch.Tensor, rejected: torch.Tensor) -> torch.Tensor:
        return (chosen + rejected) / 2


class BCO(_Unpaired):
    """Binary Classifier Optimization (Jung et al. 2024, arXiv:2404.04656) with its reward shift δ:
    ``−log σ(r_w − δ) − log σ(−(r_l − δ))``, r = β·log π/π_ref, as TRL's DPOTrainer ``bco_pair`` computed it before
    δ was dropped (``bco_pair`` in the catalog is δ = 0). Unpaired answers each get their half (TRL's BCOTrainer).

    δ is a running mean over batches of the batch's mean reward, with TRL's ``RunningMoments`` arithmetic (float32,
    count from 1e-24, statistics across processes). It is updated before the loss of a batch is computed, only in
    training mode with gradients on (an evaluation reads δ, it does not move it), and saved in checkpoints.
    (BCO's optional embedding classifier for matching distributions, UDM, is not included.)
    """

    name = "bco"
    defaults = {"beta": 0.1}

    def __init__(self, **kw: Any) -> None:
        super().__init__(**kw)
        self.running = {"mean": 0.0, "var": 1.0, "count": 1e-24}  # RunningMoments' initial values

    def stats_state(self) -> dict[str, float]:
        return dict(self.running)

    def load_stats_state(self, state: Mapping[str, float]) -> None:
        if set(state) != set(self.running):
            raise DPALogicError(f"bco: the saved running statistics have {sorted(state)}, not {sorted(self.running)}")
        self.running = {k: float(v) for k, v in state.items()}

    @torch.no_grad()
    def update(self, xs: torch.Tensor) -> None:
        """Fold the batch's values ``xs`` into the running mean and variance (TRL's RunningMoments.update)."""
        xs = xs.detach().reshape(-1)
        if _distributed():
            sc = torch.stack([xs.sum(), torch.tensor(float(xs.numel()), device=xs.device, dtype=xs.dtype)])
            torch.distributed.all_reduce(sc)
            mean = sc[0] / sc[1]
            sv = ((xs - mean) ** 2).sum()
            torch.distributed.all_reduce(sv)
            xs_mean, xs_var, n = mean, sv / sc[1], float(sc[1])
        else:
            xs_var, xs_mean = torch.var_mean(xs, unbiased=False)
            n = float(xs.numel())
        xs_mean, xs_var = xs_mean.float(), xs_var.float()
        r = self.running
        delta = xs_mean - r["mean"]
        total = r["count"] + n
        old_sum = r["var"] * r["count"] + delta**2 * r["count"] * n / total
        r["mean"] += (delta * n / total).item()
        r["var"] = ((old_sum + xs_var * n) / total).item()
        r["count"] = total

    def per_example(self, logps, ref_logps, labels) -> torch.Tensor:
        rewards = self.hyperparameters["beta"] * (logps - ref_logps)
        if self.training and torch.is_grad_enabled():
            self.update(rewards.mean())
        shifted = rewards - self.running["mean"]
        return torch.where(labels.to(rewards.device), -F.logsigmoid(shifted), -F.logsigmoid(-shifted))

    def pair_of(self, chosen: torch.Tensor, rejected: torch.Tensor) -> torch.Tensor:
        return chosen + rejected


UNSTRUCTURED: dict[str, type[UnstructuredLoss]] = {**PAIRWISE, "kto": KTO, "bco": BCO}


def make_unstructured(name: str, **kw: Any) -> UnstructuredLoss:
    """The unstructured loss called ``name`` (see :data:`UNSTRUCTURED`), with ``reduction``/hyperparameters."""
    key = name.strip().lower().replace("-", "_")
    if key not in UNSTRUCTURED:
        raise unknown("unstructured loss", name, list(UNSTRUCTURED))
    return UNSTRUCTURED[key](**kw)
