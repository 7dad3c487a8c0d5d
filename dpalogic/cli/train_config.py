"""How ``dpalogic train`` reads its settings: one flag per :class:`~dpalogic.training.config.TrainConfig` field, and
the ``--config`` file.

Every field is a flag (``grad_accum`` → ``--grad-accum``) and a key of the ``--config`` file (YAML or JSON); flags
given on the command line win over the file, the file over the defaults. Every value is checked (type, range, the
loss's hyperparameters) by ``TrainConfig`` before a model or data file is opened.
"""

from __future__ import annotations

import argparse
import json
import re
import typing
from collections.abc import Mapping
from dataclasses import MISSING, fields
from pathlib import Path
from typing import Any

from dpalogic.errors import DPALogicError

HELP = {
    "loss": "catalog name (dpo, cpo, ccpo, …) or structure text such as '(M(yl) -> M(yw), M(yw) | M(yl))'",
    "hp": "a loss hyperparameter, KEY=VALUE (repeatable), e.g. --hp beta=0.1",
    "model": "a local transformers causal LM folder, or 'tiny' (built locally, nothing downloaded)",
    "ref_model": "reference model folder",
    "data": "training preferences: .jsonl, .json, .csv, .parquet or a datasets folder (bad rows are skipped and "
    "listed in OUT/bad_rows.jsonl)",
    "eval": "held-out preferences (same formats)",
    "out": "run folder: log.jsonl, checkpoints/, final/, summary.json",
    "epochs": "passes over the training data (ignored when --max-steps is set)",
    "max_steps": "optimizer steps to train",
    "batch_size": "pairs per process per micro-batch (prompts, each with its K answers, for a loss over y1 … yK)",
    "eval_batch_size": "pairs (or K-answer prompts) per process per evaluation batch",
    "grad_accum": "micro-batches per optimizer step",
    "lr": "peak learning rate (AdamW); a freshly initialized tiny model needs a large rate (at 1e-5 it barely learns "
    "in a few hundred steps), while 1e-5 suits fine-tuning a pretrained model",
    "weight_decay": "AdamW weight decay (matrices only)",
    "warmup_ratio": "fraction of the steps with linear warmup before the cosine decay",
    "min_lr_ratio": "the cosine decays to lr × this",
    "max_grad_norm": "gradient clipping norm (0: no clipping)",
    "seed": "seed of the initial tiny model, the data order and the RNGs",
    "max_length": "maximum tokens of prompt + answer (answers are cut at the end)",
    "max_prompt_length": "maximum prompt tokens (the prompt keeps its end)",
    "reference": "'cache': reference log-probs computed once and stored in the run folder; 'model': a frozen copy",
    "fused": "use dpalogic.runtime.fused's fused LM-head loss (needs dpalogic.runtime.fused)",
    "fused_chunk_size": "pairs per chunk of the fused loss (its logits buffer holds 2·N·T rows)",
    "fused_max_chunk_tokens": "cap the fused loss's logits buffer at N token rows (two passes when a chunk is larger)",
    "bf16": "bf16 autocast: auto (GPUs that support it), true, false",
    "strict_data": "stop at malformed rows instead of skipping them",
    "margin_from": "a per-pair margin m_i from each row, shifting the loss's link to f(z - m_i): 'margin' (the row's "
    "margin field) or 'scores' (chosen_score - rejected_score; for a loss over y1 … yK, the best score minus the "
    "runner-up's); a row without it is a bad row",
    "margin_scale": "multiply each row's margin (or score difference) by this",
    "pairs": "make pairs from K-answer rows {prompt, responses, scores} for a pairwise loss: all (every two answers "
    "with different scores), adjacent (consecutive score levels) or best-vs-rest",
    "curriculum": "easy-to-hard: train the pairs in order of score gap, largest first (Curry-DPO), not shuffled",
    "log_every": "log training metrics every N steps",
    "eval_every": "evaluate every N steps (0: only at the start and the end)",
    "save_every": "checkpoint every N steps (0: only at the end)",
    "keep_checkpoints": "how many checkpoints to keep",
    "resume": "'auto' (newest intact checkpoint in --out) or a checkpoint or run folder",
    "overwrite": "replace a run already in --out (its log, checkpoints and final model) instead of refusing",
    "dropout": "attention dropout of the tiny model",
    "progress": "show a progress bar",
    "tensorboard": "write TensorBoard logs when tensorboard is installed",
    "device": "auto, cpu or cuda",
    "fsdp": "shard parameters, gradients and AdamW state across the processes with FSDP2 (launch with torchrun or "
    "accelerate launch; on CPUs it runs with gloo)",
    "deepspeed": "train with DeepSpeed ZeRO (stage 1-3) from this JSON config; batch, accumulation, clipping and "
    "precision are this run's. Needs the deepspeed package (or launch with accelerate launch --config_file "
    "examples/accelerate/zero3.yaml)",
    "lora_r": "train a LoRA adapter of this rank (peft) instead of every weight; the reference is the base model "
    "with the adapter switched off",
    "lora_alpha": "LoRA scale numerator (the update is scaled by alpha / r)",
    "lora_targets": "modules that get adapters: comma-separated names (q_proj,v_proj) or all-linear",
    "gradient_checkpointing": "recompute each layer's activations during the backward pass (less memory, ~1/3 more "
    "compute)",
}


# the default of a field whose plain value would not say what happens (None, a computed default)
DEFAULT_TEXT = {
    "hp": "the loss's own; see `dpalogic show LOSS`",
    "ref_model": "a frozen copy of the initial policy",
    "data": "none; required",
    "eval": "none: no evaluation",
    "max_steps": "none: --epochs decides",
    "eval_batch_size": "--batch-size",
    "lr": "1e-5, or 1e-3 with --model tiny",
    "max_length": "1024; null in a config file: no limit",
    "max_prompt_length": "512; null in a config file: no limit",
    "fused_max_chunk_tokens": "none: no cap",
    "resume": "none: start fresh",
    "deepspeed": "none",
    "lora_r": "none: train every weight",
    "lora_alpha": "2 × --lora-r",
    "margin_from": "none: no margins",
}


def _parse_hp(items: list[str]) -> dict[str, float]:
    hp = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise DPALogicError(f"--hp expects KEY=VALUE, got {_short(item)}")
        try:
            hp[key.strip()] = float(value)
        except ValueError:
            raise DPALogicError(f"--hp {_short(key.strip())}: {_short(value)} is not a number") from None
    return hp


def _flag_number(text: str) -> int | float | str:
    """A number flag's value as a number when it reads as one; anything else is left for the validation to reject
    with the same message as a config file's value (``batch_size must be a positive integer, got '2.5' …``)."""
    for conv in (int, float):
        try:
            return conv(text)
        except ValueError:
            pass
    return text


def _short(text: str, limit: int = 60) -> str:
    r = repr(text)
    return r if len(r) <= limit else f"{r[: limit - 15]}… ({len(r)} chars)"


def _default_text(f) -> str:
    if f.name in DEFAULT_TEXT:
        return DEFAULT_TEXT[f.name]
    v = f.default if f.default is not MISSING else f.default_factory()
    if isinstance(v, bool):
        return "on" if v else "off"
    return f"{v:g}" if isinstance(v, float) else str(v)


def add_config_arguments(t: argparse.ArgumentParser) -> None:
    """``--config`` and one flag per ``TrainConfig`` field, each with its help and its default in words."""
    from dpalogic.training.config import TrainConfig, field_kind

    t.add_argument(
        "--config", help="YAML or JSON file with any of the flags below (underscores or dashes) (default: none)"
    )
    hints = typing.get_type_hints(TrainConfig)
    for f in fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        kind = field_kind(hints[f.name])
        # defaults stay out of the namespace (SUPPRESS), so a config file's value is not overridden by a flag's
        # default; the help states them instead
        text = f"{HELP.get(f.name, f.name.replace('_', ' '))} (default: {_default_text(f)})"
        if f.name == "hp":
            t.add_argument(flag, action="append", metavar="KEY=VALUE", default=argparse.SUPPRESS, help=text)
        elif kind is bool:
            t.add_argument(flag, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS, help=text)
        else:
            conv = _flag_number if kind in (int, float) else str
            t.add_argument(flag, type=conv, default=argparse.SUPPRESS, help=text)


# PyYAML reads YAML 1.1, where `1e-5` (no dot) is a string; every config writer means the number
_YAML_FLOAT = re.compile(
    r"""^[-+]?(?:[0-9][0-9_]*\.[0-9_]*(?:[eE][-+]?[0-9]+)?|[0-9][0-9_]*[eE][-+]?[0-9]+|\.[0-9_]+(?:[eE][-+]?[0-9]+)?)$"""
)


def _yaml_loader():
    import yaml

    class Loader(yaml.SafeLoader):  # safe: plain data only, no Python objects
        pass

    Loader.add_implicit_resolver("tag:yaml.org,2002:float", _YAML_FLOAT, list("-+0123456789."))
    return Loader


def read_config_file(path: str) -> dict[str, Any]:
    """The settings of a YAML (``.yaml``/``.yml``) or JSON file; a UTF-8 byte order mark is ignored."""
    p = Path(path)
    try:
        raw = p.read_bytes()
    except (FileNotFoundError, NotADirectoryError):
        raise DPALogicError(f"config file {path} does not exist") from None
    except IsADirectoryError:
        raise DPALogicError(f"config file {path} is a folder") from None
    except OSError as e:
        raise DPALogicError(f"config file {path} cannot be read: {e.strerror or e}") from None
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise DPALogicError(f"{path}: undecodable text (invalid UTF-8 at byte {e.start})") from None
    if p.suffix.lower() in (".yaml", ".yml"):
        try:
            import yaml
        except ImportError:
            raise DPALogicError("YAML config files need pyyaml: pip install pyyaml (or use a .json config)") from None
        try:
            data = yaml.load(text, Loader=_yaml_loader())
        except RecursionError:
            raise DPALogicError(f"{path}: nested too deeply") from None
        except (yaml.YAMLError, ValueError, TypeError) as e:  # ValueError: a date such as 2024-13-45
            raise DPALogicError(f"{path}: not valid YAML ({e})") from None
    else:
        try:
            data = json.loads(text)
        except RecursionError:
            raise DPALogicError(f"{path}: nested too deeply") from None
        except json.JSONDecodeError as e:
            raise DPALogicError(f"{path}: not valid JSON ({e.msg}, line {e.lineno})") from None
        except ValueError as e:  # an integer of more than 4300 digits
            raise DPALogicError(f"{path}: not valid JSON ({e})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise DPALogicError(f"{path}: expected a mapping of settings, got {type(data).__name__}")
    return data


def config_from_args(args: argparse.Namespace):
    """Defaults, then the ``--config`` file, then the flags given on the command line (all validated)."""
    from dpalogic.training.config import TrainConfig

    merged: dict[str, Any] = {}
    origins: dict[str, str] = {}
    if getattr(args, "config", None):
        for k, v in read_config_file(args.config).items():
            key = str(k).replace("-", "_")
            merged[key], origins[key] = v, args.config
    names = {f.name for f in fields(TrainConfig)}
    for name in sorted(names & set(vars(args))):
        value = getattr(args, name)
        flag = "--" + name.replace("_", "-")
        if name == "hp":
            from_file = merged.get("hp") or {}
            if not isinstance(from_file, Mapping):  # left as it is: the validation reports it, naming the file
                continue
            value = {**from_file, **_parse_hp(value)}
            flag = f"{args.config} and --hp" if from_file else "--hp"
        merged[name], origins[name] = value, flag
    return TrainConfig.from_dict(merged, "config", origins)
