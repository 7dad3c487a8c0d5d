"""Training with dpalogic losses: data, models, a training loop, the synthetic demo and the ``train``/``demo`` commands.

Modules (each imports torch/transformers itself; importing this package does not):

- :mod:`dpalogic.training.data` — preference rows from JSONL/JSON/Parquet/``datasets`` folders, validation with row
  numbers, tokenization (chat templates for message lists), truncation, padding.
- :mod:`dpalogic.training.model` — the local character tokenizer and ``tiny`` model, loading local checkpoints,
  per-sequence log-probabilities, the reference model and its on-disk log-prob cache.
- :mod:`dpalogic.training.loop` — :class:`TrainConfig` and :func:`train`: AdamW, warmup+cosine, accumulation,
  clipping, evaluation, JSONL logs, exact-resume checkpoints, DDP or FSDP2 under ``torchrun``/``accelerate launch``.
- :mod:`dpalogic.training.scaling` — ``accelerate`` set-up, FSDP2 sharding, LoRA (peft), gradient checkpointing,
  whole-model state dicts for the checkpoints.
- :mod:`dpalogic.training.checkpoint` — checkpoint folders that never unpickle: safetensors, JSON, a sha256 manifest.
- :mod:`dpalogic.training.plan` — ``dpalogic train --plan``: memory per GPU from a model's config, nothing loaded.
- :mod:`dpalogic.training.demo` — the synthetic sorting task and the side-by-side loss study (table + PNG plots).

The commands ``dpalogic train`` and ``dpalogic demo`` live in :mod:`dpalogic.cli.train` and :mod:`dpalogic.cli.demo`.
"""
