"""Models for training: the offline ``tiny`` model and tokenizer, local checkpoints, log-probs, the reference.

Nothing here downloads anything: ``tiny`` is built from a config with a character-level tokenizer made with the
``tokenizers`` library, and ``--model PATH`` must be a local folder (``local_files_only=True``).
"""

from __future__ import annotations

import hashlib
import string
from collections.abc import Sequence
from pathlib import Path

import torch

from dpalogic.errors import DPALogicError
from dpalogic.training.data import IGNORE_INDEX, Example, collate

SPECIAL_TOKENS = ("<pad>", "<s>", "</s>", "<unk>", "<|system|>", "<|user|>", "<|assistant|>")
# Jinja chat template of the tiny tokenizer: one special token per role, each turn closed by </s>
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}</s>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def build_char_tokenizer():
    """A character-level ``PreTrainedTokenizerFast`` over printable ASCII, with BOS and a simple chat template."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    chars = [c for c in string.printable if c not in "\r\x0b\x0c"]
    vocab = {t: i for i, t in enumerate(list(SPECIAL_TOKENS) + chars)}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Split(Regex("[\\s\\S]"), behavior="isolated")  # every character a token
    tk.decoder = decoders.Fuse()  # join characters back without spaces
    tk.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", vocab["<s>"])])
    tok = PreTrainedTokenizerFast(
        tokenizer_object=tk,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        additional_special_tokens=list(SPECIAL_TOKENS[4:]),
    )
    tok.chat_template = CHAT_TEMPLATE
    return tok


def tiny_config(tokenizer, *, hidden: int = 64, layers: int = 2, heads: int = 4, dropout: float = 0.0):
    """The ``LlamaConfig`` of the tiny model (the memory plan reads it without building the model)."""
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=4 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        max_position_embeddings=1024,
        attention_dropout=dropout,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def build_tiny_model(tokenizer, *, hidden: int = 64, layers: int = 2, heads: int = 4, dropout: float = 0.0,
                     seed: int = 0):  # fmt: skip
    """A small Llama (≈0.1M parameters at the defaults) initialized deterministically from ``seed``."""
    from transformers import LlamaForCausalLM

    cfg = tiny_config(tokenizer, hidden=hidden, layers=layers, heads=heads, dropout=dropout)
    cpu_state = torch.random.get_rng_state()
    torch.manual_seed(seed)  # the initial weights depend on the seed only, not on what ran before
    try:
        model = LlamaForCausalLM(cfg)
    finally:
        torch.random.set_rng_state(cpu_state)
    return model


def load_model_and_tokenizer(spec: str, *, seed: int = 0, dropout: float = 0.0, dtype: torch.dtype | None = None):
    """``tiny`` (built locally) or a local folder holding a transformers causal LM and its tokenizer."""
    if spec == "tiny":
        tok = build_char_tokenizer()
        return build_tiny_model(tok, seed=seed, dropout=dropout), tok
    path = Path(spec)
    if not path.is_dir():
        raise DPALogicError(
            f"no model folder at {spec!r}: pass a local transformers checkpoint or 'tiny' (nothing is downloaded)"
        )
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    except Exception as e:  # transformers raises OSError/ValueError/... for a folder without a tokenizer
        raise DPALogicError(f"{spec}: no usable tokenizer in the folder ({e})") from None
    try:
        model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True, dtype=dtype)
    except Exception as e:
        raise DPALogicError(f"{spec}: not a loadable causal language model ({e})") from None
    if tok.pad_token is None and tok.eos_token is not None:
        tok.pad_token = tok.eos_token  # padding is masked out; any id works, EOS is the usual choice
    return model, tok


# --------------------------------------------------------------------------------------------------- log-probs


def sequence_logps(
    logits: torch.Tensor, labels: torch.Tensor, token_weights: torch.Tensor | None = None
) -> torch.Tensor:
    """Summed log-probabilities of the labelled (answer) tokens of every sequence, ``[N]``, in float32.

    ``logits[:, t]`` predicts ``labels[:, t + 1]``; positions labelled ``-100`` (prompt, padding) contribute 0.
    ``token_weights`` (aligned with ``labels``, from answer spans) make the sum ``Σ_t w_t log π(y_t)``.
    """
    if token_weights is not None:
        from dpalogic.runtime.token_weights import weighted_sequence_logps

        return weighted_sequence_logps(logits[:, :-1].float(), labels[:, 1:], token_weights[:, 1:].float())[0]
    logits = logits[:, :-1].float()
    target = labels[:, 1:]
    mask = target != IGNORE_INDEX
    safe = target.masked_fill(~mask, 0)
    token_lp = torch.gather(logits.log_softmax(-1), 2, safe.unsqueeze(-1)).squeeze(-1)
    return (token_lp * mask).sum(-1)


def policy_logps(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """One forward pass over the stacked batch: ``[2B]`` summed answer log-probs (chosen first)."""
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
    return sequence_logps(out.logits, batch["labels"], batch.get("token_weights"))


@torch.no_grad()
def reference_logps(
    model, examples: Sequence[Example], *, batch_size: int, pad_token_id: int, device: torch.device, autocast=None
) -> torch.Tensor:
    """``[N, 2]`` (chosen, rejected) summed log-probs of every example under ``model`` in eval mode."""
    was_training = model.training
    model.eval()
    out = torch.empty(len(examples), 2)
    try:
        for s in range(0, len(examples), batch_size):
            chunk = examples[s : s + batch_size]
            batch = {k: v.to(device) for k, v in collate(chunk, pad_token_id).items()}
            with autocast() if autocast is not None else _nullcontext():
                lp = policy_logps(model, batch).float().cpu()
            out[s : s + len(chunk), 0] = lp[: len(chunk)]
            out[s : s + len(chunk), 1] = lp[len(chunk) :]
    finally:
        model.train(was_training)
    return out


class _nullcontext:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def fingerprint(model, examples: Sequence[Example]) -> str:
    """A hash of the reference weights and the tokenized data: the cache is valid only for both unchanged."""
    h = hashlib.sha256()
    with torch.no_grad():  # a per-tensor summary, not the weights: hashing a 7B model byte by byte is too slow
        for name, p in sorted(model.state_dict().items()):
            flat = p.detach().flatten()
            h.update(name.encode())
            h.update(repr((tuple(p.shape), flat.float().sum().item(), flat[:64].float().cpu().tolist())).encode())
    for ex in examples:
        h.update(repr((ex.prompt_ids, ex.chosen_ids, ex.rejected_ids)).encode())
        if ex.chosen_weights is not None or ex.rejected_weights is not None:  # span weights change the log-probs
            h.update(repr((ex.chosen_weights, ex.rejected_weights)).encode())
    return h.hexdigest()[:16]
