"""Unpaired rows and the training step of the losses with no structure (KTO, BCO, f-DPO, DPOP, AlphaPO, AOT).

Unpaired rows follow TRL's unpaired format, ``{"prompt": …, "completion": …, "label": true|false}`` (strings or chat
messages, as for pairs; ``label`` true marks a desirable answer). They train the losses that score answers one at a
time (``kto``, ``bco``); a file of them is recognised by its rows having ``completion`` and ``label`` and no
``chosen``. Bad rows are reported by row number, like bad pairs (:class:`~dpalogic.training.data.RowIssue`,
``bad_rows.jsonl``).

KTO's reference point needs the log-probs of *mismatched* prompt/completion pairs under the policy and the
reference. As TRL does, the completions of a micro-batch are rotated by one: answer k's prompt is paired with answer
k − 1's completion (for pairs, the answers are the B chosen then the B rejected ones). The reference of such a
sequence is not in a ``--reference cache`` file, so these runs use a live reference (``--reference model``, or under
LoRA the policy with its adapter off).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from dpalogic.errors import DPALogicError
from dpalogic.training import data as D
from dpalogic.training.data import PreferenceRows, TokenizedData
from dpalogic.training.fields import is_empty, record_issue, text_issue, type_name
from dpalogic.training.truncation import tokenize_each

UNPAIRED_FIELDS = ("prompt", "completion", "label")


@dataclass
class UnpairedRows(PreferenceRows):
    """Valid unpaired rows (``prompt``, ``completion``, ``label``) and the skipped ones."""


@dataclass(frozen=True)
class UnpairedExample:
    """One tokenized answer with its label; ``index`` is its position in the dataset."""

    index: int
    row: int
    prompt_ids: list[int]
    completion_ids: list[int]
    label: bool


def is_unpaired(records: Sequence[tuple[int, Any]]) -> bool:
    """Rows in TRL's unpaired format: the first object row has ``completion`` and ``label`` and no ``chosen``."""
    first = next((r for _, r in records if isinstance(r, dict)), None)
    return first is not None and "completion" in first and "label" in first and "chosen" not in first


def normalize_unpaired(rec: Any) -> tuple[dict[str, Any] | None, str | None]:
    """A valid row as ``{"prompt", "completion", "label"}``, or the reason it is not."""
    if why := record_issue(rec, UNPAIRED_FIELDS, "an unpaired row (completion, label)"):
        return None, why
    label = rec["label"]
    if not isinstance(label, bool):
        return (
            None,
            f"'label' must be true or false, got {type_name(label) if not isinstance(label, (int, float)) else repr(label)}",
        )
    prompt, completion = rec["prompt"], rec["completion"]
    if why := text_issue((("'prompt'", prompt), ("'completion'", completion))):
        return None, why
    if isinstance(prompt, str) != isinstance(completion, str):
        return None, "mixes plain strings and chat messages across prompt/completion"
    if is_empty(completion):
        return None, "empty 'completion'"
    return {"prompt": prompt, "completion": completion, "label": label}, None


def load_rows(path: str | os.PathLike, *, strict: bool = False, split: str | None = None) -> PreferenceRows:
    """Pairs (:func:`~dpalogic.training.data.load_preferences`'s rows) or, when the file holds them, unpaired rows."""
    records, issues = D.read_records(path, split)
    if not is_unpaired(records):
        return D._validated(str(path), records, issues, strict)
    return UnpairedRows(str(path), *D._checked(str(path), records, normalize_unpaired, issues, strict))


def tokenize_unpaired(
    data: UnpairedRows,
    tokenizer,
    *,
    max_length: int | None = 1024,
    max_prompt_length: int | None = 512,
    strict: bool = False,
) -> TokenizedData:
    """Tokenize unpaired rows with the pairs' rules (:func:`~dpalogic.training.data.tokenize_rows`): the prompt
    keeps its end, the completion its start."""

    def tokenize(row: dict[str, Any]) -> tuple[list[int], list[list[int]]]:
        # a pair whose two answers are this completion: the same tokenization, EOS and chat template
        pair = {"prompt": row["prompt"], "chosen": row["completion"], "rejected": row["completion"]}
        p, c, _ = D.tokenize_pair(tokenizer, pair)
        return p, [c]

    def example(i: int, n: int, row: dict[str, Any], p: list[int], answers: list[list[int]], _) -> UnpairedExample:
        return UnpairedExample(i, n, p, answers[0], row["label"])

    empty = "the completion has no tokens after tokenization"
    return tokenize_each(data, tokenize, example, max_length, max_prompt_length, strict, what="row", empty=empty)


def tokenize_any(rows: PreferenceRows, tokenizer, **kw: Any) -> TokenizedData:
    """Pairs through :func:`~dpalogic.training.data.tokenize_rows`, unpaired rows through :func:`tokenize_unpaired`."""
    return (tokenize_unpaired if isinstance(rows, UnpairedRows) else D.tokenize_rows)(rows, tokenizer, **kw)


def needs_live_reference(loss_fn, name: str, *sets: PreferenceRows | None) -> bool:
    """Whether the run needs a live reference (a reference cache holds the log-probs of pairs only): unpaired rows,
    and KTO's mismatched pairs. Refuses unpaired rows for a loss that trains on pairs."""
    unpaired = any(isinstance(r, UnpairedRows) for r in sets)
    if unpaired and not getattr(loss_fn, "accepts_unpaired", False):
        raise DPALogicError(
            f"the data has unpaired rows (prompt, completion, label); {name} trains on pairs (prompt, chosen, "
            "rejected). Unpaired rows train kto or bco"
        )
    return unpaired or getattr(loss_fn, "needs_kl", False)


# --------------------------------------------------------------------------------------------------- batches


def answers(examples: Sequence[Any]) -> list[tuple[list[int], list[int]]]:
    """(prompt, completion) of every answer of a batch: unpaired examples in order, pairs as chosen then rejected."""
    if examples and isinstance(examples[0], UnpairedExample):
        return [(e.prompt_ids, e.completion_ids) for e in examples]
    return [(e.prompt_ids, e.chosen_ids) for e in examples] + [(e.prompt_ids, e.rejected_ids) for e in examples]


def mismatched(examples: Sequence[Any], pad: int) -> dict[str, torch.Tensor]:
    """KTO's mismatched sequences, TRL's rotation: answer k's prompt with answer k − 1's completion."""
    seqs = answers(examples)
    if len(seqs) < 2:
        raise DPALogicError("kto's KL estimate pairs each prompt with another answer's completion: use batch_size >= 2")
    rotated = [(p, seqs[k - 1][1]) for k, (p, _) in enumerate(seqs)]
    return {f"kl_{k}": v for k, v in D.stack_answers(rotated, pad).items()}


def collate_any(examples: Sequence[Any], pad: int, *, kl: bool) -> dict[str, torch.Tensor]:
    """A batch of pairs (:func:`~dpalogic.training.data.collate`) or of unpaired answers (``label`` ``[N]``), plus
    the mismatched sequences when ``kl``."""
    if examples and isinstance(examples[0], UnpairedExample):
        batch = D.stack_answers(answers(examples), pad)
        batch["label"] = torch.tensor([e.label for e in examples])
        batch["index"] = torch.tensor([e.index for e in examples])
    else:
        batch = D.collate(examples, pad)
    if kl:
        batch.update(mismatched(examples, pad))
    return batch


# --------------------------------------------------------------------------------------------------- the step


def structure_free_losses(fwd, module, batch: dict[str, torch.Tensor], cache: torch.Tensor | None):
    """``PairForward.pair_losses`` for a loss with no structure: per-pair (or, for unpaired rows, per-answer) losses
    and the per-pair log-probs for metrics (``None`` for unpaired rows, which have no pairs to compare)."""
    from dpalogic.training.model import sequence_logps
    from dpalogic.training.reference import batch_reference_logps
    from dpalogic.training.steps import answer_lengths

    loss_fn = fwd.loss_fn
    with fwd.acc.autocast():
        logits = module(batch["input_ids"], batch["attention_mask"])
    lp = sequence_logps(logits, batch["labels"], batch.get("token_weights"))  # spans weigh tokens here too
    ref = None
    if fwd.needs_ref:
        ref = torch.cat(batch_reference_logps(batch, cache, fwd.reference.model, fwd.model, fwd.acc.autocast))
    kw: dict[str, torch.Tensor] = {}
    if loss_fn.needs_kl:
        kl_batch = {k[3:]: v for k, v in batch.items() if k.startswith("kl_")}
        with torch.no_grad(), fwd.acc.autocast():  # TRL: the policy's mismatched log-probs carry no gradient
            kl_logits = module(kl_batch["input_ids"], kl_batch["attention_mask"])
        kw["kl_logps"] = sequence_logps(kl_logits, kl_batch["labels"])
        ref_kl = batch_reference_logps(kl_batch, None, fwd.reference.model, fwd.model, fwd.acc.autocast)
        kw["ref_kl_logps"] = torch.cat(ref_kl)
    if "label" in batch:
        return loss_fn.unpaired(lp, ref, batch["label"], **kw), None, None, None, None
    n = lp.shape[0] // 2
    c, r = lp[:n], lp[n:]
    rc, rr = (ref[:n], ref[n:]) if ref is not None else (None, None)
    per = loss_fn(c, r, rc, rr, *answer_lengths(batch), **kw)
    return per, c, r, rc, rr
