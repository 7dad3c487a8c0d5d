"""``dpalogic train`` and ``dpalogic demo``.

Every :class:`~dpalogic.training.config.TrainConfig` field is a flag (``grad_accum`` → ``--grad-accum``) and a key of
the ``--config`` file (YAML or JSON); flags given on the command line win over the file, the file over the defaults.
Nothing heavy is imported until a command runs, so ``dpalogic derive`` stays fast.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import fields
from pathlib import Path
from typing import Any

from dpalogic.errors import DPALogicError

HELP = {
    "loss": "catalog name (dpo, cpo, ccpo, …) or structure text such as '(M(yl) -> M(yw), M(yw) | M(yl))'",
    "hp": "a loss hyperparameter, KEY=VALUE (repeatable), e.g. --hp beta=0.1",
    "model": "a local transformers causal LM folder, or 'tiny' (built locally, nothing downloaded)",
    "ref_model": "reference model folder (default: a frozen copy of the initial policy)",
    "data": "training preferences: .jsonl, .json, .parquet or a datasets folder",
    "eval": "held-out preferences (same formats)",
    "out": "run folder: log.jsonl, checkpoints/, final/, summary.json",
    "epochs": "passes over the training data (ignored when --max-steps is set)",
    "max_steps": "optimizer steps to train",
    "batch_size": "pairs per process per micro-batch",
    "eval_batch_size": "pairs per process per evaluation batch (default: --batch-size)",
    "grad_accum": "micro-batches per optimizer step",
    "lr": "peak learning rate (AdamW)",
    "weight_decay": "AdamW weight decay (matrices only)",
    "warmup_ratio": "fraction of the steps with linear warmup before the cosine decay",
    "min_lr_ratio": "the cosine decays to lr × this",
    "max_grad_norm": "gradient clipping norm (0: no clipping)",
    "seed": "seed of the initial tiny model, the data order and the RNGs",
    "max_length": "maximum tokens of prompt + answer (answers are cut at the end)",
    "max_prompt_length": "maximum prompt tokens (the prompt keeps its end)",
    "reference": "'cache': reference log-probs computed once and stored in the run folder; 'model': a frozen copy",
    "fused": "use dpalogic.fused's fused LM-head loss (needs dpalogic.fused)",
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


def _parse_hp(items: list[str]) -> dict[str, float]:
    hp = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise DPALogicError(f"--hp expects KEY=VALUE, got {item!r}")
        try:
            hp[key.strip()] = float(value)
        except ValueError:
            raise DPALogicError(f"--hp {key.strip()}: {value!r} is not a number") from None
    return hp


def _field_type(f) -> Any:
    t = str(f.type)
    if "bool" in t:
        return bool
    if "int" in t:
        return int
    if "float" in t:
        return float
    return str


def register(subparsers) -> None:
    from dpalogic.training.config import TrainConfig

    t = subparsers.add_parser(
        "train",
        help="train a causal LM with any dpalogic loss",
        description="Train with a catalog loss or a derived structure. Every flag can also be a key of --config.",
    )
    t.add_argument("--config", help="YAML or JSON file with any of the flags below (underscores or dashes)")
    for f in fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        kind = _field_type(f)
        if f.name == "hp":
            t.add_argument(flag, action="append", metavar="KEY=VALUE", default=argparse.SUPPRESS, help=HELP["hp"])
        elif kind is bool:
            t.add_argument(flag, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS, help=HELP[f.name])
        else:
            t.add_argument(flag, type=kind, default=argparse.SUPPRESS, help=HELP.get(f.name))
    t.add_argument("--json", action="store_true", help="print the final summary as JSON")
    t.set_defaults(run=run_train)

    d = subparsers.add_parser(
        "demo",
        help="compare losses on a synthetic preference task (tiny model, CPU, offline)",
        description="Train the tiny model with each loss on the digit-sorting preference task; write a results "
        "table and PNG training curves.",
    )
    d.add_argument(
        "--losses",
        default=None,
        help="comma-separated catalog names or structures (default: dpo,ipo,simpo,cpo,orpo,ccpo)",
    )
    d.add_argument("--out", default="runs/demo", help="folder for results.json, the table and the plots")
    d.add_argument("--steps", type=int, default=150, help="training steps per loss")
    d.add_argument("--batch-size", type=int, default=32, help="preference pairs per step")
    d.add_argument("--lr", type=float, default=1e-3, help="AdamW learning rate")
    d.add_argument("--eval-every", type=int, default=10, help="steps between held-out evaluations")
    d.add_argument("--train-size", type=int, default=2000, help="training pairs generated")
    d.add_argument("--eval-size", type=int, default=256, help="held-out pairs generated")
    d.add_argument("--seed", type=int, default=0, help="seed for the data, the model and the training order")
    d.add_argument("--no-plot", action="store_true", help="skip the PNG plots")
    d.add_argument("--no-progress", action="store_true", help="no progress bars")
    d.add_argument("--json", action="store_true", help="print the results as JSON")
    d.set_defaults(run=run_demo)


def read_config_file(path: str) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise DPALogicError(f"config file {path} does not exist")
    text = p.read_text()
    if p.suffix.lower() in (".yaml", ".yml"):
        try:
            import yaml
        except ImportError:
            raise DPALogicError("YAML config files need pyyaml: pip install pyyaml (or use a .json config)") from None
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise DPALogicError(f"{path}: not valid YAML ({e})") from None
    else:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise DPALogicError(f"{path}: not valid JSON ({e.msg}, line {e.lineno})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise DPALogicError(f"{path}: expected a mapping of settings, got {type(data).__name__}")
    return data


def config_from_args(args: argparse.Namespace):
    """Defaults, then the ``--config`` file, then the flags given on the command line."""
    from dpalogic.training.config import TrainConfig

    merged: dict[str, Any] = {}
    if getattr(args, "config", None):
        merged.update({k.replace("-", "_"): v for k, v in read_config_file(args.config).items()})
    names = {f.name for f in fields(TrainConfig)}
    for name in names:
        if name in vars(args):
            value = getattr(args, name)
            if name == "hp":
                value = {**(merged.get("hp") or {}), **_parse_hp(value)}
            merged[name] = value
    return TrainConfig.from_dict(merged, "config")


def run_train(args: argparse.Namespace) -> int:
    from dpalogic.training.loop import train

    cfg = config_from_args(args)
    result = train(cfg)
    result.pop("history", None)
    if args.json:
        print(json.dumps(result, indent=2))
    elif result.get("eval"):
        ev = result["eval"]
        metrics = ", ".join(f"{k} {v:.4f}" for k, v in ev.items() if isinstance(v, float) and k != "epoch")
        print(f"held-out after {result['step']} steps: {metrics}")
    return 130 if result.get("interrupted") else 0


def run_demo(args: argparse.Namespace) -> int:
    from dpalogic.training.demo import DEFAULT_LOSSES, DemoConfig, run_demo

    losses = tuple(split_losses(args.losses)) if args.losses else DEFAULT_LOSSES
    cfg = DemoConfig(
        losses=losses,
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
    )
    for name in ("steps", "batch_size", "eval_every", "train_size", "eval_size"):
        if getattr(cfg, name) < 1:
            raise DPALogicError(f"--{name.replace('_', '-')} must be at least 1")
    if cfg.lr <= 0:
        raise DPALogicError("--lr must be positive")
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
