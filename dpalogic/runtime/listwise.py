"""Loss programs over K answers, evaluated on ``[B, K]`` log-prob matrices (docs/semantics.md §8).

Each term's ``log ρ`` is computed in vectorized torch from its structure's lifted form
(:mod:`dpalogic.semantics.lifted`) when its groups need only closed-form counts (``e_1`` from the odds, ``e_n`` from
the log-odds: ExactlyOne, AtMost(1), …), and otherwise (``Ranked``, other counts) from its OBDD, one variable level
at a time (:mod:`dpalogic.runtime.obdd_eval`). The link and its derivative
come from the same generated code as the pair modules (:mod:`dpalogic.compile.link_module`). Everything is in log
space and float32 (float64 stays float64); the lifted leaves and the OBDD levels have hand-written backwards.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping

import torch

from dpalogic.compile.link_module import link_function
from dpalogic.language.syntax import Atom
from dpalogic.logic.listwise import ListStructure
from dpalogic.runtime.lifted_eval import LOG_FLOOR, _clamp_bound, closed_form, leaf_plan, lifted_log_ratio
from dpalogic.runtime.lifted_fused import (
    MAX_COMPILED_TERMS,
    Compiled,
    FusedTerms,
    fusable,
    one_against_the_rest,
)
from dpalogic.runtime.obdd_eval import LevelPlan, obdd_sides
from dpalogic.semantics.lifted import lift


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


class ListwiseTerm:
    """One term's ``log ρ`` on a ``[B, n]`` matrix of its atoms' log-probs (columns in ``structure.atoms`` order)."""

    def __init__(self, structure: ListStructure) -> None:
        self.structure = structure
        self.atoms: tuple[Atom, ...] = structure.atoms
        lifted = lift(structure.atoms, structure.source)
        # counted where the groups need only closed forms (ExactlyOne, AtMost(1), …); anything else — Ranked, other
        # counts (whose e_c would need a recurrence over the answers) — runs its OBDD one variable level at a time
        self.lifted = lifted if lifted is not None and closed_form(lifted) else None
        # the term owns its plan (its index tensors): they go when the loss goes
        self._leaf_plan = leaf_plan(self.lifted) if self.lifted is not None else None
        # odds groups and few configurations: the whole term (log ρ, z, the link) with its gradient in one pass
        self.fused = self._leaf_plan is not None and fusable(self._leaf_plan)
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
            return lifted_log_ratio(self._leaf_plan, x)
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


def _margin_sign(role: str) -> int:
    """How a term's z takes a per-row margin, as :meth:`ListwiseProgram._term`: z − m, z + m (the preference
    reversed: smoothing), or not at all (NLL)."""
    return 0 if role == "nll" else (1 if role == "preference" else -1)


def _run_of_logps(ev: ListwiseTerm, bt) -> slice | None:
    """The slice of logps' columns a fused, unnormalized term reads, when they form a run; else None."""
    if not ev.fused or bt.normalized or ev.named or len(ev.layout) != 1 or ev.layout[0][0] != "M":
        return None
    cols = ev.layout[0][1]
    return slice(cols[0], cols[-1] + 1) if cols[-1] - cols[0] == len(cols) - 1 else None


def reduce(losses: torch.Tensor, reduction: str) -> torch.Tensor:
    """A [B] loss reduced: 'mean' as sum / B, whose backward hands on one broadcast scalar where mean's fills a [B]
    tensor with 1/B first."""
    if reduction == "mean":
        return losses.sum() / losses.numel()
    return losses.sum() if reduction == "sum" else losses


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

    def __init__(self, terms, bound, compile: bool = False) -> None:
        """``terms``: the program's :class:`~dpalogic.semantics.program.Term` objects; ``bound``: the same terms with
        their hyperparameters substituted (``BoundTerm``); ``compile``: fused terms under ``torch.compile``."""
        from dpalogic.logic.listwise import as_list_structure

        self.roles = [t.role for t in terms]
        self.bound = list(bound)
        self.evals = [ListwiseTerm(as_list_structure(t.structure)) for t in terms]
        fused = sum(ev.fused for ev in self.evals)
        if compile and fused > MAX_COMPILED_TERMS:
            warnings.warn(
                f"compile=True: this loss has {fused} fused terms, and torch.compile would specialize its one function "
                f"for each (it keeps {MAX_COMPILED_TERMS + 6} at most): it runs eagerly",
                RuntimeWarning,
                stacklevel=3,
            )
            compile = False
        self.compiled = [Compiled() if compile and ev.fused else None for ev in self.evals]
        # fused terms over runs of logps' columns (Plackett–Luce's stages), when several: one node for all of them
        runs = [_run_of_logps(ev, bt) for ev, bt in zip(self.evals, self.bound)]
        self._runs = runs if sum(r is not None for r in runs) > 1 else None
        self._stage_cache: dict = {}

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
        for bt, s_role, ev, cc in zip(self.bound, self.roles, self.evals, self.compiled):
            x = _named_matrix(atom_lp, ev.atoms, lambda a: a.name).to(dtype)
            if bt.normalized:
                if not ans_len:
                    raise DPALogicError("this loss is length-normalized: pass lengths (token counts)")
                x = x / _named_matrix(ans_len, ev.atoms, lambda a: a.answer).to(dtype).clamp(min=1.0)
            part = self._term(bt, s_role, ev, x, margin, dtype, cc)
            total = part if total is None else total + part
        return total

    def _term(
        self, bt, s_role: str, ev: ListwiseTerm, x: torch.Tensor, margin, dtype, compiled=None, reduction="none",
        check=None,
    ) -> torch.Tensor:  # fmt: skip
        if margin is not None and s_role != "nll":  # z − m for a preference, z + m for a smoothing term
            margin = margin.detach().to(dtype)  # data: no gradient flows to it, on either path
            margin = margin if s_role == "preference" else -margin
        else:
            margin = None
        if ev.fused and torch.is_grad_enabled() and x.requires_grad:  # no gradient wanted: no gradient computed
            fn = link_function(bt.link, bt.params)
            term = (slice(None), ev._leaf_plan, fn, bt.scale, bt.shift, bt.coef, 1, compiled)  # margin signed above
            return FusedTerms.apply(x, margin, [term], reduction, (), check)
        z = ev.log_ratio(x)
        if bt.scale != 1.0:
            z = z * bt.scale
        if bt.shift != 0.0:
            z = z - bt.shift
        if margin is not None:
            z = z - margin
        part = apply_link(bt.link, bt.params, z)
        return reduce(part * bt.coef if bt.coef != 1.0 else part, reduction)

    def per_pair(
        self,
        columns: Mapping[str, torch.Tensor],
        lengths: torch.Tensor | None,
        margin: torch.Tensor | None = None,
        reduction: str = "none",
        check: tuple[type, str] | None = None,
    ) -> torch.Tensor:
        """The loss of every row ``[B]`` from ``[B, K]`` matrices, or reduced ('sum', 'mean') term by term: a fused
        term then folds a mean's 1/B into its gradient. ``check``: (error, name) where :meth:`checks_for_itself`."""
        from dpalogic.errors import DPALogicError

        first = next(iter(columns.values()))
        dtype = torch.float64 if first.dtype == torch.float64 else torch.float32
        runs = self._runs
        if not (
            runs is not None
            and "M" in columns
            and columns["M"].requires_grad
            and torch.is_grad_enabled()
            and max(r.stop for r in runs if r is not None) <= columns["M"].shape[1]
        ):
            runs = [None] * len(self.evals)
        total = self._fused_terms(columns["M"].to(dtype), margin, reduction, runs) if any(runs) else None
        for bt, s_role, ev, cc, run in zip(self.bound, self.roles, self.evals, self.compiled, runs):
            if run is not None:
                continue
            x = ev.matrix(columns, dtype)
            if bt.normalized:
                if lengths is None:
                    raise DPALogicError("this loss is length-normalized: pass lengths= [B, K] (token counts)")
                x = x / ev.matrix({"M": lengths, "Ref": lengths}, dtype).clamp(min=1.0)
            part = self._term(bt, s_role, ev, x, margin, dtype, cc, reduction, check)
            total = part if total is None else total + part
        return total

    def _fused_terms(self, m: torch.Tensor, margin: torch.Tensor | None, reduction: str, runs: list) -> torch.Tensor:
        """The terms with a run of columns in ``runs`` as one :class:`FusedTerms` node."""
        terms = []
        for cols, ev, bt, role, cc in zip(runs, self.evals, self.bound, self.roles, self.compiled):
            if cols is not None:
                fn = link_function(bt.link, bt.params)
                terms.append((cols, ev._leaf_plan, fn, bt.scale, bt.shift, bt.coef, _margin_sign(role), cc))
        margin = None if margin is None else margin.detach().to(m.dtype)  # data: no gradient flows to it
        return FusedTerms.apply(m, margin, terms, reduction, self._stage_groups(terms, m.device))

    def _stage_groups(self, terms: list, device: torch.device) -> list:
        """Groups of ≥ 2 ``terms`` that are one-against-the-rest stages over runs ending at one column, conditioning
        each run's first column, with one link, scale, shift, coef and role, not compiled (Plackett–Luce): each as
        (member indices, their shared run of columns, each stage's column in that run), worked out once."""
        key = (tuple((t[0].start, t[0].stop) for t in terms), device)
        cached = self._stage_cache.get(key)
        if cached is None:
            groups: dict = {}
            for i, (cols, plan, fn, scale, shift, coef, sign, cc) in enumerate(terms):
                if cc is None and one_against_the_rest(plan) == 0:
                    groups.setdefault((cols.stop, fn, scale, shift, coef, sign), []).append(i)  # fn: cached per link
            cached = []
            for members in groups.values():
                if len(members) > 1:
                    start = min(terms[i][0].start for i in members)
                    ks = torch.tensor([terms[i][0].start - start for i in members], device=device)
                    cached.append((members, slice(start, terms[members[0]][0].stop), ks))
            self._stage_cache[key] = cached
        return cached

    def checks_for_itself(self, columns: Mapping[str, torch.Tensor]) -> bool:
        """Whether the one-against-the-rest pass checks the log-prob values itself (see ``odds_softmax_loss_and_grad``):
        one term over every column of ``logps``, no reference, not length-normalized, gradients wanted, on the CPU.
        That pass takes the row maxima anyway, so the caller's own pass over the matrix can be skipped."""
        if len(self.evals) != 1 or set(columns) != {"M"}:
            return False
        ev, logps = self.evals[0], columns["M"]
        return (
            ev.fused
            and not self.bound[0].normalized
            and not logps.is_cuda
            and logps.requires_grad
            and torch.is_grad_enabled()
            and ev.layout == [("M", tuple(range(logps.shape[1])))]
            and one_against_the_rest(ev._leaf_plan) is not None
        )
