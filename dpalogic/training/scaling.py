"""Scaling the policy: processes and precision through ``accelerate``, FSDP2, LoRA adapters, gradient checkpointing,
and whole-model state dicts for dpalogic's checkpoints.

What ``accelerate`` does for the loop: the process group (NCCL on GPUs, gloo on CPUs), the device, bf16 autocast,
``no_sync`` during gradient accumulation, the DDP wrapper, unwrapping, and the TensorBoard tracker.

What it does not do, and why:

- *Checkpoints.* ``Accelerator.save_state`` writes the optimizer, scheduler and RNG states with ``torch.save``, and
  ``load_state`` unpickles them; a checkpoint someone hands over could then run code. dpalogic keeps its own storage
  (:mod:`dpalogic.training.checkpoint`: safetensors and JSON under a sha256 manifest), and gathers sharded state here
  with ``torch.distributed.checkpoint.state_dict`` (full state dicts, assembled on rank 0).
- *DeepSpeed.* ``accelerate`` drives DeepSpeed only on GPUs, and saves its state with pickles: the loop makes the
  engine itself (:mod:`dpalogic.training.zero`) on accelerate's process group, from ``--deepspeed CONFIG.json`` or an
  ``accelerate launch`` config (``ACCELERATE_USE_DEEPSPEED``), and checkpoints its partitions as safetensors.
- *FSDP.* ``accelerate`` enables its FSDP plugin only on accelerators (on CPUs it silently falls back to DDP), so
  :func:`shard` calls ``fully_shard`` (FSDP2) itself: one code path, tested on CPUs with gloo, the same on GPUs. An
  ``accelerate launch --config_file examples/accelerate/fsdp.yaml`` run sets ``ACCELERATE_USE_FSDP``, which means
  ``--fsdp`` here.
"""

from __future__ import annotations

import importlib.util
import os
from typing import Any

import torch

from dpalogic.errors import DPALogicError, unknown


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes")


def fsdp_requested(cfg) -> bool:
    """``--fsdp``, or an ``accelerate launch`` whose config chose FSDP."""
    return bool(cfg.fsdp) or _env_flag("ACCELERATE_USE_FSDP")


def deepspeed_requested(cfg) -> bool:
    """``--deepspeed CONFIG``, or an ``accelerate launch`` whose config chose DeepSpeed."""
    return bool(cfg.deepspeed) or _env_flag("ACCELERATE_USE_DEEPSPEED")


def check_deepspeed(cfg) -> None:
    """DeepSpeed runs need the ``deepspeed`` package and a config file that exists; say so before anything loads."""
    if not deepspeed_requested(cfg):
        return
    how = f"--deepspeed {cfg.deepspeed}" if cfg.deepspeed else "the accelerate config (ACCELERATE_USE_DEEPSPEED)"
    if importlib.util.find_spec("deepspeed") is None:
        raise DPALogicError(
            f"{how} asks for DeepSpeed ZeRO, but the deepspeed package is not installed: install it (pip install "
            "deepspeed), or shard with --fsdp (FSDP2 shards parameters, gradients and optimizer state like ZeRO-3 "
            "and needs nothing beyond torch)"
        )
    if cfg.deepspeed and not os.path.isfile(cfg.deepspeed):
        raise DPALogicError(f"--deepspeed: no DeepSpeed config file at {cfg.deepspeed!r}")
    if fsdp_requested(cfg):  # one of them from an accelerate launch's environment (the flags are checked before)
        raise DPALogicError(f"{how} and FSDP both shard the model: choose one")


def make_accelerator(cfg, project_dir: str):
    """The run's ``Accelerator``: CPU or GPU, bf16 autocast when asked for and supported, TensorBoard when installed."""
    from accelerate import Accelerator
    from accelerate.utils import is_tensorboard_available

    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise DPALogicError("device cuda was asked for but no CUDA GPU is visible")
    cpu = cfg.device == "cpu" or not torch.cuda.is_available()
    bf16 = str(cfg.bf16).lower()
    if bf16 == "true" and cpu:
        raise DPALogicError("bf16 autocast needs a CUDA GPU (this run is on CPU)")
    use_bf16 = not cpu and (bf16 == "true" or (bf16 == "auto" and torch.cuda.is_bf16_supported()))
    mixed = "bf16" if use_bf16 else "no"
    _check_process_state(cpu, mixed)
    trackers = "tensorboard" if cfg.tensorboard and is_tensorboard_available() else None
    if not deepspeed_requested(cfg):
        return Accelerator(cpu=cpu, mixed_precision=mixed, log_with=trackers, project_dir=project_dir)
    # DeepSpeed: accelerate sets up the process group only; the engine is dpalogic's (dpalogic.training.zero), since
    # accelerate's own DeepSpeed path needs a GPU and checkpoints with pickles. Its launch flag is hidden meanwhile.
    from dpalogic.training.zero import use_cpu_ops

    use_cpu_ops(cpu)
    flag = os.environ.pop("ACCELERATE_USE_DEEPSPEED", None)
    try:
        return Accelerator(cpu=cpu, mixed_precision=mixed, log_with=trackers, project_dir=project_dir)
    finally:
        if flag is not None:
            os.environ["ACCELERATE_USE_DEEPSPEED"] = flag


def _check_process_state(cpu: bool, mixed: str) -> None:
    """Refuse a run whose settings differ from those accelerate already holds in this process.

    accelerate keeps the device, the precision and the process group in process-wide singletons, set by the first
    ``Accelerator`` and reused by every later one (resetting them takes private calls). A run with the same settings
    (every run on one machine, as in the tests) shares them; another device or precision would be ignored silently
    (CPU then GPU) or refused with accelerate's own error, so it is refused here with the way out.
    """
    from accelerate.state import AcceleratorState, is_initialized

    if not is_initialized():
        return
    state = AcceleratorState()
    was, now = (state.device.type == "cpu", state.mixed_precision), (cpu, mixed)
    if was != now:
        show = ["{} with mixed precision {!r}".format("the CPU" if c else "a GPU", m) for c, m in (was, now)]
        raise DPALogicError(
            f"an earlier training run in this process used {show[0]} and this one asks for {show[1]}: accelerate "
            "fixes these once per process, so start this run in a new process (e.g. `dpalogic train`)"
        )
    if state.num_processes > 1 and not torch.distributed.is_initialized():
        raise DPALogicError(
            "an earlier distributed run in this process has ended its process group: start this run in a new process"
        )


def release_accelerator(acc, owns_group: bool, engine=None, finished: bool = False) -> None:
    """End the run: its DeepSpeed engine (its hooks and buffers), its trackers, and the process group if accelerate
    created it for this run (``finished``: after a barrier, every rank having got to the end).

    accelerate's process-wide state stays (see :func:`_check_process_state`): the next run with the same settings in
    this process reuses it.
    """
    if engine is not None:  # before the process group goes: the engine's optimizer holds handles into it
        engine.destroy()
    if finished and owns_group and torch.distributed.is_initialized():
        # a run that finished waits for every rank before the group is torn down (accelerate's end_training does it):
        # a rank that destroys it while another still talks to it leaves that one's gloo threads to die at exit
        # ("terminate called without an active exception", SIGABRT); a failed run does not wait (others may not come)
        torch.distributed.barrier()
    acc.end_training()
    if owns_group and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


# --------------------------------------------------------------------------------------------------- LoRA


def lora_targets(model, spec: str) -> str | list[str]:
    """``spec`` as peft's ``target_modules``; a name that no linear layer of ``model`` has is an error."""
    if spec.strip() == "all-linear":
        return "all-linear"
    names = [t.strip() for t in spec.split(",")]
    have = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)})
    for name in names:
        if name not in have:
            raise unknown("LoRA target module", name, have + ["all-linear"])
    return names


def apply_lora(model, cfg):
    """``model`` wrapped by peft with a LoRA adapter (B = 0, so it starts as the base model); only the adapter trains."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=cfg.lora_r,
        lora_alpha=cfg.lora_alpha if cfg.lora_alpha is not None else 2 * cfg.lora_r,
        target_modules=lora_targets(model, cfg.lora_targets),
        lora_dropout=0.0,
        bias="none",
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, config)


def hf_model(model):
    """The transformers model inside a peft wrapper (or ``model`` itself)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def enable_gradient_checkpointing(model) -> None:
    base = hf_model(model)
    if not getattr(base, "supports_gradient_checkpointing", False):
        raise DPALogicError(f"{type(base).__name__} does not support gradient checkpointing")
    # non-reentrant: correct with frozen inputs (LoRA) and with FSDP, and it keeps the RNG state (dropout) per layer
    kw = {"use_reentrant": False}
    if hasattr(base, "activation_checkpointing_enable"):  # the name from transformers 5 on
        base.activation_checkpointing_enable(activation_checkpointing_kwargs=kw)
    else:
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kw)


# --------------------------------------------------------------------------------------------------- FSDP2


def layer_classes(model) -> set[str]:
    """The class names of the model's transformer layers, as accelerate's FSDP plugin finds them: the layers the
    architecture declares unsplittable, or those an ``accelerate launch`` config names (FSDP_TRANSFORMER_CLS_TO_WRAP)."""
    from accelerate.utils import FullyShardedDataParallelPlugin

    plugin = FullyShardedDataParallelPlugin(fsdp_version=2, auto_wrap_policy="transformer_based_wrap")
    try:
        plugin.set_auto_wrap_policy(hf_model(model))
    except ValueError:  # a named class that this model does not contain: no layer to shard by
        return set()
    return set(plugin.transformer_cls_names_to_wrap or [])


def shard(model) -> None:
    """FSDP2: ``fully_shard`` each transformer layer (one all-gather per layer), then the rest at the root."""
    from torch.distributed.fsdp import fully_shard

    names = layer_classes(model)
    layers = [m for m in model.modules() if type(m).__name__ in names]
    if not layers:
        raise DPALogicError(
            f"--fsdp: {type(hf_model(model)).__name__} names no transformer layer class (_no_split_modules), so it "
            "cannot be sharded layer by layer"
        )
    for layer in layers:
        fully_shard(layer)
    fully_shard(model)


def _options(**kw: Any):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(**kw)


def model_state(model, *, sharded: bool, trainable_only: bool) -> dict[str, torch.Tensor]:
    """The weights to checkpoint (only the trained ones under LoRA); under FSDP gathered whole on rank 0 (empty on the
    other ranks). Every rank must call it."""
    if sharded:
        from torch.distributed.checkpoint.state_dict import get_model_state_dict

        opts = _options(full_state_dict=True, cpu_offload=True, ignore_frozen_params=trainable_only)
        return get_model_state_dict(model, options=opts)
    sd = model.state_dict()
    if trainable_only:
        keep = {n for n, p in model.named_parameters() if p.requires_grad}
        sd = {k: v for k, v in sd.items() if k in keep}
    return sd


def load_model_state(model, sd: dict[str, torch.Tensor], *, sharded: bool, trainable_only: bool) -> None:
    if sharded:
        from torch.distributed.checkpoint.state_dict import set_model_state_dict

        opts = _options(full_state_dict=True, broadcast_from_rank0=True, strict=not trainable_only)
        set_model_state_dict(model, sd, options=opts)
        return
    missing, unexpected = model.load_state_dict(sd, strict=not trainable_only)
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    if unexpected or set(missing) - frozen:
        raise DPALogicError(
            f"the checkpoint's weights do not fit this model (unexpected: {sorted(unexpected)[:3]}, missing: "
            f"{sorted(set(missing) - frozen)[:3]})"
        )


def optimizer_state(model, optimizer, *, sharded: bool) -> dict[str, Any]:
    if sharded:  # keyed by parameter name, gathered on rank 0
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

        return get_optimizer_state_dict(model, optimizer, options=_options(full_state_dict=True, cpu_offload=True))
    return optimizer.state_dict()


def load_optimizer_state(model, optimizer, sd: dict[str, Any], *, sharded: bool) -> None:
    if sharded:
        from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

        opts = _options(full_state_dict=True, broadcast_from_rank0=True)
        set_optimizer_state_dict(model, optimizer, sd, options=opts)
        return
    optimizer.load_state_dict(sd)
