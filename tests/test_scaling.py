"""Scaling: FSDP2 on 2 CPU processes (gloo) against one process on the same global batch, its checkpoints resumed,
gradient checkpointing against the run without it, and the combinations that are refused with the reason.

The 2-process runs go through the real command line (``torchrun --nproc_per_node=2 -m dpalogic train --fsdp``); the
reference is an ordinary single-process run of the same global batch, so the sharding is checked against code that
does not shard at all.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_training import final_state, log_lines, small_cfg, write_jsonl

from dpalogic.cli import main
from dpalogic.training.demo import make_task
from dpalogic.training.loop import Trainer, train

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("scaling")
    tr, ev = make_task(128, 16, seed=1)
    return write_jsonl(d / "train.jsonl", tr), write_jsonl(d / "eval.jsonl", ev)


def torchrun(args: list[str], nproc: int = 2) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([*cmd, "-m", "dpalogic", *args], env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def cli_args(out: Path, files, **kw) -> list[str]:
    flags = dict(
        data=files[0], eval=files[1], out=out, max_steps=4, batch_size=4, lr=1e-3, eval_every=2, log_every=1,
        max_length=64, max_prompt_length=32, save_every=2, keep_checkpoints=5, dropout=0.0,
    )  # fmt: skip
    flags.update(kw)
    return ["train", "--no-progress", "--no-tensorboard", *[f"--{k.replace('_', '-')}={v}" for k, v in flags.items()]]


def test_fsdp_on_two_processes_matches_one_process_and_resumes(tmp_path, files):
    # one process, global batch 8 (the reference: no sharding, no process group)
    one = tmp_path / "one"
    train(small_cfg(one, files, max_steps=4, batch_size=8, eval_every=2, save_every=2, keep_checkpoints=5))
    # two FSDP2 processes of 4 pairs each: the same global batch
    two = tmp_path / "two"
    torchrun([*cli_args(two, files), "--fsdp"])
    a, b = log_lines(one), log_lines(two)
    assert [(x["split"], x["step"]) for x in a] == [(x["split"], x["step"]) for x in b]
    for x, y in zip(a, b):
        for key in ("loss", "logps_chosen", "reward_accuracy", "grad_norm"):
            if key in x:
                assert y[key] == pytest.approx(x[key], rel=1e-4, abs=1e-5), (x["split"], x["step"], key)
    w1, w2 = final_state(one), final_state(two)
    assert w1.keys() == w2.keys()
    for k in w1:
        torch.testing.assert_close(w2[k], w1[k], rtol=1e-4, atol=1e-5)
    # the sharded checkpoint holds whole tensors (gathered on rank 0) and names the strategy
    state = json.loads((two / "checkpoints" / "step-2" / "state.json").read_text())
    assert state["fsdp"] is True and state["world_size"] == 2

    # resumed on two processes from step 2: the same final weights as the uninterrupted sharded run
    resumed = tmp_path / "resumed"
    torchrun([*cli_args(resumed, files), "--fsdp", f"--resume={two / 'checkpoints' / 'step-2'}"])
    w3 = final_state(resumed)
    for k in w2:
        torch.testing.assert_close(w3[k], w2[k], rtol=0, atol=1e-6)
    assert [x["loss"] for x in log_lines(resumed)] == pytest.approx([x["loss"] for x in b if x["step"] > 2], abs=1e-6)


def adapter(run: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(run / "final" / "adapter_model.safetensors"))


@pytest.mark.parametrize(
    "extra, weights",
    [
        # LoRA under FSDP: the live reference is the sharded base model with its adapter switched off
        (["--lora-r=4", "--reference=model"], adapter),
        # the frozen reference copy, sharded like the policy
        pytest.param(["--reference=model"], final_state, marks=pytest.mark.slow),
    ],
)
def test_fsdp_with_lora_or_a_sharded_reference_matches_one_process(tmp_path, files, extra, weights):
    one, two = tmp_path / "one", tmp_path / "two"
    assert main([*cli_args(one, files, batch_size=8, save_every=0), *extra]) == 0
    torchrun([*cli_args(two, files, save_every=0), "--fsdp", *extra])
    a, b = log_lines(one), log_lines(two)
    assert [(x["split"], x["step"]) for x in a] == [(x["split"], x["step"]) for x in b]
    assert [x["loss"] for x in b] == pytest.approx([x["loss"] for x in a], rel=1e-4, abs=1e-6)
    assert a[-1]["loss"] < a[0]["loss"]  # it trained
    w1, w2 = weights(one), weights(two)
    assert w1.keys() == w2.keys()
    for k in w1:
        torch.testing.assert_close(w2[k], w1[k], rtol=1e-4, atol=1e-5)


def test_gradient_checkpointing_gives_the_same_gradients(tmp_path, files):
    grads = {}
    for on in (False, True):
        cfg = small_cfg(tmp_path / str(on), files, max_steps=3, dropout=0.1, gradient_checkpointing=on, eval=None)
        t = Trainer(cfg, quiet=True)
        seen, step = [], t.optimizer.step

        def recording_step(*a, _seen=seen, _t=t, _step=step, **k):
            _seen.append(torch.cat([p.grad.flatten() for p in _t.model.parameters()]).clone())
            return _step(*a, **k)

        t.optimizer.step = recording_step
        try:
            t.run()
        finally:
            t.close()
        if on:
            assert t.model.is_gradient_checkpointing
        grads[on] = (seen, [h["loss"] for h in t.history])
    (g0, l0), (g1, l1) = grads[False], grads[True]
    assert l1 == l0  # recomputation replays the same dropout masks: identical losses
    for a, b in zip(g0, g1):
        assert a.abs().max() > 0
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-7)


NO_DEEPSPEED = "the deepspeed package is not installed"


@pytest.mark.parametrize(
    "flags, env, fragment",
    [
        (["--fsdp", "--fused"], {}, "fused cannot run with fsdp or deepspeed"),
        (["--fsdp", "--deepspeed", "ds.json"], {}, "fsdp and deepspeed both shard the model"),
        (["--deepspeed", "ds.json"], {}, "--deepspeed: no DeepSpeed config file at 'ds.json'"),
        # an accelerate launch's config chose ZeRO (checked once the flags are)
        (["--fused"], {"ACCELERATE_USE_DEEPSPEED": "true"}, "--fused cannot run under FSDP or ZeRO"),
        (["--fused"], {"ACCELERATE_USE_FSDP": "true"}, "--fused cannot run under FSDP or ZeRO"),
        (["--fsdp"], {"ACCELERATE_USE_DEEPSPEED": "true"}, "and FSDP both shard the model: choose one"),
    ],
)
def test_refused_combinations_exit_2(flags, env, fragment, tmp_path, files, capsys, monkeypatch):
    import importlib.util

    if importlib.util.find_spec("deepspeed") is None and (
        "--deepspeed" in flags[:1] or env.get("ACCELERATE_USE_DEEPSPEED")
    ):
        fragment = NO_DEEPSPEED  # said first, before the config file or the other settings are looked at
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    monkeypatch.chdir(tmp_path)  # no ds.json here
    argv = ["train", "--data", str(files[0]), "--out", str(tmp_path / "o"), "--no-progress", *flags]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert fragment in err and "Traceback" not in err
    assert not (tmp_path / "o" / "checkpoints").exists()


def test_example_accelerate_configs(monkeypatch):
    """The shipped configs parse with accelerate's own loader, and the FSDP one's launch environment means --fsdp."""
    from accelerate.commands.config.config_args import load_config_from_file
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_multi_gpu_env

    from dpalogic.training.config import TrainConfig
    from dpalogic.training.scaling import deepspeed_requested, fsdp_requested

    root = Path(__file__).resolve().parent.parent / "examples" / "accelerate"
    fsdp = load_config_from_file(str(root / "fsdp.yaml"))
    assert fsdp.distributed_type == "FSDP" and fsdp.fsdp_config["fsdp_version"] == 2
    zero3 = load_config_from_file(str(root / "zero3.yaml"))
    assert zero3.distributed_type == "DEEPSPEED" and zero3.deepspeed_config["zero_stage"] == 3

    args = launch_command_parser().parse_args(["--config_file", str(root / "fsdp.yaml"), "-m", "dpalogic", "train"])
    env = prepare_multi_gpu_env(_validate_launch_command(args)[0])
    assert env["FSDP_VERSION"] == "2"
    assert not fsdp_requested(TrainConfig())
    monkeypatch.setenv("ACCELERATE_USE_FSDP", env["ACCELERATE_USE_FSDP"])
    assert fsdp_requested(TrainConfig()) and not deepspeed_requested(TrainConfig())
