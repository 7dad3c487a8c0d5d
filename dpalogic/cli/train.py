"""``dpalogic train``: train a causal LM with any dpalogic loss (or only check the settings, or plan the memory).

Every value is checked before a model or data file is opened, and ``--dry-run`` stops right after the data files are
read and checked. Nothing heavy is imported until the command runs, so ``dpalogic derive`` stays fast.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from dpalogic.cli.common import Subparsers, print_json
from dpalogic.cli.train_config import add_config_arguments, config_from_args
from dpalogic.errors import DPALogicError


def register(subparsers: Subparsers) -> None:
    t = subparsers.add_parser(
        "train",
        help="train a causal LM with any dpalogic loss",
        description="Train with a catalog loss or a derived structure. Every flag can also be a key of --config; "
        "flags win over the file.",
    )
    add_config_arguments(t)
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
    t.set_defaults(run=run)


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


def run(args: argparse.Namespace) -> int:
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
        print_json(result)
    elif result.get("eval"):
        ev = result["eval"]
        metrics = ", ".join(f"{k} {v:.4f}" for k, v in ev.items() if isinstance(v, float) and k != "epoch")
        print(f"held-out after {result['step']} steps: {metrics}")
    return 130 if result.get("interrupted") else 0


def _plan(cfg, args: argparse.Namespace) -> int:
    from dpalogic.training.plan import plan_for, plan_table

    plan = plan_for(cfg, gpus=args.gpus if args.gpus is not None else 1, strategy=args.strategy, dtype=args.dtype)
    print_json(plan.as_dict()) if args.json else print(plan_table(plan))
    return 0


def _dry_run(cfg, as_json: bool) -> int:
    """Read and check the data files (no model, no tokenizer, nothing written) and print the settings."""
    from dataclasses import asdict

    from dpalogic.training.annotations import annotate_rows
    from dpalogic.training.ranked_steps import dry_run_rows, steps_per_epoch
    from dpalogic.training.unpaired import load_rows

    reports = []
    for what, path, split in (("train data", cfg.data, None), ("eval data", cfg.eval, "eval")):
        if path is not None:  # margins and spans checked too
            rows = load_rows(path, strict=cfg.strict_data, split=split)
            rows, k = dry_run_rows(rows, cfg, lambda m: print(m, file=sys.stderr))  # K answers
            rows = annotate_rows(rows, cfg)
            reports.append(rows.summary(what))
            if split is None:  # the run's check, on the rows left before tokenization (which may drop more)
                try:
                    steps_per_epoch(len(rows.rows), cfg, int(os.environ.get("WORLD_SIZE", "1")), k)
                except DPALogicError:
                    print(reports[0], file=sys.stderr)
                    raise
    if as_json:
        print_json(asdict(cfg))
    else:
        print("\n".join(f"{k}: {v}" for k, v in asdict(cfg).items()))
    print(
        "\n".join(reports + ["dry run: settings, loss and data checked; no model loaded, nothing written"]),
        file=sys.stderr,
    )
    return 0
