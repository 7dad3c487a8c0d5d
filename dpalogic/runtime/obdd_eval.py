"""``log WMC`` of OBDD sides, one variable level at a time, with a hand-written backward (docs/semantics.md §8).

A structure with no symmetry to lift (``Ranked``, answers each with their own constraint) is an OBDD whose nodes of
one variable level are independent of each other: each is ``logaddexp(log p_v + W(hi), log(1 − p_v) + W(lo))`` of
nodes further down. So the whole level is one gather and one ``logaddexp`` over ``[B, width]``, and the sides take
one pass over the levels instead of one autograd node per circuit node; the backward runs the levels the other
way, with the adjoints of shared children summed by ``index_add_``. Values are log-space throughout: a ``FALSE``
child is ``−inf`` and contributes a weight of exactly 0, never a NaN (a reduced OBDD has no node with two ``FALSE``
children).
"""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

from dpalogic.logic.bdd import BDD, FALSE, TRUE


class LevelPlan:
    """The reachable nodes of some OBDD roots, grouped by variable level (top level first), as index tensors."""

    def __init__(self, bdd: BDD, roots: tuple[int, ...], atom_of_var: tuple[int, ...]) -> None:
        nodes = sorted({x for r in roots for x in bdd.support(r)})
        slot = {FALSE: 0, TRUE: 1, **{u: k + 2 for k, u in enumerate(nodes)}}
        by_var: dict[int, list[int]] = {}
        for u in nodes:
            by_var.setdefault(bdd.var[u], []).append(u)
        self.size = len(nodes) + 2
        self.roots = tuple(slot[r] for r in roots)
        self.levels = []  # (atom column, node slots, hi slots, lo slots), top variable first
        for v in sorted(by_var):
            us = by_var[v]
            self.levels.append(
                (
                    atom_of_var[v],
                    torch.tensor([slot[u] for u in us]),
                    torch.tensor([slot[bdd.hi[u]] for u in us]),
                    torch.tensor([slot[bdd.lo[u]] for u in us]),
                )
            )
        self._device: dict = {}

    def on(self, device: torch.device) -> list:
        if device not in self._device:
            self._device[device] = [(a, n.to(device), h.to(device), lo.to(device)) for a, n, h, lo in self.levels]
        return self._device[device]


class _Levels(torch.autograd.Function):
    """Node-major tables (``[nodes, B]``): a level's gathers and writes move whole contiguous rows."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, l1m: torch.Tensor, plan: LevelPlan) -> torch.Tensor:
        xt, lt = x.t().contiguous(), l1m.t().contiguous()  # [atoms, B]
        table = torch.full((plan.size, x.shape[0]), float("-inf"), dtype=x.dtype, device=x.device)
        table[1] = 0.0  # TRUE: log 1
        for a, nodes, hi, lo in reversed(plan.on(x.device)):  # children (deeper variables) first
            t_hi = table.index_select(0, hi).add_(xt[a])
            t_lo = table.index_select(0, lo).add_(lt[a])
            table.index_copy_(0, nodes, torch.logaddexp(t_hi, t_lo))
        ctx.plan = plan
        ctx.save_for_backward(xt, lt, table)
        return table[list(plan.roots)].t().contiguous()

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: torch.Tensor):
        xt, lt, table = ctx.saved_tensors
        plan = ctx.plan
        adj = torch.zeros_like(table)
        for k, r in enumerate(plan.roots):
            adj[r] += grad[:, k]
        gx, gl = torch.zeros_like(xt), torch.zeros_like(lt)
        for a, nodes, hi, lo in plan.on(xt.device):  # parents (higher variables) first
            g = adj.index_select(0, nodes)
            value = table.index_select(0, nodes)
            # softmax weights of the two terms of each node's logaddexp; a −inf term weighs exactly 0
            w_hi = table.index_select(0, hi).add_(xt[a]).sub_(value).exp_().mul_(g)
            w_lo = table.index_select(0, lo).add_(lt[a]).sub_(value).exp_().mul_(g)
            adj.index_add_(0, hi, w_hi)
            adj.index_add_(0, lo, w_lo)
            gx[a] += w_hi.sum(0)
            gl[a] += w_lo.sum(0)
        return gx.t(), gl.t(), None


def obdd_sides(plan: LevelPlan, x: torch.Tensor, l1m: torch.Tensor) -> torch.Tensor:
    """``[B, len(roots)]``: ``log WMC`` of each root, from the atoms' ``log p`` (``x``) and ``log(1 − p)``."""
    return _Levels.apply(x, l1m, plan)
