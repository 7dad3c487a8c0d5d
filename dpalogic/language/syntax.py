"""Grammar → IR: parse preference formulas and structures into SymPy Boolean expressions.

The grammar lives in ``grammar/preference.lark``. Atoms (:mod:`dpalogic.language.atoms`) become SymPy symbols whose
names are their canonical text (``M(yw)``, ``Ref(y2)``), so an IR expression is an ordinary ``sympy.logic`` formula;
:mod:`dpalogic.language.printers` turns one back into text (ASCII, re-parsable; Unicode; LaTeX). Both are
re-exported here, the language's one entry point.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import sympy
from sympy.logic.boolalg import And, Boolean, Equivalent, Implies, Not, Or, Xor

from dpalogic.errors import DPALogicError, FormulaSyntaxError, unknown
from dpalogic.language.atoms import (  # noqa: F401 - re-exported: the language's one entry point
    ANSWER_ALIASES,
    MAX_ANSWERS,
    PREDICATE_READING,
    PREDICATES,
    PROMPTS,
    Atom,
    answer_index,
    atom_of,
    atom_symbol,
    atoms_of,
    canonical_answer,
)
from dpalogic.language.cardinality import CONSTRUCTS, Ranked
from dpalogic.language.fold import fold
from dpalogic.language.printers import atoms_text, to_ascii, to_latex, to_unicode  # noqa: F401 - re-exported

# --------------------------------------------------------------------------------------------------- parser

CONNECTIVES = {
    "And": "and", "AND": "and", "Or": "or", "OR": "or", "Not": "not", "NOT": "not",
    "Implies": "implies", "IMPLIES": "implies", "XOR": "xor", "Xor": "xor",
    "Equivalent": "iff", "Iff": "iff", "IFF": "iff", "Equiv": "iff",
}  # fmt: skip
_ARITY = {"not": (1, 1), "implies": (2, 2), "and": (1, None), "or": (1, None), "xor": (1, None), "iff": (1, None)}


def grammar_path() -> Path:
    """Where the grammar file is: ``grammar/`` beside the package, or the copy shipped inside a wheel."""
    repo = Path(__file__).resolve().parents[2] / "grammar" / "preference.lark"
    if repo.exists():
        return repo
    return Path(__file__).resolve().parents[1] / "_grammar" / "preference.lark"


@lru_cache(maxsize=1)
def _parser():
    import lark

    return lark.Lark(grammar_path().read_text(encoding="utf-8"), parser="lalr", propagate_positions=True)


@dataclass(frozen=True)
class ParsedStructure:
    """What the text said: the core, and the conditioning/additional parts if they were written."""

    core: Boolean
    given: Boolean | None
    additional: Boolean | None
    given_is_literal_false: bool = False


_FORMULA_START = {"~", "¬", "!", "not", "true", "True", "⊤", "false", "False", "⊥", "("}
_CLOSERS = {"RPAR": "')'", "COMMA": "','", "$END": "end of input"}


def _expected_text(expected: set[str]) -> str:
    """lark's expected terminals, said in words: 'a formula', 'an operator', ')' ..."""
    parser = _parser()
    formula = operator = False
    closers = []
    for name in sorted(expected):
        if name in _CLOSERS:
            closers.append(_CLOSERS[name])
            continue
        if name == "NAME":
            formula = True
            continue
        try:
            pattern = parser.get_terminal(name).pattern.value
        except Exception:  # pragma: no cover - every terminal has a pattern
            pattern = name
        if pattern in _FORMULA_START:
            formula = True
        else:
            operator = True
    out = []
    if formula:
        out.append("a formula (an atom like M(yw), a constant, '(' or a negation)")
    if operator:
        out.append("an operator (& | ^ -> <-> ...)")
    return ", ".join(out + closers) or "something else"


def _parse_tree(text: str):
    import lark

    if not isinstance(text, str):
        raise FormulaSyntaxError(f"expected formula text, got {type(text).__name__}", "", 0)
    if not text.strip():
        raise FormulaSyntaxError("empty formula: write a formula such as M(yw) or a structure (P, P_C, P_A)", text, 0)
    if len(text) > MAX_FORMULA_CHARS:
        raise DPALogicError(f"the formula text is {len(text)} characters long; the limit is {MAX_FORMULA_CHARS}")
    try:
        return _parser().parse(text)
    except lark.UnexpectedCharacters as e:
        raise FormulaSyntaxError(f"unexpected character {text[e.pos_in_stream]!r}", text, e.pos_in_stream) from None
    except lark.UnexpectedToken as e:
        pos = e.token.start_pos if e.token.start_pos is not None else len(text)
        what = "end of input" if e.token.type == "$END" else repr(str(e.token))
        if e.token.type == "$END":
            pos = len(text)
        raise FormulaSyntaxError(f"unexpected {what}; expected {_expected_text(set(e.expected))}", text, pos) from None
    except lark.UnexpectedEOF as e:
        raise FormulaSyntaxError(
            f"unexpected end of input; expected {_expected_text(set(e.expected))}", text, len(text)
        ) from None
    except lark.LarkError as e:  # anything else lark may raise is still a syntax error for the user
        raise FormulaSyntaxError(f"cannot parse: {e}", text, 0) from None


MAX_FORMULA_CHARS = 10_000
MAX_NESTING = 100  # operator levels; SymPy's printers recurse about five frames per level, within Python's 1000
_BINARY = {"and_op": And, "or_op": Or, "xor_op": Xor, "implies_op": Implies, "iff_op": Equivalent}
_FLAT = {"and_op", "or_op", "xor_op"}  # associative: a chain a & b & c is one level, however long


class _Builder:
    """Turns the lark tree into SymPy, checking names and reporting their position.

    The walk keeps its own stack rather than recursing, so that a long chain (``a & b & …``, which the grammar
    nests one level per operator) or a deep nesting ends in a stated limit, never in a RecursionError.
    """

    def __init__(self, text: str) -> None:
        self.text = text

    def err(self, msg: str, node) -> FormulaSyntaxError:
        pos = getattr(getattr(node, "meta", None), "start_pos", None)
        if pos is None:
            pos = getattr(node, "start_pos", 0) or 0
        return FormulaSyntaxError(msg, self.text, pos)

    def build(self, root) -> Boolean:
        value = fold(
            root,
            self.expand,
            self.combine,
            max_level=MAX_NESTING,
            too_deep=lambda node: self.err(
                f"the formula nests {self.depth(root)} operators deep; the limit is {MAX_NESTING} levels (the "
                "caret marks the first one beyond it; a chain of one operator, a & b & c …, is one level)",
                node,
            ),
        )
        if isinstance(value, (_Range, _Number)):
            raise self.err(value.misplaced(), value.node)
        return value

    def combine(self, func, args: list, node) -> Boolean:
        """Apply a connective or construct: ranges spliced into variadic ones, a count only where one is due."""
        takes_number = func in _NUMBERED
        if takes_number:
            if not args or not isinstance(args[0], _Number):
                raise self.err(f"{_NUMBERED[func]} takes a count first: {_NUMBERED[func]}(2, M(y1..y4))", node)
            number, args = args[0], args[1:]
            if not args:
                raise self.err(f"{_NUMBERED[func]} needs formulas after its count", node)
        operands: list = []
        for a in args:
            if isinstance(a, _Number):
                raise self.err(a.misplaced(), a.node)
            if isinstance(a, _Range):
                # only inside calls: M(y1..y2) <-> M(y3) read as one n-ary Iff ("all equal") would not be the chain
                # M(y1) <-> M(y2) <-> M(y3) that the infix form means
                infix = getattr(node, "data", None) in _BINARY
                if infix or (func not in _VARIADIC and func not in _NUMBERED):
                    raise self.err(a.misplaced(), a.node)
                operands.extend(a.symbols)
            else:
                operands.append(a)
        if takes_number:
            return func(number.value, *operands)
        return func(*operands)

    def depth(self, root) -> int:
        """How many operator levels the formula nests (for the message; leaves and errors in them are skipped)."""
        deepest, stack = 0, [(root, 0)]
        while stack:
            node, level = stack.pop()
            try:
                step = self.expand(node)
            except FormulaSyntaxError:
                step = None
            if isinstance(step, tuple):
                deepest = max(deepest, level + 1)
                stack.extend((c, level + 1) for c in step[1])
        return deepest

    def expand(self, node) -> Boolean | tuple:
        """A leaf's value, or ``(function, operand nodes)`` for an operator (a chain of one operator flattened)."""
        kind = node.data
        if kind == "true_const":
            return sympy.true
        if kind == "false_const":
            return sympy.false
        if kind == "bare_name":
            name = str(node.children[0])
            hint = ""
            if canonical_answer(name):
                hint = f"; an answer is not a formula by itself: did you mean M({name}) or Ref({name})?"
            elif name in CONNECTIVES or name in PREDICATES:
                hint = f"; {name} needs arguments in parentheses"
            raise self.err(f"{name!r} is not a formula{hint}", node)
        if kind == "not_op":
            return Not, [node.children[0]]
        if kind in _FLAT:
            operands, todo = [], [node]
            while todo:  # left-recursive in the grammar: a & b & c is and_op(and_op(a, b), c)
                n = todo.pop()
                if getattr(n, "data", None) == kind:
                    todo.extend(reversed(n.children))
                else:
                    operands.append(n)
            return _BINARY[kind], operands
        if kind in _BINARY:
            return _BINARY[kind], list(node.children)
        if kind == "call":
            return self.call(node)
        if kind == "number":
            digits = str(node.children[0]).lstrip("0") or "0"  # 0000001 is 1; Python refuses ints of 4300+ digits
            return _Number(int(digits) if len(digits) <= 6 else 10**6, node)  # any count past 10^6 is past 256
        if kind == "answer_range":
            raise self.err("a range of answers y1..yK goes inside M(...) or Ref(...): M(y1..y4)", node)
        raise self.err(f"unexpected construct {kind}", node)  # pragma: no cover - grammar and builder agree

    def call(self, node) -> Boolean | tuple:
        name_tok, *args = node.children
        name = str(name_tok)
        if name in PREDICATES:
            return self.atom(name, args, node)
        if name in CONNECTIVES:
            op = CONNECTIVES[name]
            lo, hi = _ARITY[op]
            if len(args) < lo or (hi is not None and len(args) > hi):
                want = f"exactly {lo}" if lo == hi else f"at least {lo}"
                raise self.err(f"{name} takes {want} argument(s), got {len(args)}", node)
            return {"and": And, "or": Or, "xor": Xor, "implies": Implies, "iff": Equivalent, "not": Not}[op], args
        if name in CONSTRUCTS:
            return CONSTRUCTS[name][0], args
        valid = list(PREDICATES) + sorted(set(CONNECTIVES)) + list(CONSTRUCTS)
        raise FormulaSyntaxError(str(unknown("predicate or connective", name, valid)), self.text, name_tok.start_pos)

    def atom(self, pred: str, args, node) -> Boolean | _Range:
        names = []
        if args and args[-1].data == "answer_range":
            return self.atom_range(pred, args, node)
        for a in args:
            if a.data != "bare_name":
                raise self.err(f"the arguments of {pred}(...) are names such as x, yw, yl, y1", a)
            names.append(a.children[0])
        if len(names) == 2:
            prompt, answer_tok = names
            if str(prompt) not in PROMPTS:
                raise FormulaSyntaxError(
                    str(unknown("prompt", str(prompt), PROMPTS, "write M(x, yw) or simply M(yw)")),
                    self.text,
                    prompt.start_pos,
                )
        elif len(names) == 1:
            answer_tok = names[0]
        else:
            raise self.err(
                f"{pred}(...) takes an answer, optionally after the prompt: {pred}(yw) or {pred}(x, yw)", node
            )
        return atom_symbol(pred, self.answer(answer_tok))

    def answer(self, tok) -> str:
        answer = canonical_answer(str(tok))
        if answer is None:
            m = re.fullmatch(r"y_?([0-9]+)", str(tok))
            if m and (len(m.group(1)) > 6 or int(m.group(1)) > MAX_ANSWERS):
                shown = str(tok) if len(str(tok)) <= 12 else str(tok)[:10] + "…"
                raise FormulaSyntaxError(
                    f"unknown answer {shown}: answers go up to y{MAX_ANSWERS}", self.text, tok.start_pos
                )
            valid = ["yw", "yl", "y_w", "y_l"] + [f"y{i}" for i in range(1, 10)]
            raise FormulaSyntaxError(str(unknown("answer", str(tok), valid)), self.text, tok.start_pos)
        return answer

    def atom_range(self, pred: str, args, node) -> _Range:
        """``M(y1..y4)`` → M(y1), M(y2), M(y3), M(y4) (``M(x, y1..y4)`` too); ranges run upward over y1 … y256."""
        *prompt, rng = args
        if len(prompt) > 1 or (prompt and (prompt[0].data != "bare_name" or str(prompt[0].children[0]) not in PROMPTS)):
            raise self.err(f"{pred}(...) takes an answer range, optionally after the prompt: {pred}(x, y1..y4)", node)
        first, last = rng.children
        a, b = self.answer(first), self.answer(last)
        if a in ("yw", "yl") or b in ("yw", "yl"):
            raise self.err("a range runs over numbered answers: y1..y4", rng)
        i, j = int(a[1:]), int(b[1:])
        if j < i:
            raise FormulaSyntaxError(f"the range {a}..{b} runs downward; write {b}..{a}", self.text, first.start_pos)
        return _Range(tuple(atom_symbol(pred, f"y{k}") for k in range(i, j + 1)), rng)


@dataclass(frozen=True)
class _Range:
    """The atoms of ``M(y1..yK)``: spliced into the arguments of a variadic connective or construct."""

    symbols: tuple
    node: object

    def misplaced(self) -> str:
        return (
            "a range M(y1..yK) stands for several atoms: use it inside And, Or, Xor, Iff, ExactlyOne, AtMost, "
            "AtLeast, Exactly or Ranked"
        )


@dataclass(frozen=True)
class _Number:
    """A count: the first argument of AtMost, AtLeast and Exactly."""

    value: int
    node: object

    def misplaced(self) -> str:
        return "a number is only allowed as the count of AtMost(k, ...), AtLeast(k, ...) or Exactly(k, ...)"


_VARIADIC = {And, Or, Xor, Equivalent, CONSTRUCTS["ExactlyOne"][0], Ranked}
_NUMBERED = {CONSTRUCTS[n][0]: n for n in CONSTRUCTS if CONSTRUCTS[n][1]}


def parse_formula(text: str) -> Boolean:
    """Parse one propositional formula, e.g. ``"M(yl) -> M(yw)"`` or ``"Implies(M(x,yl), M(x,yw))"``."""
    s = parse_structure_text(text)
    if s.given is not None:
        raise FormulaSyntaxError("expected a single formula, got a structure (P, P_C, ...)", text, 0)
    return s.core


def parse_structure_text(text: str) -> ParsedStructure:
    """Parse a structure ``(P, P_C, P_A)``, a pair ``(P, P_C)`` or a bare formula ``P``."""
    tree = _parse_tree(text)
    b = _Builder(text)
    parts = [b.build(c) for c in tree.children]
    if tree.data == "bare":
        return ParsedStructure(parts[0], None, None)
    given_false = tree.children[1].data == "false_const"
    if tree.data == "pair":
        return ParsedStructure(parts[0], parts[1], None, given_false)
    return ParsedStructure(parts[0], parts[1], parts[2], given_false)
