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
from torch.autograd.function import once_differentiable

from dpalogic.runtime.checks import check_log_probs
from dpalogic.runtime.lifted_eval import (
    LOG_FLOOR,
    MATMUL_CONFIGS,
    _clamp_bound,
    _LeafPlan,
    _odds_shift,
    live_rows,
    odds_range,
    reciprocal_expm1_,
    row_max,
    shifted_odds,
)


def fusable(plan: _LeafPlan) -> bool:
    """Every group an odds group (counts 0 and 1 only), and few configurations (summed column by column)."""
    return all(set(cs) <= {0, 1} for cs in plan.counts) and len(plan.sides[0]) + len(plan.sides[1]) <= 2 * (
        MATMUL_CONFIGS
    )


def _expm1_series(x: torch.Tensor) -> torch.Tensor:
    """``e^x − 1`` without ``expm1``, which ``torch.compile`` lowers on the CPU as ``e^x − 1`` (every digit lost near
    0: 0 at x = −1e−19, 0.1% off at −1e−5): its Taylor series in Horner form for |x| < 0.1 (to 1e−16 relative),
    ``e^x − 1`` beyond, where it cancels at most three bits — as the Triton kernels' ``log1mexp``."""
    h = 1.0 + x / 12
    for k in range(11, 1, -1):
        h = 1.0 + x / k * h
    return torch.where(x.abs() < 0.1, x * h, torch.exp(x) - 1.0)


def _lse(values: list[torch.Tensor]) -> tuple[torch.Tensor, list[torch.Tensor] | None]:
    """log Σ e^v over a side's configurations and their softmax weights (None: one configuration, weight 1)."""
    if len(values) == 1:
        return values[0], None
    v = torch.stack(values, 1)
    total = torch.logsumexp(v, 1)
    w = (v - total.unsqueeze(1)).exp()
    return total, list(w.unbind(1))


def _total(values: list[torch.Tensor], like: torch.Tensor) -> torch.Tensor:
    """Σ values (zeros like ``like`` for none): no zero tensor to start from, whose adds cost a step each."""
    if not values:
        return torch.zeros_like(like)
    out = values[0]
    for v in values[1:]:
        out = out + v
    return out


def _wiring(plan: _LeafPlan) -> tuple[list[list[int]], list[list[int]], list[list[int]]]:
    """Which configurations (✓'s, then ✗'s) take each group's e_1, each singleton true, each singleton false: worked
    out once per plan, so a call only adds up the shares it names."""
    key = ("wiring",)
    if key not in plan._index:
        configs = [*plan.sides[0], *plan.sides[1]]
        n_single = len(plan.singles)
        plan._index[key] = (
            [[j for j, (_, c) in enumerate(configs) if c[g] == 1] for g in range(len(plan.groups))],
            [[j for j, (sig, _) in enumerate(configs) if sig[k]] for k in range(n_single)],
            [[j for j, (sig, _) in enumerate(configs) if not sig[k]] for k in range(n_single)],
        )
    return plan._index[key]


def _linked(log_rho: torch.Tensor, link_fn, scale: float, shift: float, margin: torch.Tensor | None):
    """The link and its derivative at ``z = scale · log ρ − shift − margin`` (steps by 1 and 0 skipped)."""
    z = log_rho * scale if scale != 1.0 else log_rho
    if shift != 0.0:
        z = z - shift
    if margin is not None:
        z = z - margin
    return link_fn(z)


def term_loss_and_grad(
    x: torch.Tensor,
    plan: _LeafPlan,
    link_fn,
    scale: float,
    shift: float,
    coef: float,
    margin: torch.Tensor | None,
    grad_weight: float | torch.Tensor = 1.0,
    traced: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(coef · f(scale · log ρ − shift − margin), its gradient in x · grad_weight)``, per row: ``[B]``, ``[B, n]``.

    ``margin`` is already signed (a smoothing term's is negated by the caller); ``grad_weight``: a mean's 1/B, folded
    into the per-row factor instead of a pass over the gradient. ``traced``: for ``torch.compile``, which fuses the
    passes itself: no in-place steps and no host-side branch. The first group's odds are computed in the gradient's
    own buffer (:func:`shifted_odds`), which then becomes its gradient in place: one new ``[B, n]`` tensor.
    """
    eps = _clamp_bound(x.dtype)
    expm1 = _expm1_series if traced else torch.expm1
    grad = None if traced else torch.empty_like(x, memory_format=torch.contiguous_format)
    s_idx = plan._idx(plan.singles, x.device)
    lp_s = plan.take(x, plan.singles).clamp(min=LOG_FLOOR, max=-eps)  # the singletons' log p: [B, S], small
    q_s = expm1(lp_s).neg()  # their 1 − p, and log(1 − p)
    lq_s = q_s.log()
    clamped = traced or x.is_cuda or bool((lp_s >= -eps).any())  # p = 1 reached: those gradients are 0
    e1, odds = [], []
    for g in range(len(plan.groups)):
        # full rows: the first group's odds are computed in the gradient's own buffer, later groups' in their own
        out = None if traced else (grad if g == 0 else torch.empty_like(grad))
        a, total, s, at_clamp = shifted_odds(x, plan.outside(g, x), expm1, out, traced or None)
        clamped = clamped or at_clamp
        e1.append((total.log() + s).squeeze(1))
        odds.append((a, total / live_rows(s)))  # a group all at −inf: no gradient (÷ ∞)
    sides = []
    for configs in plan.sides:
        values = []
        for sigma, counts in configs:
            terms = [lp_s[:, k] if bit else lq_s[:, k] for k, bit in enumerate(sigma)]
            terms += [e1[g] for g, c in enumerate(counts) if c == 1]
            values.append(_total(terms, x[:, 0]))  # a configuration of no leaves: log 1 = 0
        sides.append(_lse(values))
    (top, w_top), (bottom, w_bottom) = sides
    f, df = _linked(top - bottom, link_fn, scale, shift, margin)
    weight = coef * scale * grad_weight
    a_z = df * weight if traced or weight != 1.0 else df  # d loss / d log ρ
    # each configuration's share of it: ✓'s softmax · a_z, ✗'s softmax · (−a_z)
    shares = [(a_z if w_top is None else w * a_z) for w in (w_top or [None])]
    shares += [(-a_z if w_bottom is None else w * -a_z) for w in (w_bottom or [None])]
    takes_e1, takes_p, takes_q = _wiring(plan)
    for g, (a, total) in enumerate(odds):
        factor = (_total([shares[j] for j in takes_e1[g]], a_z) / total.squeeze(1)).unsqueeze(1)
        if traced:  # d log e_1 / dx_j = a_j (1 + a_j) / Σ a (0 off the group's columns, where a = 0)
            part = (a + a * a) * factor
            grad = part if grad is None else grad + part
        else:
            a.addcmul_(a, a).mul_(factor)
            if g:
                grad.add_(a)
    if traced and grad is None:
        grad = torch.zeros_like(x)
    elif not plan.groups and grad is not None:
        grad.zero_()
    if len(s_idx):
        d_lp = _columns([_total([shares[j] for j in js], a_z) for js in takes_p])
        d_lq = _columns([_total([shares[j] for j in js], a_z) for js in takes_q])
        # d log p / dx = 1; d log(1 − p) / dx = −p / (1 − p) = 1 − 1 / (1 − p)
        single = (d_lp + d_lq - d_lq / q_s) * (plan.take(x, plan.singles) >= LOG_FLOOR)  # 0 where floored (−inf)
        if traced:
            grad = grad.index_copy(1, s_idx, single)
        else:
            plan.put(grad, plan.singles, single)
    # 0 where the clamp holds x (p = 1), as the general evaluator; on the CPU only when some x reached the clamp (a
    # comparison and a bool mask over [B, K] cost more than the rest of the backward), on a GPU always (no host sync)
    if clamped:
        grad = torch.where(x <= -eps, grad, 0.0) if traced else grad.masked_fill_(x > -eps, 0.0)
    return (f * coef if coef != 1.0 else f), grad


def _columns(values: list[torch.Tensor]) -> torch.Tensor:
    """[B] tensors as the columns of a [B, S] one (one column: a view, no copy)."""
    return values[0].unsqueeze(1) if len(values) == 1 else torch.stack(values, 1)


def one_against_the_rest(plan: _LeafPlan) -> int | None:
    """The column ``t`` when ``ρ = o_t / e_1(the other answers)``: one singleton, one group of every other column, ✓ =
    {t valid, none of the group}, ✗ = {t invalid, exactly one of the group} — top-1 ExactlyOne conditioning, each
    stage of Plackett–Luce; ``−log σ(log ρ)`` is a softmax cross-entropy over the answers' log-odds. None otherwise."""
    one = len(plan.singles) == 1 and len(plan.groups) == 1 and plan.width == 1 + len(plan.groups[0])
    if one and plan.sides == ((((1,), (0,)),), (((0,), (1,)),)):
        return plan.singles[0]
    return None


def _underflow_floor(dtype: torch.dtype) -> float:
    """Below this the rest's summed odds may have lost digits to a shift taken from the whole row (see below)."""
    return 1e-280 if dtype == torch.float64 else 1e-25  # ≫ K times odds_range's smallest odds (1.6e−38, 1e−304)


def odds_softmax_loss_and_grad(
    x: torch.Tensor,
    t: int,
    link_fn,
    scale: float,
    shift: float,
    coef: float,
    margin: torch.Tensor | None,
    grad_weight: float = 1.0,
    check: tuple[type, str] | None = None,
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """:func:`term_loss_and_grad` for :func:`one_against_the_rest` structures, in fewer passes (the loss of issue #12's
    speed target): ``log ρ = log o_t − log Σ_{j≠t} o_j``.

    The row's shift is taken from its max over every column, a contiguous reduction (over the rest's columns alone
    it is a strided one, several times slower on the CPU), so the odds of the rest are computed in one buffer with
    no mask. That shift is exact for the rest unless answer t beats all of them by more than ~60 nats (float32):
    then their summed odds fall below :func:`_underflow_floor`, and None sends the call to the general pass, whose
    shift is the rest's own. Everything else is :func:`shifted_odds`' arithmetic (a test holds them equal). On the CPU
    only: it asks the host twice (a clamp needed, the floor), and a GPU reduces strided columns at full speed.
    ``check`` (error, name): refuse positive log-probs as :func:`~dpalogic.runtime.checks.check_log_probs` does, from
    the row maxima taken here anyway (the caller skipped its own pass over the matrix).
    """
    if not x.numel():  # an empty batch: the general pass
        return None
    eps = _clamp_bound(x.dtype)
    m = row_max(x)
    worst = float(m.max())
    if check is not None and not worst <= 0.0:  # a positive value, or a NaN that may hide one: the full check
        check_log_probs([x], [check[1]], check[0])
    s = (m + _odds_shift(x.dtype)).clamp_(LOG_FLOOR, 0.0)
    a = torch.sub(s, x)  # −log p of the shifted answers: becomes the gradient, in place
    clamped = not worst <= -eps  # p = 1 reached (or a NaN row: the other rows keep their mask): gradients 0 there
    a = reciprocal_expm1_(a.clamp_(*odds_range(x.dtype)), m, worst)
    a.select(1, t).zero_()
    total = a.sum(1)
    if bool((total < _underflow_floor(x.dtype)).any()):  # also a row all at −inf; a NaN row compares false
        return None
    lt = x.select(1, t).clamp(min=LOG_FLOOR, max=-eps)
    em1 = torch.expm1(lt)  # −(1 − p_t)
    # log ρ = (x_t − s) − log((1 − p_t) Σ a); x_t − s first: exact, where x_t and s are both near −1e4
    log_rho = lt.sub_(s.squeeze(1)).sub_(torch.mul(em1, total).neg_().log_())
    f, df = _linked(log_rho, link_fn, scale, shift, margin)
    neg = df * (-coef * scale * grad_weight)  # −d loss / d log ρ
    # the rest: −d loss / d log ρ · a_j (1 + a_j) / Σ a; answer t: d loss / d log ρ / (1 − p_t)
    a.addcmul_(a, a).mul_((neg / total).unsqueeze(1))
    a.select(1, t).copy_((neg / em1).masked_fill_(x.select(1, t) < LOG_FLOOR, 0.0))  # 0 where floored (−inf)
    if clamped:
        a.masked_fill_(x > -eps, 0.0)
    return (f * coef if coef != 1.0 else f), a


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


def _loss_and_grad(args: tuple, compiled: Compiled | None, check=None) -> tuple[torch.Tensor, torch.Tensor]:
    """The term's loss and gradient by the fastest pass that applies: one against the rest (on the CPU, where it beats
    the compiled general pass too), compiled, general."""
    x, plan = args[:2]
    key = ("one against the rest",)
    if key not in plan._index:
        plan._index[key] = one_against_the_rest(plan)
    t = plan._index[key]
    if t is not None and not x.is_cuda:
        out = odds_softmax_loss_and_grad(x, t, *args[2:], check)
        if out is not None:
            return out
    elif check is not None:
        check_log_probs([x], [check[1]], check[0])
    return compiled(*args) if compiled is not None else term_loss_and_grad(*args)


def _scaled(grad: torch.Tensor, grad_loss: torch.Tensor, reduced: bool) -> torch.Tensor:
    """A saved gradient times backward's ``grad_output``, in place: per row, or one scalar — skipped when it is 1 on
    the CPU (``loss.backward()``); on a GPU, reading it back would be a host sync."""
    if not reduced:
        return grad.mul_(grad_loss.unsqueeze(1))
    if grad_loss.is_cuda or float(grad_loss) != 1.0:
        return grad.mul_(grad_loss)
    return grad


def suffix_stages_loss_and_grad(x: torch.Tensor, ks: torch.Tensor, *term) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Several one-against-the-rest stages over one run of columns ``x`` [B, n], stage ``k`` (for ``k`` in ``ks``)
    conditioning column ``k`` on every column after it — Plackett–Luce's stages — at once: ``(Σ_k coef · f(z_k)``
    per row, its gradient in ``x``), or None where one shift per row cannot serve every stage. ``term``: ``link_fn,
    scale, shift, coef, margin, grad_weight``, shared by the stages, as :func:`odds_softmax_loss_and_grad` takes them.

    All stages' ``log Σ_{j>k} o_j`` come from one reverse cumulative sum of the odds, shifted by the row's largest
    log-odds: in the input's dtype while every stage's rest sum stays above 1e−25 (float32: rests within ~57 nats of
    the row's best), else in float64 (~660 nats); beyond, None sends the stages to their one-by-one pass, whose shift
    is each stage's own. The gradient is one more cumulative sum: ``∂ log ρ_k / ∂ lo_j = −o_j / Σ_{i>k} o_i`` for
    ``j > k``, summed over the stages before ``j``. Clamps as every other pass (``log p`` in ``[LOG_FLOOR, −√tiny]``
    of the input's dtype, zero gradient where they hold)."""
    for dtype, floor in ((x.dtype, _underflow_floor(x.dtype)), (torch.float64, 1e-290)):
        out = _suffix_stages(x, ks, *term, dtype, floor)
        if out is not None or dtype == torch.float64:
            return out
    return None


def _suffix_stages(x, ks, link_fn, scale, shift, coef, margin, grad_weight, dtype, floor):
    eps = _clamp_bound(x.dtype)
    n = x.shape[1]
    xc = x.to(dtype, copy=True).clamp_(LOG_FLOOR, -eps)
    q = torch.expm1(xc).neg_()  # 1 − p
    lo = q.log().neg_().add_(xc)  # log-odds
    del xc
    lo_k = lo.index_select(1, ks)
    top = row_max(lo)
    o = lo.sub_(top).exp_()  # odds / the row's largest, in lo's buffer
    tail = o.flip(1).cumsum_(1)  # column c: Σ over the last c + 1 columns, so Σ_{j>k} o_j is column n − 2 − k
    rest = tail.index_select(1, (n - 2) - ks)
    del tail
    if bool((rest < floor).any()):
        return None
    log_rho = lo_k.sub_(top).sub_(rest.log())  # lo_k − top first: exact where both are near −1e4
    f, df = _linked(log_rho, link_fn, scale, shift, None if margin is None else margin.to(dtype).unsqueeze(1))
    d = df * (coef * scale * grad_weight)  # d loss / d log ρ_k
    reach = torch.zeros_like(o).index_add_(1, ks + 1, d / rest).cumsum_(1)  # Σ_{stages before j} d / rest (a stage
    # may come twice: a program that adds top-1 to Plackett–Luce)
    grad = reach.mul_(o).neg_().index_add_(1, ks, d).div_(q)  # d log ρ / d lo, then ÷ (1 − p): d lo / dx
    grad.masked_fill_((x > -eps) | (x < LOG_FLOOR), 0.0)  # 0 where a clamp holds x
    return (f.sum(1) * coef).to(x.dtype), grad.to(x.dtype)


class FusedTerms(torch.autograd.Function):
    """Several fused terms over column runs of one ``[B, K]`` matrix (Plackett–Luce has K − 1) as one node: each term's
    gradient is added into one ``[B, K]`` buffer at its columns. A node per term would have each backward fill a zero
    ``[B, K]`` gradient around its slice, a fresh buffer each (~0.3 ms of page faults apiece on the CPU at 4096 × 64).

    ``terms``: ``(columns, plan, link_fn, scale, shift, coef, margin_sign, compiled)`` per term, ``columns`` a slice;
    ``margin_sign``: +1 (a preference: ``z − m``), −1 (smoothing: ``z + m``) or 0 (NLL: no margin). ``stages``: groups
    of term indices that :func:`suffix_stages_loss_and_grad` can take at once, with their run and stage columns.

    One term over all of ``m`` is the usual single fused term: its gradient is the buffer itself, and ``check``
    (error, name) hands it PreferenceLoss's value check (see :func:`odds_softmax_loss_and_grad`). Forward computes
    the loss — per row, or already summed ('sum') or averaged ('mean', whose 1/B rides on the gradient's per-row
    factor) — and the gradient; backward scales the gradient in place (:func:`_scaled`), so a second backward
    (``retain_graph``) recomputes it from the inputs, saved for backward so that one changed in place in between is
    an error, not a silently different gradient."""

    @staticmethod
    def forward(
        ctx, m: torch.Tensor, margin: torch.Tensor | None, terms: list, reduction: str = "none", stages: list = (),
        check=None,
    ) -> torch.Tensor:  # fmt: skip
        weight = 1.0 / len(m) if reduction == "mean" and len(m) else 1.0
        ctx.save_for_backward(m, margin)
        ctx.terms, ctx.stages, ctx.weight, ctx.reduced = terms, stages, weight, reduction != "none"
        loss, ctx.grad = FusedTerms._run(m, margin, terms, weight, stages, check)
        if reduction == "none":
            return loss
        return loss.mean() if reduction == "mean" else loss.sum()

    @staticmethod
    def _run(m: torch.Tensor, margin, terms, weight: float, stages=(), check=None) -> tuple[torch.Tensor, torch.Tensor]:
        if len(terms) == 1 and terms[0][0] == slice(None):  # one term over all of m: its gradient is the buffer
            _, plan, link_fn, scale, shift, coef, sign, compiled = terms[0]
            signed = None if margin is None or sign == 0 else (margin if sign > 0 else -margin)
            if compiled is not None:  # a tensor, so that torch.compile does not specialize on each batch size
                weight = torch.tensor(weight, dtype=m.dtype, device=m.device)
            return _loss_and_grad((m, plan, link_fn, scale, shift, coef, signed, weight), compiled, check)
        grad = torch.zeros_like(m, memory_format=torch.contiguous_format)
        total, done = None, set()
        for members, cols, ks in stages if len(m) and not m.is_cuda else ():  # the GPU: no host sync asked
            _, _, link_fn, scale, shift, coef, sign, _ = terms[members[0]]
            signed = None if margin is None or sign == 0 else (margin if sign > 0 else -margin)
            out = suffix_stages_loss_and_grad(m[:, cols], ks, link_fn, scale, shift, coef, signed, weight)
            if out is not None:
                grad[:, cols] += out[1]
                total = out[0] if total is None else total + out[0]
                done.update(members)
        for i, (cols, plan, link_fn, scale, shift, coef, sign, compiled) in enumerate(terms):
            if i in done:
                continue
            signed = None if margin is None or sign == 0 else (margin if sign > 0 else -margin)
            w = weight if compiled is None else torch.tensor(weight, dtype=m.dtype, device=m.device)
            loss, g = _loss_and_grad((m[:, cols], plan, link_fn, scale, shift, coef, signed, w), compiled)
            grad[:, cols] += g
            total = loss if total is None else total + loss
        return total, grad

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_loss: torch.Tensor):
        grad, ctx.grad = ctx.grad, None
        if grad is None:  # a second backward: the first one scaled the buffer
            m, margin = ctx.saved_tensors
            grad = FusedTerms._run(m, margin, ctx.terms, ctx.weight, ctx.stages)[1]
        return _scaled(grad, grad_loss, ctx.reduced), None, None, None, None, None
