"""``dpalogic demo``: compare losses on a synthetic preference task (the tiny model, on the CPU, offline)."""

from __future__ import annotations

import argparse
import json
import math
import sys

from dpalogic.cli.common import Subparsers
from dpalogic.errors import DPALogicError


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


def register(subparsers: Subparsers) -> None:
    from dpalogic.training.demo import DEFAULT_LOSSES, DemoConfig

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
    d.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
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
