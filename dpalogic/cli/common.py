"""What several commands share: ``--hp`` values, JSON and rich output, a structure's report."""

from __future__ import annotations

import json
import sys
from typing import Any

from dpalogic.errors import DPALogicError

# what ``ArgumentParser.add_subparsers()`` returns: each command's ``register`` adds its parser to it (argparse's class
# for it is private, so it is not named here)
Subparsers = Any


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


JSON_STREAM: list = []  # where --json output goes while the command runs with stdout sent to stderr (cli.main)


def print_json(info: Any) -> None:
    print(json.dumps(info, indent=2, ensure_ascii=False), file=JSON_STREAM[-1] if JSON_STREAM else sys.stdout)


def report(info: Any, as_json: bool, printer) -> int:
    """Every command's ending: the result as JSON (``--json``) or through its printer; exit status 0."""
    print_json(info) if as_json else printer(info)
    return 0


def console():
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


def structure_info(s) -> dict[str, Any]:
    """A structure's sides, ratio and loss (text and LaTeX)."""
    import sympy

    from dpalogic.semantics.program import circuit_text, latex_names, rho_sympy, semantic_loss_sympy, structure_circuits

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
        "log_rho": " - (".join(circuit_text(c, s.atoms) for c in structure_circuits(s)) + ")",
    }
