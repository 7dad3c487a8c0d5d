"""Triple Preference Optimization (TPO) as catalog programs over y1 (gold), y2 (preferred), y3 (rejected).

TRL 1.16's ``TPOTrainer._compute_loss`` is called, not copied, on a stand-in ``self`` and a stand-in model whose
logits are the test's leaf tensor: TRL takes per-token log-probs and the gold answer's cross-entropy from those logits
itself, and dpalogic gets the same sequences' summed log-probs and token counts (computed here with
``log_softmax``), so values *and gradients* with respect to the same logits are compared, for every TRL loss type.
TRL averages the gold tokens over the whole batch and dpalogic per answer (the catalog's NLL convention): the two are
equal when the gold answers have equal lengths, and otherwise differ by exactly the closed form checked below.
"""

from __future__ import annotations

import dataclasses
import json
import math
import warnings
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from dpalogic import PreferenceLoss
from dpalogic.cli import main
from dpalogic.errors import DPALogicError
from dpalogic.semantics.catalog import entries, lookup
from dpalogic.training.config import check_loss
from dpalogic.training.ranking_demo import make_ranking_task

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from trl.experimental.tpo.tpo_config import TPOConfig
    from trl.experimental.tpo.tpo_trainer import TPOTrainer

torch.set_num_threads(1)  # two xdist workers share two cores
F64 = torch.float64
# TRL's loss_type → the catalog program, and the hyperparameters each one takes
NAMES = {"sigmoid": "tpo", "hinge": "tpo_hinge", "ipo": "tpo_ipo", "tpo-l": "tpo_l"}
TPO_HP = ("beta", "label_smoothing", "tpo_alpha", "tpo_l_gamma")


def test_every_trl_loss_type_is_a_catalog_program_with_trls_names_and_defaults():
    loss_type = next(f for f in dataclasses.fields(TPOConfig) if f.name == "loss_type")
    assert set(loss_type.metadata["choices"]) == set(NAMES)  # a new TRL loss type makes this fail
    trl_defaults = {f.name: f.default for f in dataclasses.fields(TPOConfig) if f.name in TPO_HP}
    for trl_type, name in NAMES.items():
        e = entries()[name]
        assert e.trl_name == f"{trl_type} (TPOTrainer)" and "2405.16681" in e.citation
        assert e.program.atoms == lookup(name).program.atoms and [a.name for a in e.program.atoms] == [
            "M(y1)",
            "M(y2)",
            "M(y3)",
        ]
        for k, v in e.program.defaults.items():
            assert trl_defaults[k] == v, (name, k)
    assert set(entries()["tpo_l"].program.defaults) == set(TPO_HP)
    assert set(entries()["tpo_hinge"].program.defaults) == {"beta", "tpo_alpha"}  # TRL ignores label smoothing there
    assert lookup("tpo-l").name == "tpo_l"


# ---------------------------------------------------------------------------------------------- TRL's trainer


def trl_tpo(loss_type: str, logits, input_ids, completion_mask, hp: dict) -> torch.Tensor:
    """TRL's TPOTrainer loss on a batch laid out as TRL's collator does: [chosen, rejected(, gold)]."""
    ident = lambda t: t  # noqa: E731 - one process: gathering is the identity
    stub = SimpleNamespace(
        accelerator=SimpleNamespace(device="cpu", gather=ident, gather_for_metrics=ident),
        model=SimpleNamespace(training=True), loss_type=loss_type, beta=hp["beta"], tpo_alpha=hp["tpo_alpha"],
        label_smoothing=hp.get("label_smoothing", 0.0), tpo_l_gamma=hp.get("tpo_l_gamma", 0.5),
        _metrics=defaultdict(lambda: defaultdict(list)), _total_train_tokens=0, _tp_size=1,
    )  # fmt: skip
    model = lambda **kw: SimpleNamespace(logits=logits)  # noqa: E731 - the logits are the test's leaf
    inputs = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "completion_mask": completion_mask}
    return TPOTrainer._compute_loss(stub, model, inputs, return_outputs=False)


def answer_logps(logits, input_ids, completion_mask) -> tuple[torch.Tensor, torch.Tensor]:
    """Each sequence's summed completion log-prob and token count, written out with log_softmax."""
    lp = logits[:, :-1].log_softmax(-1).gather(-1, input_ids[:, 1:, None])[..., 0]
    mask = completion_mask[:, 1:].to(lp.dtype)
    return (lp * mask).sum(1), mask.sum(1)


def batch(seed: int, B: int, scale: float, equal_gold: bool, T: int = 10, V: int = 13):
    """Logits [3B, T, V] (a leaf), token ids and completion masks: rows [chosen; rejected; gold], a 2-token prompt,
    then 1 … T − 3 completion tokens and padding."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, V, (3 * B, T), generator=g)
    lengths = torch.randint(1, T - 2, (3 * B,), generator=g)
    if equal_gold:
        lengths[2 * B :] = lengths[2 * B]
    mask = (torch.arange(T) >= 2) & (torch.arange(T) < 2 + lengths[:, None])
    logits = (torch.randn(3 * B, T, V, generator=g, dtype=F64) * scale).requires_grad_()
    return logits, ids, mask.long()


def as_columns(x: torch.Tensor, B: int) -> torch.Tensor:
    """[3B] in TRL's order (chosen, rejected, gold) → [B, 3] in dpalogic's (y1 gold, y2 preferred, y3 rejected)."""
    chosen, rejected, gold = x.view(3, B)
    return torch.stack([gold, chosen, rejected], 1)


def grads(loss, leaf):
    return torch.autograd.grad(loss, leaf, retain_graph=True)[0]


@settings(max_examples=30, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    B=st.integers(1, 4),
    scale=st.sampled_from([0.1, 1.0, 4.0]),
    loss_type=st.sampled_from(sorted(NAMES)),
    beta=st.sampled_from([0.01, 0.1, 0.7, 2.0]),
    ls=st.sampled_from([0.0, 0.2]),
    tpo_alpha=st.sampled_from([0.0, 0.5, 1.0]),
    gamma=st.sampled_from([0.0, 0.5, 1.3]),
    equal_gold=st.booleans(),
)
def test_equals_trls_tpo_loss_values_and_gradients(seed, B, scale, loss_type, beta, ls, tpo_alpha, gamma, equal_gold):
    name = NAMES[loss_type]
    hp = {k: v for k, v in dict(beta=beta, label_smoothing=ls, tpo_alpha=tpo_alpha, tpo_l_gamma=gamma).items()
          if k in entries()[name].program.defaults}  # fmt: skip
    logits, ids, mask = batch(seed, B, scale, equal_gold)
    # with tpo_alpha = 0 TRL's collator drops the gold sequences, so its batch is [chosen; rejected]
    n = 3 if tpo_alpha else 2
    theirs = trl_tpo(loss_type, logits[: n * B], ids[: n * B], mask[: n * B], hp)
    lp, lens = answer_logps(logits, ids, mask)
    logps, lengths = as_columns(lp, B), as_columns(lens, B)
    ours = PreferenceLoss(name, **hp)(logps=logps, lengths=lengths)
    # TRL's NLL is the gold tokens' mean over the batch, dpalogic's the mean of each gold answer's token mean
    gold_lp, gold_len = logps[:, 0], lengths[:, 0]
    difference = tpo_alpha * ((-gold_lp / gold_len).mean() - (-gold_lp.sum() / gold_len.sum()))
    if equal_gold:
        assert abs(difference.item()) < 1e-12
    torch.testing.assert_close(ours, theirs + difference, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(grads(ours, logits), grads(theirs + difference, logits), rtol=1e-9, atol=1e-12)


# ---------------------------------------------------------------------------------------------- the [B, 3] form


def k3_inputs(seed: int, B: int = 6):
    g = torch.Generator().manual_seed(seed)
    logps = (-torch.rand(B, 3, generator=g, dtype=F64) * 30).requires_grad_()
    lengths = torch.randint(1, 25, (B, 3), generator=g)
    return logps, lengths


@pytest.mark.parametrize("name", sorted(NAMES.values()))
def test_the_matrix_form_is_the_named_form(name):
    logps, lengths = k3_inputs(1)
    hp = {k: v for k, v in dict(beta=0.3, label_smoothing=0.1, tpo_alpha=0.7, tpo_l_gamma=0.2).items()
          if k in entries()[name].program.defaults}  # fmt: skip
    fn = PreferenceLoss(name, reduction="none", **hp)
    matrix = fn(logps=logps, lengths=lengths)
    named = fn(
        logps={f"M(y{j + 1})": logps[:, j] for j in range(3)}, lengths={f"y{j + 1}": lengths[:, j] for j in range(3)}
    )
    # on the CPU the matrix form runs the vectorized K-answer evaluator, the named form the compiled twin: two
    # evaluations of one program, equal to round-off
    torch.testing.assert_close(matrix, named, rtol=1e-12, atol=1e-12)
    g1 = torch.autograd.grad(matrix.sum(), logps)[0]
    g2 = torch.autograd.grad(named.sum(), logps)[0]
    torch.testing.assert_close(g1, g2, rtol=1e-12, atol=1e-12)


def test_a_margin_shifts_the_preference_terms_only():
    # TPO-L written out: z = β·(logp₂/len₂ − logp₃/len₃) − γ − m; NLL of the gold y1 per token, untouched by m
    logps, lengths = k3_inputs(2)
    margin = torch.linspace(-2, 2, logps.shape[0], dtype=F64)
    b, ls, a, gamma = 0.4, 0.15, 0.6, 0.3
    got = PreferenceLoss("tpo_l", reduction="none", beta=b, label_smoothing=ls, tpo_alpha=a, tpo_l_gamma=gamma)(
        logps=logps, lengths=lengths, margin=margin
    )
    norm = logps.detach() / lengths
    z = b * (norm[:, 1] - norm[:, 2]) - gamma - margin
    want = (1 - ls) * F.softplus(-z) + ls * F.softplus(z) - a * norm[:, 0]
    torch.testing.assert_close(got.detach(), want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", sorted(NAMES.values()))
def test_gradients_match_finite_differences(name):
    logps, lengths = k3_inputs(3, B=4)
    fn = PreferenceLoss(name, reduction="sum", beta=0.5)
    assert torch.autograd.gradcheck(lambda x: fn(logps=x, lengths=lengths), (logps.detach().requires_grad_(),))


EXTREMES = torch.tensor([0.0, -1e-12, -1e-6, -0.6931, -5.0, -80.0, -1e4])


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", sorted(NAMES.values()))
def test_finite_values_and_gradients_at_extremes(name, dtype):
    grid = torch.cartesian_prod(EXTREMES, EXTREMES, EXTREMES).to(dtype).requires_grad_()  # every (y1, y2, y3)
    out = PreferenceLoss(name, reduction="none")(logps=grid, lengths=torch.full(grid.shape, 5))
    assert torch.isfinite(out).all()
    out.sum().backward()
    assert torch.isfinite(grid.grad.float()).all()


@pytest.mark.parametrize("name", sorted(NAMES.values()))
@pytest.mark.parametrize("beta", [-0.5, 0.3])
def test_beta_is_accepted_exactly_when_the_loss_penalizes_the_rejected_answer(name, beta):
    logps = torch.full((1, 3), -2.0, dtype=F64, requires_grad=True)
    PreferenceLoss(name, beta=beta)(logps=logps, lengths=torch.ones(1, 3)).backward()
    penalizes = logps.grad[0, 2].item() > 0  # a likelier rejected y3 costs
    try:
        check_loss(name, {"beta": beta})
        accepted = True
    except DPALogicError as e:
        assert "rewards the rejected answer" in str(e)
        accepted = False
    assert accepted == penalizes == (beta > 0)
    with pytest.raises(DPALogicError, match="NLL weight tpo_alpha = -1 must not be negative"):
        check_loss(name, {"tpo_alpha": -1.0})


# ---------------------------------------------------------------------------------------------- the CLI


def test_show_tpo(capsys):
    assert main(["show", "tpo-l"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("tpo_l — TPO-L") and "Saeidi et al. 2024, arXiv:2405.16681" in out
    assert "tpo_alpha=1" in out and "tpo_l_gamma=0.5" in out and "beta=0.01" in out
    assert "M(y1)" in out and "p_2/p_3" in out and "TRL TPOTrainer 'tpo-l'" in out
    assert "same structure as: tpo, tpo_hinge, tpo_ipo" in out


def test_train_tpo_on_three_ranked_answers(tmp_path):
    tr, ev = make_ranking_task(48, 16, seed=3)

    def k3(rows):  # the three best answers: y1 (score 0) is the gold one
        out = []
        for r in rows:
            keep = sorted(range(4), key=lambda i: -r["scores"][i])[:3]
            out.append({"prompt": r["prompt"], "responses": [r["responses"][i] for i in keep],
                        "scores": [r["scores"][i] for i in keep]})  # fmt: skip
        return out

    for path, rows in (("train.jsonl", k3(tr)), ("eval.jsonl", k3(ev))):
        (tmp_path / path).write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "run"
    argv = ["train", "--loss", "tpo", "--data", str(tmp_path / "train.jsonl"), "--eval", str(tmp_path / "eval.jsonl"),
            "--out", str(out), "--max-steps", "8", "--batch-size", "8", "--lr", "2e-3", "--eval-every", "8",
            "--log-every", "1", "--save-every", "0", "--max-length", "48", "--max-prompt-length", "24",
            "--hp", "beta=0.1", "--no-progress", "--no-tensorboard"]  # fmt: skip
    assert main(argv) == 0
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    evals = [h for h in log if h.get("split") == "eval"]
    trains = [h for h in log if h.get("split") == "train"]
    assert [e["step"] for e in evals] == [0, 8] and len(trains) == 8
    assert all(math.isfinite(h["loss"]) for h in evals + trains)
    assert evals[-1]["loss"] < evals[0]["loss"]
    assert sum(t["loss"] for t in trains[-3:]) < sum(t["loss"] for t in trains[:3])
    assert evals[-1]["logps_best"] > evals[0]["logps_best"]  # the NLL term raises the gold answer
