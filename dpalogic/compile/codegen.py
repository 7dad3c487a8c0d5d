"""Compiler backend: a loss program becomes a self-contained Python module with a fused Triton kernel.

For every program ``loss = Σ_k c_k · f_k(β_k · log ρ_k − γ_k)`` the generator writes straight-line code, once for
Triton and once for torch (the *twin*, same statements, torch functions), that computes the per-pair loss **and** its
derivative with respect to every log-probability input in one pass:

* each side's ``log WMC`` is its circuit (:mod:`dpalogic.semantics.circuit`), emitted by a fold: a positive literal
  is the log-prob itself, a negative one ``log1mexp`` of it, a product a sum and a genuine sum ``logaddexp`` — DPO's
  kernel is one logistic of four log-probs, ORPO's needs two ``log1mexp`` and no enumeration of worlds;
* derivatives are reverse mode over the same DAG (adjoints summed where subcircuits are shared), emitted as
  straight-line code: ``∂/∂a logaddexp(a, b) = σ(a − b)``, ``∂/∂x log1mexp(x) = −eˣ/(1 − eˣ)``;
* each link ``f`` and ``f′`` are printed from the link's SymPy expression (:mod:`dpalogic.semantics.links`) and
  SymPy's derivative of it, with shared parts computed once; the stable primitives (softplus, sigmoid, log1mexp,
  logaddexp) are the only hand-written helpers, once per backend;
* hyperparameters are kernel arguments (floats); token counts are inputs where a term is length-normalized.

The generated module holds ``loss_and_grads_torch`` (the twin), ``loss_and_grads_triton`` (launches the kernel), a
``torch.autograd.Function`` that saves the gradients and scales them by ``grad_output`` in backward, and
``per_pair_loss(..., backend=)``. It imports triton lazily (guarded), so it imports and runs its torch twin on machines
without triton. Output is deterministic (no timestamps, sorted names): ``dpalogic compile --catalog`` rewrites
``generated/`` byte for byte.

This module imports only SymPy and dpalogic's symbolic stages; torch is needed only to *load* a generated module.
"""

from __future__ import annotations

import hashlib
import inspect
import keyword
import linecache
import os
import shlex
import sys
import types
from dataclasses import dataclass, field
from pathlib import Path

import sympy
from sympy.printing.precedence import PRECEDENCE
from sympy.printing.str import StrPrinter

from dpalogic.errors import DPALogicError
from dpalogic.language.syntax import Atom
from dpalogic.runtime.backend import backend_rule
from dpalogic.semantics import circuit
from dpalogic.semantics.links import PRIMITIVES, Z
from dpalogic.semantics.program import LINKS, Program, Term, circuit_text, side_circuit

REGENERATE = "dpalogic compile --catalog"
BLOCK = 1024  # pairs per Triton program: the kernel is elementwise, so any power of two that fills a warp works

# --------------------------------------------------------------------------------------------------- names


def input_name(atom: Atom) -> str:
    """The argument that carries an atom's summed log-probability: ``M(yw)`` → ``chosen_logps``."""
    fixed = {
        "M(yw)": "chosen_logps",
        "M(yl)": "rejected_logps",
        "Ref(yw)": "ref_chosen_logps",
        "Ref(yl)": "ref_rejected_logps",
    }
    if atom.name in fixed:
        return fixed[atom.name]
    return ("logps_" if atom.pred == "M" else "ref_logps_") + atom.answer


def length_name(answer: str) -> str:
    """The argument that carries an answer's token count: ``yw`` → ``chosen_lengths``."""
    return {"yw": "chosen_lengths", "yl": "rejected_lengths"}.get(answer, f"lengths_{answer}")


def _var(atom: Atom) -> str:
    """The kernel variable of an atom's log-weight: ``M(yw)`` → ``m_yw``, ``Ref(yl)`` → ``ref_yl``."""
    return ("m_" if atom.pred == "M" else "ref_") + atom.answer


def length_answers(program: Program) -> tuple[str, ...]:
    """The answers whose token counts a compiled module takes (those of its length-normalized terms), in order."""
    answers = {a.answer for t in program.terms if t.normalized for a in t.structure.atoms}
    return tuple(sorted(answers, key=lambda s: Atom("M", s).sort_key))


def _ident(name: str) -> str:
    if not name.isidentifier() or keyword.iskeyword(name):
        raise DPALogicError(f"module name {name!r} must be a Python identifier (letters, digits, underscores)")
    return name


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


# --------------------------------------------------------------------------------------------------- emitter


@dataclass
class _Body:
    """Straight-line statements for one flavor (``""`` torch, ``"_tl"`` Triton); helper names carry the suffix."""

    sfx: str
    lines: list[str] = field(default_factory=list)
    l1m: dict[str, str] = field(default_factory=dict)  # input variable → its log1mexp variable
    grads: dict[str, list[str]] = field(default_factory=dict)  # variable → signed adjoint contributions
    sums: list[str] = field(default_factory=list)  # logaddexp variables, in emission order
    sum_var: dict[int, str] = field(default_factory=dict)  # circuit sum node → its logaddexp variable
    used: set[str] = field(default_factory=set)  # helpers the statements call
    zvar: str = ""  # the link argument being emitted (dtype of indicator functions)
    counter: int = 0
    grad_slot: list[int] = field(default_factory=list)  # input → its distinct gradient (inputs may share one)

    def emit(self, line: str) -> None:
        self.lines.append(line)

    def helper(self, name: str) -> str:
        self.used.add(name)  # the module emits exactly the helpers its statements asked for
        return f"_{name}{self.sfx}"

    def fresh(self, stem: str) -> str:
        self.counter += 1
        return f"{stem}{self.counter}"

    def contribute(self, var: str, term: str) -> None:
        self.grads.setdefault(var, []).append(term)


def _scale(adj: str, factor: str) -> str:
    return factor if adj == "1.0" else f"{adj} * {factor}"


def _circuit_forward(body: _Body, root: circuit.Node, names: list[str]) -> str:
    """Emit the forward code of a side's circuit (each shared node once); returns the expression of its root.

    Literals are the input names or their ``log1mexp`` variables, products are inline sums, and each ``sum`` node
    becomes one ``logaddexp`` call whose softmax weights (``s_wa``, ``s_wb``) the backward pass reuses.
    """

    def lit(i: int, positive: bool) -> str:
        v = names[i]
        if positive:
            return v
        if v not in body.l1m:
            body.emit(f"l1m_{v}, dl1m_{v} = {body.helper('log1mexp')}({v}, TINY)")
            body.l1m[v] = f"l1m_{v}"
        return body.l1m[v]

    def lae(parts: list[str]) -> str:
        s = body.fresh("s")
        body.emit(f"{s}, {s}_wa, {s}_wb = {body.helper('logaddexp')}({parts[0]}, {parts[1]})")
        body.sums.append(s)
        return s

    first = len(body.sums)
    out = circuit.fold(root, lit=lit, one=lambda: "zero", prod=" + ".join, sum=lae)
    # the fold visits nodes in topological order: the k-th sum node of this circuit got the k-th new name
    sum_nodes = [n for n in circuit.topological(root) if n.op == "sum"]
    for node, name in zip(sum_nodes, body.sums[first:]):
        body.sum_var.setdefault(id(node), name)
    return out


def _circuit_backward(body: _Body, root: circuit.Node, adj: str, sign: str, names: list[str]) -> None:
    """Reverse mode over the circuit: adjoints flow from the root to the literals, summed where subcircuits are
    shared, and each literal's adjoint is collected on its variable with ``sign`` (``+`` for ✓, ``-`` for ✗)."""
    adjoint: dict[int, list[str]] = {id(root): [adj]}
    for node in reversed(circuit.topological(root)):
        parts = adjoint.pop(id(node), [])
        if not parts or node.op == "one":
            continue
        a = parts[0] if len(parts) == 1 else "(" + " + ".join(parts) + ")"
        if node.op == "lit":
            v = names[node.atom] if node.positive else body.l1m[names[node.atom]]
            body.contribute(v, sign + a)
        elif node.op == "prod":
            for c in node.children:
                adjoint.setdefault(id(c), []).append(a)
        else:
            s = body.sum_var[id(node)]
            adjoint.setdefault(id(node.children[0]), []).append(_scale(a, f"{s}_wa"))
            adjoint.setdefault(id(node.children[1]), []).append(_scale(a, f"{s}_wb"))


def _sum_terms(terms: list[str]) -> str:
    out = ""
    for t in terms:
        if t.startswith("-"):
            out += f" - {t[1:]}" if out else t
        else:
            out += f" + {t[1:]}" if out else t[1:]
    return out


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


def check_link(link) -> None:
    """Raise a :class:`DPALogicError` unless the link and its derivative can be emitted for torch and Triton."""
    for sfx in ("", "_tl"):
        _emit_link(_Body(sfx), link, 1, {}, lambda v, stem: _py(sympy.sympify(v), 2))


def _emit_link(body: _Body, link, k: int, params: dict, const, z: tuple[str, str] | None = None) -> bool:
    """``f{k} = f(z{k})`` and ``df{k} = f'(z{k})`` from the link's expression; shared parts computed once.

    ``z`` is the text of ``z{k}`` and of ``−z{k}``: when the link uses z only as −z (the logistic link, softplus(−z)),
    −z is computed directly, one pass fewer. A derivative with a leading minus (−σ(−z)) is emitted as
    ``ndf{k} = −f'(z{k})`` and True returned: the caller folds the sign into its scalar factor, another pass fewer.
    """
    zs = sympy.Symbol(f"z{k}", real=True)
    values = {s: params.get(name, default) for name, default in link.params for s in [sympy.Symbol(name, real=True)]}
    names = {s: const(v, "p") for s, v in values.items()}
    f = link.expr.xreplace({Z: zs})
    df = link.derivative.xreplace({Z: zs})
    temps, (f, df) = sympy.cse([f, df], symbols=sympy.numbered_symbols(f"u{k}_"), optimizations="basic")
    body.zvar = f"z{k}"
    printer = _LinkPrinter(body, names)
    printer.dynamic.add(zs)
    rest = [e for _, e in temps] + [f, df]
    neg_z = next((sym for sym, e in temps if e == -zs and sum(zs in r.free_symbols for r in rest) == 1), None)
    if z is not None and neg_z is not None:
        body.zvar = str(neg_z)
    elif z is not None:
        body.emit(f"z{k} = {z[0]}")
    for sym, e in temps:
        if not printer._scalar(e):
            printer.dynamic.add(sym)
        body.emit(f"{sym} = {z[1] if z is not None and sym == neg_z else printer.doprint(e)}")
    body.emit(f"f{k} = {printer.doprint(f)}")
    if printer._scalar(df):  # a linear link: a constant derivative, made a tensor (every gradient is one)
        zeros = "tl.zeros_like" if printer.tl else "torch.zeros_like"
        body.emit(f"df{k} = {zeros}({body.zvar}) + {printer.doprint(df)}")
        return False
    if df.could_extract_minus_sign():
        body.emit(f"ndf{k} = {printer.doprint(-df)}  # -f'(z{k})")
        return True
    body.emit(f"df{k} = {printer.doprint(df)}")
    return False


def _term_comment(k: int, t: Term) -> list[str]:
    s = t.structure
    top = circuit_text(side_circuit(s.top, s.n), s.atoms)
    bot = circuit_text(side_circuit(s.bottom, s.n), s.atoms)
    out = [f"# term {k}: {t.text()}{' (per token)' if t.normalized else ''}"]
    out.append(f"#   log WMC(top) = {top}")
    out.append(f"#   log WMC(bottom) = {bot}")
    return out


def _body(program: Program, sfx: str) -> _Body:
    """The straight-line loss-and-gradient statements of a program, for one flavor.

    Inputs are the variables ``m_yw``, ``ref_yl``, … (log-probs in the compute dtype) and ``n_yw``, … (token counts
    clamped to ≥ 1); outputs are ``loss`` and ``d_<input name>`` for every atom.
    """
    body = _Body(sfx)
    atoms = program.atoms
    normalized_vars: dict[str, tuple[str, str]] = {}  # token-level variable → (sequence variable, length variable)
    constants: list[str] = []
    const_cache: dict[str, str] = {}

    def const(e: sympy.Expr, stem: str) -> str:
        """An inline constant, or a named scalar computed once from the hyperparameters."""
        e = sympy.sympify(e)
        if e.is_Symbol or e.is_Number:
            return _py(e, 2)
        text = _py(e)
        if text not in const_cache:
            name = f"{stem}{len(const_cache) + 1}"
            const_cache[text] = name
            constants.append(f"{name} = {text}")
        return const_cache[text]

    # length-normalized weights first (shared by every term that uses them)
    for t in program.terms:
        if t.normalized:
            for a in t.structure.atoms:
                v = _var(a) + "_tok"
                if v not in normalized_vars:
                    normalized_vars[v] = (_var(a), f"n_{a.answer}")
    for v, (seq, n) in sorted(normalized_vars.items()):
        body.emit(f"{v} = {seq} / {n}  # per-token log-weight (length-normalized)")

    needs_zero = any(
        side_circuit(m, t.structure.n) is circuit.ONE
        for t in program.terms
        for m in (t.structure.top, t.structure.bottom)
    )
    if needs_zero:
        first = _var(atoms[0])
        body.emit(f"zero = {first} * 0.0  # log 1: a side that holds in every world")

    loss_parts: list[str] = []
    for k, t in enumerate(program.terms, 1):
        s = t.structure
        names = [_var(a) + ("_tok" if t.normalized else "") for a in s.atoms]
        for c in _term_comment(k, t):
            body.emit(c)
        top_circuit, bottom_circuit = side_circuit(s.top, s.n), side_circuit(s.bottom, s.n)
        top = _circuit_forward(body, top_circuit, names)
        bot = _circuit_forward(body, bottom_circuit, names)
        body.emit(f"top{k} = {top}")
        body.emit(f"bot{k} = {bot}")
        scale = const(t.scale, "k") if not _is_one(t.scale) else None
        z = f"{scale} * (top{k} - bot{k})" if scale else f"top{k} - bot{k}"
        shift = sympy.sympify(t.shift)
        if not _is_zero(shift):
            if shift.could_extract_minus_sign():
                z += f" + {const(-shift, 'g')}"
            else:
                z += f" - {const(shift, 'g')}"
        neg_z = f"{scale} * (bot{k} - top{k})" if scale else f"bot{k} - top{k}"
        if not _is_zero(shift):
            neg_z += f" - {const(-shift, 'g')}" if shift.could_extract_minus_sign() else f" + {const(shift, 'g')}"
        negated = _emit_link(body, LINKS[t.link], k, dict(t.link_params), const, (z, neg_z))
        coef = sympy.sympify(t.coef)
        if negated:  # the factor carries the derivative's sign: (−β)·ndf is one pass, β·(−ndf) two
            grad_factor = f"-{scale} * ndf{k}" if scale else f"-ndf{k}"
        else:
            grad_factor = f"{scale} * df{k}" if scale else f"df{k}"
        if coef.free_symbols:
            # a coefficient may vanish (label smoothing 0, alpha 0): the term then contributes exactly nothing
            c = const(coef, "c")
            loss_parts.append(f"{body.helper('scaled')}({c}, f{k})")
            cf = (f"-{c}", f"ndf{k}") if negated and not scale else (c, grad_factor)  # the sign on the scalar
            body.emit(f"a{k} = {body.helper('scaled')}({cf[0]}, {cf[1]})  # d loss / d log rho_{k}")
        elif _is_one(coef):
            loss_parts.append(f"f{k}")
            body.emit(f"a{k} = {grad_factor}  # d loss / d log rho_{k}")
        else:
            c = _py(coef, 2)
            loss_parts.append(f"{c} * f{k}")
            body.emit(f"a{k} = {c} * {grad_factor}  # d loss / d log rho_{k}")
        _circuit_backward(body, top_circuit, f"a{k}", "+", names)
        _circuit_backward(body, bottom_circuit, f"a{k}", "-", names)

    body.emit("loss = " + " + ".join(loss_parts))
    body.emit("# backward: the chain rule through the plans, collected per input")
    # log1mexp variables first: their adjoints flow into the variable they were computed from
    for v, lv in sorted(body.l1m.items()):
        if lv in body.grads:
            body.emit(f"g_{lv} = {_sum_terms(body.grads[lv])}")
            body.contribute(v, f"+g_{lv} * d{lv}")
    for v in sorted(normalized_vars):
        if v in body.grads:
            body.emit(f"g_{v} = {_sum_terms(body.grads[v])}")
    same: dict[str, str] = {}  # gradient expression → the first input given it
    slot: dict[str, int] = {}  # gradient expression → its distinct gradient's index
    for a in atoms:
        v = _var(a)
        parts = list(body.grads.get(v, []))
        tok = v + "_tok"
        if tok in normalized_vars and tok in body.grads:
            parts.append(f"+g_{tok} / n_{a.answer}")
        rhs = _sum_terms(parts) if parts else f"{v} * 0.0"
        # an input whose gradient is another's (DPO: d chosen = d ref rejected) names that one in the twin (one tensor,
        # saved once); the kernel stores each distinct gradient once
        name = f"d_{input_name(a)}"
        if rhs not in same or not sfx:
            body.emit(f"{name} = {same.get(rhs, rhs)}")
        same.setdefault(rhs, name)
        body.grad_slot.append(slot.setdefault(rhs, len(slot)))
    body.lines = constants + body.lines
    return body


# --------------------------------------------------------------------------------------------------- helpers (text)

# Each helper exists twice: torch (no suffix) and Triton (``_tl``). Triton's core language has no log1p/expm1 that
# also runs in the interpreter, so the Triton helpers build them from series near 0 and exp/log elsewhere.

_TORCH_HELPERS: dict[str, str] = {
    "softplus": '''
def _softplus(x: torch.Tensor) -> torch.Tensor:
    """log(1 + e^x) without overflow (torch's fused kernel; linear beyond 20, relative error below e^-20)."""
    return torch.nn.functional.softplus(x)
''',
    "scaled": '''
def _scaled(c: float, v: torch.Tensor) -> torch.Tensor:
    """c * v, and exactly 0 when c == 0 (a switched-off term contributes nothing, not 0 * inf)."""
    return c * v if c != 0.0 else torch.zeros_like(v)
''',
    "log1mexp": '''
def _log1mexp(x: torch.Tensor, tiny: float) -> tuple[torch.Tensor, torch.Tensor]:
    """log(1 - e^x) and its derivative -e^x / (1 - e^x), accurate on both sides of -log 2.

    x is clamped just below 0 (p = 1 gives a large finite value); the derivative is 0 where the clamp is active.
    Every step is one elementwise pass (no torch.where, which evaluates both branches and is slow on the CPU).
    """
    xc = torch.clamp(x, max=-tiny)
    # w = e^x / (1 - e^x) to full relative accuracy for every x (expm1: no cancellation near 0); then
    # log(1 - e^x) = -log(1 + w) is one log1p, accurate on both sides of -log 2, and the derivative is -w.
    # In-place steps on the fresh temporaries: each new [B] buffer costs more than the arithmetic on it.
    w = torch.exp(xc).div_(torch.expm1(xc).neg_())
    value = torch.log1p(w).neg_()
    # 1 where x <= -tiny, 0 where the clamp holds x (x >= 0; a fraction at subnormal x), in float passes: a
    # comparison and a bool mask cost 5-10 times more on the CPU
    unclamped = torch.clamp(x * (-1.0 / tiny), 0.0, 1.0)
    grad = w.neg_().mul_(unclamped)
    return value, grad
''',
    "logaddexp": '''
def _logaddexp(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """log(e^a + e^b) and its partial derivatives sigma(a - b), sigma(b - a)."""
    return torch.logaddexp(a, b), torch.sigmoid(a - b), torch.sigmoid(b - a)
''',
}

_TRITON_HELPERS: dict[str, str] = {
    "log1p": '''
    @triton.jit
    def _log1p_tl(u):
        """log(1 + u): 2 atanh(u / (2 + u)) as a series for |u| < 0.1 (no cancellation), the plain log elsewhere."""
        s = u / (2.0 + u)
        s2 = s * s
        series = 2.0 * s * (1.0 + s2 * (1.0 / 3 + s2 * (0.2 + s2 * (1.0 / 7 + s2 * (1.0 / 9 + s2 * (1.0 / 11))))))
        return tl.where(tl.abs(u) < 0.1, series, tl.log(1.0 + u))
''',
    "sigmoid": '''
    @triton.jit
    def _sigmoid_tl(x):
        """sigma(x) from e^(-|x|) <= 1: no overflow for any x."""
        e = tl.exp(-tl.abs(x))
        return tl.where(x >= 0.0, 1.0 / (1.0 + e), e / (1.0 + e))
''',
    "softplus": '''
    @triton.jit
    def _softplus_tl(x):
        """log(1 + e^x) without overflow."""
        return tl.maximum(x, 0.0) + _log1p_tl(tl.exp(-tl.abs(x)))
''',
    "scaled": '''
    @triton.jit
    def _scaled_tl(c, v):
        """c * v, and exactly 0 when c == 0 (a switched-off term contributes nothing, not 0 * inf)."""
        return tl.where(c != 0.0, c * v, 0.0)
''',
    "log1mexp": '''
    @triton.jit
    def _log1mexp_tl(x, TINY: tl.constexpr):
        """log(1 - e^x) and its derivative -e^x / (1 - e^x); x is clamped just below 0, as in the torch twin."""
        xc = tl.minimum(x, -TINY)
        u = tl.exp(xc)
        # 1 - e^x: -expm1(x) by its Taylor series in Horner form for x > -0.1 (no cancellation), directly elsewhere
        h = 1.0 + xc / 12
        h = 1.0 + xc / 11 * h
        h = 1.0 + xc / 10 * h
        h = 1.0 + xc / 9 * h
        h = 1.0 + xc / 8 * h
        h = 1.0 + xc / 7 * h
        h = 1.0 + xc / 6 * h
        h = 1.0 + xc / 5 * h
        h = 1.0 + xc / 4 * h
        h = 1.0 + xc / 3 * h
        h = 1.0 + xc / 2 * h
        q = tl.where(xc > -0.1, -xc * h, 1.0 - u)
        value = tl.where(xc > -0.6931471805599453, tl.log(q), _log1p_tl(-u))  # -log 2
        grad = tl.where(x <= -TINY, -u / q, 0.0)
        return value, grad
''',
    "logaddexp": '''
    @triton.jit
    def _logaddexp_tl(a, b):
        """log(e^a + e^b) and its partial derivatives sigma(a - b), sigma(b - a)."""
        d = a - b
        e = tl.exp(-tl.abs(d))
        big, small = 1.0 / (1.0 + e), e / (1.0 + e)
        return tl.maximum(a, b) + _log1p_tl(e), tl.where(d >= 0.0, big, small), tl.where(d >= 0.0, small, big)
''',
}

# what each helper calls (so only the helpers a program needs are emitted, in dependency order)
_TRITON_DEPS = {"softplus": ("log1p",), "log1mexp": ("log1p",), "logaddexp": ("log1p",)}
_TORCH_DEPS: dict[str, tuple[str, ...]] = {}
_ORDER = (
    "log1p",
    "sigmoid",
    "softplus",
    "scaled",
    "log1mexp",
    "logaddexp",
)


def _closure(names: set[str], deps: dict[str, tuple[str, ...]]) -> list[str]:
    out = set()
    todo = list(names)
    while todo:
        n = todo.pop()
        if n not in out:
            out.add(n)
            todo.extend(deps.get(n, ()))
    return [n for n in _ORDER if n in out]


# --------------------------------------------------------------------------------------------------- the module


@dataclass(frozen=True)
class Compiled:
    """A generated module's source and what it was generated from."""

    name: str
    source: str
    program: Program
    atoms: tuple[Atom, ...]
    inputs: tuple[str, ...]
    answers: tuple[str, ...]  # answers whose token counts some length-normalized term needs
    hyperparameters: dict[str, float]


def _indent(lines: list[str], n: int) -> list[str]:
    pad = " " * n
    return [pad + ln if ln else ln for ln in lines]


def _docstring_header(
    name: str, program: Program, title: str | None, citation: str | None, origin: str, command: str
) -> list[str]:
    atoms = program.atoms
    origin, command = _doc_text(origin), _doc_text(command)
    out = [f'"""Generated by dpalogic from {origin}. Do not edit: regenerate with `{command}`.', ""]
    if title:
        out.append(f"{name}: {title}" + (f" ({citation})" if citation else ""))
        out.append("")
    out.append("program  " + " + ".join(f"[{t.text()}]" for t in program.terms))
    for k, t in enumerate(program.terms, 1):
        s = t.structure
        out.append(f"term {k}   {t.text()}" + ("   (per-token log-probs)" if t.normalized else "") + f"   [{t.role}]")
        out.append(f"         structure {s.text('ascii')}")
        from dpalogic.language.syntax import to_ascii

        out.append(f"         top    {to_ascii(s.top_formula)}")
        out.append(f"         bottom {to_ascii(s.bottom_formula)}")
        out.append(
            "         log rho = "
            + circuit_text(side_circuit(s.top, s.n), s.atoms)
            + " - ("
            + circuit_text(side_circuit(s.bottom, s.n), s.atoms)
            + ")"
        )
    out.append("inputs   " + ", ".join(f"{input_name(a)} = log {a.name}" for a in atoms))
    hp = ", ".join(f"{k}={v!r}" for k, v in sorted(program.defaults.items()))
    out.append(f"hyperparameters (defaults)  {hp or '(none)'}")
    out.append("")
    out.append("Inputs are per-sequence summed log-probs [B]; length-normalized terms divide them by the token counts")
    out.append("(clamped to >= 1). `per_pair_loss` returns the loss of every pair; its backward scales gradients that")
    out.append("the forward pass already computed (one fused pass: Triton on CUDA, the torch twin elsewhere).")
    out.append('"""')
    return out


def _doc_text(text: str) -> str:
    """User text (a formula, a path, a name) made safe inside the module docstring.

    Backslashes, quotes, control and non-ASCII characters are written as escapes, so the text can neither end the
    docstring nor form an invalid escape (a path with ``\\N`` or ``\"\"\"``); the docstring still reads back as the text.
    """
    return text.encode("unicode_escape").decode("ascii").replace('"', '\\"')


def _lit(x) -> str:
    """A Python literal with double-quoted strings (what ``ruff format`` would write)."""
    if isinstance(x, str):
        return '"' + x.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(x, tuple):
        if len(x) == 1:
            return f"({_lit(x[0])},)"
        return "(" + ", ".join(_lit(v) for v in x) + ")"
    if isinstance(x, dict):
        return "{" + ", ".join(f"{_lit(k)}: {_lit(v)}" for k, v in x.items()) + "}"
    return repr(x)


LINE = 120


def _wrap_call(indent: int, head: str, args: list[str], tail: str = ")") -> list[str]:
    """``head(args)tail`` laid out as ruff format lays it out: one line, one indented line, or one per line."""
    pad = " " * indent
    one = f"{pad}{head}{', '.join(args)}{tail}"
    if len(one) <= LINE:
        return [one]
    inner = f"{pad}    {', '.join(args)}"
    if len(inner) <= LINE:
        return [f"{pad}{head}", inner, f"{pad}{tail}"]
    return [f"{pad}{head}", *[f"{pad}    {x}," for x in args], f"{pad}{tail}"]


def _wrap_body(lines: list[str], indent: int) -> list[str]:
    """Indent straight-line statements; an assignment too long for a line is split before its + and − operators."""
    pad = " " * indent
    out = []
    for ln in lines:
        full = pad + ln
        if len(full) <= LINE or ln.startswith("#") or " = " not in ln:
            out.append(full)
            continue
        lhs, rhs = ln.split(" = ", 1)
        if len(pad) + 4 + len(rhs) <= LINE:
            out += [f"{pad}{lhs} = (", f"{pad}    {rhs}", f"{pad})"]
            continue
        parts, depth, cur = [], 0, ""
        i = 0
        while i < len(rhs):
            c = rhs[i]
            depth += c in "([" and 1 or 0
            depth -= c in ")]" and 1 or 0
            if depth == 0 and rhs[i : i + 3] in (" + ", " - "):
                parts.append(cur)
                cur = rhs[i + 1]
                i += 3
                cur += " "
                continue
            cur += c
            i += 1
        parts.append(cur)
        out += [f"{pad}{lhs} = (", *[f"{pad}    {p}" for p in parts], f"{pad})"]
    return out


def compile_program(
    program: Program,
    name: str,
    *,
    title: str | None = None,
    citation: str | None = None,
    origin: str | None = None,
    command: str = REGENERATE,
) -> Compiled:
    """Generate the module source for a program (deterministic: the same program gives the same bytes)."""
    name = _ident(name)
    atoms = program.atoms
    if not program.terms or not atoms:
        raise DPALogicError("the program has no terms over atoms: nothing to compile")
    for t in program.terms:
        t.structure.check()
        if t.link not in LINKS:  # pragma: no cover - Term validates its link
            raise DPALogicError(f"unknown link {t.link!r}")
    inputs = tuple(input_name(a) for a in atoms)
    answers = length_answers(program)
    lengths = tuple(length_name(a) for a in answers)
    hp = dict(sorted(program.defaults.items()))
    origin = origin or (f"the catalog program {program.name!r}" if program.name else "a derived program")

    torch_body = _body(program, "")
    tl_body = _body(program, "_tl")

    args = list(inputs + lengths)
    kernel = f"{name}_fwd_bwd"
    rule = "# " + "-" * 100

    L: list[str] = _docstring_header(name, program, title, citation, origin, command)
    L += [
        "",
        "from __future__ import annotations",
        "",
        "import math",
        "import os",
        "",
        "import torch",
        "",
        "try:  # triton is optional: without it the torch twin below still runs",
        "    import triton",
        "    import triton.language as tl",
        "except ImportError:  # pragma: no cover",
        "    triton = None",
        "",
        "try:",
        "    from dpalogic.errors import DPALogicError as _InputError",
        "except ImportError:  # pragma: no cover - the module also works without dpalogic",
        "    _InputError = ValueError",
        "",
        f"NAME = {_lit(name)}",
        f"ATOMS = {_lit(tuple(a.name for a in atoms))}",
        f"INPUTS = {_lit(inputs)}",
        f"LENGTHS = {_lit(lengths)}",
        f"HYPERPARAMETERS = {_lit(hp)}",
        "# d loss / d INPUTS[i] is the GRAD_SLOT[i]-th distinct gradient: inputs with one gradient share one tensor",
        f"GRAD_SLOT = {_lit(tuple(torch_body.grad_slot))}",
        f"BLOCK = {BLOCK}",
        "LN2 = math.log(2.0)",
        "# @triton.jit picks Triton's interpreter or its compiler when this module is imported",
        'INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"',
        "",
        f"{rule} torch twin",
    ]
    for n in _closure(torch_body.used, _TORCH_DEPS):
        L += ["", "", *_TORCH_HELPERS[n].strip("\n").split("\n")]

    sig = [f"    {x}: torch.Tensor," for x in args]
    if hp:
        sig += ["    *,", *[f"    {k}: float," for k in hp]]
    L += ["", "", "def loss_and_grads_torch(", *sig, ") -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:"]
    L += [
        '    """The loss of every pair and d loss / d input for every log-prob input, in the compute dtype."""',
        f"    dt = torch.float64 if {inputs[0]}.dtype == torch.float64 else torch.float32",
    ]
    if torch_body.l1m:
        L.append("    TINY = torch.finfo(dt).tiny")
    L += [f"    {_var(a)} = {x}.to(dt)" for a, x in zip(atoms, inputs)]
    L += [f"    n_{ans} = {ln}.to(dt).clamp(min=1.0)" for ans, ln in zip(answers, lengths)]
    L += _wrap_body(torch_body.lines, 4)
    grads = [f"d_{x}" for x in inputs]
    L += _wrap_call(4, "return loss, (", grads, ")") if len(grads) > 1 else [f"    return loss, (d_{inputs[0]},)"]

    L += ["", "", f"{rule} Triton kernel", "", "if triton is not None:", ""]
    helpers = _closure(tl_body.used, _TRITON_DEPS)
    for i, n in enumerate(helpers):
        if i:
            L.append("")
        L += _TRITON_HELPERS[n].strip("\n").split("\n")
    if helpers:
        L.append("")
    distinct = [x for i, x in enumerate(inputs) if torch_body.grad_slot[i] not in torch_body.grad_slot[:i]]
    kargs = [f"{x}_ptr" for x in args] + ["loss_ptr"] + [f"d_{x}_ptr" for x in distinct] + ["n_pairs"]
    kargs += list(hp) + ["TINY: tl.constexpr", "BLOCK: tl.constexpr"]
    L += ["    @triton.jit", f"    def {kernel}(", *[f"        {a}," for a in kargs], "    ):"]
    L += [
        '        """BLOCK pairs per program: loads the log-probs, writes loss[B] and d loss / d log-prob of each input."""',
        "        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)",
        "        mask = offs < n_pairs",
        "        dt = loss_ptr.dtype.element_ty",
    ]
    L += [f"        {_var(a)} = tl.load({x}_ptr + offs, mask=mask, other=-1.0).to(dt)" for a, x in zip(atoms, inputs)]
    L += [
        f"        n_{ans} = tl.maximum(tl.load({ln}_ptr + offs, mask=mask, other=1).to(dt), 1.0)"
        for ans, ln in zip(answers, lengths)
    ]
    L += _wrap_body(tl_body.lines, 8)
    L.append("        tl.store(loss_ptr + offs, loss, mask=mask)")
    L += [f"        tl.store(d_{x}_ptr + offs, d_{x}, mask=mask)" for x in distinct]
    L += ["", f"    KERNEL = {kernel}", "else:  # pragma: no cover", "    KERNEL = None"]
    L += [
        "",
        "",
        "def triton_available(device: torch.device) -> bool:",
        '    """Can the kernel run on this device: CUDA with triton, or any device in Triton\'s interpreter."""',
        '    return KERNEL is not None and (device.type == "cuda" or INTERPRETED)',
        "",
        "",
        "def loss_and_grads_triton(",
        *sig,
        ") -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:",
        '    """The same as `loss_and_grads_torch`, from one launch of the fused kernel (inputs: contiguous, 1-D)."""',
        f"    if not triton_available({inputs[0]}.device):",
        "        raise _InputError(",
        '            "the triton backend needs CUDA tensors, or TRITON_INTERPRET=1 set before triton and this module "',
        '            "are imported (the CPU interpreter)"',
        "        )",
        f"    dt = torch.float64 if {inputs[0]}.dtype == torch.float64 else torch.float32",
        f"    n = {inputs[0]}.numel()",
        f"    loss = torch.empty(n, dtype=dt, device={inputs[0]}.device)",
        f"    grads = [torch.empty_like(loss) for _ in range({len(distinct)})]",
        "    if n:",
        "        grid = (triton.cdiv(n, BLOCK),)",
    ]
    launch = [*args, "loss", "*grads", "n", *[f"float({k})" for k in hp], "TINY=torch.finfo(dt).tiny", "BLOCK=BLOCK"]
    L += _wrap_call(8, "KERNEL[grid](", launch)
    L.append("    return loss, tuple(grads[k] for k in GRAD_SLOT)")

    L += [
        "",
        "",
        "class LossFunction(torch.autograd.Function):",
        '    """Forward computes the loss and all its gradients in one pass; backward scales them by grad_output."""',
        "",
        "    @staticmethod",
        "    def forward(ctx, use_triton: bool, hyperparameters: dict, *tensors: torch.Tensor) -> torch.Tensor:",
        '        """tensors: the log-prob inputs (INPUTS order), then the token counts (LENGTHS), all of one shape."""',
        "        shape = tensors[0].shape",
        "        if use_triton:  # the kernel reads and writes contiguous 1-D buffers",
        "            flat = [t.reshape(-1).contiguous() for t in tensors]",
        "            loss, grads = loss_and_grads_triton(*flat, **hyperparameters)",
        "            loss, grads = loss.reshape(shape), [d.reshape(shape) for d in grads]",
        "        else:  # elementwise torch ops take the tensors as they are",
        "            loss, grads = loss_and_grads_torch(*tensors, **hyperparameters)",
        "        # inputs with one gradient (DPO: d chosen = d ref rejected) share one tensor: saved and scaled once",
        "        ctx.save_for_backward(*[grads[GRAD_SLOT.index(k)] for k in range(max(GRAD_SLOT) + 1)])",
        "        ctx.dtypes = [t.dtype for t in tensors[: len(INPUTS)]]",
        "        return loss",
        "",
        "    @staticmethod",
        "    def backward(ctx, grad_loss: torch.Tensor):",
        "        saved, scaled = ctx.saved_tensors, {}",
        "        out = []",
        "        for k, dt, need in zip(GRAD_SLOT, ctx.dtypes, ctx.needs_input_grad[2:]):",
        "            if need and (k, dt) not in scaled:",
        "                g = grad_loss * saved[k]",
        "                if dt.itemsize < g.dtype.itemsize:  # narrower inputs (bfloat16, float16) get gradients in their",
        "                    # dtype, saturated at its largest finite value: near log p = 0 the float32 gradient of a",
        "                    # log1mexp(log p) factor (about 1/|log p|) is finite but exceeds float16's range",
        "                    g = g.clamp(-torch.finfo(dt).max, torch.finfo(dt).max).to(dt)",
        "                elif g.dtype != dt:  # a wider input (float64 among float32 ones) takes them as they are",
        "                    g = g.to(dt)",
        "                scaled[k, dt] = g",
        "            out.append(scaled[k, dt] if need else None)",
        "        return None, None, *out, *[None] * len(LENGTHS)",
    ]
    pp = [f"    {x}: torch.Tensor," for x in args]
    pp += ["    *,", *[f"    {k}: float = {v!r}," for k, v in hp.items()], '    backend: str = "auto",']
    hp_dict = "{" + ", ".join(f"{_lit(k)}: {k}" for k in hp) + "}"
    L += [
        "",
        "",
        "# the backend rule, copied from dpalogic.runtime.backend.backend_rule when this module was generated",
        *inspect.getsource(backend_rule).rstrip("\n").split("\n"),
        "",
        "",
        "def per_pair_loss(",
        *pp,
        ") -> torch.Tensor:",
        '    """The loss of every pair (inputs broadcast together), differentiable in every log-prob input.',
        "",
        '    backend: "auto" (Triton on CUDA tensors, the torch twin elsewhere), "triton" or "torch".',
        '    """',
        *_wrap_call(4, "tensors = (", args, ")" if len(args) > 1 else ",)"),
        "    shape, device = tensors[0].shape, tensors[0].device",
        "    if any(t.shape != shape for t in tensors):  # views of one shape, made only when the shapes differ",
        "        tensors = torch.broadcast_tensors(*tensors)",
        "    if any(t.device != device for t in tensors):",
        '        raise _InputError("all inputs must be on the same device")',
        '    use_triton, refused = backend_rule(backend, device.type == "cuda", KERNEL is not None, INTERPRETED)',
        "    if refused:",
        "        raise _InputError(refused)",
        f"    return LossFunction.apply(use_triton, {hp_dict}, *tensors)",
    ]
    src = "\n".join(L).rstrip("\n") + "\n"
    return Compiled(name, src, program, atoms, inputs, answers, hp)


# --------------------------------------------------------------------------------------------------- catalog & loading


def compile_catalog_entry(name: str) -> Compiled:
    from dpalogic.semantics.catalog import lookup

    e = lookup(name)
    return compile_program(e.program, e.name, title=e.title, citation=e.citation)


def compile_spec(
    spec, name: str | None = None, command: str | None = None, link: str | None = None, hyperparameters=None
) -> Compiled:
    """A catalog name, structure text, Structure or Program → its compiled module source.

    ``command`` is the command line written into the header as the way to regenerate the file; ``link`` an
    expression in ``z`` that replaces the preference terms' link (its parameters' defaults from ``hyperparameters``).
    """
    from dpalogic.semantics.catalog import entries, resolve
    from dpalogic.semantics.program import with_link

    key = spec.strip().lower().replace("-", "_") if isinstance(spec, str) else None
    if key in entries() and name in (None, key) and link is None and not hyperparameters:
        return compile_catalog_entry(key)
    program = resolve(spec)
    if link is not None:
        program = with_link(program, link, hyperparameters)
    elif hyperparameters:
        program = program.with_hyperparameters(**program.bind(**hyperparameters))
    origin = None
    if isinstance(spec, str) and program.name is None:
        origin = f"the structure {spec.strip()!r}"
    name = name or program.name or "derived"
    command = command or (
        f"dpalogic compile {_shell_quote(spec.strip())} --name {name}" if isinstance(spec, str) else REGENERATE
    )
    return compile_program(program, name, origin=origin, command=command)


def _shell_quote(text: str) -> str:
    return shlex.quote(text)


_LOADED: dict[str, types.ModuleType] = {}


def load(compiled: Compiled) -> types.ModuleType:
    """Import a generated module from its source (cached by content); triton sees its source through linecache."""
    digest = hashlib.sha256(compiled.source.encode()).hexdigest()[:16]
    # @triton.jit picks the interpreter or the compiler when the module is executed: one module per mode
    mode = "interpret" if os.environ.get("TRITON_INTERPRET") == "1" else "jit"
    key = f"{digest}_{mode}"
    if key in _LOADED:
        return _LOADED[key]
    modname = f"dpalogic_generated_{compiled.name}_{key}"
    filename = f"<dpalogic-generated {compiled.name} {key}>"
    linecache.cache[filename] = (len(compiled.source), None, compiled.source.splitlines(True), filename)
    mod = types.ModuleType(modname)
    mod.__file__ = filename
    sys.modules[modname] = mod
    exec(compile(compiled.source, filename, "exec"), mod.__dict__)
    _LOADED[key] = mod
    return mod


def module_for(program: Program) -> types.ModuleType:
    """The loaded generated module of a program (what ``PreferenceLoss(backend=...)`` runs)."""
    return load(compile_program(program, _ident_from(program.name)))


def _ident_from(name: str | None) -> str:
    if not name:
        return "derived"
    out = "".join(c if c.isalnum() or c == "_" else "_" for c in name)
    return out if out.isidentifier() and not keyword.iskeyword(out) else "derived"


GENERATED_MARK = '"""Generated by dpalogic'


def _refuse_to_clobber(path: Path, overwrite: bool) -> None:
    """Replacing an earlier generated module is regeneration; replacing anything else needs ``--overwrite``."""
    if overwrite or not path.exists():
        return
    if path.is_dir():
        raise DPALogicError(f"{str(path)!r} is a folder: give a file path for --out")
    try:
        with path.open(encoding="utf-8") as f:
            head = f.read(len(GENERATED_MARK))
    except (OSError, UnicodeDecodeError):
        head = ""
    if head != GENERATED_MARK:
        raise DPALogicError(f"{str(path)!r} exists and was not generated by dpalogic; pass --overwrite to replace it")


def write_catalog(out_dir: Path, overwrite: bool = False) -> list[Path]:
    """Write ``<out_dir>/<name>.py`` for every catalog loss; returns the paths written.

    A file there that dpalogic did not generate is left alone (an error) unless ``overwrite``.
    """
    from dpalogic.semantics.catalog import entries

    out_dir.mkdir(parents=True, exist_ok=True)
    names = sorted(entries())
    for name in names:
        _refuse_to_clobber(out_dir / f"{name}.py", overwrite)
    paths = []
    for name in names:
        path = out_dir / f"{name}.py"
        path.write_text(compile_catalog_entry(name).source, encoding="utf-8")
        paths.append(path)
    return paths
