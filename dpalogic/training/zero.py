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
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from dpalogic.errors import DPALogicError
from dpalogic.training import checkpoint as ckpt


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
