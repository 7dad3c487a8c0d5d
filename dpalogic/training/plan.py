"""``dpalogic train --plan``: the memory one process (one GPU) needs, before anything is launched.

The model is built on PyTorch's ``meta`` device from its config alone (the tiny model's, a local folder's
``config.json``, or an architecture transformers knows, such as ``llama``), so nothing is downloaded, no weight is read
and no memory is taken. From its parameters the plan counts, per process:

- weights, gradients and AdamW state *exactly* as the loop holds them: the weights in the dtype the loop loads them
  in (a checkpoint's own, float32 for ``tiny`` and for an architecture's defaults; ``--dtype`` says otherwise; bf16
  is autocast), a gradient per trained weight, ``exp_avg`` and ``exp_avg_sq`` plus a 4-byte ``step`` per trained
  tensor.
  FSDP2 and ZeRO-3 split all three across the processes (dim 0 of each tensor, rounded up); DDP keeps them whole and
  adds its gradient buckets.
- activations: what one micro-batch (``batch_size`` pairs, chosen and rejected rows of ``max_length`` tokens) keeps
  for the backward pass, counted for a Llama-style decoder layer with SDPA/flash attention (no ``L²`` scores), with
  and without gradient checkpointing. ``tests/test_memory_plan.py`` holds it against the bytes the tiny model really
  saves for backward.
- the logits (``2·B·L·V``, and the float32 log-softmax kept for backward), or the fused loss's buffer instead;
- the reference: nothing when its log-probs are cached (they live on the host), a second copy of the weights for
  ``--reference model``, nothing under LoRA (the base model with the adapter off).

Not counted: the CUDA context and allocator fragmentation (add 1–2 GiB), optimizer/communication workspaces.
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from dpalogic.errors import DPALogicError, unknown

STRATEGIES = ("ddp", "fsdp", "zero3")
GiB = 1024**3


@dataclass
class ModelShape:
    """What the plan needs to know about a model, read from its config on the meta device."""

    name: str
    params: int  # every weight
    trainable: int  # the weights AdamW trains (the adapter's under LoRA)
    trainable_tensors: int
    shard_rows: dict[str, int]  # FSDP/ZeRO-3: elements per process of every tensor (dim 0 split, rounded up)
    layer_params: int  # the largest transformer layer's weights
    root_params: int  # weights outside the transformer layers (embeddings, final norm, LM head)
    layers: int
    hidden: int
    kv_dim: int
    intermediate: int
    heads: int
    vocab: int
    weight_bytes: int  # per element: the dtype the loop loads the weights in (the config's, else float32)
    dtype: str


def model_config(spec: str):
    """A transformers config: ``tiny``, a local folder (or its ``config.json``), or an architecture name."""
    from transformers import AutoConfig
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    if spec == "tiny":
        from dpalogic.training.model import build_char_tokenizer, tiny_config

        return tiny_config(build_char_tokenizer())
    path = spec[: -len("config.json")] if spec.endswith("config.json") else spec
    if os.path.isdir(path or "."):
        try:
            return AutoConfig.from_pretrained(path or ".", local_files_only=True)
        except Exception as e:  # transformers raises OSError/ValueError/KeyError for a folder it cannot read
            raise DPALogicError(f"{spec}: no readable transformers config.json ({e})") from None
    if spec in CONFIG_MAPPING:
        return AutoConfig.for_model(spec)
    raise unknown("model (a local folder, 'tiny' or a transformers architecture)", spec, ["tiny", *CONFIG_MAPPING])


def weights_dtype(config, override: str | None = None) -> torch.dtype:
    """The dtype the loop trains in: ``override``, else the checkpoint's config dtype (loaded as is), else float32."""
    dt = override or getattr(config, "dtype", None)
    if isinstance(dt, str):
        dt = getattr(torch, dt, None)
    return dt if isinstance(dt, torch.dtype) and dt.is_floating_point else torch.float32


def model_shape(
    spec: str, *, gpus: int, lora_r: int | None = None, lora_targets: str = "all-linear", dtype: str | None = None
) -> ModelShape:
    from transformers import AutoModelForCausalLM

    from dpalogic.training.scaling import layer_classes
    from dpalogic.training.scaling import lora_targets as targets_of

    config = model_config(spec)
    try:
        with torch.device("meta"):  # shapes only: no memory, no initialization, no weights read
            model = AutoModelForCausalLM.from_config(config)
    except ValueError as e:
        raise DPALogicError(f"{spec}: not a causal language model architecture ({e})") from None
    names = layer_classes(model)
    layer_sizes = [sum(p.numel() for p in m.parameters()) for m in model.modules() if type(m).__name__ in names]
    in_layers = sum(layer_sizes)
    params = {n: p for n, p in model.named_parameters()}
    total = sum(p.numel() for p in params.values())
    shard_rows = {n: math.ceil(p.shape[0] / gpus) * (p.numel() // max(1, p.shape[0])) for n, p in params.items()}
    if lora_r is None:
        trainable, tensors = total, len(params)
    else:  # A: r × in, B: out × r for every targeted linear layer (peft's "all-linear" leaves the LM head out)
        wanted = targets_of(model, lora_targets)
        head = model.get_output_embeddings()
        trainable = tensors = 0
        for n, m in model.named_modules():
            if not isinstance(m, torch.nn.Linear) or m is head:
                continue
            if wanted == "all-linear" or n.rsplit(".", 1)[-1] in wanted:
                trainable += lora_r * (m.in_features + m.out_features)
                tensors += 2
                shard_rows[f"{n}.lora_A"] = math.ceil(lora_r / gpus) * m.in_features
                shard_rows[f"{n}.lora_B"] = math.ceil(m.out_features / gpus) * lora_r
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    heads = text.num_attention_heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
    kv_heads = getattr(text, "num_key_value_heads", None) or heads
    return ModelShape(
        name=spec,
        params=total,
        trainable=trainable,
        trainable_tensors=tensors,
        shard_rows=shard_rows,
        layer_params=max(layer_sizes, default=0),
        root_params=total - in_layers,
        layers=text.num_hidden_layers,
        hidden=text.hidden_size,
        kv_dim=kv_heads * head_dim,
        intermediate=getattr(text, "intermediate_size", None) or 4 * text.hidden_size,
        heads=heads,
        vocab=text.vocab_size,
        weight_bytes=torch.empty((), dtype=weights_dtype(config, dtype)).element_size(),
        dtype=str(weights_dtype(config, dtype)).removeprefix("torch."),
    )


# --------------------------------------------------------------------------------------------------- activations


def layer_activation_elements(hidden: int, kv_dim: int, intermediate: int, heads: int) -> tuple[int, int]:
    """Elements per token one decoder layer saves for backward: ``(float32 part, autocast part)``.

    Two RMSNorms keep their input and normalized output in float32 (``2h + 1`` each); attention keeps the query, the
    keys and values and their rotary copies, the attention output and the ``o_proj`` input (``2h + 4·kv``) and SDPA's
    log-sum-exp (one per head); the gated MLP keeps gate, up, SiLU(gate) and their product (``4·i``).
    """
    return 4 * hidden + 2, 2 * hidden + 4 * kv_dim + 4 * intermediate + heads


@dataclass
class Plan:
    model: str
    strategy: str
    gpus: int
    dtype: str
    params: int
    trainable: int
    batch_size: int
    seq_len: int
    bf16: bool
    lora_r: int | None
    gradient_checkpointing: bool
    fused: bool
    reference: str
    bytes: dict[str, int] = field(default_factory=dict)  # per process, the components below
    activations_other: int = 0  # the activations with the other checkpointing choice (the table shows both)

    @property
    def total(self) -> int:
        return sum(self.bytes.values())

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "total": self.total}


def make_plan(
    shape: ModelShape,
    *,
    strategy: str,
    gpus: int,
    batch_size: int,
    seq_len: int,
    bf16: bool,
    gradient_checkpointing: bool,
    fused: bool,
    fused_chunk_size: int = 1,
    fused_max_chunk_tokens: int | None = None,
    reference: str = "cache",
    lora: bool = False,
    lora_r: int | None = None,
) -> Plan:
    if strategy not in STRATEGIES:
        raise unknown("strategy", strategy, STRATEGIES)
    sharded = strategy != "ddp"
    # gradients and AdamW's moments take their weights' dtype; peft keeps adapter weights in float32 whatever the base
    w = shape.weight_bytes
    b: dict[str, int] = {}
    if sharded:
        base = sum(k for n, k in shape.shard_rows.items() if not n.endswith(("lora_A", "lora_B")))
        adapter = sum(k for n, k in shape.shard_rows.items() if n.endswith(("lora_A", "lora_B")))
    else:
        base, adapter = shape.params, (shape.trainable if lora else 0)
    weights = w * base + 4 * adapter
    trained = 4 * adapter if lora else w * base
    b["weights"] = weights
    b["gradients"] = trained
    b["optimizer"] = 2 * trained + 4 * shape.trainable_tensors  # exp_avg, exp_avg_sq, and a float32 step per tensor
    if sharded:  # the root's weights stay gathered through forward and backward; two layers at a time (prefetch)
        b["gathered layers"] = w * (shape.root_params + 2 * shape.layer_params)
    elif gpus > 1:
        b["ddp buckets"] = trained  # DDP's reducer keeps its own copy of the gradients
    if bf16 and not sharded and (w == 4 or lora):
        b["bf16 weight copies"] = 2 * shape.trainable  # autocast caches one bf16 copy of every trained float32 weight

    rows, tokens = 2 * batch_size, 2 * batch_size * seq_len
    act = 2 if bf16 else 4
    f32, mixed = layer_activation_elements(shape.hidden, shape.kv_dim, shape.intermediate, shape.heads)
    per_layer = tokens * (4 * f32 + act * mixed)
    final_norm = tokens * 4 * (3 * shape.hidden)
    full = shape.layers * per_layer + final_norm
    # checkpointed: each layer keeps only its input (the float32 residual stream); one layer is recomputed at a time
    ckpt = shape.layers * tokens * 4 * shape.hidden + per_layer + final_norm
    b["activations"] = ckpt if gradient_checkpointing else full
    other = full if gradient_checkpointing else ckpt

    scored = rows * (seq_len - 1)  # positions that predict a next token
    if fused:  # one chunk's logits rows and their gradient; the batch's logits are never materialized
        chunk = min(2 * fused_chunk_size * (seq_len - 1), fused_max_chunk_tokens or math.inf)
        b["fused buffer"] = int(2 * chunk * shape.vocab * 4)
    else:  # the logits, their float32 copy under bf16, and the float32 log-softmax kept for backward
        b["logits"] = tokens * shape.vocab * act + scored * shape.vocab * (4 + (4 if bf16 else 0))
    if reference == "model" and not lora:  # a frozen copy (sharded like the policy), plus its forward's logits
        b["reference"] = weights + tokens * shape.vocab * 4
    else:
        b["reference"] = 0
    return Plan(
        model=shape.name,
        strategy=strategy,
        gpus=gpus,
        dtype=shape.dtype,
        params=shape.params,
        trainable=shape.trainable,
        batch_size=batch_size,
        seq_len=seq_len,
        bf16=bf16,
        lora_r=lora_r,
        gradient_checkpointing=gradient_checkpointing,
        fused=fused,
        reference=reference,
        bytes=b,
        activations_other=other,
    )


def plan_for(cfg, *, gpus: int, strategy: str | None = None, dtype: str | None = None) -> Plan:
    """The plan of a run with settings ``cfg`` on ``gpus`` processes (strategy: from ``cfg`` unless given)."""
    from dpalogic import PreferenceLoss

    if gpus < 1:
        raise DPALogicError(f"--gpus must be at least 1, got {gpus}")
    strategy = strategy or ("fsdp" if cfg.fsdp else "zero3" if cfg.deepspeed else "ddp")
    if cfg.max_length is None:
        raise DPALogicError("the memory plan needs a sequence length: set --max-length")
    shape = model_shape(
        cfg.model, gpus=gpus if strategy != "ddp" else 1, lora_r=cfg.lora_r, lora_targets=cfg.lora_targets, dtype=dtype
    )
    needs_ref = PreferenceLoss(cfg.loss, **cfg.hp).needs_reference
    return make_plan(
        shape,
        strategy=strategy,
        gpus=gpus,
        batch_size=cfg.batch_size,
        seq_len=cfg.max_length,
        bf16=str(cfg.bf16).lower() != "false",  # "auto": the GPUs a plan is for support it
        gradient_checkpointing=cfg.gradient_checkpointing,
        fused=cfg.fused,
        fused_chunk_size=cfg.fused_chunk_size,
        fused_max_chunk_tokens=cfg.fused_max_chunk_tokens,
        reference=(cfg.reference if needs_ref else "none"),
        lora=cfg.lora_r is not None,
        lora_r=cfg.lora_r,
    )


def _size(n: float) -> str:
    for unit, div in (("GiB", GiB), ("MiB", 1024**2), ("KiB", 1024)):
        if n >= div:
            return f"{n / div:.2f} {unit}"
    return f"{int(n)} B"


def plan_table(p: Plan) -> str:
    """The plan as text: one line per component, then the total and what it would be with the other choices."""
    params = f"{p.params / 1e9:.2f}B" if p.params >= 1e8 else f"{p.params:,}"
    trained = f", LoRA r={p.lora_r}: {p.trainable:,} trained" if p.lora_r else ""
    head = [
        f"memory plan per GPU: {p.model} ({params} parameters{trained})",
        f"{p.strategy} on {p.gpus} GPU(s), {'bf16 autocast' if p.bf16 else 'float32'}, micro-batch {p.batch_size} "
        f"pairs × {p.seq_len} tokens (chosen and rejected: {2 * p.batch_size} rows), gradient checkpointing "
        f"{'on' if p.gradient_checkpointing else 'off'}{', fused loss' if p.fused else ''}",
        "",
    ]
    notes = {
        "weights": f"{p.dtype}" + (" (sharded)" if p.strategy != "ddp" else ""),
        "gradients": f"{p.dtype}, trained weights only" + (" (sharded)" if p.strategy != "ddp" else ""),
        "optimizer": "AdamW: exp_avg, exp_avg_sq, step" + (" (sharded)" if p.strategy != "ddp" else ""),
        "gathered layers": "unsharded for compute: the root's weights and two layers",
        "ddp buckets": "DDP's gradient buckets",
        "bf16 weight copies": "autocast's cached casts",
        "activations": ("with" if p.gradient_checkpointing else "without")
        + f" checkpointing; {'without' if p.gradient_checkpointing else 'with'}: {_size(p.activations_other)}",
        "logits": "logits and the float32 log-softmax kept for backward",
        "fused buffer": "one chunk's logits and their gradient",
        "reference": {"cache": "log-probs cached on the host", "model": "a frozen copy and its logits"}.get(
            p.reference, "reference-free loss" if p.reference == "none" else "the base model, adapter off"
        )
        if not (p.lora_r and p.reference == "model")
        else "the base model with the adapter off: no copy",
    }
    width = max(len(k) for k in p.bytes)
    lines = [f"  {k:<{width}}  {_size(v):>11}  {notes.get(k, '')}" for k, v in p.bytes.items()]
    lines.append(f"  {'total':<{width}}  {_size(p.total):>11}  plus the CUDA context and fragmentation (1–2 GiB)")
    return "\n".join(head + lines)
