"""The settings of a training run (no torch import: the CLI builds its flags from these fields at start-up)."""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

from dpalogic.errors import DPALogicError, unknown


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
    lr: float = 1e-5
    weight_decay: float = 0.0
    warmup_ratio: float = 0.1
    min_lr_ratio: float = 0.0  # the cosine ends at lr × min_lr_ratio
    max_grad_norm: float = 1.0  # 0 disables clipping (the norm is still logged)
    seed: int = 0
    max_length: int | None = 1024
    max_prompt_length: int | None = 512
    reference: str = "cache"  # "cache": log-probs computed once and kept on disk; "model": a frozen copy in memory
    fused: bool = False  # dpalogic.fused's FusedLinearPreferenceLoss instead of logits → log-probs → PreferenceLoss
    fused_chunk_size: int = 1  # pairs per chunk of the fused loss
    fused_max_chunk_tokens: int | None = None  # cap on the fused loss's logits rows (two passes beyond it)
    bf16: str = "auto"  # "auto" (on when the GPU supports it), "true", "false"
    strict_data: bool = False  # a malformed row is fatal instead of skipped
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

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = "config") -> TrainConfig:
        names = {f.name for f in fields(cls)}
        clean = {}
        for k, v in d.items():
            key = k.replace("-", "_")
            if key not in names:
                raise unknown(f"{source} key", k, sorted(names))
            clean[key] = v
        cfg = cls(**clean)
        cfg.validate()
        return cfg

    def validate(self) -> None:
        def positive(name: str, allow_zero: bool = False) -> None:
            v = getattr(self, name)
            if v is None:
                return
            if not isinstance(v, (int, float)) or isinstance(v, bool) or v < 0 or (v == 0 and not allow_zero):
                raise DPALogicError(
                    f"{name} must be a {'non-negative' if allow_zero else 'positive'} number, got {v!r}"
                )

        for n in ("epochs", "batch_size", "grad_accum", "lr", "log_every", "keep_checkpoints"):
            positive(n)
        for n in ("max_steps", "eval_batch_size", "max_length", "max_prompt_length"):
            positive(n)
        for n in ("fused_chunk_size", "fused_max_chunk_tokens"):
            v = getattr(self, n)
            if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 1):
                raise DPALogicError(f"{n} must be a positive integer, got {v!r}")
        for n in ("weight_decay", "max_grad_norm", "eval_every", "save_every", "min_lr_ratio", "dropout"):
            positive(n, allow_zero=True)
        if not 0 <= self.warmup_ratio < 1:
            raise DPALogicError(f"warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        if self.reference not in ("cache", "model"):
            raise DPALogicError(f"reference must be 'cache' or 'model', got {self.reference!r}")
        if str(self.bf16).lower() not in ("auto", "true", "false"):
            raise DPALogicError(f"bf16 must be auto, true or false, got {self.bf16!r}")
        if not isinstance(self.overwrite, bool):
            raise DPALogicError(f"overwrite must be true or false, got {self.overwrite!r}")
        if self.device not in ("auto", "cpu", "cuda"):
            raise DPALogicError(f"device must be auto, cpu or cuda, got {self.device!r}")
        if not isinstance(self.hp, dict):
            raise DPALogicError(f"hp must be a mapping of hyperparameter names to numbers, got {self.hp!r}")
        for k, v in self.hp.items():
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                raise DPALogicError(f"hyperparameter {k} must be a number, got {v!r}")
