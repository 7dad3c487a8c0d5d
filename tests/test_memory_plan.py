"""``dpalogic train --plan`` against what the tiny model really holds on the CPU.

- Weights, gradients and AdamW state: the plan's bytes must equal, to the byte, the sum over the real run's tensors
  after an optimizer step (with and without LoRA); FSDP's per-process shards must equal ``torch.chunk``'s first chunk
  (how FSDP2 splits dim 0).
- Activations: on the CPU there is no allocator peak counter, and the process's RSS mixes in the Python heap, so the
  measure is the one activation memory *is*: every tensor autograd saves for the backward pass, collected with
  ``torch.autograd.graph.saved_tensors_hooks`` (unique storages, weights excluded). The log-softmax kept for backward
  must match exactly; the layers' estimate (a per-tensor count for a Llama-style layer) must be within 25% of the
  measured bytes, with and without gradient checkpointing (it is within 1% at the time of writing; 25% leaves room
  for a transformers version that saves one more tensor per layer).
- A 7B architecture, planned from transformers' defaults, has the parameter count published for Llama-2-7B.
"""

from __future__ import annotations

import json

import pytest
import torch
from test_training import small_cfg, write_jsonl

from dpalogic.cli import main
from dpalogic.training.demo import make_task
from dpalogic.training.loop import Trainer
from dpalogic.training.model import build_char_tokenizer, build_tiny_model, sequence_logps
from dpalogic.training.plan import layer_activation_elements, model_shape, plan_for

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("plan")
    tr, _ = make_task(64, 8, seed=1)
    return write_jsonl(d / "train.jsonl", tr), None


def nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


@pytest.mark.parametrize("lora", [None, {"lora_r": 4, "lora_targets": "q_proj,v_proj"}, {"lora_r": 2}])
def test_weights_gradients_and_adamw_bytes_are_exact(tmp_path, files, lora):
    cfg = small_cfg(tmp_path / "run", files, eval=None, max_steps=1, **(lora or {}))
    t = Trainer(cfg, quiet=True)
    measured, step = {}, t.optimizer.step

    def measuring_step(*a, **k):
        measured["gradients"] = sum(nbytes(p.grad) for p in t.model.parameters() if p.grad is not None)
        return step(*a, **k)

    t.optimizer.step = measuring_step
    try:
        t.run()
    finally:
        t.close()
    measured["weights"] = sum(nbytes(p) for p in t.model.parameters())
    measured["optimizer"] = sum(
        nbytes(v) for s in t.optimizer.state.values() for v in s.values() if isinstance(v, torch.Tensor)
    )
    plan = plan_for(cfg, gpus=1)
    assert plan.trainable == sum(p.numel() for p in t.model.parameters() if p.requires_grad)
    assert {k: plan.bytes[k] for k in measured} == measured


def test_fsdp_shards_are_torch_chunks():
    model = build_tiny_model(build_char_tokenizer())
    for gpus in (2, 3, 8):
        shape = model_shape("tiny", gpus=gpus)
        first = {n: torch.chunk(p.detach(), gpus, dim=0)[0].numel() for n, p in model.named_parameters()}
        assert shape.shard_rows == first
        cfg = small_cfg("unused", ("x", None), fsdp=True)
        plan = plan_for(cfg, gpus=gpus)
        assert plan.bytes["weights"] == 4 * sum(first.values()) and plan.strategy == "fsdp"
        assert plan_for(cfg, gpus=gpus, strategy="zero3").bytes["optimizer"] == plan.bytes["optimizer"]


def saved_for_backward(checkpointing: bool, batch: int, length: int) -> dict[str, int]:
    """Bytes autograd keeps for backward in one forward of the tiny model (and the log-softmax's share)."""
    tok = build_char_tokenizer()
    model = build_tiny_model(tok)
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    ids = torch.randint(10, len(tok), (2 * batch, length), generator=torch.Generator().manual_seed(0))
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}
    log_softmax: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in weights:
            seen[storage.data_ptr()] = storage.nbytes()
            if tuple(t.shape) == (2 * batch, length - 1, len(tok)) and t.dtype == torch.float32:
                log_softmax[storage.data_ptr()] = storage.nbytes()  # saved twice (log_softmax, gather): once
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        logits = model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False).logits
        sequence_logps(logits, ids).sum().backward()
    return {"total": sum(seen.values()), "log_softmax": sum(log_softmax.values())}


@pytest.mark.parametrize("checkpointing", [False, True])
def test_activation_estimate_against_the_tensors_saved_for_backward(tmp_path, checkpointing):
    batch, length = 8, 64
    cfg = small_cfg(tmp_path, ("x", None), batch_size=batch, max_length=length, max_prompt_length=32, bf16="false")
    cfg.gradient_checkpointing = checkpointing
    plan = plan_for(cfg, gpus=1)
    got = saved_for_backward(checkpointing, batch, length)
    vocab = len(build_char_tokenizer())
    assert got["log_softmax"] == 2 * batch * (length - 1) * vocab * 4  # the plan's float32 log-softmax, exactly
    assert plan.bytes["logits"] == 2 * batch * length * vocab * 4 + got["log_softmax"]
    estimate = plan.bytes["activations"]
    if checkpointing:  # the forward keeps only layer inputs; one layer's activations come back during backward
        f32, mixed = layer_activation_elements(64, 64, 256, 4)
        estimate -= 2 * batch * length * 4 * (f32 + mixed)
    measured = got["total"] - got["log_softmax"]
    assert 0.8 < measured / estimate < 1.25, (measured, estimate)
    if not checkpointing:
        assert plan.activations_other < estimate  # checkpointing saves memory even with two layers


def test_plan_command_for_a_7b_architecture_and_a_local_folder(tmp_path, capsys):
    assert main(["train", "--plan", "--model", "llama", "--fsdp", "--gpus", "8", "--max-length", "2048", "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["params"] == 6_738_415_616  # Llama-2-7B's published parameter count
    assert plan["strategy"] == "fsdp" and plan["gpus"] == 8
    assert plan["bytes"]["weights"] >= 4 * plan["params"] // 8
    assert plan["bytes"]["weights"] < 1.01 * 4 * plan["params"] / 8  # rounding up dim 0 costs little
    assert plan["total"] == sum(plan["bytes"].values())

    # a local folder reads its config.json: the tiny model saved as a checkpoint plans like "tiny"
    tok = build_char_tokenizer()
    build_tiny_model(tok).save_pretrained(tmp_path / "m")
    assert main(["train", "--plan", "--model", str(tmp_path / "m"), "--json"]) == 0
    folder = json.loads(capsys.readouterr().out)
    assert main(["train", "--plan", "--model", "tiny", "--json"]) == 0
    tiny = json.loads(capsys.readouterr().out)
    assert folder["bytes"] == tiny["bytes"] and folder["params"] == tiny["params"]

    assert main(["train", "--plan", "--model", "tiny"]) == 0
    table = capsys.readouterr().out
    assert "memory plan per GPU: tiny" in table and "total" in table and "activations" in table


@pytest.mark.parametrize(
    "argv, fragment",
    [
        (["--plan", "--model", "llamaa"], "did you mean 'llama'"),
        (["--plan", "--model", "tiny", "--gpus", "0"], "--gpus must be at least 1"),
        (["--gpus", "8", "--data", "x.jsonl"], "use them with --plan"),
    ],
)
def test_plan_errors_exit_2(argv, fragment, capsys):
    assert main(["train", *argv]) == 2
    err = capsys.readouterr().err
    assert fragment in err and "Traceback" not in err
