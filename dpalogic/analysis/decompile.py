"""Decompilation: from a loss equation back to its program of structures (docs/semantics.md §4).

A loss written in SymPy syntax is split into terms ``c · f(z)``; each link ``f`` is recognised by its shape
(``log(1 + e^u)`` logistic, ``max(0, ·)`` hinge, ``(·)²`` squared, ``1/(1 + e^u)`` sigmoid, ``e^u`` exponential,
and a bare ``log X`` as a likelihood term), and ``z = β·log ρ − γ`` is read off as a sum of logarithms. ``ρ = N/D``
is reduced to lowest terms and ✓, ✗ are rebuilt from the corner values of ``N`` and ``D``: a polynomial is the WMC
of a formula exactly when it is multilinear and its corner values are 0 or 1. Anything else is reported with the
factor and the corner value that put it outside the fragment.

Variables: ``logp_w, logp_l`` (or ``p_w, p_l``), ``ref_logp_w, ref_logp_l`` (or ``ref_p_w, ref_p_l``), lengths
``len_w, len_l`` for length normalization, any other name is a hyperparameter. Functions: those of
:data:`FUNCTIONS` (``log, exp, log1p, expm1, sigmoid, logsigmoid, softplus, log1mexp, relu, max, min, abs, sqrt,
tanh, clamp``), optionally written ``torch.``/``F.``/``math.``-prefixed. The text is read by Python's parser and a
whitelist walk, never evaluated.

The pieces: :mod:`~dpalogic.analysis.ratio` (z → β, γ, ρ → structure), :mod:`~dpalogic.analysis.terms` (terms and
links), :mod:`~dpalogic.analysis.matching` (the catalog); here the parsing, the whole pipeline and the report.
"""

from __future__ import annotations

import sympy

from dpalogic.analysis.matching import matches, program_equation
from dpalogic.analysis.ratio import _ATOMS, LEN, LOGP, REF_LOGP, VARIABLES, OutsideFragmentError, P, R
from dpalogic.analysis.terms import Decompiled, DecompiledTerm, _decompile_term, _identify_link, _merge, _normalize
from dpalogic.errors import DPALogicError, unknown
from dpalogic.language.equation import parse_expression
from dpalogic.semantics.program import rho_sympy


def _simplify_logs(expr: sympy.Expr) -> sympy.Expr:
    """``log(1/X)`` → ``−log X`` (what ``-log(sigmoid(z))`` parses to), everywhere in the expression."""
    return expr.replace(
        lambda e: isinstance(e, sympy.log) and isinstance(e.args[0], sympy.Pow) and e.args[0].exp == -1,
        lambda e: -sympy.log(e.args[0].base),
    )


# --------------------------------------------------------------------------------------------------- parsing


# Bounds on the work one equation can cause: SymPy's printers and simplifier recurse once or more per level, and
# integer arithmetic on a literal or a power grows with its digits (9**9**9 alone would take hours).
def _names() -> dict[str, sympy.Symbol]:
    d: dict[str, sympy.Symbol] = {}
    for k in _ATOMS:
        d[f"logp_{k}"], d[f"ref_logp_{k}"], d[f"len_{k}"] = LOGP[k], REF_LOGP[k], LEN[k]
        d[f"p_{k}"], d[f"ref_p_{k}"], d[f"r_{k}"] = P[k], R[k], R[k]
    return d


def parse_equation(text: str) -> sympy.Expr:
    """Parse a loss equation without evaluating it; names that are neither variables nor functions are (positive)
    hyperparameters, whatever they are called (``I``, ``E``, ``N``, ``pi`` included)."""
    if not isinstance(text, str):
        raise DPALogicError(f"expected the text of a loss equation, got {type(text).__name__}")
    if not text.strip():
        raise DPALogicError("empty equation: write a loss such as -logsigmoid(beta*(logp_w - logp_l))")
    expr = parse_expression(text, variables=_names())
    # a name that looks like a variable (logp_q, ref_p_x, len_y) is a typo, not a hyperparameter
    variable_names = sorted(v.name for v in VARIABLES)
    for s in expr.free_symbols:
        if s not in VARIABLES and s.name.startswith(("logp_", "ref_logp_", "p_", "ref_p_", "r_", "len_")):
            raise unknown("variable", s.name, variable_names, "variables end in _w (chosen) or _l (rejected)")
    return _simplify_logs(expr)


def decompile(text: str) -> Decompiled:
    """Decompile a loss equation (SymPy syntax) into terms with structures; raises OutsideFragmentError."""
    return decompile_expression(parse_equation(text), text)


def decompile_expression(expr: sympy.Expr, text: str | None = None) -> Decompiled:
    """Decompile a SymPy loss over :data:`VARIABLES` (hyperparameters: any other symbol), e.g. a traced function."""
    text = str(expr) if text is None else text
    expr = _simplify_logs(expr)
    if not expr.free_symbols & VARIABLES:
        raise DPALogicError(f"{text!r} mentions no log-probability (logp_w, logp_l, ref_logp_w, ...)")
    try:
        return _decompile(text, expr)
    except DPALogicError:
        raise
    except (TypeError, ValueError, ArithmeticError) as e:
        # SymPy refuses to compare or order a value that turned complex or infinite once log-probs became logs of
        # probabilities (log(−e^p), log(1 − e^{log p − log p})): no real loss on (0, 1) probabilities does that
        raise OutsideFragmentError(
            f"{text!r} takes a complex or infinite value once log-probs are written as logs of probabilities in "
            f"(0, 1), so it is not a program of structures (SymPy: {e})"
        ) from None


def _decompile(text: str, expr: sympy.Expr) -> Decompiled:
    terms: list[DecompiledTerm] = []
    constant = sympy.Integer(0)
    try:
        for t in sympy.Add.make_args(expr):
            c, rest = t.as_independent(*VARIABLES)
            if rest == 1:
                constant += c
                continue
            terms += _decompile_term(c, rest, t)
        terms, moved = _normalize(terms)
        constant += moved
    except OutsideFragmentError:
        # a link whose expanded form is itself a sum (EXO, DiscoPOP): try the whole expression as one term
        try:
            whole = _identify_link(sympy.Integer(1), expr, expr)
        except OutsideFragmentError:
            whole = None
        if whole is None:
            raise
        return Decompiled(text, [whole], sympy.Integer(0))
    return Decompiled(text, _merge(terms), constant)


# --------------------------------------------------------------------------------------------------- report


def structure_fields(structure) -> dict[str, str]:
    """A term's structure in a report: its text and its parts (core, given, additive, top, bottom) in ASCII."""
    from dpalogic.language.syntax import to_ascii

    core, given, additive = structure.readable_triple()
    return {
        "structure": structure.text("ascii"),
        "core": to_ascii(core),
        "given": to_ascii(given),
        "additive": to_ascii(additive),
        "top": to_ascii(structure.top_formula),
        "bottom": to_ascii(structure.bottom_formula),
    }


def report(d: Decompiled) -> dict:
    """JSON-ready description: each term's link, β, γ, structure parts and ρ; catalog matches."""
    m = matches(d)
    terms = []
    for t, names in zip(d.terms, m["terms"]):
        terms.append(
            {
                "link": t.link,
                "coef": str(t.coef),
                "beta": str(t.scale),
                "gamma": str(t.shift),
                "link_params": {k: str(v) for k, v in t.link_params.items()},
                "normalized": t.normalized,
                **structure_fields(t.structure),
                "rho": str(rho_sympy(t.structure)),
                "same_structure_as": names,
                "source": t.source,
            }
        )
    return {
        "equation": d.equation,
        "terms": terms,
        "constant": str(d.constant),
        "matches": m["program"],
        "matches_with": [x["text"] for x in m["program_with"] + m["program_at"]],
    }


# --------------------------------------------------------------------------------------------------- by name or equation


def decompile_spec(spec: str) -> dict:
    """``dpalogic decompile EXPR|NAME``: a catalog name is decompiled from its own closed form."""
    from dpalogic.analysis.decompile_listwise import is_listwise, listwise_report
    from dpalogic.semantics.catalog import _alias_map, lookup

    if is_listwise(spec):  # K answers: softmaxes read lifted, never expanded (docs/semantics.md §8)
        return listwise_report(spec)
    # a name never starts with "-": "-logp_w" is an equation, not the loss "_logp_w"
    key = spec.strip().lower().replace("-", "_")
    plain = key.isidentifier() and not spec.strip().startswith(("-", "+"))
    if key in _alias_map() or (plain and not key.startswith(("logp", "ref_", "p_", "len"))):
        entry = lookup(key)
        out = report(decompile(program_equation(entry.program)))
        out["name"] = entry.name
        return out
    return report(decompile(spec))


# the public names, wherever they are defined: the front of the decompiler for the CLI, the tests and the tracer
__all__ = [
    "LEN",
    "LOGP",
    "REF_LOGP",
    "VARIABLES",
    "Decompiled",
    "DecompiledTerm",
    "OutsideFragmentError",
    "decompile",
    "decompile_expression",
    "decompile_spec",
    "matches",
    "parse_equation",
    "program_equation",
    "report",
]
