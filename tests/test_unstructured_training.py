"""Training with the losses that have no structure: every one trains on pairs, KTO and BCO on unpaired rows, KTO's
mismatched pairs are TRL's rotation, and a resumed run carries BCO's running mean so that it is exact."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from dpalogic.errors import DPALogicError
from dpalogic.runtime.unstructured_stats import UNSTRUCTURED
from dpalogic.training.checkpoint import read_json
from dpalogic.training.data import Example
from dpalogic.training.demo import make_task
from dpalogic.training.loop import TrainConfig, train
from dpalogic.training.unpaired import UnpairedExample, collate_any, mismatched

torch.set_num_threads(1)


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("unstructured")
    tr, ev = make_task(64, 16, seed=1)
    unpaired = [
        {"prompt": r["prompt"], "completion": r[k], "label": k == "chosen"} for r in tr for k in ("chosen", "rejected")
    ]
    unpaired.insert(5, {"prompt": "2+2=", "completion": "4", "label": "yes"})  # row 6: a bad label
    unpaired.insert(9, {"prompt": "2+2=", "chosen": "4", "completion": "4", "label": True})  # row 10: mixed
    return {
        "pairs": write_jsonl(d / "pairs.jsonl", tr),
        "eval": write_jsonl(d / "eval.jsonl", ev),
        "unpaired": write_jsonl(d / "unpaired.jsonl", unpaired),
    }


def cfg(out: Path, data: Path, loss: str, **kw) -> TrainConfig:
    base = dict(loss=loss, data=str(data), out=str(out), max_steps=4, batch_size=4, lr=1e-3, eval_every=0,
                log_every=1, save_every=0, progress=False, tensorboard=False, max_length=64, max_prompt_length=32)  # fmt: skip
    base.update(kw)
    return TrainConfig(**base)


def weights(run: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(run / "final" / "model.safetensors"))


def train_losses(result) -> list[float]:
    return [h["loss"] for h in result["history"] if h["split"] == "train"]


@pytest.mark.parametrize("loss", sorted(set(UNSTRUCTURED) - {"aot_pair", "f_dpo_reverse_kl"}))
def test_every_unstructured_loss_trains_on_pairs(tmp_path, files, loss):
    first = train(cfg(tmp_path / "a", files["pairs"], loss, max_steps=1), quiet=True)
    out = train(cfg(tmp_path / "b", files["pairs"], loss, max_steps=6), quiet=True)
    losses = train_losses(out)
    assert len(losses) == 6 and all(map(torch.isfinite, torch.tensor(losses)))
    assert losses[0] == train_losses(first)[0]  # the same first batch, the same loss: deterministic
    before, after = weights(tmp_path / "a"), weights(tmp_path / "b")
    assert any(not torch.equal(before[k], after[k]) for k in before)  # it trained
    if loss != "kto":  # KTO's loss is bounded and flat at the start; the others fall within a few steps here
        assert min(losses[3:]) < losses[0]


def test_kto_and_bco_train_on_unpaired_rows_and_bad_rows_are_listed(tmp_path, files):
    for loss in ("kto", "bco"):
        run = tmp_path / loss
        out = train(cfg(run, files["unpaired"], loss), quiet=True)
        assert len(train_losses(out)) == 4 and all(map(torch.isfinite, torch.tensor(train_losses(out))))
        bad = [json.loads(line) for line in (run / "bad_rows.jsonl").read_text().splitlines()]
        assert [(b["row"], b["reason"]) for b in bad] == [
            (6, "'label' must be true or false, got a string"),
            (10, "mixes an unpaired row (completion, label) with a pair (chosen, rejected)"),
        ]
    with pytest.raises(DPALogicError, match="unpaired rows .* dpo trains on pairs"):
        train(cfg(tmp_path / "dpo", files["unpaired"], "dpo"), quiet=True)
    with pytest.raises(DPALogicError, match="no structure: drop --fused"):
        train(cfg(tmp_path / "fused", files["pairs"], "kto", fused=True), quiet=True)


def test_kto_mismatched_pairs_are_trls_rotation():
    pairs = [Example(i, i + 1, [10 + i], [20 + i], [30 + i]) for i in range(3)]
    kl = mismatched(pairs, pad=0)
    # answers: chosen 0..2, then rejected 0..2; answer k's prompt with answer k−1's completion (TRL's +1 rotation)
    prompts = [10, 11, 12, 10, 11, 12]
    completions = [32, 20, 21, 22, 30, 31]
    assert kl["kl_input_ids"].tolist() == [[p, c] for p, c in zip(prompts, completions)]
    assert kl["kl_labels"].tolist() == [[-100, c] for c in completions]
    answers = [UnpairedExample(i, i + 1, [1, 2 + i], [5 + i], i % 2 == 0) for i in range(3)]
    batch = collate_any(answers, pad=0, kl=True)
    assert batch["label"].tolist() == [True, False, True]
    assert batch["kl_input_ids"].tolist() == [[1, 2, 7], [1, 3, 5], [1, 4, 6]]
    with pytest.raises(DPALogicError, match="batch_size >= 2"):
        mismatched(answers[:1], pad=0)


@pytest.mark.parametrize("loss", ["bco", "kto"])
def test_resume_is_exact_with_batch_statistics(tmp_path, files, loss):
    data = files["unpaired"] if loss == "bco" else files["pairs"]
    full, part = tmp_path / "full", tmp_path / "part"
    a = train(cfg(full, data, loss, max_steps=6, save_every=3, dropout=0.1, eval=str(files["eval"]), eval_every=3),
              quiet=True)  # fmt: skip
    half = read_json(full / "checkpoints" / "step-3" / "state.json").get("loss_state")
    b = train(cfg(part, data, loss, max_steps=6, dropout=0.1, eval=str(files["eval"]), eval_every=3,
                  resume=str(full / "checkpoints" / "step-3")), quiet=True)  # fmt: skip
    wa, wb = weights(full), weights(part)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    later = [(h["split"], h["step"], h["loss"]) for h in a["history"] if h["step"] > 3]
    assert later == [(h["split"], h["step"], h["loss"]) for h in b["history"] if h["step"] > 3]
    end_a = read_json(full / "checkpoints" / "step-6" / "state.json").get("loss_state")
    end_b = read_json(part / "checkpoints" / "step-6" / "state.json").get("loss_state")
    assert end_a == end_b
    if loss == "bco":  # δ moved between the two checkpoints, one update per micro-batch
        assert half["count"] == pytest.approx(3.0) and end_a["count"] == pytest.approx(6.0)
        assert half["mean"] != end_a["mean"]
    else:
        assert half == end_a == {}
