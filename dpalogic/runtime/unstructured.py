"""Losses outside the fragment, trainable anyway: plain torch, with **no structure**.

KTO, BCO, f-DPO, DPOP, AlphaPO and AOT are not programs of dpalogic's fragment (``dpalogic show NAME`` says exactly why:
:data:`dpalogic.semantics.catalog.OUTSIDE`), so nothing here has a structure, a circuit, a ratio ρ or a compiled
kernel; ``derive``, ``compare`` and ``lattice`` know nothing of them. They are written from the papers' equations so
that a run can train with them next to a derived loss (``dpalogic train --loss kto``, ``PreferenceLoss("kto")``).
Hyperparameters keep TRL's names where TRL has the loss; the tests hold values and gradients to TRL's code.

Every loss takes per-sequence *summed* log-probabilities ``[B]`` like :class:`~dpalogic.runtime.preference_loss.
PreferenceLoss`. Those with batch statistics (KTO's KL estimate, BCO's running mean δ) are in
:mod:`dpalogic.runtime.unstructured_stats`, which also holds the registry of names.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F

from dpalogic.errors import DPALogicError, unknown

_ARG_OF_ATOM = {"M(yw)": "chosen_logps", "M(yl)": "rejected_logps", "Ref(yw)": "ref_chosen_logps",
                "Ref(yl)": "ref_rejected_logps"}  # fmt: skip


class UnstructuredLoss(torch.nn.Module):
    """A loss with no structure: plain torch on per-sequence log-probs. Subclasses set the class attributes and
    :meth:`per_pair`; :meth:`forward` checks the inputs and reduces like ``PreferenceLoss``."""

    name: str = ""
    defaults: dict[str, float] = {}
    needs_reference: bool = True
    needs_lengths: bool = False
    needs_kl: bool = False  # log-probs of mismatched (prompt, completion) pairs: KTO's reference point
    accepts_unpaired: bool = False  # can train on unpaired rows {"prompt", "completion", "label"}
    structure_free = True  # what the training loop and the CLI test for (no program, atoms or kernel)
    program = None
    extra_inputs: tuple[str, ...] = ()  # keyword inputs beyond the pair's (KTO's reference point)
    # why a per-pair margin (PreferenceLoss's margin=) does not apply: none of these papers defines one
    margin_why = "its paper defines no per-pair margin, and it has no link z = β·log ρ − γ for one to shift"

    def __init__(self, *, reduction: str = "mean", backend: str = "auto", link: str | None = None, **hp: Any):
        super().__init__()
        if reduction not in ("mean", "sum", "none"):
            raise DPALogicError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
        if link is not None:
            raise DPALogicError(f"{self.name} has no structure, so it has no link z = β·log ρ − γ to replace")
        self.backend = backend  # plain torch on every device: there is no kernel to choose
        self.reduction = reduction
        values = dict(self.defaults)
        for k, v in hp.items():
            if k not in values:
                raise unknown("hyperparameter", k, values, f"{self.name}'s hyperparameters are {', '.join(values)}")
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(float(v)):
                raise DPALogicError(f"hyperparameter {k} must be a finite number, got {v!r}")
            values[k] = float(v)
        self.hyperparameters = values
        self.check()

    def check(self) -> None:
        """Refuse hyperparameters that break the loss or turn it around (β ≤ 0 prefers the rejected answer)."""
        # every one of these losses scores an answer by β·(its log-ratio or reward): β < 0 turns the preference
        # around, β = 0 makes the loss a constant; the wording is `dpalogic train`'s (training.config.check_loss)
        if (beta := self.hyperparameters.get("beta", 1.0)) <= 0:
            raise DPALogicError(
                f"{self.name} with beta={beta:g}: beta must be positive, or the loss rewards the rejected answer"
                + (" (at 0 it is a constant and learns nothing)" if beta == 0 else "")
            )
        ls = self.hyperparameters.get("label_smoothing", 0.0)
        if not 0 <= ls < 0.5:
            raise DPALogicError(f"{self.name}: label_smoothing must lie in [0, 0.5), got {ls:g}")

    def extra_repr(self) -> str:
        hp = ", ".join(f"{k}={v:g}" for k, v in self.hyperparameters.items())
        return f"{self.name} (no structure), {hp}, reduction={self.reduction!r}"

    # ------------------------------------------------------------------ state (none here; BCO's running mean)

    def stats_state(self) -> dict[str, float]:
        """Batch statistics carried across steps, as JSON numbers (saved in checkpoints); none by default."""
        return {}

    def load_stats_state(self, state: Mapping[str, float]) -> None:
        if state:
            raise DPALogicError(f"{self.name} keeps no running statistics, but the checkpoint has {sorted(state)}")

    # ------------------------------------------------------------------ calling

    def forward(
        self,
        chosen_logps: torch.Tensor | None = None,
        rejected_logps: torch.Tensor | None = None,
        ref_chosen_logps: torch.Tensor | None = None,
        ref_rejected_logps: torch.Tensor | None = None,
        chosen_lengths: torch.Tensor | None = None,
        rejected_lengths: torch.Tensor | None = None,
        *,
        logps: Mapping[str, torch.Tensor] | torch.Tensor | None = None,
        lengths: Mapping[str, torch.Tensor] | torch.Tensor | None = None,
        ref_logps: torch.Tensor | None = None,
        margin: torch.Tensor | None = None,
        **extra: Any,
    ) -> torch.Tensor:
        # PreferenceLoss's keywords all reach here: the forms these losses have no meaning for are refused by name
        if any(isinstance(t, torch.Tensor) for t in (logps, lengths)) or ref_logps is not None:
            raise DPALogicError(
                f"{self.name} takes no [B, K] matrices (logps=, ref_logps= or lengths= as tensors): it has no "
                f"structure, so it has no K-answer form. It takes {self.takes()}"
            )
        for arg, v, keys in (("logps", logps, "atom (M(yw), Ref(yw), …)"), ("lengths", lengths, "answer (yw, yl)")):
            if v is not None and not isinstance(v, Mapping):
                raise DPALogicError(f"{arg} must be a mapping keyed by {keys}, got {type(v).__name__}")
        if margin is not None:
            extra = {**extra, "margin": margin}
        self.check_extra(extra)
        given = {"chosen_logps": chosen_logps, "rejected_logps": rejected_logps,
                 "ref_chosen_logps": ref_chosen_logps, "ref_rejected_logps": ref_rejected_logps}  # fmt: skip
        for atom, t in (logps or {}).items():  # PreferenceLoss's keyed form, for the pair atoms
            if atom not in _ARG_OF_ATOM:
                raise unknown("atom", atom, list(_ARG_OF_ATOM), f"{self.name} takes pairs: {', '.join(_ARG_OF_ATOM)}")
            given[_ARG_OF_ATOM[atom]] = given[_ARG_OF_ATOM[atom]] if given[_ARG_OF_ATOM[atom]] is not None else t
        lens = {"chosen_lengths": chosen_lengths, "rejected_lengths": rejected_lengths}
        for k, t in (lengths or {}).items():
            key = {"yw": "chosen_lengths", "yl": "rejected_lengths"}.get(k)
            if key is None:
                raise unknown("answer", k, ["yw", "yl"], f"{self.name} takes pairs")
            lens[key] = lens[key] if lens[key] is not None else t
        need = ["chosen_logps", "rejected_logps"] + (["ref_chosen_logps", "ref_rejected_logps"] * self.needs_reference)
        need += ["chosen_lengths", "rejected_lengths"] * self.needs_lengths
        x = checked({**given, **lens}, need, self.name)
        return self.reduce(self.per_pair(x, **extra))

    def takes(self) -> str:
        """The inputs the loss is called with, for the errors that refuse another form."""
        args = ["chosen_logps", "rejected_logps"] + ["ref_chosen_logps", "ref_rejected_logps"] * self.needs_reference
        args += ["chosen_lengths", "rejected_lengths"] * self.needs_lengths
        return f"pairs: {', '.join(args)}, each [B]"

    def check_extra(self, extra: Mapping[str, Any]) -> None:
        """Keyword inputs beyond the pair's: only the loss's own (:attr:`extra_inputs`)."""
        if extra.get("margin") is not None:
            raise DPALogicError(f"{self.name} takes no margin: {self.margin_why}")
        for k in extra:
            if k not in self.extra_inputs:
                if self.extra_inputs:
                    hint = f"{self.name} takes {self.takes()}; and as keywords {', '.join(self.extra_inputs)}"
                    raise unknown("input", k, self.extra_inputs, hint)
                raise DPALogicError(f"{self.name} takes no {k}: it takes {self.takes()}")

    def per_pair(self, x: dict[str, torch.Tensor], **extra: Any) -> torch.Tensor:
        raise NotImplementedError

    def reduce(self, losses: torch.Tensor) -> torch.Tensor:
        if self.reduction == "mean":
            return losses.mean()
        return losses.sum() if self.reduction == "sum" else losses


def checked(x: Mapping[str, torch.Tensor | None], need: list[str], name: str) -> dict[str, torch.Tensor]:
    """The inputs that are given, each a 1-D tensor of one shape, log-probs ≤ 0 (a hair of rounding allowed) and
    floating point; float32 unless float64 was given. A needed input that is missing is an error naming it."""
    from dpalogic.runtime.checks import check_log_probs

    for k in need:
        if x.get(k) is None:
            why = (
                "it uses a reference model" if k.startswith("ref_") else "it is length-normalized" if "len" in k else ""
            )
            raise DPALogicError(f"{name} needs {k}" + (f": {why}" if why else ""))
    out: dict[str, torch.Tensor] = {}
    shape = None
    f64 = any(t is not None and t.dtype == torch.float64 for t in x.values() if isinstance(t, torch.Tensor))
    for k, t in x.items():
        if t is None:
            continue
        if not isinstance(t, torch.Tensor):
            raise DPALogicError(f"{k} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 1:  # e.g. a [B, K] matrix of K answers: these losses have no K-answer form
            raise DPALogicError(
                f"{name}: {k} must be a 1-D tensor [B], one value per answer, got shape {tuple(t.shape)}"
            )
        if shape is None:
            shape = t.shape
        if t.shape != shape:
            raise DPALogicError(
                f"all inputs must have the same shape [B]: {k} has {tuple(t.shape)}, not {tuple(shape)}"
            )
        if "logps" in k:
            if not t.is_floating_point():
                raise DPALogicError(f"{k} must be floating point, got {t.dtype}")
            check_log_probs([t], [k], DPALogicError)
        out[k] = t.to(torch.float64 if f64 else torch.float32)
    return out


def smoothed_logistic(z: torch.Tensor, ls: float) -> torch.Tensor:
    """``(1 − ε)·(−log σ(z)) + ε·(−log σ(−z))``: the conservative logistic loss (ε = 0: plain −log σ(z))."""
    loss = -F.logsigmoid(z)
    return loss * (1 - ls) - F.logsigmoid(-z) * ls if ls else loss


# ------------------------------------------------------------------------------------------------- pairwise losses

F_DIVERGENCES = ("reverse_kl", "forward_kl", "js_divergence", "alpha_divergence")
_EXP_MAX = {torch.float32: 80.0, torch.float64: 700.0}  # exp stays finite below these


def f_prime_score(log_ratio: torch.Tensor, divergence: str, coef: float) -> torch.Tensor:
    """f'(π/π_ref) up to an additive constant (which cancels between the two answers), from log(π/π_ref) = t.

    Wang et al. 2023, Table 1 (TRL's parametrization): reverse KL t; forward KL 1 − e^(−t); Jensen–Shannon
    log 2 + log σ(t); α-divergence (e^((c−1)t) − 1)/(c − 1) with c = ``f_alpha_divergence_coef`` (c → 1: t).
    """
    if divergence == "reverse_kl":
        return log_ratio
    if divergence == "forward_kl":
        return -torch.expm1(-log_ratio)
    if divergence == "js_divergence":
        return math.log(2) + F.logsigmoid(log_ratio)
    if abs(coef - 1.0) < 1e-6:  # the limit f'(u) → log u
        return log_ratio
    # clamped so exp stays finite (as TRL clamps): beyond it the ratio is astronomically far from the reference
    t = ((coef - 1.0) * log_ratio).clamp(max=_EXP_MAX[log_ratio.dtype])
    return torch.expm1(t) / (coef - 1.0)


class FDPO(UnstructuredLoss):
    """f-DPO (Wang et al. 2023, arXiv:2309.16240): ``−log σ(β·(f'(ρ_w) − f'(ρ_l)))`` with ρ = π/π_ref per answer.

    ``f_dpo`` takes ``f_divergence_type=`` (TRL's name; ``"reverse_kl"`` is DPO); ``f_dpo_forward_kl``,
    ``f_dpo_js_divergence``, ``f_dpo_alpha_divergence`` (with ``f_alpha_divergence_coef``) fix it by name.
    """

    name = "f_dpo"
    defaults = {"beta": 0.1, "f_alpha_divergence_coef": 0.5}
    divergence = "reverse_kl"

    def __init__(self, *, f_divergence_type: str | None = None, **kw: Any) -> None:
        if f_divergence_type is not None:
            if f_divergence_type not in F_DIVERGENCES:
                raise unknown("f_divergence_type", str(f_divergence_type), F_DIVERGENCES)
            self.divergence = f_divergence_type
        super().__init__(**kw)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, f_divergence_type={self.divergence!r}"

    def per_pair(self, x: dict[str, torch.Tensor], **extra: Any) -> torch.Tensor:
        c = self.hyperparameters["f_alpha_divergence_coef"]
        w = f_prime_score(x["chosen_logps"] - x["ref_chosen_logps"], self.divergence, c)
        lo = f_prime_score(x["rejected_logps"] - x["ref_rejected_logps"], self.divergence, c)
        return -F.logsigmoid(self.hyperparameters["beta"] * (w - lo))


def _f_dpo_variant(divergence: str) -> type[FDPO]:
    return type(f"FDPO_{divergence}", (FDPO,), {"name": f"f_dpo_{divergence}", "divergence": divergence})


class DPOP(UnstructuredLoss):
    """DPO-Positive (Pal et al. 2024, arXiv:2402.13228, Eq. 3):
    ``−log σ(β·(log ρ_w − log ρ_l − λ·max(0, log π_ref(yw) − log πθ(yw))))``, λ = ``dpop_lambda``."""

    name = "dpop"
    defaults = {"beta": 0.1, "dpop_lambda": 50.0}

    def check(self) -> None:
        super().check()
        if self.hyperparameters["dpop_lambda"] < 0:
            raise DPALogicError(f"dpop: dpop_lambda must not be negative, got {self.hyperparameters['dpop_lambda']:g}")

    def per_pair(self, x: dict[str, torch.Tensor], **extra: Any) -> torch.Tensor:
        lw = x["chosen_logps"] - x["ref_chosen_logps"]
        ll = x["rejected_logps"] - x["ref_rejected_logps"]
        penalty = torch.clamp(-lw, min=0.0)  # max(0, log π_ref(yw) − log πθ(yw)): the chosen answer lost mass
        h = self.hyperparameters
        return -F.logsigmoid(h["beta"] * (lw - ll - h["dpop_lambda"] * penalty))


class AlphaPO(UnstructuredLoss):
    """AlphaPO (Gupta et al. 2025, arXiv:2501.03884): SimPO with the reward ``r = (1 − p^(−α))/α`` of the
    length-normalized probability ``p = exp(log π(y)/|y|)``; α → 0 is SimPO. As TRL's CPOTrainer computes it:
    ``(1 − ε)·(−log σ(z)) + ε·(−log σ(−z))``, ``z = β·(r_w − r_l) − γ``. Reference-free.

    ``alpha`` is AlphaPO's α (TRL's CPOConfig name; there the NLL weight is ``cpo_alpha``); ``gamma`` is SimPO's
    margin, named as in the catalog's ``simpo`` (TRL: ``simpo_gamma``).
    """

    name = "alphapo"
    defaults = {"beta": 0.1, "gamma": 0.5, "alpha": 0.25, "label_smoothing": 0.0}  # TRL's, but α (TRL: 0, SimPO)
    margin_why = "its margin is the constant gamma (SimPO's γ); the paper defines no per-pair one"
    needs_reference = False
    needs_lengths = True

    def per_pair(self, x: dict[str, torch.Tensor], **extra: Any) -> torch.Tensor:
        h = self.hyperparameters
        a = h["alpha"]
        avg_w = x["chosen_logps"] / x["chosen_lengths"].clamp(min=1.0)
        avg_l = x["rejected_logps"] / x["rejected_lengths"].clamp(min=1.0)
        # (1 − p^(−α))/α = −expm1(−α·log p)/α: exact near α = 0, where it tends to log p
        reward = (lambda t: -torch.expm1(-a * t) / a) if a != 0 else (lambda t: t)
        z = h["beta"] * (reward(avg_w) - reward(avg_l)) - h["gamma"]
        return smoothed_logistic(z, h["label_smoothing"])


class AOT(UnstructuredLoss):
    """Alignment via Optimal Transport (Melnyk et al. 2024, arXiv:2406.05882), as TRL's ``aot``: the batch's
    log-ratio margins ``log π(yw)/π(yl)`` and the reference's are each *sorted*, then compared position by position,
    ``(1 − ε)·(−log σ(β·Δ_k)) + ε·(−log σ(−β·Δ_k))``. Entry k of the result belongs to rank k, not to pair k."""

    name = "aot"
    defaults = {"beta": 0.1, "label_smoothing": 0.0}
    margin_why = (
        "it sorts the batch's log-ratio margins and compares them rank by rank, so no pair keeps a link of its own "
        "for a margin to shift (the paper defines no per-pair margin)"
    )

    def sorted_delta(self, x: dict[str, torch.Tensor]) -> torch.Tensor:
        policy = torch.sort(x["chosen_logps"] - x["rejected_logps"]).values
        ref = torch.sort(x["ref_chosen_logps"] - x["ref_rejected_logps"]).values
        return policy - ref

    def per_pair(self, x: dict[str, torch.Tensor], **extra: Any) -> torch.Tensor:
        h = self.hyperparameters
        return smoothed_logistic(h["beta"] * self.sorted_delta(x), h["label_smoothing"])


class AOTUnpaired(AOT):
    """AOT for unpaired answers (TRL's ``aot_unpaired``): the chosen log-ratios ``log π/π_ref`` and the rejected ones
    are sorted separately, then compared rank by rank."""

    name = "aot_unpaired"

    def takes(self) -> str:
        return (
            "the chosen and the rejected answers' log-probs chosen_logps, rejected_logps, ref_chosen_logps, "
            "ref_rejected_logps, each [B] (sorted separately, so row i of each need not be a pair)"
        )

    def sorted_delta(self, x: dict[str, torch.Tensor]) -> torch.Tensor:
        chosen = torch.sort(x["chosen_logps"] - x["ref_chosen_logps"]).values
        rejected = torch.sort(x["rejected_logps"] - x["ref_rejected_logps"]).values
        return chosen - rejected


PAIRWISE: dict[str, type[UnstructuredLoss]] = {
    "f_dpo": FDPO,
    **{f"f_dpo_{d}": _f_dpo_variant(d) for d in F_DIVERGENCES},
    "dpop": DPOP,
    "alphapo": AlphaPO,
    "aot": AOT,
    "aot_pair": AOT,
    "aot_unpaired": AOTUnpaired,
}
