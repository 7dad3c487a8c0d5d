"""``dpalogic landscape --atoms N``: how many structures and distinct loss functions there are over N atoms."""

from __future__ import annotations

import argparse
from typing import Any

from dpalogic.cli.common import Subparsers, report
from dpalogic.errors import DPALogicError


def print_landscape(info: dict[str, Any]) -> None:
    n = info["atoms"]
    print(f"atoms          {n} ({', '.join(info['atom_names'])}; the counts do not depend on the names)")
    print(f"worlds         2^{n} = {info['worlds']}")
    print(f"structures     4^(2^{n}) = {info['structures']}  (each world: on ✓, on ✗, both or neither)")
    print(f"non-degenerate {info['non_degenerate_structures']}  (✓ and ✗ both satisfiable)")
    print(f"loss functions {info['loss_functions']} distinct non-degenerate (ρ1 ≡ ρ2 as rational functions)")
    print("degenerate     " + "; ".join(f"{d['kind']}: {d['structures']} ({d['loss']})" for d in info["degenerate"]))
    sizes = ", ".join(f"{v}×{k}" for k, v in info["class_sizes"].items())
    print(f"class sizes    {sizes}  (loss functions × structures each)")
    support = ", ".join(f"{k}: {v}" for k, v in info["loss_functions_by_support"].items())
    print(f"by support     {support}  (atoms a loss function depends on: how many loss functions)")
    for row in info["largest_classes"]:
        shown = row["members"][:6]
        more = f", … ({row['structures']} in all)" if row["structures"] > len(shown) else ""
        print(f"same loss      {' = '.join(shown)}{more}")


def run(args: argparse.Namespace) -> int:
    from dpalogic.analysis.landscape import landscape, landscape_atoms

    n = args.atoms
    if args.examples < 0:
        raise DPALogicError(f"--examples must be ≥ 0, got {args.examples}")
    info = landscape(n, examples=args.examples).as_dict(landscape_atoms(n))
    return report(info, args.json, print_landscape)


def register(subparsers: Subparsers) -> None:
    from dpalogic.analysis.landscape import MAX_ATOMS

    p = subparsers.add_parser("landscape", help="how many structures and distinct loss functions over N atoms")
    p.add_argument("--atoms", type=int, required=True, metavar="N", help=f"number of atoms (1–{MAX_ATOMS})")
    p.add_argument("--examples", type=int, default=3, metavar="K", help="show the K largest same-loss classes")
    p.add_argument("--json", action="store_true", help="print a JSON object")
    p.set_defaults(run=run)
