"""The ``dpalogic`` command: one module per command, each with ``register(subparsers)``.

A command module adds its parser(s) to the subparsers and sets ``run=<function(args) -> int>``; :func:`main` parses,
calls ``args.run(args)`` and turns every user mistake into a readable message on stderr and exit status 2. Command
modules import their stage modules inside ``run``: symbolic commands never import torch, triton or transformers, and
registering every command (for ``--help`` and the choice of command) costs little.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from dpalogic.errors import DPALogicError

# the command modules under dpalogic.cli, in the order `dpalogic --help` lists their commands
COMMANDS: tuple[str, ...] = (
    "derive",
    "list_",
    "show",
    "compare",  # compare, meet, join
    "decompile",
    "lattice",
    "landscape",
    "explore",
    "compile",
    "train",
    "demo",
)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # argparse's own errors: same format, exit 2
        self.print_usage(sys.stderr)
        print(f"error: {message}", file=sys.stderr)
        raise SystemExit(2)


def build_parser() -> argparse.ArgumentParser:
    """The ``dpalogic`` parser with every command of :data:`COMMANDS` registered."""
    p = _Parser(prog="dpalogic", description="Preference losses as symbolic programs.")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)
    for name in COMMANDS:
        importlib.import_module(f"dpalogic.cli.{name}").register(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv = _protect_leading_minus(list(sys.argv[1:] if argv is None else argv))
    args = parser.parse_args(argv)
    try:
        if getattr(args, "json", False):
            # stdout carries the JSON alone: whatever a library prints while the command runs (DeepSpeed's
            # accelerator notice, which transformers triggers on import when DeepSpeed is installed) goes to stderr
            from contextlib import redirect_stdout

            from dpalogic.cli.common import JSON_STREAM

            JSON_STREAM.append(sys.stdout)
            try:
                with redirect_stdout(sys.stderr):
                    return int(args.run(args) or 0)
            finally:
                JSON_STREAM.pop()
        return int(args.run(args) or 0)
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


# options that take a value, per command whose positional may start with "-" (an equation such as "-log(p_w)")
_VALUE_OPTIONS = {
    "derive": {"--given", "--additive", "--link", "--hp"},
    "decompile": {"--python", "--arg", "--hp", "--library"},
}


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
