"""``dpalogic explore --between A B``: the structures strictly between two comparable losses."""

from __future__ import annotations

import argparse
from typing import Any

from dpalogic.cli.common import Subparsers, report


def _print_row(k: int, row: dict[str, Any]) -> None:
    names = ", ".join(row["catalog"])
    same = [x for x in row["same_loss_as"] if x not in row["catalog"]]
    tag = f"  [{names}]" if names else "  (new)"
    if same:
        tag += f"  same loss as {', '.join(same)}"
    if row.get("same_loss_as_listed"):
        tag += f"  same loss as #{row['same_loss_as_listed']}"
    size = f"   size {row['size']}" if row["size"] is not None else ""
    print(f"{k:>3}. {row['structure_unicode']}{tag}{size}")
    print(f"     ✓ {row['top_unicode']}    ✗ {row['bottom_unicode']}")
    if "rho" in row:
        print(f"     ρ = {row['rho']}")
        print(f"     loss = {row['loss']}")


def print_explore(info: dict[str, Any]) -> None:
    if info["swapped"]:
        print(f"(swapped: {info['stronger']} is the stronger of the two)")
    distinct = (
        f"{info['distinct_losses']} distinct loss functions"
        if info["distinct_losses"] is not None
        else "distinct loss functions not counted (too many to enumerate; listed ones are marked)"
    )
    print(
        f"{info['stronger']} is stronger than {info['weaker']}: {info['strictly_between']} structures lie strictly "
        f"between them over {', '.join(info['atoms'])} ({info['interval']} in the closed interval), {distinct}"
    )
    print(f"  {info['stronger']}: {info['stronger_structure_unicode']}")
    print(f"  {info['weaker']}: {info['weaker_structure_unicode']}")
    groups = ", ".join(" = ".join(g) for g in info["catalog_between_groups"])
    print(f"catalog losses strictly between: {groups or '(none)'}")
    for k, row in enumerate(info["listed"], 1):
        _print_row(k, row)
    shown = len(info["listed"])
    total = info["distinct_losses"] if info["distinct"] else info["strictly_between"]
    if total is None or shown < total:
        print(
            f"({shown} of {total if total is not None else 'many'} shown, in order of {info['order']}; --limit K for more)"
        )


def run(args: argparse.Namespace) -> int:
    from dpalogic.analysis.landscape import explore

    info = explore(args.between[0], args.between[1], args.atoms, args.limit, args.distinct)
    return report(info, args.json, print_explore)


def register(subparsers: Subparsers) -> None:
    e = subparsers.add_parser("explore", help="the structures strictly between two comparable losses")
    e.add_argument("--between", nargs=2, required=True, metavar=("A", "B"), help="two losses (names or structures)")
    e.add_argument("--atoms", nargs="+", metavar="ATOM", help="extra atoms to explore over, e.g. 'Ref(yw)'")
    e.add_argument("--limit", type=int, default=20, metavar="K", help="list at most K structures (default 20)")
    e.add_argument("--distinct", action="store_true", help="one structure per loss function (the smallest)")
    e.add_argument("--json", action="store_true", help="print a JSON object")
    e.set_defaults(run=run)
