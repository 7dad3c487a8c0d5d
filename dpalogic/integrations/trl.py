"""TRL's ``DPOTrainer`` with any dpalogic loss: a catalog name or a derived structure.

>>> from dpalogic.integrations.trl import DPALogicDPOTrainer
>>> trainer = DPALogicDPOTrainer(model, args=DPOConfig(...), train_dataset=ds, processing_class=tok,
...                              loss="(M(yl) -> M(yw), M(yw) | M(yl))", loss_kwargs={"beta": 0.5})  # doctest: +SKIP
>>> trainer.train()  # doctest: +SKIP

Written against TRL 1.16, whose ``DPOTrainer`` computes log-probs, reference log-probs, the loss and its metrics in
one method, ``_compute_loss(model, inputs, return_outputs)`` (``compute_loss`` only wraps it). The subclass overrides
that method: it keeps TRL's data pipeline, fused LM head (``fused_lm_head=True`` gives per-token log-probs without
the full logits), reference handling (``compute_ref_log_probs``: a reference model, PEFT adapters switched off, or
``precompute_ref_log_probs``) and metric names, and replaces only the loss by :class:`~dpalogic.PreferenceLoss` on
the summed completion log-probs (completion token counts as lengths, for length-normalized losses).

Hyperparameters: ``loss_kwargs`` first; then any ``DPOConfig`` field of the same name (``beta``,
``label_smoothing``, ``discopop_tau``) that was set to a non-default value; then dpalogic's defaults for the loss.
``DPOConfig.loss_type`` is ignored. Reference-free losses never run the reference model.
"""

from __future__ import annotations

import copy
import dataclasses
import warnings
from typing import Any

import torch
from trl import DPOConfig, DPOTrainer

from dpalogic import PreferenceLoss
from dpalogic.errors import DPALogicError
from dpalogic.runtime.metrics import pair_rewards

_TRL_METRICS = (
    ("rewards/chosen", "chosen_rewards"),
    ("rewards/rejected", "rejected_rewards"),
    ("rewards/accuracies", "accuracy"),
    ("rewards/margins", "margins"),
    ("logps/chosen", "chosen_logps"),
    ("logps/rejected", "rejected_logps"),
)
_NON_MODEL_KEYS = {"completion_mask", "ref_chosen_logps", "ref_rejected_logps"}


def _hyperparameters(loss: Any, args: DPOConfig | None, loss_kwargs: dict[str, float] | None) -> dict[str, float]:
    from dpalogic.semantics.catalog import resolve

    program = resolve(loss)
    hp: dict[str, float] = {}
    if args is not None:
        defaults = {f.name: f.default for f in dataclasses.fields(DPOConfig)}
        for name in program.defaults:
            if hasattr(args, name) and getattr(args, name) != defaults.get(name):
                hp[name] = float(getattr(args, name))  # the user set it in DPOConfig: honour it
    hp.update(loss_kwargs or {})
    return hp


class DPALogicDPOTrainer(DPOTrainer):
    """``trl.DPOTrainer`` whose loss is a dpalogic program (``loss=``: catalog name, structure text or Program)."""

    def __init__(
        self,
        model,
        ref_model=None,
        args: DPOConfig | None = None,
        *rest: Any,
        loss: Any = "dpo",
        loss_kwargs: dict[str, float] | None = None,
        **kwargs: Any,
    ) -> None:
        hp = _hyperparameters(loss, args, loss_kwargs)
        self.dpalogic_loss = PreferenceLoss(loss, reduction="none", **hp)
        needs_ref = self.dpalogic_loss.needs_reference
        precompute = bool(args is not None and args.precompute_ref_log_probs)
        is_peft = hasattr(model, "peft_config") or kwargs.get("peft_config") is not None
        drop_ref = False
        if ref_model is None and not isinstance(model, str) and not is_peft and not precompute:
            # TRL would reload the reference from the model's hub id, which an in-memory model may not have and which
            # may not be reachable offline: a frozen copy of the initial weights is the same reference.
            ref_model = copy.deepcopy(model)
            drop_ref = not needs_ref
        super().__init__(model, ref_model, args, *rest, **kwargs)
        if drop_ref or (not needs_ref and not precompute and not is_peft):
            self.ref_model = None  # reference-free: keep no copy in memory and never run one
        if self.f_divergence_type != "reverse_kl":
            raise DPALogicError("DPALogicDPOTrainer supports f_divergence_type='reverse_kl' only")
        if self.use_weighting or self.ld_alpha is not None:
            raise DPALogicError("DPALogicDPOTrainer does not support use_weighting or ld_alpha")

    def _compute_loss(self, model, inputs, return_outputs):
        mode = "train" if self.model.training else "eval"
        model_kwargs = {k: v for k, v in inputs.items() if k not in _NON_MODEL_KEYS}
        model_kwargs["use_cache"] = False
        if self.aux_loss_enabled:
            model_kwargs["output_router_logits"] = True
        completion_mask = inputs["completion_mask"]
        shift_mask = completion_mask[..., 1:]
        labels = inputs["input_ids"].masked_fill(completion_mask == 0, -100)
        outputs = model(**model_kwargs, labels=labels, fused_lm_head=True)
        per_token_logps = outputs.log_probs[:, -shift_mask.size(1) :]  # 0 where the label is -100
        chosen_logps, rejected_logps = per_token_logps.sum(dim=1).chunk(2, dim=0)
        chosen_len, rejected_len = completion_mask.sum(dim=1).chunk(2, dim=0)

        ref_chosen = ref_rejected = None
        if self.dpalogic_loss.needs_reference:
            if "ref_chosen_logps" in inputs:  # precompute_ref_log_probs=True
                ref_chosen, ref_rejected = inputs["ref_chosen_logps"], inputs["ref_rejected_logps"]
            else:  # TRL's own reference pass: a reference model, or the PEFT model with its adapter disabled
                ref_chosen, ref_rejected = self.compute_ref_log_probs(
                    self.ref_model if self.ref_model is not None else self.model, inputs
                )

        per_pair = self.dpalogic_loss(
            chosen_logps, rejected_logps, ref_chosen, ref_rejected, chosen_len.float(), rejected_len.float()
        )
        loss = per_pair.mean()
        if self.aux_loss_enabled:
            loss = loss + self.router_aux_loss_coef * outputs.aux_loss

        # TRL's metric names; the reward is β·log(π/π_ref) with a reference and β·log π without one (pair_rewards)
        # β of the dpalogic loss when it has one (TRL's DPOConfig.beta need not be the loss's β)
        beta = self.dpalogic_loss.hyperparameters.get("beta", self.beta)
        pr = pair_rewards(chosen_logps, rejected_logps, ref_chosen, ref_rejected, beta=beta)
        gather = self.accelerator.gather
        m = self._metrics[mode]
        for name, key in _TRL_METRICS:
            m[name].append(gather(pr[key]).mean().item())
        if return_outputs:
            warnings.warn(
                "return_outputs=True recomputes the logits with an extra forward pass", FutureWarning, stacklevel=2
            )
            with torch.no_grad():
                outputs = model(**model_kwargs)
        return (loss, outputs) if return_outputs else loss
