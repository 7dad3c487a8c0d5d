"""Preference data: reading, validating, tokenizing and batching rows of ``prompt`` / ``chosen`` / ``rejected``.

Rows follow TRL's conventions: the three fields are either strings (``"prompt": "2+2=", "chosen": "4"``) or chat
message lists (``"prompt": [{"role": "user", "content": "2+2?"}], "chosen": [{"role": "assistant", ...}]``); rows
whose ``chosen``/``rejected`` are whole conversations may omit ``prompt`` (the shared leading messages become it).

Malformed rows are reported with their row numbers (1-based; line numbers for JSONL and CSV) and skipped, or are
fatal with ``strict=True``; :func:`write_bad_rows` lists every one of them in a run's ``bad_rows.jsonl``. A UTF-8 byte
order mark at the start of a text file is ignored. A batch stacks the B chosen sequences over the B rejected ones
(``[2B, T]``, right-padded) with ``labels = -100`` outside the answers, so the loss only ever sees answer tokens.
"""

from __future__ import annotations

import csv
import io
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dpalogic.errors import DPALogicError
from dpalogic.training.fields import is_empty, is_messages, text_issue

FIELDS = ("prompt", "chosen", "rejected")
# what a row may carry besides (dpalogic.training.annotations): a margin, or the scores it is made from, and spans
ANNOTATIONS = ("margin", "chosen_score", "rejected_score", "chosen_spans", "rejected_spans", "outside_span_weight")
IGNORE_INDEX = -100
MAX_LISTED_ISSUES = 5  # the console shows the first few bad rows; bad_rows.jsonl has them all
BAD_ROWS_FILE = "bad_rows.jsonl"
BOM = b"\xef\xbb\xbf"  # the UTF-8 byte order mark some editors put at the start of a file


@dataclass(frozen=True)
class RowIssue:
    """One malformed row: where it is (1-based) and what is wrong with it."""

    row: int
    reason: str

    def __str__(self) -> str:
        return f"row {self.row}: {self.reason}"


def _listed(issues: Sequence[RowIssue]) -> list[str]:
    """The first few issues, one line each, and how many more there are."""
    lines = [f"  {i}" for i in issues[:MAX_LISTED_ISSUES]]
    if len(issues) > MAX_LISTED_ISSUES:
        lines.append(f"  … and {len(issues) - MAX_LISTED_ISSUES} more")
    return lines


class BadRowsError(DPALogicError):
    """Malformed rows that stop a run (``strict``, or no usable row left); ``issues`` holds every one of them."""

    def __init__(self, source: str, issues: Sequence[RowIssue], message: str) -> None:
        self.source = source
        self.issues = list(issues)
        super().__init__("\n".join([message, *_listed(self.issues)]))


@dataclass
class PreferenceRows:
    """The valid rows of a source (normalized to ``prompt``/``chosen``/``rejected``) and the skipped ones."""

    source: str
    rows: list[dict[str, Any]]
    row_numbers: list[int]
    issues: list[RowIssue] = field(default_factory=list)

    def summary(self, what: str = "data") -> str:
        """``"train data prefs.jsonl: 98 rows used, 2 skipped"`` plus the first few skipped rows."""
        lines = [f"{what} {self.source}: {len(self.rows)} rows used, {len(self.issues)} skipped"]
        return "\n".join(lines + _listed(self.issues))


# --------------------------------------------------------------------------------------------------- reading


def _read_jsonl(path: Path) -> tuple[list[tuple[int, Any]], list[RowIssue]]:
    records, issues = [], []
    with path.open("rb") as f:  # bytes: one undecodable line must not make the whole file unreadable
        for lineno, raw in enumerate(f, 1):
            if lineno == 1 and raw.startswith(BOM):
                raw = raw[len(BOM) :]
            if not raw.strip():
                continue
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                issues.append(RowIssue(lineno, f"undecodable text (invalid UTF-8 at byte {e.start})"))
                continue
            try:
                records.append((lineno, json.loads(text)))
            except json.JSONDecodeError as e:
                issues.append(RowIssue(lineno, f"not valid JSON ({e.msg}, column {e.colno})"))
            except RecursionError:
                issues.append(RowIssue(lineno, "JSON nested too deeply"))
            except ValueError as e:  # an integer of more than 4300 digits
                issues.append(RowIssue(lineno, f"not valid JSON ({e})"))
    return records, issues


def _read_json(path: Path) -> list[tuple[int, Any]]:
    try:
        data = json.loads(path.read_bytes().decode("utf-8-sig"))  # -sig: a leading byte order mark is dropped
    except RecursionError:
        raise DPALogicError(f"{path}: JSON nested too deeply") from None
    except UnicodeDecodeError as e:
        raise DPALogicError(f"{path}: undecodable text (invalid UTF-8 at byte {e.start})") from None
    except json.JSONDecodeError as e:
        raise DPALogicError(f"{path}: not valid JSON ({e.msg}, line {e.lineno} column {e.colno})") from None
    except ValueError as e:  # an integer of more than 4300 digits
        raise DPALogicError(f"{path}: not valid JSON ({e})") from None
    if isinstance(data, dict):  # a column-oriented object {"prompt": [...], "chosen": [...], ...}
        cols = {k: v for k, v in data.items() if isinstance(v, list)}
        if not cols or len({len(v) for v in cols.values()}) != 1:
            raise DPALogicError(f"{path}: expected a list of rows or an object of equally long columns")
        n = len(next(iter(cols.values())))
        data = [{k: v[i] for k, v in cols.items()} for i in range(n)]
    if not isinstance(data, list):
        raise DPALogicError(f"{path}: expected a list of rows, got {type(data).__name__}")
    return list(enumerate(data, 1))


def _read_parquet(path: Path) -> list[tuple[int, Any]]:
    try:
        import pyarrow.parquet as pq
    except ImportError:  # pragma: no cover - pyarrow comes with datasets
        raise DPALogicError("reading Parquet needs pyarrow: pip install pyarrow") from None
    try:
        table = pq.read_table(path)
    except Exception as e:  # pyarrow raises several types for a corrupt file
        raise DPALogicError(f"{path}: not a readable Parquet file ({e})") from None
    return list(enumerate(table.to_pylist(), 1))


def _read_csv(path: Path) -> list[tuple[int, Any]]:
    """Rows of a CSV file with a header naming the columns; each row is numbered by the line it starts on.

    Bytes that are not UTF-8 are kept as lone surrogates, so only the rows holding them are reported (as for JSONL).
    """
    text = path.read_bytes().decode("utf-8", "surrogateescape")
    if text.startswith("\ufeff"):
        text = text[1:]
    reader = csv.reader(io.StringIO(text, newline=""))
    records, header = [], None
    while True:
        start = reader.line_num + 1
        try:
            cells = next(reader)
        except StopIteration:
            break
        except csv.Error as e:  # e.g. a field beyond the csv module's size limit: the rest cannot be split reliably
            raise DPALogicError(f"{path}: line {start}: not valid CSV ({e})") from None
        if not cells or all(not c.strip() for c in cells):
            continue
        if header is None:
            header = [c.strip() for c in cells]
            if not {"chosen", "rejected"} <= set(header):
                shown = ", ".join(repr(c[:40]) for c in header[:10])
                raise DPALogicError(
                    f"{path}: the first line must name the columns prompt, chosen, rejected; got {shown}"
                )
            continue
        records.append((start, {k: v for k, v in zip(header, cells) if k in FIELDS or k in ANNOTATIONS}))
    return records


EVAL_SPLITS = ("test", "validation", "eval", "dev")


def _read_datasets_folder(path: Path, split: str | None) -> list[tuple[int, Any]]:
    try:
        from datasets import DatasetDict, load_from_disk
    except ImportError:  # pragma: no cover
        raise DPALogicError(f"{path} is a folder: reading a saved dataset needs `pip install datasets`") from None
    try:
        ds = load_from_disk(str(path))
    except Exception as e:  # datasets raises FileNotFoundError for folders that are not saved datasets
        raise DPALogicError(f"{path}: not a dataset saved with `save_to_disk` ({e})") from None
    if isinstance(ds, DatasetDict):
        names = list(ds.keys())
        wanted = [split] if split else ["train"]
        pick = next((s for s in wanted if s in ds), None)
        if split == "eval":  # the evaluation file defaults to the first held-out split present
            pick = next((s for s in EVAL_SPLITS if s in ds), None)
        if pick is None:
            looked_for = EVAL_SPLITS if split == "eval" else wanted
            raise DPALogicError(f"{path} has splits {names}; none of them is {' or '.join(looked_for)}")
        ds = ds[pick]
    return list(enumerate(ds.to_list(), 1))


def read_records(path: str | os.PathLike, split: str | None = None) -> tuple[list[tuple[int, Any]], list[RowIssue]]:
    """Raw records ``(row number, record)`` and the rows that could not even be decoded."""
    p = Path(path)
    if not os.path.exists(p):  # os.path: False (not an exception) for names too long for the file system
        raise DPALogicError(f"data file {p} does not exist")
    if p.is_dir():
        return _read_datasets_folder(p, split), []
    suffix = p.suffix.lower()
    if suffix in (".jsonl", ".ndjson"):
        return _read_jsonl(p)
    if suffix == ".json":
        return _read_json(p), []
    if suffix in (".parquet", ".pq"):
        return _read_parquet(p), []
    if suffix == ".csv":
        return _read_csv(p), []
    raise DPALogicError(
        f"{p}: unknown data format {suffix or '(no extension)'}; use .jsonl, .json, .csv, .parquet or a `datasets` folder"
    )


# --------------------------------------------------------------------------------------------------- validation


def _implicit_prompt(chosen: list, rejected: list) -> tuple[list, list, list]:
    """Split whole conversations into the shared leading messages (the prompt) and the two different endings."""
    n = 0
    while n < min(len(chosen), len(rejected)) and chosen[n] == rejected[n]:
        n += 1
    # the answers start at the last differing assistant turn: back off to it if the shared part ends mid-turn
    while n > 0 and chosen[n - 1].get("role") == "assistant" and n == min(len(chosen), len(rejected)):
        n -= 1
    return chosen[:n], chosen[n:], rejected[n:]


def normalize_row(rec: Any) -> tuple[dict[str, Any] | None, str | None]:
    """A valid row as ``{"prompt", "chosen", "rejected"}`` (strings or message lists), or the reason it is not."""
    if not isinstance(rec, dict):
        return None, f"expected an object with {', '.join(FIELDS)}, got {type(rec).__name__}"
    for f in ("chosen", "rejected"):
        if f not in rec or rec[f] is None:
            return None, f"missing {f!r}"
    chosen, rejected = rec["chosen"], rec["rejected"]
    prompt = rec.get("prompt")
    if prompt is None:
        if not (is_messages(chosen) and is_messages(rejected)):
            return None, "missing 'prompt' (only conversational rows may leave it implicit)"
        prompt, chosen, rejected = _implicit_prompt(chosen, rejected)
    if why := text_issue((("'prompt'", prompt), ("'chosen'", chosen), ("'rejected'", rejected))):
        return None, why
    kinds = {isinstance(v, str) for v in (prompt, chosen, rejected)}
    if len(kinds) != 1:
        return None, "mixes plain strings and chat messages across prompt/chosen/rejected"
    for f, v in (("chosen", chosen), ("rejected", rejected)):
        if is_empty(v):
            return None, f"empty {f!r} answer"
    if chosen == rejected:
        return None, "chosen and rejected are identical (no preference to learn)"
    extra = {k: rec[k] for k in ANNOTATIONS if rec.get(k) is not None}  # checked by annotations.annotate
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected, **extra}, None


def _fatal(source: str, issues: Sequence[RowIssue]) -> BadRowsError:
    return BadRowsError(source, issues, f"{source}: {len(issues)} malformed row(s) (drop --strict-data to skip them):")


def _no_rows(source: str, issues: Sequence[RowIssue], what: str = "no usable rows") -> BadRowsError:
    return BadRowsError(source, issues, f"{source}: {what}" + (f"; {len(issues)} malformed:" if issues else ""))


def _checked(
    source: str, numbered, check, issues: list[RowIssue], strict: bool, what: str = "no usable rows"
) -> tuple[list[dict[str, Any]], list[int], list[RowIssue]]:
    """The rows, row numbers and issues of numbered records ``(n, record)`` that ``check(record)`` turns into
    ``(row, None)`` or ``(None, reason)``: refused rows join ``issues`` (sorted by row), fatal with ``strict``; no row
    left is fatal too (``what`` says so)."""
    rows, numbers = [], []
    for n, rec in numbered:
        row, why = check(rec)
        if row is None:
            issues.append(RowIssue(n, why))
        else:
            rows.append(row)
            numbers.append(n)
    issues.sort(key=lambda i: i.row)
    if strict and issues:
        raise _fatal(source, issues)
    if not rows:
        raise _no_rows(source, issues, what)
    return rows, numbers, issues


def _kept(data: PreferenceRows, keep, strict: bool, what: str = "no usable rows"):
    """:func:`_checked` over ``data``'s rows with ``keep(row)`` giving the reason to drop a row (or None); the
    dropped rows join a copy of ``data.issues``."""

    def check(row: dict[str, Any]) -> tuple[dict[str, Any] | None, str | None]:
        why = keep(row)
        return (None, why) if why else (row, None)

    return _checked(data.source, zip(data.row_numbers, data.rows), check, list(data.issues), strict, what)


def write_bad_rows(path: str | os.PathLike, sources: Sequence[tuple[str, Sequence[RowIssue]]]) -> Path | None:
    """Every bad row of every source, one JSON object per line: ``{"file", "row", "reason"}``.

    Returns the path, or None when there is no bad row (a file left by an earlier run in the folder is removed, so the
    file always describes the latest run).
    """
    p = Path(path)
    lines = [
        json.dumps({"file": source, "row": i.row, "reason": i.reason}, ensure_ascii=False)
        for source, issues in sources
        for i in sorted(issues, key=lambda i: i.row)
    ]
    if not lines:
        p.unlink(missing_ok=True)
        return None
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(p.name + ".tmp")
    tmp.write_text("\n".join(lines) + "\n", encoding="utf-8", errors="backslashreplace")
    os.replace(tmp, p)  # never half a file
    return p


def _validated(source: str, records, issues: list[RowIssue], strict: bool) -> PreferenceRows:
    """Normalize numbered ``records``; malformed rows join ``issues`` and are skipped (or, with ``strict``, fatal)."""
    from dpalogic.training import ranked  # it imports this module

    records = list(records)  # is_ranked looks at the first row: an iterator (from_records) would lose it
    if ranked.is_ranked(records):  # K answers per prompt: {"prompt", "responses", "scores"}
        return ranked.validated_ranked(source, records, issues, strict)
    return PreferenceRows(source, *_checked(source, records, normalize_row, issues, strict))


def load_preferences(path: str | os.PathLike, *, strict: bool = False, split: str | None = None) -> PreferenceRows:
    """Read and validate a preference file; malformed rows are skipped (or, with ``strict``, fatal)."""
    records, issues = read_records(path, split)
    return _validated(str(path), records, issues, strict)


def from_records(records: Sequence[dict[str, Any]], source: str = "<rows>", strict: bool = False) -> PreferenceRows:
    """Validate in-memory rows (e.g. the synthetic demo task) exactly like rows read from a file."""
    return _validated(source, enumerate(records, 1), [], strict)


# --------------------------------------------------------------------------------------------------- tokenization


@dataclass(frozen=True)
class Example:
    """One tokenized pair; ``index`` is its position in the dataset (the key of cached reference log-probs)."""

    index: int
    row: int
    prompt_ids: list[int]
    chosen_ids: list[int]
    rejected_ids: list[int]
    margin: float | None = None  # the pair's margin (--margin-from)
    chosen_weights: tuple[float, ...] | None = None  # per answer token, from spans (dpalogic.training.annotations)
    rejected_weights: tuple[float, ...] | None = None


@dataclass
class TokenizedData:
    examples: list[Example]
    issues: list[RowIssue]
    truncated: int

    def summary(self) -> str:
        parts = [f"{len(self.examples)} pairs tokenized"]
        if self.truncated:
            parts.append(f"{self.truncated} truncated")
        if self.issues:
            parts.append(f"{len(self.issues)} dropped")
        return "\n".join(["  " + ", ".join(parts)] + _listed(self.issues))


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def _ids(tokenizer, text: str, special: bool) -> list[int]:
    return list(tokenizer(text, add_special_tokens=special)["input_ids"])


def tokenize_pair(tokenizer, row: dict[str, Any]) -> tuple[list[int], list[int], list[int]]:
    """``(prompt_ids, chosen_ids, rejected_ids)``: the answers are what follows the prompt in prompt+answer.

    Tokenizing prompt+answer jointly (as TRL does) keeps tokens that merge across the boundary correct; the answer
    starts where the two tokenizations diverge. Plain-string answers get the EOS token so the model learns to stop.
    """
    prompt, chosen, rejected = row["prompt"], row["chosen"], row["rejected"]
    if isinstance(chosen, list):
        if not getattr(tokenizer, "chat_template", None):
            raise DPALogicError("conversational rows need a tokenizer with a chat template; this one has none")
        p_text = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=False)
        c_text = tokenizer.apply_chat_template(prompt + chosen, tokenize=False)
        r_text = tokenizer.apply_chat_template(prompt + rejected, tokenize=False)
        p, c, r = (_ids(tokenizer, t, False) for t in (p_text, c_text, r_text))
    else:
        p, c, r = (_ids(tokenizer, t, True) for t in (prompt, prompt + chosen, prompt + rejected))
    n = min(_common_prefix(p, c), _common_prefix(p, r))
    eos = tokenizer.eos_token_id
    answers = []
    for full in (c, r):
        ans = full[n:]
        if isinstance(chosen, str) and eos is not None and (not ans or ans[-1] != eos):
            ans = ans + [eos]
        answers.append(ans)
    return p[:n], answers[0], answers[1]


def tokenize_rows(
    data: PreferenceRows,
    tokenizer,
    *,
    max_length: int | None = 1024,
    max_prompt_length: int | None = 512,
    strict: bool = False,
) -> TokenizedData:
    """Tokenize every row and apply the truncation rules (:mod:`dpalogic.training.truncation`): the prompt keeps
    its end, each answer its start. Rows whose spans cannot be placed on their tokens are dropped (reported)."""
    from dpalogic.training.annotations import PAIR_MARGIN, span_token_weights  # they import this module
    from dpalogic.training.truncation import tokenize_each

    def tokenize(row: dict[str, Any]) -> tuple[list[int], list[list[int]]]:
        p, c, r = tokenize_pair(tokenizer, row)
        return p, [c, r]

    def example(i: int, n: int, row: dict[str, Any], p: list[int], answers: list[list[int]], weights) -> Example:
        c, r = answers
        cw, rw = (None if w is None else w[: len(ids)] for w, ids in zip(weights, answers))
        return Example(i, n, p, c, r, row.get(PAIR_MARGIN), cw, rw)

    def weigh(row: dict[str, Any], tokens: tuple[list[int], list[list[int]]]):
        return span_token_weights(tokenizer, row, len(tokens[0]), tuple(tokens[1]))

    return tokenize_each(data, tokenize, example, max_length, max_prompt_length, strict, what="pair", weigh=weigh)


def pad_id(tokenizer) -> int:
    for tid in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if tid is not None:
            return int(tid)
    return 0


def stack_answers(sequences: Sequence[tuple[list[int], list[int]]], pad: int) -> dict[str, Any]:
    """(prompt, answer) token lists → right-padded ``input_ids``, ``attention_mask``, ``labels`` (−100 outside
    the answer)."""
    import torch

    width = max(len(p) + len(a) for p, a in sequences)
    ids = torch.full((len(sequences), width), pad, dtype=torch.long)
    labels = torch.full((len(sequences), width), IGNORE_INDEX, dtype=torch.long)
    attn = torch.zeros((len(sequences), width), dtype=torch.long)
    for i, (p, a) in enumerate(sequences):
        ids[i, : len(p) + len(a)] = torch.tensor(p + a)
        labels[i, len(p) : len(p) + len(a)] = torch.tensor(a)
        attn[i, : len(p) + len(a)] = 1
    return {"input_ids": ids, "attention_mask": attn, "labels": labels}


def collate(examples: Sequence[Example], pad_token_id: int) -> dict[str, Any]:
    """Stack chosen over rejected: ``input_ids``/``attention_mask``/``labels`` ``[2B, T]``, lengths ``[B]``."""
    import torch

    from dpalogic.training.annotations import annotation_tensors

    sides = [(ex.prompt_ids, ex.chosen_ids) for ex in examples] + [(ex.prompt_ids, ex.rejected_ids) for ex in examples]
    batch = stack_answers(sides, pad_token_id)
    return {
        **batch,
        "chosen_lengths": torch.tensor([len(ex.chosen_ids) for ex in examples]),
        "rejected_lengths": torch.tensor([len(ex.rejected_ids) for ex in examples]),
        "index": torch.tensor([ex.index for ex in examples]),
        **annotation_tensors(examples, batch["input_ids"].shape[1]),
    }
