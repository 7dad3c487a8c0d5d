"""``dpalogic compile SPEC|--catalog``: generate a loss's module (a fused Triton kernel and its torch twin)."""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

from dpalogic.cli.common import Subparsers, parse_hp
from dpalogic.errors import DPALogicError


def _check(expected: dict[Path, str]) -> int:
    """``--check``: compare what would be written with the files; 0 when all are identical, 1 otherwise."""
    stale = []
    for path, source in expected.items():
        if not path.is_file():
            stale.append(f"missing  {path}")
        elif path.read_text(encoding="utf-8") != source:
            stale.append(f"stale    {path}")
    for line in stale:
        print(line)
    if stale:
        print(f"{len(stale)} of {len(expected)} generated module(s) differ: rerun the command without --check")
        return 1
    print(f"{len(expected)} generated module(s) up to date")
    return 0


def _run_catalog(args: argparse.Namespace) -> int:
    from dpalogic.compile.codegen import compile_catalog_entry, write_catalog
    from dpalogic.semantics.catalog import entries

    if args.spec is not None or args.out is not None or args.name is not None:
        raise DPALogicError("--catalog compiles every catalog loss: give no SPEC, --name or --out (use --out-dir)")
    out_dir = Path(args.out_dir)
    if args.check:
        return _check({out_dir / f"{n}.py": compile_catalog_entry(n).source for n in sorted(entries())})
    for p in write_catalog(out_dir, overwrite=args.overwrite):
        print(p)
    return 0


def _command_line(args: argparse.Namespace) -> str:
    """The command that regenerates the module, for its header."""
    command = f"dpalogic compile {shlex.quote(args.spec)}"
    command += f" --name {shlex.quote(args.name)}" if args.name else ""
    command += f" --link {shlex.quote(args.link)}" if args.link else ""
    command += "".join(f" --hp {shlex.quote(h)}" for h in args.hp)
    command += f" --out {shlex.quote(args.out)}" if args.out else ""
    return command


def run(args: argparse.Namespace) -> int:
    from dpalogic.compile.codegen import compile_spec, refuse_to_clobber

    if args.catalog:
        return _run_catalog(args)
    if args.spec is None:
        raise DPALogicError("give a loss name or structure to compile, or --catalog")
    if args.check and args.out is None:
        raise DPALogicError("--check compares with a file: give --out FILE (or --catalog)")
    compiled = compile_spec(args.spec, args.name, _command_line(args), args.link, parse_hp(args.hp))
    if args.check:
        return _check({Path(args.out): compiled.source})
    if args.out is None:
        sys.stdout.write(compiled.source)
        return 0
    out = Path(args.out)
    if out.parent and not out.parent.exists():
        raise DPALogicError(f"the folder {str(out.parent)!r} does not exist")
    refuse_to_clobber(out, args.overwrite)
    out.write_text(compiled.source, encoding="utf-8")
    print(out)
    return 0


def register(subparsers: Subparsers) -> None:
    p = subparsers.add_parser(
        "compile",
        help="generate a fused Triton kernel + torch twin module for a loss",
        description="Generate Python with a fused forward+backward Triton kernel and a torch twin for a loss.",
    )
    p.add_argument("spec", nargs="?", help='a catalog name ("dpo") or structure text "(M(yl) -> M(yw), M(yw) | M(yl))"')
    p.add_argument("--name", help="module/kernel name for a derived structure (a Python identifier)")
    p.add_argument("--link", help="a link of your own for the preference terms: an expression in z, e.g. 'exp(-z)'")
    p.add_argument(
        "--hp", action="append", default=[], metavar="NAME=VALUE", help="a hyperparameter's default (repeatable)"
    )
    p.add_argument("--out", help="write the module here (default: print it)")
    p.add_argument("--catalog", action="store_true", help="write OUT_DIR/<name>.py for every catalog loss")
    p.add_argument("--out-dir", default="generated", help="folder for --catalog (default: ./generated)")
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an existing file that dpalogic did not generate (generated modules are always regenerated)",
    )
    p.add_argument(
        "--check",
        action="store_true",
        help="write nothing; exit 1 if the files (--out, or --catalog's) differ from what would be generated",
    )
    p.set_defaults(run=run)
