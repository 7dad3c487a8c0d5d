"""DeepSpeed ZeRO-2/3 in dpalogic's training loop and checkpoint storage (dpalogic.training.zero), on 2 CPU processes
with gloo.

``dpalogic train --deepspeed`` through the real command line (torchrun, 2 processes) is compared with an ordinary
single-process run of the same global batch (no DeepSpeed, no process group), and its checkpoint resumed exactly.

The worker below (run by torchrun) trains a small network with a DeepSpeed engine for 4 steps straight, and again
for 2 steps, saving through dpalogic's storage (safetensors and JSON under a manifest, no pickle), then a fresh
engine resumes from the folder for 2 more: the losses, gradient norms and final weights must be identical bit for
bit. The straight run is also checked against plain torch AdamW on one process over the same global batches (no
DeepSpeed at all), within float tolerance. Skipped where deepspeed is not installed (it is an optional extra).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_scaling import cli_args, torchrun
from test_scaling import files as files  # the fixture: the task's train and eval files
from test_training import final_state, log_lines, small_cfg

from dpalogic.cli import main
from dpalogic.errors import DPALogicError
from dpalogic.training.config import TrainConfig
from dpalogic.training.loop import train

STEPS, ACCUM, MICRO, LR, CLIP = 4, 2, 4, 1e-2, 1.0


def _net() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))


def _optimizer(params) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, lr=LR, weight_decay=0.1)


def _micro(step: int, a: int, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 * step + 10 * a + rank)
    x = torch.randn(MICRO, 8, generator=g)
    return x, x.sum(1, keepdim=True).sin()


def _worker(stage: int, out: Path) -> None:
    import deepspeed
    from accelerate import Accelerator

    from dpalogic.training import checkpoint as ckpt
    from dpalogic.training import zero

    acc = Accelerator(cpu=True)  # the gloo process group; the engine comes from deepspeed.initialize on it
    rank, world, main = acc.process_index, acc.num_processes, acc.is_main_process
    config = {
        "train_micro_batch_size_per_gpu": MICRO, "gradient_accumulation_steps": ACCUM, "gradient_clipping": CLIP,
        "zero_optimization": {"stage": stage}, "steps_per_print": 10**9,
    }  # fmt: skip

    def engine():
        net = _net()
        opt = _optimizer(net.parameters())
        eng = deepspeed.initialize(model=net, optimizer=opt, config=config)[0]
        return eng, torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1 / (1 + s))

    def run(eng, sched, start: int, stop: int) -> list[list[float]]:
        rec = []
        for s in range(start, stop):
            for a in range(ACCUM):
                x, y = _micro(s, a, rank)
                eng.set_gradient_accumulation_boundary(a == ACCUM - 1)
                loss = (eng(x) - y).pow(2).mean()
                eng.backward(loss / ACCUM, scale_wrt_gas=False)
            before = zero.grad_norm(eng)  # what the loop checks before the step
            eng.step()
            sched.step()
            rec.append([loss.item(), float(eng.get_global_grad_norm()), before])
        return rec

    eng, sched = engine()
    straight = run(eng, sched, 0, STEPS)
    w_straight = zero.whole_weights(eng, main=main)

    eng, sched = engine()
    first = run(eng, sched, 0, STEPS // 2)
    folder = out / "step"
    folder.mkdir(exist_ok=True)
    zero.save_partitions(eng, folder, rank, world)
    weights = zero.whole_weights(eng, main=main)
    torch.distributed.barrier()
    if main:
        ckpt.write_tensors(folder / "model.safetensors", weights)
        ckpt.write_json(folder / "state.json", {"scheduler": sched.state_dict()})
        ckpt.write_manifest(folder)
    torch.distributed.barrier()

    eng, sched = engine()  # a fresh engine: a different optimizer state, and its lazy state not yet created
    ckpt.verify(folder)
    zero.load_partitions(eng, folder, rank, world)
    zero.load_weights(eng, ckpt.read_tensors(folder / "model.safetensors") if main else {}, main=main)
    sched.load_state_dict(ckpt.read_json(folder / "state.json")["scheduler"])
    second = run(eng, sched, STEPS // 2, STEPS)
    w_resumed = zero.whole_weights(eng, main=main)

    # a non-finite gradient: the norm taken before the step says nan (the loop then stops without stepping)
    x, _ = _micro(0, 0, rank)
    eng.set_gradient_accumulation_boundary(True)
    eng.backward(eng(x).sum() * float("nan"), scale_wrt_gas=False)
    nan_norm = zero.grad_norm(eng)
    if main:
        (out / "nan.json").write_text(json.dumps({"norm": str(nan_norm)}))
        ckpt.write_tensors(out / "straight.safetensors", w_straight)
        ckpt.write_tensors(out / "resumed.safetensors", w_resumed)
        (out / "log.json").write_text(json.dumps({"straight": straight, "resumed": first + second}))
    torch.distributed.barrier()


def _plain_adamw() -> tuple[list[float], dict[str, torch.Tensor]]:
    """One process, no DeepSpeed: the same global batches (both ranks' micro-batches), AdamW and clipping."""
    net = _net()
    opt = _optimizer(net.parameters())
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1 / (1 + s))
    norms = []
    for s in range(STEPS):
        for a in range(ACCUM):
            xs, ys = zip(*(_micro(s, a, r) for r in range(2)))
            loss = (net(torch.cat(xs)) - torch.cat(ys)).pow(2).mean()
            (loss / ACCUM).backward()
        norms.append(float(torch.nn.utils.clip_grad_norm_(net.parameters(), CLIP)))
        opt.step()
        sched.step()
        opt.zero_grad()
    return norms, {k: v.detach() for k, v in net.named_parameters()}


@pytest.mark.parametrize("stage", [2, pytest.param(3, marks=pytest.mark.slow)])  # ZeRO-3: the CLI test below
def test_zero_checkpoint_resumes_exactly_without_pickles(stage, tmp_path):
    pytest.importorskip("deepspeed")
    from dpalogic.training import checkpoint as ckpt

    env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", __file__]
    proc = subprocess.run([*cmd, str(stage), str(tmp_path)], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]

    log = json.loads((tmp_path / "log.json").read_text())
    assert log["resumed"] == log["straight"]  # losses and gradient norms, bit for bit
    straight = ckpt.read_tensors(tmp_path / "straight.safetensors")
    resumed = ckpt.read_tensors(tmp_path / "resumed.safetensors")
    assert straight.keys() == resumed.keys()
    for k in straight:
        assert torch.equal(resumed[k], straight[k]), k

    # the checkpoint is dpalogic's storage: a manifest, safetensors and JSON, one partition file per rank
    stored = ckpt.verify(tmp_path / "step")
    assert sorted(stored) == ["model.safetensors", "state.json", "zero-0.safetensors", "zero-1.safetensors"]

    # ZeRO over 2 processes is AdamW on the global batch: compare with plain torch on one process
    norms, weights = _plain_adamw()
    assert [n for _, n, _ in log["straight"]] == pytest.approx(norms, rel=1e-5)
    # the norm measured before the step is the one DeepSpeed's step clipped by
    assert [b for _, _, b in log["straight"]] == pytest.approx([n for _, n, _ in log["straight"]], rel=1e-6)
    assert json.loads((tmp_path / "nan.json").read_text())["norm"] == "nan"
    for k, w in weights.items():
        torch.testing.assert_close(straight[k], w, rtol=1e-5, atol=1e-6)

    # resuming with another process count or stage is refused, naming both
    from dpalogic.errors import DPALogicError
    from dpalogic.training.zero import check_partitions

    with pytest.raises(DPALogicError, match=f"saved by ZeRO-{stage} on 2 process"):
        check_partitions(tmp_path / "step", 0, 4, stage)
    with pytest.raises(DPALogicError, match="on 2 process.*this run is ZeRO-1 on 2"):
        check_partitions(tmp_path / "step", 0, 2, 1)
    with pytest.raises(DPALogicError, match="no ZeRO optimizer partition for rank 3"):
        check_partitions(tmp_path / "step", 3, 4, stage)


# --------------------------------------------------------------------------------------------------- the training loop


def ds_config(path: Path, stage: int, **extra) -> Path:
    path.write_text(json.dumps({"zero_optimization": {"stage": stage}, **extra}))
    return path


@pytest.mark.parametrize("stage", [3, pytest.param(2, marks=pytest.mark.slow)])
def test_deepspeed_cli_on_two_processes_matches_one_process_and_resumes_exactly(stage, tmp_path, files):
    pytest.importorskip("deepspeed")
    ds = ds_config(tmp_path / "ds.json", stage, train_micro_batch_size_per_gpu=16)  # the run's own batch wins
    # one process, global batch 8: no DeepSpeed, no process group
    one = tmp_path / "one"
    train(small_cfg(one, files, max_steps=4, batch_size=8, eval_every=2, save_every=2, keep_checkpoints=5))
    # two ZeRO processes of 2 pairs × 2 accumulation steps each: the same global batch
    two = tmp_path / "two"
    proc = torchrun([*cli_args(two, files, batch_size=2, grad_accum=2), f"--deepspeed={ds}"])
    assert "train_micro_batch_size_per_gpu 16 replaced by this run's 2" in proc.stdout + proc.stderr
    a, b = log_lines(one), log_lines(two)
    assert [(x["split"], x["step"]) for x in a] == [(x["split"], x["step"]) for x in b]
    for x, y in zip(a, b):
        for key in ("loss", "logps_chosen", "reward_accuracy", "grad_norm", "lr"):
            if key in x:
                assert y[key] == pytest.approx(x[key], rel=1e-4, abs=1e-5), (x["split"], x["step"], key)
    w1, w2 = final_state(one), final_state(two)
    assert w1.keys() == w2.keys()
    for k in w1:
        torch.testing.assert_close(w2[k], w1[k], rtol=1e-4, atol=1e-5)
    # the checkpoint: whole weights, each rank's ZeRO partition, no whole optimizer file, and the stage recorded
    step2 = two / "checkpoints" / "step-2"
    state = json.loads((step2 / "state.json").read_text())
    assert state["zero_stage"] == stage and state["world_size"] == 2
    assert {"model.safetensors", "zero-0.safetensors", "zero-1.safetensors"} <= {p.name for p in step2.iterdir()}
    assert not (step2 / "optimizer.safetensors").exists()

    # 2 steps, resume, 2 steps: the same losses, norms and final weights as the 4 straight steps, bit for bit
    resumed = tmp_path / "resumed"
    torchrun([*cli_args(resumed, files, batch_size=2, grad_accum=2), f"--deepspeed={ds}", f"--resume={step2}"])
    later = [x for x in b if x["step"] > 2 and x["split"] == "train"]
    assert [x for x in log_lines(resumed) if x["split"] == "train"] == later
    w3 = final_state(resumed)
    for k in w2:
        assert torch.equal(w3[k], w2[k]), k

    # the ZeRO checkpoint does not resume without DeepSpeed (its optimizer state is partitioned): exit 2, the reason
    argv = cli_args(tmp_path / "plain", files, batch_size=8)
    assert main([*argv, f"--resume={step2}"]) == 2


@pytest.mark.slow
def test_deepspeed_with_lora_and_a_live_reference_matches_one_process(tmp_path, files):
    """ZeRO-3 partitions the base model too; the reference is that model with its adapter switched off."""
    pytest.importorskip("deepspeed")
    from safetensors.torch import load_file

    extra = ["--lora-r=4", "--reference=model"]
    one, two = tmp_path / "one", tmp_path / "two"
    assert main([*cli_args(one, files, batch_size=8, save_every=0), *extra]) == 0
    torchrun([*cli_args(two, files, save_every=0), f"--deepspeed={ds_config(tmp_path / 'ds.json', 3)}", *extra])
    a, b = log_lines(one), log_lines(two)
    assert [x["loss"] for x in b] == pytest.approx([x["loss"] for x in a], rel=1e-4, abs=1e-6)
    assert a[-1]["loss"] < a[0]["loss"]  # it trained
    w1, w2 = (load_file(str(r / "final" / "adapter_model.safetensors")) for r in (one, two))
    assert w1.keys() == w2.keys()
    for k in w1:
        torch.testing.assert_close(w2[k], w1[k], rtol=1e-4, atol=1e-4)


def test_deepspeed_config_takes_the_runs_settings(tmp_path, monkeypatch):
    pytest.importorskip("deepspeed")
    from dpalogic.training.zero import engine_config

    notes: list[str] = []
    path = ds_config(
        tmp_path / "ds.json", 2, gradient_accumulation_steps=8, train_micro_batch_size_per_gpu="auto",
        gradient_clipping=0.5, fp16={"enabled": True}, optimizer={"type": "Adam"},
    )  # fmt: skip
    cfg = TrainConfig(deepspeed=str(path), batch_size=3, grad_accum=2, max_grad_norm=1.0)
    config = engine_config(cfg, world=4, bf16=False, say=notes.append)
    assert config["train_micro_batch_size_per_gpu"] == 3 and config["gradient_accumulation_steps"] == 2
    assert config["train_batch_size"] == 3 * 2 * 4 and config["gradient_clipping"] == 1.0
    assert config["fp16"] == {"enabled": False} and config["bf16"] == {"enabled": False}
    assert "optimizer" not in config and config["zero_optimization"] == {"stage": 2}
    said = "\n".join(notes)
    assert "gradient_accumulation_steps 8 replaced by this run's 2" in said
    assert "gradient_clipping 0.5 replaced by this run's 1.0" in said
    assert "fp16 on replaced by this run's float32" in said and "optimizer section is not used" in said
    assert "train_micro_batch_size_per_gpu" not in said  # "auto" is not a difference

    # an accelerate launch's config (examples/accelerate/zero3.yaml sets these) gives the stage; no clipping is 0
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_ZERO_STAGE", "3")
    monkeypatch.setenv("ACCELERATE_GRADIENT_ACCUMULATION_STEPS", "1")
    config = engine_config(TrainConfig(batch_size=2, grad_accum=1, max_grad_norm=0), world=2, bf16=True, say=print)
    assert config["zero_optimization"]["stage"] == 3 and config["train_batch_size"] == 4
    assert config["gradient_clipping"] == 0.0 and config["bf16"] == {"enabled": True}

    for body, fragment in [
        ({"zero_optimization": {"stage": 0}}, "stage is 0"),
        ({}, "stage is 0"),
        ({"zero_optimization": {"stage": 3, "offload_optimizer": {"device": "cpu"}}}, "offload_optimizer to cpu"),
    ]:
        path.write_text(json.dumps(body))
        with pytest.raises(DPALogicError, match=fragment):
            engine_config(TrainConfig(deepspeed=str(path)), world=2, bf16=False, say=print)
    path.write_text("{not json")
    with pytest.raises(DPALogicError, match="not a readable JSON DeepSpeed config"):
        engine_config(TrainConfig(deepspeed=str(path)), world=2, bf16=False, say=print)


if __name__ == "__main__":
    _worker(int(sys.argv[1]), Path(sys.argv[2]))
