"""Equations as text, parsed without ever running them (the language stage, beside the formula grammar).

Python's own parser reads the text; a whitelist walk admits only numbers, names, ``+ - * / **``, unary signs and
calls of a fixed vocabulary (:data:`FUNCTIONS`, or one the caller gives), mapped to SymPy. Any other construct is
refused with a caret at its position; names outside the vocabulary are symbols, whatever they are called. The
work is bounded (text length, parts, nesting, exponents, digits), so hostile input ends in a stated limit.
Loss equations (``dpalogic decompile``) and link expressions (``link="softplus(margin - z)"``) both use it.
"""

from __future__ import annotations

import ast
import math
import re

import sympy

from dpalogic.errors import DPALogicError, FormulaSyntaxError, unknown
from dpalogic.language.fold import fold

# room for a softmax spelled out over all 256 answers (logsumexp's limit), against the reference too: 10,843
# characters and 1,287 parts; SymPy's work grows with the parts, and 1,500 stays within a few seconds
MAX_EQUATION_CHARS = 12000
MAX_EQUATION_NODES = 1500
MAX_EQUATION_DEPTH = 50  # operator levels as written; a chain a + b - c … is one level
MAX_SYMPY_DEPTH = 120  # levels once written out in SymPy (sigmoid(x) is 1/(1 + exp(-x)): four levels)
MAX_EXPONENT = 100
MAX_DIGITS = 100

# names accepted before a function (``torch.log1p``, ``F.logsigmoid``): matched as text, never looked up
_MODULE_PREFIXES = ("torch.", "torch.nn.functional.", "nn.functional.", "F.", "math.", "np.", "numpy.")


def _clamp(x: sympy.Expr, lo: sympy.Expr | None = None, hi: sympy.Expr | None = None) -> sympy.Expr:
    if lo is not None:
        x = sympy.Max(x, lo)
    return x if hi is None else sympy.Min(x, hi)


# name → (fewest arguments, most arguments, SymPy form); the whole vocabulary of a loss equation
FUNCTIONS: dict[str, tuple[int, int, object]] = {
    "log": (1, 2, sympy.log),
    "exp": (1, 1, sympy.exp),
    "log1p": (1, 1, lambda x: sympy.log(1 + x)),
    "expm1": (1, 1, lambda x: sympy.exp(x) - 1),
    "sigmoid": (1, 1, lambda x: 1 / (1 + sympy.exp(-x))),
    "logsigmoid": (1, 1, lambda x: -sympy.log(1 + sympy.exp(-x))),
    "softplus": (1, 1, lambda x: sympy.log(1 + sympy.exp(x))),
    "log1mexp": (1, 1, lambda x: sympy.log(1 - sympy.exp(x))),
    "relu": (1, 1, lambda x: sympy.Max(0, x)),
    "Max": (1, 64, sympy.Max),
    "max": (1, 64, sympy.Max),
    "maximum": (2, 2, sympy.Max),
    "Min": (1, 64, sympy.Min),
    "min": (1, 64, sympy.Min),
    "minimum": (2, 2, sympy.Min),
    "abs": (1, 1, sympy.Abs),
    "Abs": (1, 1, sympy.Abs),
    "sqrt": (1, 1, sympy.sqrt),
    "tanh": (1, 1, sympy.tanh),
    "clamp": (1, 3, _clamp),  # clamp(x, lo, hi) or clamp(x, min=lo, max=hi), as torch.clamp
}
_KEYWORDS = {"clamp": ("min", "max")}


class _EquationParser:
    """Python's own parser for the text, then a walk that admits only numbers, names, ``+ - * / **``, unary signs
    and calls of :data:`FUNCTIONS`; nothing is ever evaluated as Python. The walk keeps its own stack, so a long sum
    or a deep nesting ends in a stated limit, never in a RecursionError."""

    def __init__(
        self,
        text: str,
        variables: dict[str, sympy.Symbol] | None = None,
        functions: dict[str, tuple[int, int, object]] | None = None,
        assumptions: dict[str, bool] | None = None,
        what: str = "loss equation",
    ) -> None:
        self.raw_length = len(text)
        self.text = text.strip()  # positions are in the stripped text, which is what the caret line shows
        self.variables = variables or {}
        self.functions = FUNCTIONS if functions is None else functions
        self.assumptions = {"positive": True} if assumptions is None else assumptions
        self.what = what
        self.nodes = 0

    # ---- positions and errors
    def pos(self, node: ast.AST) -> int:
        """The character offset of a node (``ast`` counts columns in UTF-8 bytes)."""
        lines = self.lines()
        line = lines[node.lineno - 1] if node.lineno <= len(lines) else ""
        col = len(line.encode("utf-8", "surrogatepass")[: node.col_offset].decode("utf-8", "replace"))
        return sum(len(x) for x in lines[: node.lineno - 1]) + col

    def lines(self) -> list[str]:
        """The text's lines as Python's tokenizer splits them (\\n, \\r\\n or \\r), each with its end."""
        return re.split(r"(?<=\r\n)|(?<=\n)|(?<=\r)(?!\n)", self.text)

    def err(self, message: str, node: ast.AST | None = None, pos: int | None = None) -> FormulaSyntaxError:
        where = self.pos(node) if node is not None else (pos or 0)
        return FormulaSyntaxError(message, self.text, min(max(where, 0), len(self.text)))

    # ---- the walk
    def parse(self) -> sympy.Expr:
        text = self.text
        if self.raw_length > MAX_EQUATION_CHARS:
            raise DPALogicError(f"the equation is {self.raw_length} characters long; the limit is {MAX_EQUATION_CHARS}")
        if "\x00" in text:
            raise self.err("the equation contains a NUL character", pos=text.index("\x00"))
        try:
            tree = ast.parse(text, mode="eval")
        except SyntaxError as e:
            lines = self.lines()
            line = min(max(e.lineno or 1, 1), len(lines))
            offset = sum(len(x) for x in lines[: line - 1]) + max((e.offset or 1) - 1, 0)
            reason = "a number with too many digits" if "digits" in str(e.msg) else (e.msg or "invalid syntax")
            raise self.err(f"cannot parse the {self.what}: {reason}", pos=offset) from None
        except UnicodeError as e:
            raise self.err(f"the equation contains a character that is not text ({e.reason})", pos=e.start) from None
        except (RecursionError, MemoryError):
            raise DPALogicError(
                f"the equation nests too deeply to parse; the limit is {MAX_EQUATION_DEPTH} levels"
            ) from None
        expr = fold(
            tree.body,
            self.expand,
            self.apply,
            max_level=MAX_EQUATION_DEPTH,
            too_deep=lambda node: self.err(
                f"the equation nests more than {MAX_EQUATION_DEPTH} operators deep here (the limit; a chain "
                "a + b - c … is one level)",
                node,
            ),
            visit=self._count,
        )
        self.check_result(expr, tree.body)
        return expr

    def _count(self, node: ast.AST) -> None:
        self.nodes += 1
        if self.nodes > MAX_EQUATION_NODES:
            raise self.err(f"the equation has more than {MAX_EQUATION_NODES} parts (the limit)", node)

    def apply(self, func, args: list[sympy.Expr], node: ast.AST) -> sympy.Expr:
        if any(a in _NOT_FINITE for a in args):
            raise self.err(
                f"this has the value {next(a for a in args if a in _NOT_FINITE)} (a division by zero?)", node
            )
        try:
            out = func(*args)
        except DPALogicError:
            raise
        except (TypeError, ValueError, ArithmeticError) as e:  # SymPy refusing, e.g. max() of incomparable values
            raise self.err(f"this cannot be built: {e}", node) from None
        if out in _NOT_FINITE:
            raise self.err(f"this has the value {out} (a division by zero or log(0))", node)
        if out.has(sympy.I) and not any(a.has(sympy.I) for a in args):  # every name is real: I came from here
            raise self.err(
                f"this is the complex number {_short(out)} (the logarithm or root of a negative number): a loss "
                "is real",
                node,
            )
        return out

    def expand(self, node: ast.AST):
        """A leaf's SymPy value, or ``(combine, operand nodes)``."""
        if isinstance(node, ast.Constant):
            return self.number(node)
        if isinstance(node, ast.Name):
            if node.id in self.functions:
                raise self.err(f"{node.id} is a function: write {node.id}(...)", node)
            if node.id in self.variables:
                return self.variables[node.id]
            return sympy.Symbol(node.id, **self.assumptions)  # a parameter, whatever its name (I, E, N, pi …)
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
            return ((lambda x: -x) if isinstance(node.op, ast.USub) else (lambda x: x)), [node.operand]
        if isinstance(node, ast.BinOp) and isinstance(node.op, (ast.Add, ast.Sub)):
            return self.chain(node, (ast.Add, ast.Sub), lambda *xs: sympy.Add(*xs), lambda x: -x)
        if isinstance(node, ast.BinOp) and isinstance(node.op, (ast.Mult, ast.Div)):
            return self.chain(node, (ast.Mult, ast.Div), lambda *xs: sympy.Mul(*xs), lambda x: 1 / x)
        if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Pow):
            return (lambda b, e: self.power(b, e, node)), [node.left, node.right]
        if isinstance(node, ast.Call):
            return self.call(node)
        raise self.err(self.refusal(node), node)

    def chain(self, node: ast.BinOp, ops: tuple, join, invert):
        """``a - b + c`` (nested to the left by the grammar) as one n-ary sum; likewise products and quotients."""
        operands, inverted = [], []
        while isinstance(node, ast.BinOp) and isinstance(node.op, ops):
            operands.append(node.right)
            inverted.append(isinstance(node.op, (ast.Sub, ast.Div)))
            node = node.left
        operands.append(node)
        inverted.append(False)
        operands.reverse()
        inverted.reverse()
        self.nodes += len(operands) - 2

        def combine(*xs):
            return join(*[invert(x) if inv else x for x, inv in zip(xs, inverted)])

        return combine, operands

    def number(self, node: ast.Constant) -> sympy.Expr:
        v = node.value
        if type(v) is int:
            if v.bit_length() > MAX_DIGITS * 3.33:  # decimal digits, without the (quadratic) conversion to text
                raise self.err(f"this number has more than {MAX_DIGITS} digits (the limit)", node)
            return sympy.Integer(v)
        if type(v) is float:
            if not math.isfinite(v):
                raise self.err("this number is too large for a float", node)
            return sympy.Float(repr(v))  # as parse_expr read decimals: 0.1 is Float('0.1')
        raise self.err(self.refusal(node), node)

    def power(self, base: sympy.Expr, exponent: sympy.Expr, node: ast.AST) -> sympy.Expr:
        if not exponent.free_symbols:
            if not (isinstance(exponent, sympy.Number) and exponent.is_finite and abs(exponent) <= MAX_EXPONENT):
                raise self.err(
                    f"the exponent {_short(exponent)} is not a number between -{MAX_EXPONENT} and {MAX_EXPONENT}: a "
                    "constant exponent must be a plain number within that limit",
                    node.right,
                )
            if isinstance(base, sympy.Rational) and base not in (0, 1, -1):
                digits = (abs(base.p).bit_length() + base.q.bit_length()) * 0.302 * float(abs(exponent))
                if digits > 10 * MAX_DIGITS:
                    raise self.err(
                        f"this power would have about {int(digits)} digits; the limit is {10 * MAX_DIGITS}", node
                    )
        return base**exponent

    def call(self, node: ast.Call):
        name = self.function_name(node.func)
        if name not in self.functions:
            raise self.err(str(unknown("function", name, sorted(self.functions))), node)
        lo, hi, func = self.functions[name]
        allowed = _KEYWORDS.get(name, ())
        for a in node.args:
            if isinstance(a, ast.Starred):
                raise self.err(f"*arguments are not allowed in a {self.what}", a)
        given = set()
        for k in node.keywords:
            if k.arg is None or k.arg not in allowed or k.arg in given:
                what = "**arguments" if k.arg is None else f"the keyword {k.arg}="
                ok = f"; {name} takes " + " and ".join(f"{a}=" for a in allowed) if allowed else ""
                raise self.err(f"{what} is not allowed here{ok}", k.value if k.arg is None else k)
            given.add(k.arg)
        n = len(node.args)
        if not lo <= n + len(node.keywords) <= hi or (node.keywords and n != 1):
            want = f"{lo}" if lo == hi else f"{lo} to {hi}"
            raise self.err(f"{name} takes {want} argument(s), got {n + len(node.keywords)}", node)
        if name == "clamp" and n + len(node.keywords) == 1:
            raise self.err("clamp needs a bound: clamp(x, min=…, max=…)", node)
        # clamp's keywords are torch's (min=, max=); its SymPy form takes lo/hi
        names = [{"min": "lo", "max": "hi"}[k.arg] for k in node.keywords]

        def combine(*xs):
            return func(*xs[:n], **dict(zip(names, xs[n:])))

        return combine, list(node.args) + [k.value for k in node.keywords]

    def function_name(self, func: ast.AST) -> str:
        """``log`` or a dotted ``torch.log1p`` / ``F.logsigmoid``: the dotted name is text, never looked up."""
        parts = []
        while isinstance(func, ast.Attribute):
            parts.append(func.attr)
            func = func.value
        if not isinstance(func, ast.Name):
            raise self.err("only a function name can be called here (such as log, exp, sigmoid)", func)
        parts.append(func.id)
        dotted = ".".join(reversed(parts))
        if len(parts) == 1:
            return dotted
        for prefix in _MODULE_PREFIXES:
            if dotted.startswith(prefix) and "." not in dotted[len(prefix) :]:
                return dotted[len(prefix) :]
        raise self.err(
            f"{dotted} is not a function of a {self.what}; write log, exp, … (or torch./F./math. before them)", func
        )

    def refusal(self, node: ast.AST) -> str:
        what = {
            ast.Attribute: "an attribute (a.b)",
            ast.Subscript: "indexing (a[i])",
            ast.Lambda: "a lambda",
            ast.Compare: "a comparison",
            ast.BoolOp: "and/or",
            ast.IfExp: "a conditional expression",
            ast.Starred: "a starred expression",
        }.get(type(node))
        if isinstance(node, ast.Constant):
            what = f"the constant {_short(node.value)!s}" if not isinstance(node.value, str) else "a string"
        elif isinstance(node, ast.BinOp) and isinstance(node.op, ast.BitXor):
            what = "the operator ^ (write ** for a power)"
        elif isinstance(node, (ast.BinOp, ast.UnaryOp)):
            what = "this operator"
        elif what is None:
            what = f"this construct ({type(node).__name__})"
        return (
            f"{what} is not allowed in a {self.what}: it takes numbers, names, + - * / **, and calls of "
            + ", ".join(sorted(set(self.functions), key=str.lower))
        )

    def check_result(self, expr: sympy.Expr, node: ast.AST) -> None:
        """Bounds that only the SymPy form shows: exponents merged by SymPy (``(x**50)**50``), and its depth."""
        deepest, stack = 0, [(expr, 1)]
        while stack:
            e, level = stack.pop()
            deepest = max(deepest, level)
            if deepest > MAX_SYMPY_DEPTH:
                raise self.err(
                    f"the equation nests more than {MAX_SYMPY_DEPTH} levels once written out with log and exp (the "
                    "limit)",
                    node,
                )
            if e in _NOT_FINITE:
                raise self.err(f"the equation has the value {e} in it (a division by zero or log(0))", node)
            if isinstance(e, sympy.Pow) and isinstance(e.exp, sympy.Number) and abs(e.exp) > MAX_EXPONENT:
                raise self.err(f"the power {_short(e)} has an exponent beyond ±{MAX_EXPONENT} (the limit)", node)
            stack.extend((a, level + 1) for a in e.args)


_NOT_FINITE = (sympy.zoo, sympy.nan, sympy.oo, -sympy.oo)


def _short(x: object, n: int = 60) -> str:
    s = str(x)
    return s if len(s) <= n else s[: n - 1] + "…"


def parse_expression(
    text: str,
    *,
    variables: dict[str, sympy.Symbol] | None = None,
    functions: dict[str, tuple[int, int, object]] | None = None,
    assumptions: dict[str, bool] | None = None,
    what: str = "loss equation",
) -> sympy.Expr:
    """Parse ``text`` without evaluating it. ``variables`` maps names to symbols; every other name becomes a symbol
    with ``assumptions`` (positive by default); ``functions`` is the vocabulary of calls (default :data:`FUNCTIONS`)."""
    if not isinstance(text, str):
        raise DPALogicError(f"expected the text of an {what}, got {type(text).__name__}")
    expr = _EquationParser(text, variables, functions, assumptions, what).parse()
    if not isinstance(expr, sympy.Expr):
        raise DPALogicError(f"{text!r} is not an expression")
    return expr
