"""Tokenizing rows one by one with the truncation rules every kind of row (pairs, K answers, unpaired) shares.

The prompt keeps its *end* (the part next to the answers) within ``max_prompt_length``; every answer keeps its start
within ``max_length − len(prompt)``. A row whose prompt leaves no room for an answer, whose answer has no token left,
or that the tokenizer fails on is a bad row (reported with its number); with ``strict`` bad rows are fatal.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from dpalogic.errors import DPALogicError
from dpalogic.training.data import PreferenceRows, RowIssue, TokenizedData, _fatal, _no_rows

Tokens = tuple[list[int], list[list[int]]]  # (prompt ids, [answer ids …])


def truncate(
    p: list[int], answers: list[list[int]], max_length: int | None, max_prompt_length: int | None
) -> tuple[list[int], list[list[int]], bool] | str:
    """``(prompt, answers, whether anything was cut)`` within the limits, or the reason the row has no room."""
    cut = False
    if max_prompt_length is not None and len(p) > max_prompt_length:
        p, cut = p[len(p) - max_prompt_length :], True
    if max_length is not None:
        room = max_length - len(p)
        if room < 1:
            return f"prompt of {len(p)} tokens leaves no room for an answer (max_length)"
        if any(len(a) > room for a in answers):
            answers, cut = [a[:room] for a in answers], True
    return p, answers, cut


def tokenize_each(
    data: PreferenceRows,
    tokenize: Callable[[dict[str, Any]], Tokens],
    example: Callable[[int, int, dict[str, Any], list[int], list[list[int]], Any], Any],
    max_length: int | None,
    max_prompt_length: int | None,
    strict: bool,
    *,
    what: str,
    empty: str = "an answer has no tokens after tokenization",
    weigh: Callable[[dict[str, Any], Tokens], Any] | None = None,
) -> TokenizedData:
    """Tokenize every row of ``data`` and truncate it; ``what`` says what survives (``"pair"``, ``"row"``).

    ``tokenize(row)`` gives the row's whole tokens; a failure other than a :class:`DPALogicError` (a template or
    tokenizer failure on one row, which should not end the run) makes the row a bad row. ``weigh(row, tokens)``, when
    given, works out what the row needs from its whole tokens (a reason string makes the row a bad row);
    ``example(index, row number, row, prompt ids, answer ids, weigh's result)`` builds the example from the truncated
    tokens. ``empty`` is the reason given for an answer left without tokens.
    """
    if max_length is not None and max_prompt_length is not None and max_prompt_length >= max_length:
        raise DPALogicError(f"max_prompt_length ({max_prompt_length}) must be below max_length ({max_length})")
    examples, issues, truncated = [], [], 0
    for i, (row, n) in enumerate(zip(data.rows, data.row_numbers)):
        try:
            tokens = tokenize(row)
        except DPALogicError:
            raise
        except Exception as e:  # a template or tokenizer failure on one row should not end the run
            issues.append(RowIssue(n, f"could not tokenize ({type(e).__name__}: {e})"))
            continue
        extra = weigh(row, tokens) if weigh is not None else None
        if isinstance(extra, str):
            issues.append(RowIssue(n, extra))
            continue
        kept = truncate(*tokens, max_length, max_prompt_length)
        if isinstance(kept, str):
            issues.append(RowIssue(n, kept))
            continue
        p, answers, cut = kept
        if not all(answers):
            issues.append(RowIssue(n, empty))
            continue
        truncated += cut
        examples.append(example(i, n, row, p, answers, extra))
    if strict and issues:
        raise _fatal(data.source, issues)
    if not examples:
        raise _no_rows(data.source, issues, f"no {what} survived tokenization")
    return TokenizedData(examples, issues, truncated)
