"""Token weights (issue #15 item 2): an atom's log-weight ``Σ_t w_t log π(y_t)``, from spans of the answer's text.

References: token-by-token loops in plain Python, finite differences (gradcheck in float64), the fused loss against
logits → weighted log-probs → PreferenceLoss, and span weights computed by hand from a word-level tokenizer's tokens.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dpalogic import DPALogicError, FusedLinearPreferenceLoss, PreferenceLoss
from dpalogic.runtime.token_weights import weighted_sequence_logps
from dpalogic.training.annotations import annotate, span_token_weights
from dpalogic.training.data import IGNORE_INDEX, collate, from_records, tokenize_rows
from dpalogic.training.model import build_char_tokenizer, fingerprint, sequence_logps
from dpalogic.training.steps import answer_lengths


def loop_logps(logits, labels, weights):
    """Σ_t w_t log softmax(logits[n, t])[labels[n, t]] one token at a time, in Python floats."""
    out, lens = [], []
    for n in range(labels.shape[0]):
        total = length = 0.0
        for t in range(labels.shape[1]):
            if int(labels[n, t]) == IGNORE_INDEX:
                continue
            row = [float(x) for x in logits[n, t]]
            mx = max(row)
            lse = mx + math.log(sum(math.exp(x - mx) for x in row))
            w = 1.0 if weights is None else float(weights[n, t])
            total += w * (row[int(labels[n, t])] - lse)
            length += w
        out.append(total)
        lens.append(length)
    return torch.tensor(out, dtype=torch.float64), torch.tensor(lens, dtype=torch.float64)


def random_batch(N, T, V, seed, ignore=0.3):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(N, T, V, generator=g, dtype=torch.float64) * 3
    labels = torch.randint(0, V, (N, T), generator=g)
    labels[torch.rand(N, T, generator=g) < ignore] = IGNORE_INDEX
    weights = torch.rand(N, T, generator=g, dtype=torch.float64) * 2
    weights[torch.rand(N, T, generator=g) < 0.2] = 0.0  # masked tokens
    return logits, labels, weights


# --------------------------------------------------------------------------------------------------- log-probs


@settings(max_examples=25, deadline=None)
@given(N=st.integers(1, 4), T=st.integers(1, 6), V=st.integers(1, 7), seed=st.integers(0, 1000))
def test_weighted_logps_match_a_token_loop(N, T, V, seed):
    logits, labels, weights = random_batch(N, T, V, seed)
    got, lens = weighted_sequence_logps(logits, labels, weights)
    want, want_lens = loop_logps(logits, labels, weights)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(lens, want_lens, rtol=1e-12, atol=1e-12)
    plain, counts = weighted_sequence_logps(logits, labels)
    torch.testing.assert_close(plain, loop_logps(logits, labels, None)[0], rtol=1e-12, atol=1e-12)
    assert counts.tolist() == (labels != IGNORE_INDEX).sum(1).double().tolist()


def test_weighted_logps_gradients_match_finite_differences():
    logits, labels, weights = random_batch(3, 4, 5, seed=2)
    x = logits.clone().requires_grad_()
    assert torch.autograd.gradcheck(lambda z: weighted_sequence_logps(z, labels, weights)[0], (x,))


def test_training_log_probs_are_weighted_after_the_causal_shift():
    logits, labels, weights = random_batch(2, 6, 5, seed=3)
    got = sequence_logps(logits, labels, weights)
    want = loop_logps(logits[:, :-1], labels[:, 1:], weights[:, 1:])[0]
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)  # sequence_logps computes in float32
    ones = torch.ones_like(weights)
    torch.testing.assert_close(sequence_logps(logits, labels, ones), sequence_logps(logits, labels))


@pytest.mark.parametrize(
    "weights,fragment",
    [(torch.full((2, 3), -0.5), "negative"), (torch.full((2, 3), math.nan), "NaN"), (torch.ones(2, 4), "shape")],
)
def test_bad_token_weights_are_refused(weights, fragment):
    with pytest.raises(DPALogicError, match=fragment):
        weighted_sequence_logps(torch.zeros(2, 3, 4), torch.zeros(2, 3, dtype=torch.long), weights)


# --------------------------------------------------------------------------------------------------- the fused loss


def fused_case(B=3, T=5, H=4, V=9, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(2 * B, T, H, generator=g, dtype=torch.float64)
    weight = torch.randn(V, H, generator=g, dtype=torch.float64)
    bias = torch.randn(V, generator=g, dtype=torch.float64)
    labels = torch.randint(0, V, (2 * B, T), generator=g)
    labels[:, :2] = IGNORE_INDEX
    tw = torch.rand(2 * B, T, generator=g, dtype=torch.float64) * 1.5
    tw[0, T - 1] = 0.0  # a masked token
    return hidden, weight, bias, labels, tw


@pytest.mark.parametrize("name", ["dpo", "simpo", "ipo", "cpo", "orpo"])
@pytest.mark.parametrize("max_tokens", [None, 7])  # 7 rows: the two-pass path over slices
def test_fused_token_weights_match_weighted_logps_and_preference_loss(name, max_tokens):
    hidden, weight, bias, labels, tw = fused_case()
    B = hidden.shape[0] // 2
    leaves = [t.clone().requires_grad_() for t in (hidden, weight, bias)]
    ref_hidden = hidden.flip(0) * 0.5
    fused = FusedLinearPreferenceLoss(name, chunk_size=2, max_chunk_tokens=max_tokens)
    loss, metrics = fused(leaves[0], leaves[1], labels, leaves[2], ref_hidden=ref_hidden, token_weights=tw)
    grads = torch.autograd.grad(loss, leaves)

    plain = [t.clone().requires_grad_() for t in (hidden, weight, bias)]
    lp, lens = weighted_sequence_logps(plain[0] @ plain[1].t() + plain[2], labels, tw)
    with torch.no_grad():
        ref, _ = weighted_sequence_logps(ref_hidden @ weight.t() + bias, labels, tw)
    want = PreferenceLoss(name)(lp[:B], lp[B:], ref[:B], ref[B:], lens[:B], lens[B:])
    want_grads = torch.autograd.grad(want, plain)
    torch.testing.assert_close(loss, want, rtol=1e-12, atol=1e-12)
    for a, b in zip(grads, want_grads):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(metrics["chosen_lengths"], lens[:B])


def test_fused_gradients_with_token_weights_match_finite_differences():
    hidden, weight, bias, labels, tw = fused_case(B=2, T=3, H=3, V=5, seed=4)
    margin = torch.tensor([0.3, -0.7], dtype=torch.float64)
    fused = FusedLinearPreferenceLoss("simpo", beta=2.0)

    def f(h, w):
        return fused(h, w, labels, bias, token_weights=tw, margin=margin)[0]

    assert torch.autograd.gradcheck(f, (hidden.requires_grad_(), weight.requires_grad_()))


def test_unit_token_weights_change_nothing_in_the_fused_loss():
    hidden, weight, bias, labels, _ = fused_case(seed=6)
    fused = FusedLinearPreferenceLoss("cpo")
    a, _ = fused(hidden, weight, labels, bias)
    b, _ = fused(hidden, weight, labels, bias, token_weights=torch.ones(labels.shape, dtype=torch.float64))
    torch.testing.assert_close(a, b, rtol=1e-14, atol=1e-14)


def test_fused_triton_kernels_take_token_weights(monkeypatch):
    pytest.importorskip("triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    hidden, weight, bias, labels, tw = fused_case(B=2, T=3, H=4, V=6, seed=8)
    out = {}
    for backend in ("triton", "torch"):
        h = hidden.float().clone().requires_grad_()
        fused = FusedLinearPreferenceLoss("simpo", backend=backend)
        loss, _ = fused(h, weight.float(), labels, bias.float(), token_weights=tw.float())
        out[backend] = (loss.detach(), torch.autograd.grad(loss, [h])[0])
    torch.testing.assert_close(out["triton"][0], out["torch"][0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out["triton"][1], out["torch"][1], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "kw,fragment",
    [
        ({"token_weights": -torch.ones(6, 5, dtype=torch.float64)}, "negative"),
        ({"token_weights": torch.ones(6, 4, dtype=torch.float64)}, "shape"),
        ({"token_weights": torch.ones(6, 5, dtype=torch.long)}, "floating-point"),
        ({"margin": torch.zeros(2, dtype=torch.float64)}, "shape"),
    ],
)
def test_fused_refuses_bad_weights_and_margins(kw, fragment):
    hidden, weight, bias, labels, _ = fused_case()
    with pytest.raises(DPALogicError, match=fragment):
        FusedLinearPreferenceLoss("simpo")(hidden, weight, labels, bias, **kw)


# --------------------------------------------------------------------------------------------------- spans


def word_tokenizer():
    """A real fast tokenizer whose tokens are whole words (and single punctuation marks), with offsets."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<pad>", "<s>", "</s>", "<unk>", "The", "sky", "is", "green", "blue", ".", "Paris", "capital", "Q", ":"]
    tk = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=tk, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )


def test_spans_become_the_weights_of_the_tokens_they_cover():
    tok = word_tokenizer()
    #        0123456789012345678901234567
    answer = "The sky is green. Paris is."
    row = {
        "prompt": "Q: ",
        "chosen": answer,
        "rejected": "The sky is blue.",
        # "sky is gre" covers 'sky' and 'is' whole and 3 of the 5 characters of 'green' → all three get 0
        "chosen_spans": [[4, 14, 0.0], [18, 23, 2.5], [14, 16, 0.7]],
        "rejected_spans": [[0, 3, 0.5]],
    }
    rows = annotate(from_records([row]), None)
    data = tokenize_rows(rows, tok, max_length=None, max_prompt_length=None)
    ex = data.examples[0]
    words = [tok.convert_ids_to_tokens(i) for i in ex.chosen_ids]
    assert words == ["The", "sky", "is", "green", ".", "Paris", "is", ".", "</s>"]
    # 'green' (10..15) overlaps [4, 14) by 4 characters and [14, 16) by 1: the larger overlap wins
    assert ex.chosen_weights == (1.0, 0.0, 0.0, 0.0, 1.0, 2.5, 1.0, 1.0, 1.0)
    assert ex.rejected_weights == (0.5, 1.0, 1.0, 1.0, 1.0, 1.0)
    batch = collate(data.examples, 0)
    P = len(ex.prompt_ids)
    w = batch["token_weights"]
    assert w[0, P : P + 9].tolist() == list(ex.chosen_weights) and w[1, P : P + 6].tolist() == list(ex.rejected_weights)
    # every labelled position has its weight; the lengths a normalized term uses are the weight sums
    lc, lr = answer_lengths(batch)
    assert lc.tolist() == [sum(ex.chosen_weights)] and lr.tolist() == [sum(ex.rejected_weights)]


def test_outside_span_weight_and_a_mask_over_one_sentence():
    tok = build_char_tokenizer()  # one token per character
    row = {
        "prompt": "Q:",
        "chosen": "ab. cd.",
        "rejected": "xy",
        "chosen_spans": [[4, 7, 1.0]],  # SparsePO-style: only "cd." kept
        "outside_span_weight": 0,
        "rejected_spans": [[1, 2, 1.0]],  # the row's outside weight holds for both answers
    }
    ex = tokenize_rows(annotate(from_records([row]), None), tok).examples[0]
    assert ex.chosen_weights == (0, 0, 0, 0, 1, 1, 1, 0)  # the appended </s> is outside every span
    assert ex.rejected_weights == (0, 1, 0)


def test_spans_on_a_one_message_chat_answer():
    tok = build_char_tokenizer()
    row = {
        "prompt": [{"role": "user", "content": "hi"}],
        "chosen": [{"role": "assistant", "content": "ok fine"}],
        "rejected": [{"role": "assistant", "content": "no"}],
        "chosen_spans": [[3, 7, 0.25]],
    }
    ex = tokenize_rows(annotate(from_records([row]), None), tok).examples[0]
    text = [tok.convert_ids_to_tokens(i) for i in ex.chosen_ids]
    assert text[:7] == list("ok fine")
    assert ex.chosen_weights == (1, 1, 1, 0.25, 0.25, 0.25, 0.25) + (1,) * (len(text) - 7)
    assert ex.rejected_weights is None


def test_truncation_cuts_the_weights_with_the_tokens():
    tok = build_char_tokenizer()
    row = {"prompt": "Q", "chosen": "abcdef", "rejected": "uvwxyz", "chosen_spans": [[1, 2, 3.0]]}
    ex = tokenize_rows(annotate(from_records([row]), None), tok, max_length=5, max_prompt_length=2).examples[0]
    assert len(ex.chosen_ids) == 3 and ex.chosen_weights == (1.0, 3.0, 1.0)


BAD = [
    ({"chosen_spans": [[0, 9, 1]]}, "outside the answer's 3 characters"),
    ({"chosen_spans": [[2, 1, 1]]}, "reversed"),
    ({"chosen_spans": [[0, 1, "x"]]}, "weight must be a number"),
    ({"chosen_spans": [[0, 1, -1]]}, "weight must be a number >= 0"),
    ({"chosen_spans": [[0.5, 1, 1]]}, "integer character offsets"),
    ({"chosen_spans": [[0, 1]]}, "must be [start, end, weight]"),
    ({"rejected_spans": "not json"}, "not a JSON list"),
    ({"chosen_spans": {"a": 1}}, "must be a list"),
    ({"outside_span_weight": "heavy"}, "outside_span_weight"),
]


def test_bad_spans_are_bad_rows_reported_by_number():
    good = {"prompt": "p", "chosen": "abc", "rejected": "xyz"}
    records = [dict(good, chosen_spans=[[0, 3, 0.5]])] + [dict(good, **extra) for extra, _ in BAD]
    data = annotate(from_records(records), None)
    assert data.row_numbers == [1]
    reasons = {i.row: i.reason for i in data.issues}
    for k, (_, fragment) in enumerate(BAD, start=2):
        assert fragment in reasons[k], (k, reasons[k])


def test_spans_need_an_answer_text_to_index():
    rows = from_records(
        [
            {
                "prompt": [{"role": "user", "content": "q"}],
                "chosen": [{"role": "assistant", "content": "a"}, {"role": "user", "content": "b"}],
                "rejected": [{"role": "assistant", "content": "c"}],
                "chosen_spans": [[0, 1, 0]],
            }
        ]
    )
    with pytest.raises(DPALogicError, match="one message") as info:
        annotate(rows, None)
    assert "row 1" in str(info.value)


def test_span_weights_enter_the_reference_cache_fingerprint():
    tok = build_char_tokenizer()
    base = {"prompt": "Q", "chosen": "abc", "rejected": "xyz"}
    plain = tokenize_rows(from_records([base]), tok).examples
    weighted = tokenize_rows(annotate(from_records([dict(base, chosen_spans=[[0, 1, 0]])]), None), tok).examples
    model = torch.nn.Linear(2, 2)
    assert fingerprint(model, plain) != fingerprint(model, weighted)
    assert span_token_weights(tok, base, 1, ([5], [6])) == (None, None)
