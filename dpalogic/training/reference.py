"""The reference model of a run: a frozen copy, a separate model, the policy with its LoRA adapter off, or its
log-probs computed once and cached on disk (``--reference cache``)."""

from __future__ import annotations

import copy
import hashlib
import os
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch

from dpalogic.errors import DPALogicError
from dpalogic.training import checkpoint as ckpt
from dpalogic.training.data import TokenizedData
from dpalogic.training.model import fingerprint, load_model_and_tokenizer, reference_logps, sequence_logps


def read_reference_cache(path: Path, fp: str, n: int) -> tuple[torch.Tensor | None, str | None]:
    """Reference log-probs ``[n, 2]`` from ``path`` if it holds them for these inputs (fingerprint ``fp``).

    Returns ``(logps, None)``, or ``(None, why)``: missing (``why`` is then ``""``), stale, or damaged.
    """
    if not path.exists():
        return None, ""
    try:
        blob = ckpt.read_tensors(path)
        lp = blob["logps"]
        if blob["fingerprint"] != fp:
            return None, f"{path} was computed for another reference model or other data"
        if tuple(lp.shape) != (n, 2) or lp.dtype != torch.float32 or blob["sha256"] != _digest(lp):
            return None, f"{path} is damaged (its log-probs do not match their size or checksum)"
        return lp, None
    except ckpt.CheckpointError as e:
        return None, str(e)
    except (KeyError, TypeError, AttributeError):
        return None, f"{path} is damaged (not a reference log-prob cache)"


def write_reference_cache(path: Path, fp: str, lp: torch.Tensor) -> None:
    tmp = path.with_name(path.name + ".tmp")
    ckpt.write_tensors(tmp, {"fingerprint": fp, "sha256": _digest(lp), "logps": lp})
    os.replace(tmp, path)  # atomic: a reader never sees half a file


def _digest(t: torch.Tensor) -> str:
    return hashlib.sha256(t.contiguous().numpy().tobytes()).hexdigest()


@dataclass
class Reference:
    """The reference side of a run: a live model (``None``: the policy itself, with its adapter off) or the cached
    log-probs of the train and eval pairs."""

    model: torch.nn.Module | None = None
    train: torch.Tensor | None = None
    eval: torch.Tensor | None = None


def build_reference(
    cfg, model, *, lora: bool, acc, out: Path, sets: dict[str, TokenizedData], pad: int, say
) -> Reference:
    """The reference from the *initial* weights of ``model`` (before a checkpoint is loaded).

    ``sets`` maps ``"train"`` (and ``"eval"``) to the tokenized data whose log-probs ``--reference cache`` keeps.
    """
    if cfg.ref_model:
        ref, _ = load_model_and_tokenizer(cfg.ref_model)
    elif cfg.reference == "model" and not lora:
        ref = copy.deepcopy(model)  # a frozen copy of the initial policy
    else:
        # the cache is computed from the initial policy itself (no grad, eval mode), and under LoRA the live
        # reference is the policy with its adapter switched off: no second copy of the weights either way
        ref = model
    if ref is not model:
        ref.requires_grad_(False)
        ref.eval()
    if cfg.reference == "model":
        return Reference(model=ref.to(acc.device) if ref is not model else None)
    # "cache": one pass over train and eval data with the reference, kept on disk (keyed by a fingerprint of the
    # reference weights and the tokenized data); rank 0 computes, the other ranks read the same file
    ref = ref.to(acc.device)
    kw = dict(
        batch_size=cfg.eval_batch_size or cfg.batch_size, pad_token_id=pad, device=acc.device, autocast=acc.autocast
    )
    results = {}
    for name, data in sets.items():
        path = out / f"ref_logps-{name}.safetensors"
        fp = fingerprint(ref, data.examples)
        if acc.is_main_process:
            t0 = time.perf_counter()
            lp, why = read_reference_cache(path, fp, len(data.examples))
            if why:
                say(f"reference log-probs ({name}): {why}; recomputing them")
            if lp is None:
                lp = reference_logps(ref, data.examples, **kw)
                out.mkdir(parents=True, exist_ok=True)
                write_reference_cache(path, fp, lp)
            say(
                f"reference log-probs ({name}): {'read from' if why is None else 'computed and saved to'} {path}"
                + ("" if why is None else f" in {time.perf_counter() - t0:.1f}s")
            )
        acc.wait_for_everyone()
        if not acc.is_main_process:
            lp, why = read_reference_cache(path, fp, len(data.examples))
            if lp is None:
                raise DPALogicError(f"reference log-prob cache {path}: {why or 'missing'}")
        results[name] = lp
    return Reference(train=results["train"], eval=results.get("eval"))


def batch_reference_logps(
    batch: dict[str, torch.Tensor],
    cache: torch.Tensor | None,
    ref_model: torch.nn.Module | None,
    policy_model: torch.nn.Module,
    autocast: Callable,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference log-probs of the chosen and rejected sequences of ``batch``: from ``cache`` when there is one,
    else from ``ref_model`` (``None``: ``policy_model`` with its LoRA adapter switched off)."""
    device = batch["input_ids"].device
    if cache is not None:
        lp = cache[batch["index"].cpu()].to(device)
        return lp[:, 0], lp[:, 1]
    ref = ref_model if ref_model is not None else policy_model
    adapter_off = policy_model.disable_adapter() if ref is policy_model else nullcontext()
    with torch.no_grad(), autocast(), adapter_off:
        logits = ref(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
    lp = sequence_logps(logits, batch["labels"], batch.get("token_weights"))
    n = lp.shape[0] // 2
    return lp[:n], lp[n:]
