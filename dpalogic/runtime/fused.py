"""A preference loss fused with the LM head: from hidden states to the loss without full-vocabulary logits.

``FusedLinearPreferenceLoss(spec)`` takes the last hidden states of chosen and rejected answers (stacked on the batch
dimension, chosen first, as Liger-Kernel's fused linear preference losses do), the LM head ``weight [V, H]`` (and
bias) and the labels, and returns the program's loss. It never holds the logits of the whole batch: rows are processed
one chunk of pairs at a time, and each chunk's gradients for the hidden states, the weight and the bias are computed
in the forward pass (the backward only scales them by ``grad_output``):

1. ``logits = h @ Wᵀ + b`` for the chunk's ``2·chunk_size·T`` token rows, in one float32 buffer;
2. in place: gather the label logits, subtract the row max, exponentiate, sum → ``logsumexp``; the buffer now holds
   ``exp(logit − max)``, and the token log-probs ``logit[label] − logsumexp`` (ignored labels count 0);
3. per-sequence sums ``log π(y)`` and token counts → the per-pair loss and ``∂loss/∂log π`` from the program
   (:class:`~dpalogic.runtime.preference_loss.PreferenceLoss`, so length-normalized and reference terms follow the catalog);
4. in place: the buffer becomes ``∂loss/∂logits = c_t · (onehot(label) − softmax)`` with ``c_t = ∂loss/∂log π`` of
   the token's sequence (0 for ignored tokens); then ``∂h = G W``, ``∂W += Gᵀ h`` (float32) and ``∂b += Σ G``.

So the chunk costs one logits buffer and three matmuls (forward, ∂h, ∂W), as a fused forward+backward should.
This module walks the chunks and owns the loss (step 3); the buffer work of steps 1, 2 and 4 is
:mod:`dpalogic.runtime.fused_buffer`'s.

When one chunk's ``2·chunk_size·T`` rows exceed ``max_chunk_tokens``, the buffer holds a slice of them instead and
the chunk takes two passes: steps 1–2 slice by slice, keeping only each row's ``logsumexp`` and label log-prob; step
3; then step 4 slice by slice, recomputing each slice's logits (except the last slice's, still in the buffer) and
turning them into ``c_t · (onehot − exp(logit − logsumexp))``. The loss needs whole sequences before any gradient is
known, so this is the price of a buffer smaller than one pair: up to one more matmul per token.

Steps 2 and 4 are torch ops, or on CUDA two Triton kernels (:mod:`dpalogic.runtime.fused_kernels`: an online-max logsumexp
and the label log-probs in one pass over the vocabulary; then the in-place ``c_t · (onehot − softmax)``), chosen by
``backend`` as :class:`~dpalogic.runtime.preference_loss.PreferenceLoss` chooses its kernel. Labels are used as given: position
``t`` of ``hidden`` predicts ``labels[:, t]`` (shift them before calling, as for Liger's ``LigerFusedLinear*Loss``).
Inputs in bfloat16/float16 accumulate in float32 (on CUDA the logits and ``∂W`` matmuls write float32 directly).
"""

from __future__ import annotations

import torch

from dpalogic.errors import DPALogicError
from dpalogic.runtime import fused_buffer
from dpalogic.runtime.backend import use_triton
from dpalogic.runtime.checks import check_log_probs
from dpalogic.runtime.fused_buffer import sequence_logps as sequence_logps  # re-exported
from dpalogic.runtime.metrics import pair_rewards
from dpalogic.runtime.preference_loss import PreferenceLoss
from dpalogic.runtime.token_weights import check_float_tensor, check_token_weights

_PAIR_ATOMS = {"M(yw)", "M(yl)", "Ref(yw)", "Ref(yl)"}


def _rows(B: int, start: int, end: int, device: torch.device) -> torch.Tensor:
    """Row indices of a chunk of pairs in the stacked batch: chosen ``start:end`` then rejected ``B+start:B+end``."""
    r = torch.arange(start, end, device=device)
    return torch.cat([r, r + B])


def _pair_loss_and_grads(loss_fn, seq, c, s, e, B, lengths, ref_chosen, ref_rejected, margin=None):
    """The program's per-pair loss for pairs ``s:e`` and its gradient w.r.t. their summed log-probs ``seq``."""
    with torch.enable_grad():
        lc, lr = seq[:c].detach().requires_grad_(), seq[c:].detach().requires_grad_()
        # a margin only when there is one: losses without structure (dpalogic.runtime.unstructured) take none
        extra = {} if margin is None else {"margin": margin[s:e].to(seq.dtype)}
        per = loss_fn(
            lc,
            lr,
            None if ref_chosen is None else ref_chosen[s:e],
            None if ref_rejected is None else ref_rejected[s:e],
            chosen_lengths=lengths[s:e],
            rejected_lengths=lengths[B + s : B + e],
            **extra,
        )
        per_sum = per.sum()
        gc = gr = None
        if per_sum.requires_grad:
            gc, gr = torch.autograd.grad(per_sum, [lc, lr], allow_unused=True)
    # a loss that ignores the policy entirely (constant ratio) has no gradient
    gc = torch.zeros_like(lc) if gc is None else gc
    gr = torch.zeros_like(lr) if gr is None else gr
    return per.detach(), gc.detach(), gr.detach()


class _FusedLinearPreference(torch.autograd.Function):
    """Loss and all gradients in the forward pass, chunk by chunk; backward scales them by ``grad_output``."""

    @staticmethod
    def forward(
        ctx,
        hidden,
        weight,
        bias,
        labels,
        ref_chosen,
        ref_rejected,
        margin,
        token_weights,
        loss_fn,
        ignore_index,
        chunk,
        max_tokens,
        reduction,
        use_triton,
    ):
        N, T, H = hidden.shape
        B = N // 2
        V = weight.shape[0]
        dev = hidden.device
        need_h, need_w, need_b = ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[2]
        valid = labels != ignore_index
        safe = torch.where(valid, labels, 0)
        acc = fused_buffer.acc_dtype(hidden.dtype)
        # token weights: each token's log-prob counts w_t times, and a length-normalized term divides by Σ_t w_t
        weights = None if token_weights is None else token_weights.to(acc) * valid
        lengths = valid.sum(1) if weights is None else weights.sum(1)
        grads = fused_buffer.GradAccumulators(
            weight,
            grad_h=torch.empty_like(hidden) if need_h else None,
            grad_w=torch.zeros(V, H, dtype=acc, device=dev) if need_w else None,
            grad_b=torch.zeros(V, dtype=acc, device=dev) if need_b else None,
        )
        seq_logps = torch.empty(N, dtype=acc, device=dev)
        losses = torch.empty(B, dtype=acc, device=dev)
        rows_per_chunk = 2 * min(B, chunk) * T
        buf = torch.empty(min(rows_per_chunk, max_tokens or rows_per_chunk), V, dtype=acc, device=dev)
        scale = 1.0 / B if reduction == "mean" else 1.0
        for s in range(0, B, chunk):
            e = min(B, s + chunk)
            c = e - s
            rows_idx = _rows(B, s, e, dev)
            rows = 2 * c * T
            h = hidden.index_select(0, rows_idx).reshape(rows, H)
            lbl = safe.index_select(0, rows_idx).reshape(rows)
            raw = labels.index_select(0, rows_idx).reshape(rows)  # ignore_index kept: the kernels mask those rows
            mask = (valid if weights is None else weights).index_select(0, rows_idx).reshape(rows)
            rows_fit = rows <= buf.shape[0]
            if rows_fit:  # one pass: the buffer keeps what the gradient phase needs
                logits = fused_buffer.chunk_logits(h, weight, bias, buf[:rows])
                tok, lse, total = fused_buffer.logps_phase(logits, lbl, raw, ignore_index, use_triton)
            else:  # two passes: log-probs slice by slice now, the logits are recomputed for the gradients below
                slices = [(a, min(rows, a + buf.shape[0])) for a in range(0, rows, buf.shape[0])]
                tok, lse, total, logits = fused_buffer.sliced_logps(
                    h, weight, bias, buf, lbl, raw, slices, ignore_index, use_triton
                )
            seq = (tok * mask).view(2 * c, T).sum(1)
            seq_logps[rows_idx] = seq
            per, gc, gr = _pair_loss_and_grads(loss_fn, seq, c, s, e, B, lengths, ref_chosen, ref_rejected, margin)
            losses[s:e] = per
            if not (need_h or need_w or need_b):
                continue
            coef = (torch.cat([gc, gr]).to(acc) * scale).repeat_interleave(T) * mask  # ∂loss/∂(token log-prob)
            if rows_fit:
                fused_buffer.grad_phase(logits, lbl, raw, lse, total, coef, ignore_index, use_triton)
                gh = grads.add(logits, h)
            else:
                gh = fused_buffer.sliced_grads(
                    grads, logits, h, weight, bias, buf, lbl, raw, lse, total, coef, slices, ignore_index, use_triton
                )
            if gh is not None:
                grads.grad_h.index_copy_(0, rows_idx, gh.view(2 * c, T, H).to(grads.grad_h.dtype))
        loss = losses.sum() * scale
        ctx.save_for_backward(grads.grad_h, grads.grad_w, grads.grad_b)
        ctx.dtypes = (weight.dtype, None if bias is None else bias.dtype)
        ctx.mark_non_differentiable(seq_logps, losses)
        return loss, seq_logps, losses, lengths

    @staticmethod
    def backward(ctx, grad_loss, *_):
        grad_h, grad_w, grad_b = ctx.saved_tensors
        w_dtype, b_dtype = ctx.dtypes
        if grad_loss.item() != 1.0:  # the usual loss.backward() needs no scaling, and no second V×H buffer
            grad_h = None if grad_h is None else grad_h * grad_loss.to(grad_h.dtype)
            grad_w = None if grad_w is None else grad_w * grad_loss
            grad_b = None if grad_b is None else grad_b * grad_loss
        gw = None if grad_w is None else grad_w.to(w_dtype)
        gb = None if grad_b is None else grad_b.to(b_dtype)
        return grad_h, gw, gb, *[None] * 11


class FusedLinearPreferenceLoss(torch.nn.Module):
    """The LM head and a preference loss in one: ``(hidden, lm_head_weight, labels) → (loss, metrics)``.

    >>> fused = FusedLinearPreferenceLoss("dpo", beta=0.1)
    >>> loss, metrics = fused(hidden, lm_head.weight, labels, ref_hidden=ref_hidden)  # doctest: +SKIP

    ``hidden [2B, T, H]`` holds the chosen answers' hidden states stacked over the rejected ones' (chosen first);
    ``labels [2B, T]`` the target token of each position (already shifted; ``ignore_index`` marks prompt/padding).
    Log-probs are summed per sequence; length-normalized terms (SimPO, IPO, ORPO, the NLL terms) divide by the
    number of non-ignored labels. Programs with a reference model take either ``ref_chosen_logps``/
    ``ref_rejected_logps`` (summed, ``[B]``) or ``ref_hidden`` (with ``ref_weight``/``ref_bias``; by default the
    policy's head), from which the reference log-probs are computed chunk by chunk without gradients.

    ``chunk_size`` is the number of pairs per chunk (the logits buffer holds ``2·chunk_size·T`` rows), as in Liger.
    ``max_chunk_tokens`` caps the buffer's rows below one pair's ``2·T`` when memory is tighter than that (few pairs,
    long answers): a chunk with more token rows is done in two passes over slices of at most ``max_chunk_tokens``
    rows, the first for the log-probs (the loss needs whole sequences before any gradient is known), the second
    recomputing each slice's logits for the gradients (all but the last slice, which is still in the buffer): up to
    four matmuls per token instead of three. ``backend``
    picks, by the rule of :class:`~dpalogic.runtime.preference_loss.PreferenceLoss`, both the per-pair loss implementation and
    the vocabulary-wide work on each chunk's logits buffer: ``"auto"`` runs the Triton kernels of
    :mod:`dpalogic.runtime.fused_kernels` on CUDA tensors when triton is installed and torch ops otherwise; ``"triton"``
    always the kernels (on the CPU only under ``TRITON_INTERPRET=1``); ``"torch"`` always torch ops. The matmuls are
    torch's either way.

    ``margin [B]`` shifts each pair's link as :meth:`PreferenceLoss.per_pair` does. ``token_weights [2B, T]`` (laid
    out as ``labels``) make an atom's log-weight ``Σ_t w_t log π(y_t)`` (the reference's too, from ``ref_hidden``), and
    a length-normalized term divides by ``Σ_t w_t`` (:mod:`dpalogic.runtime.token_weights`).
    """

    def __init__(
        self,
        spec,
        *,
        ignore_index: int = -100,
        chunk_size: int = 1,
        max_chunk_tokens: int | None = None,
        reduction: str = "mean",
        backend: str = "auto",
        link: str | None = None,
        **hyperparameters: float,
    ) -> None:
        super().__init__()
        if not isinstance(chunk_size, int) or chunk_size < 1:
            raise DPALogicError(f"chunk_size must be a positive integer (pairs per chunk), got {chunk_size!r}")
        if max_chunk_tokens is not None and (
            not isinstance(max_chunk_tokens, int) or isinstance(max_chunk_tokens, bool) or max_chunk_tokens < 1
        ):
            raise DPALogicError(
                f"max_chunk_tokens must be a positive integer (token rows per logits buffer) or None, "
                f"got {max_chunk_tokens!r}"
            )
        if reduction not in ("mean", "sum"):
            raise DPALogicError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
        # log-probs computed here from the LM head are ≤ 0 by construction: only those a caller passes (the reference's)
        # are checked, once per call, not once per chunk
        self.loss_fn = PreferenceLoss(
            spec, reduction="none", backend=backend, link=link, validate=False, **hyperparameters
        )
        self.program = self.loss_fn.program
        extra = sorted(a.name for a in self.program.atoms if a.name not in _PAIR_ATOMS)
        if extra:
            raise DPALogicError(
                f"the fused LM-head loss takes chosen/rejected pairs; this program also mentions {', '.join(extra)}"
            )
        self.ignore_index = ignore_index
        self.chunk_size = chunk_size
        self.max_chunk_tokens = max_chunk_tokens
        self.reduction = reduction
        self.backend = backend  # validated by PreferenceLoss above

    @property
    def hyperparameters(self) -> dict[str, float]:
        return self.loss_fn.hyperparameters

    def extra_repr(self) -> str:
        tokens = "" if self.max_chunk_tokens is None else f", max_chunk_tokens={self.max_chunk_tokens}"
        inner = self.loss_fn.extra_repr().replace("reduction='none'", f"reduction={self.reduction!r}")
        inner = inner.replace(", validate=False", "")  # the LM head's own log-probs: checked by construction
        return f"{inner}, chunk_size={self.chunk_size}{tokens}, ignore_index={self.ignore_index}"

    def forward(
        self,
        hidden: torch.Tensor,
        lm_head_weight: torch.Tensor,
        labels: torch.Tensor,
        bias: torch.Tensor | None = None,
        ref_chosen_logps: torch.Tensor | None = None,
        ref_rejected_logps: torch.Tensor | None = None,
        ref_hidden: torch.Tensor | None = None,
        ref_weight: torch.Tensor | None = None,
        ref_bias: torch.Tensor | None = None,
        *,
        margin: torch.Tensor | None = None,
        token_weights: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        self._check(hidden, lm_head_weight, labels, bias)
        self._check_extras(hidden, margin, token_weights)
        triton_here = use_triton(self.backend, hidden)  # the one backend rule (dpalogic.runtime.backend)
        B = hidden.shape[0] // 2
        ref_c, ref_r = ref_chosen_logps, ref_rejected_logps
        if self.loss_fn.needs_reference and (ref_c is None or ref_r is None):
            if ref_hidden is None:
                raise DPALogicError(
                    f"{self.program.name or 'this loss'} uses a reference model: pass ref_chosen_logps and "
                    "ref_rejected_logps, or ref_hidden (with ref_weight/ref_bias if the reference head differs)"
                )
            if ref_hidden.shape != hidden.shape:
                raise DPALogicError(f"ref_hidden must have the shape of hidden {tuple(hidden.shape)}")
            if ref_weight is None:
                ref_weight, ref_bias = lm_head_weight, bias if ref_bias is None else ref_bias
            ref, _ = sequence_logps(
                ref_hidden.detach(),
                ref_weight.detach(),
                labels,
                None if ref_bias is None else ref_bias.detach(),
                ignore_index=self.ignore_index,
                chunk_rows=2 * self.chunk_size,
                max_chunk_tokens=self.max_chunk_tokens,
                use_triton=triton_here,
                token_weights=token_weights,
            )
            ref_c, ref_r = ref[:B], ref[B:]
        for name, t in (("ref_chosen_logps", ref_c), ("ref_rejected_logps", ref_r)):
            if t is not None and tuple(t.shape) != (B,):
                raise DPALogicError(f"{name} must have shape [B] = ({B},), got {tuple(t.shape)}")
        given = [
            (n, t) for n, t in (("ref_chosen_logps", ref_chosen_logps), ("ref_rejected_logps", ref_rejected_logps))
        ]
        given = [(n, t) for n, t in given if isinstance(t, torch.Tensor) and t.is_floating_point()]
        if given:
            check_log_probs([t for _, t in given], [n for n, _ in given], DPALogicError)
        loss, seq, losses, lengths = _FusedLinearPreference.apply(
            hidden,
            lm_head_weight,
            bias,
            labels,
            None if ref_c is None else ref_c.detach(),
            None if ref_r is None else ref_r.detach(),
            None if margin is None else margin.detach(),
            None if token_weights is None else token_weights.detach(),
            self.loss_fn,
            self.ignore_index,
            self.chunk_size,
            self.max_chunk_tokens,
            self.reduction,
            triton_here,
        )
        return loss, self._metrics(seq, lengths, losses, ref_c, ref_r)

    def _check(self, hidden, weight, labels, bias) -> None:
        if hidden.dim() != 3 or hidden.shape[0] % 2 or hidden.shape[0] == 0:
            raise DPALogicError(
                f"hidden must be [2B, T, H] with B ≥ 1 (chosen stacked over rejected), got {tuple(hidden.shape)}"
            )
        if weight.dim() != 2 or weight.shape[1] != hidden.shape[2]:
            raise DPALogicError(f"lm_head_weight must be [V, H] with H = {hidden.shape[2]}, got {tuple(weight.shape)}")
        if tuple(labels.shape) != tuple(hidden.shape[:2]):
            raise DPALogicError(f"labels must be [2B, T] = {tuple(hidden.shape[:2])}, got {tuple(labels.shape)}")
        if labels.dtype not in (torch.int64, torch.int32):
            raise DPALogicError(f"labels must be integer token ids, got {labels.dtype}")
        if bias is not None and tuple(bias.shape) != (weight.shape[0],):
            raise DPALogicError(f"bias must be [V] = ({weight.shape[0]},), got {tuple(bias.shape)}")
        if weight.dtype != hidden.dtype:
            raise DPALogicError(f"hidden ({hidden.dtype}) and lm_head_weight ({weight.dtype}) must share a dtype")
        valid = labels != self.ignore_index
        if valid.any():
            lo, hi = int(labels[valid].min()), int(labels[valid].max())
            if lo < 0 or hi >= weight.shape[0]:
                raise DPALogicError(
                    f"labels must be token ids in [0, {weight.shape[0]}) or ignore_index={self.ignore_index}; "
                    f"found {lo if lo < 0 else hi}"
                )

    def _check_extras(self, hidden, margin, token_weights) -> None:
        N, T = hidden.shape[:2]
        if margin is not None:
            check_float_tensor("margin", margin, (N // 2,), hidden.device)
        if token_weights is not None:
            check_token_weights(token_weights, (N, T), hidden.device)

    def _metrics(self, seq, lengths, losses, ref_c, ref_r) -> dict[str, torch.Tensor]:
        """Per-sequence log-probs, rewards, margins and accuracy (detached), named as TRL/Liger log them.

        The reward is :func:`~dpalogic.runtime.metrics.pair_rewards`' with the program's first term's β, per token
        when that term is length-normalized.
        """
        B = seq.shape[0] // 2
        pref = next((t for t in self.loss_fn.terms if t.coef != 0.0), None)
        beta = pref.scale if pref is not None else 1.0
        per_token = pref is not None and pref.normalized
        with_ref = ref_c is not None and ref_r is not None
        pr = pair_rewards(
            seq[:B],
            seq[B:],
            ref_c.to(seq.dtype) if with_ref else None,
            ref_r.to(seq.dtype) if with_ref else None,
            beta=beta,
            chosen_lengths=lengths[:B] if per_token else None,
            rejected_lengths=lengths[B:] if per_token else None,
        )
        out = {
            "chosen_logps": seq[:B],
            "rejected_logps": seq[B:],
            "chosen_lengths": lengths[:B],
            "rejected_lengths": lengths[B:],
            "chosen_rewards": pr["chosen_rewards"],
            "rejected_rewards": pr["rejected_rewards"],
            "margins": pr["margins"],
            "accuracy": pr["accuracy"].mean(),
            "losses": losses,
        }
        if ref_c is not None:
            out["ref_chosen_logps"], out["ref_rejected_logps"] = ref_c.detach(), ref_r.detach()
        return out
