"""Loss programs over K answers, evaluated on ``[B, K]`` log-prob matrices (docs/semantics.md §8).

Each term's ``log ρ`` is computed in vectorized torch from its structure's lifted form
(:mod:`dpalogic.semantics.lifted`) when its groups need only closed-form counts (``e_1`` from the odds, ``e_n`` from
the log-odds: ExactlyOne, AtMost(1), …), and otherwise (``Ranked``, other counts) from its OBDD, one variable level
at a time (:mod:`dpalogic.runtime.obdd_eval`). The link and its derivative
come from the same generated code as the pair modules (:mod:`dpalogic.compile.link_module`). Everything is in log
space and float32 (float64 stays float64); the lifted leaves and the OBDD levels have hand-written backwards.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping

import torch
from torch.autograd.function import once_differentiable

from dpalogic.compile.link_module import link_function
from dpalogic.language.syntax import Atom
from dpalogic.logic.listwise import ListStructure
from dpalogic.runtime.obdd_eval import LevelPlan, obdd_sides
from dpalogic.semantics.lifted import Lifted, lift


class _LogOdds(torch.autograd.Function):
    """``log(p / (1 − p)) = x − log(1 − eˣ)`` from ``x = log p``; x is clamped just below 0 (p = 1 is finite, see
    :func:`_clamp_bound`).

    One saved factor, ``1 / (1 − eˣ)``, is the whole backward (autograd through the pieces would take five passes).
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        tiny = _clamp_bound(x.dtype)
        xc = torch.clamp(x, min=LOG_FLOOR, max=-tiny)
        one_minus_p = torch.expm1(xc).neg_()  # 1 − eˣ, accurate near 0
        ctx.save_for_backward(one_minus_p, x)
        return xc - one_minus_p.log()

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        one_minus_p, x = ctx.saved_tensors
        tiny = _clamp_bound(x.dtype)
        return grad / one_minus_p * (x <= -tiny)


def log_odds(x: torch.Tensor) -> torch.Tensor:
    return _LogOdds.apply(x)


def closed_form(lf: Lifted) -> bool:
    """Does every group need only ``e_0``, ``e_1``, ``e_{n−1}``, ``e_n`` (sums and logsumexps, no recurrence)?"""
    return all(c in (0, 1, len(g) - 1, len(g)) for g_i, g in enumerate(lf.groups) for c in lf.counts_needed(g_i))


LOG_FLOOR = -1e30  # log-probs of −inf (an answer masked out, an fp16 underflow) are floored here: no ∞ − ∞, no NaN


def _clamp_bound(dtype: torch.dtype) -> float:
    """Log-probs are clamped to ``≤ −√tiny`` here: the odds ``1/(1 − p)`` then stay below ~1e19 in float32, so a sum
    of 256 of them cannot overflow even when every answer has log-prob 0 (with ``tiny`` itself it could)."""
    return torch.finfo(dtype).tiny ** 0.5


class _LiftedLeaves(torch.autograd.Function):
    """The leaves of a lifted structure from ``x`` [B, n], with a hand-written backward.

    Outputs: the singletons' ``(log(1 − p), log p)`` as [B, S, 2], then per group its ``log e_c`` for the counts
    asked (each of 0, 1, n − 1, n: closed forms), as [B, len(counts)]. A group that needs only ``e_1`` (ExactlyOne,
    AtMost(1)) never forms its log-odds: ``e_1 = Σ e^{x_j}/(1 − e^{x_j})`` is a max-shifted sum of exponentials
    divided by ``1 − p`` — one ``exp`` and one ``expm1`` per answer, as a softmax's one ``exp`` — so the listwise loss
    costs about what a hand-written softmax does. The backward writes every column of the gradient once (every atom
    is a singleton or in one group) instead of scattering each slice's gradient into a zero-filled copy of ``x``.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, plan: _LeafPlan):
        eps = _clamp_bound(x.dtype)
        # 1 − p of every atom, accurate near p = 1; in place on one fresh buffer: on the CPU each new [B, K] buffer
        # costs page faults that outweigh the arithmetic on it
        lo_path = not all(set(cs) <= {0, 1} for cs in plan.counts)  # a group that keeps 1 − p for backward
        omp = torch.clamp(x, min=LOG_FLOOR, max=-eps, out=None if lo_path else plan.scratch(x)).expm1_().neg_()
        xs = plan.take(x, plan.singles).clamp(min=LOG_FLOOR)
        omp_s = plan.take(omp, plan.singles).clone()  # small: the singletons' backward keeps only these columns
        outs = [torch.stack([omp_s.log(), xs], dim=-1)]
        saved = []
        for g, (cols, cs) in enumerate(zip(plan.groups, plan.counts)):
            n = len(cols)
            vals, parts = [], {}
            if set(cs) <= {0, 1}:  # e_1 from the odds themselves: no log over the group
                # full rows with the other columns at −inf: reductions over an odd number of columns (63 of 64) take
                # a slow path, and exp(−inf) = 0 leaves them out of the sum
                xm = torch.clamp(x, min=LOG_FLOOR).add_(plan.outside(g, x))
                m = xm.amax(1, keepdim=True)
                w = xm.sub_(m).exp_().div_(omp)  # odds / e^m on the group's columns, 0 elsewhere
                total = w.sum(1, keepdim=True)
                # what backward needs, w / (1 − p), in the same buffer: omp need not outlive the forward
                # whether any answer sat at the clamp (p = 1), whose gradient backward must zero: on a GPU asking would
                # cost a host sync per call, so there the mask is simply always applied
                clamped = True if x.is_cuda else bool((m > -eps).any())
                parts["odds"] = [w.div_(omp), total, clamped, m]
                e1 = (m + total.log()).squeeze(1)
                vals = [torch.zeros_like(e1) if c == 0 else e1 for c in cs]
            else:
                lo = plan.take(omp, cols).log().neg_().add_(plan.take(x, cols).clamp(min=LOG_FLOOR, max=-eps))
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
                        val = torch.zeros_like(lo[:, 0])
                    elif c == n:
                        val = lo.sum(1)
                    else:  # 1 or n − 1: log Σ o, or Σ lo + log Σ 1/o
                        e, total = parts[c]
                        m = (lo if c == 1 else -lo).amax(1)
                        lse = m + total.squeeze(1).log()
                        val = lse if c == 1 else lo.sum(1) + lse
                    if shift is not None:
                        val = torch.zeros_like(val) if c == n else (lse if c == n - 1 and c != 1 else val - shift)
                    vals.append(val)
            saved.append(parts)
            outs.append(torch.stack(vals, dim=1))
        ctx.plan, ctx.parts, ctx.eps = plan, saved, eps
        ctx.save_for_backward(x, omp_s, omp if lo_path else None)
        return tuple(outs)

    @staticmethod
    @once_differentiable
    def backward(ctx, g_single: torch.Tensor, *g_groups: torch.Tensor):
        x, omp_s, omp = ctx.saved_tensors
        plan, eps = ctx.plan, ctx.eps
        grad = None
        # groups that kept full rows first: their gradients are 0 outside their columns, so they add up
        for g, (cs, parts, gg) in enumerate(zip(plan.counts, ctx.parts, g_groups)):
            if "odds" in parts:  # d e_1 / dx_j = o_j / (e_1 · (1 − p_j)) = (w_j / total) / (1 − p_j)
                w_omp, total, clamped, m = parts["odds"]
                g1 = sum((gg[:, k : k + 1] for k, c in enumerate(cs) if c == 1), torch.zeros_like(total))
                if w_omp is None:  # a second backward (retain_graph): the first one used the buffer; recompute it
                    omp_all = torch.clamp(x, min=LOG_FLOOR, max=-eps).expm1_().neg_()
                    w_omp = torch.clamp(x, min=LOG_FLOOR).add_(plan.outside(g, x))
                    w_omp = w_omp.sub_(m).exp_().div_(omp_all).div_(omp_all)
                # the first backward writes the gradient into the saved buffer: no new [B, K] buffer (each costs page
                # faults on the CPU); the same operations recompute it, bit for bit, if backward runs again
                parts["odds"][0] = None
                gx = w_omp.mul_(g1 / total)
                if clamped:
                    gx.mul_(x <= -eps)
                grad = gx if grad is None else grad.add_(gx)
                del w_omp, gx
        if grad is None:
            grad = torch.empty_like(x)
        # singletons: d log p / dx = 1, d log(1 − p) / dx = −p/(1 − p) = 1 − 1/(1 − p) (0 where x was clamped)
        inv_s = (plan.take(x, plan.singles) <= -eps) / omp_s
        plan.put(grad, plan.singles, g_single[..., 1] + g_single[..., 0] * (1.0 - inv_s))
        for cols, cs, parts, gg in zip(plan.groups, plan.counts, ctx.parts, g_groups):
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
        return grad, None


class _LeafPlan:
    """Which columns are singletons and which form each group, with their index tensors made once per device."""

    def __init__(self, singles: tuple[int, ...], groups: tuple[tuple[int, ...], ...], counts) -> None:
        self.singles, self.groups, self.counts = singles, groups, tuple(tuple(c) for c in counts)
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

    def scratch(self, like: torch.Tensor) -> torch.Tensor:
        """A [B, n] buffer reused from call to call, for what does not outlive a forward (one per thread, last shape):
        a fresh one costs page faults on every call, about as much as the ``exp`` computed in it."""
        key = ("scratch", threading.get_ident())
        buf = self._index.get(key)
        if buf is None or buf.shape != like.shape or buf.dtype != like.dtype or buf.device != like.device:
            buf = self._index[key] = torch.empty_like(like, memory_format=torch.contiguous_format)
        return buf

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
    return _LeafPlan(lf.singletons, lf.groups, [lf.counts_needed(g) for g in range(len(lf.groups))])


def _leaves(plan: _LeafPlan, x: torch.Tensor) -> tuple[torch.Tensor, list[dict[int, torch.Tensor]]]:
    """The singletons' ``[B, S, (log(1 − p), log p)]`` and each group's ``{c: log e_c}``."""
    single, *per_group = _LiftedLeaves.apply(x, plan)
    return single, [{c: v[:, k] for k, c in enumerate(cs)} for cs, v in zip(plan.counts, per_group)]


def _lifted_sides(lf: Lifted, plan: _LeafPlan, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``log WMC`` of both sides up to the groups' common factor ``Σ log(1 − p)`` (which cancels in ρ)."""
    single, esym = _leaves(plan, x)
    sides = []
    for configs in (lf.top, lf.bottom):
        parts = []
        for sigma, counts in configs:
            v = sum(esym[g][c] for g, c in enumerate(counts))
            picked = [single[:, k, bit] for k, bit in enumerate(sigma)]
            if picked:
                v = v + sum(picked[1:], picked[0])
            parts.append(v)
        sides.append(parts[0] if len(parts) == 1 else torch.logsumexp(torch.stack(parts, -1), -1))
    return sides[0], sides[1]


class ListwiseTerm:
    """One term's ``log ρ`` on a ``[B, n]`` matrix of its atoms' log-probs (columns in ``structure.atoms`` order)."""

    def __init__(self, structure: ListStructure) -> None:
        self.structure = structure
        self.atoms: tuple[Atom, ...] = structure.atoms
        lifted = lift(structure.atoms, structure.source)
        # counted where the groups need only closed forms (ExactlyOne, AtMost(1), …); anything else — Ranked, other
        # counts (whose e_c would need a recurrence over the answers) — runs its OBDD one variable level at a time
        self.lifted = lifted if lifted is not None and closed_form(lifted) else None
        # the term owns its plan (index tensors, a scratch buffer): they go when the loss goes
        self._leaf_plan = leaf_plan(self.lifted) if self.lifted is not None else None
        self._levels = None
        if self.lifted is None:
            self._levels = LevelPlan(structure.bdd, (structure.top, structure.bottom), structure._atom_of_var)
        self.layout = _layout(self.atoms)  # (predicate, columns of its [B, K] matrix), worked out once
        self.named = [a.name for a in self.atoms if not a.answer[1:].isdigit()]  # yw/yl: no column of a [B, K]

    def matrix(self, columns: Mapping[str, torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
        """The term's ``[B, n]`` log-probs (or token counts) from ``[B, K]`` matrices, after checking they cover it."""
        from dpalogic.errors import DPALogicError

        if self.named:
            raise DPALogicError(
                f"this loss mentions {', '.join(self.named)}: [B, K] inputs give answers y1 … yK; pass log-probs by "
                "atom name instead (logps={'M(yw)': …, …})"
            )
        for pred, cols in self.layout:
            if pred not in columns:
                raise DPALogicError(f"this loss needs ref_logps: its structure mentions {pred}(y{cols[0] + 1})")
            if cols[-1] >= columns[pred].shape[1]:
                raise DPALogicError(
                    f"this loss mentions {pred}(y{max(cols) + 1}) but the inputs have K = {columns[pred].shape[1]} answers"
                )
        parts = [_take(columns[pred], cols) for pred, cols in self.layout]
        out = parts[0] if len(parts) == 1 else torch.cat(parts, 1)
        return out.to(dtype)

    @property
    def method(self) -> str:
        return "lifted" if self.lifted is not None else "obdd levels"

    def log_ratio(self, x: torch.Tensor) -> torch.Tensor:
        if self.lifted is not None:
            top, bottom = _lifted_sides(self.lifted, self._leaf_plan, x)
            return top - bottom
        x = x.clamp(min=LOG_FLOOR)
        sides = obdd_sides(self._levels, x, x - log_odds(x))  # log p and log(1 − p) of every atom
        return sides[:, 0] - sides[:, 1]


class _Link(torch.autograd.Function):
    @staticmethod
    def forward(ctx, z: torch.Tensor, fn) -> torch.Tensor:
        f, df = fn(z)
        ctx.save_for_backward(df)
        return f

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (df,) = ctx.saved_tensors
        return grad * df, None


def apply_link(link: str, params: Mapping[str, float], z: torch.Tensor) -> torch.Tensor:
    return _Link.apply(z, link_function(link, params))


def _layout(atoms: tuple[Atom, ...]) -> list[tuple[str, tuple[int, ...]]]:
    """Runs of one predicate in ``atoms`` and their answers' columns (y1 is column 0)."""
    out: list[tuple[str, tuple[int, ...]]] = []
    for a in atoms:
        col = int(a.answer[1:]) - 1 if a.answer[1:].isdigit() else -1
        if col < 0:
            continue
        if out and out[-1][0] == a.pred:
            out[-1] = (a.pred, out[-1][1] + (col,))
        else:
            out.append((a.pred, (col,)))
    return out


def _take(mat: torch.Tensor, cols: tuple[int, ...]) -> torch.Tensor:
    """Columns of a matrix: a view for a run ``a, a+1, …`` (the usual ``y1..yK``), a gathered copy otherwise."""
    if cols[0] == 0 and len(cols) == mat.shape[1] and cols[-1] == len(cols) - 1:
        return mat  # all of it: no view, whose backward would fill a zero matrix and copy the gradient into it
    if cols[-1] - cols[0] == len(cols) - 1:
        return mat[:, cols[0] : cols[-1] + 1]
    return mat.index_select(1, torch.as_tensor(cols, device=mat.device))


MAX_K = 256


def matrix_columns(
    logps: torch.Tensor, ref_logps: torch.Tensor | None, lengths: torch.Tensor | None
) -> tuple[dict[str, torch.Tensor], torch.Tensor | None]:
    """Check ``[B, K]`` inputs (column j is answer y(j+1)): ``{"M": logps, "Ref": ref_logps}`` and the lengths."""
    from dpalogic.errors import DPALogicError

    columns = {"M": logps}
    if ref_logps is not None:
        columns["Ref"] = ref_logps
    for name, t in (("logps", logps), ("ref_logps", ref_logps), ("lengths", lengths)):
        if t is None:
            continue
        if not isinstance(t, torch.Tensor):
            raise DPALogicError(f"{name} must be a torch.Tensor [B, K], got {type(t).__name__}")
        if t.dim() != 2 or not 1 <= t.shape[1] <= MAX_K:
            raise DPALogicError(
                f"{name} must be [B, K] with 1 ≤ K ≤ {MAX_K} (column j is answer y(j+1)), got {tuple(t.shape)}"
            )
        if t.shape != logps.shape:
            raise DPALogicError(f"{name} has shape {tuple(t.shape)}, logps has {tuple(logps.shape)}: they must match")
        if t.device != logps.device:
            raise DPALogicError(f"{name} is on {t.device} but logps is on {logps.device}")
        if name != "lengths" and not t.is_floating_point():
            raise DPALogicError(f"{name} must be floating point, got {t.dtype}")
    return columns, lengths


def as_mapping(columns: Mapping[str, torch.Tensor], lengths: torch.Tensor | None):
    """The same inputs keyed by atom (``"M(y3)"``) and answer (``"y3"``), as column views (no copies)."""
    atom_lp = {f"{pred}(y{j + 1})": mat[:, j] for pred, mat in columns.items() for j in range(mat.shape[1])}
    ans_len = {} if lengths is None else {f"y{j + 1}": lengths[:, j] for j in range(lengths.shape[1])}
    return atom_lp, ans_len


def _named_matrix(mapping: Mapping[str, torch.Tensor], atoms: tuple[Atom, ...], key) -> torch.Tensor:
    """``[B, n]`` of the atoms' inputs from per-atom (or per-answer) ``[B]`` tensors, in ``atoms`` order."""
    from dpalogic.errors import DPALogicError

    missing = [key(a) for a in atoms if key(a) not in mapping]
    if missing:
        raise DPALogicError(f"this loss needs inputs for {', '.join(missing[:4])}{' …' if len(missing) > 4 else ''}")
    return torch.stack([mapping[key(a)] for a in atoms], dim=1)


class ListwiseProgram:
    """``Σ_k c_k · f_k(β_k · log ρ_k − γ_k − margin)`` over K-answer structures (bound terms: plain floats)."""

    def __init__(self, terms, bound) -> None:
        """``terms``: the program's :class:`~dpalogic.semantics.program.Term` objects; ``bound``: the same terms with
        their hyperparameters substituted (``BoundTerm``)."""
        from dpalogic.logic.listwise import as_list_structure

        self.roles = [t.role for t in terms]
        self.bound = list(bound)
        self.evals = [ListwiseTerm(as_list_structure(t.structure)) for t in terms]

    def per_pair_named(
        self,
        atom_lp: Mapping[str, torch.Tensor],
        ans_len: Mapping[str, torch.Tensor],
        margin: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The same loss from ``[B]`` tensors keyed by atom (``"M(y3)"``) and answer (``"y3"``), as pairs are given."""
        from dpalogic.errors import DPALogicError

        first = next(iter(atom_lp.values()))
        dtype = torch.float64 if first.dtype == torch.float64 else torch.float32
        total = None
        for bt, s_role, ev in zip(self.bound, self.roles, self.evals):
            x = _named_matrix(atom_lp, ev.atoms, lambda a: a.name).to(dtype)
            if bt.normalized:
                if not ans_len:
                    raise DPALogicError("this loss is length-normalized: pass lengths (token counts)")
                x = x / _named_matrix(ans_len, ev.atoms, lambda a: a.answer).to(dtype).clamp(min=1.0)
            part = self._term(bt, s_role, ev, x, margin, dtype)
            total = part if total is None else total + part
        return total

    def _term(self, bt, s_role: str, ev: ListwiseTerm, x: torch.Tensor, margin, dtype) -> torch.Tensor:
        z = ev.log_ratio(x)
        if bt.scale != 1.0:
            z = z * bt.scale
        if bt.shift != 0.0:
            z = z - bt.shift
        if margin is not None and s_role != "nll":
            z = z - margin.to(dtype) if s_role == "preference" else z + margin.to(dtype)
        part = apply_link(bt.link, bt.params, z)
        return part * bt.coef if bt.coef != 1.0 else part

    def per_pair(
        self,
        columns: Mapping[str, torch.Tensor],
        lengths: torch.Tensor | None,
        margin: torch.Tensor | None = None,
    ) -> torch.Tensor:
        from dpalogic.errors import DPALogicError

        first = next(iter(columns.values()))
        dtype = torch.float64 if first.dtype == torch.float64 else torch.float32
        total = None
        for bt, s_role, ev in zip(self.bound, self.roles, self.evals):
            x = ev.matrix(columns, dtype)
            if bt.normalized:
                if lengths is None:
                    raise DPALogicError("this loss is length-normalized: pass lengths= [B, K] (token counts)")
                x = x / ev.matrix({"M": lengths, "Ref": lengths}, dtype).clamp(min=1.0)
            part = self._term(bt, s_role, ev, x, margin, dtype)
            total = part if total is None else total + part
        return total
