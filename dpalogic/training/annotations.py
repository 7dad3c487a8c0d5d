"""What a preference row may carry besides prompt/chosen/rejected: a per-pair margin and token-weight spans.

* **Margins** (``--margin-from``): ``margin`` (a number), or ``chosen_score`` and ``rejected_score``. The pair's margin
  is ``s · margin`` or ``s · (chosen_score − rejected_score)`` with ``s = --margin-scale``; the loss shifts every
  preference term's link by it, ``f(z − m_i)`` (ODPO, reward-augmented DPO, MODPO: docs/semantics.md).
* **Spans** (``chosen_spans`` / ``rejected_spans``): ``[[start, end, weight], …]``, character ranges ``[start, end)``
  of the answer's text (a plain-string answer, or the content of a one-message chat answer). A token overlapping
  spans takes the weight of the span covering most of its characters (the first such span on a tie); every other
  answer token, the EOS token appended to plain-string answers included, takes ``outside_span_weight`` (default 1).
  The weights then multiply the tokens' log-probs (:mod:`dpalogic.runtime.token_weights`). Mask-DPO's sentence masks
  are spans of weight 0 over the non-factual sentences; a fixed SparsePO mask is ``outside_span_weight: 0`` with
  spans of weight 1 over the kept tokens.

A value that is missing where ``--margin-from`` needs it, not a finite number, or a span out of range, reversed or
with a weight that is not a number ≥ 0 makes the row a bad row, reported with its number like every other.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from typing import Any

from dpalogic.errors import DPALogicError
from dpalogic.training.data import Example, PreferenceRows, _kept
from dpalogic.training.fields import finite_number

MARGIN_SOURCES = ("margin", "scores")
PAIR_MARGIN = "pair_margin"  # the key under which a row keeps its computed margin


def _number(x: Any) -> float | None:
    """A finite number, from JSON (not a boolean) or from CSV text (``"0.5"``); None otherwise."""
    if isinstance(x, str):
        try:
            x = float(x.strip())
        except ValueError:
            return None
    return finite_number(x)


def row_margin(row: dict[str, Any], margin_from: str, scale: float) -> tuple[float | None, str | None]:
    """The pair's margin, or the reason the row has none."""
    keys = ("margin",) if margin_from == "margin" else ("chosen_score", "rejected_score")
    values = []
    for k in keys:
        if row.get(k) is None or row.get(k) == "":
            return None, f"missing {k!r} (--margin-from {margin_from})"
        v = _number(row[k])
        if v is None:
            return None, f"{k!r} must be a finite number, got {_short(row[k])}"
        values.append(v)
    m = scale * (values[0] if margin_from == "margin" else values[0] - values[1])
    if not math.isfinite(m):
        return None, f"the margin {scale:g} × {values} is not a finite number"
    return m, None


def _short(x: Any) -> str:
    r = repr(x)
    return r if len(r) <= 40 else r[:30] + "…"


def answer_text(answer: Any) -> str | None:
    """The text spans index: a plain-string answer, or the content of a chat answer of one message."""
    if isinstance(answer, str):
        return answer
    if isinstance(answer, list) and len(answer) == 1:
        return answer[0]["content"]
    return None


def _spans(row: dict[str, Any], side: str) -> tuple[list[tuple[int, int, float]] | None, str | None]:
    """A side's spans, checked against its answer's text (None when the row has none), or the reason they are bad."""
    raw = row.get(f"{side}_spans")
    key = f"{side}_spans"
    if raw is None or raw == "":
        return None, None
    if isinstance(raw, str):  # CSV cells hold the list as JSON text
        try:
            raw = json.loads(raw)
        except (json.JSONDecodeError, RecursionError, ValueError):
            return None, f"{key!r} is not a JSON list of [start, end, weight]"
    if not isinstance(raw, list):
        return None, f"{key!r} must be a list of [start, end, weight], got {_short(raw)}"
    text = answer_text(row[side])
    if text is None:
        return None, f"{key!r} needs a plain-string answer or a chat answer of one message"
    out = []
    for i, span in enumerate(raw):
        if not (isinstance(span, (list, tuple)) and len(span) == 3):
            return None, f"{key}[{i}] must be [start, end, weight], got {_short(span)}"
        start, end, weight = span
        if not all(isinstance(x, int) and not isinstance(x, bool) for x in (start, end)):
            return None, f"{key}[{i}]: start and end must be integer character offsets, got {_short(span)}"
        if not 0 <= start <= end <= len(text):
            return None, f"{key}[{i}] = [{start}, {end}] is outside the answer's {len(text)} characters or reversed"
        w = None if isinstance(weight, str) else _number(weight)
        if w is None or w < 0:
            return None, f"{key}[{i}]: the weight must be a number >= 0, got {_short(weight)}"
        out.append((start, end, w))
    return out, None


def _outside(row: dict[str, Any]) -> tuple[float, str | None]:
    raw = row.get("outside_span_weight")
    if raw is None or raw == "":
        return 1.0, None
    w = _number(raw)
    if w is None or w < 0:
        return 1.0, f"'outside_span_weight' must be a number >= 0, got {_short(raw)}"
    return w, None


def row_issue(row: dict[str, Any], margin_from: str | None, scale: float) -> str | None:
    """Check a row's annotations (and compute its margin into ``row[PAIR_MARGIN]``); the reason it is bad, or None."""
    if margin_from is not None:
        m, why = row_margin(row, margin_from, scale)
        if why:
            return why
        row[PAIR_MARGIN] = m
    for side in ("chosen", "rejected"):
        why = _spans(row, side)[1]
        if why:
            return why
    return _outside(row)[1]


def annotate(data: PreferenceRows, margin_from: str | None, scale: float = 1.0, strict: bool = False) -> PreferenceRows:
    """Keep the rows whose margin and spans are usable; the others join ``data.issues`` (fatal with ``strict``)."""
    if margin_from is not None and margin_from not in MARGIN_SOURCES:
        raise DPALogicError(f"--margin-from must be one of {', '.join(MARGIN_SOURCES)}, got {margin_from!r}")
    return PreferenceRows(data.source, *_kept(data, lambda row: row_issue(row, margin_from, scale), strict))


def annotate_rows(rows: PreferenceRows | None, cfg: Any) -> PreferenceRows | None:
    """:func:`annotate` with a run's settings; rows of another kind (unpaired rows) are left as they are."""
    if rows is None or type(rows) is not PreferenceRows:
        return rows
    return annotate(rows, cfg.margin_from, cfg.margin_scale, cfg.strict_data)


# --------------------------------------------------------------------------------------------------- spans → tokens


def _token_weight(s: int, e: int, spans: list[tuple[int, int, float]], outside: float) -> float:
    """The weight of the token covering characters ``[s, e)`` of the answer."""
    best, weight = 0, outside
    for a, b, w in spans:
        overlap = min(e, b) - max(s, a)
        if overlap > best:
            best, weight = overlap, w
    return weight


def span_token_weights(
    tokenizer, row: dict[str, Any], n_prompt: int, answers: tuple[list[int], list[int]]
) -> tuple[tuple[float, ...] | None, tuple[float, ...] | None] | str:
    """Per-token weights of the chosen and rejected answers (None for a side without spans), or a reason.

    ``n_prompt`` is the number of prompt tokens :func:`~dpalogic.training.data.tokenize_pair` found and ``answers``
    its answer ids: the answer's tokens are the full text's tokens from ``n_prompt`` on, and the tokenizer's
    character offsets (``return_offsets_mapping``, fast tokenizers) place each of them on the answer's text.
    """
    outside = _outside(row)[0]
    out: list[tuple[float, ...] | None] = []
    for side, ids in zip(("chosen", "rejected"), answers):
        spans = _spans(row, side)[0]
        if spans is None:
            out.append(None)
            continue
        prompt, answer = row["prompt"], row[side]
        if isinstance(answer, str):
            full, start, special = prompt + answer, len(prompt), True
        else:
            full = tokenizer.apply_chat_template(prompt + answer, tokenize=False)
            start = full.rfind(answer_text(answer))
            special = False
            if start < 0:
                return f"the chat template changes {side!r}'s text: its spans cannot be placed on its tokens"
        if not getattr(tokenizer, "is_fast", False):
            raise DPALogicError("token-weight spans need a fast tokenizer (character offsets); this one is not")
        enc = tokenizer(full, add_special_tokens=special, return_offsets_mapping=True)
        offsets = enc["offset_mapping"][n_prompt:]
        weights = []
        for k in range(len(ids)):
            if k >= len(offsets) or offsets[k][1] <= offsets[k][0]:  # the appended EOS, a special token
                weights.append(outside)
            else:
                s, e = offsets[k]
                weights.append(_token_weight(s - start, e - start, spans, outside))
        out.append(tuple(weights))
    return out[0], out[1]


def annotation_tensors(examples: Sequence[Example], width: int) -> dict[str, Any]:
    """``margin [B]`` when the pairs have margins; ``token_weights [2B, T]`` (aligned with ``labels``; answer tokens
    without spans weigh 1) when some answer has span weights."""
    import torch

    out: dict[str, Any] = {}
    if any(ex.margin is not None for ex in examples):
        out["margin"] = torch.tensor([ex.margin for ex in examples], dtype=torch.float32)
    if any(ex.chosen_weights is not None or ex.rejected_weights is not None for ex in examples):
        w = torch.zeros(2 * len(examples), width)
        for side in ("chosen", "rejected"):
            for i, ex in enumerate(examples):
                ids, ws = getattr(ex, f"{side}_ids"), getattr(ex, f"{side}_weights")
                row = i if side == "chosen" else len(examples) + i
                a = len(ex.prompt_ids)
                w[row, a : a + len(ids)] = 1.0 if ws is None else torch.tensor(ws)
        out["token_weights"] = w
    return out
