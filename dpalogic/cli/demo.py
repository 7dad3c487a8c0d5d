"""``dpalogic demo``: compare losses on a synthetic preference task (the tiny model, on the CPU, offline)."""

from __future__ import annotations

import argparse
import math
import sys
from typing import Any

from dpalogic.cli.common import Subparsers, print_json
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
        "--task",
        choices=("sorting", "ranking"),
        default="sorting",
        help="sorting: pairs (sorted vs one swap); ranking: K = 4 answers per prompt scored by inversions, a loss over "
        "y1…y4 against pairwise losses on pairs made with --pairs",
    )
    # the defaults that depend on --task are written into the help (SUPPRESS: an option not given is left unset)
    d.add_argument(
        "--losses",
        default=argparse.SUPPRESS,
        help="comma-separated catalog names or structures; the ranking task's default is a derived listwise loss and "
        f"dpo (default: {','.join(DEFAULT_LOSSES)})",
    )
    d.add_argument("--pairs", choices=("all", "adjacent", "best-vs-rest"), default="all",
                   help="ranking task: the pairs a pairwise loss trains on")  # fmt: skip
    d.add_argument("--curriculum", choices=("easy-to-hard",), default=None,
                   help="ranking task: train a pairwise loss's pairs largest score gap first (Curry-DPO)")  # fmt: skip
    d.add_argument(
        "--out",
        default=argparse.SUPPRESS,
        help="folder for results.json, the table and the plots; runs/demo-ranking for the ranking task (default: "
        f"{DemoConfig.out})",
    )
    d.add_argument("--steps", type=int, default=DemoConfig.steps, help="training steps per loss")
    d.add_argument("--batch-size", type=int, default=argparse.SUPPRESS,
                   help="preference pairs per step; ranking task: prompts per step, 8 by default (a pairwise loss gets "
                   f"twice as many pairs: the same number of sequences) (default: {DemoConfig.batch_size})")  # fmt: skip
    d.add_argument("--lr", type=float, default=1e-3, help="AdamW learning rate")
    d.add_argument("--eval-every", type=int, default=10, help="steps between held-out evaluations")
    d.add_argument("--train-size", type=int, default=argparse.SUPPRESS,
                   help=f"training rows generated; ranking task: 1000 (default: {DemoConfig.train_size})")  # fmt: skip
    d.add_argument("--eval-size", type=int, default=argparse.SUPPRESS,
                   help=f"held-out rows generated; ranking task: 128 (default: {DemoConfig.eval_size})")  # fmt: skip
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
    from dpalogic.training.demo import DEFAULT_LOSSES, DemoConfig, run_demo

    if args.task == "ranking":
        return run_ranking(args)
    cfg = _checked(
        DemoConfig(
            losses=tuple(split_losses(args.losses)) if "losses" in vars(args) else DEFAULT_LOSSES,
            eval_every=args.eval_every,
            plot=not args.no_plot,
            **_shared(args, DemoConfig),
        ),
        "eval_every",
    )
    results = run_demo(cfg)
    if args.json:
        print_json([{k: v for k, v in r.items() if k != "curves"} for r in results])
        return 0
    from dpalogic.training.demo import results_table

    print(results_table(results, cfg))
    files = ["results.md", "results.json"] + (
        ["curves.png"] + [f"curves-{r['slug']}.png" for r in results] if cfg.plot else []
    )
    print(f"written to {cfg.out}/: " + ", ".join(files), file=sys.stderr)
    return 0


def run_ranking(args: argparse.Namespace) -> int:
    """``--task ranking``: :mod:`dpalogic.training.ranking_demo` (defaults: 8 prompts per step, 1000/128 rows)."""
    from dpalogic.training.ranking_demo import RANKING_LOSSES, RankingConfig, ranking_table, run_ranking_demo

    cfg = _checked(
        RankingConfig(
            losses=tuple(split_losses(args.losses)) if "losses" in vars(args) else RANKING_LOSSES,
            pairs=args.pairs,
            curriculum=args.curriculum,
            **_shared(args, RankingConfig),
        )
    )
    results = run_ranking_demo(cfg)
    if args.json:
        print_json(results)
        return 0
    print(ranking_table(results, cfg))
    print(f"written to {cfg.out}/: results.md, results.json", file=sys.stderr)
    return 0


def _shared(args: argparse.Namespace, config: type) -> dict[str, Any]:
    """The settings both demos take; those a task's flags leave out keep ``config``'s defaults."""
    given = vars(args)
    return {
        "out": given.get("out", config.out),
        "steps": args.steps,
        "batch_size": given.get("batch_size", config.batch_size),
        "lr": args.lr,
        "train_size": given.get("train_size", config.train_size),
        "eval_size": given.get("eval_size", config.eval_size),
        "seed": args.seed,
        "progress": not args.no_progress,
        "threads": args.threads,
    }


def _checked(cfg: Any, *counts: str) -> Any:
    """``cfg``, once its counts (the shared ones and ``counts``) are at least 1 and its learning rate is positive."""
    for name in ("steps", "batch_size", *counts, "train_size", "eval_size", "threads"):
        if getattr(cfg, name) < 1:
            raise DPALogicError(f"--{name.replace('_', '-')} must be at least 1")
    if not (math.isfinite(cfg.lr) and cfg.lr > 0):
        raise DPALogicError(f"--lr must be a positive number, got {cfg.lr}")
    return cfg
