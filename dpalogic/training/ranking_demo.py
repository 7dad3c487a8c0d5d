"""``dpalogic demo --task ranking``: a K = 4 ranking task, a derived listwise loss against pairwise DPO.

**Task** (ground truth known, generated locally from a seed): the prompt ``"sort 4192:"`` of the sorting task
(:mod:`dpalogic.training.demo`) has four answers: the sorted digits and three strings with 1, 2 and 3 inversions,
each made from the previous one by swapping one adjacent, correctly ordered pair of different digits. An answer's
score is minus its number of inversions, so the ranking is total (no ties) and the sorted answer is the best. The
rows list the answers in a random order; reading them sorts them best first.

**Study**: every run trains the same ``tiny`` model (same initial weights) for the same number of steps on the same
number of *sequences* per step: a loss over y1 … y4 sees ``B`` prompts (4B sequences), a pairwise loss ``2B`` pairs
made from the rows with ``--pairs`` (4B sequences). After training, every model is scored the same way on the
held-out rows (:func:`~dpalogic.training.ranked_steps.ranked_metrics`: top-1 accuracy, Spearman's ρ between the
scores and the implicit rewards ``log π − log π_init``), whatever it was trained on.
"""

from __future__ import annotations

import json
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from dpalogic.errors import DPALogicError

# ρ = (o_1 / r_1) / Σ_{j>1} o_j / r_j (o: the policy's odds, r: the reference's probabilities): the softmax of the answers'
# log-odds ratios, conditioned on exactly one answer being accepted: a derived listwise DPO (docs/semantics.md)
LISTWISE = "(M(y1), ExactlyOne(M(y1..y4)) & And(M(y1) | Ref(y1), M(y2) | Ref(y2), M(y3) | Ref(y3), M(y4) | Ref(y4)))"
RANKING_LOSSES = (LISTWISE, "dpo")
K = 4


def _inversions(xs: list[int]) -> int:
    return sum(xs[i] > xs[j] for i in range(len(xs)) for j in range(i + 1, len(xs)))


def make_ranking_task(
    n_train: int = 1000, n_eval: int = 128, *, seed: int = 0, min_len: int = 4, max_len: int = 8
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Train and held-out K = 4 rows ``{"prompt", "responses", "scores"}`` (disjoint prompts), deterministic in
    ``seed``; the answers are in a random order, the scores are minus their inversions (0, −1, −2, −3)."""
    from dpalogic.training.demo import make_task

    pairs_train, pairs_eval = make_task(n_train, n_eval, seed=seed, min_len=min_len, max_len=max_len)
    rng = random.Random(seed + 1)

    def ranked(row: dict[str, str]) -> dict[str, Any]:
        answers = [[int(c) for c in row["chosen"]]]
        while len(answers) < K:  # one more inversion: swap an adjacent pair that is in order
            cur = answers[-1]
            i = rng.choice([k for k in range(len(cur) - 1) if cur[k] < cur[k + 1]])
            nxt = list(cur)
            nxt[i], nxt[i + 1] = nxt[i + 1], nxt[i]
            answers.append(nxt)
        order = list(range(K))
        rng.shuffle(order)
        return {
            "prompt": row["prompt"],
            "responses": ["".join(map(str, answers[i])) for i in order],
            "scores": [-_inversions(answers[i]) for i in order],
        }

    return [ranked(r) for r in pairs_train], [ranked(r) for r in pairs_eval]


@dataclass
class RankingConfig:
    losses: tuple[str, ...] = RANKING_LOSSES
    pairs: str = "all"  # how a pairwise loss gets its pairs from the rows
    curriculum: str | None = None
    out: str = "runs/demo-ranking"
    steps: int = 40
    batch_size: int = 8  # prompts per step for a loss over y1 … y4; a pairwise loss gets 2 × this many pairs
    lr: float = 1e-3
    train_size: int = 1000
    eval_size: int = 128
    seed: int = 0
    beta: float = 0.1  # every loss's β (passed to each, so a structure's own default β = 1 does not apply)
    progress: bool = True
    threads: int = 1


def _is_listwise(spec: str, hp: dict[str, float]) -> bool:
    """Whether ``spec`` is a loss over y1 … y4 (a loss over another number of answers cannot train on these rows)."""
    from dpalogic.runtime.preference_loss import PreferenceLoss
    from dpalogic.training.ranked_steps import list_size

    k = list_size(PreferenceLoss(spec, **hp))
    if k not in (None, K):
        raise DPALogicError(
            f"{spec}: a loss over y1 … y{k}, and the ranking demo's rows have K = {K} answers: use a loss over "
            f"y1 … y{K}, or a pairwise loss (trained on pairs made with --pairs)"
        )
    return k is not None


def _config(cfg: RankingConfig, spec: str, listwise: bool, out: Path):
    from dpalogic.training.config import TrainConfig

    return TrainConfig(
        loss=spec, hp={"beta": cfg.beta}, model="tiny", out=str(out), max_steps=cfg.steps,
        batch_size=cfg.batch_size if listwise else 2 * cfg.batch_size, lr=cfg.lr, warmup_ratio=0.1, eval_every=0,
        log_every=1, save_every=0, keep_checkpoints=1, overwrite=True, max_length=64, max_prompt_length=32,
        seed=cfg.seed, progress=cfg.progress, tensorboard=False, reference="model",
        pairs=None if listwise else cfg.pairs, curriculum=None if listwise else cfg.curriculum,
    )  # fmt: skip


def _eval_logps(model, examples, pad: int) -> Any:
    """``[N, K]`` answer log-probs of the held-out rows under ``model`` (eval mode, no gradient)."""
    import torch

    from dpalogic.training.model import sequence_logps
    from dpalogic.training.ranked_steps import collate_ranked

    was = model.training
    model.eval()
    out = []
    with torch.no_grad():
        for s in range(0, len(examples), 64):
            chunk = examples[s : s + 64]
            b = collate_ranked(chunk, pad)
            logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], use_cache=False).logits
            out.append(sequence_logps(logits, b["labels"]).view(len(chunk), -1))
    model.train(was)
    return torch.cat(out)


def run_ranking_demo(cfg: RankingConfig) -> list[dict[str, Any]]:
    """Train every loss on the ranking task; write ``results.md`` and ``results.json``; one result row per run."""
    import torch

    from dpalogic.training.data import from_records, pad_id
    from dpalogic.training.demo import _label, _torch_threads
    from dpalogic.training.loop import Trainer
    from dpalogic.training.model import build_char_tokenizer, build_tiny_model
    from dpalogic.training.ranked import listwise_rows, tokenize_ranked
    from dpalogic.training.ranked_steps import ranked_metrics

    if not cfg.losses:
        raise DPALogicError("no losses to compare")
    out = Path(cfg.out)
    hp = {"beta": cfg.beta}
    runs = [(spec, _is_listwise(spec, hp)) for spec in cfg.losses]
    labels = [_label(spec) for spec in cfg.losses]  # before any training: a name the table cannot show fails now
    configs = [_config(cfg, spec, lw, out / f"run{i + 1}") for i, (spec, lw) in enumerate(runs)]
    for t in configs:  # every loss and setting is checked before any training
        t.validate()
    out.mkdir(parents=True, exist_ok=True)
    train_rows, eval_rows = make_ranking_task(cfg.train_size, cfg.eval_size, seed=cfg.seed)
    tr, ev = from_records(train_rows, "ranking task (train)"), from_records(eval_rows, "ranking task (held out)")
    tok = build_char_tokenizer()
    pad = pad_id(tok)
    held_out = tokenize_ranked(listwise_rows(ev, K), tok, max_length=64, max_prompt_length=32).examples
    scores = torch.tensor([ex.scores for ex in held_out], dtype=torch.float64)
    with _torch_threads(cfg.threads):
        init = _eval_logps(build_tiny_model(tok, seed=cfg.seed), held_out, pad)

    def scored(lp) -> dict[str, float]:
        m = ranked_metrics(lp, scores, init)
        return {k: float(m[k].mean()) for k in ("top1_accuracy", "rank_correlation", "logps_best", "logps_mean")}

    results = [{"loss": "(initial model)", "label": "(initial model)", "pairs": "", "seconds": 0.0, **scored(init)}]
    for (spec, listwise), label, tcfg in zip(runs, labels, configs):
        t0 = time.perf_counter()
        with _torch_threads(cfg.threads):
            trainer = Trainer(tcfg, train_rows=tr, eval_rows=None, quiet=not cfg.progress)
            try:
                trainer.run()
                lp = _eval_logps(trainer.model, held_out, pad)
                train_loss = [h["loss"] for h in trainer.history if h["split"] == "train"]
                beta = trainer.loss_fn.hyperparameters.get("beta")  # the β the loss ran with
            finally:
                trainer.close()
        pairs = "" if listwise else cfg.pairs + (f", {cfg.curriculum}" if cfg.curriculum else "")
        results.append(
            {"loss": spec, "label": label, "pairs": pairs or "lists (K = 4)", "beta": beta,
             "seconds": time.perf_counter() - t0, "train_loss_start": train_loss[0], "train_loss_end": train_loss[-1],
             **scored(lp)}
        )  # fmt: skip
    (out / "results.md").write_text(ranking_table(results, cfg))
    (out / "results.json").write_text(json.dumps({"config": asdict(cfg), "results": results}, indent=1) + "\n")
    return results


def ranking_table(results: list[dict[str, Any]], cfg: RankingConfig) -> str:
    """A Markdown table of the held-out K-answer metrics of every run (and of the initial model)."""
    head = (
        f"Ranking task (K = 4): {cfg.train_size} train / {cfg.eval_size} held-out prompts, tiny Llama, {cfg.steps} "
        f"steps of {4 * cfg.batch_size} sequences, lr {cfg.lr:g}, seed {cfg.seed}; every loss runs with β = "
        f"{cfg.beta:g} (the demo passes it to each, in place of the loss's own default: β = 1 for a structure such as "
        "the listwise formula), column β. Held-out: top-1 accuracy (the sorted answer has the highest log π; chance "
        "0.25) and Spearman's ρ between the scores and log π − log π_init.\n\n"
    )
    cols = ["loss", "trained on", "β", "top-1 acc.", "Spearman ρ", "log π(y1)", "mean log π", "time"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in results:
        beta = "" if r.get("beta") is None else f"{r['beta']:g}"
        cells = [r["label"].replace("|", "\\|"), r["pairs"], beta, f"{r['top1_accuracy']:.3f}", f"{r['rank_correlation']:.3f}",
                 f"{r['logps_best']:.2f}", f"{r['logps_mean']:.2f}", f"{r['seconds']:.0f}s"]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    return head + "\n".join(lines) + "\n"
