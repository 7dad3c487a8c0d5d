"""``dpalogic lattice [SPEC …]``: the Hasse diagram of losses ordered by strength, printed or exported."""

from __future__ import annotations

import argparse

from dpalogic.cli.common import Subparsers, print_json


def run(args: argparse.Namespace) -> int:
    from dpalogic.analysis.lattice import build_lattice, export, plural, text_summary, to_json

    g = build_lattice(args.specs or None)
    if args.out:
        export(g, args.out)
    if args.json:
        print_json(to_json(g))
    else:
        print(text_summary(g))
        if args.out:
            print(
                f"wrote {args.out} ({plural(g.number_of_nodes(), 'node')}, {plural(g.number_of_edges(), 'Hasse edge')})"
            )
    return 0


def register(subparsers: Subparsers) -> None:
    from dpalogic.analysis.lattice import EXTENSIONS

    p = subparsers.add_parser("lattice", help="the Hasse diagram of losses ordered by strength")
    p.add_argument("specs", nargs="*", metavar="SPEC", help="loss names or structures (default: the whole catalog)")
    p.add_argument("--out", metavar="FILE", help=f"write the lattice; format by extension: {', '.join(EXTENSIONS)}")
    p.add_argument("--json", action="store_true", help="print nodes and [stronger, weaker] edges as JSON")
    p.set_defaults(run=run)
