"""LoRA (``--lora-r``): the tiny model learns the demo task through an adapter; the adapter is saved in peft's layout
and loads with ``PeftModel.from_pretrained``; the reference is the base model with the adapter switched off.

References: the held-out accuracy is recomputed from the saved adapter loaded by peft itself (not the loop's numbers);
the live reference run is compared with a run on cached reference log-probs; resumed runs bit for bit with the
uninterrupted run.
"""

from __future__ import annotations

import pytest
import torch
from test_training import small_cfg, write_jsonl

from dpalogic.cli import main
from dpalogic.training.data import collate, from_records, tokenize_rows
from dpalogic.training.demo import make_task
from dpalogic.training.loop import Trainer, train
from dpalogic.training.model import load_model_and_tokenizer, policy_logps

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def task():
    return make_task(512, 128, seed=3)


def lora_cfg(tmp_path, **kw):
    base = dict(
        loss="dpo",
        out=str(tmp_path / "run"),
        max_steps=30,
        batch_size=16,
        lr=1e-2,
        eval_every=15,
        log_every=1,
        save_every=0,
        progress=False,
        tensorboard=False,
        max_length=64,
        max_prompt_length=32,
        lora_r=8,
    )
    base.update(kw)
    from dpalogic.training.config import TrainConfig

    return TrainConfig(**base)


def held_out_reward_accuracy(model, tok, rows) -> float:
    """Implicit-reward accuracy of ``model`` (a PeftModel) against its own base, recomputed from scratch."""
    data = tokenize_rows(from_records(rows), tok, max_length=64, max_prompt_length=32)
    batch = collate(data.examples, tok.pad_token_id)
    model.eval()
    with torch.no_grad():
        lp = policy_logps(model, batch)
        with model.disable_adapter():
            ref = policy_logps(model, batch)
    n = len(data.examples)
    reward = lp - ref
    return (reward[:n] > reward[n:]).float().mean().item()


def test_lora_learns_the_task_and_saves_a_peft_adapter(tmp_path, task):
    from peft import PeftModel

    tr, ev = task
    res = train(lora_cfg(tmp_path), train_rows=from_records(tr), eval_rows=from_records(ev))
    evals = [h for h in res["history"] if h["split"] == "eval"]
    # at step 0 the adapter is zero (B = 0): policy and reference agree, every reward is 0 and no pair is "won"
    assert evals[0]["reward_accuracy"] == 0.0 and evals[0]["reward_margin"] == 0.0
    assert evals[-1]["reward_accuracy"] > 0.85  # chance is 0.5
    assert evals[-1]["loss"] < evals[0]["loss"] - 0.05  # DPO starts at log 2

    final = tmp_path / "run" / "final"
    assert (final / "adapter_config.json").is_file() and (final / "adapter_model.safetensors").is_file()
    assert not (final / "model.safetensors").exists()  # the adapter only, not the base weights
    base, tok = load_model_and_tokenizer("tiny")  # the same base: built from the seed
    loaded = PeftModel.from_pretrained(base, final)
    acc = held_out_reward_accuracy(loaded, tok, ev)
    assert acc == pytest.approx(evals[-1]["reward_accuracy"], abs=1.5 / len(ev))  # one tie may flip in float32
    # the base weights did not move: only adapter weights were trained
    fresh, _ = load_model_and_tokenizer("tiny")
    with loaded.disable_adapter():
        merged = loaded.get_base_model().state_dict()
        for k, v in fresh.state_dict().items():
            key = k.replace(".weight", ".base_layer.weight") if f"{k[:-7]}.base_layer.weight" in merged else k
            assert torch.equal(merged[key], v), k


def test_live_reference_is_the_base_with_the_adapter_off(tmp_path, task):
    tr, ev = task
    rows = dict(train_rows=from_records(tr[:128]), eval_rows=from_records(ev[:32]))
    t = Trainer(lora_cfg(tmp_path / "live", max_steps=4, eval_every=2, reference="model"), **rows)
    try:
        assert t.ref_model is None  # no second copy of the weights
        t.run()
    finally:
        t.close()
    cached = train(lora_cfg(tmp_path / "cache", max_steps=4, eval_every=2, reference="cache"), **rows)
    assert [h["loss"] for h in t.history] == pytest.approx([h["loss"] for h in cached["history"]], abs=1e-6)
    assert (tmp_path / "cache" / "run" / "ref_logps-train.safetensors").exists()


def test_lora_resume_is_exact_and_checkpoints_hold_only_the_adapter(tmp_path, task):
    from safetensors.torch import load_file

    tr, _ = task
    files = (write_jsonl(tmp_path / "train.jsonl", tr[:256]), None)
    full = tmp_path / "full"
    kw = dict(lora_r=4, lora_targets="q_proj,v_proj", eval=None, lr=1e-2, dropout=0.1)
    train(small_cfg(full, files, save_every=3, **kw))
    saved = load_file(full / "checkpoints" / "step-3" / "model.safetensors")
    assert saved and all("lora_" in k for k in saved)
    assert {k.split(".")[-3] for k in saved} == {"lora_A", "lora_B"}
    assert {k.split(".")[-4] for k in saved} == {"q_proj", "v_proj"}
    part = tmp_path / "part"
    train(small_cfg(part, files, resume=str(full / "checkpoints" / "step-3"), **kw))
    a = load_file(full / "final" / "adapter_model.safetensors")
    b = load_file(part / "final" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert any(b[k].abs().sum() > 0 for k in b if "lora_B" in k)  # the adapter did train


def test_fused_loss_with_lora_matches_the_plain_path(tmp_path, task):
    pytest.importorskip("dpalogic.runtime.fused")
    tr, _ = task
    files = (write_jsonl(tmp_path / "train.jsonl", tr[:128]), None)
    runs = {}
    for name, fused in (("plain", False), ("fused", True)):
        runs[name] = train(
            small_cfg(tmp_path / name, files, eval=None, max_steps=3, loss="simpo", lora_r=4, fused=fused)
        )
    for a, b in zip(runs["plain"]["history"], runs["fused"]["history"]):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5, abs=1e-5)


@pytest.mark.parametrize(
    "flags, fragment",
    [
        (["--lora-r", "4", "--lora-targets", "q_prj"], "unknown LoRA target module 'q_prj'; did you mean 'q_proj'"),
        (["--lora-alpha", "16"], "lora_alpha is set but lora_r is not"),
        (["--lora-r", "0"], "lora_r must be a positive integer"),
        (["--lora-r", "4", "--fused", "--lora-targets", "q_proj,lm_head"], "cannot train a LoRA adapter on lm_head"),
    ],
)
def test_lora_errors_exit_2(flags, fragment, tmp_path, task, capsys):
    data = write_jsonl(tmp_path / "train.jsonl", task[0][:32])
    argv = ["train", "--data", str(data), "--out", str(tmp_path / "o"), "--no-progress", "--max-steps", "1", *flags]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert fragment in err and "Traceback" not in err
