"""The lifted evaluator of a K-answer term: ``log ρ`` from ``[B, n]`` log-probs in one autograd node.

A structure whose groups need only closed-form counts (``e_0``, ``e_1``, ``e_{n−1}``, ``e_n``: ExactlyOne, AtMost(1), …)
is evaluated from its lifted form (:mod:`dpalogic.semantics.lifted`). The leaves — each singleton's ``log p`` and
``log(1 − p)``, each group's ``log e_c`` — and the configurations that combine them into the two sides run inside one
``autograd.Function`` with a hand-written backward: the graph is one node, not the dozen small ones a composition of
torch ops would record (on ``[B]`` tensors each costs more in overhead than in arithmetic).

The leaves: the singletons' ``(log(1 − p), log p)``, then per group its ``log e_c`` for the counts asked (each of 0, 1,
n − 1, n: closed forms). A group that needs only ``e_1`` (ExactlyOne, AtMost(1)) never forms its log-odds:
``e_1 = Σ 1/expm1(−x_j)``, a row-shifted sum of reciprocals (:func:`shifted_odds`) — one ``expm1`` per answer, as a
softmax's one ``exp``. The backward writes every column of the gradient once (every atom is
a singleton or in one group) instead of scattering each slice's gradient into a zero-filled copy of ``x``.
"""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

from dpalogic.semantics.lifted import Lifted


def closed_form(lf: Lifted) -> bool:
    """Does every group need only ``e_0``, ``e_1``, ``e_{n−1}``, ``e_n`` (sums and logsumexps, no recurrence)?"""
    return all(c in (0, 1, len(g) - 1, len(g)) for g_i, g in enumerate(lf.groups) for c in lf.counts_needed(g_i))


LOG_FLOOR = -1e30  # log-probs of −inf (an answer masked out, an fp16 underflow) are floored here: no ∞ − ∞, no NaN


def _clamp_bound(dtype: torch.dtype) -> float:
    """Log-probs are clamped to ``≤ −√tiny`` here: the odds ``1/(1 − p)`` then stay below ~1e19 in float32, so a sum
    of 256 of them cannot overflow even when every answer has log-prob 0 (with ``tiny`` itself it could)."""
    return torch.finfo(dtype).tiny ** 0.5


def _odds_shift(dtype: torch.dtype) -> float:
    """How far below its best answer a group's row is shifted up (see :func:`shifted_odds`): e^−T is far below the
    dtype's rounding (2e−9 against float32's 6e−8; 4e−18 against float64's 1.1e−16)."""
    return 40.0 if dtype == torch.float64 else 20.0


NEAR_ONE = 0.05  # −log p below which 1/(1/p − 1) from exp2 loses digits to 1 − p (p > 0.95): expm1 there
_LOG2E = 1.4426950408889634


def reciprocal_expm1_(u: torch.Tensor, m: torch.Tensor, worst: float | None = None) -> torch.Tensor:
    """``u ← 1/expm1(u)`` in place (``u ≥ 0``: ``s − log p``, so this is the odds ``p'/(1 − p')``); ``m``: each row's
    best log-prob ([B, 1]), which says whether any ``p`` may be near 1; ``worst``: its max, where the caller has it.

    float32 on the CPU, where ``exp`` and ``expm1`` take five times ``exp2``: ``q = 2^(−u·log2 e)`` then
    ``1/(1/q − 1)``, which loses no digit while ``q ≤ 1/2`` and a few up to ``q = 0.95``. The error is that of rounding
    ``u·log2 e``, as if ``log p`` were off by one unit in its last place: about ``u·6e−8`` relative (1.4e−6 for answers
    within 20 nats of the row's best, 4e−6 at 87, see :func:`odds_range`). A batch holding an answer with ``p > 0.95``
    takes ``expm1`` itself (picking those rows out costs more than it saves), as do float64 and a GPU."""
    if not u.numel():
        return u
    # NaN compares false: a batch whose max is NaN takes expm1 too (its other rows keep their digits)
    if u.dtype != torch.float32 or u.is_cuda or not (float(m.max()) if worst is None else worst) <= -NEAR_ONE:
        return torch.expm1(u, out=u).reciprocal_()
    return u.mul_(-_LOG2E).exp2_().reciprocal_().sub_(1.0).reciprocal_()


def odds_range(dtype: torch.dtype) -> tuple[float, float]:
    """Where ``u = s − log p`` is clamped before its odds ``1/expm1(u)`` are taken: from ``√tiny`` (p = 1 finite, see
    :func:`_clamp_bound`) to the ``u`` whose odds are the dtype's smallest normal number (87 in float32, 700 in
    float64). Beyond, odds would be subnormal — each one costs the CPU a hundred cycles in every pass after — and
    they add less than 1e−29 (float32) of the row's sum, whose largest term is at least ``1/expm1(T)``: an answer that
    far below the row's best (a masked answer at −inf too) counts as that smallest normal, its gradient ≤ 1e−29."""
    return _clamp_bound(dtype), (700.0 if dtype == torch.float64 else 87.0)


def row_max(x: torch.Tensor) -> torch.Tensor:
    """Each row's max, [B, 1]. On the CPU, ATen reduces the last ``n mod 32`` values of a row one at a time (a
    [4096, 63] max takes ten times a [4096, 64] one): two overlapping windows of a multiple of 32 columns cover the
    row at full speed, and a short row is first folded in half (overlapping halves: an element-wise max)."""
    n = x.shape[1]
    if x.is_cuda or n % 32 == 0 or n < 8:
        return x.amax(1, keepdim=True)
    if n < 32:
        h = (n + 1) // 2
        return torch.maximum(x[:, :h], x[:, n - h :]).amax(1, keepdim=True)
    w = n - n % 32
    return torch.maximum(x[:, :w].amax(1, keepdim=True), x[:, n - w :].amax(1, keepdim=True))


def shifted_odds(
    x: torch.Tensor,
    outside: torch.Tensor,
    expm1=torch.expm1,
    out: torch.Tensor | None = None,
    clamp: bool | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, bool]:
    """A group's odds from full rows of log-probs ``x`` [B, n] with one transcendental pass: ``a = 1 / expm1(s − x)``.

    ``o = p / (1 − p) = 1 / (e^{−x} − 1)``: one ``expm1`` and a reciprocal, where ``eˣ / (1 − eˣ)`` takes an ``exp``
    and an ``expm1`` (the ``exp`` alone costs about what a whole softmax does on the CPU). ``outside`` (a [n] row, 0 on
    the group's columns, −inf elsewhere) leaves the other columns out: their ``a`` is 0. Full rows, because a reduction
    over a strided slice of columns takes a path several times slower on the CPU.

    Each row is shifted up by ``s = min(max x + T, 0)`` over the group (``T``: :func:`_odds_shift`): unshifted rows
    (best answer within T of log p = 0) give the odds themselves; a shifted row's answers all have p below e^−T,
    where the odds are ``p`` to the dtype's rounding, so ``a = o · e^{−s}`` there too, and its largest ``a`` is
    ``1/expm1(T)``, far from underflow at log-probs of −1e4. ``s − x`` is clamped to :func:`odds_range` (p = 1 finite;
    no subnormal odds); ``clamp``: whether p = 1 was reached in any row, worked out here when None.

    Returns ``(a, Σ a, s, clamp)`` with ``Σ a`` floored at ``tiny``. A group all at −inf gets ``log e_1 ≈ −1e30`` and
    a gradient spread evenly over its columns, as if its log-probs were floored at ``LOG_FLOOR``: ``log e_1 = log Σ a + s``; ``d log e_1 / dx_j = a_j (1 + a_j) / Σ a``
    (``1 + a = 1/(1 − p)``, also to rounding on shifted rows, where both are 1). ``out``: a [B, n] buffer for ``a``
    (None: out of place, as ``torch.compile`` wants).
    """
    eps, tiny = _clamp_bound(x.dtype), torch.finfo(x.dtype).tiny
    w = torch.add(x, outside, out=out)
    m = row_max(w)
    s = (m.clamp(min=LOG_FLOOR) + _odds_shift(x.dtype)).clamp_(max=0.0)
    if clamp is None:  # on a GPU asking would be a host sync per call: there the clamp always runs
        clamp = True if x.is_cuda else bool((m > -eps).any())
    lo, hi = odds_range(x.dtype)
    # u clamped to odds_range, then +inf again off the group (− outside): odds exactly 0 there
    if out is None:
        a = expm1((s - w).clamp(lo, hi) - outside).reciprocal()
    else:
        a = reciprocal_expm1_(torch.sub(s, w, out=w).clamp_(lo, hi).sub_(outside), m)
    return a, a.sum(1, keepdim=True).clamp_(min=tiny), s, clamp


def live_rows(s: torch.Tensor) -> torch.Tensor:
    """[B, 1]: 1 for the rows where a group has an answer above ``LOG_FLOOR``, 0 where all are floored (masked out at
    −inf): floored log-probs get no gradient, as a clamp's derivative says (and the generated modules, fed floored
    log-probs, give). ``s``: :func:`shifted_odds`' shift, ``LOG_FLOOR + T`` exactly in those rows; NaN stays live."""
    return (~(s <= LOG_FLOOR / 2)).to(s.dtype)


class _LeafPlan:
    """Which columns are singletons and which form each group, with their index tensors made once per device, and
    the configurations of each side as incidence matrices (which leaf values each configuration adds up)."""

    def __init__(self, singles: tuple[int, ...], groups: tuple[tuple[int, ...], ...], counts, sides=((), ())) -> None:
        self.singles, self.groups, self.counts = singles, groups, tuple(tuple(c) for c in counts)
        self.sides = sides  # per side: its configurations, (truth of each singleton, count of each group)
        self.width = len(singles) + sum(len(g) for g in groups)
        self._index: dict = {}

    def _runs(self, cols: tuple[int, ...]) -> bool:
        return bool(cols) and cols[-1] - cols[0] == len(cols) - 1

    def _idx(self, cols: tuple[int, ...], device: torch.device) -> torch.Tensor:
        key = (cols, device)
        if key not in self._index:
            self._index[key] = torch.as_tensor(cols, dtype=torch.long, device=device)
        return self._index[key]

    def outside(self, g: int, like: torch.Tensor) -> torch.Tensor:
        """A [n] row of 0 on group ``g``'s columns and −inf elsewhere (added, it masks: a broadcast add is one fast
        pass, where masked_fill with a broadcast mask is ten times slower on the CPU)."""
        key = ("outside", g, like.device, like.dtype)
        if key not in self._index:
            row = torch.full((self.width,), float("-inf"), dtype=like.dtype, device=like.device)
            row[list(self.groups[g])] = 0.0
            self._index[key] = row
        return self._index[key]

    def take(self, t: torch.Tensor, cols: tuple[int, ...]) -> torch.Tensor:
        """Columns of ``t``: a view for a run ``a, a+1, …``, a gathered copy otherwise."""
        if self._runs(cols):
            return t[:, cols[0] : cols[-1] + 1]
        return t.index_select(1, self._idx(cols, t.device))

    def put(self, t: torch.Tensor, cols: tuple[int, ...], v: torch.Tensor) -> None:
        if self._runs(cols):
            t[:, cols[0] : cols[-1] + 1] = v
        else:
            t.index_copy_(1, self._idx(cols, t.device), v)


def leaf_plan(lf: Lifted) -> _LeafPlan:
    counts = [lf.counts_needed(g) for g in range(len(lf.groups))]
    return _LeafPlan(lf.singletons, lf.groups, counts, (lf.top, lf.bottom))


def _leaves_forward(x: torch.Tensor, plan: _LeafPlan) -> tuple[torch.Tensor, list[dict], list[dict], tuple]:
    """The leaves: the singletons' ``(log(1 − p), log p)`` as [B, S, 2], and per group ``{c: log e_c}`` for the counts
    asked (None for an exact 0); with what :func:`_leaves_backward` needs."""
    eps = _clamp_bound(x.dtype)
    xc = omp = None
    if not all(set(cs) <= {0, 1} for cs in plan.counts):  # a log-odds group: 1 − p and x on full rows, kept
        xc = torch.clamp(x, min=LOG_FLOOR, max=-eps)  # for backward; p = 1 stays finite, −inf is floored
        omp = torch.expm1(xc).neg_()  # 1 − p = −(eˣ − 1), accurate near p = 1
    # the singletons' columns, gathered once (a column of [B, K] is B scattered cache lines)
    s_idx = plan._idx(plan.singles, x.device)
    xs_raw = x.index_select(1, s_idx)
    omp_s = torch.expm1(xs_raw.clamp(min=LOG_FLOOR, max=-eps)).neg_()
    single = torch.stack([omp_s.log(), xs_raw.clamp(min=LOG_FLOOR)], dim=-1)
    groups, saved = [], []
    for g, (cols, cs) in enumerate(zip(plan.groups, plan.counts)):
        n = len(cols)
        vals, parts = {}, {}
        if set(cs) <= {0, 1}:  # e_1 from the odds themselves (one expm1 per answer): no log over the group
            a, total, s, clamped = shifted_odds(x, plan.outside(g, x), out=torch.empty_like(x))
            parts["odds"] = [a, total / live_rows(s), clamped]  # a becomes the gradient in backward, in place
            e1 = (total.log() + s).squeeze(1)
            vals = {c: None if c == 0 else e1 for c in cs}
        else:
            lo = plan.take(omp, cols).log().neg_().add_(plan.take(xc, cols))
            # every configuration takes one e_c of this group, so a shift common to its e_c cancels in ρ: with e_n
            # or e_{n−1} in use, all are taken relative to e_n = Π o, whose log Σ lo (−1e5 at K = 256) would
            # otherwise cost float32 its last digits when ✓ and ✗ are subtracted
            shift = lo.sum(1) if any(c in (n - 1, n) for c in cs) else None
            parts["shift"] = shift is not None
            for c in cs:
                if c in (1, n - 1) and c not in parts:
                    v = lo if c == 1 else -lo
                    m = v.amax(1, keepdim=True)
                    e = (v - m).exp_()
                    total = e.sum(1, keepdim=True)
                    parts[c] = (e, total)  # softmax = e / total, for backward
                if c == 0:
                    val = None
                elif c == n:
                    val = lo.sum(1)
                else:  # 1 or n − 1: log Σ o, or Σ lo + log Σ 1/o
                    e, total = parts[c]
                    m = (lo if c == 1 else -lo).amax(1)
                    lse = m + total.squeeze(1).log()
                    val = lse if c == 1 else lo.sum(1) + lse
                if shift is not None:
                    val = (
                        None if c == n else (lse if c == n - 1 and c != 1 else (-shift if val is None else val - shift))
                    )
                vals[c] = val
        saved.append(parts)
        groups.append(vals)
    return single, groups, saved, (x, xs_raw, omp_s, omp)


def _leaves_backward(
    plan: _LeafPlan, parts_all: list[dict], tensors: tuple, g_single: torch.Tensor, g_groups: list[torch.Tensor]
) -> torch.Tensor:
    """d loss / d x from the gradients of the leaves (see :func:`_leaves_forward`)."""
    x, xs_raw, omp_s, omp = tensors
    eps = _clamp_bound(x.dtype)
    grad = None
    # groups that kept full rows first: their gradients are 0 outside their columns, so they add up
    for g, (cs, parts, gg) in enumerate(zip(plan.counts, parts_all, g_groups)):
        if "odds" in parts:  # d log e_1 / dx_j = a_j (1 + a_j) / Σ a (see shifted_odds)
            a, total, clamped = parts["odds"]
            g1 = sum((gg[:, k : k + 1] for k, c in enumerate(cs) if c == 1), torch.zeros_like(total))
            if a is None:  # a second backward (retain_graph): the first one used the buffer; recompute it
                a = shifted_odds(x, plan.outside(g, x), out=torch.empty_like(x))[0]
            # the first backward writes the gradient into the saved buffer: no new [B, K] buffer (each costs page
            # faults on the CPU); the same operations recompute it, bit for bit, if backward runs again
            parts["odds"][0] = None
            gx = a.addcmul_(a, a).mul_(g1 / total)
            if clamped:
                gx.masked_fill_(x > -eps, 0.0)
            grad = gx if grad is None else grad.add_(gx)
            del a, gx
    if grad is None:
        grad = torch.empty_like(x)
    # singletons: d log p / dx = 1, d log(1 − p) / dx = −p/(1 − p) = 1 − 1/(1 − p) (0 where x was clamped)
    inv_s = (xs_raw <= -eps) / omp_s
    single = g_single[..., 1] + g_single[..., 0] * (1.0 - inv_s)
    plan.put(grad, plan.singles, single.mul_(xs_raw >= LOG_FLOOR))  # and 0 where it was floored (−inf)
    for cols, cs, parts, gg in zip(plan.groups, plan.counts, parts_all, g_groups):
        if "odds" in parts:
            continue
        n = len(cols)  # the values' gradients: Σ lo (e_n, e_{n−1}) and the softmaxes of the logsumexps
        glo = None
        if parts["shift"]:  # every value had Σ lo taken off: d(−Σ lo)/d lo_j = −1, times each value's gradient
            glo = (-gg.sum(1, keepdim=True)).expand(-1, n).clone()
        for k, c in enumerate(cs):
            gc = gg[:, k : k + 1]
            if c == 0:
                continue
            if c == n or (c == n - 1 and c != 1):  # d Σ lo / d lo_j = 1 (at n = 2, e_1 took the c = 1 form)
                term = gc.expand(-1, n)
                glo = term.clone() if glo is None else glo + term
            if c in (1, n - 1):
                e, total = parts[c]
                soft = e * (gc / total)
                glo = soft if glo is None else (glo + soft if c == 1 else glo - soft)
        if glo is None:
            glo = torch.zeros_like(plan.take(x, cols))
        # d lo / dx = 1 / (1 − p), and 0 where x was clamped (p = 1 exactly)
        plan.put(grad, cols, glo.div_(plan.take(omp, cols)).mul_(plan.take(x, cols) <= -eps))
    return grad


MATMUL_CONFIGS = 8  # up to this many configurations a side is summed column by column; beyond, by one matmul


def _leaf_matrix(plan: _LeafPlan, single: torch.Tensor, groups: list[dict]) -> torch.Tensor:
    """[B, F]: the singletons' (log(1 − p), log p), then each group's log e_c (an exact 0 made a tensor)."""
    cols = [single.reshape(len(single), -1)]
    zero = single.new_zeros(len(single))
    for cs, vals in zip(plan.counts, groups):
        cols += [(zero if vals[c] is None else vals[c]).unsqueeze(1) for c in cs]
    return torch.cat(cols, 1)


def _incidence(plan: _LeafPlan, like: torch.Tensor) -> torch.Tensor:
    """[F, C]: which of the F leaf values (the singletons' log(1 − p), log p, then each group's log e_c) each of the C
    configurations (✓'s, then ✗'s) adds up; made once per device and dtype."""
    key = ("incidence", like.device, like.dtype)
    if key not in plan._index:
        offsets, rows = [], 2 * len(plan.singles)
        for cs in plan.counts:
            offsets.append(rows)
            rows += len(cs)
        configs = [*plan.sides[0], *plan.sides[1]]
        inc = torch.zeros(rows, len(configs), dtype=like.dtype)
        for j, (sigma, counts) in enumerate(configs):
            for k, bit in enumerate(sigma):
                inc[2 * k + bit, j] = 1.0
            for g, c in enumerate(counts):
                inc[offsets[g] + plan.counts[g].index(c), j] = 1.0
        plan._index[key] = inc.to(like.device)
    return plan._index[key]


def _exact_matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b`` with every product and sum in ``a``'s precision: a float32 matmul on CUDA may run in TF32 (10-bit
    mantissas) when a program enables it, which would round the log-weights being summed; there it runs in float64."""
    if a.is_cuda and a.dtype == torch.float32:
        return (a.double() @ b.double()).float()
    return a @ b


def _config_values(plan: _LeafPlan, single: torch.Tensor, groups: list[dict]) -> torch.Tensor:
    """[B, C]: each configuration's sum of its leaves (✓'s configurations, then ✗'s)."""
    configs = [*plan.sides[0], *plan.sides[1]]
    if len(configs) > 2 * MATMUL_CONFIGS:
        leaves = _leaf_matrix(plan, single, groups)
        return _exact_matmul(leaves, _incidence(plan, leaves))
    out = []
    for sigma, counts in configs:
        terms = [single[:, k, bit] for k, bit in enumerate(sigma)]
        terms += [groups[g][c] for g, c in enumerate(counts) if groups[g][c] is not None]
        v = terms[0] if terms else single.new_zeros(len(single))
        for t in terms[1:]:
            v = v + t
        out.append(v)
    return torch.stack(out, 1)


def _leaf_grads(plan: _LeafPlan, per_config: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The leaves' gradients from each configuration's (``[B, C]``), as :func:`_leaves_backward` takes them."""
    configs = [*plan.sides[0], *plan.sides[1]]
    n_single = len(plan.singles)
    if len(configs) > 2 * MATMUL_CONFIGS:
        d = _exact_matmul(per_config, _incidence(plan, per_config).T)
        g_single = d[:, : 2 * n_single].reshape(len(d), n_single, 2)
        return g_single, list(d[:, 2 * n_single :].split([len(cs) for cs in plan.counts], 1))
    g_single = per_config.new_zeros(len(per_config), n_single, 2)
    g_groups = [per_config.new_zeros(len(per_config), len(cs)) for cs in plan.counts]
    for j, (sigma, counts) in enumerate(configs):
        w = per_config[:, j]
        for k, bit in enumerate(sigma):
            g_single[:, k, bit] += w
        for g, c in enumerate(counts):
            g_groups[g][:, plan.counts[g].index(c)] += w
    return g_single, g_groups


def _logsumexp(v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A side's log WMC over its configurations, with their softmax (None: one configuration, weight 1)."""
    if v.shape[1] == 1:
        return v[:, 0], None
    total = torch.logsumexp(v, 1)
    return total, (v - total.unsqueeze(1)).exp_()


class _LiftedLogRatio(torch.autograd.Function):
    """``log ρ = log WMC(✓) − log WMC(✗)`` (up to the groups' common factor ``Π (1 − p)``, which cancels) from
    ``x`` [B, n]: the leaves, then each configuration's sum of leaf values (one small matmul with the incidence
    matrix), then a logsumexp over each side's configurations. Backward runs the same steps in reverse."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, plan: _LeafPlan) -> torch.Tensor:
        single, groups, parts, tensors = _leaves_forward(x, plan)
        values = _config_values(plan, single, groups)
        n_top = len(plan.sides[0])
        top, w_top = _logsumexp(values[:, :n_top])
        bottom, w_bottom = _logsumexp(values[:, n_top:])
        ctx.plan, ctx.parts, ctx.weights = plan, parts, (w_top, w_bottom)
        ctx.save_for_backward(*tensors)
        return top - bottom

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: torch.Tensor):
        plan, (w_top, w_bottom) = ctx.plan, ctx.weights
        g = grad.unsqueeze(1)
        per_config = torch.cat([g if w_top is None else w_top * g, -g if w_bottom is None else w_bottom * -g], 1)
        g_single, g_groups = _leaf_grads(plan, per_config)
        return _leaves_backward(plan, ctx.parts, ctx.saved_tensors, g_single, g_groups), None


def lifted_log_ratio(plan: _LeafPlan, x: torch.Tensor) -> torch.Tensor:
    """``log ρ`` [B] of a lifted structure from its atoms' log-probs ``x`` [B, n] (columns in ``atoms`` order)."""
    return _LiftedLogRatio.apply(x, plan)
