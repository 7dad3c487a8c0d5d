"""``dpalogic decompile EXPR|NAME``: a loss equation (or a catalog loss's own) back to its program of structures."""

from __future__ import annotations

import argparse
from typing import Any

from dpalogic.cli.common import Subparsers, console, print_json, report


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
    c.print(f"same program as: {', '.join(info['matches']) or '(no catalog loss for all hyperparameter values)'}")
    if info.get("matches_with"):
        c.print(f"equal under a substitution: {'; '.join(info['matches_with'])}")


def print_library(name: str, version: str, rows: list[dict[str, Any]]) -> None:
    from rich.markup import escape

    from dpalogic.analysis.library import row_summary

    c = console()
    c.print(f"[bold]{escape(name)} {escape(version)}[/bold]: every pairwise loss type, traced from its own code")
    for row in rows:
        structures, links, match = row_summary(row)
        c.print(f"[bold]{escape(row['loss_type'])}[/bold]")
        if "outside" not in row:
            c.print(f"  structure(s)  {escape(structures)}")
            c.print(f"  link(s)       {escape(links)}")
        c.print(f"  {escape(match) if 'outside' in row else 'catalog       ' + escape(match)}")


def run(args: argparse.Namespace) -> int:
    from dpalogic.errors import DPALogicError

    given = [x for x in (args.expr, args.python, args.library) if x is not None]
    if len(given) != 1:
        raise DPALogicError("decompile takes one of: an equation or catalog name, --python FILE.py:FUNCTION, --library")
    if (args.arg or args.hp) and args.python is None:
        raise DPALogicError("--arg and --hp go with --python FILE.py:FUNCTION")
    if args.library is not None:
        from dpalogic.analysis.library import library_rows, library_version

        rows = library_rows(args.library)
        version = library_version(args.library)
        if args.json:
            print_json({"library": args.library, "version": version, "rows": rows})
        else:
            print_library(args.library, version, rows)
        return 0
    if args.python is not None:
        from dpalogic.analysis.python_loss import decompile_python

        info = decompile_python(args.python, args.arg, args.hp)
    else:
        from dpalogic.analysis.decompile import decompile_spec

        info = decompile_spec(args.expr)
    return report(info, args.json, print_decompiled)


def register(subparsers: Subparsers) -> None:
    p = subparsers.add_parser("decompile", help="a loss equation (or catalog name) back to its structures")
    p.add_argument("expr", nargs="?", help='e.g. "-log(sigmoid(beta*((logp_w - ref_logp_w) - (logp_l - ref_logp_l))))"')
    p.add_argument(
        "--python",
        metavar="FILE.py:FUNCTION",
        help="trace a torch loss function (or Class.method) from your own file: the file is imported and the "
        "function called once on symbolic stand-ins; nothing else is run",
    )
    p.add_argument(
        "--arg",
        action="append",
        metavar="NAME=ROLE",
        help="map a parameter to logp_w|logp_l|ref_logp_w|ref_logp_l|len_w|len_l (TRL/Liger/OpenRLHF names map "
        "by themselves)",
    )
    p.add_argument("--hp", action="append", metavar="K=V", help="a hyperparameter's value (else it stays symbolic)")
    p.add_argument("--library", metavar="trl|liger", help="decompile every pairwise loss type of the installed library")
    p.add_argument("--json", action="store_true", help="print a JSON object")
    p.set_defaults(run=run)
