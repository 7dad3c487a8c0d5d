"""Checkpoints: never unpickled, tamper-evident, resolved inside the run, never lost.

Every resumed run is compared bit for bit with the uninterrupted run; every damaged file is made by hand (truncated,
emptied, one flipped byte) and must be reported by name; crafted pickles carry a payload that would create a marker
file, and the marker must not appear.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import random
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from test_training import final_state, log_lines, small_cfg, write_jsonl

from dpalogic.cli import main
from dpalogic.errors import DPALogicError
from dpalogic.training import checkpoint as ckpt
from dpalogic.training.demo import make_task
from dpalogic.training.loop import read_reference_cache, rng_state, set_rng_state, train

torch.set_num_threads(1)

PARTS = ("model.safetensors", "optimizer.safetensors", "rng-0.safetensors", "state.json", "manifest.json")


class Payload:
    """Unpickling this runs ``os.system`` (what a crafted checkpoint does)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def plant_pickle(folder: Path, marker: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "state.pt").write_bytes(pickle.dumps(Payload(marker)))
    (folder / "rng-0.pt").write_bytes(pickle.dumps(Payload(marker)))


def tree_bytes(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in root.rglob("*") if p.is_file()
    }


def damage(path: Path, how: str) -> None:
    data = path.read_bytes()
    if how == "truncated":
        path.write_bytes(data[: len(data) // 2])
    elif how == "emptied":
        path.write_bytes(b"")
    else:  # one flipped bit near the end: in the weights/state, not the header
        i = len(data) - 7
        path.write_bytes(data[:i] + bytes([data[i] ^ 0x10]) + data[i + 1 :])


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("ckdata")
    tr, _ = make_task(256, 64, seed=1)
    return write_jsonl(d / "train.jsonl", tr), None


def cfg(out: Path, files, **kw):
    base = dict(max_steps=6, save_every=2, keep_checkpoints=5, dropout=0.1, eval=None)  # dropout: RNG matters
    return small_cfg(out, files, **{**base, **kw})


@pytest.fixture(scope="module")
def full(tmp_path_factory, files) -> Path:
    """An uninterrupted 6-step run with checkpoints at steps 2, 4 and 6."""
    out = tmp_path_factory.mktemp("full") / "run"
    train(cfg(out, files))
    return out


def cli_args(out: Path, files, *extra: str) -> list[str]:
    return ["train", "--data", str(files[0]), "--out", str(out), "--max-steps", "6", "--batch-size", "8",
            "--lr", "1e-3", "--max-length", "64", "--max-prompt-length", "32", "--save-every", "2",
            "--dropout", "0.1", "--log-every", "1", "--no-progress", "--no-tensorboard", *extra]  # fmt: skip


# --------------------------------------------------------------------------------------------------- format


def test_checkpoint_parts_hold_tensors_and_json_only(full):
    step2 = full / "checkpoints" / "step-2"
    assert sorted(p.name for p in step2.iterdir()) == sorted(PARTS)
    manifest = json.loads((step2 / "manifest.json").read_text())
    for name, info in manifest["files"].items():  # sizes and sha256 recomputed here, independently
        data = (step2 / name).read_bytes()
        assert info == {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    from safetensors.torch import load_file

    weights = load_file(step2 / "model.safetensors")  # a plain safetensors file any tool reads
    assert {k for k in weights} >= {"model.embed_tokens.weight", "lm_head.weight"}
    state = json.loads((step2 / "state.json").read_text())
    assert state["step"] == 2 and state["config"]["save_every"] == 2


def test_structures_round_trip_exactly(tmp_path):
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1, betas=(0.8, 0.9))
    model(torch.randn(4, 3)).sum().backward()
    opt.step()
    sd = opt.state_dict()
    ckpt.write_tensors(tmp_path / "opt.safetensors", sd)
    back = ckpt.read_tensors(tmp_path / "opt.safetensors")
    assert set(back["state"]) == {0, 1}  # integer parameter ids stay integers
    assert back["param_groups"][0]["betas"] == (0.8, 0.9)  # tuples stay tuples
    for i in (0, 1):
        for k, v in sd["state"][i].items():
            assert torch.equal(back["state"][i][k], v) and back["state"][i][k].dtype == v.dtype

    # RNG streams: restoring the saved state replays the same draws from Python, numpy and torch
    ckpt.write_tensors(tmp_path / "rng.safetensors", rng_state())
    first = (random.random(), np.random.rand(), torch.rand(3))
    set_rng_state(ckpt.read_tensors(tmp_path / "rng.safetensors"))
    again = (random.random(), np.random.rand(), torch.rand(3))
    assert first[:2] == again[:2] and torch.equal(first[2], again[2])

    # tied weights (shared storage) are stored under both names
    emb = torch.randn(5, 4)
    ckpt.save(tmp_path / "tied", {"m.safetensors": {"a": emb, "b": emb}, "meta.json": {"x": [1, 2.5, None]}})
    parts = ckpt.load(tmp_path / "tied")
    assert torch.equal(parts["m.safetensors"]["a"], emb) and torch.equal(parts["m.safetensors"]["b"], emb)
    assert parts["meta.json"] == {"x": [1, 2.5, None]}
    with pytest.raises(DPALogicError, match="only JSON data"):
        ckpt.write_json(tmp_path / "x.json", {"t": emb})


# --------------------------------------------------------------------------------------------------- no pickles


def test_a_crafted_state_pt_is_never_unpickled(tmp_path, files, capsys):
    marker = tmp_path / "PWNED"
    run = tmp_path / "run"
    plant_pickle(run / "checkpoints" / "step-5", marker)
    (run / "checkpoints" / "latest").write_text("step-5\n")
    # an explicit --resume: a clear error about the old format, exit 2
    assert main(cli_args(tmp_path / "new", files, "--resume", str(run / "checkpoints" / "step-5"))) == 2
    err = capsys.readouterr().err
    assert "older dpalogic (a pickled state.pt)" in err and "no longer loaded" in err and "Traceback" not in err
    # --resume auto on that run: no intact checkpoint, named, and nothing run
    assert main(cli_args(run, files, "--resume", "auto")) == 2
    err = capsys.readouterr().err
    assert "no intact checkpoint" in err and "step-5" in err and "state.pt" in err
    # even with a manifest that lists it, state.pt is never read: the parts are what is loaded
    ckpt.write_manifest(run / "checkpoints" / "step-5")
    assert main(cli_args(tmp_path / "new2", files, "--resume", str(run / "checkpoints" / "step-5"))) == 2
    assert "state.json is missing" in capsys.readouterr().err
    assert not marker.exists()


def test_latest_is_resolved_only_inside_the_run(tmp_path, full):
    marker = tmp_path / "PWNED"
    elsewhere = tmp_path / "elsewhere"
    shutil.copytree(full / "checkpoints" / "step-6", elsewhere)  # intact, but not this run's
    plant_pickle(elsewhere, marker)
    root = tmp_path / "run" / "checkpoints"
    root.mkdir(parents=True)
    shutil.copytree(full / "checkpoints" / "step-2", root / "step-2")
    for bad in ("../../elsewhere", str(elsewhere), "step-2/../../../elsewhere", "step-x"):
        (root / "latest").write_text(bad + "\n")
        target, why = ckpt.resolve_latest(root)
        assert target is None and "ignored" in why
        folders, notes = ckpt.newest_first(root)
        assert folders == [root / "step-2"] and any("ignored" in n for n in notes)
    # a step folder that is a symlink out of the run is left out as well
    (root / "step-9").symlink_to(elsewhere, target_is_directory=True)
    (root / "latest").write_text("step-9\n")
    assert ckpt.resolve_latest(root)[0] is None
    folders, notes = ckpt.newest_first(root)
    assert folders == [root / "step-2"] and any("step-9 leads outside" in n for n in notes)
    # a latest that is itself a symlink to a file elsewhere only counts for the name it holds
    (root / "latest").unlink()
    (tmp_path / "name").write_text("step-2\n")
    (root / "latest").symlink_to(tmp_path / "name")
    assert ckpt.resolve_latest(root) == (root / "step-2", None)
    assert not marker.exists()


# --------------------------------------------------------------------------------------------------- damage


@pytest.mark.parametrize("part", PARTS)
@pytest.mark.parametrize("how", ["truncated", "emptied", "flipped"])
def test_damaged_files_are_reported_by_name(tmp_path, full, part, how):
    folder = tmp_path / "step-4"
    shutil.copytree(full / "checkpoints" / "step-4", folder)
    ckpt.verify(folder)  # intact before
    damage(folder / part, how)
    with pytest.raises(ckpt.CheckpointError) as e:
        ckpt.verify(folder)
    msg = str(e.value)
    assert str(folder / part) in msg and "damaged" in msg
    if part != "manifest.json":
        assert {"truncated": "(truncated)", "emptied": "(emptied)", "flipped": "checksum differs"}[how] in msg


def test_missing_files_and_an_interrupted_save_are_reported(tmp_path, full, files, capsys):
    folder = tmp_path / "step-4"
    shutil.copytree(full / "checkpoints" / "step-4", folder)
    (folder / "optimizer.safetensors").unlink()
    with pytest.raises(ckpt.CheckpointError, match=r"optimizer\.safetensors is missing"):
        ckpt.verify(folder)
    (folder / "manifest.json").unlink()  # what a kill before the manifest leaves
    with pytest.raises(ckpt.CheckpointError, match="incomplete: it has no manifest.json"):
        ckpt.verify(folder)
    # through the CLI: an explicit --resume of a damaged checkpoint exits 2, naming the file (today's message was
    # "cannot write: ... No such file")
    shutil.rmtree(folder)
    shutil.copytree(full / "checkpoints" / "step-4", folder)
    damage(folder / "model.safetensors", "flipped")
    assert main(cli_args(tmp_path / "new", files, "--resume", str(folder))) == 2
    err = capsys.readouterr().err
    assert f"{folder / 'model.safetensors'} is damaged" in err and "Traceback" not in err


def test_resume_auto_falls_back_to_the_newest_intact_checkpoint(tmp_path, full, files, capsys, monkeypatch):
    run = tmp_path / "run"
    shutil.copytree(full, run)
    marker = tmp_path / "PWNED"
    plant_pickle(run / "checkpoints" / "step-8", marker)  # an old-format (pickled) checkpoint, newest by step
    damage(run / "checkpoints" / "step-6" / "model.safetensors", "flipped")
    damage(run / "checkpoints" / "step-4" / "optimizer.safetensors", "truncated")
    (run / "checkpoints" / "latest").write_text("step-6\n")
    with (run / "log.jsonl").open("a") as f:
        f.write('{"split": "train", "step": 7, "lo')  # a kill in the middle of a write
    capsys.readouterr()

    def no_unpickling(*a, **k):
        raise AssertionError("a checkpoint was unpickled")

    monkeypatch.setattr(torch, "load", no_unpickling)
    monkeypatch.setattr(pickle, "load", no_unpickling)
    monkeypatch.setattr(pickle, "loads", no_unpickling)
    res = train(cfg(run, files, resume="auto", keep_checkpoints=1))
    monkeypatch.undo()
    err = capsys.readouterr().err
    assert f"skipping step-6: {run / 'checkpoints' / 'step-6' / 'model.safetensors'} is damaged" in err
    assert f"skipping step-4: {run / 'checkpoints' / 'step-4' / 'optimizer.safetensors'} is damaged" in err
    assert "skipping step-8" in err and "state.pt" in err
    assert "step-2 is the newest intact checkpoint" in err and "at step 2" in err
    assert "dropped unreadable line(s) 7" in err
    assert res["step"] == 6 and not marker.exists()
    # bit for bit the uninterrupted run, and the same log
    a, b = final_state(full), final_state(run)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert log_lines(run) == log_lines(full)
    # keep 1: the just-written step-6 stays, and so does the newer step-8 (rotation never deletes newer ones)
    assert sorted(p.name for p in (run / "checkpoints").glob("step-*")) == ["step-6", "step-8"]
    assert (run / "checkpoints" / "latest").read_text().strip() == "step-6"
    ckpt.verify(run / "checkpoints" / "step-6")


def test_a_half_written_log_line_does_not_block_resume(tmp_path, full, files, capsys):
    run = tmp_path / "run"
    shutil.copytree(full, run)
    lines = (run / "log.jsonl").read_text().splitlines()
    (run / "log.jsonl").write_text("\n".join(lines[:4]) + "\n" + lines[4][:9])  # steps 1-4, then half of step 5
    (run / "checkpoints" / "latest").write_text("step-4\n")
    shutil.rmtree(run / "checkpoints" / "step-6")
    capsys.readouterr()
    train(cfg(run, files, resume="auto"))
    err = capsys.readouterr().err
    assert "dropped unreadable line(s) 5" in err and "resumed from" in err and "at step 4" in err
    assert log_lines(run) == log_lines(full)
    a, b = final_state(full), final_state(run)
    assert all(torch.equal(a[k], b[k]) for k in a)


# --------------------------------------------------------------------------------------------------- never lose a run


def test_reusing_out_is_refused_without_overwrite(tmp_path, full, files, capsys):
    run = tmp_path / "run"
    shutil.copytree(full, run)
    before = tree_bytes(run)
    assert main(cli_args(run, files)) == 2
    err = capsys.readouterr().err
    assert "already holds a run (log.jsonl, checkpoints/, final/, summary.json)" in err
    assert "--resume auto" in err and "--overwrite" in err and "Traceback" not in err
    # resuming another run's checkpoint into it would overwrite it too
    assert main(cli_args(run, files, "--resume", str(full / "checkpoints" / "step-2"))) == 2
    assert "new --out folder" in capsys.readouterr().err
    assert tree_bytes(run) == before  # nothing was touched

    # --overwrite replaces it: a new 2-step run, none of the old checkpoints or log lines left
    assert main(cli_args(run, files, "--overwrite", "--max-steps", "2", "--json")) == 0
    assert "removing log.jsonl, checkpoints, final, summary.json" in capsys.readouterr().err
    assert [x["step"] for x in log_lines(run)] == [1, 2]
    assert sorted(p.name for p in (run / "checkpoints").glob("step-*")) == ["step-2"]
    assert json.loads((run / "summary.json").read_text())["step"] == 2


def test_rotation_keeps_the_just_written_checkpoint_and_newer_ones(tmp_path):
    root = tmp_path / "checkpoints"
    for s in (1, 2, 4, 9):
        ckpt.save(root / f"step-{s}", {"s.json": {"step": s}})
    for keep, left in ((2, ["step-4", "step-5", "step-9"]), (1, ["step-5", "step-9"])):
        ckpt.save(root / "step-5.tmp", {"s.json": {"step": 5}})
        shutil.rmtree(root / "step-5", ignore_errors=True)
        ckpt.publish(root / "step-5.tmp", root / "step-5", keep)
        assert sorted(p.name for p in root.glob("step-*")) == left, keep
        assert (root / "latest").read_text() == "step-5\n"
        assert ckpt.load(root / "step-5") == {"s.json": {"step": 5}}


def test_a_damaged_reference_cache_is_recomputed_with_a_note(tmp_path, files, capsys):
    run = tmp_path / "run"
    first = train(cfg(run, files, max_steps=2, dropout=0.0))
    cache = run / "ref_logps-train.safetensors"
    good = ckpt.read_tensors(cache)
    damage(cache, "truncated")
    capsys.readouterr()
    again = train(cfg(run, files, max_steps=2, dropout=0.0, overwrite=True))
    err = capsys.readouterr().err
    assert f"reference log-probs (train): {cache} is damaged" in err and "recomputing them" in err
    assert torch.equal(ckpt.read_tensors(cache)["logps"], good["logps"])
    assert [h["loss"] for h in again["history"]] == [h["loss"] for h in first["history"]]
    # a flipped byte in the log-probs is caught by their checksum; another fingerprint means other inputs
    damage(cache, "flipped")
    lp, why = read_reference_cache(cache, good["fingerprint"], len(good["logps"]))
    assert lp is None and "checksum" in why
    ckpt.write_tensors(cache, good)
    assert torch.equal(read_reference_cache(cache, good["fingerprint"], len(good["logps"]))[0], good["logps"])
    assert "another reference model" in read_reference_cache(cache, "0" * 16, len(good["logps"]))[1]


def test_checkpoint_parts_get_the_usual_file_permissions(tmp_path):
    """safetensors writes 0600 files; checkpoint parts follow the umask like every other file the run writes."""
    import os

    import torch

    from dpalogic.training import checkpoint

    old = os.umask(0o022)
    try:
        checkpoint.write_tensors(tmp_path / "x.safetensors", {"a": torch.zeros(3)})
        (tmp_path / "plain.txt").write_text("x")
    finally:
        os.umask(old)
    assert os.stat(tmp_path / "x.safetensors").st_mode & 0o777 == os.stat(tmp_path / "plain.txt").st_mode & 0o777
    assert checkpoint.read_tensors(tmp_path / "x.safetensors")["a"].tolist() == [0.0, 0.0, 0.0]
