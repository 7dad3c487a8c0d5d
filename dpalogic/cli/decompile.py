"""``dpalogic decompile EXPR|NAME``: a loss equation (or a catalog loss's own) back to its program of structures."""

from __future__ import annotations

import argparse
from typing import Any

from dpalogic.cli.common import Subparsers, console, print_json


def print_decompiled(info: dict[str, Any]) -> None:
    c = console()
    c.print(f"[bold]{info.get('name', info['equation'])}[/bold]")
    for k, term in enumerate(info["terms"], 1):
        params = "".join(f", {a}={b}" for a, b in term["link_params"].items())
        weights = "per-token (length-normalized)" if term["normalized"] else "sequence"
        coef = term["coef"] if term["coef"].replace("_", "").replace(".", "").isalnum() else f"({term['coef']})"
        c.print(f"term {k}: {coef} · {term['link']}{params} of z = {term['beta']}·log ρ − ({term['gamma']})")
        c.print(f"  structure   {term['structure']}")
        c.print(f"  ✓ / ✗       {term['top']}  /  {term['bottom']}")
        c.print(f"  ρ           {term['rho']}   ({weights} weights)")
        c.print(f"  same structure as: {', '.join(term['same_structure_as']) or '(no catalog loss)'}")
    if info["constant"] != "0":
        c.print(f"constant (does not depend on the model): {info['constant']}")
    c.print(f"same program as: {', '.join(info['matches']) or '(no catalog loss)'}")


def run(args: argparse.Namespace) -> int:
    from dpalogic.analysis.decompile import decompile_spec

    info = decompile_spec(args.expr)
    print_json(info) if args.json else print_decompiled(info)
    return 0


def register(subparsers: Subparsers) -> None:
    p = subparsers.add_parser("decompile", help="a loss equation (or catalog name) back to its structures")
    p.add_argument("expr", help='e.g. "-log(sigmoid(beta*((logp_w - ref_logp_w) - (logp_l - ref_logp_l))))"')
    p.add_argument("--json", action="store_true", help="print a JSON object")
    p.set_defaults(run=run)
