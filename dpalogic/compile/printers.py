"""SymPy expressions as source: hyperparameter constants (Python/Triton scalars) and links (torch/Triton)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import sympy
from sympy.printing.precedence import PRECEDENCE
from sympy.printing.str import StrPrinter

from dpalogic.errors import DPALogicError

if TYPE_CHECKING:  # the body type only annotates: emit imports this module
    from dpalogic.compile.emit import _Body
from dpalogic.semantics.links import PRIMITIVES

# --------------------------------------------------------------------------------------------------- numbers


def _py(e: sympy.Expr, prec: int = 0) -> str:
    """A SymPy expression in hyperparameters as Python/Triton source, spaced as ``ruff format`` spaces it.

    ``prec`` is the binding strength of the context: 0 top, 1 a sum, 2 a product, 3 a unary minus or power.
    """
    e = sympy.sympify(e)
    if e.is_Symbol:
        return e.name
    if e.is_Number:
        v = float(e)
        s = repr(v)
        return f"({s})" if v < 0 and prec >= 2 else s
    if e.could_extract_minus_sign() and not e.is_Add:
        s = "-" + _py(-e, 3)
        return f"({s})" if prec >= 2 else s
    num, den = e.as_numer_denom()
    if den != 1:
        s = f"{_py(num, 2)} / {_py(den, 3)}"
        return f"({s})" if prec >= 3 else s
    if e.is_Add:
        terms = e.as_ordered_terms()
        s = _py(terms[0], 1)
        for t in terms[1:]:
            s += f" - {_py(-t, 2)}" if t.could_extract_minus_sign() else f" + {_py(t, 2)}"
        return f"({s})" if prec >= 2 else s
    if e.is_Mul:
        s = " * ".join(_py(f, 2) for f in e.as_ordered_factors())
        return f"({s})" if prec >= 3 else s
    if e.is_Pow and e.exp.is_Integer and e.exp > 0:
        s = " * ".join([_py(e.base, 2)] * int(e.exp))
        return f"({s})" if prec >= 3 else s
    raise DPALogicError(f"cannot compile the hyperparameter expression {e} (only rational functions are supported)")


def _is_one(e: sympy.Expr) -> bool:
    return sympy.sympify(e) == 1


def _is_zero(e: sympy.Expr) -> bool:
    return sympy.sympify(e) == 0


class _LinkPrinter(StrPrinter):
    """A link's SymPy expression as torch or Triton source: the stable primitives become the helpers."""

    def __init__(self, body: _Body, names: dict[sympy.Symbol, str]) -> None:
        super().__init__()
        self.body, self.names, self.tl = body, names, body.sfx == "_tl"
        self.dynamic: set[sympy.Symbol] = set()  # symbols that are tensors (z and what depends on it)

    def _scalar(self, e: sympy.Expr) -> bool:
        """A hyperparameter-only value: a Python float in the torch twin, a scalar in the kernel."""
        return not (e.free_symbols & self.dynamic)

    def doprint(self, expr: sympy.Expr) -> str:
        return super().doprint(expr).replace("*", " * ")  # spaced as ruff formats it (no ** is ever printed)

    def _call(self, fn: str, e: sympy.Expr) -> str:
        return f"{fn}({self._print(e)})"

    def _print_Symbol(self, e: sympy.Symbol) -> str:
        return self.names.get(e, e.name)

    def _print_Number(self, e: sympy.Expr) -> str:
        return repr(float(e))

    _print_Integer = _print_Rational = _print_Float = _print_Number

    def _print_softplus(self, e: sympy.Expr) -> str:
        return self._call(self.body.helper("softplus"), e.args[0])

    def _print_sigmoid(self, e: sympy.Expr) -> str:
        return self._call(self.body.helper("sigmoid") if self.tl else "torch.sigmoid", e.args[0])

    def _print_logsigmoid(self, e: sympy.Expr) -> str:
        return f"-{self.body.helper('softplus')}({self._print(-e.args[0])})"

    def _print_exp(self, e: sympy.Expr) -> str:
        return self._call("tl.exp" if self.tl else "math.exp" if self._scalar(e) else "torch.exp", e.args[0])

    def _print_log(self, e: sympy.Expr) -> str:
        return self._call("tl.log" if self.tl else "math.log" if self._scalar(e) else "torch.log", e.args[0])

    def _print_Max(self, e: sympy.Expr) -> str:
        if len(e.args) != 2:
            return self._print(sympy.Max(e.args[0], sympy.Max(*e.args[1:])))
        consts = [x for x in e.args if x.is_Number]
        if consts:  # max(c, x): a clamp from below (relu when c = 0)
            (c,), x = consts, next(x for x in e.args if not x.is_Number)
            if self.tl:
                return f"tl.maximum({self._print(x)}, {self._print(c)})"
            return f"torch.relu({self._print(x)})" if c == 0 else f"torch.clamp({self._print(x)}, min={self._print(c)})"
        a, b = (self._print(x) for x in e.args)
        return f"tl.maximum({a}, {b})" if self.tl else f"torch.maximum({a}, {b})"

    def _print_Heaviside(self, e: sympy.Expr) -> str:
        x = self._print(e.args[0])  # the derivative of a kink: 0 on the flat side and at the kink itself
        return f"tl.where({x} > 0.0, 1.0, 0.0)" if self.tl else f"({x} > 0.0).to({self.body.zvar}.dtype)"

    def _print_Min(self, e: sympy.Expr) -> str:
        return self._print(-sympy.Max(*[-x for x in e.args]))

    def _print_Abs(self, e: sympy.Expr) -> str:
        return self._call("tl.abs" if self.tl else "torch.abs", e.args[0])

    def _print_sign(self, e: sympy.Expr) -> str:
        x = self._print(e.args[0])
        return f"tl.where({x} > 0.0, 1.0, tl.where({x} < 0.0, -1.0, 0.0))" if self.tl else f"torch.sign({x})"

    def _print_tanh(self, e: sympy.Expr) -> str:
        return (
            self._print(2 * PRIMITIVES["sigmoid"](2 * e.args[0]) - 1)
            if self.tl
            else self._call("torch.tanh", e.args[0])
        )

    def _print_Function(self, e: sympy.Expr) -> str:
        raise DPALogicError(
            f"a link may not use {e.func.__name__}: dpalogic compiles softplus, sigmoid, logsigmoid, exp, log, "
            "max/min/relu/clamp, abs, tanh, and integer powers"
        )

    def _print_Pow(self, e: sympy.Pow, rational: bool = False) -> str:
        base, ex = e.args
        b = self.parenthesize(base, PRECEDENCE["Mul"] + 1)
        if ex == sympy.S.Half:
            return self._call("tl.sqrt" if self.tl else "torch.sqrt", base)
        if ex == -1:
            return f"1.0 / {b}"
        if ex.is_Integer and 1 < ex <= 4:  # Triton tensors have no ** operator
            return "*".join([b] * int(ex))
        if ex.is_Integer and -4 <= ex < -1:
            return "1.0 / (" + "*".join([b] * int(-ex)) + ")"
        raise DPALogicError(f"cannot compile the power {e} in a link (integer powers up to 4 only)")
