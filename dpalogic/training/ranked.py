"""Rows with K answers per prompt: ``{"prompt", "responses": [K answers], "scores": [K numbers]}``.

A row's answers are sorted by score, highest first (a stable sort: tied answers keep their order in the file), so
answer ``y1`` is the best one and column j of a batch's ``[B, K]`` log-probs is answer ``y(j+1)``. Answers are strings
or chat message lists, as for pairs (:mod:`dpalogic.training.data`). A file of such rows is recognised by its first
row having ``responses`` and no ``chosen``.

Bad rows are reported by row number, like bad pairs: ``responses`` and ``scores`` of different lengths, a score that
is not a finite number, fewer than 2 or more than :data:`MAX_ANSWERS` answers, an empty answer, two identical
answers. How the rows train:

* **A loss over y1 … yK** (a K-answer formula): every row needs exactly the loss's K answers (a row with another
  number is a bad row), and a unique best answer (scores tied at the top make ``y1`` arbitrary: a bad row). Ties
  below the top are kept in file order and reported (``RankedRows.ties``).
* **A pairwise loss** with ``--pairs all|adjacent|best-vs-rest`` (:func:`to_pairs`): rows may have any K ≥ 2; tied
  answers make no pair, and a row whose scores all tie makes none (a bad row). ``--curriculum easy-to-hard`` orders
  the pairs by score gap, largest first (Curry-DPO).

**Margins** (``--margin-from``, a loss over y1 … yK only, :func:`list_margins`): ``margin`` takes the row's
``margin`` field, ``scores`` the gap between the best answer and the runner-up, ``s1 − s2`` (positive: the best answer
is unique), both times ``--margin-scale``. Every preference term's link is shifted by it, as for a pair: for a softmax
over the answers, ``y1``'s log-odds must beat the others' by the margin.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from dpalogic.errors import DPALogicError
from dpalogic.training import data as D
from dpalogic.training.annotations import PAIR_MARGIN, row_margin
from dpalogic.training.data import PreferenceRows, RowIssue, TokenizedData
from dpalogic.training.fields import finite_number, is_empty, record_issue, text_issue, type_name
from dpalogic.training.truncation import tokenize_each

RANKED_FIELDS = ("prompt", "responses", "scores")
MAX_ANSWERS = 256  # the language's answers go up to y256
PAIR_MODES = ("all", "adjacent", "best-vs-rest")
CURRICULA = ("easy-to-hard",)


@dataclass
class RankedRows(PreferenceRows):
    """Valid K-answer rows (answers sorted by score, best first), the skipped ones, and the kept rows with ties."""

    ties: list[RowIssue] = field(default_factory=list)

    def summary(self, what: str = "data") -> str:
        """The pairs' summary, plus the rows whose tied scores were kept in file order."""
        text = super().summary(what)
        if not self.ties:
            return text
        return "\n".join(
            [text, f"  {len(self.ties)} row(s) with tied scores, kept in file order:", *D._listed(self.ties)]
        )


@dataclass(frozen=True)
class RankedExample:
    """One tokenized prompt with its K answers (best first); ``index`` is its position in the dataset."""

    index: int
    row: int
    prompt_ids: list[int]
    answer_ids: tuple[list[int], ...]
    scores: tuple[float, ...]
    margin: float | None = None  # the row's margin (--margin-from)


class RankedTokens(TokenizedData):
    """Tokenized K-answer rows: a :class:`TokenizedData` whose summary counts lists, not pairs."""

    def summary(self) -> str:
        n = len(self.examples)
        return super().summary().replace(f"{n} pairs tokenized", f"{n} list{'s' * (n != 1)} tokenized", 1)


def is_ranked(records: Sequence[tuple[int, Any]]) -> bool:
    """K-answer rows: the first object row has ``responses`` and no ``chosen``."""
    first = next((r for _, r in records if isinstance(r, dict)), None)
    return first is not None and "responses" in first and "chosen" not in first


def _tie_note(scores: Sequence[float]) -> str | None:
    """``"responses[1], responses[3] both score 7"`` (positions in the file's row) for the highest tied score, or
    None without ties."""
    for s in sorted(set(scores), reverse=True):
        at = [f"responses[{i}]" for i, t in enumerate(scores) if t == s]
        if len(at) > 1:
            return f"{', '.join(at)} {'both' if len(at) == 2 else 'all'} score {s:g}"
    return None


def normalize_ranked(rec: Any) -> tuple[dict[str, Any] | None, str | None]:
    """A valid row as ``{"prompt", "responses", "scores"}`` sorted best first, or the reason it is not."""
    if why := record_issue(rec, RANKED_FIELDS, "a K-answer row (responses, scores)"):
        return None, why
    prompt, responses, scores = rec["prompt"], rec["responses"], rec["scores"]
    for f, v in (("responses", responses), ("scores", scores)):
        if not isinstance(v, list):
            return None, f"{f!r} must be a list, got {type_name(v)}"
    if len(responses) != len(scores):
        return None, f"{len(responses)} responses but {len(scores)} scores"
    if not 2 <= len(responses) <= MAX_ANSWERS:
        return None, f"{len(responses)} response(s): a row needs 2 to {MAX_ANSWERS}"
    values = []
    for i, s in enumerate(scores):
        v = finite_number(s)
        if v is None:
            return (
                None,
                f"scores[{i}] must be a finite number, got {type_name(s) if isinstance(s, str) else repr(s)}",
            )
        values.append(v)
    if why := text_issue([("prompt", prompt)] + [(f"responses[{i}]", r) for i, r in enumerate(responses)]):
        return None, why
    if len({isinstance(v, str) for v in [prompt, *responses]}) != 1:
        return None, "mixes plain strings and chat messages across prompt/responses"
    for i, r in enumerate(responses):
        if is_empty(r):
            return None, f"empty responses[{i}]"
        for j in range(i):
            if responses[j] == r:
                return None, f"responses[{j}] and responses[{i}] are identical"
    order = sorted(range(len(values)), key=lambda i: -values[i])  # stable: ties keep the file's order
    row = {"prompt": prompt, "responses": [responses[i] for i in order], "scores": [values[i] for i in order]}
    if rec.get("margin") is not None:  # checked by --margin-from margin (list_margins); ignored otherwise
        row["margin"] = rec["margin"]
    return row, None


def validated_ranked(source: str, records, issues: list[RowIssue], strict: bool) -> RankedRows:
    """Normalize numbered K-answer ``records`` (the hook of :func:`dpalogic.training.data.load_preferences`)."""
    records = list(records)
    rows, numbers, issues = D._checked(source, records, normalize_ranked, issues, strict)
    by_row = dict(records)  # ties are named by the answers' positions in the file, before sorting
    notes = ((n, _tie_note([float(x) for x in by_row[n]["scores"]])) for n in numbers)
    return RankedRows(source, rows, numbers, issues, [RowIssue(n, note) for n, note in notes if note is not None])


def _kept(data: RankedRows, keep, strict: bool, what: str) -> RankedRows:
    """The rows for which ``keep(row)`` gives no reason to drop them; the others join the issues."""
    rows, numbers, issues = D._kept(data, keep, strict, what)
    ties = [t for t in data.ties if t.row in set(numbers)]
    return RankedRows(data.source, rows, numbers, issues, ties)


def listwise_rows(data: RankedRows, k: int, strict: bool = False) -> RankedRows:
    """The rows a loss over ``y1 … yk`` trains on: exactly ``k`` answers and a unique best one."""

    def why(row: dict[str, Any]) -> str | None:
        if len(row["responses"]) != k:
            return f"{len(row['responses'])} responses; the loss is over y1…y{k}, so every row needs {k}"
        s = row["scores"]
        if s[0] == s[1]:
            return f"no single best answer ({s.count(s[0])} responses share the top score {s[0]:g}), so y1 would be arbitrary"
        return None

    return _kept(data, why, strict, f"no row with {k} answers and a single best one")


def list_margins(data: RankedRows, margin_from: str, scale: float = 1.0, strict: bool = False) -> RankedRows:
    """The rows of a loss over y1 … yK with their margins (``row[PAIR_MARGIN]``): ``s · margin`` (the row's field) or
    ``s · (s1 − s2)`` (the best score minus the runner-up's); a row without a usable margin is a bad row."""

    def why(row: dict[str, Any]) -> str | None:
        s = row["scores"]  # as a pair's fields, so the pairs' checks and messages apply unchanged
        m, reason = row_margin(
            {"margin": row.get("margin"), "chosen_score": s[0], "rejected_score": s[1]}, margin_from, scale
        )
        row[PAIR_MARGIN] = m
        return reason

    # copies: the margin is this run's (a RankedRows may train several runs, as in the ranking demo)
    data = RankedRows(data.source, [dict(r) for r in data.rows], data.row_numbers, data.issues, data.ties)
    return _kept(data, why, strict, f"no row with a usable margin (--margin-from {margin_from})")


# --------------------------------------------------------------------------------------------------- pairs


def pair_indices(scores: Sequence[float], mode: str) -> list[tuple[int, int]]:
    """The pairs ``(i, j)`` (answer i preferred, 0-based, scores sorted best first) that ``mode`` makes.

    ``all``: every i, j with ``s_i > s_j``; ``adjacent``: those with no score strictly between them (consecutive
    score levels); ``best-vs-rest``: every answer with the top score against every lower-scored one. Tied answers
    never make a pair.
    """
    if mode not in PAIR_MODES:
        raise DPALogicError(f"--pairs must be one of {', '.join(PAIR_MODES)}, got {mode!r}")
    levels = sorted(set(scores), reverse=True)
    level = {s: n for n, s in enumerate(levels)}
    out = []
    for i, si in enumerate(scores):
        for j, sj in enumerate(scores):
            if si <= sj:
                continue
            if mode == "adjacent" and level[sj] != level[si] + 1:
                continue
            if mode == "best-vs-rest" and level[si] != 0:
                continue
            out.append((i, j))
    return out


def to_pairs(data: RankedRows, mode: str, curriculum: str | None = None, strict: bool = False) -> PreferenceRows:
    """Pairs for a pairwise loss: ``{"prompt", "chosen", "rejected", "chosen_score", "rejected_score"}`` per pair
    (so ``--margin-from scores`` works), row by row, or with ``curriculum="easy-to-hard"`` ordered by score gap,
    largest first (Curry-DPO; equal gaps keep the row order). A pair keeps its row's number."""
    if curriculum is not None and curriculum not in CURRICULA:
        raise DPALogicError(f"--curriculum must be {' or '.join(CURRICULA)}, got {curriculum!r}")
    data = _kept(data, lambda row: None if pair_indices(row["scores"], mode) else _all_tied(row), strict,
                 "no row has two answers with different scores")  # fmt: skip
    pairs: list[tuple[float, int, dict[str, Any]]] = []
    for row, n in zip(data.rows, data.row_numbers):
        r, s = row["responses"], row["scores"]
        for i, j in pair_indices(s, mode):
            pair = {
                "prompt": row["prompt"],
                "chosen": r[i],
                "rejected": r[j],
                "chosen_score": s[i],
                "rejected_score": s[j],
            }
            pairs.append((s[i] - s[j], n, pair))
    if curriculum == "easy-to-hard":
        pairs.sort(key=lambda p: -p[0])  # stable
    return PreferenceRows(data.source, [p[2] for p in pairs], [p[1] for p in pairs], data.issues)


def _all_tied(row: dict[str, Any]) -> str:
    return f"all {len(row['scores'])} scores are {row['scores'][0]:g}: no pair to make"


# --------------------------------------------------------------------------------------------------- tokens


def tokenize_answers(tokenizer, row: dict[str, Any]) -> tuple[list[int], list[list[int]]]:
    """``(prompt_ids, [answer_ids …])``, as :func:`~dpalogic.training.data.tokenize_pair` does for two answers: each
    answer is what follows the prompt in prompt+answer (tokenized jointly), the prompt is the part all share, and
    plain-string answers get the EOS token."""
    prompt, answers = row["prompt"], row["responses"]
    if isinstance(prompt, list):
        if not getattr(tokenizer, "chat_template", None):
            raise DPALogicError("conversational rows need a tokenizer with a chat template; this one has none")
        p = D._ids(tokenizer, tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=False), False)
        fulls = [D._ids(tokenizer, tokenizer.apply_chat_template(prompt + a, tokenize=False), False) for a in answers]
    else:
        p = D._ids(tokenizer, prompt, True)
        fulls = [D._ids(tokenizer, prompt + a, True) for a in answers]
    n = min(D._common_prefix(p, f) for f in fulls)
    eos = tokenizer.eos_token_id
    out = []
    for full in fulls:
        ans = full[n:]
        if isinstance(prompt, str) and eos is not None and (not ans or ans[-1] != eos):
            ans = ans + [eos]
        out.append(ans)
    return p[:n], out


def tokenize_ranked(
    data: RankedRows,
    tokenizer,
    *,
    max_length: int | None = 1024,
    max_prompt_length: int | None = 512,
    strict: bool = False,
) -> TokenizedData:
    """Tokenize K-answer rows with the pairs' truncation rules: the prompt keeps its end within
    ``max_prompt_length``, every answer its start within ``max_length − len(prompt)``."""

    def example(i: int, n: int, row: dict[str, Any], p: list[int], answers: list[list[int]], _) -> RankedExample:
        return RankedExample(i, n, p, tuple(answers), tuple(row["scores"]), row.get(PAIR_MARGIN))

    def tokenize(row: dict[str, Any]) -> tuple[list[int], list[list[int]]]:
        return tokenize_answers(tokenizer, row)

    tok = tokenize_each(data, tokenize, example, max_length, max_prompt_length, strict, what="row")
    return RankedTokens(tok.examples, tok.issues, tok.truncated)
