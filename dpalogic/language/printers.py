"""Printers: an IR formula back to text — ASCII (re-parsable), Unicode and LaTeX — with runs of answers kept compact
(``ExactlyOne(M(y1..y64))`` prints in one line)."""

from __future__ import annotations

import sympy
from sympy.logic.boolalg import And, Boolean, BooleanFalse, BooleanTrue, Equivalent, Implies, Not, Or, Xor

from dpalogic.language.atoms import atom_of
from dpalogic.language.cardinality import Count, Ranked

_PREC = {"iff": 1, "implies": 2, "or": 3, "xor": 4, "and": 5, "not": 6, "atom": 7}

_STYLES = {
    "ascii": dict(
        t="true", f="false", no="~", an=" & ", xo=" ^ ", orr=" | ", im=" -> ", iff=" <-> ", atom=lambda a: a.name
    ),
    "unicode": dict(t="⊤", f="⊥", no="¬", an=" ∧ ", xo=" ⊕ ", orr=" ∨ ", im=" → ", iff=" ↔ ", atom=lambda a: a.name),
    "latex": dict(
        t=r"\top",
        f=r"\bot",
        no=r"\lnot ",
        an=r" \land ",
        xo=r" \oplus ",
        orr=r" \lor ",
        im=r" \rightarrow ",
        iff=r" \leftrightarrow ",
        atom=lambda a: (r"M" if a.pred == "M" else r"\mathrm{Ref}") + "(" + _latex_answer(a.answer) + ")",
    ),
}


def _latex_answer(answer: str) -> str:
    return {"yw": "y_w", "yl": "y_l"}.get(answer, f"y_{{{answer[1:]}}}")


def _order_key(e: Boolean):
    syms = sorted(atom_of(s).sort_key for s in e.free_symbols) or [(9, 99)]
    return (syms, sympy.count_ops(e), str(e))


def _kind(e: Boolean) -> str:
    if isinstance(e, (BooleanTrue, BooleanFalse, sympy.Symbol, Count, Ranked)) or _compact_call(e):
        return "atom"
    return {And: "and", Or: "or", Xor: "xor", Implies: "implies", Equivalent: "iff", Not: "not"}[e.func]


MIN_RUN = 3  # M(y1), M(y2), M(y3) and longer print as M(y1..y3)


def _run_end(ops, i: int) -> int:
    """The last index of the run of consecutive answers of one predicate that starts at ``ops[i]``."""
    j = i
    if isinstance(ops[i], sympy.Symbol) and atom_of(ops[i]).answer[1:].isdigit():
        a = atom_of(ops[i])
        while j + 1 < len(ops) and isinstance(ops[j + 1], sympy.Symbol):
            b = atom_of(ops[j + 1])
            if b.pred != a.pred or not b.answer[1:].isdigit() or int(b.answer[1:]) != int(a.answer[1:]) + j + 1 - i:
                break
            j += 1
    return j


def _operand_texts(ops, st: dict, prec: int) -> list[str]:
    """Operands in order, a run of consecutive answers of one predicate (M(y1), …, M(y64)) as one range."""
    out: list[str] = []
    i = 0
    while i < len(ops):
        j = _run_end(ops, i)
        if j - i + 1 >= MIN_RUN:
            first, last = atom_of(ops[i]), atom_of(ops[j])
            if st is _STYLES["latex"]:
                out.append(st["atom"](first) + r", \ldots, " + st["atom"](last))
            else:
                out.append(f"{first.pred}({first.answer}..{last.answer})")
            i = j + 1
        else:
            out.append(_fmt(ops[i], st, prec))
            i += 1
    return out


def atoms_text(symbols) -> str:
    """A list of atoms, runs of consecutive answers as ranges: ``M(y2..y64), Ref(y1)``."""
    return ", ".join(_operand_texts(sorted(symbols, key=_order_key), _STYLES["ascii"], 0))


def _compact_call(e: Boolean) -> bool:
    """An And/Or/Xor with a long run of answers prints as a call with a range: And(M(y1..y64)); an Equivalent of three
    or more operands ("all equal", which no chain of infix ↔ says) always prints as a call: Iff(M(y1..y64))."""
    if e.func is Equivalent and len(e.args) > 2:
        return True
    if e.func not in (And, Or, Xor) or len(e.args) < MIN_RUN:
        return False
    ops = sorted(e.args, key=_order_key)
    return any(_run_end(ops, i) - i + 1 >= MIN_RUN for i in range(len(ops)))


def _call_text(name: str, texts: list[str], st: dict) -> str:
    head = rf"\mathrm{{{name}}}" if st is _STYLES["latex"] else name
    return head + "(" + ", ".join(texts) + ")"


def _fmt_call(e: Boolean, st: dict) -> str:
    """Constructs over many answers, in their call form with ranges kept compact."""
    if isinstance(e, Ranked):
        return _call_text("Ranked", _operand_texts(e.operands, st, 0), st)
    if isinstance(e, Count):
        name, k = e.construct
        texts = _operand_texts(sorted(e.operands, key=_order_key), st, 0)
        if name == "Between":  # no construct of its own: AtLeast(lo, …) ∧ AtMost(hi, …)
            lo, hi = _call_text("AtLeast", [str(e.lo), *texts], st), _call_text("AtMost", [str(e.hi), *texts], st)
            return _call_text("And", [lo, hi], st)
        return _call_text(name, ([str(k)] if k is not None else []) + texts, st)
    name = {And: "And", Or: "Or", Xor: "Xor", Equivalent: "Iff"}[e.func]
    return _call_text(name, _operand_texts(sorted(e.args, key=_order_key), st, 0), st)


def _fmt(e: Boolean, st: dict, parent_prec: int, right_of_implies: bool = False) -> str:
    if isinstance(e, (Count, Ranked)) or (
        not isinstance(e, (sympy.Symbol, BooleanTrue, BooleanFalse)) and _compact_call(e)
    ):
        return _fmt_call(e, st)
    if isinstance(e, BooleanTrue):
        return st["t"]
    if isinstance(e, BooleanFalse):
        return st["f"]
    if isinstance(e, sympy.Symbol):
        return st["atom"](atom_of(e))
    kind = _kind(e)
    prec = _PREC[kind]
    if kind == "not":
        inner = _fmt(e.args[0], st, prec)
        s = st["no"] + inner
    elif kind == "implies":
        a, b = e.args
        s = _fmt(a, st, prec + 1) + st["im"] + _fmt(b, st, prec, right_of_implies=True)
    else:
        sep = {"and": st["an"], "or": st["orr"], "xor": st["xo"], "iff": st["iff"]}[kind]
        args = sorted(e.args, key=_order_key)
        child_prec = prec + 1 if kind == "iff" else prec
        s = sep.join(_fmt(a, st, child_prec) for a in args)
    # parenthesize when the child binds less tightly than its context; implications nest to the right
    # and also around a binary child of a different binary connective: "(a ∧ b) → c" reads better than "a ∧ b → c"
    need = (
        prec < parent_prec
        or (kind == "implies" and parent_prec == _PREC["implies"] and not right_of_implies)
        or (kind not in ("not", "atom") and parent_prec not in (0, prec, _PREC["not"]))
    )
    if need:
        s = (r"\left(" + s + r"\right)") if st is _STYLES["latex"] else "(" + s + ")"
    return s


def to_ascii(e: Boolean) -> str:
    """ASCII text that :func:`parse_formula` reads back to an equivalent formula."""
    return _fmt(sympy.sympify(e), _STYLES["ascii"], 0)


def to_unicode(e: Boolean) -> str:
    return _fmt(sympy.sympify(e), _STYLES["unicode"], 0)


def to_latex(e: Boolean) -> str:
    return _fmt(sympy.sympify(e), _STYLES["latex"], 0)
