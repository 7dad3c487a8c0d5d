"""FusedLinearPreferenceLoss against a plain full-logits reference (values and gradients of hidden, weight, bias),
and against Liger-Kernel's own fused linear DPO/ORPO/SimPO/CPO losses (compiled=False, called as a library)."""

from __future__ import annotations

import pytest
import sympy
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dpalogic import DPALogicError, FusedLinearPreferenceLoss, PreferenceLoss, Program, Structure, Term
from dpalogic.language.syntax import Atom
from dpalogic.logic.structure import full_mask
from dpalogic.semantics.catalog import entries, pair_names


def make(B=3, T=47, H=31, V=123, seed=0, dtype=torch.float64, bias=True, ignore_frac=0.3, ref=True):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(2 * B, T, H, generator=g, dtype=torch.float64).to(dtype)
    weight = (torch.randn(V, H, generator=g, dtype=torch.float64) / H**0.5).to(dtype)
    b = (torch.randn(V, generator=g, dtype=torch.float64) * 0.1).to(dtype) if bias else None
    labels = torch.randint(0, V, (2 * B, T), generator=g)
    labels[torch.rand(2 * B, T, generator=g) < ignore_frac] = -100
    labels[:, :3] = -100  # a "prompt"
    extra = {}
    if ref:
        extra["ref_hidden"] = hidden + 0.1 * torch.randn(2 * B, T, H, generator=g, dtype=torch.float64).to(dtype)
        extra["ref_weight"] = weight + 0.05 * torch.randn(V, H, generator=g, dtype=torch.float64).to(dtype)
    return hidden, weight, b, labels, extra


def full_logits_reference(
    spec, hidden, weight, bias, labels, ref_hidden=None, ref_weight=None, ignore_index=-100, **hp
):
    """Plain PyTorch: materialize all logits, log_softmax, gather, sum per sequence, PreferenceLoss, autograd."""

    def seq_logps(h, w, b):
        logits = h @ w.t()
        if b is not None:
            logits = logits + b
        lp = F.log_softmax(logits.double(), dim=-1)
        valid = labels != ignore_index
        tok = lp.gather(-1, torch.where(valid, labels, 0)[..., None]).squeeze(-1)
        return (tok * valid).sum(-1), valid.sum(-1)

    B = hidden.shape[0] // 2
    lp, n = seq_logps(hidden, weight, bias)
    ref_c = ref_r = None
    if ref_hidden is not None:
        with torch.no_grad():
            ref, _ = seq_logps(ref_hidden, ref_weight, None)
        ref_c, ref_r = ref[:B], ref[B:]
    return PreferenceLoss(spec, **hp)(lp[:B], lp[B:], ref_c, ref_r, chosen_lengths=n[:B], rejected_lengths=n[B:])


def run_both(spec, data, chunk_size=1, hp=None, atol=1e-9, max_chunk_tokens=None):
    hp = hp or {}
    hidden, weight, bias, labels, extra = data
    leaves = [t.clone().requires_grad_() for t in (hidden, weight) + ((bias,) if bias is not None else ())]
    ref_leaves = [t.clone().requires_grad_() for t in (hidden, weight) + ((bias,) if bias is not None else ())]
    fused = FusedLinearPreferenceLoss(spec, chunk_size=chunk_size, max_chunk_tokens=max_chunk_tokens, **hp)
    b = leaves[2] if bias is not None else None
    loss, metrics = fused(leaves[0], leaves[1], labels, b, **extra)
    loss.backward()
    rb = ref_leaves[2] if bias is not None else None
    want = full_logits_reference(spec, ref_leaves[0], ref_leaves[1], rb, labels, **extra, **hp)
    want.backward()
    return loss, want, leaves, ref_leaves, metrics


# every catalog loss (NLL terms, length normalization, reference models, smoothing) through the fused path
@pytest.mark.parametrize("name", sorted(pair_names()))
def test_fused_matches_full_logits_reference(name):
    hp = {"label_smoothing": 0.1} if "label_smoothing" in entries()[name].program.defaults else {}
    if name == "exo_pair":
        hp = {"label_smoothing": 1e-3}
    data = make(B=3, T=47, H=31, V=123, seed=1)
    loss, want, leaves, ref_leaves, _ = run_both(name, data, chunk_size=2, hp=hp)
    assert loss.item() == pytest.approx(want.item(), rel=1e-9, abs=1e-12)
    for got, exp, what in zip((x.grad for x in leaves), (x.grad for x in ref_leaves), ("hidden", "weight", "bias")):
        torch.testing.assert_close(got, exp, rtol=1e-7, atol=1e-10, msg=what)


@pytest.mark.parametrize("chunk_size", [1, 2, 5])
def test_chunk_sizes_and_all_ignored_rows(chunk_size):
    data = make(B=4, T=9, H=8, V=50, seed=2)
    hidden, weight, bias, labels, extra = data
    labels[1] = -100  # a chosen answer with no tokens at all
    labels[4 + 2] = -100  # and a rejected one
    for spec in ("dpo", "simpo", "orpo"):
        loss, want, leaves, ref_leaves, metrics = run_both(spec, (hidden, weight, bias, labels, extra), chunk_size)
        assert torch.isfinite(loss) and loss.item() == pytest.approx(want.item(), rel=1e-9)
        for got, exp in zip((x.grad for x in leaves), (x.grad for x in ref_leaves)):
            torch.testing.assert_close(got, exp, rtol=1e-7, atol=1e-10)
        assert metrics["chosen_lengths"][1].item() == 0 and metrics["chosen_logps"][1].item() == 0.0
        assert leaves[0].grad[1].abs().max().item() == 0.0  # no token, no gradient


class BufferSpy:
    """Records the row count of every logits buffer the fused path fills (policy and reference)."""

    def __init__(self, monkeypatch):
        import dpalogic.runtime.fused_buffer as buffer_module  # every logits buffer is filled by its chunk_logits

        self.rows: list[int] = []
        real = buffer_module.chunk_logits

        def spy(h, weight, bias, buf):
            self.rows.append(buf.shape[0])
            return real(h, weight, bias, buf)

        monkeypatch.setattr(buffer_module, "chunk_logits", spy)


# max_chunk_tokens below a pair's 2·T rows: two passes over token slices (log-probs, then recomputed gradients)
@pytest.mark.parametrize("chunk_size,max_tokens", [(1, 1), (1, 7), (1, 93), (2, 50), (2, 100), (2, 188), (3, 10**6)])
def test_token_slices_match_full_logits(monkeypatch, chunk_size, max_tokens):
    B, T = 3, 47
    hidden, weight, bias, labels, extra = make(B=B, T=T, H=31, V=123, seed=21)
    labels[2] = -100  # a chosen answer without tokens
    for spec in ("dpo", "orpo", "simpo", "cpo"):
        data = (hidden, weight, bias, labels, extra if spec == "dpo" else {})
        spy = BufferSpy(monkeypatch)
        loss, want, leaves, ref_leaves, metrics = run_both(
            spec, data, chunk_size=chunk_size, max_chunk_tokens=max_tokens
        )
        assert loss.item() == pytest.approx(want.item(), rel=1e-9, abs=1e-12), spec
        for got, exp, what in zip((x.grad for x in leaves), (x.grad for x in ref_leaves), ("hidden", "weight", "bias")):
            torch.testing.assert_close(got, exp, rtol=1e-7, atol=1e-10, msg=f"{spec}: {what}")
        assert leaves[0].grad[2].abs().max().item() == 0.0
        # the memory promise: no logits buffer holds more than max_chunk_tokens (or one chunk of pairs) rows
        assert max(spy.rows) <= min(max_tokens, 2 * chunk_size * T)
        # a chunk of pairs that fits is one buffer fill; one that does not fills one buffer per slice for the
        # log-probs, then again for the gradients except the last slice (still in the buffer)
        policy = 0
        for s in range(0, B, chunk_size):
            rows = 2 * min(chunk_size, B - s) * T
            policy += 1 if rows <= max_tokens else 2 * -(-rows // max_tokens) - 1
        ref_slices = -(-2 * B * T // min(max_tokens, 2 * chunk_size * T)) if spec == "dpo" else 0
        assert len(spy.rows) == policy + ref_slices, spec


def test_token_slices_bf16_and_equal_to_one_pass():
    hidden, weight, bias, labels, _ = make(B=2, T=16, H=32, V=64, seed=22, dtype=torch.float32, ref=False)
    h16, w16, b16 = (t.bfloat16() for t in (hidden, weight, bias))
    out = {}
    for tokens in (None, 5):
        leaves = [t.clone().requires_grad_() for t in (h16, w16, b16)]
        loss, m = FusedLinearPreferenceLoss("orpo", max_chunk_tokens=tokens)(leaves[0], leaves[1], labels, leaves[2])
        loss.backward()
        assert loss.dtype == torch.float32 and all(x.grad.dtype == torch.bfloat16 for x in leaves)
        out[tokens] = (loss, m["chosen_logps"], [x.grad for x in leaves])
    # the same float32 logits (the same bf16 matmuls), summed in a different order
    assert out[5][0].item() == pytest.approx(out[None][0].item(), rel=1e-5)
    torch.testing.assert_close(out[5][1], out[None][1], rtol=1e-5, atol=1e-4)
    for a, b in zip(out[5][2], out[None][2]):
        torch.testing.assert_close(a.float(), b.float(), rtol=2e-2, atol=1e-3)


def test_length_normalization_uses_non_ignored_tokens():
    hidden, weight, bias, labels, _ = make(B=2, T=12, H=6, V=20, seed=3, ref=False)
    _, m = FusedLinearPreferenceLoss("simpo")(hidden, weight, labels, bias)
    lp = F.log_softmax(hidden @ weight.t() + bias, -1)
    valid = labels != -100
    tok = lp.gather(-1, torch.where(valid, labels, 0)[..., None]).squeeze(-1) * valid
    torch.testing.assert_close(m["chosen_logps"].double(), tok[:2].sum(-1), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(m["chosen_lengths"], valid[:2].sum(-1))
    # SimPO's reward is β times the per-token (normalized) log-prob
    want = 0.1 * tok[:2].sum(-1) / valid[:2].sum(-1)
    torch.testing.assert_close(m["chosen_rewards"].double(), want, rtol=1e-6, atol=1e-6)


def test_reference_logps_given_directly_equal_ref_hidden():
    hidden, weight, bias, labels, extra = make(B=2, T=10, H=8, V=30, seed=4)
    fused = FusedLinearPreferenceLoss("dpo", beta=0.3)
    a, ma = fused(hidden, weight, labels, bias, **extra)
    b, _ = fused(
        hidden,
        weight,
        labels,
        bias,
        ref_chosen_logps=ma["ref_chosen_logps"],
        ref_rejected_logps=ma["ref_rejected_logps"],
    )
    assert a.item() == pytest.approx(b.item(), rel=1e-6)
    assert ma["margins"].shape == (2,) and 0.0 <= ma["accuracy"].item() <= 1.0
    # rewards: β (log πθ − log πref)
    want = 0.3 * (ma["chosen_logps"] - ma["ref_chosen_logps"])
    torch.testing.assert_close(ma["chosen_rewards"], want)


def test_bf16_accumulates_in_float32():
    hidden, weight, bias, labels, _ = make(B=2, T=16, H=32, V=64, seed=5, dtype=torch.float32, ref=False)
    h16, w16, b16 = (t.bfloat16().requires_grad_() for t in (hidden, weight, bias))
    loss, _ = FusedLinearPreferenceLoss("cpo")(h16, w16, labels, b16)
    loss.backward()
    assert loss.dtype == torch.float32 and w16.grad.dtype == torch.bfloat16 and h16.grad.dtype == torch.bfloat16
    h, w, b = (t.detach().float().requires_grad_() for t in (h16, w16, b16))
    want = full_logits_reference("cpo", h, w, b, labels)
    want.backward()
    assert loss.item() == pytest.approx(want.item(), rel=2e-2)
    for got, exp in ((h16.grad, h.grad), (w16.grad, w.grad), (b16.grad, b.grad)):
        assert torch.nn.functional.cosine_similarity(got.float().flatten(), exp.flatten(), dim=0) > 0.999


def test_grad_output_is_scaled_and_frozen_head():
    hidden, weight, bias, labels, extra = make(B=2, T=8, H=5, V=17, seed=6)
    h = hidden.clone().requires_grad_()
    loss, _ = FusedLinearPreferenceLoss("dpo")(h, weight, labels, bias, **extra)  # weight, bias frozen
    (3.0 * loss).backward()
    h2 = hidden.clone().requires_grad_()
    want = full_logits_reference("dpo", h2, weight, bias, labels, **extra)
    (3.0 * want).backward()
    torch.testing.assert_close(h.grad, h2.grad, rtol=1e-7, atol=1e-10)


@pytest.mark.parametrize(
    "kwargs,fragment",
    [
        (dict(hidden=torch.zeros(3, 4, 5)), "hidden must be [2B, T, H]"),
        (dict(weight=torch.zeros(7, 6)), "lm_head_weight must be [V, H]"),
        (dict(labels=torch.zeros(4, 3, dtype=torch.long)), "labels must be [2B, T]"),
        (dict(labels=torch.full((4, 4), 9)), "labels must be token ids in [0, 7)"),
        (dict(labels=torch.zeros(4, 4)), "integer token ids"),
        (dict(bias=torch.zeros(3)), "bias must be [V]"),
    ],
)
def test_bad_input_is_reported(kwargs, fragment):
    args = dict(hidden=torch.zeros(4, 4, 5), weight=torch.zeros(7, 5), labels=torch.zeros(4, 4, dtype=torch.long))
    args.update(kwargs)
    with pytest.raises(DPALogicError) as info:
        FusedLinearPreferenceLoss("cpo")(args["hidden"], args["weight"], args["labels"], args.get("bias"))
    assert fragment in str(info.value)


def test_bad_configuration_is_reported():
    with pytest.raises(DPALogicError, match="chunk_size"):
        FusedLinearPreferenceLoss("dpo", chunk_size=0)
    for bad in (0, -3, 2.5, True, "64"):
        with pytest.raises(DPALogicError, match="max_chunk_tokens"):
            FusedLinearPreferenceLoss("dpo", max_chunk_tokens=bad)
    assert "max_chunk_tokens=64" in repr(FusedLinearPreferenceLoss("dpo", max_chunk_tokens=64))
    with pytest.raises(DPALogicError, match="reference model"):
        FusedLinearPreferenceLoss("dpo")(torch.zeros(2, 3, 4), torch.zeros(5, 4), torch.zeros(2, 3, dtype=torch.long))
    with pytest.raises(DPALogicError, match="M\\(y3\\)"):
        FusedLinearPreferenceLoss("M(y3) -> M(yw)")


# --------------------------------------------------------------------------------------------------- Liger-Kernel


def liger_case(name):
    from liger_kernel.chunked_loss import (
        LigerFusedLinearCPOLoss,
        LigerFusedLinearDPOLoss,
        LigerFusedLinearORPOLoss,
        LigerFusedLinearSimPOLoss,
    )

    if name == "dpo":
        return LigerFusedLinearDPOLoss(beta=0.1, compiled=False, use_ref_model=True, average_log_prob=False), True
    if name == "orpo":  # Liger's ORPO averages log-probs and adds alpha·NLL (alpha = 1)
        return LigerFusedLinearORPOLoss(beta=0.1, compiled=False), False
    if name == "simpo":
        return LigerFusedLinearSimPOLoss(beta=0.1, gamma=0.5, compute_nll_loss=False, compiled=False), False
    return LigerFusedLinearCPOLoss(beta=0.1, alpha=1.0, compiled=False, average_log_prob=False), False


def fused_and_liger(name, liger, uses_ref, hidden, weight, bias, labels, extra, device="cpu"):
    """Loss and gradients of FusedLinearPreferenceLoss and of Liger's fused loss on the same inputs, on ``device``.

    Returns ``(loss, metrics, our leaves, Liger's outputs, Liger's leaves)``; the leaves are (hidden, weight, bias).
    """
    labels = labels.to(device)
    extra = {k: v.to(device) for k, v in extra.items()}
    ours = [t.to(device).clone().requires_grad_() for t in (hidden, weight, bias)]
    theirs = [t.to(device).clone().requires_grad_() for t in (hidden, weight, bias)]
    loss, metrics = FusedLinearPreferenceLoss(name)(ours[0], ours[1], labels, ours[2], **extra)  # auto: Triton on CUDA
    loss.backward()
    if uses_ref:
        out = liger(theirs[1], theirs[0], labels, theirs[2], extra["ref_hidden"], extra["ref_weight"], None)
    else:
        out = liger(theirs[1], theirs[0], labels, theirs[2])
    out[0].backward()
    return loss, metrics, ours, out, theirs


@pytest.mark.parametrize("name", ["dpo", "orpo", "simpo", "cpo"])
def test_fused_matches_liger(name):
    pytest.importorskip("liger_kernel")
    liger, uses_ref = liger_case(name)
    B, T, H, V = 3, 21, 16, 97
    hidden, weight, bias, labels, extra = make(B=B, T=T, H=H, V=V, seed=7, dtype=torch.float32, ref=uses_ref)
    # Liger averages the NLL over all chosen tokens of the batch, dpalogic per pair: equal for equal chosen lengths
    labels[:B] = torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(8))
    labels[:B, :4] = -100
    loss, metrics, ours, out, theirs = fused_and_liger(name, liger, uses_ref, hidden, weight, bias, labels, extra)
    assert loss.item() == pytest.approx(out[0].item(), rel=1e-5)
    for a, b, what in zip(ours, theirs, ("hidden", "weight", "bias")):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-6, msg=what)
    # Liger reports per-sequence log-probs (averaged where it averages): ours are sums with token counts
    chosen = metrics["chosen_logps"] / (metrics["chosen_lengths"] if name in ("orpo", "simpo") else 1)
    torch.testing.assert_close(chosen, out[1][0], rtol=1e-5, atol=1e-5)


def test_empty_batch_is_reported():
    from dpalogic import DPALogicError, FusedLinearPreferenceLoss

    with pytest.raises(DPALogicError, match="B ≥ 1"):
        FusedLinearPreferenceLoss("cpo")(
            torch.zeros(0, 5, 8, requires_grad=True), torch.zeros(11, 8), torch.zeros(0, 5, dtype=torch.long)
        )


# --------------------------------------------------------------------------------------------------- derived losses

PAIR_ATOM_SETS = [
    (Atom("M", "yw"), Atom("M", "yl")),
    (Atom("M", "yw"), Atom("M", "yl"), Atom("Ref", "yl")),
    (Atom("M", "yw"), Atom("M", "yl"), Atom("Ref", "yw"), Atom("Ref", "yl")),
]


@st.composite
def pair_programs(draw):
    """A random structure over the pair's atoms through a random link, sometimes length-normalized."""
    atoms = PAIR_ATOM_SETS[draw(st.integers(0, len(PAIR_ATOM_SETS) - 1))]
    full = full_mask(len(atoms))
    s = Structure(atoms, draw(st.integers(1, full)), draw(st.integers(1, full)))
    link = draw(st.sampled_from(["logistic", "hinge", "squared", "sigmoid", "exponential"]))
    params = (("margin", 1),) if link == "hinge" else ()
    term = Term(s, link, scale=sympy.Symbol("beta"), link_params=params, normalized=draw(st.booleans()))
    return Program((term,), (("beta", draw(st.sampled_from([0.1, 0.7]))),))


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    program=pair_programs(),
    chunk_size=st.integers(1, 2),
    max_tokens=st.sampled_from([None, 1, 4, 9]),
    seed=st.integers(0, 1000),
)
def test_derived_structures_through_the_fused_path(program, chunk_size, max_tokens, seed):
    """Any derived program over chosen/rejected pairs, not only the catalog's, against the full-logits reference."""
    uses_ref = any(a.pred == "Ref" for a in program.atoms)
    data = make(B=3, T=5, H=6, V=13, seed=seed, ref=uses_ref)
    loss, want, leaves, ref_leaves, _ = run_both(program, data, chunk_size=chunk_size, max_chunk_tokens=max_tokens)
    assert loss.item() == pytest.approx(want.item(), rel=1e-9, abs=1e-12)
    for got, exp in zip((x.grad for x in leaves), (x.grad for x in ref_leaves)):
        torch.testing.assert_close(got, exp, rtol=1e-7, atol=1e-10)


# --------------------------------------------------------------------------------------------------- TRL


@pytest.mark.parametrize("name", ["dpo", "orpo", "simpo", "ipo"])
def test_fused_matches_trl_chunked_logprobs(name):
    """Per-sequence log-probs from TRL's own chunked log-prob function (what DPOTrainer's fused LM head runs, float32
    statistics), summed and fed to the loss, against the fused path: loss and gradients."""
    chunked = pytest.importorskip("trl.kernels").ChunkedLogProbFunction
    B, T, H, V = 3, 19, 12, 71
    uses_ref = name in ("dpo", "ipo")
    hidden, weight, bias, labels, extra = make(B=B, T=T, H=H, V=V, seed=41, dtype=torch.float32, ref=uses_ref)

    def trl_seq_logps(h, w, b):
        valid = labels != -100
        targets = torch.where(valid, labels, 0).reshape(-1)
        tok = chunked.apply(h.reshape(-1, H), w, b, targets, 1.0, 32, None, 1.0, ())[0]  # vocabulary tiles of 32
        return (tok.view(2 * B, T) * valid).sum(-1), valid.sum(-1)

    theirs = [t.clone().requires_grad_() for t in (hidden, weight, bias)]
    lp, n = trl_seq_logps(*theirs)
    ref_c = ref_r = None
    if uses_ref:
        with torch.no_grad():
            ref, _ = trl_seq_logps(extra["ref_hidden"], extra["ref_weight"], None)
        ref_c, ref_r = ref[:B], ref[B:]
    want = PreferenceLoss(name)(lp[:B], lp[B:], ref_c, ref_r, chosen_lengths=n[:B], rejected_lengths=n[B:])
    want.backward()
    ours = [t.clone().requires_grad_() for t in (hidden, weight, bias)]
    loss, metrics = FusedLinearPreferenceLoss(name, max_chunk_tokens=11)(ours[0], ours[1], labels, ours[2], **extra)
    loss.backward()
    assert loss.item() == pytest.approx(want.item(), rel=1e-5)
    torch.testing.assert_close(metrics["chosen_logps"], lp[:B].detach(), rtol=1e-5, atol=1e-4)
    for a, b, what in zip(ours, theirs, ("hidden", "weight", "bias")):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-6, msg=what)


def test_reference_log_probs_passed_in_are_checked_once():
    """The fused path checks the reference log-probs a caller passes (the policy's, computed from the LM head, are
    ≤ 0 by construction and not re-checked chunk by chunk)."""
    g = torch.Generator().manual_seed(2)
    B, T, H, V = 2, 5, 8, 11
    hidden = torch.randn(2 * B, T, H, generator=g, dtype=torch.float64)
    weight = torch.randn(V, H, generator=g, dtype=torch.float64)
    labels = torch.randint(0, V, (2 * B, T), generator=g)
    fused = FusedLinearPreferenceLoss("dpo", beta=0.1)
    ref_c, ref_r = -torch.rand(B, generator=g, dtype=torch.float64), -torch.rand(B, generator=g, dtype=torch.float64)
    loss, _ = fused(hidden, weight, labels, ref_chosen_logps=ref_c, ref_rejected_logps=ref_r)
    assert torch.isfinite(loss)
    with pytest.raises(DPALogicError, match="ref_rejected_logps has 0.5"):
        fused(hidden, weight, labels, ref_chosen_logps=ref_c, ref_rejected_logps=torch.full_like(ref_r, 0.5))
