"""The synthetic preference task and the side-by-side loss study behind ``dpalogic demo``.

**Task** (ground truth known, generated locally from a seed): a prompt ``"sort 4192:"`` holds 4–8 random digits;
the *chosen* answer is the digits sorted (``"1249"``); the *rejected* answer is that sorted string with one adjacent
pair of different digits swapped (``"1429"``) — same digits, same length, exactly one inversion. Prompts are unique,
and the held-out prompts never occur in training. A policy has learned the preference when it gives the sorted
answer the higher sequence log-probability on held-out prompts (*preference accuracy*; 0.5 is chance, and the
untrained tiny model sits near it).

**Study**: every loss trains the same ``tiny`` model (same initial weights, same batches) for the same number of
steps; the held-out set is evaluated every ``eval_every`` steps. The results are a table (``results.md``,
``results.json``) and PNG curves — loss, preference accuracy, chosen and rejected log-probs — for all losses together
(``curves.png``) and for each loss (``curves-<loss>.png``).
"""

from __future__ import annotations

import json
import random
import re
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dpalogic.errors import DPALogicError

if TYPE_CHECKING:
    from dpalogic.training.config import TrainConfig

DEFAULT_LOSSES = ("dpo", "ipo", "simpo", "cpo", "orpo", "ccpo")


def make_task(
    n_train: int = 2000, n_eval: int = 256, *, seed: int = 0, min_len: int = 4, max_len: int = 8
) -> tuple[list[dict[str, str]], list[dict[str, str]]]:
    """Train and held-out rows of the sorting task (disjoint prompts), deterministic in ``seed``."""
    if n_train < 1 or n_eval < 1:
        raise DPALogicError("the demo needs at least one training and one held-out row")
    if not 2 <= min_len <= max_len:
        raise DPALogicError(f"digit-string lengths must satisfy 2 ≤ min_len ≤ max_len, got {min_len}, {max_len}")
    capacity = sum(10**n for n in range(min_len, max_len + 1))
    if n_train + n_eval > capacity // 2:
        raise DPALogicError(f"{n_train + n_eval} distinct prompts of {min_len}–{max_len} digits are too many")
    rng = random.Random(seed)
    seen: set[tuple[int, ...]] = set()
    rows: list[dict[str, str]] = []
    while len(rows) < n_train + n_eval:
        digits = tuple(rng.randrange(10) for _ in range(rng.randint(min_len, max_len)))
        if digits in seen or len(set(digits)) < 2:  # all-equal digits have no wrong order to reject
            continue
        seen.add(digits)
        good = sorted(digits)
        i = rng.choice([k for k in range(len(good) - 1) if good[k] != good[k + 1]])
        bad = list(good)
        bad[i], bad[i + 1] = bad[i + 1], bad[i]

        def s(xs) -> str:
            return "".join(map(str, xs))

        rows.append({"prompt": f"sort {s(digits)}:", "chosen": s(good), "rejected": s(bad)})
    return rows[:n_train], rows[n_train:]


@dataclass
class DemoConfig:
    losses: tuple[str, ...] = DEFAULT_LOSSES
    out: str = "runs/demo"
    steps: int = 40  # the task is learned in ~20 steps; the rest shows how each loss moves the log-probs
    batch_size: int = 32
    lr: float = 1e-3
    eval_every: int = 10
    train_size: int = 2000
    eval_size: int = 256
    seed: int = 0
    plot: bool = True
    progress: bool = True
    threads: int = 1  # torch CPU threads: the tiny model's 64-wide matrices gain nothing from more


@contextmanager
def _torch_threads(n: int) -> Iterator[None]:
    """Run with ``n`` intra-op threads, then restore the caller's setting.

    The tiny model's matrix products are too small to split: on a busy 2-core machine two threads waiting on each other
    made the demo 3–4× slower than one.
    """
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _slug(spec: str, i: int) -> str:
    if re.fullmatch(r"[A-Za-z0-9_]+", spec):
        return spec
    return f"formula{i + 1}"


def _label(spec: str) -> str:
    """The catalog name (or a loss with no structure: KTO, BCO, …), or the formula as dpalogic prints it plus the
    catalog loss it equals (if any)."""
    from dpalogic.semantics.catalog import entries, resolve, unstructured_name

    if spec in entries() or unstructured_name(spec):
        return spec
    prog = resolve(spec)
    if prog.structure is None:
        return spec
    from dpalogic.semantics.catalog import catalog_matches

    text = prog.structure.text("unicode")
    same = catalog_matches(prog.structure)[0]
    return f"{text} (= {same[0]})" if same else text


def _train_config(cfg: DemoConfig, spec: str, out: Path) -> TrainConfig:
    """One loss's run: the tiny model, the demo's steps and rate, no checkpoints along the way."""
    from dpalogic.training.config import TrainConfig

    return TrainConfig(
        loss=spec,
        model="tiny",
        out=str(out),
        max_steps=cfg.steps,
        batch_size=cfg.batch_size,
        lr=cfg.lr,
        warmup_ratio=0.1,
        eval_every=cfg.eval_every,
        log_every=1,
        save_every=0,
        keep_checkpoints=1,
        overwrite=True,  # the demo's runs are scratch work: running it again replaces them with its table
        max_length=64,
        max_prompt_length=32,
        seed=cfg.seed,
        progress=cfg.progress,
        tensorboard=False,
    )


def run_demo(cfg: DemoConfig) -> list[dict[str, Any]]:
    """Train every loss of ``cfg.losses`` on the task; write the table and plots; return one result row per loss."""
    from dpalogic.training.data import from_records
    from dpalogic.training.loop import train

    if not cfg.losses:
        raise DPALogicError("no losses to compare")
    out = Path(cfg.out)
    runs = [(spec, _slug(spec, i)) for i, spec in enumerate(cfg.losses)]
    configs = [_train_config(cfg, spec, out / slug) for spec, slug in runs]
    for tcfg in configs:  # every loss and its hyperparameters are checked before any training
        tcfg.validate()
    out.mkdir(parents=True, exist_ok=True)
    train_rows, eval_rows = make_task(cfg.train_size, cfg.eval_size, seed=cfg.seed)
    tr, ev = from_records(train_rows, "sorting task (train)"), from_records(eval_rows, "sorting task (held out)")
    results = []
    for (spec, slug), tcfg in zip(runs, configs):
        t0 = time.perf_counter()
        with _torch_threads(cfg.threads):
            res = train(tcfg, train_rows=tr, eval_rows=ev, quiet=not cfg.progress)
        elapsed = time.perf_counter() - t0
        hist = res["history"]
        evals = [h for h in hist if h["split"] == "eval"]
        trains = [h for h in hist if h["split"] == "train"]
        first, last = evals[0], evals[-1]
        results.append(
            {
                "loss": spec,
                "label": _label(spec),
                "slug": slug,
                "reference": "yes" if _needs_ref(spec) else "no",
                "eval_loss_start": first["loss"],
                "eval_loss_end": last["loss"],
                "accuracy_start": first["logp_accuracy"],
                "accuracy_end": last["logp_accuracy"],
                "reward_accuracy_end": last["reward_accuracy"],
                "logps_chosen_start": first["logps_chosen"],
                "logps_chosen_end": last["logps_chosen"],
                "logps_rejected_start": first["logps_rejected"],
                "logps_rejected_end": last["logps_rejected"],
                "seconds": elapsed,
                "curves": {"train": trains, "eval": evals},
            }
        )
    table = results_table(results, cfg)
    (out / "results.md").write_text(table)
    (out / "results.json").write_text(
        json.dumps({"config": asdict(cfg), "results": results}, indent=1, default=list) + "\n"
    )
    if cfg.plot:
        plot_curves(results, out)
    return results


def _needs_ref(spec: str) -> bool:
    from dpalogic.runtime.preference_loss import PreferenceLoss

    return PreferenceLoss(spec).needs_reference


def results_table(results: list[dict[str, Any]], cfg: DemoConfig) -> str:
    """A Markdown table: held-out metrics at step 0 and at the end, per loss."""
    head = (
        f"Sorting task: {cfg.train_size} train / {cfg.eval_size} held-out pairs, tiny Llama, {cfg.steps} steps × "
        f"batch {cfg.batch_size}, lr {cfg.lr:g}, seed {cfg.seed}. Held-out metrics, step 0 → step {cfg.steps}.\n\n"
    )
    cols = ["loss", "ref", "eval loss", "pref. accuracy", "reward acc.", "log π(yw)", "log π(yl)", "time"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in results:
        lines.append(
            "| "
            + " | ".join(
                [
                    r["label"].replace("|", "\\|"),
                    r["reference"],
                    f"{r['eval_loss_start']:.3f} → {r['eval_loss_end']:.3f}",
                    f"{r['accuracy_start']:.3f} → {r['accuracy_end']:.3f}",
                    f"{r['reward_accuracy_end']:.3f}",
                    f"{r['logps_chosen_start']:.1f} → {r['logps_chosen_end']:.1f}",
                    f"{r['logps_rejected_start']:.1f} → {r['logps_rejected_end']:.1f}",
                    f"{r['seconds']:.0f}s",
                ]
            )
            + " |"
        )
    return head + "\n".join(lines) + "\n"


PANELS = (
    ("train", "loss", "training loss", True),
    ("eval", "logp_accuracy", "held-out preference accuracy", False),
    ("eval", "logps_chosen", "held-out log π(yw) (chosen)", False),
    ("eval", "logps_rejected", "held-out log π(yl) (rejected)", False),
)


def plot_curves(results: list[dict[str, Any]], out: Path) -> list[Path]:
    """``curves.png`` (every loss per panel) and ``curves-<slug>.png`` (one loss); Agg backend, no display needed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    fig, axes = plt.subplots(2, 2, figsize=(12, 8))
    for ax, (split, key, title, logy) in zip(axes.flat, PANELS):
        for r in results:
            pts = r["curves"][split]
            ax.plot([p["step"] for p in pts], [p[key] for p in pts], label=r["label"])
        ax.set_title(title)
        ax.set_xlabel("step")
        if logy:
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
    axes.flat[1].axhline(0.5, color="gray", ls=":", lw=1)
    axes.flat[0].legend(fontsize=8)
    fig.suptitle("dpalogic demo: sorting-task preferences, one curve per loss")
    fig.tight_layout()
    path = out / "curves.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    written.append(path)
    for r in results:
        fig, axes = plt.subplots(1, 3, figsize=(14, 3.8))
        tr, ev = r["curves"]["train"], r["curves"]["eval"]
        axes[0].plot([p["step"] for p in tr], [p["loss"] for p in tr], label="train")
        axes[0].plot([p["step"] for p in ev], [p["loss"] for p in ev], label="held out")
        axes[0].set_title("loss")
        axes[0].legend()
        axes[1].plot([p["step"] for p in ev], [p["logp_accuracy"] for p in ev], label="preference accuracy")
        axes[1].plot([p["step"] for p in ev], [p["reward_accuracy"] for p in ev], label="reward accuracy", ls="--")
        axes[1].axhline(0.5, color="gray", ls=":", lw=1)
        axes[1].set_ylim(-0.02, 1.02)
        axes[1].set_title("held-out accuracy")
        axes[1].legend()
        axes[2].plot([p["step"] for p in ev], [p["logps_chosen"] for p in ev], label="log π(yw) chosen")
        axes[2].plot([p["step"] for p in ev], [p["logps_rejected"] for p in ev], label="log π(yl) rejected")
        axes[2].set_title("held-out log-probs")
        axes[2].legend()
        for ax in axes:
            ax.set_xlabel("step")
            ax.grid(alpha=0.3)
        fig.suptitle(r["label"])
        fig.tight_layout()
        path = out / f"curves-{r['slug']}.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path)
    return written
