"""DeepSpeed ZeRO state (stages 1–3) in dpalogic's checkpoint storage: safetensors and JSON, never a pickle.

DeepSpeed's own ``engine.save_checkpoint`` (and ``Accelerator.save_state`` under DeepSpeed) writes ``torch.save``
pickles. What an exact resume needs from a ZeRO engine is small and all tensors:

- the weights (whole: replicated under ZeRO-1/2, gathered one parameter at a time under ZeRO-3);
- on each rank, its fp32 master partitions (ZeRO keeps them flat, one per parameter group) and the base optimizer's
  state dict over them (AdamW's ``step``, ``exp_avg``, ``exp_avg_sq`` of this rank's partition).

The partitions depend on the number of processes and on the ZeRO stage, so a checkpoint resumes only with the same
world size and stage; :func:`check_partitions` refuses anything else with the reason. The engine is created with
``deepspeed.initialize`` on the process group accelerate set up (accelerate's own DeepSpeed path does not run on CPUs:
without a GPU it counts one process).

The training loop's side (:func:`engine_config`, :func:`make_engine`, :func:`grad_norm`): the engine takes dpalogic's
own AdamW and schedule, and the run's batch, accumulation, clipping and precision override the config file's.
"""

from __future__ import annotations

import copy
import json
import os
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from dpalogic.errors import DPALogicError
from dpalogic.training import checkpoint as ckpt

# a step count DeepSpeed never reaches: it prints nothing of its own per step (the run has its log and trackers)
_NEVER = 10**12


def use_cpu_ops(cpu: bool) -> None:
    """On a CPU run DeepSpeed's accelerator is the CPU (it would otherwise guess, with a warning, or pick a GPU)."""
    if cpu:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")


def _read_config(cfg) -> tuple[dict[str, Any], str]:
    """The config file's contents (``--deepspeed``), or the one an ``accelerate launch`` config describes."""
    if cfg.deepspeed:
        source = f"--deepspeed {cfg.deepspeed}"
        try:
            config = json.loads(Path(cfg.deepspeed).read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise DPALogicError(f"{source}: not a readable JSON DeepSpeed config ({e})") from None
        if not isinstance(config, dict):
            raise DPALogicError(f"{source}: a DeepSpeed config is a JSON object, not {type(config).__name__}")
        return config, source
    from accelerate.utils import DeepSpeedPlugin  # reads ACCELERATE_DEEPSPEED_* (and its config file) from the launch

    return copy.deepcopy(DeepSpeedPlugin().deepspeed_config), "the accelerate config"


def engine_config(cfg, *, world: int, bf16: bool, say: Callable[[str], None]) -> dict[str, Any]:
    """The DeepSpeed config of this run: ZeRO settings from the file, batch, accumulation, clipping and precision from
    the run (``--batch-size``, ``--grad-accum``, ``--max-grad-norm``, bf16), saying where the file differed."""
    config, source = _read_config(cfg)
    zero = config.get("zero_optimization") or {}
    stage = zero.get("stage", 0) if isinstance(zero, dict) else None
    if stage not in (1, 2, 3):
        raise DPALogicError(
            f"{source}: zero_optimization.stage is {stage!r}; dpalogic runs ZeRO stage 1, 2 or 3 (without ZeRO, "
            "run without --deepspeed: several processes then train under DDP)"
        )
    for part in ("offload_optimizer", "offload_param"):
        device = (zero.get(part) or {}).get("device", "none")
        if device not in (None, "none"):
            raise DPALogicError(
                f"{source}: {part} to {device} is not supported by dpalogic's loop (its checkpoints read the "
                "optimizer partitions in memory); drop the offload, or shard more with ZeRO-3 or more processes"
            )
    own = {
        "train_micro_batch_size_per_gpu": cfg.batch_size,
        "gradient_accumulation_steps": cfg.grad_accum,
        "train_batch_size": cfg.batch_size * cfg.grad_accum * world,
        "gradient_clipping": float(cfg.max_grad_norm) if cfg.max_grad_norm > 0 else 0.0,
    }
    for key, value in own.items():
        if config.get(key, "auto") not in ("auto", value):
            say(f"{source}: {key} {config[key]} replaced by this run's {value}")
    for key, what in (("optimizer", "AdamW (--lr, --weight-decay)"), ("scheduler", "schedule (warmup, cosine)")):
        if key in config:
            say(f"{source}: its {key} section is not used; the run's own {what} is")
            del config[key]
    for key in ("fp16", "bf16"):
        enabled = (config.get(key) or {}).get("enabled", False)
        if enabled not in (False, "auto", key == "bf16" and bf16):
            say(
                f"{source}: {key} {'on' if enabled else 'off'} replaced by this run's "
                + ("bf16" if bf16 else "float32")
            )
    config.update(own, fp16={"enabled": False}, bf16={"enabled": bf16}, steps_per_print=_NEVER)
    config["zero_optimization"] = {**zero, "stage": stage}
    return config


def make_engine(model: torch.nn.Module, optimizer: torch.optim.Optimizer, config: dict[str, Any]):
    """The DeepSpeed engine around ``model`` and the run's own ``optimizer`` (on accelerate's process group)."""
    import deepspeed
    from deepspeed.utils import logger

    logger.setLevel("WARNING")  # its config dump and per-step notes would drown the run's own output
    # DeepSpeed's collectives call torch.distributed functions torch has deprecated: one warning per call, not ours
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\.distributed\.c10d_logger")
    return deepspeed.initialize(model=model, optimizer=optimizer, config=config)[0]


def grad_norm(engine) -> float:
    """The global gradient norm before clipping, after the last backward of a step and *before* ``engine.step()``
    (which would apply it): what DeepSpeed's step computes, over every rank's gradient partitions."""
    from deepspeed.runtime.utils import combine_grad_norm_groups, is_invalid_grad_norm

    zero = engine.optimizer
    norm = zero.scaled_global_norm() if _stage(engine) < 3 else combine_grad_norm_groups(zero._get_norm_groups())
    # DeepSpeed marks a non-finite group norm as -1 (or inf once combined): the run sees nan, and stops
    return float("nan") if is_invalid_grad_norm(norm) else float(norm) / float(zero.loss_scale)


def masters_finite(engine) -> bool:
    """This rank's fp32 master partitions (the weights that train) are all finite."""
    return all(bool(torch.isfinite(t).all()) for t in _masters(engine.optimizer))


def partition_file(folder: Path, rank: int) -> Path:
    return Path(folder) / f"zero-{rank}.safetensors"


def _stage(engine) -> int:
    return int(engine.zero_optimization_stage())


def _masters(zero) -> list[torch.Tensor]:
    """This rank's flat fp32 master partitions, one per parameter group."""
    if hasattr(zero, "fp32_partitioned_groups_flat"):  # ZeRO-3
        return list(zero.fp32_partitioned_groups_flat)
    return list(zero.single_partition_of_fp32_groups)  # ZeRO-1/2


class _Z3Groups:
    """ZeRO-3 hands its fp32 partitions to the base optimizer only around a step; its state dict needs them there."""

    def __init__(self, zero) -> None:
        self.zero = zero if hasattr(zero, "_set_fp32_optimizer_param_groups") else None

    def __enter__(self) -> None:
        if self.zero is not None:
            self.zero._set_fp32_optimizer_param_groups()

    def __exit__(self, *exc: Any) -> None:
        if self.zero is not None:
            self.zero._clear_fp32_optimizer_param_groups()


def save_partitions(engine, folder: Path, rank: int, world: int) -> None:
    """Write this rank's part of the engine's optimizer state to ``folder/zero-RANK.safetensors``."""
    zero = engine.optimizer
    with _Z3Groups(zero):
        base = zero.optimizer.state_dict()
    state = {"zero_stage": _stage(engine), "world_size": world, "masters": _masters(zero), "base": base}
    ckpt.write_tensors(partition_file(folder, rank), state)


def check_partitions(folder: Path, rank: int, world: int, stage: int) -> None:
    """Refuse a checkpoint whose partitions were cut for another process count or ZeRO stage (before anything loads)."""
    path = partition_file(folder, rank)
    if not path.is_file():
        raise DPALogicError(
            f"{folder} holds no ZeRO optimizer partition for rank {rank} ({path.name}): it was saved by a run with "
            "fewer processes, or without DeepSpeed"
        )
    saved = ckpt.read_tensors(path)
    if saved["world_size"] != world or saved["zero_stage"] != stage:
        raise DPALogicError(
            f"{folder} was saved by ZeRO-{saved['zero_stage']} on {saved['world_size']} process(es); this run is "
            f"ZeRO-{stage} on {world}. ZeRO's optimizer partitions are cut by both, so resume with the same ones"
        )


def load_partitions(engine, folder: Path, rank: int, world: int) -> None:
    """Restore this rank's fp32 masters and base optimizer state (the weights come from :func:`load_weights`)."""
    check_partitions(folder, rank, world, _stage(engine))
    saved = ckpt.read_tensors(partition_file(folder, rank))
    zero = engine.optimizer
    masters = _masters(zero)
    if len(saved["masters"]) != len(masters) or any(
        a.shape != b.shape for a, b in zip(saved["masters"], masters, strict=False)
    ):
        raise DPALogicError(f"{folder}: the ZeRO partitions do not fit this model's parameters")
    with _Z3Groups(zero):
        zero.optimizer.load_state_dict(saved["base"])
    with torch.no_grad():
        for t, v in zip(masters, saved["masters"], strict=True):
            t.copy_(v)
    if hasattr(zero, "_hp_optimizer_states_linked"):  # ZeRO-1/2: relink each parameter's view of the new state
        zero._hp_optimizer_states_linked = False


def whole_weights(engine, *, main: bool, trainable_only: bool = False) -> dict[str, torch.Tensor]:
    """The model's parameters, whole, on the main rank (empty elsewhere); every rank must call it under ZeRO-3."""
    import deepspeed

    z3 = _stage(engine) == 3
    out: dict[str, torch.Tensor] = {}
    for name, p in engine.module.named_parameters():
        if trainable_only and not p.requires_grad:
            continue
        with deepspeed.zero.GatheredParameters([p], enabled=z3):  # one parameter at a time: memory stays small
            if main:
                out[name] = p.detach().to("cpu", copy=True)
    return out


def state_dict(engine, *, main: bool, trainable_only: bool) -> dict[str, torch.Tensor]:
    """The model's state dict, whole, on the main rank: its parameters (:func:`whole_weights`) and, unless only the
    trained parameters are asked for, its persistent buffers (never partitioned)."""
    out = whole_weights(engine, main=main, trainable_only=trainable_only)
    if main and not trainable_only:
        params = {n for n, _ in engine.module.named_parameters(remove_duplicate=False)}
        for name, t in engine.module.state_dict().items():
            if name not in params:
                out[name] = t.detach().to("cpu", copy=True)
    return out


def load_weights(engine, weights: dict[str, torch.Tensor], *, main: bool) -> None:
    """Set the model's parameters from ``weights``, read on the main rank only (empty elsewhere): under ZeRO-3 each is
    scattered from it as its gather closes, under ZeRO-1/2 (replicated parameters) broadcast from it. Every rank
    must call it."""
    import deepspeed

    z3 = _stage(engine) == 3
    names = [n for n, _ in engine.module.named_parameters()]
    present = torch.tensor([main and n in weights for n in names])  # rank 0 decides which are in the file
    if torch.distributed.is_initialized():
        torch.distributed.broadcast(present, src=0)
    for (name, p), here in zip(engine.module.named_parameters(), present.tolist(), strict=True):
        if not here:  # not in the checkpoint (a frozen parameter under LoRA): kept as initialized
            continue
        with deepspeed.zero.GatheredParameters([p], modifier_rank=0, enabled=z3):
            with torch.no_grad():
                if main:
                    p.copy_(weights[name])
                if not z3 and torch.distributed.is_initialized():
                    torch.distributed.broadcast(p.data, src=0)
