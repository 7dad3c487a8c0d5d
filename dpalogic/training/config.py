"""The settings of a training run (no torch import: the CLI builds its flags from these fields at start-up)."""

from __future__ import annotations

import os
import types
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from typing import Any

from dpalogic.errors import DPALogicError, unknown
from dpalogic.training.fields import finite_number

DEFAULT_LR = 1e-5  # fine-tuning a pretrained model
TINY_LR = 1e-3  # a freshly initialized tiny model: at 1e-5 it barely moves in a few hundred steps


@dataclass
class TrainConfig:
    """Every setting of a run; each field is a ``dpalogic train`` flag (``--grad-accum``) and a config-file key."""

    loss: str = "dpo"  # catalog name or structure text
    hp: dict[str, float] = field(default_factory=dict)  # loss hyperparameters, e.g. {"beta": 0.1}
    model: str = "tiny"  # local folder, or "tiny"
    ref_model: str | None = None  # local folder; default: a frozen copy of the initial policy
    data: str | None = None
    eval: str | None = None
    out: str = "runs/dpalogic"
    epochs: int = 1
    max_steps: int | None = None  # optimizer steps; overrides epochs
    batch_size: int = 8  # pairs per device per micro-batch
    eval_batch_size: int | None = None
    grad_accum: int = 1
    lr: float | None = None  # None: DEFAULT_LR, or TINY_LR with model "tiny" (set in __post_init__)
    weight_decay: float = 0.0
    warmup_ratio: float = 0.1
    min_lr_ratio: float = 0.0  # the cosine ends at lr × min_lr_ratio
    max_grad_norm: float = 1.0  # 0 disables clipping (the norm is still logged)
    seed: int = 0
    max_length: int | None = 1024
    max_prompt_length: int | None = 512
    reference: str = "cache"  # "cache": log-probs computed once and kept on disk; "model": a frozen copy in memory
    fused: bool = (
        False  # dpalogic.runtime.fused's FusedLinearPreferenceLoss instead of logits → log-probs → PreferenceLoss
    )
    fused_chunk_size: int = 1  # pairs per chunk of the fused loss
    fused_max_chunk_tokens: int | None = None  # cap on the fused loss's logits rows (two passes beyond it)
    bf16: str = "auto"  # "auto" (on when the GPU supports it), "true", "false"
    strict_data: bool = False  # a malformed row is fatal instead of skipped
    margin_from: str | None = None  # "margin" or "scores": a margin from each row (training.annotations, .ranked)
    margin_scale: float = 1.0  # the margin is margin_scale × the row's margin (or its score difference)
    pairs: str | None = None  # "all", "adjacent", "best-vs-rest": pairs from K-answer rows (training.ranked)
    curriculum: str | None = None  # "easy-to-hard": those pairs ordered by score gap, largest first (Curry-DPO)
    log_every: int = 10
    eval_every: int = 100  # 0: evaluate only at the start and the end
    save_every: int = 500  # 0: only the final checkpoint
    keep_checkpoints: int = 2
    resume: str | None = None  # "auto" (the latest checkpoint in out/) or a checkpoint folder
    overwrite: bool = False  # replace a run already in out/ (log, checkpoints, final model) instead of refusing
    dropout: float = 0.0  # attention dropout of the tiny model
    progress: bool = True
    tensorboard: bool = True  # when the tensorboard package is installed
    device: str = "auto"  # "auto", "cpu", "cuda"
    # scaling (see dpalogic.training.scaling): sharding, adapters, recomputation
    fsdp: bool = False  # FSDP2 (fully_shard): parameters, gradients and AdamW state sharded across the processes
    deepspeed: str | None = None  # a DeepSpeed config file (ZeRO) used through accelerate
    lora_r: int | None = None  # LoRA rank: train a peft adapter instead of every weight
    lora_alpha: float | None = None  # LoRA scale numerator (None: 2 × lora_r)
    lora_targets: str = "all-linear"  # comma-separated module names, or peft's "all-linear"
    gradient_checkpointing: bool = False  # recompute each layer's activations in the backward pass

    def __post_init__(self) -> None:
        if self.lr is None:
            self.lr = TINY_LR if self.model == "tiny" else DEFAULT_LR

    @classmethod
    def from_dict(
        cls, d: Mapping[Any, Any], source: str = "config", origins: Mapping[str, str] | None = None
    ) -> TrainConfig:
        """A validated config from a mapping of settings; ``origins`` names where each key came from (for messages)."""
        names = {f.name for f in fields(cls)}
        clean = {}
        for k, v in d.items():
            key = str(k).replace("-", "_")
            if key not in names:
                name = str(k) if len(str(k)) <= 80 else f"{str(k)[:60]}… ({len(str(k))} chars)"
                raise unknown(f"{source} key", name, sorted(names))
            clean[key] = v
        cfg = cls(**clean)
        cfg.validate(origins if origins is not None else dict.fromkeys(clean, source))
        return cfg

    def validate(self, origins: Mapping[str, str] | None = None) -> None:
        """Check every field against its declared type and range, then the loss and its hyperparameters.

        Values are normalized in place (an int where a float is declared becomes a float, ``2.0`` for an int field
        becomes ``2``, bf16 ``true`` becomes ``"true"``). ``origins`` maps a field to where it was set
        (``"--batch-size"``, ``"run.yaml"``) so the message can say so. No model or data file is opened here.
        """
        origins = origins or {}
        hints = typing.get_type_hints(type(self))
        for f in fields(self):
            where = f" (from {origins[f.name]})" if f.name in origins else ""
            setattr(self, f.name, _checked(f.name, hints[f.name], getattr(self, f.name), where))
        if self.max_length is not None and self.max_prompt_length is not None:
            if self.max_prompt_length >= self.max_length:
                raise DPALogicError(
                    f"max_prompt_length ({self.max_prompt_length}) must be below max_length ({self.max_length})"
                )
        self._check_scaling()
        check_loss(self.loss, self.hp)
        if self.margin_from is not None:
            check_margin_loss(self.loss, self.hp)
        if self.curriculum is not None and self.pairs is None:
            raise DPALogicError(
                "curriculum orders pairs made from K-answer rows, but pairs is not set: pass --pairs all, adjacent or best-vs-rest"
            )

    def _check_scaling(self) -> None:
        """Settings that cannot go together, refused with the reason before anything loads."""
        if self.fsdp and self.deepspeed:
            raise DPALogicError("fsdp and deepspeed both shard the model: choose one")
        if self.fused and (self.fsdp or self.deepspeed):
            raise DPALogicError(
                "fused cannot run with fsdp or deepspeed: the fused loss multiplies the final hidden states by the "
                "whole LM head outside the model's forward pass, where a sharded run holds only this process's "
                "shard of it. Drop --fused (the logits are then computed per micro-batch), or shard without it"
            )
        if self.lora_r is None and self.lora_alpha is not None:
            raise DPALogicError("lora_alpha is set but lora_r is not: pass --lora-r N to train a LoRA adapter")
        targets = [t.strip() for t in self.lora_targets.split(",")]
        if not all(targets):
            raise DPALogicError(f"lora_targets must be comma-separated module names, got {_show(self.lora_targets)}")
        if self.lora_r is not None and self.fused and "lm_head" in targets:
            raise DPALogicError(
                "fused cannot train a LoRA adapter on lm_head: the fused loss reads the LM head's weight directly "
                "(drop lm_head from --lora-targets, or --fused)"
            )


# --------------------------------------------------------------------------------------------------- field checks

_Range = tuple[Callable[[Any], bool], str]
_POSITIVE_INT: _Range = (lambda v: v >= 1, "a positive integer")
_NON_NEGATIVE_INT: _Range = (lambda v: v >= 0, "a non-negative integer")
_NON_NEGATIVE: _Range = (lambda v: v >= 0, "a non-negative number")
_UNIT: _Range = (lambda v: 0 <= v < 1, "a number in [0, 1)")

# Bounds beyond the declared type (every field is type-checked from its annotation, so a new field is checked even
# without an entry here). numpy seeds the run too, and it takes seeds below 2**32.
RANGES: dict[str, _Range] = {
    **dict.fromkeys(
        (
            "epochs",
            "max_steps",
            "batch_size",
            "eval_batch_size",
            "grad_accum",
            "max_length",
            "max_prompt_length",
            "fused_chunk_size",
            "fused_max_chunk_tokens",
            "log_every",
            "keep_checkpoints",
            "lora_r",
        ),
        _POSITIVE_INT,
    ),  # fmt: skip
    "eval_every": _NON_NEGATIVE_INT,
    "save_every": _NON_NEGATIVE_INT,
    "seed": (lambda v: 0 <= v < 2**32, "an integer in [0, 2**32)"),
    "lr": (lambda v: v > 0, "a positive number"),
    "lora_alpha": (lambda v: v > 0, "a positive number"),
    "weight_decay": _NON_NEGATIVE,
    "max_grad_norm": _NON_NEGATIVE,
    "warmup_ratio": _UNIT,
    "dropout": _UNIT,
    "min_lr_ratio": (lambda v: 0 <= v <= 1, "a number in [0, 1]"),
}
CHOICES: dict[str, tuple[str, ...]] = {
    "reference": ("cache", "model"),
    "bf16": ("auto", "true", "false"),
    "device": ("auto", "cpu", "cuda"),
    "margin_from": ("margin", "scores"),
    "pairs": ("all", "adjacent", "best-vs-rest"),
    "curriculum": ("easy-to-hard",),
}
_TYPE_WORDS = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}


def _base(hint: Any) -> tuple[Any, bool]:
    """``(type, optional)`` of an annotation: ``int | None`` → ``(int, True)``, ``dict[str, float]`` → ``(dict, False)``."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        inner = [a for a in typing.get_args(hint) if a is not type(None)]
        return _base(inner[0])[0], len(inner) < len(typing.get_args(hint))
    return typing.get_origin(hint) or hint, False


def field_kind(hint: Any) -> Any:
    """The type a field holds, without ``None``: ``int | None`` → ``int`` (the CLI parses flags with it)."""
    return _base(hint)[0]


def _checked(name: str, hint: Any, v: Any, where: str) -> Any:
    """``v`` normalized to the field's type, or a DPALogicError saying what the field must be."""
    kind, optional = _base(hint)
    rng = RANGES.get(name)
    if name in CHOICES:
        want = " or ".join(", ".join(CHOICES[name]).rsplit(", ", 1))
    elif rng is not None:
        want = rng[1]
    else:
        want = _TYPE_WORDS.get(kind, f"a {getattr(kind, '__name__', kind)}")
    if optional:
        want += " or null"

    def bad() -> DPALogicError:
        return DPALogicError(f"{name} must be {want}, got {_show(v)}{where}")

    if v is None:
        if optional:
            return None
        raise bad()
    if name == "bf16" and isinstance(v, bool):  # `bf16: true` in YAML means the string "true"
        v = str(v).lower()
    if kind is bool:
        if not isinstance(v, bool):
            raise bad()
        return v
    if kind is int:
        x = finite_number(v)
        if x is None or x != int(x):
            raise bad()
        out: Any = v if isinstance(v, int) else int(x)
    elif kind is float:
        out = finite_number(v)
        if out is None:
            raise bad()
    elif kind is str:
        if not isinstance(v, str):
            raise bad()
        if "\x00" in v or not _encodable(v):
            raise DPALogicError(f"{name} holds a NUL character or a lone surrogate: {_show(v)}{where}")
        if name in CHOICES and v.lower() not in CHOICES[name]:
            raise bad()
        return v.lower() if name in CHOICES else v
    elif kind is dict:
        return _checked_hp(name, v, where)
    elif not isinstance(v, kind):
        raise bad()
    else:
        return v
    if rng is not None and not rng[0](out):
        raise bad()
    return out


def _show(v: Any, limit: int = 80) -> str:
    """``repr(v)``, shortened: a value pasted by mistake may be megabytes long."""
    r = repr(v)
    return r if len(r) <= limit else f"{r[: limit - 15]}… ({len(r)} chars)"


def _encodable(s: str) -> bool:
    """Text usable as a file name and in messages (no lone surrogates)."""
    try:
        os.fsencode(s)
    except UnicodeEncodeError:
        return False
    return True


def _checked_hp(name: str, v: Any, where: str) -> dict[str, float]:
    if not isinstance(v, Mapping):
        raise DPALogicError(f"{name} must be a mapping of hyperparameter names to numbers, got {_show(v)}{where}")
    out = {}
    for k, x in v.items():
        num = finite_number(x)
        if not isinstance(k, str) or not _encodable(k):
            raise DPALogicError(f"{name}: hyperparameter names must be strings, got {_show(k)}{where}")
        if num is None:
            raise DPALogicError(f"hyperparameter {_show(k)} must be a finite number, got {_show(x)}{where}")
        out[k] = num
    return out


# --------------------------------------------------------------------------------------------------- the loss


def check_loss(loss: str, hp: Mapping[str, float]) -> None:
    """The loss compiles with these hyperparameters, and they keep it a preference for the chosen answer.

    Compiling (:class:`~dpalogic.runtime.preference_loss.PreferenceLoss`) rejects unknown hyperparameter names, values that make a
    term non-finite (IPO at β = 0) and EXO's and DiscoPOP's ranges. A value can also turn the loss around without
    making anything infinite, which only the terms' roles reveal: a preference term with a scale β ≤ 0, a negative
    weight, or (squared link, IPO) a target 1/(2β) ≤ 0 rewards the *rejected* answer; a negative NLL weight (α)
    lowers the chosen answer's likelihood; label smoothing that weighs as much as the preference cancels it.
    """
    from dpalogic.runtime.preference_loss import PreferenceLoss, bind_term

    fn = PreferenceLoss(loss, reduction="none", **hp)
    if getattr(fn, "structure_free", False):  # no terms to inspect: it checked its own hyperparameters (β > 0, …)
        return
    values = fn.hyperparameters
    name = fn.program.name or _show(loss)
    shown = ", ".join(f"{k}={v:g}" for k, v in values.items())
    pref = smooth = 0.0
    for term in fn.program.terms:
        b = bind_term(term, values)
        if term.role == "preference":
            for ok, what in (
                (b.scale > 0, f"the scale of log ρ ({term.scale} = {b.scale:g})"),
                (b.coef >= 0, f"the weight of a preference term ({term.coef} = {b.coef:g})"),
                (b.link != "squared" or b.shift > 0, f"the target margin ({term.shift} = {b.shift:g})"),
            ):
                if not ok:
                    raise DPALogicError(
                        f"{name} with {shown}: {what} must be positive, or the loss rewards the rejected answer"
                    )
            pref += b.coef
        elif term.role == "smoothing":
            smooth += max(b.coef, 0.0)
        elif term.role == "nll" and b.coef < 0:
            raise DPALogicError(
                f"{name} with {shown}: the NLL weight {term.coef} = {b.coef:g} must not be negative "
                "(it would lower the chosen answer's likelihood)"
            )
    if pref <= smooth:
        raise DPALogicError(
            f"{name} with {shown}: the preference terms weigh {pref:g} and the label-smoothing terms {smooth:g}, so "
            "nothing is left that prefers the chosen answer (lower label_smoothing, or give the preference weight)"
        )


def check_margin_loss(loss: str, hp: Mapping[str, float]) -> None:
    """A per-pair margin shifts the link of a loss's preference terms: the loss must have some."""
    from dpalogic.runtime.preference_loss import PreferenceLoss

    fn = PreferenceLoss(loss, reduction="none", **hp)
    terms = [] if getattr(fn, "structure_free", False) else fn.program.terms
    if not any(t.role in ("preference", "smoothing") for t in terms):
        raise DPALogicError(
            f"margin_from: a per-pair margin shifts the link of a loss's preference terms, and {_show(loss)} has "
            "none (it has no structure, or only likelihood terms)"
        )
