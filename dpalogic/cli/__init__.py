"""The ``dpalogic`` command: ``derive``, ``list``, ``show``.

Symbolic commands never import torch, triton or transformers. Every user mistake ends with a readable message on
stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from typing import Any

import sympy

from dpalogic.errors import DPALogicError

# --------------------------------------------------------------------------------------------------- analysis


def parse_hp(items: list[str]) -> dict[str, float]:
    """``["margin=0.5", …]`` → ``{"margin": 0.5}``; a malformed item is a clear error."""
    out: dict[str, float] = {}
    for item in items or []:
        name, sep, value = item.partition("=")
        if not sep or not name.strip().isidentifier():
            raise DPALogicError(f"--hp takes NAME=VALUE, e.g. --hp margin=0.5; got {item!r}")
        try:
            v = float(value)
        except ValueError:
            raise DPALogicError(f"--hp {name.strip()} must be a number, got {value!r}") from None
        if v != v or v in (float("inf"), float("-inf")):
            raise DPALogicError(f"--hp {name.strip()} must be a finite number, got {value!r}")
        out[name.strip()] = v
    return out


def _structure_info(s) -> dict[str, Any]:
    from dpalogic.semantics.program import circuit_text, latex_names, rho_sympy, semantic_loss_sympy, side_circuit

    rho = rho_sympy(s)
    loss = semantic_loss_sympy(s)
    names = latex_names(s.atoms)
    return {
        **s.text_fields(),
        "atoms": [a.name for a in s.atoms],
        "rho": str(rho),
        "rho_latex": sympy.latex(rho, symbol_names=names),
        "loss": str(loss),
        "latex": sympy.latex(loss, symbol_names=names),
        "log_rho": circuit_text(side_circuit(s.top, s.n), s.atoms)
        + " - ("
        + circuit_text(side_circuit(s.bottom, s.n), s.atoms)
        + ")",
    }


def catalog_matches(s) -> tuple[list[str], list[str]]:
    """Catalog names whose (single) structure is equivalent to ``s``, and those with the same loss function."""
    from dpalogic.logic.structure import align
    from dpalogic.semantics.catalog import entries
    from dpalogic.semantics.program import same_ratio

    equivalent, same = [], []
    catalog_atoms = {a for e in entries().values() for t in e.program.terms for a in t.structure.atoms}
    if not set(s.atoms) <= catalog_atoms:  # an atom no catalog loss has (y3, …): nothing can match
        return equivalent, same
    for name, e in entries().items():
        other = e.program.structure
        if other is None:
            continue
        a, b = align(s, other)
        if a.top == b.top and a.bottom == b.bottom:
            equivalent.append(name)
        if same_ratio(s, other):
            same.append(name)
    return equivalent, same


def derive(
    text: str,
    given: str | None = None,
    additive: str | None = None,
    link: str | None = None,
    hyperparameters: dict[str, float] | None = None,
) -> dict[str, Any]:
    """Everything ``dpalogic derive`` reports about a structure, as a JSON-ready dict.

    With ``link`` (an expression in ``z``) the loss is ``f(log ρ)`` for that link instead of ``−log σ(log ρ)``; the
    link's parameters keep their names in the closed form and take their values from ``hyperparameters``.
    """
    from dpalogic.logic.structure import Structure
    from dpalogic.semantics.catalog import _alias_map, outside

    key = text.strip().lower().replace("-", "_")
    if key in _alias_map() or outside(key) is not None:  # a loss name is never a formula (atoms have parentheses)
        raise DPALogicError(
            f"{text.strip()!r} is a loss name, not a formula; try `dpalogic show {text.strip()}`"
            ' (derive takes a formula or structure, e.g. "M(yl) -> M(yw)")'
        )
    s = Structure.parse(text, given=given, additional=additive).check()
    info = _structure_info(s)
    info["equivalent_to"], info["same_loss_as"] = catalog_matches(s)
    info["input"] = text
    info["link_formula"] = "−log σ(z)"
    if link is not None:
        from dpalogic.semantics.program import latex_names, single_structure_program, with_link

        program = with_link(single_structure_program(s), link, hyperparameters)
        term = program.terms[0]
        closed = term.sympy().xreplace({sympy.Symbol("beta"): 1, sympy.Symbol("gamma"): 0})
        info["link"] = link
        info["link_formula"] = link_formula(term.link)
        info["loss"] = str(closed)
        info["latex"] = sympy.latex(closed, symbol_names=latex_names(s.atoms))
        info["hyperparameters"] = {k: v for k, v in program.defaults.items() if k not in ("beta", "gamma")}
    return info


def link_formula(name: str) -> str:
    from dpalogic.semantics.links import LINKS

    return LINKS[name].formula


def plural(n: int, noun: str, nouns: str | None = None) -> str:
    """``1 node``, ``2 nodes``."""
    return f"{n} {noun if n == 1 else nouns or noun + 's'}"


_SUBSCRIPT = str.maketrans("0123456789", "₀₁₂₃₄₅₆₇₈₉")


def rho_names(p) -> tuple[list[str], list[tuple[str, Any, str | None]]]:
    """Each term's name for its ratio, and what each name stands for: ``(name, structure, reciprocal_of)``.

    Terms of one structure all read ``ρ``, with no legend. Otherwise the structures are named ``ρ₁, ρ₂, …`` in order of
    first use: ``σ(−(β·log ρ)) + σ(−(β·log ρ))`` over two structures reads like a typo. A structure that is an earlier
    one reversed (label smoothing's companion term) is named as that one's reciprocal, ``ρ₂ = 1/ρ₁``.
    """
    distinct: list[Any] = []
    for t in p.terms:
        if t.structure not in distinct:
            distinct.append(t.structure)
    if len(distinct) == 1:
        return ["ρ"] * len(p.terms), []
    names = [f"ρ{k}".translate(_SUBSCRIPT) for k in range(1, len(distinct) + 1)]
    legend = []
    for k, s in enumerate(distinct):
        back = next((names[j] for j in range(k) if distinct[j] == s.reversed()), None)
        legend.append((names[k], s, back))
    return [names[distinct.index(t.structure)] for t in p.terms], legend


def term_texts(p) -> list[str]:
    """Each term of a program as text, its ratio named as :func:`rho_names` says."""
    names, _ = rho_names(p)
    return [t.text().replace("log ρ", f"log {n}") for t, n in zip(p.terms, names)]


def legend_text(p, code: str = "") -> list[str]:
    """``ρ₁: (M(yw), …)``, ``ρ₂ = 1/ρ₁``: what each ratio name of a program stands for (``code`` quotes structures)."""
    return [f"{n} = 1/{back}" if back else f"{n}: {code}{s.text('unicode')}{code}" for n, s, back in rho_names(p)[1]]


def outside_info(o) -> dict[str, Any]:
    """What ``show`` says about a known loss outside the fragment: it is known, and why it has no program."""
    return {
        "name": o.name,
        "aliases": list(o.aliases),
        "in_fragment": False,
        "reason": o.reason,
        "citation": o.citation,
    }


def show(name: str) -> dict[str, Any]:
    from dpalogic.semantics.catalog import lookup, outside
    from dpalogic.semantics.program import LINKS, latex_names, rho_sympy

    o = outside(name)
    if o is not None:  # a known loss: showing it is not an error, even though it has no program
        return outside_info(o)
    e = lookup(name)
    p = e.program
    terms = []
    for k, (t, text) in enumerate(zip(p.terms, term_texts(p)), 1):
        info = _structure_info(t.structure)
        info.update(
            index=k,
            role=t.role,
            link=t.link,
            link_formula=LINKS[t.link].formula,
            coef=str(t.coef),
            scale=str(t.scale),
            shift=str(t.shift),
            link_params={k2: str(v) for k2, v in t.link_params},
            normalized=t.normalized,
            term=text,
        )
        terms.append(info)
    rhos = [sympy.Symbol(f"rho_{k}") for k in range(1, len(p.terms) + 1)]
    program_expr = sympy.Add(*(t.sympy(rho=r) for t, r in zip(p.terms, rhos)))
    closed = p.sympy()
    names = latex_names(p.atoms)
    equivalent, same = catalog_matches(p.structure) if p.structure is not None else ([], [])
    return {
        "name": e.name,
        "aliases": list(e.aliases),
        "in_fragment": True,
        "title": e.title,
        "citation": e.citation,
        "trl_name": e.trl_name,
        "verified_by": e.verified_by,
        "hyperparameters": p.defaults,
        "program": " + ".join(f"[{t['term']}]" if len(p.terms) > 1 else t["term"] for t in terms),
        "ratios": legend_text(p),
        "program_sympy": str(program_expr),
        "structure": p.structure.text("ascii") if p.structure is not None else None,
        "rho": str(rho_sympy(p.structure)) if p.structure is not None else None,
        "rho_name": next((n for t, n in zip(p.terms, rho_names(p)[0]) if t.structure == p.structure), None),
        "loss": str(closed),
        "latex": sympy.latex(closed, symbol_names=names),
        "terms": terms,
        "equivalent_to": [n for n in equivalent if n != e.name],
        "same_loss_as": [n for n in same if n != e.name],
    }


def catalog_rows() -> list[dict[str, Any]]:
    """The catalog (``in_fragment: true``), then the known losses outside the fragment (``in_fragment: false``)."""
    from dpalogic.semantics.catalog import OUTSIDE, entries

    rows = []
    for name, e in entries().items():
        p = e.program
        s = p.structure
        rows.append(
            {
                "name": name,
                "in_fragment": True,
                "title": e.title,
                "structure": s.text("unicode") if s is not None else f"{len(p.structures)} structures",
                "links": sorted({t.link for t in p.preference_terms}),
                "terms": len(p.terms),
                "hyperparameters": p.defaults,
                "citation": e.citation,
                "verified_by": e.verified_by,
            }
        )
    return rows + [outside_info(o) for o in OUTSIDE.values()]


def catalog_markdown() -> str:
    """The README's catalog table (``dpalogic list --markdown``; a test checks that the README holds it)."""

    def cell(text: str) -> str:
        return text.replace("|", "\\|")

    lines = [
        "| name | structure (✓/✗ canonical, readable) | terms | defaults | source | verified against |",
        "|---|---|---|---|---|---|",
    ]
    from dpalogic.semantics.catalog import entries

    for name, e in entries().items():
        p = e.program
        aliases = f" ({', '.join(e.aliases)})" if e.aliases else ""
        legend = legend_text(p, code="`")
        structure = "<br>".join(legend) if legend else f"`{p.terms[0].structure.text('unicode')}`"
        terms = []
        for k, (t, text) in enumerate(zip(p.terms, term_texts(p))):
            text = f"[{text}]" if k and text.startswith("−") else text  # "a + −log σ(…)" reads like a typo too
            terms.append(text + (" *(per token)*" if t.normalized else ""))
        defaults = ", ".join(f"{k}={v:g}" for k, v in p.defaults.items())
        row = [f"`{name}`{aliases}", structure, " + ".join(terms), defaults, e.citation, e.verified_by]
        lines.append("| " + " | ".join(cell(c) for c in row) + " |")
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------------------- rendering


def _console():
    """A rich console that wraps only on a terminal: a file or pipe gets whole lines (LaTeX stays one piece), without
    the padding rich adds to fill the last column."""
    from rich.console import Console

    if sys.stdout.isatty():
        return Console(highlight=False, soft_wrap=True)

    class Unwrapped(Console):
        def print(self, *objects: Any, **kwargs: Any) -> None:
            with self.capture() as cap:
                super().print(*objects, **kwargs)
            sys.stdout.write("".join(line.rstrip() + "\n" for line in cap.get().splitlines()))

    return Unwrapped(highlight=False, soft_wrap=True, width=1_000_000)


def _print_derive(info: dict[str, Any]) -> None:
    from rich.table import Table

    c = _console()
    t = Table(show_header=False, box=None, pad_edge=False)
    t.add_column(style="bold cyan", no_wrap=True)
    t.add_column()
    t.add_row("structure", info["structure_unicode"])
    t.add_row("(P, P_C, P_A)", f"({info['core']}, {info['given']}, {info['additive']})")
    t.add_row("✓ (top)", info["top_unicode"])
    t.add_row("✗ (bottom)", info["bottom_unicode"])
    t.add_row("ρ", info["rho"])
    t.add_row("log ρ", info["log_rho"])
    link = info.get("link_formula", "−log σ(z)").replace("z", "log ρ")
    t.add_row("loss", f"{link} = {info['loss']}")
    t.add_row("LaTeX", info["latex"])
    t.add_row("equivalent to", ", ".join(info["equivalent_to"]) or "(no catalog loss)")
    t.add_row("same loss as", ", ".join(info["same_loss_as"]) or "(no catalog loss)")
    c.print(t)


def _print_show(info: dict[str, Any]) -> None:
    from rich.markup import escape
    from rich.table import Table

    c = _console()
    if not info["in_fragment"]:
        c.print(f"[bold]{info['name']}[/bold] — a known loss outside dpalogic's program fragment  ({info['citation']})")
        if info["aliases"]:
            c.print(f"aliases: {', '.join(info['aliases'])}")
        c.print(f"why: {escape(info['reason'])}")
        return
    c.print(f"[bold]{info['name']}[/bold] — {info['title']}  ({info['citation']})")
    if info["aliases"]:
        c.print(f"aliases: {', '.join(info['aliases'])}")
    hp = ", ".join(f"{k}={v:g}" for k, v in info["hyperparameters"].items()) or "(none)"
    c.print(f"hyperparameters: {hp}")
    c.print(f"program: {info['program']}")
    for line in info["ratios"]:
        c.print(f"  {line}")
    if info["structure"]:
        c.print(f"structure: {info['structure']}")
        c.print(f"{info['rho_name']} = {info['rho']}")
    t = Table(title="terms", show_lines=True)
    for col in ("k", "role", "term", "structure", "✓", "✗", "ρ", "weights"):
        t.add_column(col)
    for term in info["terms"]:
        t.add_row(
            str(term["index"]),
            term["role"],
            term["term"],
            term["structure_unicode"],
            term["top_unicode"],
            term["bottom_unicode"],
            term["rho"],
            "per token" if term["normalized"] else "sequence",
        )
    c.print(t)
    c.print(f"closed form: {info['loss']}")
    c.print(f"LaTeX: {info['latex']}")
    if info["equivalent_to"]:
        c.print(f"same structure as: {', '.join(info['equivalent_to'])}")
    if info["same_loss_as"]:
        c.print(f"same ρ as: {', '.join(info['same_loss_as'])}")
    c.print(f"verified against: {info['verified_by']}")


def _print_list(rows: list[dict[str, Any]]) -> None:
    from rich.table import Table

    c = _console()
    t = Table(title="dpalogic catalog")
    for col in ("name", "structure", "links", "hyperparameters", "source"):
        t.add_column(col)
    for r in rows:
        if r["in_fragment"]:
            hp = ", ".join(f"{k}={v:g}" for k, v in r["hyperparameters"].items())
            t.add_row(r["name"], r["structure"], ", ".join(r["links"]), hp, r["citation"])
    c.print(t)
    o = Table(title="known losses outside the fragment (`dpalogic show NAME` says why)")
    o.add_column("name")
    o.add_column("why")
    for r in rows:
        if not r["in_fragment"]:
            o.add_row(r["name"], r["reason"])
    c.print(o)


# --------------------------------------------------------------------------------------------------- entry point


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # argparse's own errors: same format, exit 2
        self.print_usage(sys.stderr)
        print(f"error: {message}", file=sys.stderr)
        raise SystemExit(2)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="dpalogic", description="Preference losses as symbolic programs.")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)
    d = sub.add_parser("derive", help="derive the loss of a formula or structure")
    d.add_argument("formula", help='a formula "M(yl) -> M(yw)" or a structure "(P, P_C, P_A)"')
    d.add_argument("--given", help="the conditioning P_C (default: true)")
    d.add_argument("--additive", help="the additional constraint P_A (default: false)")
    d.add_argument("--link", help="a link of your own: an expression in z = log ρ, e.g. 'softplus(margin - z)'")
    d.add_argument(
        "--hp", action="append", default=[], metavar="NAME=VALUE", help="a value for a parameter of --link (repeatable)"
    )
    d.add_argument("--json", action="store_true", help="print a JSON object")
    ls = sub.add_parser("list", help="the loss catalog")
    ls.add_argument("--json", action="store_true", help="print a JSON list (in_fragment marks the catalog's losses)")
    ls.add_argument("--markdown", action="store_true", help="print the catalog as the README's Markdown table")
    sh = sub.add_parser("show", help="one catalog loss in full")
    sh.add_argument("name", help="a catalog name, e.g. dpo (see `dpalogic list`)")
    sh.add_argument("--json", action="store_true", help="print a JSON object")
    cmp_ = sub.add_parser("compare", help="how two losses relate (names or structure text)")
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
    for op in ("meet", "join"):
        m = sub.add_parser(op, help=f"the {op} of two structures in the entailment lattice")
        m.add_argument("a", help="a catalog name or a structure/formula")
        m.add_argument("b", help="a catalog name or a structure/formula")
        m.add_argument("--json", action="store_true", help="print a JSON object")
    return p


def compare(a: str, b: str) -> dict[str, Any]:
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
    from dpalogic.analysis.order import join, meet
    from dpalogic.semantics.catalog import resolve

    pa, pb = resolve(a), resolve(b)
    if pa.structure is None or pb.structure is None:
        raise DPALogicError(f"{op} needs single-structure losses; {a if pa.structure is None else b} has several")
    s = (meet if op == "meet" else join)(pa.structure, pb.structure)
    s.check()
    info = _structure_info(s)
    info["equivalent_to"], info["same_loss_as"] = catalog_matches(s)
    return info


def _print_compare(info: dict[str, Any]) -> None:
    from rich.markup import escape

    from dpalogic.analysis.order import comparison_lines

    c = _console()
    first, *rest = comparison_lines(info)
    c.print(f"[bold]{escape(first)}[/bold]")
    for line in rest:
        c.print(escape(line))
    if "plot" in info:
        lo, hi = info["plot_margin_range"]
        c.print(f"wrote {info['plot']} (margins δ from {lo:.3g} to {hi:.3g}, log-probs around {info['plot_base']:.3g})")


# Commands that live beside their stage register themselves: each module has ``register(subparsers)`` which adds
# its parser(s) with ``set_defaults(run=fn)``, ``fn(args) -> int``. Modules must import heavy packages lazily.
COMMAND_MODULES: list[str] = [
    "dpalogic.analysis.decompile",
    "dpalogic.analysis.lattice",
    "dpalogic.analysis.landscape",
    "dpalogic.compile.codegen",
    "dpalogic.training.cli",
]


def _register_plugins(p: argparse.ArgumentParser) -> None:
    import importlib

    sub = next(a for a in p._actions if isinstance(a, argparse._SubParsersAction))
    for mod in COMMAND_MODULES:
        importlib.import_module(mod).register(sub)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    _register_plugins(parser)
    argv = _protect_leading_minus(list(sys.argv[1:] if argv is None else argv))
    args = parser.parse_args(argv)
    try:
        if getattr(args, "run", None) is not None:
            return int(args.run(args) or 0)
        if args.command == "derive":
            info = derive(args.formula, args.given, args.additive, args.link, parse_hp(args.hp))
            print(json.dumps(info, indent=2, ensure_ascii=False)) if args.json else _print_derive(info)
        elif args.command == "list":
            rows = catalog_rows()
            if args.markdown:
                sys.stdout.write(catalog_markdown())
            else:
                print(json.dumps(rows, indent=2, ensure_ascii=False)) if args.json else _print_list(rows)
        elif args.command == "show":
            info = show(args.name)
            print(json.dumps(info, indent=2, ensure_ascii=False)) if args.json else _print_show(info)
        elif args.command == "compare":
            info = compare(args.a, args.b)
            if args.plot:
                info.update(plot_compare(args.a, args.b, args.plot, base=args.base, log_y=args.log_y))
            print(json.dumps(info, indent=2, ensure_ascii=False)) if args.json else _print_compare(info)
        elif args.command in ("meet", "join"):
            info = lattice_op(args.command, args.a, args.b)
            print(json.dumps(info, indent=2, ensure_ascii=False)) if args.json else _print_derive(info)
    except DPALogicError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # `dpalogic list --json | head`: the reader left; not an error of ours
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except OSError as e:  # an output path that cannot be written (missing folder, a folder named like the file …)
        where = f": {e.filename}" if e.filename else ""
        print(f"error: cannot write{where}: {e.strerror or e}", file=sys.stderr)
        return 2
    return 0


# options that take a value, per command whose positional may start with "-" (an equation such as "-log(p_w)")
_VALUE_OPTIONS = {"derive": {"--given", "--additive"}, "decompile": set()}


def _protect_leading_minus(argv: list[str]) -> list[str]:
    """Move a positional that starts with '-' (``-log(p_w)``, ``-M(yw) | …``) behind ``--`` so argparse keeps it."""
    if not argv or argv[0] not in _VALUE_OPTIONS or "--" in argv:
        return argv
    takes_value = _VALUE_OPTIONS[argv[0]]
    out, moved, skip, glued = [argv[0]], [], False, set()
    for i, arg in enumerate(argv):
        if i == 0 or i in glued:
            continue
        if skip:
            out.append(arg)
            skip = False
        elif arg in takes_value:
            out.append(arg)
            skip = True
            if i + 1 < len(argv) and argv[i + 1].startswith("-"):  # --given "-M(yl)": glue the value on
                out[-1] = f"{arg}={argv[i + 1]}"
                skip = False
                glued.add(i + 1)
        elif arg.startswith("-") and arg not in ("-h", "--help", "--json") and not arg.startswith("--"):
            moved.append(arg)
        else:
            out.append(arg)
    return out + (["--", *moved] if moved else [])


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
