"""K-answer rows (dpalogic.training.ranked): reading, sorting, bad rows and ties, pairs and the curriculum, tokens.

Pairs are checked against their definitions written out as brute force over every (i, j); sorting against Python's
stable ``sorted``; tokenization against tokenizing prompt + answer directly and against the pairs' tokenizer.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from dpalogic.errors import DPALogicError
from dpalogic.training import ranked as R
from dpalogic.training.annotations import PAIR_MARGIN
from dpalogic.training.data import from_records, load_preferences, tokenize_pair, write_bad_rows
from dpalogic.training.model import build_char_tokenizer

TOK = build_char_tokenizer()


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


GOOD = {"prompt": "p:", "responses": ["a", "b", "c"], "scores": [1, 3, 2]}


def test_a_row_is_sorted_best_first():
    data = from_records([GOOD])
    assert isinstance(data, R.RankedRows)
    assert data.rows == [{"prompt": "p:", "responses": ["b", "c", "a"], "scores": [3.0, 2.0, 1.0]}]
    assert data.ties == []


@given(st.lists(st.integers(-3, 3), min_size=2, max_size=12))
def test_sorting_is_stable_and_ties_are_reported(scores):
    responses = [f"r{i}" for i in range(len(scores))]
    data = from_records([{"prompt": "p", "responses": responses, "scores": scores}])
    expected = sorted(zip(responses, scores), key=lambda rs: -rs[1])  # Python's sort is stable
    assert data.rows[0]["responses"] == [r for r, _ in expected]
    assert data.rows[0]["scores"] == [float(s) for _, s in expected]
    tied = len(set(scores)) < len(scores)
    assert [t.row for t in data.ties] == ([1] if tied else [])
    if tied:  # the highest tied score, with its positions in the file's row
        top = max(s for s in scores if scores.count(s) > 1)
        assert all(f"responses[{i}]" in data.ties[0].reason for i, s in enumerate(scores) if s == top)


BAD = [
    ({"prompt": "p", "responses": ["a", "b"], "scores": [1]}, "2 responses but 1 scores"),
    ({"prompt": "p", "responses": ["a"], "scores": [1]}, "a row needs 2 to 256"),
    ({"prompt": "p", "responses": [f"r{i}" for i in range(257)], "scores": list(range(257))}, "a row needs 2 to 256"),
    ({"prompt": "p", "responses": ["a", "b"], "scores": [1, "2"]}, "scores[1] must be a finite number"),
    ({"prompt": "p", "responses": ["a", "b"], "scores": [1, True]}, "scores[1] must be a finite number"),
    ({"prompt": "p", "responses": ["a", "b"], "scores": [1, None]}, "scores[1] must be a finite number"),
    ({"prompt": "p", "responses": ["a", " "], "scores": [1, 2]}, "empty responses[1]"),
    ({"prompt": "p", "responses": ["a", "a"], "scores": [1, 2]}, "identical"),
    ({"prompt": "p", "responses": ["a", 3], "scores": [1, 2]}, "responses[1] must be a string"),
    ({"prompt": "p", "responses": "ab", "scores": [1, 2]}, "'responses' must be a list"),
    ({"responses": ["a", "b"], "scores": [1, 2]}, "missing 'prompt'"),
    ({"prompt": "p", "responses": ["a", "b"]}, "missing 'scores'"),
    ({"prompt": "p", "responses": ["a", "b"], "scores": [1, 2], "chosen": "a"}, "mixes a K-answer row"),
    ({"prompt": [{"role": "user", "content": "p"}], "responses": ["a", "b"], "scores": [1, 2]}, "mixes plain strings"),
    ([1, 2], "expected an object"),
]


def test_bad_rows_are_reported_by_row_and_skipped(tmp_path):
    records = [GOOD] + [rec for rec, _ in BAD] + [GOOD]
    path = write_jsonl(tmp_path / "k.jsonl", records)
    data = load_preferences(path)
    assert data.row_numbers == [1, len(records)]
    assert [i.row for i in data.issues] == list(range(2, len(BAD) + 2))
    for issue, (_, fragment) in zip(data.issues, BAD):
        assert fragment in issue.reason, (issue, fragment)
    out = write_bad_rows(tmp_path / "bad_rows.jsonl", [(data.source, data.issues)])
    listed = [json.loads(line) for line in out.read_text().splitlines()]
    assert [x["row"] for x in listed] == list(range(2, len(BAD) + 2))
    with pytest.raises(R.D.BadRowsError, match="malformed"):
        load_preferences(path, strict=True)


def test_chat_rows_are_accepted():
    msgs = [{"role": "user", "content": "hi"}]
    answers = [[{"role": "assistant", "content": t}] for t in ("x", "yy")]
    data = from_records([{"prompt": msgs, "responses": answers, "scores": [0, 1.5]}])
    assert data.rows[0]["responses"] == answers[::-1]


def test_listwise_rows_need_the_loss_k_and_a_single_best():
    recs = [
        {"prompt": "p", "responses": ["a", "b", "c"], "scores": [1, 2, 3]},
        {"prompt": "p", "responses": ["a", "b"], "scores": [1, 2]},
        {"prompt": "p", "responses": ["a", "b", "c"], "scores": [3, 3, 2]},
        {"prompt": "p", "responses": ["a", "b", "c"], "scores": [3, 1, 1]},
    ]
    kept = R.listwise_rows(from_records(recs), 3)
    assert kept.row_numbers == [1, 4]
    reasons = {i.row: i.reason for i in kept.issues}
    assert "2 responses; the loss is over y1…y3" in reasons[2]
    assert "no single best answer" in reasons[3]
    assert [t.row for t in kept.ties] == [4]  # a tie below the top is kept (and reported)
    with pytest.raises(DPALogicError, match="no row with 5 answers"):
        R.listwise_rows(from_records(recs), 5)


# --------------------------------------------------------------------------------------------------- pairs


def brute_pairs(s: list[float], mode: str) -> set[tuple[int, int]]:
    """Every (i, j) by the definitions: i preferred to j, and for adjacent no score strictly between them, for
    best-vs-rest i has the top score."""
    n = len(s)
    out = set()
    for i in range(n):
        for j in range(n):
            if not s[i] > s[j]:
                continue
            if mode == "adjacent" and any(s[i] > s[k] > s[j] for k in range(n)):
                continue
            if mode == "best-vs-rest" and s[i] != max(s):
                continue
            out.add((i, j))
    return out


@given(st.lists(st.integers(0, 4), min_size=2, max_size=9), st.sampled_from(R.PAIR_MODES))
def test_pairs_match_their_definitions(scores, mode):
    s = sorted(map(float, scores), reverse=True)
    got = R.pair_indices(s, mode)
    assert len(got) == len(set(got)) and set(got) == brute_pairs(s, mode)


def test_pair_counts_without_ties():
    s = [4.0, 3.0, 2.0, 1.0]
    assert len(R.pair_indices(s, "all")) == 6
    assert R.pair_indices(s, "adjacent") == [(0, 1), (1, 2), (2, 3)]
    assert R.pair_indices(s, "best-vs-rest") == [(0, 1), (0, 2), (0, 3)]
    with pytest.raises(DPALogicError, match="--pairs must be one of"):
        R.pair_indices(s, "every")


@given(
    st.lists(st.lists(st.integers(0, 3), min_size=2, max_size=5), min_size=1, max_size=6),
    st.sampled_from(R.PAIR_MODES),
    st.booleans(),
)
def test_to_pairs_and_the_easy_to_hard_curriculum(rows, mode, curriculum):
    recs = [{"prompt": f"p{n}", "responses": [f"r{i}" for i in range(len(s))], "scores": s} for n, s in enumerate(rows)]
    made = []  # brute force, row by row: (gap, row number, prompt, chosen, rejected)
    for n, rec in enumerate(recs, 1):
        for i, j in brute_pairs(rec["scores"], mode):
            made.append(
                (rec["scores"][i] - rec["scores"][j], n, rec["prompt"], rec["responses"][i], rec["responses"][j])
            )
    data = from_records(recs)
    if not made:
        with pytest.raises(DPALogicError, match="no row has two answers"):
            R.to_pairs(data, mode)
        return
    out = R.to_pairs(data, mode, "easy-to-hard" if curriculum else None)
    got = [
        (r["chosen_score"] - r["rejected_score"], n, r["prompt"], r["chosen"], r["rejected"])
        for r, n in zip(out.rows, out.row_numbers)
    ]
    assert sorted(got) == sorted(made)  # the same pairs, each with its row's number and scores
    if not curriculum:  # row by row
        assert [g[1] for g in got] == sorted(g[1] for g in got)
    else:  # gaps never grow; equal gaps keep the row order
        assert all(a[0] >= b[0] for a, b in zip(got, got[1:]))
        for a, b in zip(got, got[1:]):
            if a[0] == b[0]:
                assert a[1] <= b[1]
    all_tied = [n for n, s in enumerate(rows, 1) if len(set(s)) == 1]
    assert [i.row for i in out.issues] == all_tied


def test_to_pairs_rejects_an_unknown_curriculum():
    with pytest.raises(DPALogicError, match="--curriculum must be easy-to-hard"):
        R.to_pairs(from_records([GOOD]), "all", "hard-first")


# --------------------------------------------------------------------------------------------------- tokens


@given(st.text("0123456789 ab:", min_size=1, max_size=8), st.lists(st.text("xyz12", min_size=1, max_size=6),
       min_size=2, max_size=5, unique=True))  # fmt: skip
def test_tokenized_answers_follow_the_prompt(prompt, answers):
    row = {"prompt": prompt, "responses": answers, "scores": list(range(len(answers)))}
    p, ids = R.tokenize_answers(TOK, row)
    for a, got in zip(answers, ids):
        full = TOK(prompt + a)["input_ids"]
        assert p + got == full + [TOK.eos_token_id]
    c, r = tokenize_pair(TOK, {"prompt": prompt, "chosen": answers[0], "rejected": answers[1]})[1:]
    assert ids[:2] == [c, r]  # the same tokens as a pair of the two answers


def test_tokenize_ranked_truncates_and_drops_like_pairs():
    recs = [
        {"prompt": "sort 123:", "responses": ["123", "213", "2313131313"], "scores": [3, 2, 1]},
        {"prompt": "x" * 40, "responses": ["a", "b"], "scores": [1, 0]},
    ]
    tok = R.tokenize_ranked(from_records(recs), TOK, max_length=16, max_prompt_length=8)
    assert tok.truncated == 2 and not tok.issues
    ex = tok.examples[0]
    assert len(ex.prompt_ids) == 8 and all(len(ex.prompt_ids) + len(a) <= 16 for a in ex.answer_ids)
    assert ex.scores == (3.0, 2.0, 1.0) and [e.row for e in tok.examples] == [1, 2]
    with pytest.raises(DPALogicError, match="max_prompt_length"):
        R.tokenize_ranked(from_records(recs), TOK, max_length=8, max_prompt_length=8)


# --------------------------------------------------------------------------------------------------- margins


@given(
    st.lists(st.lists(st.integers(-4, 4), min_size=3, max_size=3, unique=True), min_size=1, max_size=5),
    st.lists(st.one_of(st.none(), st.floats(-3, 3), st.just("x"), st.just("0.5")), min_size=5, max_size=5),
    st.floats(0.25, 4),
)
def test_list_margins_from_the_row_or_the_top_two_scores(scores, margins, scale):
    recs = []
    for n, s in enumerate(scores):
        rec = {"prompt": f"p{n}", "responses": ["a", "b", "c"], "scores": s}
        if margins[n] is not None:
            rec["margin"] = margins[n]
        recs.append(rec)
    data = R.listwise_rows(from_records(recs), 3)
    # --margin-from scores: the best score minus the runner-up's, read off the file's unsorted row
    got = R.list_margins(data, "scores", scale)
    top = [sorted(s, reverse=True)[:2] for s in scores]
    assert [r[PAIR_MARGIN] for r in got.rows] == [pytest.approx(scale * (a - b)) for a, b in top]
    assert all(r[PAIR_MARGIN] > 0 for r in got.rows)  # the best answer is unique
    # --margin-from margin: the row's field (a number, or CSV-style text of one); anything else is a bad row
    usable = {n: float(m) for n, m in enumerate(margins[: len(scores)], 1) if m is not None and m != "x"}
    if not usable:
        with pytest.raises(DPALogicError, match="no row with a usable margin"):
            R.list_margins(data, "margin", scale)
        return
    got = R.list_margins(data, "margin", scale)
    assert got.row_numbers == sorted(usable)
    assert [r[PAIR_MARGIN] for r in got.rows] == [pytest.approx(scale * usable[n]) for n in got.row_numbers]
    reasons = {i.row: i.reason for i in got.issues}
    for n, m in enumerate(margins[: len(scores)], 1):
        if m is None:
            assert reasons[n] == "missing 'margin' (--margin-from margin)"
        elif m == "x":
            assert "'margin' must be a finite number" in reasons[n]
    assert all(PAIR_MARGIN not in r for r in data.rows)  # the margins are the run's: the rows are left as they were


def test_margins_reach_the_tokenized_rows_and_lists_are_counted_as_lists():
    recs = [{"prompt": "p", "responses": ["a", "b", "c"], "scores": [1, 3, 2], "margin": 0.5}]
    data = R.list_margins(R.listwise_rows(from_records(recs), 3), "margin", 2.0)
    tok = R.tokenize_ranked(data, TOK)
    assert tok.examples[0].margin == 1.0
    assert tok.summary() == "  1 list tokenized"
    assert R.tokenize_ranked(from_records(recs * 2), TOK).summary() == "  2 lists tokenized"
    assert R.tokenize_ranked(R.listwise_rows(from_records(recs), 3), TOK).examples[0].margin is None
