"""``dpalogic show NAME``: one catalog loss in full, or why a known loss is outside the fragment."""

from __future__ import annotations

import argparse
from typing import Any

from dpalogic.cli.common import Subparsers, console, report, structure_info

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
    from dpalogic.semantics.catalog import UNSTRUCTURED

    train_with = [n for n, why in UNSTRUCTURED.items() if why == o.name]
    return {
        "name": o.name,
        "aliases": list(o.aliases),
        "in_fragment": False,
        "reason": o.reason,
        "citation": o.citation,
        # trainable anyway, as plain torch with no structure (dpalogic.runtime.unstructured)
        "trainable": bool(train_with),
        "train_with": train_with,
    }


def _term_rows(p) -> list[dict[str, Any]]:
    from dpalogic.semantics.program import LINKS

    terms = []
    for k, (t, text) in enumerate(zip(p.terms, term_texts(p)), 1):
        info = structure_info(t.structure)
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
    return terms


def show(name: str) -> dict[str, Any]:
    """Everything ``dpalogic show`` reports about a catalog loss (or a known loss outside the fragment)."""
    import sympy

    from dpalogic.semantics.catalog import catalog_matches, lookup, outside
    from dpalogic.semantics.program import latex_names, rho_sympy

    o = outside(name)
    if o is not None:  # a known loss: showing it is not an error, even though it has no program
        return outside_info(o)
    e = lookup(name)
    p = e.program
    terms = _term_rows(p)
    rhos = [sympy.Symbol(f"rho_{k}") for k in range(1, len(p.terms) + 1)]
    program_expr = sympy.Add(*(t.sympy(rho=r) for t, r in zip(p.terms, rhos)))
    closed = p.sympy()
    names = latex_names(p.atoms, closed)
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


def _print_outside(info: dict[str, Any]) -> None:
    from rich.markup import escape

    c = console()
    c.print(f"[bold]{info['name']}[/bold] — a known loss outside dpalogic's program fragment  ({info['citation']})")
    if info["aliases"]:
        c.print(f"aliases: {', '.join(info['aliases'])}")
    c.print(f"why: {escape(info['reason'])}")
    if info["trainable"]:
        names = " | ".join(info["train_with"])
        c.print(f"trainable without a structure (plain torch, no ρ or circuit): dpalogic train --loss {names}")


def print_show(info: dict[str, Any]) -> None:
    from rich.table import Table

    if not info["in_fragment"]:
        return _print_outside(info)
    c = console()
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


def run(args: argparse.Namespace) -> int:
    info = show(args.name)
    return report(info, args.json, print_show)


def register(subparsers: Subparsers) -> None:
    sh = subparsers.add_parser("show", help="one catalog loss in full")
    sh.add_argument("name", help="a catalog name, e.g. dpo (see `dpalogic list`)")
    sh.add_argument("--json", action="store_true", help="print a JSON object")
    sh.set_defaults(run=run)
