"""The training loop: any dpalogic loss on a causal LM, resumable exactly, on one process, under DDP or FSDP2.

One optimizer step sees a *global batch* of ``batch_size × world_size × grad_accum`` pairs. The pairs of epoch ``e``
are a permutation drawn from ``(seed, e)`` alone, so the data position is just the global step: a resumed run (same
global batch) meets the same batches, and a 2-process run meets the same global batches as one process with twice the
per-device batch. Checkpoints hold the weights, AdamW and scheduler state, every rank's RNG states and the step, stored
by :mod:`dpalogic.training.checkpoint` (safetensors and JSON, checked against a manifest before anything is loaded).

Processes, devices, bf16 autocast, ``no_sync``, the DDP wrapper, barriers, reductions and trackers come from
``accelerate`` (see :mod:`dpalogic.training.scaling`, which also says why checkpoints do not use
``Accelerator.save_state``). Under ``torchrun`` or ``accelerate launch`` (``WORLD_SIZE > 1``) the model is wrapped in
``DistributedDataParallel``, sharded with FSDP2 (``--fsdp``), or given to a DeepSpeed ZeRO engine (``--deepspeed``,
:mod:`~dpalogic.training.zero`); each rank takes its slice of the global batch, and
since the loss is a mean over pairs, the averaged gradient is the gradient of the global-batch mean. ``--lora-r``
trains a peft adapter, and the reference is then the base model with the adapter switched off.

This module is the orchestration; the pieces live in :mod:`~dpalogic.training.steps` (schedule, batches, forward,
evaluation), :mod:`~dpalogic.training.reference`, :mod:`~dpalogic.training.resume` (RNG states, which checkpoint,
the log), :mod:`~dpalogic.training.runlog` (log records, trackers, interrupts), :mod:`~dpalogic.training.dist` (this
process's rank and collectives) and :mod:`~dpalogic.training.final_model` (``out/final``).
"""

from __future__ import annotations

import json
import math
import shutil
import sys
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from dpalogic.errors import DPALogicError
from dpalogic.training import scaling, zero
from dpalogic.training.annotations import annotate_rows
from dpalogic.training.checkpoint import read_json
from dpalogic.training.config import TrainConfig
from dpalogic.training.data import (
    BAD_ROWS_FILE,
    PreferenceRows,
    TokenizedData,
    pad_id,
    write_bad_rows,
)
from dpalogic.training.dist import Dist
from dpalogic.training.final_model import save_final_model
from dpalogic.training.model import load_model_and_tokenizer
from dpalogic.training.ranked import RankedRows, tokenize_ranked
from dpalogic.training.ranked_steps import RankedForward, examples_text, list_size, prepare_rows, steps_per_epoch
from dpalogic.training.reference import Reference, build_reference
from dpalogic.training.reference import read_reference_cache as read_reference_cache  # re-exported
from dpalogic.training.resume import CHECKPOINT_DIR, find_resume, load_checkpoint, save_checkpoint
from dpalogic.training.resume import rng_state as rng_state  # re-exported
from dpalogic.training.resume import set_rng_state as set_rng_state
from dpalogic.training.runlog import RunLog, interrupts, say
from dpalogic.training.steps import STAT_NAMES, PairForward, Policy, evaluate, lr_lambda, micro_batches
from dpalogic.training.unpaired import load_rows, needs_live_reference, tokenize_any
from dpalogic.training.update import TorchUpdate, ZeroUpdate

# the atoms of a pair loss: a formula over y1 … yK (or one without a policy atom) cannot train on chosen/rejected rows
PAIR_ATOMS = frozenset({"M(yw)", "M(yl)", "Ref(yw)", "Ref(yl)"})


class TrainingStopped(DPALogicError):
    """The run stopped early (non-finite loss); the message names the last good checkpoint."""


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
        self.out = Path(cfg.out)
        owns = not (torch.distributed.is_available() and torch.distributed.is_initialized())
        self.acc = scaling.make_accelerator(cfg, str(self.out))
        self.dist = Dist(self.acc, owns and self.acc.num_processes > 1)
        self.quiet = quiet or not self.dist.main
        self.log = RunLog(self.out, self.acc, list(callbacks or []))
        self.history = self.log.history
        try:
            self._build(train_rows, eval_rows, model, tokenizer)
        except BaseException:  # give accelerate's process-wide state back, or the next run in this process fails
            scaling.release_accelerator(self.acc, self.dist.owns_group)
            raise

    def _build(self, train_rows, eval_rows, model, tokenizer) -> None:
        cfg = self.cfg
        self.fsdp = scaling.fsdp_requested(cfg)
        self.engine = None  # the DeepSpeed engine, made once the optimizer is (see _setup_optimizer)
        self.zero = scaling.deepspeed_requested(cfg)
        if (self.fsdp or self.zero) and cfg.fused:  # an accelerate config chose them (flags are checked before)
            raise DPALogicError("--fused cannot run under FSDP or ZeRO: the fused loss needs the whole LM head")
        self.lora = cfg.lora_r is not None
        from accelerate.utils import set_seed

        set_seed(cfg.seed)  # python, numpy and torch (and every GPU)
        self._make_loss()  # before the data, the model and the reference pass are loaded
        # which checkpoint to resume from, verified, and whether out/ may be written: decided before anything loads
        found, replace = self.dist.on_main(lambda: find_resume(cfg.resume, cfg.overwrite, self.out, self.say))
        self.resume_from = Path(found) if found is not None else None
        self._replace = [Path(p) for p in replace]

        if model is None:
            model, tokenizer = load_model_and_tokenizer(cfg.model, seed=cfg.seed, dropout=cfg.dropout)
        elif tokenizer is None:
            raise DPALogicError("pass the tokenizer together with the model")
        self.tokenizer = tokenizer
        self.pad = pad_id(tokenizer)
        self._load_data(train_rows, eval_rows)
        # precision: bf16 autocast on GPUs that have it (accelerate's mixed precision); float32 otherwise
        self.use_bf16 = self.acc.mixed_precision == "bf16"
        self._setup_model(model)
        self._setup_optimizer()
        self.step = 0
        self.last_checkpoint: Path | None = None
        self._stop_signal = False  # this rank was asked to stop (SIGINT/SIGTERM)
        self._stop_agreed = False  # some rank was, as of the last step's all-reduce: every rank stops there together

    # ------------------------------------------------------------------ setup

    def say(self, msg: str) -> None:
        say(msg, self.quiet)

    def _make_loss(self) -> None:
        """The loss (and the fused LM-head loss), checked to train on pairs."""
        from dpalogic import PreferenceLoss

        cfg = self.cfg
        self.loss_fn = PreferenceLoss(cfg.loss, reduction="none", **cfg.hp)
        self.list_k = list_size(self.loss_fn, cfg.fused)  # K of a loss over y1 … yK (training.ranked_steps), or None
        if self.list_k is not None:
            self.needs_ref, self.fused = self.loss_fn.needs_reference, None
            return
        if getattr(self.loss_fn, "structure_free", False):  # KTO, BCO, f-DPO, …: plain torch on the log-probs
            if cfg.fused:
                raise DPALogicError(f"--fused runs compiled programs; {cfg.loss} has no structure: drop --fused")
            self.needs_ref, self.fused = self.loss_fn.needs_reference, None
            return
        names = {a.name for a in self.loss_fn.atoms}
        if not names <= PAIR_ATOMS:
            raise DPALogicError(
                f"training data has pairs (chosen yw, rejected yl), but this loss uses {', '.join(sorted(names - PAIR_ATOMS))}"
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

    def _load_data(self, train_rows: PreferenceRows | None, eval_rows: PreferenceRows | None) -> None:
        """Every rank reads and tokenizes (cheap next to training); only rank 0 reports."""
        cfg = self.cfg
        if train_rows is None:
            if not cfg.data:
                raise DPALogicError("no training data: pass --data FILE (JSONL, JSON, Parquet or a datasets folder)")
            train_rows = load_rows(cfg.data, strict=cfg.strict_data)  # pairs, or unpaired rows (kto, bco)
        if eval_rows is None and cfg.eval:
            eval_rows = load_rows(cfg.eval, strict=cfg.strict_data, split="eval")
        # K-answer rows: kept for a loss over y1 … yK, or made into pairs (--pairs, --curriculum)
        train_rows, eval_rows = (
            prepare_rows(r, cfg, self.list_k, self.needs_ref, self.say) for r in (train_rows, eval_rows)
        )
        if needs_live_reference(self.loss_fn, cfg.loss, train_rows, eval_rows) and cfg.reference == "cache":
            self.say(f"{cfg.loss}: a live reference model, not a reference cache (the cache holds pairs only)")
            cfg.reference = "model"
        train_rows, eval_rows = (annotate_rows(r, cfg) for r in (train_rows, eval_rows))  # margins, spans
        self.train_data = self._tokenize(train_rows, "train data")
        self.eval_data = self._tokenize(eval_rows, "eval data") if eval_rows is not None else None
        if self.dist.main:  # every skipped row with its number and reason (the console lists only the first few)
            sets = [(train_rows, self.train_data)] + ([(eval_rows, self.eval_data)] if self.eval_data else [])
            bad = write_bad_rows(self.out / BAD_ROWS_FILE, [(r.source, r.issues + t.issues) for r, t in sets])
            if bad is not None:
                self.say(f"every skipped row, with its number and reason: {bad}")
        self.global_batch = cfg.batch_size * self.dist.world * cfg.grad_accum
        self.steps_per_epoch = steps_per_epoch(len(self.train_data.examples), cfg, self.dist.world, self.list_k)

    def _tokenize(self, rows: PreferenceRows, what: str) -> TokenizedData:
        tok = (tokenize_ranked if isinstance(rows, RankedRows) else tokenize_any)(
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

    def _setup_model(self, model) -> None:
        """The reference (from the *initial* weights, before a checkpoint is loaded), then the policy: adapter,
        gradient checkpointing, device, and the DDP wrapper or FSDP2 shards."""
        cfg = self.cfg
        self.reference = Reference()
        if self.needs_ref:
            sets = {"train": self.train_data} | ({"eval": self.eval_data} if self.eval_data is not None else {})
            self.reference = build_reference(
                cfg, model, lora=self.lora, acc=self.acc, out=self.out, sets=sets, pad=self.pad, say=self.say
            )
        self.ref_model = self.reference.model
        if self.lora:  # after the reference: a cached reference is the base model itself, with no adapter
            model = scaling.apply_lora(model, cfg)
        if cfg.gradient_checkpointing:
            scaling.enable_gradient_checkpointing(model)
        self.model = model.to(self.dist.device)
        self.model.train()
        self.policy: torch.nn.Module = Policy(self.model)
        if self.fsdp:
            scaling.shard(self.model)  # in place: the optimizer below sees the sharded parameters
            if self.ref_model is not None:
                scaling.shard(self.ref_model)
        elif self.dist.world > 1 and not self.zero:
            self.policy = self.acc.prepare(self.policy)  # DistributedDataParallel
        self.forward = (RankedForward if self.list_k is not None else PairForward)(
            self.loss_fn, self.fused, self.model, self.reference, self.needs_ref, self.acc, self.pad
        )

    def _setup_optimizer(self) -> None:
        cfg = self.cfg
        decay = [p for p in self.model.parameters() if p.requires_grad and p.dim() >= 2]
        no_decay = [p for p in self.model.parameters() if p.requires_grad and p.dim() < 2]
        groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
        # DeepSpeed drops an empty group (no biases or norms train under LoRA); the scheduler must see the same groups
        self.optimizer = torch.optim.AdamW([g for g in groups if g["params"] or not self.zero], lr=cfg.lr)
        self.total_steps = cfg.max_steps or cfg.epochs * self.steps_per_epoch
        warmup = math.ceil(cfg.warmup_ratio * self.total_steps)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lr_lambda(self.total_steps, warmup, cfg.min_lr_ratio)
        )
        self.update: TorchUpdate | ZeroUpdate = TorchUpdate(
            self.acc, self.policy, self.model, self.optimizer, fsdp=self.fsdp, clip=cfg.max_grad_norm
        )
        if self.zero:  # the engine partitions this AdamW (the scheduler keeps setting its learning rate)
            config = zero.engine_config(cfg, world=self.dist.world, bf16=self.use_bf16, say=self.say)
            self.engine = zero.make_engine(self.model, self.optimizer, config)
            self.policy = Policy(self.engine)  # forwards through the engine: its ZeRO-3 gathers and backward hooks
            self.update = ZeroUpdate(self.engine)

    # ------------------------------------------------------------------ the step

    def _on_signal(self, signum, frame) -> None:
        if self._stop_signal:  # a second Ctrl-C: stop now, without a checkpoint
            raise KeyboardInterrupt
        self._stop_signal = True
        self.say("interrupt: finishing this step and saving a checkpoint (press Ctrl-C again to abort)")

    def _train_step(self) -> dict[str, Any]:
        cfg, fwd = self.cfg, self.forward
        totals = torch.zeros(8, dtype=torch.float64, device=self.dist.device)
        micro = micro_batches(
            self.train_data.examples, step=self.step, steps_per_epoch=self.steps_per_epoch, seed=cfg.seed,
            batch_size=cfg.batch_size, grad_accum=cfg.grad_accum, world=self.dist.world, rank=self.dist.rank,
            ordered=cfg.curriculum is not None,
        )  # fmt: skip
        for a, examples in enumerate(micro):
            batch = fwd.batch(examples)
            with self.update.accumulating(last=a == len(micro) - 1):
                per, c, r, rc, rr = fwd.pair_losses(self.policy, batch, self.reference.train)
                loss = per.mean() if per.dim() else per
                self.update.backward(loss / len(micro))
            n = len(examples)
            totals[0] += loss.detach().double() * n
            totals[1] += n
            totals[2:7] += fwd.stats(c, r, rc, rr)
        totals[7] = float(self._stop_signal)
        grad_norm = self.update.grad_norm()  # before the step (which it may stop)
        totals = self.dist.sum(totals)  # one all-reduce: loss, metrics and the stop flag of every rank
        n = totals[1].item()
        record = {"split": "train", "step": self.step + 1, "loss": totals[0].item() / n}
        record.update({k: totals[2 + i].item() / n for i, k in enumerate(getattr(fwd, "stat_names", STAT_NAMES))})
        record["grad_norm"] = float(grad_norm)
        record["lr"] = self.scheduler.get_last_lr()[0]
        # with other ranks, stop on what every rank saw in this all-reduce, never on a signal that came after it
        # (one rank would leave while the others wait in the next step's collectives): a later one travels in the
        # next; alone, stop on it at once
        self._stop_agreed = totals[7].item() > 0
        if not (math.isfinite(record["loss"]) and math.isfinite(record["grad_norm"])):
            self.update.discard()
            bad = "loss" if not math.isfinite(record["loss"]) else "gradient norm"
            raise TrainingStopped(
                f"the {bad} became {record['loss'] if bad == 'loss' else record['grad_norm']} at step {self.step + 1}; "
                f"training stopped without updating the weights. {self._last_good()}"
            )
        self.update.step()
        self.scheduler.step()
        self.step += 1
        record["epoch"] = self.step / self.steps_per_epoch
        return record

    def evaluate(self) -> dict[str, float]:
        """Held-out loss and metrics over the whole eval set (split across ranks, summed exactly)."""
        assert self.eval_data is not None
        module = self.policy.module if hasattr(self.policy, "module") else self.policy
        bs = self.cfg.eval_batch_size or self.cfg.batch_size
        # under FSDP and ZeRO-3 every forward is collective: each rank runs as many batches
        return evaluate(self.forward, module, self.eval_data, bs, fsdp=self.fsdp or self.engine is not None)

    def _log_eval(self, epoch: float) -> dict[str, float]:
        ev = self.evaluate()
        self.log({"split": "eval", "step": self.step, "epoch": epoch, **ev})
        return ev

    # ------------------------------------------------------------------ the run

    def run(self) -> dict[str, Any]:
        """Train to ``total_steps`` (or until interrupted); returns the final metrics and paths."""
        self._start()
        with interrupts(self._on_signal):
            interrupted = self._loop()
        path = self.save_checkpoint()
        result: dict[str, Any] = {"step": self.step, "checkpoint": str(path), "interrupted": interrupted}
        if interrupted:
            self.say(f"interrupted at step {self.step}: saved {path}; continue with --resume {path}")
            return result
        cfg = self.cfg
        if self.eval_data is not None and not (cfg.eval_every and self.step % cfg.eval_every == 0):
            self._log_eval(self.step / self.steps_per_epoch)
        self._save_final(result)
        self.dist.barrier()
        return result

    def _start(self) -> None:
        """Clear what ``--overwrite`` replaces, resume, open the log, and evaluate the initial model."""
        if self.dist.main and self._replace:  # --overwrite: the previous run's files go only now, as training starts
            self.say(f"starting afresh in {self.out}: removing {', '.join(p.name for p in self._replace)}")
            for p in self._replace:
                shutil.rmtree(p) if p.is_dir() else p.unlink()
        self.dist.barrier()
        if self.resume_from is not None:
            self.load_checkpoint(self.resume_from)
        self.log.open(self.step, self.say)
        cfg = self.cfg
        self.say(
            f"training {cfg.loss!r} on {self.dist.world} process(es), device {self.dist.device}: "
            f"{examples_text(len(self.train_data.examples), self.list_k)}, global batch {self.global_batch}, "
            f"{self.total_steps} steps"
            + (f", reference {cfg.reference}" if self.needs_ref else ", reference-free")
            + (", bf16" if self.use_bf16 else "")
        )
        if self.eval_data is not None and self.step == 0:
            self._log_eval(0.0)

    def _loop(self) -> bool:
        """Steps until ``total_steps``, logging, evaluating and saving as configured; ``True`` if interrupted."""
        from tqdm import tqdm

        cfg = self.cfg
        # a live bar on a terminal; in a log file (no TTY) one line per evaluation instead of bar redraws
        show_bar = not self.quiet and cfg.progress and sys.stderr.isatty()
        text_progress = not self.quiet and cfg.progress and not show_bar
        bar = tqdm(
            total=self.total_steps, initial=self.step, disable=not show_bar, desc=f"{cfg.loss}", file=sys.stderr,
            dynamic_ncols=True,
        )  # fmt: skip
        try:
            while self.step < self.total_steps:
                rec = self._train_step()
                bar.update(1)
                bar.set_postfix(
                    loss=f"{rec['loss']:.4f}", acc=f"{rec.get('reward_accuracy', rec.get('top1_accuracy')):.2f}"
                )
                if self.step % cfg.log_every == 0 or self.step == self.total_steps:
                    self.log(rec)
                if self.eval_data is not None and cfg.eval_every and self.step % cfg.eval_every == 0:
                    ev = self._log_eval(rec["epoch"])
                    acc = ev.get("reward_accuracy", ev.get("top1_accuracy", 0))
                    bar.set_postfix(loss=f"{rec['loss']:.4f}", eval_acc=f"{acc:.2f}")
                    if text_progress:
                        self.say(
                            f"step {self.step}/{self.total_steps}: train loss {rec['loss']:.4f}, eval loss "
                            f"{ev['loss']:.4f}, {self.forward.eval_text(ev)}"
                        )
                if self._stop_agreed or (self._stop_signal and self.dist.world <= 1):
                    return True
                if cfg.save_every and self.step % cfg.save_every == 0 and self.step < self.total_steps:
                    self.save_checkpoint()
        finally:
            bar.close()
        return False

    def _save_final(self, result: dict[str, Any]) -> None:
        """``out/final`` (the model and tokenizer) and ``out/summary.json``, completing ``result``."""
        final = self.out / "final"
        save_final_model(
            self.model, self.tokenizer, final, main=self.dist.main, fsdp=self.fsdp, lora=self.lora, engine=self.engine
        )
        if not self.dist.main:
            return
        evals = [h for h in self.history if h["split"] == "eval"]
        result["eval"] = evals[-1] if evals else None
        result["final_model"] = str(final)
        (self.out / "summary.json").write_text(json.dumps(result, indent=2) + "\n")
        self.say(f"done: {self.step} steps; model saved to {final}")

    def close(self, finished: bool = False) -> None:
        scaling.release_accelerator(self.acc, self.dist.owns_group, self.engine, finished=finished)

    # ------------------------------------------------------------------ checkpoints

    def save_checkpoint(self) -> Path:
        """``out/checkpoints/step-N``, after checking that every weight is finite."""
        if not self._weights_finite():
            raise TrainingStopped(
                f"the weights became non-finite at step {self.step}; not saving them. {self._last_good()}"
            )
        state = {
            "step": self.step,
            "global_batch": self.global_batch,
            "train_pairs": len(self.train_data.examples),
            "world_size": self.dist.world,
            "fsdp": self.fsdp,
            "zero_stage": int(self.engine.zero_optimization_stage()) if self.engine is not None else 0,
            "scheduler": self.scheduler.state_dict(),
            "config": asdict(self.cfg),
        }
        if hasattr(self.loss_fn, "stats_state"):  # batch statistics carried across steps (BCO's δ)
            state["loss_state"] = self.loss_fn.stats_state()
        self.last_checkpoint = save_checkpoint(
            self.out / CHECKPOINT_DIR, state, self.dist, self.model, self.optimizer, lora=self.lora,
            keep=self.cfg.keep_checkpoints, engine=self.engine,
        )  # fmt: skip
        return self.last_checkpoint

    def load_checkpoint(self, path: Path) -> None:
        """Restore weights, optimizer, scheduler, step and RNG states from a verified checkpoint folder."""
        self.step = load_checkpoint(
            path, self.dist, self.model, self.optimizer, self.scheduler, fsdp=self.fsdp, lora=self.lora,
            global_batch=self.global_batch, train_pairs=len(self.train_data.examples), engine=self.engine,
        )  # fmt: skip
        if hasattr(self.loss_fn, "load_stats_state"):  # BCO's running mean δ, as it was at that step
            self.loss_fn.load_stats_state(read_json(path / "state.json").get("loss_state", {}))
        self.last_checkpoint = path
        self.say(f"resumed from {path} at step {self.step}")

    def _weights_finite(self) -> bool:
        """Every weight finite, on every rank (under FSDP each rank checks its shards, under ZeRO its partitions)."""
        bad = torch.tensor([float(not self.update.weights_finite())], device=self.dist.device)
        return self.dist.sum(bad).item() == 0

    def _last_good(self) -> str:
        advice = "Lower the learning rate or check the loss's hyperparameters."
        if self.last_checkpoint is None:
            return f"No checkpoint was saved before it. {advice}"
        return f"The last good checkpoint is {self.last_checkpoint} (continue with --resume {self.last_checkpoint}). {advice}"


def train(cfg: TrainConfig, **kw: Any) -> dict[str, Any]:
    """Run one training job (see :class:`Trainer` for the keyword arguments); returns final metrics and paths."""
    trainer = Trainer(cfg, **kw)
    finished = False
    try:
        out = trainer.run()
        out["history"] = trainer.history
        finished = True
        return out
    finally:
        trainer.close(finished)
