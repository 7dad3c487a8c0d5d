"""Checks of a row's fields shared by every kind of row (pairs, K answers, unpaired): is it an object with the
fields, is a field text (a string or chat messages) that is valid Unicode and not empty."""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any


def is_messages(x: Any) -> bool:
    """A chat: a list of ``{"role": str, "content": str}`` (text only; other keys such as tool calls are kept)."""
    return isinstance(x, list) and all(
        isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in x
    )


def type_name(x: Any) -> str:
    if isinstance(x, list) and x and not is_messages(x):
        return "a list that is not chat messages"
    return {str: "a string", list: "a list", dict: "an object", bool: "a boolean", type(None): "null"}.get(
        type(x), type(x).__name__
    )


def undecodable(x: Any) -> bool:
    """True when a string (or a message's content) holds lone surrogates, i.e. cannot be encoded as UTF-8."""
    texts = [x] if isinstance(x, str) else [m.get("content") for m in x if isinstance(m.get("content"), str)]
    for t in texts:
        try:
            t.encode("utf-8")
        except UnicodeEncodeError:
            return True
    return False


def is_empty(x: Any) -> bool:
    if isinstance(x, str):
        return not x.strip()
    return not x or all(not str(m.get("content") or "").strip() for m in x)


def finite_number(x: Any) -> float | None:
    """A finite number (not a boolean, not text), or None."""
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        return None
    try:
        v = float(x)
    except OverflowError:  # an integer beyond float range
        return None
    return v if math.isfinite(v) else None


def text_issue(named: Iterable[tuple[str, Any]]) -> str | None:
    """Why one of the ``(label, value)`` fields is not text or holds undecodable text; None when all are fine."""
    for f, v in named:
        if not (isinstance(v, str) or is_messages(v)):
            return f"{f} must be a string or a list of chat messages with 'role' and 'content', got {type_name(v)}"
        if undecodable(v):
            return f"undecodable text in {f} (not valid Unicode)"
    return None


def record_issue(rec: Any, fields: Sequence[str], kind: str) -> str | None:
    """Why ``rec`` is not an object with every one of ``fields`` (and no pair's), ``kind`` naming the row; or None."""
    if not isinstance(rec, dict):
        return f"expected an object with {', '.join(fields)}, got {type(rec).__name__}"
    for f in fields:
        if rec.get(f) is None:
            return f"missing {f!r}"
    if "chosen" in rec or "rejected" in rec:
        return f"mixes {kind} with a pair (chosen, rejected)"
    return None
