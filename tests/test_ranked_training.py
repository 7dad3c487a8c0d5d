"""Training with K answers per prompt: the metrics against independent references, the forward pass against
per-sequence log-probs and a closed-form loss, short real runs (listwise, and pairwise on pairs made from the rows),
the curriculum's order, the CLI's errors (exit code 2) and the ranking demo."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from dpalogic import PreferenceLoss
from dpalogic.cli import main
from dpalogic.training.data import from_records
from dpalogic.training.loop import TrainConfig, Trainer, train
from dpalogic.training.model import build_char_tokenizer, build_tiny_model, sequence_logps
from dpalogic.training.ranked import listwise_rows, tokenize_ranked
from dpalogic.training.ranked_steps import collate_ranked, list_size, ranked_metrics, spearman
from dpalogic.training.ranking_demo import LISTWISE, make_ranking_task
from dpalogic.training.steps import micro_batches

torch.set_num_threads(1)  # two xdist workers share two cores
SOFTMAX = "(M(y1), ExactlyOne(M(y1..y4)))"  # a softmax cross-entropy over the answers' log-odds


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


# --------------------------------------------------------------------------------------------------- metrics


def reference_spearman(x: list[float], y: list[float]) -> float:
    """Spearman's ρ the textbook way: ranks from a sort (ties: the mean of the positions they span), then Pearson."""

    def ranks(v):
        order = sorted(range(len(v)), key=lambda i: v[i])
        r = [0.0] * len(v)
        i = 0
        while i < len(v):
            j = i
            while j + 1 < len(v) and v[order[j + 1]] == v[order[i]]:
                j += 1
            for k in range(i, j + 1):
                r[order[k]] = (i + j) / 2 + 1
            i = j + 1
        return r

    rx, ry = ranks(x), ranks(y)
    mx, my = sum(rx) / len(rx), sum(ry) / len(ry)
    sxy = sum((a - mx) * (b - my) for a, b in zip(rx, ry))
    sxx = sum((a - mx) ** 2 for a in rx)
    syy = sum((b - my) ** 2 for b in ry)
    return 0.0 if sxx == 0 or syy == 0 else sxy / math.sqrt(sxx * syy)


@given(st.integers(2, 12).flatmap(lambda k: st.tuples(*(st.lists(st.integers(-3, 3), min_size=k, max_size=k),) * 2)))
def test_spearman_matches_the_textbook_computation(xy):
    x, y = xy
    got = spearman(torch.tensor([x], dtype=torch.float64), torch.tensor([y], dtype=torch.float64))
    assert got.item() == pytest.approx(reference_spearman(x, y), abs=1e-12)


def test_spearman_without_ties_is_the_closed_form():
    g = torch.Generator().manual_seed(0)
    for k in (2, 4, 9):
        x, y = torch.randn(5, k, generator=g, dtype=torch.float64), torch.randn(5, k, generator=g, dtype=torch.float64)
        rx, ry = x.argsort(1).argsort(1).double(), y.argsort(1).argsort(1).double()
        closed = 1 - 6 * (rx - ry).square().sum(1) / (k * (k * k - 1))  # 1 − 6Σd²/(n(n²−1))
        torch.testing.assert_close(spearman(x, y), closed)
    assert spearman(torch.tensor([[1.0, 2, 3]]), torch.tensor([[0.0, 0, 0]])).item() == 0.0  # no order: 0
    assert spearman(torch.tensor([[3.0, 2, 1]]), torch.tensor([[9.0, 5, -1]])).item() == pytest.approx(1.0)


def test_ranked_metrics_against_a_loop():
    g = torch.Generator().manual_seed(1)
    lp, ref = -torch.rand(64, 4, generator=g) * 3, -torch.rand(64, 4, generator=g) * 3
    lp[0] = lp[0, 0]  # a row of ties: y1 is not strictly highest
    scores = torch.tensor([[3.0, 2.0, 1.0, 0.0]]).repeat(64, 1)
    m = ranked_metrics(lp, scores, ref)
    for b in range(64):
        row, rew = lp[b].tolist(), (lp[b].double() - ref[b].double()).tolist()
        assert m["top1_accuracy"][b] == float(all(row[0] > v for v in row[1:]))
        assert m["reward_top1_accuracy"][b] == float(all(rew[0] > v for v in rew[1:]))
        assert m["rank_correlation"][b].item() == pytest.approx(reference_spearman(scores[b].tolist(), rew))
        assert m["logps_mean"][b].item() == pytest.approx(sum(row) / 4, rel=1e-6)
    no_ref = ranked_metrics(lp, scores)
    torch.testing.assert_close(no_ref["reward_top1_accuracy"], no_ref["top1_accuracy"])


def test_list_size():
    assert list_size(PreferenceLoss(SOFTMAX)) == 4
    assert list_size(PreferenceLoss("dpo")) is None
    assert list_size(PreferenceLoss("kto")) is None
    with pytest.raises(Exception, match="--fused"):
        list_size(PreferenceLoss(SOFTMAX), fused=True)


# --------------------------------------------------------------------------------------------------- the step


@pytest.fixture(scope="module")
def ranking_rows():
    tr, ev = make_ranking_task(160, 32, seed=2)
    return tr, ev


def test_a_batch_scores_every_answer_as_its_own_sequence(ranking_rows):
    tok = build_char_tokenizer()
    model = build_tiny_model(tok, seed=0).eval()
    rows = listwise_rows(from_records(ranking_rows[1][:5]), 4)
    examples = tokenize_ranked(rows, tok).examples
    batch = collate_ranked(examples, tok.pad_token_id)
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        lp = sequence_logps(logits, batch["labels"]).view(5, 4)
        for b, ex in enumerate(examples):  # each sequence alone, no padding: Σ_t log π(answer token t)
            for j, ans in enumerate(ex.answer_ids):
                ids = torch.tensor([ex.prompt_ids + ans])
                logp = model(input_ids=ids).logits[0, :-1].log_softmax(-1)
                direct = sum(logp[len(ex.prompt_ids) - 1 + t, a] for t, a in enumerate(ans))
                assert lp[b, j].item() == pytest.approx(direct.item(), abs=1e-4)
    assert batch["lengths"].tolist() == [[len(a) for a in ex.answer_ids] for ex in examples]
    torch.testing.assert_close(batch["scores"][:, 0], torch.zeros(5, dtype=torch.float64))  # the sorted answer
    per = PreferenceLoss(SOFTMAX, reduction="none")(logps=lp)
    lo = lp.double() - torch.log1p(-lp.double().exp())  # log-odds
    torch.testing.assert_close(per.double(), -torch.log_softmax(lo, 1)[:, 0], rtol=1e-5, atol=1e-5)


def small(out: Path, **kw) -> TrainConfig:
    base = dict(out=str(out), max_steps=12, batch_size=8, lr=2e-3, eval_every=12, log_every=1, save_every=0,
                progress=False, tensorboard=False, max_length=48, max_prompt_length=24)  # fmt: skip
    return TrainConfig(**{**base, **kw})


@pytest.mark.parametrize("loss", [SOFTMAX, LISTWISE])
def test_a_listwise_loss_trains(loss, ranking_rows, tmp_path):
    tr, ev = ranking_rows
    res = train(small(tmp_path / "r", loss=loss), train_rows=from_records(tr), eval_rows=from_records(ev))
    evals = [h for h in res["history"] if h["split"] == "eval"]
    trains = [h for h in res["history"] if h["split"] == "train"]
    assert [e["step"] for e in evals] == [0, 12]
    for rec in evals + trains:
        assert all(math.isfinite(rec[k]) for k in ("loss", "top1_accuracy", "rank_correlation", "logps_best"))
    assert evals[-1]["loss"] < evals[0]["loss"]
    assert sum(t["loss"] for t in trains[-3:]) < sum(t["loss"] for t in trains[:3])
    assert evals[-1]["top1_accuracy"] > evals[0]["top1_accuracy"]
    assert evals[-1]["rank_correlation"] > 0.3
    if "Ref" in loss:  # with a reference the implicit rewards all start at 0: no order yet
        assert evals[0]["rank_correlation"] == 0.0 and evals[0]["reward_top1_accuracy"] == 0.0


def test_pairs_from_rows_train_a_pairwise_loss_in_curriculum_order(ranking_rows, tmp_path):
    tr, ev = ranking_rows
    cfg = small(tmp_path / "p", loss="dpo", pairs="all", curriculum="easy-to-hard", max_steps=4, margin_from="scores")
    trainer = Trainer(cfg, train_rows=from_records(tr), eval_rows=from_records(ev), quiet=True)
    try:
        ex = trainer.train_data.examples
        assert len(ex) == 6 * len(tr)  # K = 4, no ties: every one of the 6 pairs of every row
        gaps = [e.margin for e in ex]  # --margin-from scores: the pair's score gap
        assert gaps == sorted(gaps, reverse=True) and gaps[0] == 3.0 and gaps[-1] == 1.0
        kw = dict(steps_per_epoch=trainer.steps_per_epoch, seed=0, batch_size=8, grad_accum=1, world=1, rank=0)
        for step in range(3):  # the data's order, not a shuffle
            assert micro_batches(ex, step=step, ordered=True, **kw) == [ex[8 * step : 8 * step + 8]]
        res = trainer.run()
        assert res["step"] == 4
        evals = [h for h in trainer.history if h["split"] == "eval"]
        assert all(math.isfinite(e["loss"]) and "reward_accuracy" in e for e in evals)
        assert evals[-1]["pairs"] == 6 * len(ev)
    finally:
        trainer.close()


# --------------------------------------------------------------------------------------------------- the CLI


@pytest.fixture()
def files(tmp_path, ranking_rows):
    tr, ev = ranking_rows
    bad = [
        {"prompt": "p", "responses": ["a", "b"], "scores": [1, "x"]},
        {"prompt": "q", "responses": ["a"], "scores": [1]},
    ]
    return {
        "ranked": write_jsonl(tmp_path / "ranked.jsonl", tr[:40] + bad),
        "eval": write_jsonl(tmp_path / "eval.jsonl", ev[:8]),
        "pairs": write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": "p", "chosen": "a", "rejected": "b"}] * 8),
        "k3": write_jsonl(tmp_path / "k3.jsonl", [{"prompt": "p", "responses": ["a", "b", "c"], "scores": [1, 2, 3]}]),
    }


def test_cli_trains_k_answers_and_lists_bad_rows(files, tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["train", "--loss", SOFTMAX, "--data", str(files["ranked"]), "--eval", str(files["eval"]), "--out",
            str(out), "--max-steps", "2", "--batch-size", "4", "--no-progress", "--no-tensorboard"]  # fmt: skip
    assert main(argv) == 0
    listed = [json.loads(line) for line in (out / "bad_rows.jsonl").read_text().splitlines()]
    assert [x["row"] for x in listed] == [41, 42]
    summary = json.loads((out / "summary.json").read_text())
    assert 0 <= summary["eval"]["top1_accuracy"] <= 1


@pytest.mark.parametrize(
    "data, extra, fragment",
    [
        ("pairs", ["--loss", SOFTMAX], "is not K-answer rows"),
        ("ranked", ["--loss", "dpo"], "pass --pairs all, adjacent or best-vs-rest"),
        ("ranked", ["--loss", "dpo", "--curriculum", "easy-to-hard"], "pairs is not set"),
        ("ranked", ["--loss", SOFTMAX, "--pairs", "all"], "--pairs applies to pairwise losses"),
        ("pairs", ["--loss", "dpo", "--pairs", "all"], "has pairs already"),
        ("ranked", ["--loss", "dpo", "--pairs", "all", "--margin-from", "margin"], "take --margin-from scores"),
        ("ranked", ["--loss", SOFTMAX, "--margin-from", "margin"], "no row with a usable margin"),
        ("ranked", ["--loss", "dpo", "--pairs", "every"], "pairs must be"),
        ("ranked", ["--loss", SOFTMAX, "--fused"], "drop --fused"),
        ("k3", ["--loss", SOFTMAX], "no row with 4 answers"),
        ("ranked", ["--loss", SOFTMAX, "--strict-data"], "malformed"),
    ],
)
def test_cli_errors_exit_2(files, data, extra, fragment, tmp_path, capsys):
    argv = ["train", "--data", str(files[data]), "--out", str(tmp_path / "o"), "--max-steps", "1", "--no-progress"]
    assert main(argv + extra) == 2
    err = capsys.readouterr().err
    assert fragment in err and "Traceback" not in err


def test_the_ranking_demo(tmp_path, capsys):
    argv = ["demo", "--task", "ranking", "--steps", "3", "--train-size", "40", "--eval-size", "8", "--batch-size",
            "4", "--out", str(tmp_path / "d"), "--no-progress", "--json"]  # fmt: skip
    assert main(argv) == 0
    results = json.loads(capsys.readouterr().out)
    assert [r["pairs"] for r in results] == ["", "lists (K = 4)", "all"]
    assert all(0 <= r["top1_accuracy"] <= 1 and -1 <= r["rank_correlation"] <= 1 for r in results)
    assert results[0]["rank_correlation"] == 0.0  # the initial model is its own reference
    assert (tmp_path / "d" / "results.md").read_text().count("\n|") == 5  # header, rule, 3 rows


def test_the_dry_run_checks_k_answer_rows_against_the_loss(files, tmp_path, capsys):
    base = ["train", "--data", str(files["ranked"]), "--out", str(tmp_path / "o"), "--dry-run"]
    assert main(base + ["--loss", "dpo", "--pairs", "adjacent"]) == 0
    assert "120 pairs (adjacent) from 40 K-answer rows" in capsys.readouterr().err  # 3 per row, 2 bad rows
    assert main(base + ["--loss", "dpo"]) == 2
    assert "pass --pairs" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


# --------------------------------------------------------------------------------------------------- margins


@pytest.mark.parametrize("margin_from", ["margin", "scores"])
def test_list_margins_shift_the_softmax_by_the_row_margin(margin_from, ranking_rows, tmp_path):
    tr = [dict(r, margin=0.25 * (n % 5)) for n, r in enumerate(ranking_rows[0][:32])]
    cfg = small(tmp_path / "m", loss=SOFTMAX, margin_from=margin_from, margin_scale=2.0, max_steps=2, eval_every=0)
    trainer = Trainer(cfg, train_rows=from_records(tr), quiet=True)
    try:
        ex = trainer.train_data.examples
        by_row = {n: r for n, r in enumerate(tr, 1)}  # the file's rows, unsorted
        for e in ex:
            s = sorted(by_row[e.row]["scores"], reverse=True)
            want = by_row[e.row]["margin"] if margin_from == "margin" else s[0] - s[1]
            assert e.margin == pytest.approx(2.0 * want)
        fwd = trainer.forward
        batch = fwd.batch(ex[:8])
        with torch.no_grad():
            per, lp, _, _, _ = fwd.pair_losses(trainer.policy, batch, None)
        # closed form: the softmax over log-odds is softplus(m − log ρ), log ρ = lo1 − logsumexp(lo2 … lo4)
        lo = lp.double() - torch.log1p(-lp.double().exp())
        log_rho = lo[:, 0] - torch.logsumexp(lo[:, 1:], 1)
        m = torch.tensor([e.margin for e in ex[:8]], dtype=torch.float64)
        torch.testing.assert_close(per.double(), torch.nn.functional.softplus(m - log_rho), rtol=1e-5, atol=1e-5)
        assert trainer.run()["step"] == 2
    finally:
        trainer.close()


def test_cli_list_margins_and_the_lists_wording(files, tmp_path, capsys):
    def with_margins(name: str, n: int) -> Path:  # held-out rows need a margin too, as pairs do
        rows = [dict(json.loads(line), margin=1.0) for line in files[name].read_text().splitlines()[:n]]
        return write_jsonl(tmp_path / f"m-{name}.jsonl", rows)

    data, held_out, out = with_margins("ranked", 40), with_margins("eval", 8), tmp_path / "run"
    argv = ["train", "--loss", SOFTMAX, "--data", str(data), "--eval", str(held_out), "--out", str(out),
            "--max-steps", "2", "--batch-size", "4", "--eval-every", "1", "--margin-from", "margin", "--progress",
            "--no-tensorboard"]  # fmt: skip
    assert main(argv) == 0
    err = capsys.readouterr().err
    assert "40 lists of 4 answers, global batch 4, 2 steps" in err and " pairs" not in err
    evals = [r for r in map(json.loads, (out / "log.jsonl").read_text().splitlines()) if r.get("split") == "eval"]
    for ev in evals[1:]:  # capsys is no terminal: one progress line per evaluation, with the K-answer metrics
        line = f"eval top-1 accuracy {ev['top1_accuracy']:.3f}, rank correlation {ev['rank_correlation']:.3f}"
        assert f"step {ev['step']}/2: " in err and line in err
    assert "nan" not in err


def test_the_dry_run_and_the_run_refuse_too_few_rows_alike(files, tmp_path, capsys):
    base = ["train", "--loss", SOFTMAX, "--data", str(files["ranked"]), "--out", str(tmp_path / "o"),
            "--batch-size", "16", "--grad-accum", "3", "--no-progress"]  # fmt: skip
    want = "40 lists of 4 answers to train on: fewer than one global batch (16 per device × 1 processes × 3"
    assert main(base + ["--dry-run"]) == 2
    err = capsys.readouterr().err
    assert want in err and "data checked" not in err and "40 rows used, 2 skipped" in err
    assert main(base) == 2
    assert want in capsys.readouterr().err
    assert main(base[:-5] + ["--batch-size", "8", "--grad-accum", "5", "--dry-run"]) == 0  # 40 = one global batch


def test_the_ranking_demo_refuses_another_k_and_names_each_beta(tmp_path, capsys):
    argv = ["demo", "--task", "ranking", "--steps", "1", "--train-size", "16", "--eval-size", "4", "--batch-size",
            "4", "--no-progress", "--json"]  # fmt: skip
    assert main(argv + ["--losses", "tpo", "--out", str(tmp_path / "t")]) == 2
    err = capsys.readouterr().err
    assert "tpo: a loss over y1 … y3, and the ranking demo's rows have K = 4 answers" in err
    assert "row 1" not in err and not (tmp_path / "t").exists()  # refused before anything ran
    assert main(argv + ["--losses", f"kto,{SOFTMAX}", "--out", str(tmp_path / "k")]) == 0
    results = json.loads(capsys.readouterr().out)
    assert [r["label"] for r in results[1:2]] == ["kto"]  # a loss with no structure is named, not refused
    assert [r.get("beta") for r in results] == [None, 0.1, 0.1]  # the demo's β, passed to every loss …
    assert PreferenceLoss(SOFTMAX).hyperparameters["beta"] == 1.0  # … in place of a structure's own default
    table = (tmp_path / "k" / "results.md").read_text()
    assert "every loss runs with β = 0.1" in table and "| kto | all | 0.1 |" in table
