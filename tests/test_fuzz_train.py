"""Fuzzing `dpalogic train`'s text entry points: flags (--loss, --hp, the rest), config files, data files.

Mutated, long and deeply nested input goes in; only :class:`DPALogicError` may come out of the functions, and the CLI
(run in-process with ``--dry-run``, which stops before a model is built) exits with 0 or 2. Where input is accepted,
the result is checked too: a config that validates holds values of its declared types, and every data record is
either a used row or a reported one, under its own row number.
"""

from __future__ import annotations

import json
import math
import os
import typing
from dataclasses import fields
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dpalogic.cli import main
from dpalogic.cli.train_config import read_config_file
from dpalogic.errors import DPALogicError
from dpalogic.training.config import TrainConfig, field_kind
from dpalogic.training.data import load_preferences

# DPALOGIC_FUZZ_EXAMPLES=2000 for a long local run; CI keeps the default (the whole file in a few seconds)
EXAMPLES = int(os.environ.get("DPALOGIC_FUZZ_EXAMPLES", "60"))
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture, HealthCheck.data_too_large],
)
NAMES = [f.name for f in fields(TrainConfig)]
HINTS = typing.get_type_hints(TrainConfig)
ROW = {"prompt": "sort 21:", "chosen": "12", "rejected": "21"}


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("fuzz")
    # one global batch at the default batch size: the dry run can accept the settings
    (d / "data.jsonl").write_text((json.dumps(ROW) + "\n") * 8)
    return d


def cli(argv: list[str]) -> int:
    """``dpalogic`` in-process: its return code, or argparse's exit code; anything else escapes and fails the test."""
    try:
        return main(argv)
    except SystemExit as e:
        return e.code


def assert_typed(cfg: TrainConfig) -> None:
    """A config that passed validation holds values of the declared types."""
    for f in fields(cfg):
        v = getattr(cfg, f.name)
        kind = field_kind(HINTS[f.name])
        if v is None:
            continue
        if kind is float:
            assert isinstance(v, float) and math.isfinite(v), f.name
        elif kind is int:
            assert isinstance(v, int) and not isinstance(v, bool), f.name
        elif kind is dict:
            assert all(isinstance(k, str) and isinstance(x, float) and math.isfinite(x) for k, x in v.items())
        else:
            assert isinstance(v, kind), f.name


# --------------------------------------------------------------------------------------------------- strategies

FORMULA_BITS = ["M(yw)", "M(yl)", "Ref(yw)", "Ref(yl)", "M(y3)", "->", "|", "&", "~", "(", ")", ",", " ", "⊤", "¬"]
formulas = st.lists(st.sampled_from(FORMULA_BITS), max_size=30).map("".join)
weird_text = st.one_of(
    st.text(max_size=40),
    st.text(alphabet=st.characters(codec="utf-8"), min_size=500, max_size=3000),  # long
    st.sampled_from(["", " ", "\x00", "nan", "inf", "-inf", "1e999", "-0", "0x10", "1_000", "true", "null", "\ud800"]),
)
numbers_as_text = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.integers(min_value=-(10**40), max_value=10**40).map(str),
)
losses = st.one_of(
    st.sampled_from(["dpo", "ipo", "cpo", "orpo", "simpo", "ccpo", "exo_pair", "discopop", "dpoo", "DPO", "rrhf"]),
    formulas,
    weird_text,
    st.integers(1, 300).map(lambda n: "(" * n + "M(yw)" + ")" * n),  # deeply nested, same parser as `derive`
)
hp_items = st.one_of(
    st.builds(
        lambda k, v: f"{k}={v}",
        st.sampled_from(["beta", "gamma", "alpha", "label_smoothing", "discopop_tau", "betta", ""]),
        st.one_of(numbers_as_text, weird_text),
    ),
    weird_text,
)
scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    weird_text,
    numbers_as_text,
)
values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)
keys = st.one_of(
    st.sampled_from(NAMES),
    st.sampled_from([n.replace("_", "-") for n in NAMES]),
    st.sampled_from(NAMES).map(lambda n: n + "x"),
    st.text(max_size=12),
)


# --------------------------------------------------------------------------------------------------- flags


@FUZZ
@given(loss=losses, hp=st.lists(hp_items, max_size=3))
def test_loss_and_hp_flags(work, loss, hp):
    argv = ["train", "--loss", loss, "--data", str(work / "data.jsonl"), "--out", str(work / "o"), "--dry-run"]
    for item in hp:
        argv += ["--hp", item]
    assert cli(argv) in (0, 2)
    assert not (work / "o").exists()  # a dry run writes nothing


@FUZZ
@given(name=st.sampled_from(NAMES), text=st.one_of(weird_text, numbers_as_text))
def test_any_flag_with_any_text(work, name, text):
    flag = "--" + name.replace("_", "-")
    argv = ["train", "--data", str(work / "data.jsonl"), "--out", str(work / "o"), "--dry-run", f"{flag}={text}"]
    assert cli(argv) in (0, 2)


# --------------------------------------------------------------------------------------------------- config files


def _check_config_file(work: Path, name: str, raw: bytes) -> None:
    path = work / name
    path.write_bytes(raw)
    argv = ["train", "--config", str(path), "--data", str(work / "data.jsonl"), "--out", str(work / "o"), "--dry-run"]
    assert cli(argv) in (0, 2)
    try:
        cfg = TrainConfig.from_dict(read_config_file(str(path)), str(path))
    except DPALogicError:
        return
    assert_typed(cfg)


def _check_settings(work: Path, settings_: object, fmt: str, bom: bool = False) -> None:
    try:
        text = json.dumps(settings_) if fmt == "json" else yaml.safe_dump(settings_, allow_unicode=True)
        raw = text.encode("utf-8", "surrogatepass")
    except (ValueError, UnicodeEncodeError, yaml.YAMLError):  # a value the writer itself cannot serialize
        return
    _check_config_file(work, f"c.{fmt}", (b"\xef\xbb\xbf" if bom else b"") + raw)


@FUZZ
@given(settings_=st.dictionaries(keys, values, max_size=6), fmt=st.sampled_from(["json", "yaml"]), bom=st.booleans())
def test_config_files_with_wrong_keys_and_values(work, settings_, fmt, bom):
    _check_settings(work, settings_, fmt, bom)


@FUZZ
@given(settings_=st.dictionaries(st.sampled_from(NAMES), values, max_size=4), fmt=st.sampled_from(["json", "yaml"]))
def test_config_files_with_known_keys_and_any_values(work, settings_, fmt):
    # known keys only, so the values themselves (not an unknown key) decide, field by field
    _check_settings(work, settings_, fmt)


@FUZZ
@given(top=values, fmt=st.sampled_from(["json", "yaml"]))
def test_config_files_with_any_top_level(work, top, fmt):
    _check_settings(work, top, fmt)


DEEP = 20_000


@pytest.mark.parametrize(
    "name, raw",
    [
        ("deep.json", b'{"hp": ' + b"[" * DEEP + b"]" * DEEP + b"}"),
        ("deep.yaml", b"hp: " + b"[" * DEEP + b"]" * DEEP + b"\n"),
        ("deep-block.yaml", b"".join(b"  " * i + b"k:\n" for i in range(2000))),
        ("bad-utf8.yaml", b"loss: dp\xff\xfeo\n"),
        ("bad-utf8.json", b'{"loss": "dp\xc3"}'),
        ("bom.json", b'\xef\xbb\xbf{"loss": "ccpo", "lr": 1e-3}'),
        ("nan.json", b'{"lr": NaN, "warmup_ratio": Infinity}'),
        ("huge.json", b'{"max_steps": 1' + b"0" * 5000 + b"}"),
        ("date.yaml", b"loss: 2024-13-45\n"),
        ("python.yaml", b"loss: !!python/object/apply:os.system ['true']\n"),  # never constructed
        ("alias.yaml", b"a: &x [1, 2]\nhp: {beta: *x}\n"),
        ("list.yaml", b"- loss\n- dpo\n"),
        ("scalar.json", b"3"),
        ("empty.yaml", b""),
        ("folder.yaml", None),
    ],
)
def test_config_file_edge_cases(work, name, raw):
    if raw is None:
        (work / name).mkdir(exist_ok=True)
        assert cli(["train", "--config", str(work / name), "--dry-run"]) == 2
        return
    _check_config_file(work, name, raw)


def test_config_file_values_reach_the_run_typed(work):
    # the reference: values given as text of every kind come back as the declared types, or are refused
    path = work / "typed.yaml"
    path.write_text("lr: 1e-3\nmax_steps: 2.0\nbatch_size: 4\nhp: {beta: 2}\nbf16: false\nmax_length: null\n")
    cfg = TrainConfig.from_dict(read_config_file(str(path)))
    assert_typed(cfg)
    assert (cfg.lr, cfg.max_steps, cfg.hp, cfg.bf16, cfg.max_length) == (1e-3, 2, {"beta": 2.0}, "false", None)


# --------------------------------------------------------------------------------------------------- data files

cells = st.one_of(
    st.text(max_size=12),
    st.none(),
    st.integers(),
    st.floats(allow_nan=True),
    st.booleans(),
    st.lists(st.fixed_dictionaries({"role": st.sampled_from(["user", "assistant"]), "content": st.text(max_size=6)})),
    st.lists(st.integers(), max_size=3),
    st.dictionaries(st.text(max_size=4), st.integers(), max_size=2),
)
records = st.one_of(
    st.fixed_dictionaries({}, optional={"prompt": cells, "chosen": cells, "rejected": cells, "extra": cells}),
    st.sampled_from([ROW]),
    values,
)


def _assert_partition(data, n_records: int, numbers: list[int]) -> None:
    """Every record is a used row or a reported one, each under its own number."""
    used, reported = data.row_numbers, [i.row for i in data.issues]
    assert sorted(used + reported) == sorted(numbers)
    assert len(set(used + reported)) == n_records
    for row in data.rows:
        assert set(row) == {"prompt", "chosen", "rejected"} and row["chosen"] != row["rejected"]


def _load(path: Path):
    try:
        return load_preferences(path)
    except DPALogicError:
        return None


@FUZZ
@given(recs=st.lists(records, min_size=1, max_size=8), bom=st.booleans(), junk=st.lists(st.binary(max_size=8)))
def test_jsonl_and_json_rows(work, recs, bom, junk):
    lines = [json.dumps(r).encode("utf-8", "surrogatepass") for r in recs] + junk
    lines = [x.replace(b"\n", b"").replace(b"\r", b"") for x in lines]
    path = work / "d.jsonl"
    path.write_bytes((b"\xef\xbb\xbf" if bom else b"") + b"\n".join(lines) + b"\n")
    data = _load(path)
    if data is not None:
        _assert_partition(data, sum(1 for x in lines if x.strip()), [i + 1 for i, x in enumerate(lines) if x.strip()])
    path = work / "d.json"
    path.write_bytes((b"\xef\xbb\xbf" if bom else b"") + json.dumps(recs).encode("utf-8", "surrogatepass"))
    data = _load(path)
    if data is not None:
        _assert_partition(data, len(recs), list(range(1, len(recs) + 1)))


@FUZZ
@given(rows=st.lists(st.lists(st.text(max_size=10), min_size=0, max_size=5), max_size=8), bom=st.booleans())
def test_csv_rows(work, rows, bom):
    import csv
    import io

    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["prompt", "chosen", "rejected"])
    w.writerows(rows)
    path = work / "d.csv"
    path.write_bytes((b"\xef\xbb\xbf" if bom else b"") + buf.getvalue().encode("utf-8", "surrogateescape"))
    data = _load(path)
    if data is not None:
        assert len(data.rows) + len(data.issues) <= len(rows)
        assert len({*data.row_numbers, *(i.row for i in data.issues)}) == len(data.rows) + len(data.issues)


@settings(FUZZ, max_examples=max(1, EXAMPLES // 2))
@given(
    columns=st.fixed_dictionaries(
        {},
        optional={
            "prompt": st.sampled_from(["text", "int", "float", "null", "messages", "bool"]),
            "chosen": st.sampled_from(["text", "int", "float", "null", "messages", "bool", "mixed-null"]),
            "rejected": st.sampled_from(["text", "int", "float", "null", "messages", "bool"]),
        },
    ),
    n=st.integers(1, 6),
)
def test_parquet_rows_of_any_column_type(work, columns, n):
    import pyarrow as pa
    import pyarrow.parquet as pq

    make = {
        "text": lambda i: f"t{i}",
        "int": lambda i: i,
        "float": lambda i: i + 0.5,
        "null": lambda i: None,
        "bool": lambda i: i % 2 == 0,
        "messages": lambda i: [{"role": "assistant", "content": f"m{i}"}],
        "mixed-null": lambda i: None if i % 2 else f"c{i}",
    }
    table = {k: [make[kind](i) for i in range(n)] for k, kind in columns.items()} or {"other": list(range(n))}
    path = work / "d.parquet"
    pq.write_table(pa.table(table), path)
    data = _load(path)
    if data is not None:
        _assert_partition(data, n, list(range(1, n + 1)))
