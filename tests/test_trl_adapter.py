"""The TRL adapter: TRL 1.16's DPOTrainer with dpalogic losses, on the tiny offline model.

The trainer's loss is checked against two independent computations on the same batch: dpalogic's PreferenceLoss
on log-probs from a plain forward pass (logits → log-softmax), and TRL's own DPOTrainer for the losses TRL has.
"""

from __future__ import annotations

import copy

import pytest
import torch

pytest.importorskip("trl")

from datasets import Dataset  # noqa: E402
from trl import DPOConfig, DPOTrainer  # noqa: E402

from dpalogic.integrations.trl import DPALogicDPOTrainer  # noqa: E402
from dpalogic.runtime.preference_loss import PreferenceLoss  # noqa: E402
from dpalogic.training.demo import make_task  # noqa: E402
from dpalogic.training.model import build_char_tokenizer, build_tiny_model, sequence_logps  # noqa: E402

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def setup():
    tok = build_char_tokenizer()
    rows, _ = make_task(32, 4, seed=0)
    return tok, Dataset.from_list(rows)


def config(tmp_path, **kw) -> DPOConfig:
    base = dict(
        output_dir=str(tmp_path),
        report_to="none",
        per_device_train_batch_size=4,
        max_steps=3,
        learning_rate=1e-3,
        logging_steps=1,
        save_strategy="no",
        use_cpu=True,
        bf16=False,  # TRL's default is bf16; accelerate fixes precision once per process, and dpalogic's runs are fp32
        disable_tqdm=True,
    )
    base.update(kw)
    return DPOConfig(**base)


def first_batch(trainer):
    return trainer.data_collator([trainer.train_dataset[i] for i in range(4)])


def plain_logps(model, batch):
    """Summed completion log-probs from the ordinary forward pass (no fused head): the independent reference."""
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    labels = batch["input_ids"].masked_fill(batch["completion_mask"] == 0, -100)
    return sequence_logps(logits, labels).chunk(2)


@pytest.mark.parametrize(
    "loss, loss_kwargs",
    [("dpo", {}), ("simpo", {}), ("(M(yl) -> M(yw), M(yw) | M(yl))", {"beta": 0.5}), ("orpo", {"alpha": 0.3})],
)
def test_trainer_loss_equals_dpalogic_loss_on_the_same_logps(setup, tmp_path, loss, loss_kwargs):
    tok, ds = setup
    model = build_tiny_model(tok, seed=0)
    initial = copy.deepcopy(model)
    trainer = DPALogicDPOTrainer(
        model=model, args=config(tmp_path), train_dataset=ds, processing_class=tok, loss=loss, loss_kwargs=loss_kwargs
    )
    fn = PreferenceLoss(loss, **loss_kwargs)
    assert (trainer.ref_model is not None) == fn.needs_reference  # reference-free losses keep no reference
    batch = first_batch(trainer)
    trainer.model.eval()
    with torch.no_grad():
        got = trainer.compute_loss(trainer.model, batch)
    c, r = plain_logps(initial, batch)
    lc, lr = batch["completion_mask"].sum(1).float().chunk(2)
    # before training the reference equals the initial policy
    want = fn(c, r, c, r, lc, lr) if fn.needs_reference else fn(c, r, chosen_lengths=lc, rejected_lengths=lr)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)

    # and it trains: finite logged losses, weights moved, TRL's metrics present
    trainer.model.train()
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logs) == 3 and all(torch.isfinite(torch.tensor(h["loss"])) for h in logs)
    assert "rewards/accuracies" in logs[0] and "logps/chosen" in logs[0]
    moved = sum((p - q).abs().sum().item() for p, q in zip(trainer.model.parameters(), initial.parameters()))
    assert moved > 0


@pytest.mark.parametrize("dpalogic_name, trl_type", [("dpo", "sigmoid"), ("ipo", "ipo"), ("hinge", "hinge")])
def test_same_loss_as_trls_own_implementation(setup, tmp_path, dpalogic_name, trl_type):
    tok, ds = setup
    ours = DPALogicDPOTrainer(
        model=build_tiny_model(tok, seed=0),
        args=config(tmp_path / "a", beta=0.3),  # a DPOConfig beta that differs from the default is honoured
        train_dataset=ds,
        processing_class=tok,
        loss=dpalogic_name,
    )
    assert ours.dpalogic_loss.hyperparameters["beta"] == pytest.approx(0.3)
    model = build_tiny_model(tok, seed=0)
    theirs = DPOTrainer(
        model=model,
        ref_model=copy.deepcopy(model),
        args=config(tmp_path / "b", beta=0.3, loss_type=[trl_type]),
        train_dataset=ds,
        processing_class=tok,
    )
    batch = first_batch(ours)
    # make the policy differ from the reference so the loss is not at its trivial value
    for t in (ours, theirs):
        torch.manual_seed(1)
        with torch.no_grad():
            for p in t.model.parameters():
                p.add_(0.05 * torch.randn_like(p))
        t.model.eval()
    with torch.no_grad():
        a = ours.compute_loss(ours.model, batch)
        b = theirs.compute_loss(theirs.model, batch)
    assert abs(a.item() - {"sigmoid": 0.6931, "ipo": (1 / 0.6) ** 2, "hinge": 1.0}[trl_type]) > 1e-3
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_logged_rewards_use_the_losss_beta(setup, tmp_path):
    tok, ds = setup
    model = build_tiny_model(tok, seed=0)
    initial = copy.deepcopy(model)
    trainer = DPALogicDPOTrainer(  # DPOConfig keeps TRL's default beta 0.1; the loss's beta is 0.5
        model=model,
        args=config(tmp_path),
        train_dataset=ds,
        processing_class=tok,
        loss="ccpo",
        loss_kwargs={"beta": 0.5},
    )
    batch = first_batch(trainer)
    trainer.model.eval()
    with torch.no_grad():
        trainer.compute_loss(trainer.model, batch)
    logged = [v for mode in trainer._metrics.values() for v in mode.get("rewards/chosen", [])]
    c, _ = plain_logps(initial, batch)
    assert logged[-1] == pytest.approx(0.5 * c.mean().item(), rel=1e-4)  # reference-free reward: β·log π(yw)
