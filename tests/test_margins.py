"""Per-example margins (issue #15 item 1): ``z = β·log ρ − γ − m_i`` in every preference term.

References: the closed forms of DPO and robust DPO written out by hand; for every catalog program, the same program
with a per-example γ (its shift made ``γ + m`` as a hyperparameter, evaluated pair by pair); finite differences; the
data path against the rows' own numbers.
"""

from __future__ import annotations

import json
import math
from dataclasses import replace

import pytest
import sympy
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from dpalogic import DPALogicError, FusedLinearPreferenceLoss, PreferenceLoss
from dpalogic.cli import main as cli_main
from dpalogic.semantics.catalog import entries, pair_names
from dpalogic.training.annotations import PAIR_MARGIN, annotate, row_margin
from dpalogic.training.config import TrainConfig
from dpalogic.training.data import from_records

HP = {"label_smoothing": 0.1, "alpha": 0.7, "gamma": 0.3, "beta": 0.2, "discopop_tau": 0.05}
# pair losses (the calls below pass chosen/rejected); TPO's margin over y1 … y3 is checked in test_tpo.py
SHIFTABLE = sorted(
    n for n in pair_names() if any(t.role in ("preference", "smoothing") for t in entries()[n].program.terms)
)


def hp_for(name: str) -> dict[str, float]:
    hp = {k: v for k, v in HP.items() if k in entries()[name].program.defaults}
    if name == "exo_pair":
        hp["label_smoothing"] = 1e-3
    return hp


def pair_inputs(B: int, seed: int, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    lp = {k: (-torch.rand(B, generator=g, dtype=torch.float64) * 6).to(dtype) for k in ("c", "r", "rc", "rr")}
    lens = {k: torch.randint(1, 30, (B,), generator=g) for k in ("c", "r")}
    margin = (torch.randn(B, generator=g, dtype=torch.float64) * 2).to(dtype)
    return lp, lens, margin


def with_per_example_gamma(program):
    """The program with a hyperparameter ``mm`` added to every preference term's shift γ (subtracted from a smoothing
    term's: it is the preference term reversed, z → −z) — the margin as the existing γ path computes it."""
    mm = sympy.Symbol("mm")
    sign = {"preference": 1, "smoothing": -1}
    terms = tuple(replace(t, shift=t.shift + sign.get(t.role, 0) * mm) for t in program.terms)
    return replace(program, terms=terms, hyperparameters=(*program.hyperparameters, ("mm", 0.0)))


def call(fn, lp, lens, **kw):
    return fn(lp["c"], lp["r"], lp["rc"], lp["rr"], lens["c"], lens["r"], **kw)


# --------------------------------------------------------------------------------------------------- PreferenceLoss


@pytest.mark.parametrize("name", SHIFTABLE)
def test_margin_is_a_per_example_gamma_in_every_catalog_program(name):
    lp, lens, margin = pair_inputs(6, seed=1)
    hp = hp_for(name)
    got = call(PreferenceLoss(name, reduction="none", backend="torch", **hp), lp, lens, margin=margin)
    shifted = with_per_example_gamma(entries()[name].program)
    for i in range(6):
        one = {k: v[i : i + 1] for k, v in lp.items()}
        one_len = {k: v[i : i + 1] for k, v in lens.items()}
        want = call(PreferenceLoss(shifted, reduction="none", backend="torch", **hp, mm=float(margin[i])), one, one_len)
        torch.testing.assert_close(got[i : i + 1], want, rtol=1e-12, atol=1e-12)


@settings(max_examples=60, deadline=None)
@given(
    beta=st.floats(0.01, 5.0),
    seed=st.integers(0, 10_000),
    scale=st.floats(0.0, 30.0),
)
def test_dpo_margin_matches_the_closed_form(beta, seed, scale):
    lp, _, margin = pair_inputs(5, seed)
    margin = margin * scale
    leaves = {k: v.clone().requires_grad_() for k, v in lp.items()}
    got = PreferenceLoss("dpo", beta=beta, reduction="none")(
        leaves["c"], leaves["r"], leaves["rc"], leaves["rr"], margin=margin
    )
    h = (lp["c"] - lp["rc"]) - (lp["r"] - lp["rr"])
    want = -F.logsigmoid(beta * h - margin)
    torch.testing.assert_close(got.detach(), want, rtol=1e-10, atol=1e-12)
    # d/d log π(yw) of −log σ(βh − m) is −β σ(−(βh − m))
    (g,) = torch.autograd.grad(got.sum(), [leaves["c"]])
    torch.testing.assert_close(g, -beta * torch.sigmoid(-(beta * h - margin)), rtol=1e-10, atol=1e-12)


def test_robust_dpo_margin_shifts_both_terms_as_a_label_noise_model_says():
    """Robust DPO: [(1−ε)·ℓ(βh − m) − ε·ℓ(−(βh − m))] / (1 − 2ε), with ℓ(u) = −log σ(u): the margin moves the
    preference's logit, and the smoothing term is the same logit reversed."""
    lp, _, margin = pair_inputs(7, seed=4)
    beta, eps = 0.3, 0.2
    got = PreferenceLoss("robust", beta=beta, label_smoothing=eps, reduction="none")(
        lp["c"], lp["r"], lp["rc"], lp["rr"], margin=margin
    )
    u = beta * ((lp["c"] - lp["rc"]) - (lp["r"] - lp["rr"])) - margin
    want = ((1 - eps) * -F.logsigmoid(u) - eps * -F.logsigmoid(-u)) / (1 - 2 * eps)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def test_margin_gradients_match_finite_differences_and_margin_gets_none():
    lp, lens, margin = pair_inputs(4, seed=7)
    fn = PreferenceLoss("simpo", beta=2.0, gamma=0.4, label_smoothing=0.1, reduction="sum")
    m = margin.clone().requires_grad_()  # a margin that asks for a gradient is data all the same

    def f(c, r):
        return fn(c, r, chosen_lengths=lens["c"], rejected_lengths=lens["r"], margin=m)

    assert torch.autograd.gradcheck(f, (lp["c"].clone().requires_grad_(), lp["r"].clone().requires_grad_()))
    f(lp["c"].clone().requires_grad_(), lp["r"]).backward()
    assert m.grad is None


def test_zero_margin_is_no_margin_and_float32_margins_work():
    lp, lens, _ = pair_inputs(9, seed=2, dtype=torch.float32)
    fn = PreferenceLoss("cpo", reduction="none")
    zero = torch.zeros(9)
    torch.testing.assert_close(call(fn, lp, lens, margin=zero), call(fn, lp, lens), rtol=0, atol=0)
    m64 = torch.linspace(-1, 1, 9, dtype=torch.float64)
    assert call(fn, lp, lens, margin=m64).dtype == torch.float32


@pytest.mark.parametrize(
    "margin,fragment",
    [
        (torch.zeros(3), "shape"),
        (torch.zeros(5, dtype=torch.long), "floating point"),
        (torch.tensor([0.0, math.nan, 0, 0, 0]), "NaN"),
        ([0.0] * 5, "torch.Tensor"),
    ],
)
def test_bad_margins_are_refused(margin, fragment):
    lp, lens, _ = pair_inputs(5, seed=0)
    with pytest.raises(DPALogicError, match=fragment):
        call(PreferenceLoss("dpo"), lp, lens, margin=margin)


def test_a_loss_with_no_preference_term_refuses_a_margin():
    nll_only = replace(
        entries()["sft"].program, terms=tuple(replace(t, role="nll") for t in entries()["sft"].program.terms)
    )
    with pytest.raises(DPALogicError, match="no preference term"):
        PreferenceLoss(nll_only)(torch.tensor([-1.0]), margin=torch.tensor([0.5]))


@pytest.mark.parametrize("name", ["dpo", "simpo", "ipo", "cpo"])
def test_triton_kernel_applies_the_margin_as_the_twin_does(name, monkeypatch):
    pytest.importorskip("triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    lp, lens, margin = pair_inputs(13, seed=5)
    out = {}
    for backend in ("triton", "torch"):
        leaves = {k: v.clone().requires_grad_() for k, v in lp.items()}
        fn = PreferenceLoss(name, reduction="none", backend=backend, **hp_for(name))
        loss = call(fn, leaves, lens, margin=margin)
        out[backend] = (loss.detach(), torch.autograd.grad(loss.sum(), [leaves["c"], leaves["r"]]))
    (l1, g1), (l2, g2) = out["triton"], out["torch"]
    # the kernel's float arguments (hyperparameters) are float32, hence the tolerance
    torch.testing.assert_close(l1, l2, rtol=1e-6, atol=1e-7)
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_fused_loss_takes_margins_like_preference_loss():
    torch.manual_seed(0)
    B, T, H, V = 3, 4, 5, 11
    hidden = torch.randn(2 * B, T, H, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(V, H, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, V, (2 * B, T))
    labels[:, :1] = -100
    rc, rr = -torch.rand(B, dtype=torch.float64) * 4, -torch.rand(B, dtype=torch.float64) * 4
    margin = torch.tensor([0.5, -2.0, 3.0], dtype=torch.float64)
    loss, _ = FusedLinearPreferenceLoss("dpo", beta=0.5, chunk_size=2)(
        hidden, weight, labels, ref_chosen_logps=rc, ref_rejected_logps=rr, margin=margin
    )
    logp = torch.log_softmax(hidden @ weight.t(), -1).gather(2, labels.clamp(min=0)[..., None])[..., 0]
    seq = (logp * (labels != -100)).sum(1)
    want = -F.logsigmoid(0.5 * ((seq[:B] - rc) - (seq[B:] - rr)) - margin).mean()
    torch.testing.assert_close(loss, want, rtol=1e-12, atol=1e-12)
    g = torch.autograd.grad(loss, [hidden, weight])
    g_want = torch.autograd.grad(want, [hidden, weight])
    for a, b in zip(g, g_want):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


# --------------------------------------------------------------------------------------------------- data


ROWS = [
    {"prompt": "p", "chosen": "a", "rejected": "b", "margin": 1.5, "chosen_score": 9, "rejected_score": 2},
    {"prompt": "p", "chosen": "a", "rejected": "b", "margin": "0.25", "chosen_score": "1e1", "rejected_score": "3"},
    {"prompt": "p", "chosen": "a", "rejected": "b"},  # no margin, no scores
    {"prompt": "p", "chosen": "a", "rejected": "b", "margin": "abc", "chosen_score": True, "rejected_score": 1},
    {"prompt": "p", "chosen": "a", "rejected": "b", "margin": math.inf, "chosen_score": 1, "rejected_score": math.nan},
]


def test_margins_from_rows_and_from_scores():
    rows = from_records(ROWS)
    got = annotate(rows, "margin", scale=2.0)
    assert [r[PAIR_MARGIN] for r in got.rows] == [3.0, 0.5]
    assert {i.row for i in got.issues} == {3, 4, 5}
    got = annotate(from_records(ROWS), "scores", scale=0.5)
    assert [r[PAIR_MARGIN] for r in got.rows] == [0.5 * (9 - 2), 0.5 * (10 - 3)]
    reasons = {i.row: i.reason for i in got.issues}
    assert "missing 'chosen_score'" in reasons[3]
    assert "'chosen_score' must be a finite number" in reasons[4]  # a boolean is not a score
    assert "'rejected_score' must be a finite number" in reasons[5]
    assert annotate(from_records(ROWS), None).rows[0].get(PAIR_MARGIN) is None  # no --margin-from: no margins


@settings(max_examples=50, deadline=None)
@given(c=st.floats(-1e6, 1e6), r=st.floats(-1e6, 1e6), s=st.floats(-10, 10))
def test_row_margin_is_scale_times_the_score_difference(c, r, s):
    m, why = row_margin({"chosen_score": c, "rejected_score": r}, "scores", s)
    assert why is None and m == s * (c - r)


def test_strict_data_makes_a_bad_margin_fatal():
    from dpalogic.training.data import BadRowsError

    with pytest.raises(BadRowsError, match="row 3"):
        annotate(from_records(ROWS), "margin", strict=True)


def test_margin_from_is_checked_by_the_config():
    with pytest.raises(DPALogicError, match="margin_from must be margin or scores"):
        TrainConfig(margin_from="rewards").validate()
    with pytest.raises(DPALogicError, match="no structure, or only likelihood terms"):
        TrainConfig(loss="kto", margin_from="margin").validate()
    TrainConfig(loss="simpo", margin_from="scores", margin_scale=0.1).validate()


def test_dry_run_lists_rows_without_a_margin(tmp_path, capsys):
    data = tmp_path / "prefs.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in ROWS) + "\n")
    rc = cli_main(["train", "--data", str(data), "--margin-from", "scores", "--batch-size", "2", "--dry-run"])
    assert rc == 0
    err = capsys.readouterr().err
    assert "2 rows used, 3 skipped" in err and "row 3: missing 'chosen_score'" in err


def test_the_training_step_uses_the_batch_margins(tmp_path):
    """PairForward's per-pair losses equal the loss computed from the same log-probs with the rows' margins."""
    from dpalogic.training.data import collate, tokenize_rows
    from dpalogic.training.model import build_char_tokenizer, build_tiny_model, sequence_logps
    from dpalogic.training.steps import PairForward

    class Acc:
        device = torch.device("cpu")

        @staticmethod
        def autocast():
            from contextlib import nullcontext

            return nullcontext()

    tok = build_char_tokenizer()
    rows = annotate(from_records(ROWS[:2]), "scores", scale=0.3)
    data = tokenize_rows(rows, tok, max_length=32, max_prompt_length=8)
    batch = collate(data.examples, 0)
    torch.testing.assert_close(batch["margin"], torch.tensor([0.3 * 7, 0.3 * 7]))
    model = build_tiny_model(tok)
    loss_fn = PreferenceLoss("simpo", beta=2.0, gamma=0.5, reduction="none")
    fwd = PairForward(loss_fn, None, model, None, False, Acc(), 0)
    with torch.no_grad():
        per, c, r, _, _ = fwd.pair_losses(lambda i, a: model(input_ids=i, attention_mask=a).logits, batch, None)
        lp = sequence_logps(model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits,
                            batch["labels"])  # fmt: skip
    n_c, n_r = batch["chosen_lengths"].double(), batch["rejected_lengths"].double()
    z = 2.0 * (lp[:2].double() / n_c - lp[2:].double() / n_r) - 0.5 - batch["margin"].double()
    torch.testing.assert_close(per.double(), -F.logsigmoid(z), rtol=1e-5, atol=1e-6)
