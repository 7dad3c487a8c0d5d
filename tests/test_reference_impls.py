"""dpalogic's compiled catalog losses against the implementations they claim to reproduce.

Verified per pair, values and gradients (w.r.t. every log-probability input the loss uses), float64, rtol 1e-6:

* Liger-Kernel 0.8.5 ``LigerFusedLinearDPOFunction.preference_loss_fn`` for ``dpo`` ("sigmoid"), ``hinge``,
  ``exo_pair``, ``nca_pair``, ``robust``, ``bco_pair``, ``sppo_hard``, ``apo_zero``, ``apo_down``, ``discopop``
  (Liger's ``exo_pair`` carries float32 constants, so it gets an absolute floor of 1e-6; the EXO equation, written
  out here in float64, holds ``exo_pair`` to the full tolerance);
* Liger ``CPO``/``SimPO``/``ORPO`` ``preference_loss_fn`` for ``cpo``, ``simpo``, ``orpo`` (``alpha=0``: no NLL term);
* TRL 1.16.0 ``CPOTrainer.cpo_loss`` ("sigmoid", "hinge", "simpo") for ``cpo``, ``slic``, ``simpo``, and
  ``ORPOTrainer.odds_ratio_loss`` for ``orpo`` (TRL computes in float32, so that one is held to float32 tolerance);
* TRL's documented equations, written out here, for ``ipo`` and ``sigmoid_norm`` (only in TRL's DPOTrainer);
* float32 and bfloat16 inputs to ``dpo``: a float32 loss close to float64 on the same rounded inputs.

The references are called, not copied. dpalogic takes per-sequence *summed* log-probs and divides by the lengths
itself; where a reference takes average log-probs (SimPO, ORPO) the test divides the same leaf tensors by the
lengths, so both gradients are w.r.t. the summed log-probs. Random inputs cover several seeds and scales; extreme
inputs (log-probs from -1e-12 down to -1e4) are compared wherever the reference itself is finite, and dpalogic must
be finite everywhere.
"""

from __future__ import annotations

import itertools
import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from liger_kernel.chunked_loss.cpo_loss import LigerFusedLinearCPOFunction
from liger_kernel.chunked_loss.dpo_loss import LigerFusedLinearDPOFunction
from liger_kernel.chunked_loss.orpo_loss import LigerFusedLinearORPOFunction
from liger_kernel.chunked_loss.simpo_loss import LigerFusedLinearSimPOFunction

from dpalogic import PreferenceLoss

with warnings.catch_warnings():  # TRLExperimentalWarning: the trainers' loss methods are what we compare against
    warnings.simplefilter("ignore")
    from trl.experimental.cpo.cpo_trainer import CPOTrainer
    from trl.experimental.orpo.orpo_trainer import ORPOTrainer

F64 = torch.float64
LOGP_KEYS = ("chosen_logps", "rejected_logps", "ref_chosen_logps", "ref_rejected_logps")
LENGTH_KEYS = ("chosen_lengths", "rejected_lengths")
SEEDS = (0, 1, 2)
BATCH = 16
SCALES = (0.01, 0.1, 1.0, 10.0, 100.0, 500.0)  # of -Exponential(1) sequence log-probs
EXTREMES = (-1e-12, -1e-6, -1e-3, -1.0, -1e3, -1e4)  # summed log-probs, every combination
EXTREME_LENGTHS = (1, 13, 64)


@dataclass(frozen=True)
class Tol:
    rtol: float
    atol: float  # per-pair values
    grad_atol: float  # gradients of the batch mean, O(beta / B): a tighter floor than the values'


FP64 = Tol(rtol=1e-6, atol=1e-9, grad_atol=1e-12)
# TRL's odds_ratio_loss casts its inputs with .float(): it can only agree to float32 precision
FP32 = Tol(rtol=1e-5, atol=1e-7, grad_atol=1e-7)
# Liger's exo_pair builds ε as torch.tensor(label_smoothing), a float32 tensor, so log(1 − ε) and log ε carry
# float32 rounding (~6e-8 relative) into an otherwise float64 loss; near its minimum (σ(z) ≈ 1 − ε) the loss is
# small and that absolute error is all that is left. The float64 EXO equation below holds dpalogic to FP64.
LIGER_EXO = Tol(rtol=1e-6, atol=1e-6, grad_atol=1e-8)
# Liger's ORPO forms log(1 − p) as log1p(−exp(x)): at x = −1e-12/64 rounding exp(x) leaves about two digits of
# 1 − p (loss off by 1.9e-3 relative against a 60-digit evaluation, which dpalogic matches to 1e-15), so its extreme
# grid stops at −1e-6; TRL's ORPO (log(−expm1(x))) covers −1e-12.
LIGER_ORPO_EXTREMES = EXTREMES[1:]

Inputs = dict[str, torch.Tensor]


# ---------------------------------------------------------------- references: called, adapted to one signature
#
# Every adapter takes dpalogic's inputs (summed log-probs, lengths) and the dpalogic hyperparameters, and returns the
# reference's loss averaged over the pairs in ``x``.


def _full_target(x: Inputs) -> torch.Tensor:
    # Liger divides by full_target.shape[0] // 2, the number of pairs (chosen and rejected rows are stacked)
    return torch.zeros(2 * x["chosen_logps"].shape[0], 1)


def _averages(x: Inputs) -> tuple[torch.Tensor, torch.Tensor]:
    """Average per-token log-probs, the input Liger SimPO/ORPO and TRL's SimPO/ORPO expect."""
    return (
        x["chosen_logps"] / x["chosen_lengths"].to(F64).clamp(min=1.0),
        x["rejected_logps"] / x["rejected_lengths"].to(F64).clamp(min=1.0),
    )


def liger_dpo(loss_type: str, x: Inputs, hp: dict) -> torch.Tensor:
    loss, _, _ = LigerFusedLinearDPOFunction.preference_loss_fn(
        x["chosen_logps"],
        x["rejected_logps"],
        _full_target(x),
        x["ref_chosen_logps"],
        x["ref_rejected_logps"],
        beta=hp["beta"],
        loss_type=loss_type,
        label_smoothing=hp.get("label_smoothing", 0.0),
        discopop_tau=hp.get("discopop_tau", 0.05),
    )
    return loss


def liger_cpo(x: Inputs, hp: dict) -> torch.Tensor:
    loss, _, _ = LigerFusedLinearCPOFunction.preference_loss_fn(
        x["chosen_logps"], x["rejected_logps"], _full_target(x), beta=hp["beta"], label_smoothing=hp["label_smoothing"]
    )
    return loss


def liger_simpo(x: Inputs, hp: dict) -> torch.Tensor:
    chosen, rejected = _averages(x)
    loss, _, _ = LigerFusedLinearSimPOFunction.preference_loss_fn(
        chosen, rejected, _full_target(x), beta=hp["beta"], gamma=hp["gamma"], label_smoothing=hp["label_smoothing"]
    )
    return loss


def liger_orpo(x: Inputs, hp: dict) -> torch.Tensor:
    chosen, rejected = _averages(x)
    loss, *_ = LigerFusedLinearORPOFunction.preference_loss_fn(chosen, rejected, _full_target(x), beta=hp["beta"])
    return loss


def _trainer_stub(**attrs) -> SimpleNamespace:
    """The attributes TRL's loss methods read from ``self``."""
    return SimpleNamespace(accelerator=SimpleNamespace(device="cpu"), **attrs)


def trl_cpo(loss_type: str, x: Inputs, hp: dict) -> torch.Tensor:
    if loss_type == "simpo":
        chosen, rejected = _averages(x)
    else:
        chosen, rejected = x["chosen_logps"], x["rejected_logps"]
    stub = _trainer_stub(
        alpha=0.0,  # TRL's alpha is AlphaPO's reward exponent (0: plain log-probs), not dpalogic's NLL weight
        beta=hp["beta"],
        label_smoothing=hp.get("label_smoothing", 0.0),
        loss_type=loss_type,
        simpo_gamma=hp.get("gamma", 0.5),
    )
    losses, _, _ = CPOTrainer.cpo_loss(stub, chosen, rejected)
    return losses.mean()


def trl_orpo(x: Inputs, hp: dict) -> torch.Tensor:
    chosen, rejected = _averages(x)
    losses, *_ = ORPOTrainer.odds_ratio_loss(_trainer_stub(beta=hp["beta"]), chosen, rejected)
    return -losses.mean()  # TRL returns beta * log σ(log odds): the negated loss


def _normalized_margin(x: Inputs) -> torch.Tensor:
    """d = (logp_w − ref_w)/n_w − (logp_l − ref_l)/n_l with lengths clamped to ≥ 1."""
    n_w = x["chosen_lengths"].to(F64).clamp(min=1.0)
    n_l = x["rejected_lengths"].to(F64).clamp(min=1.0)
    return (x["chosen_logps"] - x["ref_chosen_logps"]) / n_w - (x["rejected_logps"] - x["ref_rejected_logps"]) / n_l


def exo_pair_equation(x: Inputs, hp: dict) -> torch.Tensor:
    """EXO-pref, K = 2 (Ji et al. 2024, Eq. 16): KL([σ(z), σ(−z)] ‖ [1 − ε, ε]) with z = β·(DPO margin)."""
    eps = hp["label_smoothing"]
    z = hp["beta"] * ((x["chosen_logps"] - x["ref_chosen_logps"]) - (x["rejected_logps"] - x["ref_rejected_logps"]))
    log_q, log_1mq = F.logsigmoid(z), F.logsigmoid(-z)
    kl = log_q.exp() * (log_q - math.log1p(-eps)) + log_1mq.exp() * (log_1mq - math.log(eps))
    return kl.mean()


def ipo_equation(x: Inputs, hp: dict) -> torch.Tensor:
    """TRL DPOTrainer loss_type="ipo": (d − 1/(2β))², d on length-normalized log-ratios."""
    return ((_normalized_margin(x) - 1 / (2 * hp["beta"])) ** 2).mean()


def sigmoid_norm_equation(x: Inputs, hp: dict) -> torch.Tensor:
    """TRL DPOTrainer loss_type="sigmoid_norm": −log σ(β·d)."""
    return (-F.logsigmoid(hp["beta"] * _normalized_margin(x))).mean()


# ---------------------------------------------------------------- the mapping table


@dataclass(frozen=True)
class Case:
    name: str  # dpalogic catalog name
    hp: dict  # dpalogic hyperparameters (the reference gets the same values)
    reference: Callable[[Inputs, dict], torch.Tensor]
    keys: tuple[str, ...]  # the log-prob inputs the loss uses (gradients are compared for each)
    lengths: bool = False  # length-normalized: lengths are passed, averages are realistic per-token values
    tol: Tol = FP64
    extremes: tuple[float, ...] = EXTREMES


POLICY = LOGP_KEYS[:2]

CASES = [
    pytest.param(Case("dpo", {"beta": 0.1}, partial(liger_dpo, "sigmoid"), LOGP_KEYS), id="liger-dpo"),
    pytest.param(Case("dpo", {"beta": 0.5}, partial(liger_dpo, "sigmoid"), LOGP_KEYS), id="liger-dpo-beta0.5"),
    pytest.param(Case("hinge", {"beta": 0.1}, partial(liger_dpo, "hinge"), LOGP_KEYS), id="liger-hinge"),
    pytest.param(
        Case(
            "exo_pair", {"beta": 0.1, "label_smoothing": 1e-3}, partial(liger_dpo, "exo_pair"), LOGP_KEYS, tol=LIGER_EXO
        ),
        id="liger-exo_pair",
    ),
    pytest.param(
        Case(
            "exo_pair", {"beta": 0.2, "label_smoothing": 0.2}, partial(liger_dpo, "exo_pair"), LOGP_KEYS, tol=LIGER_EXO
        ),
        id="liger-exo_pair-ls0.2",
    ),
    pytest.param(
        Case("exo_pair", {"beta": 0.2, "label_smoothing": 0.2}, exo_pair_equation, LOGP_KEYS), id="eq-exo_pair-ls0.2"
    ),
    pytest.param(Case("nca_pair", {"beta": 0.1}, partial(liger_dpo, "nca_pair"), LOGP_KEYS), id="liger-nca_pair"),
    pytest.param(
        Case("robust", {"beta": 0.1, "label_smoothing": 0.0}, partial(liger_dpo, "robust"), LOGP_KEYS),
        id="liger-robust-ls0",
    ),
    pytest.param(
        Case("robust", {"beta": 0.1, "label_smoothing": 0.1}, partial(liger_dpo, "robust"), LOGP_KEYS),
        id="liger-robust-ls0.1",
    ),
    pytest.param(Case("bco_pair", {"beta": 0.1}, partial(liger_dpo, "bco_pair"), LOGP_KEYS), id="liger-bco_pair"),
    pytest.param(Case("sppo_hard", {"beta": 0.1}, partial(liger_dpo, "sppo_hard"), LOGP_KEYS), id="liger-sppo_hard"),
    pytest.param(Case("apo_zero", {"beta": 0.1}, partial(liger_dpo, "apo_zero"), LOGP_KEYS), id="liger-apo_zero"),
    pytest.param(Case("apo_down", {"beta": 0.1}, partial(liger_dpo, "apo_down"), LOGP_KEYS), id="liger-apo_down"),
    pytest.param(
        Case("discopop", {"beta": 0.1, "discopop_tau": 0.05}, partial(liger_dpo, "discopop"), LOGP_KEYS),
        id="liger-discopop",
    ),
    pytest.param(
        Case("cpo", {"beta": 0.1, "label_smoothing": 0.0, "alpha": 0.0}, liger_cpo, POLICY), id="liger-cpo-ls0"
    ),
    pytest.param(
        Case("cpo", {"beta": 0.1, "label_smoothing": 0.2, "alpha": 0.0}, liger_cpo, POLICY), id="liger-cpo-ls0.2"
    ),
    pytest.param(
        Case("simpo", {"beta": 0.1, "gamma": 0.5, "label_smoothing": 0.0}, liger_simpo, POLICY, lengths=True),
        id="liger-simpo",
    ),
    pytest.param(
        Case("simpo", {"beta": 2.5, "gamma": 1.4, "label_smoothing": 0.15}, liger_simpo, POLICY, lengths=True),
        id="liger-simpo-gamma1.4-ls0.15",
    ),
    pytest.param(
        Case("orpo", {"beta": 0.1, "alpha": 0.0}, liger_orpo, POLICY, lengths=True, extremes=LIGER_ORPO_EXTREMES),
        id="liger-orpo",
    ),
    pytest.param(
        Case("orpo", {"beta": 0.5, "alpha": 0.0}, liger_orpo, POLICY, lengths=True, extremes=LIGER_ORPO_EXTREMES),
        id="liger-orpo-beta0.5",
    ),
    pytest.param(
        Case("cpo", {"beta": 0.1, "label_smoothing": 0.0, "alpha": 0.0}, partial(trl_cpo, "sigmoid"), POLICY),
        id="trl-cpo-sigmoid",
    ),
    pytest.param(
        Case("cpo", {"beta": 0.3, "label_smoothing": 0.2, "alpha": 0.0}, partial(trl_cpo, "sigmoid"), POLICY),
        id="trl-cpo-sigmoid-ls0.2",
    ),
    pytest.param(
        Case("slic", {"beta": 0.1, "alpha": 0.0}, partial(trl_cpo, "hinge"), POLICY),
        id="trl-cpo-hinge-slic",
    ),
    pytest.param(
        Case(
            "simpo",
            {"beta": 2.0, "gamma": 1.0, "label_smoothing": 0.1},
            partial(trl_cpo, "simpo"),
            POLICY,
            lengths=True,
        ),
        id="trl-cpo-simpo",
    ),
    pytest.param(
        Case("orpo", {"beta": 0.1, "alpha": 0.0}, trl_orpo, POLICY, lengths=True, tol=FP32),
        id="trl-orpo-fp32",
    ),
    pytest.param(Case("ipo", {"beta": 0.1}, ipo_equation, LOGP_KEYS, lengths=True), id="eq-ipo"),
    pytest.param(Case("ipo", {"beta": 0.5}, ipo_equation, LOGP_KEYS, lengths=True), id="eq-ipo-beta0.5"),
    pytest.param(
        Case("sigmoid_norm", {"beta": 0.1}, sigmoid_norm_equation, LOGP_KEYS, lengths=True), id="eq-sigmoid_norm"
    ),
]


# ---------------------------------------------------------------- inputs


def sequence_logps(gen: torch.Generator, n: int) -> torch.Tensor:
    """Summed sequence log-probs, −Exponential(1) times a scale drawn per entry from SCALES."""
    scale = torch.tensor(SCALES, dtype=F64)[torch.randint(len(SCALES), (n,), generator=gen)]
    return -torch.empty(n, dtype=F64).exponential_(1.0, generator=gen) * scale


def token_average_logps(gen: torch.Generator, n: int) -> torch.Tensor:
    """Per-token average log-probs, log-uniform in (−5, −0.01)."""
    lo, hi = math.log(0.01), math.log(5.0)
    return -torch.exp(lo + (hi - lo) * torch.rand(n, dtype=F64, generator=gen))


def random_inputs(case: Case, seed: int, n: int = BATCH) -> Inputs:
    gen = torch.Generator().manual_seed(seed)
    x: Inputs = {}
    if case.lengths:
        x["chosen_lengths"] = torch.randint(1, 65, (n,), generator=gen)
        x["rejected_lengths"] = torch.randint(1, 65, (n,), generator=gen)
    for key in case.keys:
        if case.lengths and key in POLICY:  # realistic per-token averages, summed over the answer
            length = x[LENGTH_KEYS[POLICY.index(key)]]
            x[key] = token_average_logps(gen, n) * length
        else:
            x[key] = sequence_logps(gen, n)
    return x


def extreme_inputs(case: Case) -> Inputs:
    """Every combination of the case's extremes over the used log-prob inputs (and of EXTREME_LENGTHS for the policy)."""
    if case.lengths and len(case.keys) == 2:
        grid = list(itertools.product(case.extremes, case.extremes, EXTREME_LENGTHS, EXTREME_LENGTHS))
        cols = list(zip(*grid))
        x = {key: torch.tensor(col, dtype=F64) for key, col in zip(case.keys, cols[:2])}
        x.update({key: torch.tensor(col) for key, col in zip(LENGTH_KEYS, cols[2:])})
        return x
    grid = list(itertools.product(case.extremes, repeat=len(case.keys)))
    x = {key: torch.tensor(col, dtype=F64) for key, col in zip(case.keys, zip(*grid))}
    if case.lengths:  # lengths cycle independently of the log-probs
        i, m = torch.arange(len(grid)), len(EXTREME_LENGTHS)
        x["chosen_lengths"] = torch.tensor(EXTREME_LENGTHS)[i % m]
        x["rejected_lengths"] = torch.tensor(EXTREME_LENGTHS)[(i // m) % m]
    return x


# ---------------------------------------------------------------- evaluation


@dataclass
class Evaluated:
    per_pair: torch.Tensor  # [B], detached
    mean: torch.Tensor  # scalar, detached
    grads: dict[str, torch.Tensor]  # d mean / d input, per used log-prob input


def _leaves(x: Inputs, keys: tuple[str, ...]) -> Inputs:
    return {k: (v.detach().clone().requires_grad_(True) if k in keys else v.clone()) for k, v in x.items()}


def _slice(x: Inputs, i: int) -> Inputs:
    return {k: v[i : i + 1] for k, v in x.items()}


def evaluate_ours(case: Case, x: Inputs) -> Evaluated:
    leaves = _leaves(x, case.keys)
    mean = PreferenceLoss(case.name, reduction="mean", **case.hp)(**leaves)
    mean.backward()
    with torch.no_grad():
        per_pair = PreferenceLoss(case.name, reduction="none", **case.hp)(**leaves)
    return Evaluated(per_pair, mean.detach(), {k: leaves[k].grad for k in case.keys})


def evaluate_reference(case: Case, x: Inputs) -> Evaluated:
    leaves = _leaves(x, case.keys)
    mean = case.reference(leaves, case.hp)  # one batched call: the scalar the reference reports
    mean.backward()
    with torch.no_grad():  # per pair: the same reference on one-pair batches
        per_pair = torch.stack([case.reference(_slice(x, i), case.hp) for i in range(len(x[case.keys[0]]))])
    return Evaluated(per_pair.to(F64), mean.detach().to(F64), {k: leaves[k].grad for k in case.keys})


def assert_matches(ours: Evaluated, ref: Evaluated, tol: Tol) -> None:
    """Equal values and gradients wherever the reference is finite; dpalogic finite everywhere."""
    assert ours.per_pair.dtype == F64
    assert torch.isfinite(ours.per_pair).all(), "dpalogic loss is not finite"
    for k, g in ours.grads.items():
        assert torch.isfinite(g).all(), f"dpalogic gradient w.r.t. {k} is not finite"

    close = partial(torch.testing.assert_close, rtol=tol.rtol, atol=tol.atol)
    ok = torch.isfinite(ref.per_pair)
    assert ok.any(), "the reference loss is finite nowhere: nothing was compared"
    close(ours.per_pair[ok], ref.per_pair[ok], msg=lambda m: f"per-pair loss: {m}")
    if ok.all():
        close(ours.mean, ref.mean, msg=lambda m: f"batch mean: {m}")
    for k in ours.grads:  # each entry of d mean / d x depends on its own pair only
        ok = torch.isfinite(ref.grads[k])
        assert ok.any(), f"the reference gradient w.r.t. {k} is finite nowhere"
        close(ours.grads[k][ok], ref.grads[k][ok], atol=tol.grad_atol, msg=lambda m, k=k: f"d mean loss / d {k}: {m}")


# ---------------------------------------------------------------- tests


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("case", CASES)
def test_matches_reference_random(case: Case, seed: int) -> None:
    x = random_inputs(case, seed)
    ours, ref = evaluate_ours(case, x), evaluate_reference(case, x)
    assert torch.isfinite(ref.per_pair).all(), "random inputs should keep the reference finite"
    assert_matches(ours, ref, case.tol)


@pytest.mark.parametrize("case", CASES)
def test_matches_reference_extremes(case: Case) -> None:
    x = extreme_inputs(case)
    assert_matches(evaluate_ours(case, x), evaluate_reference(case, x), case.tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dpo_low_precision_inputs(dtype: torch.dtype) -> None:
    """float32/bfloat16 inputs give a float32 loss close to float64 on the same (rounded) inputs, finite gradients."""
    gen = torch.Generator().manual_seed(7)
    x = {k: (-torch.empty(64, dtype=F64).exponential_(1.0, generator=gen) * 20.0).to(dtype) for k in LOGP_KEYS}
    leaves = {k: v.clone().requires_grad_(True) for k, v in x.items()}
    loss_fn = PreferenceLoss("dpo", beta=0.1, reduction="none")

    per_pair = loss_fn(**leaves)
    exact = loss_fn(**{k: v.to(F64) for k, v in x.items()})  # the rounded inputs, exactly, in float64
    assert per_pair.dtype == torch.float32
    torch.testing.assert_close(per_pair.to(F64), exact, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(per_pair.mean().to(F64), exact.mean(), rtol=1e-5, atol=0.0)

    per_pair.mean().backward()
    for k, leaf in leaves.items():
        assert leaf.grad is not None and leaf.grad.dtype == dtype, k
        assert torch.isfinite(leaf.grad.float()).all(), k
        assert leaf.grad.float().abs().sum() > 0, k
