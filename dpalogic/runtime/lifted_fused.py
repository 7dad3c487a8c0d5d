"""A whole K-answer term — ``log ρ`` from the lifted form, ``z``, the link — with its gradient in the same pass.

For the structures whose groups need only ``e_0`` and ``e_1`` (ExactlyOne, AtMost(1), top-1 and top-k-style
conditioning: the odds path of :mod:`dpalogic.runtime.lifted_eval`) and a handful of configurations, the term's loss
and ``d loss / d x`` are one straight-line computation, as the pair modules' twin computes loss and gradients
together (:mod:`dpalogic.compile.module`). Backward then only scales the saved gradient by ``grad_output``: no
autograd graph over the leaves, the configurations and the link, whose small steps cost more than their arithmetic.

The values are those of the general evaluator (a test holds them to it): ``1 − p = −expm1(x)`` accurate near p = 1,
x clamped to ``[LOG_FLOOR, −√tiny]`` (p = 1 finite, −inf floored), the group's odds as a max-shifted sum, and a zero
gradient where the clamp holds x.
"""

from __future__ import annotations

import functools
import warnings

import torch

from dpalogic.runtime.lifted_eval import LOG_FLOOR, MATMUL_CONFIGS, _clamp_bound, _LeafPlan


def fusable(plan: _LeafPlan) -> bool:
    """Every group an odds group (counts 0 and 1 only), and few configurations (summed column by column)."""
    return all(set(cs) <= {0, 1} for cs in plan.counts) and len(plan.sides[0]) + len(plan.sides[1]) <= 2 * (
        MATMUL_CONFIGS
    )


def _expm1_series(x: torch.Tensor) -> torch.Tensor:
    """``e^x − 1`` for ``x ≤ 0`` without ``expm1``, which ``torch.compile`` lowers on the CPU as ``e^x − 1`` (every
    digit lost near 0: 0 at x = −1e−19, 0.1% off at −1e−5): its Taylor series in Horner form for x > −0.1 (to
    1e−16 relative), ``e^x − 1`` directly below, where it cancels nothing — as the Triton kernels' ``log1mexp``."""
    h = 1.0 + x / 12
    for k in range(11, 1, -1):
        h = 1.0 + x / k * h
    return torch.where(x > -0.1, x * h, torch.exp(x) - 1.0)


def _lse(values: list[torch.Tensor]) -> tuple[torch.Tensor, list[torch.Tensor] | None]:
    """log Σ e^v over a side's configurations and their softmax weights (None: one configuration, weight 1)."""
    if len(values) == 1:
        return values[0], None
    v = torch.stack(values, 1)
    total = torch.logsumexp(v, 1)
    w = (v - total.unsqueeze(1)).exp()
    return total, list(w.unbind(1))


def term_loss_and_grad(
    x: torch.Tensor,
    plan: _LeafPlan,
    link_fn,
    scale: float,
    shift: float,
    coef: float,
    margin: torch.Tensor | None,
    traced: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(coef · f(scale · log ρ − shift − margin), its gradient in x)``, per row: ``[B]`` and ``[B, n]``.

    ``margin`` is already signed (a smoothing term's is negated by the caller). ``traced``: for ``torch.compile``,
    which fuses the passes itself: no reused buffers and no host-side branch.
    """
    eps = _clamp_bound(x.dtype)
    if traced:
        xc = torch.clamp(x, min=LOG_FLOOR, max=-eps)
        em1 = _expm1_series(xc)
    else:  # both only for this pass: buffers reused from call to call (a fresh [B, K] one page-faults on the CPU)
        xc = torch.clamp(x, min=LOG_FLOOR, max=-eps, out=plan.scratch(x, 0))
        em1 = torch.expm1(xc, out=plan.scratch(x, 1))  # p − 1 = −(1 − p), accurate near p = 1
    s_idx = plan._idx(plan.singles, x.device)
    q_s = em1.index_select(1, s_idx).neg_()  # 1 − p of the singletons [B, S]
    lp_s, lq_s = xc.index_select(1, s_idx), q_s.log()
    # each odds group: Σ o / e^m as a max-shifted sum over full rows (the other columns at −inf), and w / (1 − p)
    # normalized, which is d log e_1 / dx on the group's columns and 0 elsewhere
    e1, dgroup, highest = [], [], [lp_s]
    for g in range(len(plan.groups)):
        w = xc + plan.outside(g, x)
        m = w.amax(1, keepdim=True)
        highest.append(m)
        w = (w - m).exp_().div_(em1)  # −odds / e^m
        total = w.sum(1, keepdim=True)  # −Σ odds / e^m
        e1.append((m + total.neg().log()).squeeze(1))
        dgroup.append(w.div_(em1).div_(total.neg_()))  # (odds / (1 − p)) / Σ odds
    sides = []
    for configs in plan.sides:
        values = []
        for sigma, counts in configs:
            terms = [lp_s[:, k] if bit else lq_s[:, k] for k, bit in enumerate(sigma)]
            terms += [e1[g] for g, c in enumerate(counts) if c == 1]
            v = terms[0] if terms else x.new_zeros(len(x))
            for t in terms[1:]:
                v = v + t
            values.append(v)
        sides.append(_lse(values))
    (top, w_top), (bottom, w_bottom) = sides
    z = (top - bottom) * scale - shift
    if margin is not None:
        z = z - margin
    f, df = link_fn(z)
    a = df * (coef * scale)  # d loss / d log ρ
    # each configuration's share of it: ✓'s softmax · a, ✗'s softmax · (−a)
    shares = [(a if w_top is None else w * a) for w in (w_top or [None])]
    shares += [(-a if w_bottom is None else w * -a) for w in (w_bottom or [None])]
    configs = [*plan.sides[0], *plan.sides[1]]
    grad = None
    for g in range(len(plan.groups)):
        d_e1 = sum((s for s, (_, counts) in zip(shares, configs) if counts[g] == 1), torch.zeros_like(a))
        part = dgroup[g].mul_(d_e1.unsqueeze(1))
        grad = part if grad is None else grad.add_(part)
    if grad is None:
        grad = torch.zeros_like(xc)
    d_lp = [sum((s for s, (sig, _) in zip(shares, configs) if sig[k]), torch.zeros_like(a)) for k in range(len(s_idx))]
    d_lq = [
        sum((s for s, (sig, _) in zip(shares, configs) if not sig[k]), torch.zeros_like(a)) for k in range(len(s_idx))
    ]
    if len(s_idx):
        # d log p / dx = 1; d log(1 − p) / dx = −p / (1 − p) = 1 − 1 / (1 − p)
        single = torch.stack(d_lp, 1) + torch.stack(d_lq, 1) * (1.0 - 1.0 / q_s)
        grad.index_copy_(1, s_idx, single)
    # 0 where the clamp holds x (p = 1), as the general evaluator; on the CPU only when some x reached the clamp (a
    # comparison and a bool mask over [B, K] cost more than the rest of the backward), on a GPU always (no host sync)
    if traced or x.is_cuda or any(bool((h >= -eps).any()) for h in highest):
        grad = torch.where(x <= -eps, grad, 0.0)
    return f * coef, grad


MAX_COMPILED_TERMS = 2  # torch.compile keeps a few specializations per function (8): one for each term's plan


class Compiled:
    """``term_loss_and_grad`` under ``torch.compile`` (opt-in: ``PreferenceLoss(spec, compile=True)``), compiled on
    the second call (the first, eager, fills the plan's index caches, so the compiled graph is not specialized on a
    cache about to change); where compiling fails (no C++ compiler on the machine, say) the eager pass runs, with one
    warning for the whole process."""

    failed = False  # once compiling fails, no term tries again (each would take seconds to fail)

    def __init__(self) -> None:
        self.fn = None
        self.calls = 0

    def __call__(self, *args):
        self.calls += 1
        if not Compiled.failed and self.calls > 1:
            try:
                if self.fn is None:
                    self.fn = torch.compile(functools.partial(term_loss_and_grad, traced=True), dynamic=True)
                return self.fn(*args)
            except torch.OutOfMemoryError:
                raise
            except Exception as e:  # noqa: BLE001 - any compiler failure falls back to the same pass, eager
                Compiled.failed = True
                warnings.warn(
                    f"torch.compile failed ({type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''}); "
                    "the K-answer loss runs eagerly",
                    RuntimeWarning,
                    stacklevel=3,
                )
        return term_loss_and_grad(*args)


class FusedTerm(torch.autograd.Function):
    """Forward computes the term's loss and its gradient; backward scales the gradient by ``grad_output``."""

    @staticmethod
    def forward(
        ctx, x: torch.Tensor, margin: torch.Tensor | None, plan, link_fn, scale, shift, coef, compiled=None
    ) -> torch.Tensor:
        args = (x, plan, link_fn, scale, shift, coef, margin)
        loss, grad = compiled(*args) if compiled is not None else term_loss_and_grad(*args)
        ctx.save_for_backward(grad)
        return loss

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor):
        (grad,) = ctx.saved_tensors
        return grad * grad_loss.unsqueeze(1), None, None, None, None, None, None, None
