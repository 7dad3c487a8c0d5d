"""Trace a loss written as torch code into a SymPy expression, for the decompiler (``dpalogic decompile --python``).

Trust model: ``--python FILE.py:FUNCTION`` imports the user's *own* file, exactly as their training script would,
and calls the function once on symbolic stand-ins (:class:`Traced`) instead of tensors. Nothing else is evaluated:
no text from anywhere else (a command line, a config, a catalog) is ever run as code. ``--library`` does the same
with the installed library's own functions.

A stand-in records what is done to it: ``+ - * / **`` and unary minus with Python numbers on either side, the
tensor methods of :data:`METHODS`, and torch's functions through the ``__torch_function__`` protocol (``torch.exp``,
``F.logsigmoid``, ``torch.clamp`` …; see :data:`TORCH`). A mean or sum over the batch is the identity: the per-pair
loss is traced. ``torch.where`` and Python ``if`` take the branch that hyperparameter values decide; a condition on
log-probabilities is an error that says so. For the duration of the call the function's module sees a ``torch``
and ``math`` whose ``tensor``, ``where``, ``log``, ``exp`` … accept stand-ins; the modules themselves are untouched.

The front end (reading ``FILE.py:FUNCTION``, mapping parameters to log-probs, decompiling the result) is
:mod:`dpalogic.analysis.python_loss`.
"""

from __future__ import annotations

import inspect
import math
import types
from fractions import Fraction
from typing import Any

import sympy

from dpalogic.analysis.decompile import LEN, OutsideFragmentError
from dpalogic.errors import DPALogicError
from dpalogic.language.equation import FUNCTIONS


class TraceError(DPALogicError):
    """The function cannot be traced into a loss of the pair's log-probabilities; the message says where."""


def _num(v: Any) -> sympy.Expr:
    """A Python number as an exact SymPy number: 0.5 is 1/2, 1e-3 is 1/1000 (the decimal as written)."""
    if isinstance(v, bool):
        return sympy.Integer(int(v))
    if isinstance(v, int):
        return sympy.Integer(v)
    if isinstance(v, float):
        if not math.isfinite(v):
            raise TraceError(f"the function uses the number {v}")
        if v == math.log(2):  # math.log(2), as f-DPO's JS score writes it
            return sympy.log(2)
        f = Fraction(repr(v))
        return sympy.Rational(f.numerator, f.denominator)
    if isinstance(v, sympy.Basic):
        return v
    raise TraceError(f"the loss combines a log-probability with {type(v).__name__} {v!r}, which is not a number")


def _expr(v: Any) -> sympy.Expr:
    return v.expr if isinstance(v, Traced) else _num(v)


class Condition:
    """A comparison made while tracing; ``bool()`` decides it from hyperparameter values, or refuses."""

    def __init__(self, rel: sympy.Basic, tracer: Tracer) -> None:
        self.rel, self.tracer = rel, tracer

    def __bool__(self) -> bool:
        return self.tracer.decide(self.rel)

    @classmethod
    def __torch_function__(cls, func, types_, args=(), kwargs=None):
        return Traced.__torch_function__(func, types_, args, kwargs)


class Traced:
    """A symbolic stand-in for a tensor (or a hyperparameter): its value is the SymPy expression ``expr``."""

    __slots__ = ("expr", "tracer")

    def __init__(self, expr: sympy.Expr, tracer: Tracer) -> None:
        self.expr, self.tracer = expr, tracer

    def _new(self, e: sympy.Expr) -> Traced:
        return Traced(e, self.tracer)

    # ---- arithmetic
    def __add__(self, o):
        return self._new(self.expr + _expr(o))

    def __radd__(self, o):
        return self._new(_expr(o) + self.expr)

    def __sub__(self, o):
        return self._new(self.expr - _expr(o))

    def __rsub__(self, o):
        return self._new(_expr(o) - self.expr)

    def __mul__(self, o):
        return self._new(self.expr * _expr(o))

    def __rmul__(self, o):
        return self._new(_expr(o) * self.expr)

    def __truediv__(self, o):
        return self._new(self.expr / _expr(o))

    def __rtruediv__(self, o):
        return self._new(_expr(o) / self.expr)

    def __pow__(self, o):
        return self._new(self.expr ** _expr(o))

    def __rpow__(self, o):
        return self._new(_expr(o) ** self.expr)

    def __neg__(self):
        return self._new(-self.expr)

    def __pos__(self):
        return self

    def __abs__(self):
        return self._new(sympy.Abs(self.expr))

    # ---- comparisons and truth
    def __lt__(self, o):
        return Condition(sympy.Lt(self.expr, _expr(o)), self.tracer)

    def __le__(self, o):
        return Condition(sympy.Le(self.expr, _expr(o)), self.tracer)

    def __gt__(self, o):
        return Condition(sympy.Gt(self.expr, _expr(o)), self.tracer)

    def __ge__(self, o):
        return Condition(sympy.Ge(self.expr, _expr(o)), self.tracer)

    def __eq__(self, o):  # type: ignore[override]
        return Condition(sympy.Eq(self.expr, _expr(o)), self.tracer)

    def __ne__(self, o):  # type: ignore[override]
        return Condition(sympy.Ne(self.expr, _expr(o)), self.tracer)

    __hash__ = object.__hash__

    def __bool__(self) -> bool:
        return self.tracer.decide(sympy.Ne(self.expr, 0))

    def __float__(self) -> float:
        value = self.tracer.value(self.expr)
        if value is None:
            raise TraceError(
                f"{self.expr} is used as a Python number (math.…, float()): give its value with --hp "
                + ", ".join(f"{s}=…" for s in sorted(map(str, self.expr.free_symbols)))
            )
        return value

    def __repr__(self) -> str:
        return f"Traced({self.expr})"

    # ---- tensor methods: shape-only ones are the identity, the batch reductions too
    def __getattr__(self, name: str):
        if name in METHODS:
            op = METHODS[name]
            return lambda *a, **k: op(self, *a, **k)
        if name in _IDENTITY_METHODS:
            return lambda *a, **k: self
        if name in ("device", "dtype"):
            import torch

            return torch.device("cpu") if name == "device" else torch.float32
        if name == "shape":
            return (2,)
        raise TraceError(f"the tensor method or attribute .{name} cannot be traced (on {self.expr})")

    def __getitem__(self, index):
        return self  # one pair: indexing a per-pair value selects that pair

    @classmethod
    def __torch_function__(cls, func, types_, args=(), kwargs=None):
        name = getattr(func, "__name__", str(func)).lstrip("_")
        if name not in TORCH:
            raise TraceError(f"torch.{name} cannot be traced: the tracer knows {', '.join(sorted(TORCH))}")
        return TORCH[name](*args, **(kwargs or {}))


def _tracer_of(*xs) -> Tracer:
    for x in xs:
        if isinstance(x, (Traced, Condition)):
            return x.tracer
    raise TraceError("internal: no traced value among the arguments")


def _unary(fn):
    def op(x, *args, **kwargs):
        if isinstance(x, (int, float)):
            x = Traced(_num(x), _CURRENT[-1])
        return Traced(fn(_expr(x)), x.tracer)

    return op


def _fn(name: str):
    return FUNCTIONS[name][2]


def _clamp(x, min=None, max=None, *, out=None):  # noqa: A002 - torch's keyword names
    lo = None if min is None else _expr(min)
    hi = None if max is None else _expr(max)
    e = _expr(x)
    if lo is not None and e.free_symbols and e.free_symbols <= set(LEN.values()) and lo.is_number and lo <= 1:
        lo = None  # a length is at least one token: clamp(len, min=1) is len
    return Traced(FUNCTIONS["clamp"][2](e, lo, hi), _tracer_of(x))


def _softplus(x, beta=1, threshold=20):
    b = _expr(beta)
    return Traced(_fn("softplus")(b * _expr(x)) / b, _tracer_of(x))


def _where(cond, a, b):
    t = _CURRENT[-1]
    return a if t.decide_any(cond) else b


def _two(fn):
    def op(a, b, *args, **kwargs):
        return Traced(fn(_expr(a), _expr(b)), _tracer_of(a, b))

    return op


def _reduce(x, *args, **kwargs):
    return x  # a mean or sum over the batch: the per-pair loss is what is traced


def _sort(*args, **kwargs):
    raise OutsideFragmentError(
        "torch.sort over the batch: the loss of one pair depends on the other pairs' values (as AOT's sorted "
        "log-ratios do), so it is not a function of one pair's log-probabilities"
    )


TORCH: dict[str, Any] = {
    **{n: _unary(_fn(n)) for n in ("exp", "log", "log1p", "expm1", "sigmoid", "tanh", "abs", "sqrt", "relu")},
    "log_sigmoid": _unary(_fn("logsigmoid")),
    "logsigmoid": _unary(_fn("logsigmoid")),
    "softplus": _softplus,
    "neg": _unary(lambda e: -e),
    "negative": _unary(lambda e: -e),
    "square": _unary(lambda e: e**2),
    "clamp": _clamp,
    "clip": _clamp,
    "clamp_min": lambda x, m: _clamp(x, min=m),
    "clamp_max": lambda x, m: _clamp(x, max=m),
    "maximum": _two(sympy.Max),
    "minimum": _two(sympy.Min),
    "max": _two(sympy.Max),
    "min": _two(sympy.Min),
    "logaddexp": _two(lambda a, b: sympy.log(sympy.exp(a) + sympy.exp(b))),
    "add": _two(lambda a, b: a + b),
    "sub": _two(lambda a, b: a - b),
    "mul": _two(lambda a, b: a * b),
    "div": _two(lambda a, b: a / b),
    "pow": _two(lambda a, b: a**b),
    "where": _where,
    "mean": _reduce,
    "sum": _reduce,
    "sort": _sort,
    "__getitem__": lambda x, i: x,
}
TORCH["get"] = TORCH["__getitem__"]
METHODS: dict[str, Any] = {n: TORCH[n] for n in ("exp", "log", "log1p", "expm1", "sigmoid", "tanh", "abs", "sqrt")}
METHODS.update({n: TORCH[n] for n in ("relu", "neg", "square", "clamp", "clip", "clamp_min", "clamp_max")})
METHODS.update({"mean": _reduce, "sum": _reduce, "pow": TORCH["pow"], "logsigmoid": TORCH["logsigmoid"]})
_IDENTITY_METHODS = {"float", "double", "half", "bfloat16", "to", "detach", "contiguous", "squeeze", "unsqueeze"}
_IDENTITY_METHODS |= {"view", "reshape", "flatten", "clone", "cpu", "cuda", "expand", "view_as", "bool", "type_as"}
_CURRENT: list[Tracer] = []


class Tracer:
    """Holds the values that decide conditions (hyperparameters' given or default values) during one trace."""

    def __init__(self, values: dict[sympy.Symbol, float]) -> None:
        self.values = values

    def value(self, e: sympy.Expr) -> float | None:
        v = sympy.sympify(e).xreplace({s: _num(x) for s, x in self.values.items()})
        return float(v) if v.is_number and v.is_real else None

    def decide(self, rel: sympy.Basic) -> bool:
        from dpalogic.analysis.decompile import VARIABLES

        if rel.free_symbols & VARIABLES:
            raise TraceError(
                f"the condition {rel} depends on the log-probabilities: the loss is piecewise in them, so no one "
                "branch is the loss (a condition fixed by hyperparameters picks a branch)"
            )
        v = rel.xreplace({s: _num(x) for s, x in self.values.items()})
        if v in (sympy.true, sympy.false):
            return bool(v)
        missing = sorted(map(str, v.free_symbols))
        raise TraceError(f"the condition {rel} needs a value for {', '.join(missing)}: give --hp " + ", ".join(
            f"{m}=…" for m in missing
        ))  # fmt: skip

    def decide_any(self, cond) -> bool:
        if isinstance(cond, Condition):
            return self.decide(cond.rel)
        if isinstance(cond, Traced):
            return self.decide(sympy.Ne(cond.expr, 0))
        return bool(cond)

    def hyper(self, name: str, default: Any = None, given: dict[str, Any] | None = None) -> Any:
        """A hyperparameter: its --hp value (a number or text) if given, else a symbol that decides like its default."""
        given = given or {}
        if name in given:
            v = given[name]
            return Traced(_num(v), self) if isinstance(v, (int, float)) and not isinstance(v, bool) else v
        if default is not None and not isinstance(default, (int, float)) or isinstance(default, bool):
            return default  # a string, flag or object: passed as the code would get it
        s = sympy.Symbol(name, positive=True)
        if default is not None:
            self.values[s] = default
        return Traced(s, self)


class Namespace:
    """``self`` (and ``self.args`` …) of a method: every attribute is a hyperparameter named after it."""

    def __init__(self, tracer: Tracer, given: dict[str, Any], defaults: dict[str, Any] | None = None) -> None:
        self._tracer, self._given, self._defaults = tracer, given, defaults or {}

    def __getattr__(self, name: str):
        if name.startswith("__"):
            raise AttributeError(name)
        if name in ("args", "config", "cfg", "hparams", "loss_config", "loss"):
            return self
        return self._tracer.hyper(name, self._defaults.get(name), self._given)


class _Shim(types.ModuleType):
    """A module that is ``base`` except for the attributes in ``over`` (torch.tensor, torch.where, math.log …)."""

    def __init__(self, base: types.ModuleType, over: dict[str, Any]) -> None:
        super().__init__(base.__name__)
        self._base, self._over = base, over

    def __getattr__(self, name: str):
        return self._over[name] if name in self._over else getattr(self._base, name)


def _math_fn(name: str):
    real = getattr(math, name)

    def fn(*args):
        if any(isinstance(a, Traced) for a in args):
            return TORCH[name](*args)
        return real(*args)

    return fn


def _shims(module_globals: dict) -> dict[str, Any]:
    import torch

    def tensor(data, *args, **kwargs):
        return data if isinstance(data, (Traced, Condition)) else torch.tensor(data, *args, **kwargs)

    over = {"tensor": tensor, "as_tensor": tensor, "where": _where}
    out: dict[str, Any] = {}
    for name, value in module_globals.items():
        if value is torch:
            out[name] = _Shim(torch, over)
        elif value is math:
            out[name] = _Shim(math, {n: _math_fn(n) for n in ("log", "exp", "log1p", "expm1", "sqrt", "tanh")})
    return out


def call_traced(func, args: list, kwargs: dict, tracer: Tracer) -> Any:
    """Call ``func`` with its module's ``torch``/``math`` names swapped for shims, restored afterwards."""
    g = getattr(inspect.unwrap(func), "__globals__", {})
    swaps = _shims(g)
    saved = {k: g[k] for k in swaps}
    g.update(swaps)
    _CURRENT.append(tracer)
    try:
        return func(*args, **kwargs)
    finally:
        _CURRENT.pop()
        g.update(saved)


def _result_expr(out: Any) -> sympy.Expr:
    if isinstance(out, (tuple, list)) and out:
        out = out[0]  # (loss, chosen_rewards, …): the loss comes first
    if isinstance(out, dict) and "loss" in out:
        out = out["loss"]
    if not isinstance(out, Traced):
        raise TraceError(f"the function returned {type(out).__name__} {out!r}, not a loss of the log-probabilities")
    return out.expr


__all__ = ["Namespace", "TraceError", "Traced", "Tracer", "call_traced"]
