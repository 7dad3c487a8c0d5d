"""A finished run's model: ``out/final``, in the Hugging Face layout, whatever wrapped the weights during training.

Every rank calls :func:`save_final_model`, since gathering FSDP shards or ZeRO-3 partitions is collective; only rank
0 writes. Under LoRA only the adapter is saved, in peft's layout (``adapter_config.json``,
``adapter_model.safetensors``), so ``PeftModel.from_pretrained`` loads it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from dpalogic.training import scaling, zero


def save_final_model(
    model: torch.nn.Module, tokenizer: Any, final: Path, *, main: bool, fsdp: bool, lora: bool, engine: Any = None
) -> None:
    """The model (or its adapter) and the tokenizer into ``final``; ``engine`` is the DeepSpeed engine, if any."""
    # under FSDP the weights are gathered on rank 0 (every rank takes part)
    whole = scaling.model_state(model, sharded=True, trainable_only=lora) if fsdp else None
    if engine is not None:  # gathered one parameter at a time under ZeRO-3
        whole = zero.state_dict(engine, main=main, trainable_only=lora)
    if not main:
        return
    from transformers.utils import logging as hf_logging

    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # no "Writing model shards" bar in the run's output
    try:
        saver = model if lora else scaling.hf_model(model)
        saver.save_pretrained(final, **({"state_dict": whole} if whole is not None else {}))
        tokenizer.save_pretrained(final)
    finally:
        if bars:
            hf_logging.enable_progress_bar()
