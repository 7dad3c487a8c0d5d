"""``dpalogic compare A B`` (how two losses relate, optionally drawn) and ``meet``/``join`` (the lattice operations)."""

from __future__ import annotations

import argparse
import math
from typing import Any

from dpalogic.cli.common import Subparsers, console, report, structure_info
from dpalogic.cli.derive import print_structure
from dpalogic.errors import DPALogicError


def compare(a: str, b: str) -> dict[str, Any]:
    """How two losses (catalog names or structure text) relate, as a JSON-ready dict."""
    from dpalogic.analysis.order import compare as _compare
    from dpalogic.semantics.catalog import resolve

    return _compare(resolve(a), resolve(b), a, b).as_dict()


def _slice(spec: str, base: float, delta):
    """One loss and d(loss)/dδ on the slice ``log p_w = b + δ/2, log p_l = b − δ/2`` (references at b), as arrays."""
    import torch

    from dpalogic.runtime.preference_loss import PreferenceLoss
    from dpalogic.semantics.catalog import resolve

    d = torch.as_tensor(delta, dtype=torch.float64).clone().requires_grad_(True)
    bb = torch.full_like(d, base)
    ones = torch.ones_like(d)  # lengths 1: normalized and summed weights coincide
    y = PreferenceLoss(resolve(spec), reduction="none")(
        bb + d / 2, bb - d / 2, bb, bb, chosen_lengths=ones, rejected_lengths=ones
    )
    (g,) = torch.autograd.grad(y.sum(), d)
    return y.detach().numpy(), g.numpy()


def _landmarks(delta, g) -> list[float]:
    """Margins where something happens to one loss, read off its gradient g on a fine grid over ``delta``.

    * a kink: one grid step carries over a quarter of the gradient's whole variation (hinge at β·δ = m);
    * a minimum: the gradient reaches 0 from below (IPO's target, EXO's optimum, where hinge goes flat);
    * a saturating gradient (almost no variation in the outer tenths of the grid, as for the logistic and sigmoid
      links): the margins where 5 % and 95 % of its variation is done, i.e. the bend between the two flat parts.
    A gradient that keeps changing to the edges (IPO's) has no bend to show; a constant one (CE) has nothing.
    """
    import numpy as np

    dg = np.abs(np.diff(g))
    total = dg.sum()
    if not np.isfinite(total) or total <= 1e-9 * (1 + np.abs(g).max()):  # rounding, not a shape
        return []
    mid = (delta[:-1] + delta[1:]) / 2
    points = list(mid[dg > 0.25 * total])
    points += list(mid[(g[:-1] < 0) & (g[1:] >= 0)])
    done = np.concatenate([[0.0], np.cumsum(dg)]) / total
    tenth = len(delta) // 10
    if done[tenth] < 0.02 and done[-1 - tenth] > 0.98:
        points += [delta[np.searchsorted(done, 0.05)], delta[np.searchsorted(done, 0.95)]]
    return [float(x) for x in points]


PROBE_HALF_WIDTH = 100.0  # margins searched for landmarks when --base is not given: β·δ up to ±10 at β = 0.1


def plot_range(a: str, b: str, base: float | None = None) -> tuple[float, float, float]:
    """The margin range ``(lo, hi)`` to draw, and the base log-prob to draw it at.

    The range spans the landmarks of both losses (:func:`_landmarks`) and δ = 0 (policy and reference agree), plus a
    quarter of that span (at least 2) on each side, so kinks and minima sit inside the picture, not at its edge. With
    no ``base``, landmarks are searched for |δ| ≤ 100 at b = −100 (no log-prob comes near 0, where ORPO's and CE's
    curves bend whatever the margin) and the picture is drawn at the b that holds the range with log-probs ≤ −1 (they
    must stay ≤ 0, so |δ| ≤ −2b); with a ``base``, both stay within |δ| ≤ −2b.
    """
    import numpy as np

    if base is not None and base >= 0:
        raise DPALogicError("--base must be negative (a log-probability)")
    half = PROBE_HALF_WIDTH if base is None else -2 * base
    probe = -half if base is None else base
    delta = np.linspace(-half, half, 4001)
    points = [0.0]
    for spec in (a, b):
        points += _landmarks(delta, _slice(spec, probe, delta)[1])
    lo, hi = min(points), max(points)
    pad = max(0.25 * (hi - lo), 2.0)
    lo, hi = max(lo - pad, -half), min(hi + pad, half)
    if base is None:
        base = -float(math.ceil(max(-lo, hi) / 2 + 1))  # a round number, for the title
    return lo, hi, base


def compare_figure(a: str, b: str, base: float | None = None, log_y: bool = False):
    """Both losses and their gradients against the margin δ, over :func:`plot_range`; returns the matplotlib Figure.

    On the slice, DPO's and CPO's log-ratio is exactly δ; losses that see absolute probabilities (ORPO, CE, …) depend
    on the base b too. ``log_y`` draws both panels on a symmetric log scale (linear within ±1e-3, so a loss that is 0,
    like hinge past its margin, stays visible): next to IPO's quadratic, DPO's loss is otherwise a flat line.
    """
    import numpy as np
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    lo, hi, base = plot_range(a, b, base)
    delta = np.linspace(lo, hi, 801)
    fig = Figure(figsize=(11, 4))
    FigureCanvasAgg(fig)
    ax1, ax2 = fig.subplots(1, 2)
    ranges = {ax1: [], ax2: []}
    for spec in (a, b):
        y, g = _slice(spec, base, delta)
        ax1.plot(delta, y, label=spec)
        ax2.plot(delta, g, label=spec)
        ranges[ax1] += [y.min(), y.max()]
        ranges[ax2] += [g.min(), g.max()]
    ax1.set(xlabel="margin δ = log πθ(yw) − log πθ(yl)", ylabel="loss", title=f"loss (log-probs around {base:g})")
    ax2.set(xlabel="margin δ", ylabel="d loss / d δ", title="gradient")
    for ax in (ax1, ax2):
        ax.set_xlim(lo, hi)
        if log_y:
            ax.set_yscale("symlog", linthresh=1e-3)
            if min(ranges[ax]) >= 0:  # no decades of negative values that no curve reaches
                ax.set_ylim(bottom=0)
            if max(ranges[ax]) <= 0:
                ax.set_ylim(top=0)
        ax.axhline(0, color="grey", lw=0.5)
        ax.legend()
    fig.tight_layout()
    fig.dpalogic_range = (lo, hi, base)  # what the CLI reports
    return fig


def plot_compare(a: str, b: str, path: str, base: float | None = None, log_y: bool = False) -> dict[str, Any]:
    """Draw :func:`compare_figure` to ``path`` (.png, .svg or .pdf); returns where, and the range drawn."""
    if not path.lower().endswith((".png", ".svg", ".pdf")):
        raise DPALogicError(f"--plot writes .png, .svg or .pdf, not {path!r}")
    fig = compare_figure(a, b, base, log_y)
    fig.savefig(path, dpi=120)
    lo, hi, base = fig.dpalogic_range
    return {
        "plot": path,
        "plot_margin_range": [lo, hi],
        "plot_base": base,
        "plot_yscale": "symlog" if log_y else "linear",
    }


def lattice_op(op: str, a: str, b: str) -> dict[str, Any]:
    """The meet or join (``op``) of two single-structure losses, reported like ``derive``."""
    from dpalogic.analysis.order import join, meet
    from dpalogic.semantics.catalog import catalog_matches, resolve

    pa, pb = resolve(a), resolve(b)
    if pa.structure is None or pb.structure is None:
        raise DPALogicError(f"{op} needs single-structure losses; {a if pa.structure is None else b} has several")
    s = (meet if op == "meet" else join)(pa.structure, pb.structure)
    s.check()
    from dpalogic.logic.listwise import ListStructure

    if isinstance(s, ListStructure):  # beyond truth tables (docs/semantics.md §8): derive's report of such structures
        from dpalogic.semantics.listwise_form import list_structure_info

        info = list_structure_info(s)
        info["equivalent_to"], info["same_loss_as"] = [], []  # no catalog loss has more than 12 atoms
        return info
    info = structure_info(s)
    info["equivalent_to"], info["same_loss_as"] = catalog_matches(s)
    return info


def print_compare(info: dict[str, Any]) -> None:
    from rich.markup import escape

    from dpalogic.analysis.order import comparison_lines

    c = console()
    first, *rest = comparison_lines(info)
    c.print(f"[bold]{escape(first)}[/bold]")
    for line in rest:
        c.print(escape(line))
    if "plot" in info:
        lo, hi = info["plot_margin_range"]
        c.print(f"wrote {info['plot']} (margins δ from {lo:.3g} to {hi:.3g}, log-probs around {info['plot_base']:.3g})")


def run_compare(args: argparse.Namespace) -> int:
    info = compare(args.a, args.b)
    if args.plot:
        info.update(plot_compare(args.a, args.b, args.plot, base=args.base, log_y=args.log_y))
    return report(info, args.json, print_compare)


def run_lattice_op(args: argparse.Namespace) -> int:
    info = lattice_op(args.command, args.a, args.b)
    return report(info, args.json, print_structure)


def register(subparsers: Subparsers) -> None:
    cmp_ = subparsers.add_parser("compare", help="how two losses relate (names or structure text)")
    cmp_.add_argument("a", help="a catalog name or a structure/formula")
    cmp_.add_argument("b", help="a catalog name or a structure/formula")
    cmp_.add_argument("--json", action="store_true", help="print a JSON object")
    cmp_.add_argument("--plot", metavar="FILE.png", help="draw both losses and their gradients against the margin")
    cmp_.add_argument(
        "--base",
        type=float,
        help="log-prob around which the plot's slice is taken (default: the one that holds the margins drawn)",
    )
    cmp_.add_argument("--log-y", action="store_true", help="draw the plot's y axes on a (symmetric) log scale")
    cmp_.set_defaults(run=run_compare)
    for op in ("meet", "join"):
        m = subparsers.add_parser(op, help=f"the {op} of two structures in the entailment lattice")
        m.add_argument("a", help="a catalog name or a structure/formula")
        m.add_argument("b", help="a catalog name or a structure/formula")
        m.add_argument("--json", action="store_true", help="print a JSON object")
        m.set_defaults(run=run_lattice_op)
