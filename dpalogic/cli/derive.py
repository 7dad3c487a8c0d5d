"""``dpalogic derive FORMULA``: the loss of a formula or structure."""

from __future__ import annotations

import argparse
from typing import Any

from dpalogic.cli.common import Subparsers, console, parse_hp, report, structure_info
from dpalogic.errors import DPALogicError


def derive(
    text: str,
    given: str | None = None,
    additive: str | None = None,
    link: str | None = None,
    hyperparameters: dict[str, float] | None = None,
) -> dict[str, Any]:
    """Everything ``dpalogic derive`` reports about a structure, as a JSON-ready dict.

    With ``link`` (an expression in ``z``) the loss is ``f(log ρ)`` for that link instead of ``−log σ(log ρ)``; the
    link's parameters keep their names in the closed form and take their values from ``hyperparameters``.
    """
    from dpalogic.logic.listwise import ListStructure, parse_any
    from dpalogic.logic.structure import has_construct
    from dpalogic.semantics.catalog import _alias_map, catalog_matches, outside

    if hyperparameters and link is None:
        raise DPALogicError(
            "--hp gives values to the parameters of a --link; without one the loss is −log σ(log ρ), which has none "
            "(β and γ, the scale and shift of log ρ, enter its closed form as 1 and 0)"
        )
    key = text.strip().lower().replace("-", "_")
    if key in _alias_map() or outside(key) is not None:  # a loss name is never a formula (atoms have parentheses)
        raise DPALogicError(
            f"{text.strip()!r} is a loss name, not a formula; try `dpalogic show {text.strip()}`"
            ' (derive takes a formula or structure, e.g. "M(yl) -> M(yw)")'
        )
    s = parse_any(text, given=given, additional=additive).check()
    if isinstance(s, ListStructure):  # beyond truth tables: lifted closed forms, OBDD sizes (docs/semantics.md §8)
        from dpalogic.semantics.listwise_form import list_structure_info

        info = list_structure_info(s)
        info["equivalent_to"], info["same_loss_as"] = [], []
        info["input"] = text
        info["link_formula"] = "−log σ(z)"
        if link is not None:
            info.update(_with_link(s, link, hyperparameters))
        return info
    info = structure_info(s)
    if s.source is not None and any(has_construct(e) for e in s.source):
        # written with ExactlyOne/AtMost/… over a few answers: the lifted closed form reads as the formula was written
        # (the truth table's expanded polynomial grows with 2^n); how it compiles is reported too, as for larger K
        from dpalogic.logic.listwise import as_list_structure
        from dpalogic.semantics.listwise_form import list_structure_info

        lifted = list_structure_info(as_list_structure(s))
        if lifted["method"] == "lifted":
            info.update({k: lifted[k] for k in ("rho", "rho_latex", "log_rho", "loss", "latex", "legend", "groups")})
        info.update({k: lifted[k] for k in ("atom_count", "worlds", "obdd_nodes", "circuit_nodes", "method")})
    info["equivalent_to"], info["same_loss_as"] = catalog_matches(s)
    info["input"] = text
    info["link_formula"] = "−log σ(z)"
    if link is not None:
        info.update(_with_link(s, link, hyperparameters))
    return info


def _with_link(s, link: str, hyperparameters: dict[str, float] | None) -> dict[str, Any]:
    """What ``--link`` changes in derive's report: the link, the closed form, and the link's parameters."""
    import sympy

    from dpalogic.semantics.links import LINKS
    from dpalogic.semantics.program import latex_names, single_structure_program, with_link

    fixed = sorted({"beta", "gamma"} & set(hyperparameters or {}))
    if fixed:
        raise DPALogicError(
            f"derive's closed form is in log ρ itself (β = 1, γ = 0): --hp {', '.join(fixed)} has no place in it; "
            "--hp takes the link's own parameters"
        )
    program = with_link(single_structure_program(s), link, hyperparameters)
    program.bind(**(hyperparameters or {}))  # every name one of the link's: a misspelling is refused
    term = program.terms[0]
    try:
        closed = term.sympy()
    except DPALogicError:  # OBDD sides without a lifted closed form: the link of log ρ, with ρ left a symbol
        closed = term.sympy(sympy.Symbol("rho", positive=True))
    closed = closed.xreplace({sympy.Symbol("beta"): 1, sympy.Symbol("gamma"): 0})
    return {
        "link": link,
        "link_formula": LINKS[term.link].formula,
        "loss": str(closed),
        "latex": sympy.latex(closed, symbol_names=latex_names(s.atoms, closed)),
        "hyperparameters": {k: v for k, v in program.defaults.items() if k not in ("beta", "gamma")},
        # the catalog's losses take the logistic link (or their own): with this one none has the same loss function;
        # "equivalent to" (the same structure, so the same ρ) still holds
        "same_loss_as": [],
    }


def print_structure(info: dict[str, Any]) -> None:
    """A structure's report as a two-column table (``derive``, ``meet``, ``join``)."""
    from rich.table import Table

    t = Table(show_header=False, box=None, pad_edge=False)
    t.add_column(style="bold cyan", no_wrap=True)
    t.add_column()
    t.add_row("structure", info["structure_unicode"])
    t.add_row("(P, P_C, P_A)", f"({info['core']}, {info['given']}, {info['additive']})")
    t.add_row("✓ (top)", info["top_unicode"])
    t.add_row("✗ (bottom)", info["bottom_unicode"])
    t.add_row("ρ", info["rho"])
    t.add_row("log ρ", info["log_rho"])
    link = info.get("link_formula", "−log σ(z)").replace("z", "log ρ")
    t.add_row("loss", f"{link} = {info['loss']}")
    t.add_row("LaTeX", info["latex"])
    if "circuit_nodes" in info:  # a structure over many answers: how it compiles
        t.add_row("where", info.get("legend", "no lifted form: the sides are evaluated as OBDD circuits"))
        obdd = info["obdd_nodes"]
        t.add_row(
            "compiled",
            f"{info['method']}; OBDD ✓ {obdd['top']} + ✗ {obdd['bottom']} nodes, circuit {info['circuit_nodes']} nodes "
            f"(vs {info['worlds']} worlds)",
        )
    t.add_row("equivalent to", ", ".join(info["equivalent_to"]) or "(no catalog loss)")
    t.add_row("same loss as", ", ".join(info["same_loss_as"]) or "(no catalog loss)")
    console().print(t)


def run(args: argparse.Namespace) -> int:
    info = derive(args.formula, args.given, args.additive, args.link, parse_hp(args.hp))
    return report(info, args.json, print_structure)


def register(subparsers: Subparsers) -> None:
    d = subparsers.add_parser("derive", help="derive the loss of a formula or structure")
    d.add_argument("formula", help='a formula "M(yl) -> M(yw)" or a structure "(P, P_C, P_A)"')
    d.add_argument("--given", help="the conditioning P_C (default: true)")
    d.add_argument("--additive", help="the additional constraint P_A (default: false)")
    d.add_argument("--link", help="a link of your own: an expression in z = log ρ, e.g. 'softplus(margin - z)'")
    d.add_argument(
        "--hp", action="append", default=[], metavar="NAME=VALUE", help="a value for a parameter of --link (repeatable)"
    )
    d.add_argument("--json", action="store_true", help="print a JSON object")
    d.set_defaults(run=run)
