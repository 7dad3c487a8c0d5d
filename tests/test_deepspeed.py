"""DeepSpeed ZeRO-2/3 state in dpalogic's checkpoint storage (dpalogic.training.zero), on 2 CPU processes with gloo.

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
            eng.step()
            sched.step()
            rec.append([loss.item(), float(eng.get_global_grad_norm())])
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
    if main:
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


@pytest.mark.parametrize("stage", [2, 3])
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
    files = ckpt.verify(tmp_path / "step")
    assert sorted(files) == ["model.safetensors", "state.json", "zero-0.safetensors", "zero-1.safetensors"]

    # ZeRO over 2 processes is AdamW on the global batch: compare with plain torch on one process
    norms, weights = _plain_adamw()
    assert [n for _, n in log["straight"]] == pytest.approx(norms, rel=1e-5)
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


if __name__ == "__main__":
    _worker(int(sys.argv[1]), Path(sys.argv[2]))
