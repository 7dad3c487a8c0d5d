"""The training loop: any dpalogic loss on a causal LM, resumable exactly, on one process, under DDP or FSDP2.

One optimizer step sees a *global batch* of ``batch_size × world_size × grad_accum`` pairs. The pairs of epoch ``e``
are a permutation drawn from ``(seed, e)`` alone, so the data position is just the global step: a resumed run (same
global batch) meets the same batches, and a 2-process run meets the same global batches as one process with twice the
per-device batch. Checkpoints hold the weights, AdamW and scheduler state, every rank's RNG states and the step, stored
by :mod:`dpalogic.training.checkpoint` (safetensors and JSON, checked against a manifest before anything is loaded).

Processes, devices, bf16 autocast, ``no_sync`` and the DDP wrapper come from ``accelerate`` (see
:mod:`dpalogic.training.scaling`, which also says why checkpoints do not use ``Accelerator.save_state``). Under
``torchrun`` or ``accelerate launch`` (``WORLD_SIZE > 1``) the model is wrapped in ``DistributedDataParallel``, or
sharded with FSDP2 (``--fsdp``); each rank takes its slice of the global batch, and since the loss is a mean over
pairs, the averaged gradient is the gradient of the global-batch mean. ``--lora-r`` trains a peft adapter, and the
reference is then the base model with the adapter switched off.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import random
import shutil
import signal
import sys
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from dpalogic.errors import DPALogicError
from dpalogic.runtime.metrics import pair_rewards
from dpalogic.training import checkpoint as ckpt
from dpalogic.training import scaling
from dpalogic.training.config import TrainConfig
from dpalogic.training.data import (
    BAD_ROWS_FILE,
    Example,
    PreferenceRows,
    TokenizedData,
    collate,
    load_preferences,
    pad_id,
    tokenize_rows,
    write_bad_rows,
)
from dpalogic.training.model import fingerprint, load_model_and_tokenizer, reference_logps, sequence_logps

CHECKPOINT_DIR = "checkpoints"
LOG_FILE = "log.jsonl"


class TrainingStopped(DPALogicError):
    """The run stopped early (non-finite loss); the message names the last good checkpoint."""


# --------------------------------------------------------------------------------------------------- processes


@dataclass
class Dist:
    """This process's place in the run, as ``accelerate`` set it up."""

    rank: int
    world: int
    device: torch.device
    owns_group: bool

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world > 1:
            torch.distributed.barrier()

    def sum_(self, t: torch.Tensor) -> torch.Tensor:
        if self.world > 1:
            torch.distributed.all_reduce(t)
        return t


# --------------------------------------------------------------------------------------------------- pieces


def lr_lambda(total: int, warmup: int, min_ratio: float) -> Callable[[int], float]:
    """Linear warmup to 1, then a cosine down to ``min_ratio`` at ``total`` steps."""

    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return f


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    """The order of the pairs in ``epoch``: a function of ``(seed, epoch)`` only (so resume needs no sampler state)."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=g).tolist()


def rng_state() -> dict[str, Any]:
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
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "numpy" in state:
        import numpy as np

        np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class _Policy(torch.nn.Module):
    """The model's forward as DDP sees it: all parameters used for the loss go through this ``forward``."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, hidden_only: bool = False):
        if hidden_only:  # the fused path: final hidden states, the LM head is applied inside the fused loss
            hf = scaling.hf_model(self.model)
            backbone = getattr(hf, hf.base_model_prefix)
            return backbone(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
        return self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits


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


# --------------------------------------------------------------------------------------------------- the run


class Trainer:
    """Holds one run's state; :func:`train` is the entry point."""

    def __init__(
        self,
        cfg: TrainConfig,
        *,
        train_rows: PreferenceRows | None = None,
        eval_rows: PreferenceRows | None = None,
        model=None,
        tokenizer=None,
        callbacks: list[Callable[[dict[str, Any]], None]] | None = None,
        quiet: bool = False,
    ) -> None:
        cfg.validate()
        scaling.check_deepspeed(cfg)
        self.cfg = cfg
        self.callbacks = list(callbacks or [])
        self.out = Path(cfg.out)
        owns = not (torch.distributed.is_available() and torch.distributed.is_initialized())
        self.acc = scaling.make_accelerator(cfg, str(self.out))
        world = self.acc.num_processes
        self.dist = Dist(self.acc.process_index, world, self.acc.device, owns and world > 1)
        self.quiet = quiet or not self.dist.main
        try:
            self._build(train_rows, eval_rows, model, tokenizer)
        except BaseException:  # give accelerate's process-wide state back, or the next run in this process fails
            scaling.release_accelerator(self.acc, self.dist.owns_group)
            raise

    def _build(self, train_rows, eval_rows, model, tokenizer) -> None:
        from dpalogic import PreferenceLoss

        cfg = self.cfg
        self.fsdp = scaling.fsdp_requested(cfg)
        if self.fsdp and cfg.fused:  # an accelerate config chose FSDP (--fsdp --fused is refused by the config check)
            raise DPALogicError("--fused cannot run under FSDP: the fused loss needs the whole LM head, FSDP shards it")
        self.lora = cfg.lora_r is not None
        from accelerate.utils import set_seed

        set_seed(cfg.seed)  # python, numpy and torch (and every GPU)

        self.loss_fn = PreferenceLoss(cfg.loss, reduction="none", **cfg.hp)
        # pairs only: a formula over y1 … yK (or one without a policy atom) cannot train on chosen/rejected rows,
        # so say so now, before the data, the model and the reference pass are loaded
        pair_atoms = {"M(yw)", "M(yl)", "Ref(yw)", "Ref(yl)"}
        names = {a.name for a in self.loss_fn.atoms}
        if not names <= pair_atoms:
            raise DPALogicError(
                f"training data has pairs (chosen yw, rejected yl), but this loss uses {', '.join(sorted(names - pair_atoms))}"
            )
        if not names & {"M(yw)", "M(yl)"}:
            raise DPALogicError("this loss has no policy atom M(yw) or M(yl): it would not train the model")
        self.needs_ref = self.loss_fn.needs_reference
        self.fused = None
        if cfg.fused:
            try:
                from dpalogic import FusedLinearPreferenceLoss
            except ImportError as e:
                raise DPALogicError(
                    f"--fused needs dpalogic.runtime.fused, which is not available here ({e})"
                ) from None
            self.fused = FusedLinearPreferenceLoss(
                cfg.loss, chunk_size=cfg.fused_chunk_size, max_chunk_tokens=cfg.fused_max_chunk_tokens, **cfg.hp
            )
        # which checkpoint to resume from, verified, and whether out/ may be written: decided before anything loads
        found, replace = self._on_main(self._find_resume)
        self.resume_from = Path(found) if found is not None else None
        self._replace = [Path(p) for p in replace]

        if model is None:
            model, tokenizer = load_model_and_tokenizer(cfg.model, seed=cfg.seed, dropout=cfg.dropout)
        elif tokenizer is None:
            raise DPALogicError("pass the tokenizer together with the model")
        self.tokenizer = tokenizer
        self.pad = pad_id(tokenizer)

        # data: every rank reads and tokenizes (cheap next to training); only rank 0 reports
        if train_rows is None:
            if not cfg.data:
                raise DPALogicError("no training data: pass --data FILE (JSONL, JSON, Parquet or a datasets folder)")
            train_rows = load_preferences(cfg.data, strict=cfg.strict_data)
        if eval_rows is None and cfg.eval:
            eval_rows = load_preferences(cfg.eval, strict=cfg.strict_data, split="eval")
        self.train_data = self._tokenize(train_rows, "train data")
        self.eval_data = self._tokenize(eval_rows, "eval data") if eval_rows is not None else None
        if self.dist.main:  # every skipped row with its number and reason (the console lists only the first few)
            sets = [(train_rows, self.train_data)] + ([(eval_rows, self.eval_data)] if self.eval_data else [])
            bad = write_bad_rows(self.out / BAD_ROWS_FILE, [(r.source, r.issues + t.issues) for r, t in sets])
            if bad is not None:
                self.say(f"every skipped row, with its number and reason: {bad}")

        # the last incomplete global batch of an epoch is dropped, so every rank gets equally many pairs
        b = cfg.batch_size * self.dist.world
        self.global_batch = b * cfg.grad_accum
        self.steps_per_epoch = len(self.train_data.examples) // b // cfg.grad_accum
        if self.steps_per_epoch == 0:
            raise DPALogicError(
                f"{len(self.train_data.examples)} training pairs are fewer than one global batch "
                f"({cfg.batch_size} per device × {self.dist.world} processes × {cfg.grad_accum} accumulation steps)"
            )

        # precision: bf16 autocast on GPUs that have it (accelerate's mixed precision); float32 otherwise
        self.use_bf16 = self.acc.mixed_precision == "bf16"

        # the reference is built from the *initial* weights, before a checkpoint is loaded
        self.ref_model = None
        self.ref_train = self.ref_eval = None
        if self.needs_ref:
            self._setup_reference(model)
        if self.lora:  # after the reference: a cached reference is the base model itself, with no adapter
            model = scaling.apply_lora(model, cfg)
        if cfg.gradient_checkpointing:
            scaling.enable_gradient_checkpointing(model)

        self.model = model.to(self.dist.device)
        self.model.train()
        self.policy: torch.nn.Module = _Policy(self.model)
        if self.fsdp:
            scaling.shard(self.model)  # in place: the optimizer below sees the sharded parameters
            if self.ref_model is not None:
                scaling.shard(self.ref_model)
        elif self.dist.world > 1:
            self.policy = self.acc.prepare(self.policy)  # DistributedDataParallel

        decay = [p for p in self.model.parameters() if p.requires_grad and p.dim() >= 2]
        no_decay = [p for p in self.model.parameters() if p.requires_grad and p.dim() < 2]
        self.optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr
        )
        self.total_steps = cfg.max_steps or cfg.epochs * self.steps_per_epoch
        warmup = math.ceil(cfg.warmup_ratio * self.total_steps)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lr_lambda(self.total_steps, warmup, cfg.min_lr_ratio)
        )
        self.step = 0
        self.last_checkpoint: Path | None = None
        self._stop_signal = False
        self.history: list[dict[str, Any]] = []
        self.tracking = False

    # ------------------------------------------------------------------ setup helpers

    def say(self, msg: str) -> None:
        if not self.quiet:
            from tqdm import tqdm

            tqdm.write(msg, file=sys.stderr)

    def _tokenize(self, rows: PreferenceRows, what: str) -> TokenizedData:
        tok = tokenize_rows(
            rows,
            self.tokenizer,
            max_length=self.cfg.max_length,
            max_prompt_length=self.cfg.max_prompt_length,
            strict=self.cfg.strict_data,
        )
        self.say(rows.summary(what))
        if tok.truncated or tok.issues:
            self.say(tok.summary())
        return tok

    def _autocast(self):
        return self.acc.autocast()

    def _setup_reference(self, model) -> None:
        cfg = self.cfg
        if cfg.ref_model:
            ref, _ = load_model_and_tokenizer(cfg.ref_model)
        elif cfg.reference == "model" and not self.lora:
            ref = copy.deepcopy(model)  # a frozen copy of the initial policy
        else:
            # the cache is computed from the initial policy itself (no grad, eval mode), and under LoRA the live
            # reference is the policy with its adapter switched off: no second copy of the weights either way
            ref = model
        if ref is not model:
            ref.requires_grad_(False)
            ref.eval()
        if cfg.reference == "model":
            self.ref_model = ref.to(self.dist.device) if ref is not model else None
            return
        # "cache": one pass over train and eval data with the reference, kept on disk (keyed by a fingerprint of the
        # reference weights and the tokenized data); rank 0 computes, the other ranks read the same file
        ref = ref.to(self.dist.device)
        kw = dict(
            batch_size=cfg.eval_batch_size or cfg.batch_size,
            pad_token_id=self.pad,
            device=self.dist.device,
            autocast=self._autocast,
        )
        sets = [("train", self.train_data)] + ([("eval", self.eval_data)] if self.eval_data is not None else [])
        results = {}
        for name, data in sets:
            path = self.out / f"ref_logps-{name}.safetensors"
            fp = fingerprint(ref, data.examples)
            if self.dist.main:
                t0 = time.perf_counter()
                lp, why = read_reference_cache(path, fp, len(data.examples))
                if why:
                    self.say(f"reference log-probs ({name}): {why}; recomputing them")
                if lp is None:
                    lp = reference_logps(ref, data.examples, **kw)
                    self.out.mkdir(parents=True, exist_ok=True)
                    write_reference_cache(path, fp, lp)
                self.say(
                    f"reference log-probs ({name}): {'read from' if why is None else 'computed and saved to'} {path}"
                    + ("" if why is None else f" in {time.perf_counter() - t0:.1f}s")
                )
            self.dist.barrier()
            if not self.dist.main:
                lp, why = read_reference_cache(path, fp, len(data.examples))
                if lp is None:
                    raise DPALogicError(f"reference log-prob cache {path}: {why or 'missing'}")
            results[name] = lp
        self.ref_train = results["train"]
        self.ref_eval = results.get("eval")
        del ref

    # ------------------------------------------------------------------ forward

    def _batch(self, examples: list[Example]) -> dict[str, torch.Tensor]:
        return {k: v.to(self.dist.device) for k, v in collate(examples, self.pad).items()}

    def _ref(self, batch: dict[str, torch.Tensor], cache: torch.Tensor | None) -> tuple:
        if not self.needs_ref:
            return None, None
        if cache is not None:
            lp = cache[batch["index"].cpu()].to(self.dist.device)
            return lp[:, 0], lp[:, 1]
        ref = self.ref_model if self.ref_model is not None else self.model
        adapter_off = self.model.disable_adapter() if ref is self.model else nullcontext()
        with torch.no_grad(), self._autocast(), adapter_off:
            logits = ref(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
        lp = sequence_logps(logits, batch["labels"])
        n = lp.shape[0] // 2
        return lp[:n], lp[n:]

    def _pair_losses(self, module, batch: dict[str, torch.Tensor], cache: torch.Tensor | None):
        """Per-pair losses ``[B]`` (or the fused mean loss) and the per-pair log-probs for metrics."""
        ref_c, ref_r = self._ref(batch, cache)
        if self.fused is not None:
            with self._autocast():
                hidden = module(batch["input_ids"], batch["attention_mask"], hidden_only=True)
            head = scaling.hf_model(self.model).get_output_embeddings()
            # the fused loss scores hidden[t] against labels[t] as given: shift so hidden[t] predicts token t+1, as
            # sequence_logps does with logits; under autocast the head is cast to the hidden states' dtype
            weight = head.weight.to(hidden.dtype)
            bias = head.bias.to(hidden.dtype) if head.bias is not None else None
            loss, metrics = self.fused(
                hidden[:, :-1],
                weight,
                batch["labels"][:, 1:],
                bias=bias,
                ref_chosen_logps=ref_c,
                ref_rejected_logps=ref_r,
            )
            chosen = metrics.get("chosen_logps") if isinstance(metrics, dict) else None
            rejected = metrics.get("rejected_logps") if isinstance(metrics, dict) else None
            return loss, chosen, rejected, ref_c, ref_r
        with self._autocast():
            logits = module(batch["input_ids"], batch["attention_mask"])
        lp = sequence_logps(logits, batch["labels"])
        n = lp.shape[0] // 2
        chosen, rejected = lp[:n], lp[n:]
        per = self.loss_fn(
            chosen, rejected, ref_c, ref_r, batch["chosen_lengths"].float(), batch["rejected_lengths"].float()
        )
        return per, chosen, rejected, ref_c, ref_r

    @staticmethod
    def _pair_stats(chosen, rejected, ref_c, ref_r) -> torch.Tensor:
        """Sums over pairs of :data:`STAT_NAMES`, from :func:`~dpalogic.runtime.metrics.pair_rewards` at β = 1.

        The reward is ``log π − log π_ref`` when the loss uses a reference (DPO's implicit reward), else ``log π``.
        """
        m = pair_rewards(chosen, rejected, ref_c, ref_r)
        return torch.stack([m[k].sum() for k in Trainer._STAT_KEYS])

    STAT_NAMES = ("logps_chosen", "logps_rejected", "reward_accuracy", "reward_margin", "logp_accuracy")
    _STAT_KEYS = ("chosen_logps", "rejected_logps", "accuracy", "margins", "logp_accuracy")  # pair_rewards' names

    # ------------------------------------------------------------------ evaluation

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Held-out loss and metrics over the whole eval set (split across ranks, summed exactly)."""
        assert self.eval_data is not None
        module = self.policy.module if hasattr(self.policy, "module") else self.policy
        self.model.eval()
        ex = self.eval_data.examples
        mine = ex[self.dist.rank :: self.dist.world]
        bs = self.cfg.eval_batch_size or self.cfg.batch_size
        # under FSDP every forward is collective (all-gathers), so every rank runs as many batches as the rank with
        # the most; one that has run out scores a stand-in pair and counts nothing
        batches = math.ceil(math.ceil(len(ex) / self.dist.world) / bs) if self.fsdp else math.ceil(len(mine) / bs)
        totals = torch.zeros(7, dtype=torch.float64, device=self.dist.device)
        try:
            for i in range(batches):
                chunk = mine[i * bs : (i + 1) * bs]
                batch = self._batch(chunk or ex[:1])
                per, c, r, rc, rr = self._pair_losses(module, batch, self.ref_eval)
                if not chunk:
                    continue
                n = batch["index"].numel()
                loss_sum = per.float().sum() if per.dim() else per.float() * n
                totals += torch.cat([torch.stack([loss_sum, loss_sum.new_tensor(n)]), self._stat_or_zero(c, r, rc, rr)])
        finally:
            self.model.train()
        self.dist.sum_(totals)
        n = totals[1].item()
        out = {"loss": totals[0].item() / n}
        if self.fused is None or totals[2:].abs().sum() > 0:
            out.update({k: totals[2 + i].item() / n for i, k in enumerate(self.STAT_NAMES)})
        out["pairs"] = int(n)
        return out

    def _stat_or_zero(self, c, r, rc, rr) -> torch.Tensor:
        if c is None or r is None:
            return torch.zeros(5, dtype=torch.float64, device=self.dist.device)
        return self._pair_stats(c, r, rc, rr).double()

    # ------------------------------------------------------------------ logging

    def _log(self, record: dict[str, Any]) -> None:
        self.history.append(record)
        if self.dist.main:
            with (self.out / LOG_FILE).open("a") as f:
                f.write(json.dumps(record) + "\n")
            if self.tracking:
                values = {f"{record['split']}/{k}": v for k, v in record.items() if k not in ("step", "epoch")}
                self.acc.log({k: v for k, v in values.items() if isinstance(v, (int, float))}, step=record["step"])
        for cb in self.callbacks:
            cb(record)

    def _open_logs(self) -> None:
        if not self.dist.main:
            return
        self.out.mkdir(parents=True, exist_ok=True)
        log = self.out / LOG_FILE
        if log.exists():  # a resumed run continues the log: drop what an interrupted run wrote after its checkpoint
            kept, bad, later = [], [], 0
            for i, line in enumerate(log.read_bytes().decode("utf-8", "replace").splitlines(), 1):
                if not line.strip():
                    continue
                try:
                    step = json.loads(line)["step"]
                except (ValueError, TypeError, KeyError):
                    step = None
                if not isinstance(step, int) or isinstance(step, bool):
                    bad.append(i)
                elif step <= self.step:
                    kept.append(line)
                else:
                    later += 1
            if bad:  # a kill in the middle of a write leaves half a line: it is dropped, never fatal
                lines = ", ".join(map(str, bad))
                self.say(f"{log}: dropped unreadable line(s) {lines} (a write was cut off, or the file was edited)")
            if later:
                self.say(f"{log}: dropped {later} line(s) logged after step {self.step}, which is resumed")
            ckpt.atomic_write_text(log, "".join(line + "\n" for line in kept))
        if self.acc.log_with:  # tensorboard when asked for and installed (accelerate's tracker): out/tensorboard
            self.acc.init_trackers("tensorboard")
            self.tracking = True

    # ------------------------------------------------------------------ checkpoints

    def save_checkpoint(self) -> Path:
        """``out/checkpoints/step-N`` (see :mod:`dpalogic.training.checkpoint`): every rank writes its RNG states into
        a temporary folder, rank 0 the weights, optimizer, scheduler and step, then the manifest, and renames it."""
        if not self._weights_finite():
            raise TrainingStopped(
                f"the weights became non-finite at step {self.step}; not saving them. {self._last_good()}"
            )
        root = self.out / CHECKPOINT_DIR
        final = root / f"step-{self.step}"
        tmp = root / f"step-{self.step}.tmp"
        # every rank reaches here at the same step (the stop flag is all-reduced), so the barriers cannot hang
        if self.dist.main:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        self.dist.barrier()
        ckpt.write_tensors(tmp / f"rng-{self.dist.rank}.safetensors", rng_state())  # each rank's own RNG streams
        # whole (gathered on rank 0 under FSDP; only the adapter under LoRA): a checkpoint resumes on any process count
        weights = scaling.model_state(self.model, sharded=self.fsdp, trainable_only=self.lora)
        optim = scaling.optimizer_state(self.model, self.optimizer, sharded=self.fsdp)
        self.dist.barrier()
        if self.dist.main:
            ckpt.write_tensors(tmp / "model.safetensors", weights)
            ckpt.write_tensors(tmp / "optimizer.safetensors", optim)
            ckpt.write_json(
                tmp / "state.json",
                {
                    "step": self.step,
                    "global_batch": self.global_batch,
                    "train_pairs": len(self.train_data.examples),
                    "world_size": self.dist.world,
                    "fsdp": self.fsdp,
                    "scheduler": self.scheduler.state_dict(),
                    "config": asdict(self.cfg),
                },
            )
            ckpt.write_manifest(tmp)  # last: a folder with a manifest is complete
            ckpt.publish(tmp, final, self.cfg.keep_checkpoints)
        self.dist.barrier()
        self.last_checkpoint = final
        return final

    def _weights_finite(self) -> bool:
        """Every weight finite, on every rank (under FSDP each rank checks its shards)."""
        local = [p.to_local() if hasattr(p, "to_local") else p for p in self.model.parameters()]
        bad = torch.tensor([float(not all(torch.isfinite(p).all() for p in local))], device=self.dist.device)
        return self.dist.sum_(bad).item() == 0

    def _last_good(self) -> str:
        advice = "Lower the learning rate or check the loss's hyperparameters."
        if self.last_checkpoint is None:
            return f"No checkpoint was saved before it. {advice}"
        return f"The last good checkpoint is {self.last_checkpoint} (continue with --resume {self.last_checkpoint}). {advice}"

    def _on_main(self, fn: Callable[[], Any]) -> Any:
        """``fn()`` on rank 0 only (it reads and hashes files); every rank gets its result or raises its error."""
        if self.dist.world <= 1:
            return fn()
        box: list[Any] = [None, None]
        if self.dist.main:
            try:
                box[0] = fn()
            except DPALogicError as e:
                box[1] = str(e)
        torch.distributed.broadcast_object_list(box, src=0)
        if box[1] is not None:
            raise DPALogicError(box[1])
        return box[0]

    def _newest_intact(self, root: Path) -> tuple[Path | None, list[str]]:
        """The newest checkpoint of ``root`` that passes verification, and the damaged ones skipped on the way."""
        folders, notes = ckpt.newest_first(root)
        for n in notes:
            self.say(f"resume: {n}")
        skipped = []
        for folder in folders:
            try:
                ckpt.verify(folder)
                return folder, skipped
            except ckpt.CheckpointError as e:
                skipped.append(str(e))
                self.say(f"resume: skipping {folder.name}: {e}")
        return None, skipped

    def _find_resume(self) -> tuple[str | None, list[str]]:
        """The verified checkpoint to resume from (``None``: a fresh start) and what of ``out`` it will replace.

        Starting fresh (or from another run's checkpoint) over a run already in ``out`` is refused without
        ``--overwrite``, so a reused ``--out`` never loses a run's log, checkpoints or final model.
        """
        r = self.cfg.resume
        here = self.out / CHECKPOINT_DIR
        found: Path | None = None
        if r == "auto" or (r and (Path(r) / CHECKPOINT_DIR).is_dir()):  # a run folder: its newest intact checkpoint
            root = here if r == "auto" else Path(r) / CHECKPOINT_DIR
            found, skipped = self._newest_intact(root)
            if found is None and skipped and not self.cfg.overwrite:
                raise DPALogicError(
                    f"no intact checkpoint in {root} to resume from:\n  " + "\n  ".join(skipped)
                    + "\npass --overwrite to start this run again"
                )  # fmt: skip
            if found is None:
                self.say(f"resume: no intact checkpoint in {root}, starting fresh")
            elif skipped:
                self.say(f"resume: {found} is the newest intact checkpoint; resuming from it")
        elif r:
            found = Path(r)
            if not found.is_dir():
                raise DPALogicError(f"--resume {r}: no such checkpoint or run folder")
            ckpt.verify(found)  # an explicit checkpoint that is damaged is an error, not a fallback
        # starting fresh, or from another run's checkpoint, would overwrite what is in out/: only with --overwrite
        inside = found is not None and found.resolve().parent == here.resolve()
        present = [] if inside else self._run_files()
        blocking = present
        if r == "auto" and found is None and not skipped:
            # a run stopped before its first checkpoint: nothing of it can be continued, and a resume drops the log
            # lines after its checkpoint anyway, so only a finished model blocks a fresh start
            blocking = [p for p in present if p.name in ("final", "summary.json")]
        if blocking and not self.cfg.overwrite:
            what = ", ".join(p.name + ("/" if p.is_dir() else "") for p in blocking)
            if found is not None:
                hint = "resume into a new --out folder, or pass --overwrite to replace it"
            elif r == "auto":
                hint = "it has no checkpoint to resume from; pass --overwrite to start it again"
            else:
                hint = "pass --resume auto to continue it, or --overwrite to replace it"
            raise DPALogicError(f"{self.out} already holds a run ({what}); {hint}")
        return (str(found) if found is not None else None), [str(p) for p in present]

    def _run_files(self) -> list[Path]:
        """What a run writes to ``out`` (the reference log-prob cache is keyed by its inputs, so it is not included)."""
        names = (LOG_FILE, CHECKPOINT_DIR, "final", "summary.json", "tensorboard")
        return [self.out / n for n in names if (self.out / n).exists()]

    def load_checkpoint(self, path: Path) -> None:
        """Restore weights, optimizer, scheduler, step and RNG states from a verified checkpoint folder."""
        state = ckpt.read_json(path / "state.json")
        if state["global_batch"] != self.global_batch or state["train_pairs"] != len(self.train_data.examples):
            raise DPALogicError(
                f"{path} was saved with a global batch of {state['global_batch']} pairs over {state['train_pairs']} "
                f"training pairs; this run has {self.global_batch} over {len(self.train_data.examples)}, so it would "
                "not continue the same run (keep batch_size × processes × grad_accum and the data unchanged)"
            )
        if bool(state.get("fsdp", False)) != self.fsdp:  # the optimizer state is keyed differently
            saved, here = ("with", "without") if state.get("fsdp") else ("without", "with")
            raise DPALogicError(f"{path} was saved {saved} FSDP; resume it {saved} --fsdp, not {here}")
        # under FSDP rank 0 reads the files and the tensors are broadcast, sharded as they arrive
        read = self.dist.main or not self.fsdp
        weights = ckpt.read_tensors(path / "model.safetensors") if read else {}
        scaling.load_model_state(self.model, weights, sharded=self.fsdp, trainable_only=self.lora)
        optim = ckpt.read_tensors(path / "optimizer.safetensors") if read else {}
        scaling.load_optimizer_state(self.model, self.optimizer, optim, sharded=self.fsdp)
        self.scheduler.load_state_dict(state["scheduler"])
        self.step = state["step"]
        rng_file = path / f"rng-{self.dist.rank}.safetensors"
        if rng_file.exists():
            set_rng_state(ckpt.read_tensors(rng_file))
        self.last_checkpoint = path
        self.say(f"resumed from {path} at step {self.step}")

    # ------------------------------------------------------------------ signals

    def _on_signal(self, signum, frame) -> None:
        if self._stop_signal:  # a second Ctrl-C: stop now, without a checkpoint
            raise KeyboardInterrupt
        self._stop_signal = True
        self.say("interrupt: finishing this step and saving a checkpoint (press Ctrl-C again to abort)")

    # ------------------------------------------------------------------ the loop

    def _micro_batches(self, step: int) -> list[list[Example]]:
        """This rank's micro-batches for optimizer step ``step`` (its slice of each global micro-batch)."""
        epoch, k = divmod(step, self.steps_per_epoch)
        order = epoch_order(len(self.train_data.examples), self.cfg.seed, epoch)
        b, w, r = self.cfg.batch_size, self.dist.world, self.dist.rank
        out = []
        for a in range(self.cfg.grad_accum):
            m = k * self.cfg.grad_accum + a
            glob = order[m * b * w : (m + 1) * b * w]
            out.append([self.train_data.examples[i] for i in glob[r * b : (r + 1) * b]])
        return out

    def _train_step(self) -> dict[str, Any]:
        totals = torch.zeros(8, dtype=torch.float64, device=self.dist.device)
        micro = self._micro_batches(self.step)
        for a, examples in enumerate(micro):
            batch = self._batch(examples)
            with self._accumulating(last=a == len(micro) - 1):
                per, c, r, rc, rr = self._pair_losses(self.policy, batch, self.ref_train)
                loss = per.mean() if per.dim() else per
                self.acc.backward(loss / len(micro))
            n = len(examples)
            totals[0] += loss.detach().double() * n
            totals[1] += n
            totals[2:7] += self._stat_or_zero(c, r, rc, rr)
        totals[7] = float(self._stop_signal)
        max_norm = self.cfg.max_grad_norm if self.cfg.max_grad_norm > 0 else float("inf")
        trained = [p for p in self.model.parameters() if p.requires_grad]
        grad_norm = torch.nn.utils.clip_grad_norm_(trained, max_norm)
        if hasattr(grad_norm, "full_tensor"):  # FSDP: a DTensor norm over every rank's shards
            grad_norm = grad_norm.full_tensor()
        self.dist.sum_(totals)  # one all-reduce: loss, metrics and the stop flag of every rank
        n = totals[1].item()
        record = {"split": "train", "step": self.step + 1, "loss": totals[0].item() / n}
        record.update({k: totals[2 + i].item() / n for i, k in enumerate(self.STAT_NAMES)})
        record["grad_norm"] = float(grad_norm)
        record["lr"] = self.scheduler.get_last_lr()[0]
        self._stop_signal = self._stop_signal or totals[7].item() > 0
        if not (math.isfinite(record["loss"]) and math.isfinite(record["grad_norm"])):
            self.optimizer.zero_grad(set_to_none=True)
            bad = "loss" if not math.isfinite(record["loss"]) else "gradient norm"
            raise TrainingStopped(
                f"the {bad} became {record['loss'] if bad == 'loss' else record['grad_norm']} at step {self.step + 1}; "
                f"training stopped without updating the weights. {self._last_good()}"
            )
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        record["epoch"] = self.step / self.steps_per_epoch
        return record

    def _accumulating(self, last: bool):
        """Gradients stay local until the last micro-batch of a step (accelerate's ``no_sync`` for DDP; FSDP2's own
        switch, which accelerate does not drive for a model it did not shard)."""
        if self.fsdp:
            self.model.set_requires_gradient_sync(last)
            return nullcontext()
        return nullcontext() if last else self.acc.no_sync(self.policy)

    def run(self) -> dict[str, Any]:
        """Train to ``total_steps`` (or until interrupted); returns the final metrics and paths."""
        from tqdm import tqdm

        if self.dist.main and self._replace:  # --overwrite: the previous run's files go only now, as training starts
            self.say(f"starting afresh in {self.out}: removing {', '.join(p.name for p in self._replace)}")
            for p in self._replace:
                shutil.rmtree(p) if p.is_dir() else p.unlink()
        self.dist.barrier()
        if self.resume_from is not None:
            self.load_checkpoint(self.resume_from)
        self._open_logs()
        cfg = self.cfg
        self.say(
            f"training {cfg.loss!r} on {self.dist.world} process(es), device {self.dist.device}: "
            f"{len(self.train_data.examples)} pairs, global batch {self.global_batch}, {self.total_steps} steps"
            + (f", reference {cfg.reference}" if self.needs_ref else ", reference-free")
            + (", bf16" if self.use_bf16 else "")
        )
        if self.eval_data is not None and self.step == 0:
            self._log({"split": "eval", "step": 0, "epoch": 0.0, **self.evaluate()})
        handlers = {}
        if _main_thread():  # signal handlers can only be installed from the main thread
            for s in (signal.SIGINT, signal.SIGTERM):
                handlers[s] = signal.signal(s, self._on_signal)
        # a live bar on a terminal; in a log file (no TTY) one line per evaluation instead of bar redraws
        show_bar = not self.quiet and cfg.progress and sys.stderr.isatty()
        text_progress = not self.quiet and cfg.progress and not show_bar
        bar = tqdm(
            total=self.total_steps, initial=self.step, disable=not show_bar, desc=f"{cfg.loss}", file=sys.stderr,
            dynamic_ncols=True,
        )  # fmt: skip
        interrupted = False
        try:
            while self.step < self.total_steps:
                rec = self._train_step()
                bar.update(1)
                bar.set_postfix(loss=f"{rec['loss']:.4f}", acc=f"{rec['reward_accuracy']:.2f}")
                if self.step % cfg.log_every == 0 or self.step == self.total_steps:
                    self._log(rec)
                if self.eval_data is not None and cfg.eval_every and self.step % cfg.eval_every == 0:
                    ev = self.evaluate()
                    self._log({"split": "eval", "step": self.step, "epoch": rec["epoch"], **ev})
                    bar.set_postfix(loss=f"{rec['loss']:.4f}", eval_acc=f"{ev.get('reward_accuracy', 0):.2f}")
                    if text_progress:
                        self.say(
                            f"step {self.step}/{self.total_steps}: train loss {rec['loss']:.4f}, eval loss "
                            f"{ev['loss']:.4f}, eval reward accuracy {ev.get('reward_accuracy', float('nan')):.3f}"
                        )
                if self._stop_signal:
                    interrupted = True
                    break
                if cfg.save_every and self.step % cfg.save_every == 0 and self.step < self.total_steps:
                    self.save_checkpoint()
        finally:
            bar.close()
            for s, h in handlers.items():
                signal.signal(s, h)
        ckpt = self.save_checkpoint()
        result: dict[str, Any] = {"step": self.step, "checkpoint": str(ckpt), "interrupted": interrupted}
        if interrupted:
            self.say(f"interrupted at step {self.step}: saved {ckpt}; continue with --resume {ckpt}")
            return result
        if self.eval_data is not None and not (cfg.eval_every and self.step % cfg.eval_every == 0):
            self._log(
                {"split": "eval", "step": self.step, "epoch": self.step / self.steps_per_epoch, **self.evaluate()}
            )
        final = self.out / "final"
        # under FSDP the weights are gathered on rank 0 (every rank takes part); under LoRA only the adapter is saved,
        # in peft's layout (adapter_config.json, adapter_model.safetensors), so PeftModel.from_pretrained loads it
        whole = scaling.model_state(self.model, sharded=True, trainable_only=self.lora) if self.fsdp else None
        if self.dist.main:
            from transformers.utils import logging as hf_logging

            bars = hf_logging.is_progress_bar_enabled()
            hf_logging.disable_progress_bar()  # no "Writing model shards" bar in the run's output
            try:
                saver = self.model if self.lora else scaling.hf_model(self.model)
                saver.save_pretrained(final, **({"state_dict": whole} if whole is not None else {}))
                self.tokenizer.save_pretrained(final)
            finally:
                if bars:
                    hf_logging.enable_progress_bar()
            evals = [h for h in self.history if h["split"] == "eval"]
            result["eval"] = evals[-1] if evals else None
            result["final_model"] = str(final)
            (self.out / "summary.json").write_text(json.dumps(result, indent=2) + "\n")
            self.say(f"done: {self.step} steps; model saved to {final}")
        self.dist.barrier()
        return result

    def close(self) -> None:
        scaling.release_accelerator(self.acc, self.dist.owns_group)


def _main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def train(cfg: TrainConfig, **kw: Any) -> dict[str, Any]:
    """Run one training job (see :class:`Trainer` for the keyword arguments); returns final metrics and paths."""
    trainer = Trainer(cfg, **kw)
    try:
        out = trainer.run()
        out["history"] = trainer.history
        return out
    finally:
        trainer.close()
