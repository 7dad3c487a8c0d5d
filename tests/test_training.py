"""Training: data handling, learning on the demo task, exact resume, failure handling, and 2-process DDP.

Every comparison is against an independent run: a resumed run against the uninterrupted one, the 2-process run
against one process on the same global batch, a cached reference against a live reference model.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from dpalogic.cli import main
from dpalogic.errors import DPALogicError
from dpalogic.training.data import (
    IGNORE_INDEX,
    collate,
    from_records,
    load_preferences,
    tokenize_rows,
)
from dpalogic.training.demo import make_task
from dpalogic.training.loop import TrainConfig, TrainingStopped, train
from dpalogic.training.model import build_char_tokenizer, load_model_and_tokenizer

torch.set_num_threads(1)  # two xdist workers share two cores


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def task_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("task")
    tr, ev = make_task(256, 64, seed=1)
    return write_jsonl(d / "train.jsonl", tr), write_jsonl(d / "eval.jsonl", ev)


def small_cfg(out: Path, data: tuple[Path, Path], **kw) -> TrainConfig:
    base = dict(
        loss="dpo",
        data=str(data[0]),
        eval=str(data[1]),
        out=str(out),
        max_steps=6,
        batch_size=8,
        lr=1e-3,
        eval_every=3,
        log_every=1,
        save_every=0,
        progress=False,
        tensorboard=False,
        max_length=64,
        max_prompt_length=32,
    )
    base.update(kw)
    return TrainConfig(**base)


def final_state(run: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(run / "final" / "model.safetensors"))


def log_lines(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]


# --------------------------------------------------------------------------------------------------- data


def test_malformed_rows_are_reported_with_row_numbers_and_skipped(tmp_path, capsys):
    good = {"prompt": "sort 21:", "chosen": "12", "rejected": "21"}
    lines = [
        json.dumps(good),  # 1
        json.dumps({"prompt": "p", "chosen": "a"}),  # 2: missing rejected
        json.dumps({"prompt": "p", "chosen": "  ", "rejected": "b"}),  # 3: empty answer
        "{not json",  # 4
        json.dumps({"prompt": "p", "chosen": 5, "rejected": "b"}),  # 5: wrong type
        json.dumps({"prompt": "p", "chosen": "same", "rejected": "same"}),  # 6: identical
        '{"prompt": "p", "chosen": "\\ud800", "rejected": "b"}',  # 7: lone surrogate
        "",  # 8: blank lines are not rows
        json.dumps(good),  # 9
    ]
    raw = "\n".join(lines).encode() + b'\n{"prompt": "p", "chosen": "\xff\xfe", "rejected": "b"}\n'  # 10: bad UTF-8
    path = tmp_path / "prefs.jsonl"
    path.write_bytes(raw)

    data = load_preferences(path)
    assert data.row_numbers == [1, 9]
    reasons = {i.row: i.reason for i in data.issues}
    assert sorted(reasons) == [2, 3, 4, 5, 6, 7, 10]
    assert reasons[2] == "missing 'rejected'"
    assert reasons[3] == "empty 'chosen' answer"
    assert reasons[4].startswith("not valid JSON")
    assert "string or a list of chat messages" in reasons[5]
    assert "identical" in reasons[6]
    assert reasons[7].startswith("undecodable text")
    assert reasons[10].startswith("undecodable text (invalid UTF-8")
    assert data.summary("train data").splitlines()[0] == f"train data {path}: 2 rows used, 7 skipped"

    with pytest.raises(DPALogicError) as e:
        load_preferences(path, strict=True)
    assert "7 malformed row(s)" in str(e.value) and "row 2: missing" in str(e.value) and "… and 2 more" in str(e.value)

    # through the CLI: strict mode exits 2 with the first rows listed and every one in bad_rows.jsonl, no traceback
    assert main(["train", "--data", str(path), "--out", str(tmp_path / "r"), "--strict-data", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "error:" in err and "row 2: missing 'rejected'" in err and "Traceback" not in err
    listed = [json.loads(line) for line in (tmp_path / "r" / "bad_rows.jsonl").read_text().splitlines()]
    assert [(r["row"], r["reason"]) for r in listed] == sorted(reasons.items())


def test_formats_agree_and_masks_cover_only_answers(tmp_path):
    rows = [
        {"prompt": "sort 312:", "chosen": "123", "rejected": "213"},
        {"prompt": "sort 9182:", "chosen": "1289", "rejected": "1829"},
    ]
    jl = write_jsonl(tmp_path / "a.jsonl", rows)
    js = tmp_path / "a.json"
    js.write_text(json.dumps(rows))
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "a.parquet")
    from datasets import Dataset, DatasetDict

    DatasetDict({"train": Dataset.from_list(rows), "test": Dataset.from_list(rows[:1])}).save_to_disk(tmp_path / "ds")
    ref = load_preferences(jl).rows
    assert load_preferences(js).rows == ref
    assert load_preferences(tmp_path / "a.parquet").rows == ref
    assert load_preferences(tmp_path / "ds").rows == ref
    assert load_preferences(tmp_path / "ds", split="eval").rows == ref[:1]  # held-out split picked for --eval

    tok = build_char_tokenizer()
    data = tokenize_rows(load_preferences(jl), tok, max_length=64, max_prompt_length=32)
    batch = collate(data.examples, tok.pad_token_id)
    assert batch["input_ids"].shape[0] == 4  # chosen ×2 stacked over rejected ×2
    for i, answer in enumerate(["123", "1289", "213", "1829"]):
        labelled = batch["labels"][i][batch["labels"][i] != IGNORE_INDEX].tolist()
        assert tok.decode(labelled) == answer + "</s>"  # only answer tokens (and EOS) carry labels
    assert batch["chosen_lengths"].tolist() == [4, 5]
    # prompt masked: the first labelled position is right after "<s>sort 312:"
    assert (batch["labels"][0, : 1 + len("sort 312:")] == IGNORE_INDEX).all()


def test_chat_messages_and_truncation():
    tok = build_char_tokenizer()
    conv = {
        "prompt": [{"role": "user", "content": "sort 21"}],
        "chosen": [{"role": "assistant", "content": "12"}],
        "rejected": [{"role": "assistant", "content": "21"}],
    }
    implicit = {  # TRL's implicit-prompt format: whole conversations
        "chosen": conv["prompt"] + conv["chosen"],
        "rejected": conv["prompt"] + conv["rejected"],
    }
    data = from_records([conv, implicit])
    assert data.rows[0] == data.rows[1]
    ex = tokenize_rows(data, tok, max_length=64, max_prompt_length=32).examples[0]
    assert tok.decode(ex.prompt_ids) == "<|user|>sort 21</s><|assistant|>"
    assert tok.decode(ex.chosen_ids) == "12</s>"

    long = from_records([{"prompt": "0123456789", "chosen": "abcdef", "rejected": "ghijkl"}])
    t = tokenize_rows(long, tok, max_length=8, max_prompt_length=5)
    ex = t.examples[0]
    assert tok.decode(ex.prompt_ids) == "56789"  # the prompt keeps its end
    assert tok.decode(ex.chosen_ids) == "abc"  # the answer keeps its start, within max_length
    assert t.truncated == 1
    with pytest.raises(DPALogicError, match="max_prompt_length"):
        tokenize_rows(long, tok, max_length=8, max_prompt_length=8)


# --------------------------------------------------------------------------------------------------- learning


def test_demo_task_loss_decreases_and_held_out_accuracy_rises(tmp_path):
    tr, ev = make_task(512, 128, seed=3)
    assert not {r["prompt"] for r in tr} & {r["prompt"] for r in ev}  # held-out prompts are unseen
    cfg = TrainConfig(
        loss="(M(yl) -> M(yw), M(yw) | M(yl))",  # a derived structure (cCPO's), not a catalog name
        out=str(tmp_path / "run"),
        max_steps=40,
        batch_size=16,
        lr=1e-3,
        eval_every=20,
        log_every=1,
        save_every=0,
        progress=False,
        tensorboard=False,
        max_length=64,
        max_prompt_length=32,
    )
    res = train(cfg, train_rows=from_records(tr), eval_rows=from_records(ev))
    evals = [h for h in res["history"] if h["split"] == "eval"]
    trains = [h for h in res["history"] if h["split"] == "train"]
    assert [e["step"] for e in evals] == [0, 20, 40]
    assert 0.35 < evals[0]["logp_accuracy"] < 0.65  # the untrained model is near chance
    assert evals[-1]["logp_accuracy"] > 0.9  # ... and learns the sorting preference on unseen prompts
    assert evals[-1]["loss"] < 0.5 * evals[0]["loss"]
    first5 = sum(t["loss"] for t in trains[:5]) / 5
    last5 = sum(t["loss"] for t in trains[-5:]) / 5
    assert last5 < 0.5 * first5
    assert evals[-1]["logps_chosen"] > evals[0]["logps_chosen"]  # the chosen answers became more likely


def test_cached_reference_equals_live_reference_model(tmp_path, task_files):
    a = train(small_cfg(tmp_path / "cache", task_files, max_steps=3, reference="cache"))
    b = train(small_cfg(tmp_path / "live", task_files, max_steps=3, reference="model"))
    la = [h["loss"] for h in a["history"]]
    lb = [h["loss"] for h in b["history"]]
    assert la == pytest.approx(lb, abs=1e-5)
    assert (tmp_path / "cache" / "ref_logps-train.safetensors").exists()
    assert not (tmp_path / "live" / "ref_logps-train.safetensors").exists()


def test_fused_switch_matches_the_plain_path(tmp_path, task_files):
    pytest.importorskip("dpalogic.runtime.fused")
    plain = train(small_cfg(tmp_path / "plain", task_files, max_steps=3, loss="simpo"))
    fused = train(small_cfg(tmp_path / "fused", task_files, max_steps=3, loss="simpo", fused=True))
    # two pairs per chunk, split into token slices of 7 rows (two passes)
    sliced = train(
        small_cfg(
            tmp_path / "sliced",
            task_files,
            max_steps=3,
            loss="simpo",
            fused=True,
            fused_chunk_size=2,
            fused_max_chunk_tokens=7,
        )
    )
    for run in (fused, sliced):
        for a, b in zip(plain["history"], run["history"]):
            assert (a["split"], a["step"]) == (b["split"], b["step"])
            for key in ("loss", "logps_chosen", "logps_rejected"):
                assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-5), key
    a = final_state(tmp_path / "plain")
    for name in ("fused", "sliced"):
        b = final_state(tmp_path / name)
        assert all(torch.allclose(a[k], b[k], atol=1e-5) for k in a), name


# --------------------------------------------------------------------------------------------------- resume


def test_resumed_run_reproduces_the_uninterrupted_run(tmp_path, task_files):
    # dropout makes the result depend on the RNG state, so this also checks that RNG states are restored
    full = tmp_path / "full"
    train(small_cfg(full, task_files, save_every=3, dropout=0.1))
    assert (full / "checkpoints" / "step-3" / "manifest.json").exists()
    part = tmp_path / "part"
    train(small_cfg(part, task_files, dropout=0.1, resume=str(full / "checkpoints" / "step-3")))
    a, b = final_state(full), final_state(part)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    after3 = [(x["split"], x["step"], x["loss"]) for x in log_lines(full) if x["step"] > 3]
    assert after3 == [(x["split"], x["step"], x["loss"]) for x in log_lines(part)]

    # resuming with a different global batch would not continue the same run: refused with a clear message
    with pytest.raises(DPALogicError, match="global batch"):
        train(small_cfg(tmp_path / "other", task_files, batch_size=4, resume=str(full / "checkpoints" / "step-3")))


def test_interrupt_saves_a_checkpoint_that_resumes_exactly(tmp_path, task_files):
    full = tmp_path / "full"
    train(small_cfg(full, task_files))

    def ctrl_c_at_step_2(record):
        if record["split"] == "train" and record["step"] == 2:
            os.kill(os.getpid(), signal.SIGINT)  # what Ctrl-C delivers

    run = tmp_path / "run"
    res = train(small_cfg(run, task_files), callbacks=[ctrl_c_at_step_2])
    assert res["interrupted"] and res["step"] == 2
    assert (run / "checkpoints" / "latest").read_text().strip() == "step-2"
    res = train(small_cfg(run, task_files, resume="auto"))
    assert res["step"] == 6 and not res["interrupted"]
    a, b = final_state(full), final_state(run)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [x["loss"] for x in log_lines(full)] == [x["loss"] for x in log_lines(run)]  # the log continues cleanly


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, task_files):
    model, tok = load_model_and_tokenizer("tiny")

    def poison_after_step_3(record):
        if record["split"] == "train" and record["step"] == 3:
            with torch.no_grad():
                model.get_output_embeddings().weight.fill_(float("nan"))

    run = tmp_path / "run"
    with pytest.raises(TrainingStopped) as e:
        train(small_cfg(run, task_files, save_every=2), model=model, tokenizer=tok, callbacks=[poison_after_step_3])
    msg = str(e.value)
    assert "became nan at step 4" in msg and "checkpoints/step-2" in msg and "--resume" in msg
    assert sorted(p.name for p in (run / "checkpoints").glob("step-*")) == ["step-2"]
    from safetensors.torch import load_file

    weights = load_file(run / "checkpoints" / "step-2" / "model.safetensors")
    assert weights and all(torch.isfinite(v).all() for v in weights.values())
    assert (run / "checkpoints" / "latest").read_text().strip() == "step-2"

    # weights that turn non-finite right before a save are never written over the last good checkpoint
    model, tok = load_model_and_tokenizer("tiny")

    def poison_at_step_4(record):
        if record["split"] == "train" and record["step"] == 4:
            with torch.no_grad():
                model.get_output_embeddings().weight.fill_(float("inf"))

    run = tmp_path / "run2"
    with pytest.raises(TrainingStopped, match="weights became non-finite at step 4"):
        train(small_cfg(run, task_files, save_every=2), model=model, tokenizer=tok, callbacks=[poison_at_step_4])
    assert sorted(p.name for p in (run / "checkpoints").glob("step-*")) == ["step-2"]


# --------------------------------------------------------------------------------------------------- CLI


def test_config_file_and_flags(tmp_path, task_files, capsys):
    cfg = tmp_path / "run.yaml"
    cfg.write_text(
        f"loss: ccpo\ndata: {task_files[0]}\neval: {task_files[1]}\nout: {tmp_path / 'run'}\nmax-steps: 2\n"
        "batch_size: 8\nlr: 0.001\nhp: {beta: 2.0}\nprogress: false\ntensorboard: false\n"
    )
    assert main(["train", "--config", str(cfg), "--max-steps", "3", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["step"] == 3  # the flag wins over the file
    saved = json.loads((tmp_path / "run" / "checkpoints" / "step-3" / "state.json").read_text())["config"]
    assert saved["loss"] == "ccpo" and saved["hp"] == {"beta": 2.0} and saved["lr"] == 0.001

    cfg.write_text("lossy: dpo\n")
    assert main(["train", "--config", str(cfg)]) == 2
    assert "unknown config key 'lossy'; did you mean 'loss'" in capsys.readouterr().err


def test_formula_atoms_are_checked_before_anything_loads(tmp_path, task_files, capsys):
    train_file, _ = task_files
    for loss, fragment in (("M(y1) -> M(y2)", "is not K-answer rows"), ("Ref(yw) -> Ref(yl)", "no policy atom")):
        argv = ["train", "--loss", loss, "--model", "tiny", "--data", str(train_file), "--out", str(tmp_path / "o")]
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert fragment in err and "Traceback" not in err
        assert not (tmp_path / "o").exists() or not any((tmp_path / "o").rglob("*.pt"))  # nothing was computed


@pytest.mark.parametrize(
    "argv, fragment",
    [
        (["train", "--data", "/nonexistent.jsonl"], "does not exist"),
        (["train", "--loss", "dpoo", "--data", "x.jsonl"], "unknown loss"),
        (["train", "--model", "/no/such/model", "--loss", "cpo", "--data", "x.jsonl"], "no model folder"),
        (["train", "--hp", "beta", "--data", "x.jsonl"], "KEY=VALUE"),
        (["train", "--fused", "--fused-max-chunk-tokens", "0", "--data", "x.jsonl"], "fused_max_chunk_tokens must be"),
        (["train", "--fused", "--fused-chunk-size", "-1", "--data", "x.jsonl"], "fused_chunk_size must be"),
        (["demo", "--losses", "dpo,(M(yw)"], "unbalanced"),
    ],
)
def test_cli_errors_exit_2(argv, fragment, capsys, tmp_path):
    assert main(argv + (["--out", str(tmp_path / "o")] if argv[0] == "train" else [])) == 2
    err = capsys.readouterr().err
    assert fragment in err and "Traceback" not in err


# --------------------------------------------------------------------------------------------------- DDP

DDP_SCRIPT = textwrap.dedent(
    """
    import json, sys, torch
    torch.set_num_threads(1)
    from dpalogic.training.loop import TrainConfig, Trainer
    cfg = TrainConfig(**json.loads(sys.argv[1]))
    t = Trainer(cfg, quiet=True)
    grads, step = [], t.optimizer.step
    def recording_step(*a, **k):  # the gradient each optimizer step applies (after DDP's all-reduce)
        grads.append(torch.cat([p.grad.flatten() for p in t.model.parameters()]).clone())
        return step(*a, **k)
    t.optimizer.step = recording_step
    t.run()
    if t.dist.main:
        torch.save({"grads": grads, "history": t.history, "world": t.dist.world}, sys.argv[2])
    t.close()
    """
)


def test_two_processes_match_one_process_on_the_same_global_batch(tmp_path, task_files):
    script = tmp_path / "ddp_run.py"
    script.write_text(DDP_SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}

    def run(name: str, launcher: list[str], **kw) -> dict:
        cfg = small_cfg(tmp_path / name, task_files, max_steps=3, max_grad_norm=0.0, **kw)
        from dataclasses import asdict

        out = tmp_path / f"{name}.pt"
        proc = subprocess.run(
            [*launcher, str(script), json.dumps(asdict(cfg)), str(out)],
            env=env, capture_output=True, text=True, timeout=240,
        )  # fmt: skip
        assert proc.returncode == 0, proc.stderr[-3000:]
        return torch.load(out, weights_only=False)

    two = run(
        "two", [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"], batch_size=4
    )
    one = run("one", [sys.executable], batch_size=8)
    accum = run("accum", [sys.executable], batch_size=4, grad_accum=2)
    assert two["world"] == 2 and one["world"] == 1
    for other in (two, accum):
        assert len(other["grads"]) == len(one["grads"]) == 3
        for g1, g2 in zip(one["grads"], other["grads"]):
            assert g1.abs().max() > 0
            torch.testing.assert_close(g2, g1, rtol=1e-4, atol=1e-6)
        losses = [(h["split"], h["step"], h["loss"]) for h in other["history"]]
        expected = [(h["split"], h["step"], h["loss"]) for h in one["history"]]
        assert [x[:2] for x in losses] == [x[:2] for x in expected]
        assert [x[2] for x in losses] == pytest.approx([x[2] for x in expected], abs=1e-6)
