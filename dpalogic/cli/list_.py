"""``dpalogic list``: the loss catalog, and the known losses outside the fragment.

(Named ``list_`` so that the module does not shadow the builtin where it is imported.)
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from dpalogic.cli.common import Subparsers, console, print_json
from dpalogic.cli.show import legend_text, outside_info, term_texts


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
    from dpalogic.semantics.catalog import entries

    def cell(text: str) -> str:
        return text.replace("|", "\\|")

    lines = [
        "| name | structure (✓/✗ canonical, readable) | terms | defaults | source | verified against |",
        "|---|---|---|---|---|---|",
    ]
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


def print_list(rows: list[dict[str, Any]]) -> None:
    from rich.table import Table

    c = console()
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


def run(args: argparse.Namespace) -> int:
    if args.markdown:
        sys.stdout.write(catalog_markdown())
        return 0
    rows = catalog_rows()
    print_json(rows) if args.json else print_list(rows)
    return 0


def register(subparsers: Subparsers) -> None:
    ls = subparsers.add_parser("list", help="the loss catalog")
    ls.add_argument("--json", action="store_true", help="print a JSON list (in_fragment marks the catalog's losses)")
    ls.add_argument("--markdown", action="store_true", help="print the catalog as the README's Markdown table")
    ls.set_defaults(run=run)
