"""``dpalogic train`` and ``dpalogic demo``.

Every :class:`~dpalogic.training.config.TrainConfig` field is a flag (``grad_accum`` → ``--grad-accum``) and a key of
the ``--config`` file (YAML or JSON); flags given on the command line win over the file, the file over the defaults.
Every value is checked (type, range, the loss's hyperparameters) before a model or data file is opened, and
``--dry-run`` stops right after the data files are read and checked. Nothing heavy is imported until a command runs,
so ``dpalogic derive`` stays fast.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
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
    "batch_size": "pairs per process per micro-batch",
    "eval_batch_size": "pairs per process per evaluation batch",
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
    "deepspeed": "a DeepSpeed JSON config (ZeRO), used through accelerate; needs the deepspeed package (or launch "
    "with accelerate launch --config_file examples/accelerate/zero3.yaml)",
    "lora_r": "train a LoRA adapter of this rank (peft) instead of every weight; the reference is the base model "
    "with the adapter switched off",
    "lora_alpha": "LoRA scale numerator (the update is scaled by alpha / r)",
    "lora_targets": "modules that get adapters: comma-separated names (q_proj,v_proj) or all-linear",
    "gradient_checkpointing": "recompute each layer's activations during the backward pass (less memory, ~1/3 more "
    "compute)",
}


def split_losses(text: str) -> list[str]:
    """Split ``"dpo,cpo,(M(yl) -> M(yw), M(yw) | M(yl))"`` at the commas outside parentheses."""
    parts, depth, cur = [], 0, []
    for ch in text:
        if ch == "(":
            depth += 1
        elif ch == ")":
            depth -= 1
        if ch == "," and depth == 0:
            parts.append("".join(cur).strip())
            cur = []
        else:
            cur.append(ch)
    parts.append("".join(cur).strip())
    out = [p for p in parts if p]
    if depth != 0:
        raise DPALogicError(f"unbalanced parentheses in --losses {text!r}")
    return out


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


def register(subparsers) -> None:
    from dpalogic.training.config import TrainConfig, field_kind
    from dpalogic.training.demo import DEFAULT_LOSSES, DemoConfig

    t = subparsers.add_parser(
        "train",
        help="train a causal LM with any dpalogic loss",
        description="Train with a catalog loss or a derived structure. Every flag can also be a key of --config; "
        "flags win over the file.",
    )
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
    t.add_argument(
        "--dry-run",
        action="store_true",
        help="check the settings, the loss and the data files, print the settings, and stop before loading a model",
    )
    t.add_argument(
        "--json", action="store_true", help="print the final summary (or, with --dry-run or --plan, those) as JSON"
    )
    t.add_argument(
        "--plan",
        action="store_true",
        help="print the memory each GPU needs for these settings (weights, gradients, AdamW, activations, logits, "
        "reference) and stop; --model may also be an architecture transformers knows (llama, qwen2, …): nothing is "
        "downloaded and no weight is loaded",
    )
    t.add_argument("--gpus", type=int, default=None, help="with --plan: processes (GPUs) to plan for (default: 1)")
    t.add_argument(
        "--dtype",
        choices=("float32", "bfloat16", "float16"),
        default=None,
        help="with --plan: the weights' dtype (default: the checkpoint config's, as the loop loads it; float32 for "
        "tiny and for an architecture's defaults)",
    )
    t.add_argument(
        "--strategy",
        choices=("ddp", "fsdp", "zero3"),
        default=None,
        help="with --plan: how the model is spread (default: fsdp with --fsdp, zero3 with --deepspeed, else ddp)",
    )
    t.set_defaults(run=run_train)

    d = subparsers.add_parser(
        "demo",
        help="compare losses on a synthetic preference task (tiny model, CPU, offline)",
        description="Train the tiny model with each loss on the digit-sorting preference task; write a results "
        "table and PNG training curves. The defaults take well under a minute on a 2-core CPU; the README's longer "
        "study is --steps 150.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    d.add_argument(
        "--losses",
        default=",".join(DEFAULT_LOSSES),
        help="comma-separated catalog names or structures",
    )
    d.add_argument("--out", default="runs/demo", help="folder for results.json, the table and the plots")
    d.add_argument("--steps", type=int, default=DemoConfig.steps, help="training steps per loss")
    d.add_argument("--batch-size", type=int, default=32, help="preference pairs per step")
    d.add_argument("--lr", type=float, default=1e-3, help="AdamW learning rate")
    d.add_argument("--eval-every", type=int, default=10, help="steps between held-out evaluations")
    d.add_argument("--train-size", type=int, default=2000, help="training pairs generated")
    d.add_argument("--eval-size", type=int, default=256, help="held-out pairs generated")
    d.add_argument("--seed", type=int, default=0, help="seed for the data, the model and the training order")
    d.add_argument(
        "--threads",
        type=int,
        default=DemoConfig.threads,
        help="torch CPU threads (the tiny model's small matrices gain nothing from more; on a busy machine they cost)",
    )
    d.add_argument("--no-plot", action="store_true", help="skip the PNG plots")
    d.add_argument("--no-progress", action="store_true", help="no progress bars")
    d.add_argument("--json", action="store_true", help="print the results as JSON")
    d.set_defaults(run=run_demo)


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


def _check_paths(cfg) -> None:
    """The folders and files a run reads exist, so a typo is reported before anything is loaded."""
    for flag, spec in (("--model", cfg.model), ("--ref-model", cfg.ref_model)):
        if spec is not None and spec != "tiny" and not os.path.isdir(spec):
            raise DPALogicError(
                f"{flag}: no model folder at {spec!r}: pass a local transformers checkpoint or 'tiny' (nothing is "
                "downloaded)"
            )
    if not cfg.data:
        raise DPALogicError("no training data: pass --data FILE (JSONL, JSON, CSV, Parquet or a datasets folder)")
    for flag, path in (("--data", cfg.data), ("--eval", cfg.eval)):
        if path is not None and not os.path.exists(path):
            raise DPALogicError(f"{flag}: data file {path} does not exist")


def _main_rank() -> bool:
    return os.environ.get("RANK", "0") == "0"


def run_train(args: argparse.Namespace) -> int:
    from dpalogic.training.data import BAD_ROWS_FILE, BadRowsError, write_bad_rows

    cfg = config_from_args(args)
    if args.plan:
        return _plan(cfg, args)
    if args.gpus is not None or args.strategy is not None or args.dtype is not None:
        raise DPALogicError("--gpus, --strategy and --dtype describe a memory plan: use them with --plan")
    _check_paths(cfg)
    try:
        if args.dry_run:
            return _dry_run(cfg, args.json)
        from dpalogic.training.loop import train

        result = train(cfg)
    except BadRowsError as e:  # the run stops on bad rows: the user gets all of them, not only the few listed
        if args.dry_run or not _main_rank():
            raise
        where = write_bad_rows(Path(cfg.out) / BAD_ROWS_FILE, [(e.source, e.issues)])
        raise DPALogicError(f"{e}\nevery bad row, with its number and reason: {where}") from None
    result.pop("history", None)
    if args.json:
        print(json.dumps(result, indent=2))
    elif result.get("eval"):
        ev = result["eval"]
        metrics = ", ".join(f"{k} {v:.4f}" for k, v in ev.items() if isinstance(v, float) and k != "epoch")
        print(f"held-out after {result['step']} steps: {metrics}")
    return 130 if result.get("interrupted") else 0


def _plan(cfg, args: argparse.Namespace) -> int:
    from dpalogic.training.plan import plan_for, plan_table

    plan = plan_for(cfg, gpus=args.gpus if args.gpus is not None else 1, strategy=args.strategy, dtype=args.dtype)
    print(json.dumps(plan.as_dict(), indent=2) if args.json else plan_table(plan))
    return 0


def _dry_run(cfg, as_json: bool) -> int:
    """Read and check the data files (no model, no tokenizer, nothing written) and print the settings."""
    from dataclasses import asdict

    from dpalogic.training.data import load_preferences

    reports = []
    for what, path, split in (("train data", cfg.data, None), ("eval data", cfg.eval, "eval")):
        if path is not None:
            reports.append(load_preferences(path, strict=cfg.strict_data, split=split).summary(what))
    if as_json:
        print(json.dumps(asdict(cfg), indent=2, ensure_ascii=False))
    else:
        print("\n".join(f"{k}: {v}" for k, v in asdict(cfg).items()))
    print(
        "\n".join(reports + ["dry run: settings, loss and data checked; no model loaded, nothing written"]),
        file=sys.stderr,
    )
    return 0


def run_demo(args: argparse.Namespace) -> int:
    from dpalogic.training.demo import DemoConfig, run_demo

    cfg = DemoConfig(
        losses=tuple(split_losses(args.losses)),
        out=args.out,
        steps=args.steps,
        batch_size=args.batch_size,
        lr=args.lr,
        eval_every=args.eval_every,
        train_size=args.train_size,
        eval_size=args.eval_size,
        seed=args.seed,
        plot=not args.no_plot,
        progress=not args.no_progress,
        threads=args.threads,
    )
    for name in ("steps", "batch_size", "eval_every", "train_size", "eval_size", "threads"):
        if getattr(cfg, name) < 1:
            raise DPALogicError(f"--{name.replace('_', '-')} must be at least 1")
    if not (math.isfinite(cfg.lr) and cfg.lr > 0):
        raise DPALogicError(f"--lr must be a positive number, got {cfg.lr}")
    results = run_demo(cfg)
    if args.json:
        print(json.dumps([{k: v for k, v in r.items() if k != "curves"} for r in results], indent=2))
        return 0
    from dpalogic.training.demo import results_table

    print(results_table(results, cfg))
    files = ["results.md", "results.json"] + (
        ["curves.png"] + [f"curves-{r['slug']}.png" for r in results] if cfg.plot else []
    )
    print(f"written to {cfg.out}/: " + ", ".join(files), file=sys.stderr)
    return 0
