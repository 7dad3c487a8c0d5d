"""Exact resume: what a checkpoint of a run holds (weights, optimizer, scheduler, step, every rank's RNG states),
which checkpoint to continue, and the log trimmed back to it.

The files themselves are written and verified by :mod:`dpalogic.training.checkpoint` (safetensors and JSON under a
manifest); here the training loop fills and reads them from every rank, decides which checkpoint to continue
(``--resume auto``, a run folder or a checkpoint), and refuses to overwrite a run without ``--overwrite``.
"""

from __future__ import annotations

import json
import random
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from dpalogic.errors import DPALogicError
from dpalogic.training import checkpoint as ckpt
from dpalogic.training import scaling, zero

CHECKPOINT_DIR = "checkpoints"
LOG_FILE = "log.jsonl"
# what a run writes to out/ (the reference log-prob cache is keyed by its inputs, so it is not included)
RUN_FILES = (LOG_FILE, CHECKPOINT_DIR, "final", "summary.json", "tensorboard")

Say = Callable[[str], None]


def rng_state() -> dict[str, Any]:
    """This process's RNG states: Python, NumPy (when installed), torch and every GPU."""
    state: dict[str, Any] = {"python": random.getstate(), "torch": torch.get_rng_state()}
    try:
        import numpy as np

        state["numpy"] = np.random.get_state()
    except ImportError:  # pragma: no cover
        pass
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` returned."""
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "numpy" in state:
        import numpy as np

        np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def newest_intact(root: Path, say: Say) -> tuple[Path | None, list[str]]:
    """The newest checkpoint of ``root`` that passes verification, and the damaged ones skipped on the way."""
    folders, notes = ckpt.newest_first(root)
    for n in notes:
        say(f"resume: {n}")
    skipped = []
    for folder in folders:
        try:
            ckpt.verify(folder)
            return folder, skipped
        except ckpt.CheckpointError as e:
            skipped.append(str(e))
            say(f"resume: skipping {folder.name}: {e}")
    return None, skipped


def run_files(out: Path) -> list[Path]:
    """What of a run is in ``out`` now."""
    return [out / n for n in RUN_FILES if (out / n).exists()]


def find_resume(resume: str | None, overwrite: bool, out: Path, say: Say) -> tuple[str | None, list[str]]:
    """The verified checkpoint to resume from (``None``: a fresh start) and what of ``out`` it will replace.

    Starting fresh (or from another run's checkpoint) over a run already in ``out`` is refused without
    ``--overwrite``, so a reused ``--out`` never loses a run's log, checkpoints or final model.
    """
    r = resume
    here = out / CHECKPOINT_DIR
    found: Path | None = None
    skipped: list[str] = []
    if r == "auto" or (r and (Path(r) / CHECKPOINT_DIR).is_dir()):  # a run folder: its newest intact checkpoint
        root = here if r == "auto" else Path(r) / CHECKPOINT_DIR
        found, skipped = newest_intact(root, say)
        if found is None and skipped and not overwrite:
            raise DPALogicError(
                f"no intact checkpoint in {root} to resume from:\n  " + "\n  ".join(skipped)
                + "\npass --overwrite to start this run again"
            )  # fmt: skip
        if found is None:
            say(f"resume: no intact checkpoint in {root}, starting fresh")
        elif skipped:
            say(f"resume: {found} is the newest intact checkpoint; resuming from it")
    elif r:
        found = Path(r)
        if not found.is_dir():
            raise DPALogicError(f"--resume {r}: no such checkpoint or run folder")
        ckpt.verify(found)  # an explicit checkpoint that is damaged is an error, not a fallback
    # starting fresh, or from another run's checkpoint, would overwrite what is in out/: only with --overwrite
    inside = found is not None and found.resolve().parent == here.resolve()
    present = [] if inside else run_files(out)
    blocking = present
    if r == "auto" and found is None and not skipped:
        # a run stopped before its first checkpoint: nothing of it can be continued, and a resume drops the log
        # lines after its checkpoint anyway, so only a finished model blocks a fresh start
        blocking = [p for p in present if p.name in ("final", "summary.json")]
    if blocking and not overwrite:
        what = ", ".join(p.name + ("/" if p.is_dir() else "") for p in blocking)
        if found is not None:
            hint = "resume into a new --out folder, or pass --overwrite to replace it"
        elif r == "auto":
            hint = "it has no checkpoint to resume from; pass --overwrite to start it again"
        else:
            hint = "pass --resume auto to continue it, or --overwrite to replace it"
        raise DPALogicError(f"{out} already holds a run ({what}); {hint}")
    return (str(found) if found is not None else None), [str(p) for p in present]


def trim_log(log: Path, step: int, say: Say) -> None:
    """A resumed run continues ``log``: drop what an interrupted run wrote after its checkpoint at ``step``."""
    kept, bad, later = [], [], 0
    for i, line in enumerate(log.read_bytes().decode("utf-8", "replace").splitlines(), 1):
        if not line.strip():
            continue
        try:
            logged = json.loads(line)["step"]
        except (ValueError, TypeError, KeyError):
            logged = None
        if not isinstance(logged, int) or isinstance(logged, bool):
            bad.append(i)
        elif logged <= step:
            kept.append(line)
        else:
            later += 1
    if bad:  # a kill in the middle of a write leaves half a line: it is dropped, never fatal
        lines = ", ".join(map(str, bad))
        say(f"{log}: dropped unreadable line(s) {lines} (a write was cut off, or the file was edited)")
    if later:
        say(f"{log}: dropped {later} line(s) logged after step {step}, which is resumed")
    ckpt.atomic_write_text(log, "".join(line + "\n" for line in kept))


def save_checkpoint(
    root: Path, state: dict[str, Any], dist, model, optimizer, *, lora: bool, keep: int, engine=None
) -> Path:
    """``root/step-N`` (see :mod:`dpalogic.training.checkpoint`): every rank writes its RNG states into a temporary
    folder, rank 0 the weights, optimizer and ``state`` (step, scheduler, …), then the manifest, and renames it.
    Under DeepSpeed (``engine``) each rank writes its ZeRO optimizer partition instead of rank 0 the whole optimizer."""
    fsdp = state["fsdp"]
    final = root / f"step-{state['step']}"
    tmp = root / f"step-{state['step']}.tmp"
    # every rank reaches here at the same step (the stop flag is all-reduced), so the barriers cannot hang
    if dist.main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    dist.barrier()
    ckpt.write_tensors(tmp / f"rng-{dist.rank}.safetensors", rng_state())  # each rank's own RNG streams
    if engine is not None:  # ZeRO: whole weights on rank 0, each rank's optimizer partition in its own file
        weights, optim = zero.state_dict(engine, main=dist.main, trainable_only=lora), None
        zero.save_partitions(engine, tmp, dist.rank, dist.world)
    else:  # whole (gathered on rank 0 under FSDP; only the adapter under LoRA): resumes on any process count
        weights = scaling.model_state(model, sharded=fsdp, trainable_only=lora)
        optim = scaling.optimizer_state(model, optimizer, sharded=fsdp)
    dist.barrier()
    if dist.main:
        ckpt.write_tensors(tmp / "model.safetensors", weights)
        if optim is not None:
            ckpt.write_tensors(tmp / "optimizer.safetensors", optim)
        ckpt.write_json(tmp / "state.json", state)
        ckpt.write_manifest(tmp)  # last: a folder with a manifest is complete
        ckpt.publish(tmp, final, keep)
    dist.barrier()
    return final


def load_checkpoint(
    path: Path,
    dist,
    model,
    optimizer,
    scheduler,
    *,
    fsdp: bool,
    lora: bool,
    global_batch: int,
    train_pairs: int,
    engine=None,
) -> int:
    """Restore weights, optimizer, scheduler and this rank's RNG states from a verified checkpoint folder of the same
    run (global batch, data, FSDP or DeepSpeed unchanged; under DeepSpeed also the process count); returns its step."""
    state = ckpt.read_json(path / "state.json")
    if state["global_batch"] != global_batch or state["train_pairs"] != train_pairs:
        raise DPALogicError(
            f"{path} was saved with a global batch of {state['global_batch']} pairs over {state['train_pairs']} "
            f"training pairs; this run has {global_batch} over {train_pairs}, so it would "
            "not continue the same run (keep batch_size × processes × grad_accum and the data unchanged)"
        )
    if bool(state.get("fsdp", False)) != fsdp:  # the optimizer state is keyed differently
        saved, here = ("with", "without") if state.get("fsdp") else ("without", "with")
        raise DPALogicError(f"{path} was saved {saved} FSDP; resume it {saved} --fsdp, not {here}")
    if bool(state.get("zero_stage")) != (engine is not None):  # ZeRO partitions, or one whole AdamW state
        saved, here = ("with", "without") if state.get("zero_stage") else ("without", "with")
        raise DPALogicError(f"{path} was saved {saved} DeepSpeed ZeRO; resume it {saved} --deepspeed, not {here}")
    if engine is not None:  # refused before anything changes if the processes or the stage differ
        zero.check_partitions(path, dist.rank, dist.world, int(engine.zero_optimization_stage()))
        zero.load_partitions(engine, path, dist.rank, dist.world)
        zero.load_weights(engine, ckpt.read_tensors(path / "model.safetensors") if dist.main else {}, main=dist.main)
        return _finish_load(path, dist, scheduler, state)
    # under FSDP rank 0 reads the files and the tensors are broadcast, sharded as they arrive
    read = dist.main or not fsdp
    weights = ckpt.read_tensors(path / "model.safetensors") if read else {}
    scaling.load_model_state(model, weights, sharded=fsdp, trainable_only=lora)
    optim = ckpt.read_tensors(path / "optimizer.safetensors") if read else {}
    scaling.load_optimizer_state(model, optimizer, optim, sharded=fsdp)
    return _finish_load(path, dist, scheduler, state)


def _finish_load(path: Path, dist, scheduler, state: dict[str, Any]) -> int:
    scheduler.load_state_dict(state["scheduler"])
    rng_file = path / f"rng-{dist.rank}.safetensors"
    if rng_file.exists():
        set_rng_state(ckpt.read_tensors(rng_file))
    return state["step"]
