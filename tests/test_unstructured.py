"""The losses outside the fragment that train without a structure (dpalogic.runtime.unstructured), against TRL.

TRL 1.16 is called, not copied: ``DPOTrainer._compute_loss`` (f-DPO's four divergences, ``aot``, ``aot_unpaired``),
``KTOTrainer._compute_loss`` (KTO with its KL estimate over mismatched pairs) and ``CPOTrainer.cpo_loss`` (AlphaPO).
The trainers' methods run on a stand-in ``self`` and a stand-in model whose per-token log-probs are the test's leaf
tensors, so values *and gradients* (w.r.t. the same leaves) are compared. TRL 1.16 has neither DPOP nor BCO's running
mean (it dropped BCO): those are checked against their equations written out independently in numpy (float64), with
finite differences for the gradients.
"""

from __future__ import annotations

import math
import warnings
from collections import defaultdict
from functools import partial
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dpalogic import PreferenceLoss
from dpalogic.errors import DPALogicError
from dpalogic.runtime.unstructured_stats import UNSTRUCTURED

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from trl.experimental.cpo.cpo_trainer import CPOTrainer
    from trl.trainer.dpo_trainer import DPOTrainer
    from trl.trainer.kto_trainer import KTOTrainer

F64 = torch.float64


def _accelerator() -> SimpleNamespace:
    ident = lambda t: t  # noqa: E731 - one process: gathering is the identity
    return SimpleNamespace(device="cpu", gather=ident, gather_for_metrics=ident)


class _Model:
    """Stands in for a TRL model: ``log_probs`` are given per input (by the first token id), one token per row."""

    def __init__(self, by_first_id: dict[int, torch.Tensor]) -> None:
        self.by_first_id = by_first_id
        self.training = True

    def __call__(self, input_ids, **kw):
        lp = self.by_first_id[int(input_ids[0, 0])][:, None]
        z = torch.zeros_like(lp)
        return SimpleNamespace(log_probs=lp, entropy=z, mean_logits=z, is_top1=z.bool())


def _one_token_batch(n: int, first_id: int) -> dict[str, torch.Tensor]:
    ids = torch.full((n, 2), first_id)
    return {"input_ids": ids, "attention_mask": torch.ones(n, 2), "completion_mask": torch.tensor([[0, 1]] * n)}


def trl_dpo(loss_type: str, x: dict, *, beta: float, f_divergence_type: str = "reverse_kl", coef: float = 0.5,
            label_smoothing: float = 0.0) -> torch.Tensor:  # fmt: skip
    """TRL's DPOTrainer loss on summed log-probs (one 'token' per sequence carries the whole sum)."""
    b = x["chosen_logps"].shape[0]
    stub = SimpleNamespace(
        accelerator=_accelerator(), model=SimpleNamespace(training=True), aux_loss_enabled=False, ld_alpha=None,
        precompute_ref_logps=True, f_divergence_type=f_divergence_type, f_alpha_divergence_coef=coef,
        loss_types=[loss_type], loss_weights=[1.0], beta=beta, label_smoothing=label_smoothing, use_weighting=False,
        _metrics=defaultdict(lambda: defaultdict(list)), _total_train_tokens=0, _tp_size=1,
        args=SimpleNamespace(discopop_tau=0.05),
    )  # fmt: skip
    inputs = _one_token_batch(2 * b, 1)
    inputs.update(ref_chosen_logps=x["ref_chosen_logps"], ref_rejected_logps=x["ref_rejected_logps"])
    model = _Model({1: torch.cat([x["chosen_logps"], x["rejected_logps"]])})
    return DPOTrainer._compute_loss(stub, model, inputs, return_outputs=False)


def trl_kto(logps, ref_logps, labels, kl_logps, ref_kl_logps, *, beta, dw=1.0, uw=1.0) -> torch.Tensor:
    """TRL's KTOTrainer loss: answers with labels, and the mismatched pairs' log-probs for the KL estimate."""
    n = logps.shape[0]
    stub = SimpleNamespace(
        accelerator=_accelerator(), model=SimpleNamespace(training=True), aux_loss_enabled=False,
        precompute_ref_logps=True, calculate_KL=True, loss_type="kto", beta=beta, desirable_weight=dw,
        undesirable_weight=uw, _metrics=defaultdict(lambda: defaultdict(list)), _total_train_tokens=0, _tp_size=1,
    )  # fmt: skip
    stub._compute_kl_logps = partial(KTOTrainer._compute_kl_logps, stub)
    batch = _one_token_batch(n, 1)
    kl = _one_token_batch(n, 2)
    batch.update(KL_input_ids=kl["input_ids"], KL_attention_mask=kl["attention_mask"],
                 KL_completion_mask=kl["completion_mask"], label=torch.as_tensor(labels).tolist(),
                 ref_logps=ref_logps, ref_KL_logps=ref_kl_logps)  # fmt: skip
    batch["label"] = torch.tensor(batch["label"])
    model = _Model({1: logps, 2: kl_logps})
    return KTOTrainer._compute_loss(stub, model, batch, return_outputs=False)


def trl_alphapo(x: dict, *, beta, gamma, alpha, label_smoothing) -> torch.Tensor:
    stub = SimpleNamespace(accelerator=_accelerator(), alpha=alpha, beta=beta, simpo_gamma=gamma,
                           label_smoothing=label_smoothing, loss_type="simpo")  # fmt: skip
    avg_w = x["chosen_logps"] / x["chosen_lengths"]
    avg_l = x["rejected_logps"] / x["rejected_lengths"]
    losses, _, _ = CPOTrainer.cpo_loss(stub, avg_w, avg_l)
    return losses.mean()


# ---------------------------------------------------------------------------------------------- inputs


def pairs(seed: int, b: int, scale: float, dtype=F64) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = {k: (-torch.rand(b, generator=g, dtype=F64) * scale).to(dtype).requires_grad_()
         for k in ("chosen_logps", "rejected_logps", "ref_chosen_logps", "ref_rejected_logps")}  # fmt: skip
    x["chosen_lengths"] = torch.randint(1, 30, (b,), generator=g).to(dtype)
    x["rejected_lengths"] = torch.randint(1, 30, (b,), generator=g).to(dtype)
    return x


def grads(loss: torch.Tensor, leaves: list[torch.Tensor]) -> list[torch.Tensor]:
    return list(torch.autograd.grad(loss, leaves, allow_unused=True, materialize_grads=True))


def assert_same(ours: torch.Tensor, theirs: torch.Tensor, leaves, rtol=1e-9, atol=1e-12) -> None:
    torch.testing.assert_close(ours, theirs.to(ours.dtype), rtol=rtol, atol=atol)
    for a, b in zip(grads(ours, leaves), grads(theirs, leaves)):
        torch.testing.assert_close(a, b.to(a.dtype), rtol=rtol, atol=atol)


LOGP = ("chosen_logps", "rejected_logps", "ref_chosen_logps", "ref_rejected_logps")
seeds = st.integers(0, 2**31 - 1)
scales = st.sampled_from([0.01, 0.3, 3.0, 30.0])
betas = st.sampled_from([0.01, 0.1, 0.5, 2.0])


# ---------------------------------------------------------------------------------------------- against TRL


@settings(max_examples=25, deadline=None)
@given(seed=seeds, scale=scales, beta=betas, b=st.integers(1, 9),
       div=st.sampled_from(["reverse_kl", "forward_kl", "js_divergence"]))  # fmt: skip
def test_f_dpo_equals_trl(seed, scale, beta, b, div):
    x = pairs(seed, b, scale)
    leaves = [x[k] for k in LOGP]
    ours = PreferenceLoss(f"f_dpo_{div}", beta=beta)(*(x[k] for k in LOGP))
    assert_same(ours, trl_dpo("sigmoid", x, beta=beta, f_divergence_type=div), leaves)
    # the generic name with TRL's keyword is the same loss
    same = PreferenceLoss("f_dpo", beta=beta, f_divergence_type=div)(*(x[k] for k in LOGP))
    torch.testing.assert_close(same, ours, rtol=0, atol=0)


@settings(max_examples=25, deadline=None)
@given(seed=seeds, scale=st.sampled_from([0.01, 0.3, 3.0]), beta=betas, b=st.integers(1, 9),
       coef=st.sampled_from([0.1, 0.5, 0.9, 1.0, 1.5]))  # fmt: skip
def test_alpha_divergence_equals_trl_in_float32(seed, scale, beta, b, coef):
    # TRL's α-divergence branch has clamp bounds only for 16/32-bit floats: it is compared in float32
    x = pairs(seed, b, scale, dtype=torch.float32)
    leaves = [x[k] for k in LOGP]
    ours = PreferenceLoss("f_dpo_alpha_divergence", beta=beta, f_alpha_divergence_coef=coef)(*(x[k] for k in LOGP))
    theirs = trl_dpo("sigmoid", x, beta=beta, f_divergence_type="alpha_divergence", coef=coef)
    assert_same(ours, theirs, leaves, rtol=2e-5, atol=1e-6)


def test_reverse_kl_f_dpo_is_dpo():
    x = pairs(3, 16, 5.0)
    args = [x[k] for k in LOGP]
    torch.testing.assert_close(PreferenceLoss("f_dpo", beta=0.3)(*args), PreferenceLoss("dpo", beta=0.3)(*args))


@settings(max_examples=25, deadline=None)
@given(seed=seeds, scale=scales, beta=betas, b=st.integers(1, 9), ls=st.sampled_from([0.0, 0.1, 0.3]),
       name=st.sampled_from(["aot", "aot_unpaired"]))  # fmt: skip
def test_aot_equals_trl(seed, scale, beta, b, ls, name):
    x = pairs(seed, b, scale)
    leaves = [x[k] for k in LOGP]
    ours = PreferenceLoss(name, beta=beta, label_smoothing=ls)(*(x[k] for k in LOGP))
    assert_same(ours, trl_dpo(name, x, beta=beta, label_smoothing=ls), leaves)


@settings(max_examples=25, deadline=None)
@given(seed=seeds, scale=scales, beta=st.sampled_from([0.1, 1.0, 2.5]), b=st.integers(1, 9),
       alpha=st.sampled_from([-0.5, 0.0, 0.1, 0.25, 1.0]), gamma=st.sampled_from([0.0, 0.5, 1.4]),
       ls=st.sampled_from([0.0, 0.2]))  # fmt: skip
def test_alphapo_equals_trl(seed, scale, beta, b, alpha, gamma, ls):
    x = pairs(seed, b, scale)
    leaves = [x["chosen_logps"], x["rejected_logps"]]
    fn = PreferenceLoss("alphapo", beta=beta, gamma=gamma, alpha=alpha, label_smoothing=ls)
    assert not fn.needs_reference
    ours = fn(x["chosen_logps"], x["rejected_logps"], chosen_lengths=x["chosen_lengths"],
              rejected_lengths=x["rejected_lengths"])  # fmt: skip
    theirs = trl_alphapo(x, beta=beta, gamma=gamma, alpha=alpha, label_smoothing=ls)
    assert_same(ours, theirs, leaves, rtol=1e-8, atol=1e-10)


def _unpaired(seed: int, n: int, scale: float):
    g = torch.Generator().manual_seed(seed)
    t = [(-torch.rand(n, generator=g, dtype=F64) * scale).requires_grad_() for _ in range(4)]
    labels = torch.rand(n, generator=g) < 0.5
    return t, labels


@settings(max_examples=30, deadline=None)
@given(seed=seeds, scale=scales, beta=betas, n=st.integers(2, 12),
       dw=st.sampled_from([1.0, 0.7]), uw=st.sampled_from([1.0, 1.33]))  # fmt: skip
def test_kto_unpaired_equals_trl(seed, scale, beta, n, dw, uw):
    (lp, ref, kl, ref_kl), labels = _unpaired(seed, n, scale)
    fn = PreferenceLoss("kto", beta=beta, desirable_weight=dw, undesirable_weight=uw)
    ours = fn.unpaired(lp, ref, labels, kl_logps=kl, ref_kl_logps=ref_kl)
    theirs = trl_kto(lp, ref, labels, kl, ref_kl, beta=beta, dw=dw, uw=uw)
    assert_same(ours, theirs, [lp, ref, kl, ref_kl])
    # the KL estimate is detached: no gradient reaches the mismatched pairs' log-probs
    assert all(g.abs().sum() == 0 for g in grads(ours, [kl, ref_kl]))
    assert fn.last_kl == pytest.approx(max(0.0, float((kl - ref_kl).mean())), abs=1e-15)


@settings(max_examples=20, deadline=None)
@given(seed=seeds, scale=scales, beta=betas, b=st.integers(1, 8))
def test_kto_on_pairs_is_trl_on_the_unpaired_answers(seed, scale, beta, b):
    # TRL trains KTO on paired data by unpairing it: each pair is a desirable and an undesirable answer
    x = pairs(seed, b, scale)
    g = torch.Generator().manual_seed(seed + 1)
    kl, ref_kl = (-torch.rand(2 * b, generator=g, dtype=F64) * scale for _ in range(2))
    ours = PreferenceLoss("kto", beta=beta)(*(x[k] for k in LOGP), kl_logps=kl, ref_kl_logps=ref_kl)
    labels = torch.cat([torch.ones(b), torch.zeros(b)]).bool()
    theirs = trl_kto(torch.cat([x["chosen_logps"], x["rejected_logps"]]),
                     torch.cat([x["ref_chosen_logps"], x["ref_rejected_logps"]]), labels, kl, ref_kl, beta=beta)  # fmt: skip
    assert_same(ours, theirs, [x[k] for k in LOGP])


def test_kto_kl_is_clamped_at_zero_and_required():
    x = pairs(0, 4, 2.0)
    args = [x[k] for k in LOGP]
    lo = torch.full((8,), -5.0, dtype=F64)
    hi = torch.full((8,), -1.0, dtype=F64)
    fn = PreferenceLoss("kto", beta=0.5)
    fn(*args, kl_logps=lo, ref_kl_logps=hi)  # a negative estimate counts as 0
    assert fn.last_kl == 0.0
    torch.testing.assert_close(fn(*args, kl_logps=lo, ref_kl_logps=hi), fn(*args, kl=0.0))
    with pytest.raises(DPALogicError, match="kl_logps and ref_kl_logps"):
        fn(*args)


# ---------------------------------------------------------------------------------------------- closed forms


def _np(x: dict) -> dict[str, np.ndarray]:
    return {k: v.detach().numpy().astype(np.float64) for k, v in x.items()}


def _logsig(z):
    return -np.logaddexp(0.0, -z)


def finite_difference(f, x: dict, keys, h=1e-6) -> dict[str, np.ndarray]:
    base = _np(x)
    out = {}
    for k in keys:
        g = np.zeros_like(base[k])
        for i in range(len(g)):
            up, dn = dict(base), dict(base)
            up[k], dn[k] = base[k].copy(), base[k].copy()
            up[k][i] += h
            dn[k][i] -= h
            g[i] = (f(up) - f(dn)) / (2 * h)
        out[k] = g
    return out


@settings(max_examples=25, deadline=None)
@given(seed=seeds, scale=scales, beta=betas, b=st.integers(1, 9), lam=st.sampled_from([0.0, 5.0, 50.0]))
def test_dpop_equals_its_equation(seed, scale, beta, b, lam):
    x = pairs(seed, b, scale)

    def eq(v):  # Pal et al. 2024, Eq. 3
        lw, ll = v["chosen_logps"] - v["ref_chosen_logps"], v["rejected_logps"] - v["ref_rejected_logps"]
        return float(np.mean(-_logsig(beta * (lw - ll - lam * np.maximum(0.0, -lw)))))

    ours = PreferenceLoss("dpop", beta=beta, dpop_lambda=lam)(*(x[k] for k in LOGP))
    assert float(ours) == pytest.approx(eq(_np(x)), rel=1e-10, abs=1e-13)
    fd = finite_difference(eq, x, LOGP)
    pen = (x["ref_chosen_logps"] - x["chosen_logps"]).detach().abs().numpy()
    for k, g in zip(LOGP, grads(ours, [x[k] for k in LOGP])):
        ok = pen > 1e-4  # the kink of max(0, ·): no finite difference across it
        np.testing.assert_allclose(g.numpy()[ok], fd[k][ok], rtol=1e-5, atol=1e-9)


@settings(max_examples=15, deadline=None)
@given(seed=seeds, scale=scales, beta=betas, b=st.integers(1, 6), steps=st.integers(1, 5))
def test_bco_running_mean_and_loss(seed, scale, beta, b, steps):
    fn = PreferenceLoss("bco", beta=beta, reduction="none")
    deltas, batch_means = [], []
    for s in range(steps):
        x = pairs(seed + s, b, scale)
        v = _np(x)
        rw, rl = (
            beta * (v["chosen_logps"] - v["ref_chosen_logps"]),
            beta * (v["rejected_logps"] - v["ref_rejected_logps"]),
        )
        batch_means.append(float(np.concatenate([rw, rl]).mean()))
        per = fn(*(x[k] for k in LOGP))
        d = fn.running["mean"]
        deltas.append(d)
        want = -_logsig(rw - d) - _logsig(-(rl - d))
        np.testing.assert_allclose(per.detach().numpy(), want, rtol=1e-10, atol=1e-13)
        # gradient: δ is a constant of the batch (detached), so d/d logπ(yw) = −β·σ(−(r_w − δ))
        g = grads(per.sum(), [x["chosen_logps"], x["rejected_logps"]])
        np.testing.assert_allclose(g[0].numpy(), -beta / (1 + np.exp(rw - d)), rtol=1e-9, atol=1e-14)
        np.testing.assert_allclose(g[1].numpy(), beta / (1 + np.exp(-(rl - d))), rtol=1e-9, atol=1e-14)
    # δ after k batches: the mean of the k batch means (up to float32 rounding, as TRL accumulates it)
    for k, d in enumerate(deltas, 1):
        assert d == pytest.approx(float(np.mean(batch_means[:k])), rel=1e-6, abs=1e-6)


def test_bco_without_delta_is_the_catalog_bco_pair_and_eval_does_not_move_it():
    x = pairs(5, 8, 4.0)
    args = [x[k] for k in LOGP]
    fn = PreferenceLoss("bco", beta=0.2)
    fn.load_stats_state({"mean": 0.0, "var": 1.0, "count": 1e-24})
    with torch.no_grad():  # an evaluation: δ is read, not updated
        val = fn(*args)
    assert fn.stats_state() == {"mean": 0.0, "var": 1.0, "count": 1e-24}
    torch.testing.assert_close(val, PreferenceLoss("bco_pair", beta=0.2)(*args).detach())
    fn(*args)
    assert fn.stats_state()["count"] == pytest.approx(1.0)
    again = PreferenceLoss("bco", beta=0.2)
    again.load_stats_state(fn.stats_state())
    assert again.stats_state() == fn.stats_state()


# ---------------------------------------------------------------------------------------------- the module's surface


def test_registry_matches_the_catalog_and_show_says_trainable():
    from dpalogic.cli.show import show
    from dpalogic.semantics.catalog import UNSTRUCTURED as NAMES
    from dpalogic.semantics.catalog import lookup, outside

    assert set(NAMES) == set(UNSTRUCTURED)
    for name, why in NAMES.items():
        assert outside(name).name == why  # every trainable name is a known loss outside the fragment
        info = show(name)
        assert info["in_fragment"] is False and info["trainable"] is True and name in info["train_with"]
        with pytest.raises(DPALogicError, match="outside dpalogic's program fragment"):
            lookup(name)  # compare, lattice, derive: still no structure


@pytest.mark.parametrize(
    ("name", "kw", "fragment"),
    [
        ("kto", {"betta": 0.1}, "did you mean 'beta'"),
        ("dpop", {"dpop_lambda": -1.0}, "must not be negative"),
        ("f_dpo", {"beta": 0.0}, "beta must be positive"),
        ("f_dpo", {"f_divergence_type": "js"}, "unknown f_divergence_type"),
        ("aot", {"label_smoothing": 0.5}, "label_smoothing"),
        ("kto", {"link": "softplus(-z)"}, "no structure"),
    ],
)
def test_bad_hyperparameters_are_refused(name, kw, fragment):
    with pytest.raises(DPALogicError, match=fragment):
        PreferenceLoss(name, **kw)


def test_inputs_are_checked():
    x = pairs(0, 4, 1.0)
    fn = PreferenceLoss("dpop")
    with pytest.raises(DPALogicError, match="needs ref_chosen_logps"):
        fn(x["chosen_logps"], x["rejected_logps"])
    with pytest.raises(DPALogicError, match="<= 0"):
        fn(-x["chosen_logps"] + 1, x["rejected_logps"], x["ref_chosen_logps"], x["ref_rejected_logps"])
    with pytest.raises(DPALogicError, match="same shape"):
        fn(x["chosen_logps"][:3], x["rejected_logps"], x["ref_chosen_logps"], x["ref_rejected_logps"])
    with pytest.raises(DPALogicError, match="needs chosen_lengths"):
        PreferenceLoss("alphapo")(x["chosen_logps"], x["rejected_logps"])
    # the keyed form PreferenceLoss takes for pairs works too
    keyed = fn(logps={"M(yw)": x["chosen_logps"], "M(yl)": x["rejected_logps"], "Ref(yw)": x["ref_chosen_logps"],
                      "Ref(yl)": x["ref_rejected_logps"]})  # fmt: skip
    torch.testing.assert_close(keyed, fn(*(x[k] for k in LOGP)))
    assert math.isfinite(float(PreferenceLoss("f_dpo_forward_kl")(*(x[k] for k in LOGP))))


# ---------------------------------------------------------------------------------------------- inputs of other forms
# PreferenceLoss.forward's keywords (logps as a mapping or a [B, K] tensor, lengths, ref_logps, margin) reach these
# losses too: each is either supported or refused with a DPALogicError that says why, never a raw traceback


def _pair_call(name: str, b: int = 3) -> tuple[list[torch.Tensor], dict]:
    """A valid call of ``name`` on ``b`` pairs: the positional log-probs and the keywords it needs."""
    x = pairs(1, b, 2.0)
    kw = {"chosen_lengths": x["chosen_lengths"], "rejected_lengths": x["rejected_lengths"]}
    return [x[k] for k in LOGP], {**kw, **({"kl": 0.1} if name == "kto" else {})}


MATRIX = (-torch.rand(3, 2, dtype=F64)).requires_grad_()


@pytest.mark.parametrize("name", sorted(UNSTRUCTURED))
@pytest.mark.parametrize(
    ("bad", "fragment"),
    [
        ({"logps": MATRIX}, r"takes no \[B, K\] matrices .*no K-answer form"),
        ({"logps": MATRIX, "ref_logps": MATRIX}, r"takes no \[B, K\] matrices"),
        ({"ref_logps": MATRIX}, r"takes no \[B, K\] matrices"),
        ({"lengths": torch.ones(3, 2)}, r"takes no \[B, K\] matrices"),
        ({"margin": torch.zeros(3, dtype=F64)}, "takes no margin: .*(defines no per-pair|constant gamma)"),
        ({"logps": {"M(y1)": MATRIX[:, 0]}}, "unknown atom 'M\\(y1\\)'"),
        ({"logps": [MATRIX[:, 0]]}, "logps must be a mapping keyed by atom"),
        ({"lengths": {"y1": torch.ones(3)}}, "unknown answer 'y1'"),
        ({"lengths": 5}, "lengths must be a mapping keyed by answer"),
        ({"temperature": 1.0}, "(takes no temperature|unknown input 'temperature')"),
    ],
)
def test_other_input_forms_are_refused_by_name(name, bad, fragment):
    args, kw = _pair_call(name)
    fn = PreferenceLoss(name)
    assert math.isfinite(float(fn(*args, **kw).detach()))  # the same call without the bad input is fine
    with pytest.raises(DPALogicError, match=fragment) as e:
        fn(*args, **kw, **bad)
    if "matrices" in fragment:  # the error says what the loss takes instead
        takes = fn.takes()
        assert takes in str(e.value)
        assert ("chosen_lengths" in takes) == (name == "alphapo")
        assert ("ref_chosen_logps" in takes) == (name != "alphapo")
        assert (".unpaired(logps, ref_logps, labels)" in takes) == (name in ("kto", "bco"))
        assert ("need not be a pair" in takes) == (name == "aot_unpaired")


@pytest.mark.parametrize("name", sorted(UNSTRUCTURED))
def test_k_answer_matrices_passed_positionally_are_refused(name):
    args, kw = _pair_call(name)
    with pytest.raises(DPALogicError, match=r"chosen_logps must be a 1-D tensor \[B\].*\(3, 2\)"):
        PreferenceLoss(name)(MATRIX, *args[1:], **kw)


def test_kto_and_bco_unpaired_refuse_margins_and_unknown_inputs():
    lp, ref = -torch.rand(4, dtype=F64), -torch.rand(4, dtype=F64)
    labels = [True, False, True, False]
    for name in ("kto", "bco"):
        with pytest.raises(DPALogicError, match=f"{name} takes no margin: it scores each answer on its own"):
            PreferenceLoss(name).unpaired(lp, ref, labels, margin=torch.zeros(4, dtype=F64), kl=0.0)
    with pytest.raises(DPALogicError, match="bco takes no kl: it takes pairs"):
        PreferenceLoss("bco").unpaired(lp, ref, labels, kl=0.0)
    with pytest.raises(DPALogicError, match="unknown input 'kl_logp'; did you mean 'kl_logps'"):
        PreferenceLoss("kto").unpaired(lp, ref, labels, kl_logp=lp)
    with pytest.raises(DPALogicError, match=r"logps must be a 1-D tensor \[B\]"):
        PreferenceLoss("kto").unpaired(MATRIX, MATRIX, labels, kl=0.0)


@pytest.mark.parametrize(
    ("kl", "fragment"),
    [
        (torch.zeros(3), r"kl= is one number, the batch's KL estimate; got a tensor of shape \(3,\)"),
        ("0.1", "kl= is one number, the batch's KL estimate; got str"),
        (True, "kl= is one number, the batch's KL estimate; got bool"),
        (float("nan"), "kl= must be a finite number"),
    ],
)
def test_kto_kl_must_be_one_finite_number(kl, fragment):
    args, _ = _pair_call("kto")
    with pytest.raises(DPALogicError, match=fragment):
        PreferenceLoss("kto")(*args, kl=kl)
    # one number, as a float or a 0-d tensor, is the same reference point
    torch.testing.assert_close(PreferenceLoss("kto")(*args, kl=torch.tensor(0.3)), PreferenceLoss("kto")(*args, kl=0.3))


def test_lengths_in_keyed_form_equal_the_positional_ones():
    x = pairs(2, 5, 3.0)
    fn = PreferenceLoss("alphapo")
    keyed = fn(logps={"M(yw)": x["chosen_logps"], "M(yl)": x["rejected_logps"]},
               lengths={"yw": x["chosen_lengths"], "yl": x["rejected_lengths"]})  # fmt: skip
    torch.testing.assert_close(
        keyed,
        fn(
            x["chosen_logps"],
            x["rejected_logps"],
            chosen_lengths=x["chosen_lengths"],
            rejected_lengths=x["rejected_lengths"],
        ),
    )


# ---------------------------------------------------------------------------------------------- the sign of β


def _rejected_gradient(name: str, beta: float) -> float:
    """d loss / d rejected_logps of one pair with β set on the module directly (past the constructor's check)."""
    fn = PreferenceLoss(name).eval()  # BCO: evaluation reads its running mean without moving it
    fn.hyperparameters["beta"] = beta
    x = {k: torch.tensor([v], dtype=F64, requires_grad=True) for k, v in zip(LOGP, (-1.5, -2.0, -1.8, -1.7))}
    one = torch.ones(1, dtype=F64)
    kw = {"kl": 0.0} if name == "kto" else {}
    fn(*(x[k] for k in LOGP), one * 7, one * 5, **kw).backward()
    return float(x["rejected_logps"].grad)


@pytest.mark.parametrize("name", sorted(UNSTRUCTURED))
@settings(max_examples=6, deadline=None)
@given(beta=st.floats(-3, 3).filter(lambda b: abs(b) > 1e-3) | st.just(0.0))
def test_beta_is_accepted_exactly_when_the_loss_penalizes_the_rejected_answer(name, beta):
    # the reference is the loss itself: with β < 0 a likelier rejected answer lowers it, at β = 0 nothing moves it
    try:
        PreferenceLoss(name, beta=beta)
        accepted = True
    except DPALogicError as e:
        assert (
            f"{UNSTRUCTURED[name].name} with beta={beta:g}: beta must be positive, or the loss rewards the rejected answer"
            in str(e)
        )
        accepted = False
    assert accepted == (_rejected_gradient(name, beta) > 0)


def test_dpalogic_train_refuses_a_negative_beta_with_the_same_words():
    from dpalogic.training.config import check_loss

    with pytest.raises(
        DPALogicError, match="kto with beta=-1: beta must be positive, or the loss rewards the rejected"
    ):
        check_loss("kto", {"beta": -1.0})
