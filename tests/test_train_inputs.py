"""What `dpalogic train` accepts: config types and ranges, loss hyperparameters, defaults and help, data files.

Every check is against an independent reference: the dataclass's own fields and defaults, the gradient of the real
loss, rows whose positions and faults the test itself put there.
"""

from __future__ import annotations

import argparse
import json
import math
import re
from dataclasses import MISSING, fields
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dpalogic.cli import main
from dpalogic.cli.train import register
from dpalogic.cli.train_config import config_from_args
from dpalogic.errors import DPALogicError
from dpalogic.semantics.catalog import entries, pair_names
from dpalogic.training.config import DEFAULT_LR, TINY_LR, TrainConfig, check_loss
from dpalogic.training.data import (
    BAD_ROWS_FILE,
    MAX_LISTED_ISSUES,
    BadRowsError,
    RowIssue,
    load_preferences,
    write_bad_rows,
)
from dpalogic.training.demo import DemoConfig, make_task, run_demo

torch.set_num_threads(1)  # the tiny model is fastest on one thread, and two test workers share two cores

ROWS = [
    {"prompt": "sort 21:", "chosen": "12", "rejected": "21"},
    {"prompt": "sort 31:", "chosen": "13", "rejected": "31"},
    {"prompt": "sort 32:", "chosen": "23", "rejected": "32"},
]


def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    register(p.add_subparsers(dest="command"))
    return p.parse_args(argv)


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


# --------------------------------------------------------------------------------------------------- config values


@pytest.mark.parametrize(
    "key, value, fragment",
    [
        ("warmup_ratio", "abc", "warmup_ratio must be a number in [0, 1), got 'abc'"),
        ("batch_size", 2.5, "batch_size must be a positive integer, got 2.5"),
        ("seed", "abc", "seed must be an integer in [0, 2**32), got 'abc'"),
        ("seed", 2**32, "seed must be an integer in [0, 2**32)"),  # numpy, seeded by the run, takes no more
        ("dropout", 5, "dropout must be a number in [0, 1), got 5"),
        ("keep_checkpoints", 0.5, "keep_checkpoints must be a positive integer, got 0.5"),
        ("max_steps", 1.5, "max_steps must be a positive integer or null, got 1.5"),
        ("lr", float("nan"), "lr must be a positive number"),
        ("progress", "yes", "progress must be true or false, got 'yes'"),
        ("bf16", "maybe", "bf16 must be auto, true or false, got 'maybe'"),
        ("hp", [0.1], "hp must be a mapping of hyperparameter names to numbers"),
        ("hp", {"beta": "high"}, "hyperparameter 'beta' must be a finite number, got 'high'"),
        ("out", "a\x00b", "out holds a NUL character"),
    ],
)
def test_config_values_are_checked_with_where_they_came_from(key, value, fragment):
    with pytest.raises(DPALogicError) as e:
        TrainConfig.from_dict({key: value}, "config", {key: "run.yaml"})
    assert fragment in str(e.value) and str(e.value).endswith("(from run.yaml)")


def _wrong_value(f) -> object:
    """A value of the wrong type for field ``f``, from its declared type alone."""
    t = str(f.type)
    return {"bool": "true", "int": "2", "float": "0.5", "str": 3, "dict": [1]}[
        next(k for k in ("bool", "dict", "int", "float", "str") if k in t)
    ]


@pytest.mark.parametrize("f", fields(TrainConfig), ids=lambda f: f.name)
def test_every_field_is_type_checked(f):
    # a wrong type is refused for every field, a new one included: the checks come from the annotations
    with pytest.raises(DPALogicError, match=rf"^(hyperparameter )?{f.name}"):
        TrainConfig.from_dict({f.name: _wrong_value(f)})
    # ... and the default passes
    default = f.default if f.default is not MISSING else f.default_factory()
    TrainConfig.from_dict({f.name: default})


def test_values_are_normalized_to_the_declared_type():
    cfg = TrainConfig.from_dict({"lr": 1, "max_steps": 3.0, "bf16": True, "hp": {"beta": 1}, "max_length": None})
    assert cfg.lr == 1.0 and isinstance(cfg.lr, float)
    assert cfg.max_steps == 3 and isinstance(cfg.max_steps, int)
    assert cfg.bf16 == "true" and cfg.hp == {"beta": 1.0} and isinstance(cfg.hp["beta"], float)
    assert cfg.max_length is None
    with pytest.raises(DPALogicError, match=r"max_prompt_length \(64\) must be below max_length \(64\)"):
        TrainConfig.from_dict({"max_length": 64, "max_prompt_length": 64})


def test_bad_values_exit_2_before_anything_is_written(tmp_path, capsys):
    data = write_jsonl(tmp_path / "d.jsonl", ROWS)
    out = tmp_path / "run"
    cfg = tmp_path / "run.yaml"
    cfg.write_text(f"data: {data}\nout: {out}\nkeep_checkpoints: 0.5\n")
    cases = [
        (["--config", str(cfg)], f"keep_checkpoints must be a positive integer, got 0.5 (from {cfg})"),
        (
            ["--data", str(data), "--batch-size", "2.5"],
            "batch_size must be a positive integer, got 2.5 (from --batch-size)",
        ),
        (["--data", str(data), "--max-steps", "1.5"], "max_steps must be a positive integer or null, got 1.5"),
        (["--data", str(data), "--warmup-ratio", "abc"], "warmup_ratio must be a number in [0, 1), got 'abc'"),
        (["--data", str(data), "--hp", "beta=-1"], "beta"),
    ]
    for argv, fragment in cases:
        assert main(["train", *argv, "--out", str(out)]) == 2, argv
        err = capsys.readouterr().err
        assert fragment in err and "Traceback" not in err
        assert not out.exists()  # refused before a model, data or run folder was touched


def test_yaml_numbers_with_exponents_are_numbers(tmp_path):
    cfg = tmp_path / "run.yaml"
    cfg.write_text("lr: 2e-4\nhp: {beta: 1E1}\nmax_steps: 1e3\n")  # PyYAML alone reads these as strings
    got = config_from_args(parse(["train", "--config", str(cfg)]))
    assert (got.lr, got.hp, got.max_steps) == (2e-4, {"beta": 10.0}, 1000)


# --------------------------------------------------------------------------------------------------- hyperparameters

# pair losses (the gradient below is w.r.t. yl); TPO's, w.r.t. its rejected y3, is in test_tpo.py
BETA_LOSSES = [n for n in pair_names() if "beta" in entries()[n].program.defaults and n != "discopop"]


def _rejected_gradient(loss: str, beta: float) -> float:
    """∂loss/∂log π(yl) at a neutral point (every log-prob −2): positive when a likelier rejected answer costs."""
    from dpalogic.runtime.preference_loss import PreferenceLoss

    fn = PreferenceLoss(loss, beta=beta, backend="torch")
    lp = {k: torch.tensor([-2.0], dtype=torch.float64, requires_grad=k == "r") for k in ("c", "r", "rc", "rr")}
    one = torch.tensor([1])
    refs = {"ref_chosen_logps": lp["rc"], "ref_rejected_logps": lp["rr"]} if fn.needs_reference else {}
    fn(lp["c"], lp["r"], chosen_lengths=one, rejected_lengths=one, **refs).backward()
    return lp["r"].grad.item()


@pytest.mark.parametrize("loss", BETA_LOSSES)
@settings(max_examples=6, deadline=None)
@given(beta=st.floats(-3, 3).filter(lambda b: abs(b) > 1e-3))
def test_beta_is_accepted_exactly_when_the_loss_penalizes_the_rejected_answer(loss, beta):
    # the reference is the compiled loss itself: with β ≤ 0 a likelier rejected answer *lowers* it
    # (DiscoPOP is left out: its loss is deliberately non-monotone around a zero margin, whatever β)
    try:
        check_loss(loss, {"beta": beta})
        accepted = True
    except DPALogicError as e:
        assert "rewards the rejected answer" in str(e) or "nothing is left that prefers" in str(e)
        accepted = False
    assert accepted == (_rejected_gradient(loss, beta) > 0)


@pytest.mark.parametrize(
    "loss, hp, fragment",
    [
        ("cpo", {"alpha": -1.0}, "NLL weight alpha = -1 must not be negative"),
        ("simpo", {"label_smoothing": 0.7}, "label-smoothing terms 0.7"),
        ("ipo", {"beta": 0.0}, "not a finite number"),  # the compiler's own range check, reached up front
        ("exo_pair", {"label_smoothing": 0.0}, "strictly between 0 and 1"),
        ("dpo", {"betta": 0.1}, "did you mean 'beta'"),
    ],
)
def test_other_hyperparameter_ranges_are_checked_up_front(loss, hp, fragment, tmp_path, capsys):
    with pytest.raises(DPALogicError, match=re.escape(fragment)):
        TrainConfig(loss=loss, hp=hp).validate()
    argv = [
        "train",
        "--loss",
        loss,
        "--data",
        str(write_jsonl(tmp_path / "d.jsonl", ROWS)),
        "--out",
        str(tmp_path / "o"),
    ]
    for k, v in hp.items():
        argv += ["--hp", f"{k}={v}"]
    assert main(argv) == 2 and fragment in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


# --------------------------------------------------------------------------------------------------- defaults, help


def _default_shown(f) -> str:
    v = f.default if f.default is not MISSING else f.default_factory()
    if isinstance(v, bool):
        return "on" if v else "off"
    return f"{v:g}" if isinstance(v, float) else str(v)


def _option_help(text: str) -> dict[str, str]:
    """``--flag`` → its whole help text, however argparse wrapped it (a long flag gets a line of its own)."""
    blocks: list[str] = []
    for line in text.splitlines():
        if re.match(r"^  -", line):
            blocks.append(line.strip())
        elif blocks and line.startswith("   "):
            blocks[-1] += " " + line.strip()
    return {b.split()[0].rstrip(","): b for b in blocks}


def test_help_shows_every_default(capsys):
    with pytest.raises(SystemExit) as e:
        main(["train", "--help"])
    assert e.value.code == 0
    helps = _option_help(capsys.readouterr().out)
    for f in fields(TrainConfig):
        text = helps["--" + f.name.replace("_", "-")]
        shown = re.search(r"\(default: ([^()]*(?:\([^()]*\)[^()]*)*)\)$", text)
        assert shown, f"{f.name} does not show its default: {text!r}"
        if f.default is not None and f.name not in ("hp", "lr", "max_length", "max_prompt_length"):
            assert shown.group(1) == _default_shown(f), f.name
    rates = re.search(r"\(default: (\S+), or (\S+) with --model tiny\)$", helps["--lr"])
    assert rates and (float(rates.group(1)), float(rates.group(2))) == (DEFAULT_LR, TINY_LR)
    assert "pretrained" in helps["--lr"]


def test_demo_help_shows_every_default(capsys):
    with pytest.raises(SystemExit):
        main(["demo", "--help"])
    helps = _option_help(capsys.readouterr().out)
    assert helps["--steps"].endswith(f"(default: {DemoConfig.steps})")
    assert helps["--losses"].endswith("(default: dpo,ipo,simpo,cpo,orpo,ccpo)")
    assert helps["--threads"].endswith(f"(default: {DemoConfig.threads})")


def test_tiny_model_gets_a_rate_it_can_learn_with_unless_one_is_given(tmp_path):
    assert config_from_args(parse(["train", "--model", "tiny"])).lr == TINY_LR
    assert config_from_args(parse(["train"])).lr == TINY_LR  # tiny is the default model
    assert config_from_args(parse(["train", "--model", "tiny", "--lr", "0.02"])).lr == 0.02
    assert config_from_args(parse(["train", "--model", str(tmp_path)])).lr == DEFAULT_LR
    cfg = tmp_path / "run.json"
    cfg.write_text(json.dumps({"model": "tiny", "lr": 3e-4}))
    assert config_from_args(parse(["train", "--config", str(cfg)])).lr == 3e-4


def test_tiny_model_learns_at_its_default_rate_and_hardly_at_the_fine_tuning_one(tmp_path):
    from dpalogic.training.data import from_records
    from dpalogic.training.loop import train

    tr, ev = make_task(480, 96, seed=5)
    acc = {}
    for lr in (None, DEFAULT_LR):
        cfg = TrainConfig(
            loss="dpo", lr=lr, out=str(tmp_path / f"lr{lr}"), max_steps=30, batch_size=16, eval_every=0,
            save_every=0, progress=False, tensorboard=False, max_length=32, max_prompt_length=16,
        )  # fmt: skip
        res = train(cfg, train_rows=from_records(tr), eval_rows=from_records(ev), quiet=True)
        evals = [h for h in res["history"] if h["split"] == "eval"]
        acc[cfg.lr] = (evals[0]["logp_accuracy"], evals[-1]["logp_accuracy"])
    start, end = acc[TINY_LR]
    assert 0.3 < start < 0.7 and end > 0.9  # from chance to learned on held-out prompts
    assert abs(acc[DEFAULT_LR][1] - acc[DEFAULT_LR][0]) < 0.15  # 1e-5 barely moves a fresh model


# --------------------------------------------------------------------------------------------------- data files


def test_a_byte_order_mark_keeps_the_first_row(tmp_path):
    bom = b"\xef\xbb\xbf"
    (tmp_path / "a.jsonl").write_bytes(bom + "".join(json.dumps(r) + "\n" for r in ROWS).encode())
    (tmp_path / "a.json").write_bytes(bom + json.dumps(ROWS).encode())
    csv_text = "prompt,chosen,rejected\n" + "".join(f"{r['prompt']},{r['chosen']},{r['rejected']}\n" for r in ROWS)
    (tmp_path / "a.csv").write_bytes(bom + csv_text.encode())
    for name in ("a.jsonl", "a.json", "a.csv"):
        data = load_preferences(tmp_path / name)
        assert data.rows == ROWS and not data.issues, name
    cfg = tmp_path / "run.yaml"
    cfg.write_bytes(bom + b"loss: ccpo\n")
    assert config_from_args(parse(["train", "--config", str(cfg)])).loss == "ccpo"


def test_csv_rows_are_numbered_by_their_first_line(tmp_path):
    text = (
        b"prompt,chosen,rejected,note\n"  # 1; extra columns are ignored
        b"sort 21:,12,21,x\n"  # 2
        b'"sort\n32:",23,32,y\n'  # 3-4: a quoted field over two lines
        b"sort 43:,,43\n"  # 5: empty chosen
        b"\n"  # 6: blank
        b"sort 54:,45\n"  # 7: no rejected cell
        b"sort 65:,56,65\n"  # 8
    ) + b"sort 76:,\xff67,76\n"  # 9: not UTF-8
    (tmp_path / "d.csv").write_bytes(text)
    data = load_preferences(tmp_path / "d.csv")
    assert data.row_numbers == [2, 3, 8]
    assert data.rows[1] == {"prompt": "sort\n32:", "chosen": "23", "rejected": "32"}
    assert {i.row: i.reason for i in data.issues} == {
        5: "empty 'chosen' answer",
        7: "missing 'rejected'",
        9: "undecodable text in 'chosen' (not valid Unicode)",
    }
    (tmp_path / "h.csv").write_text("question,answer\na,b\n")
    with pytest.raises(DPALogicError, match="must name the columns prompt, chosen, rejected"):
        load_preferences(tmp_path / "h.csv")


def test_parquet_type_errors_name_their_rows(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    n = 12
    pq.write_table(
        pa.table({"prompt": [f"p{i}" for i in range(n)], "chosen": list(range(n)), "rejected": ["r"] * n}),
        tmp_path / "ints.parquet",
    )
    with pytest.raises(BadRowsError) as e:
        load_preferences(tmp_path / "ints.parquet")
    assert [i.row for i in e.value.issues] == list(range(1, n + 1))
    assert all(i.reason.endswith("got int") and "'chosen'" in i.reason for i in e.value.issues)
    msg = str(e.value)
    assert f"no usable rows; {n} malformed:" in msg and "row 1: 'chosen' must be a string" in msg
    assert f"… and {n - MAX_LISTED_ISSUES} more" in msg

    nulls = {3, 7}  # rows (1-based) whose chosen answer is null
    chosen = [None if i + 1 in nulls else f"c{i}" for i in range(n)]
    pq.write_table(pa.table({"prompt": ["p"] * n, "chosen": chosen, "rejected": ["r"] * n}), tmp_path / "n.parquet")
    data = load_preferences(tmp_path / "n.parquet")
    assert {i.row: i.reason for i in data.issues} == dict.fromkeys(nulls, "missing 'chosen'")
    assert data.row_numbers == [i for i in range(1, n + 1) if i not in nulls]


def test_every_bad_row_goes_to_bad_rows_jsonl_and_the_console_summarises(tmp_path, capsys):
    good, bad_rows = ROWS * 4, {}
    lines = []
    for i in range(42):  # rows 1..42: every third is good, the others have one of three faults
        n = i + 1
        if n % 3 == 0:
            lines.append(json.dumps(good[i % len(good)]))
            continue
        kind = n % 2
        lines.append("{broken" if kind else json.dumps({"prompt": "p", "chosen": "x"}))
        bad_rows[n] = "not valid JSON" if kind else "missing 'rejected'"
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(lines) + "\n")
    out = tmp_path / "run"
    argv = ["train", "--loss", "cpo", "--data", str(path), "--out", str(out), "--max-steps", "1", "--batch-size", "2"]
    assert main([*argv, "--no-progress", "--no-tensorboard", "--save-every", "0"]) == 0
    err = capsys.readouterr().err
    listed = [json.loads(x) for x in (out / BAD_ROWS_FILE).read_text().splitlines()]
    assert [r["row"] for r in listed] == sorted(bad_rows)
    assert all(r["reason"].startswith(bad_rows[r["row"]]) and r["file"] == str(path) for r in listed)
    assert f"{len(lines) - len(bad_rows)} rows used, {len(bad_rows)} skipped" in err
    assert f"… and {len(bad_rows) - MAX_LISTED_ISSUES} more" in err and str(out / BAD_ROWS_FILE) in err
    assert sum(1 for x in err.splitlines() if re.match(r"\s+row \d+:", x)) == MAX_LISTED_ISSUES


def test_bad_rows_file_describes_the_latest_run_only(tmp_path):
    target = tmp_path / "run" / BAD_ROWS_FILE
    assert write_bad_rows(target, [("a.jsonl", [RowIssue(4, "x"), RowIssue(2, "y")]), ("b.jsonl", [])]) == target
    assert [json.loads(x) for x in target.read_text().splitlines()] == [
        {"file": "a.jsonl", "row": 2, "reason": "y"},
        {"file": "a.jsonl", "row": 4, "reason": "x"},
    ]
    assert write_bad_rows(target, [("a.jsonl", [])]) is None and not target.exists()


def test_dry_run_checks_the_data_and_loads_no_model(tmp_path, capsys):
    path = write_jsonl(tmp_path / "d.jsonl", [*ROWS, {"prompt": "p", "chosen": "a"}])
    out = tmp_path / "run"
    assert main(["train", "--data", str(path), "--out", str(out), "--batch-size", "3", "--dry-run", "--json"]) == 0
    captured = capsys.readouterr()
    settings_ = json.loads(captured.out)
    assert settings_["lr"] == TINY_LR and settings_["data"] == str(path)
    assert "3 rows used, 1 skipped" in captured.err and "row 4: missing 'rejected'" in captured.err
    assert not out.exists()
    assert main(["train", "--data", str(path), "--out", str(out), "--dry-run", "--strict-data"]) == 2
    assert "1 malformed row(s)" in capsys.readouterr().err and not out.exists()


# --------------------------------------------------------------------------------------------------- demo


def test_demo_checks_every_loss_first_and_restores_the_thread_count(tmp_path):
    out = tmp_path / "demo"
    with pytest.raises(DPALogicError, match="unknown loss"):
        run_demo(DemoConfig(losses=("dpo", "dpoo"), out=str(out)))
    assert not out.exists()  # the first loss did not train before the second was found wrong

    before = torch.get_num_threads()
    cfg = DemoConfig(
        losses=("dpo", "(M(yl) -> M(yw), M(yw) | M(yl))"), out=str(out), steps=4, batch_size=8, eval_every=2,
        train_size=32, eval_size=16, plot=False, progress=False, threads=1,
    )  # fmt: skip
    results = run_demo(cfg)
    assert torch.get_num_threads() == before
    assert [r["slug"] for r in results] == ["dpo", "formula2"] and [r["reference"] for r in results] == ["yes", "no"]
    saved = json.loads((out / "results.json").read_text())
    assert [r["accuracy_end"] for r in saved["results"]] == [r["accuracy_end"] for r in results]
    table = (out / "results.md").read_text()
    assert "4 steps" in table and table.count("\n| ") == 3  # header + one row per loss
    assert all(math.isfinite(r["eval_loss_end"]) for r in results)
