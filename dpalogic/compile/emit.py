"""The straight-line statements of a program: circuit folds forward, reverse mode backward, links printed."""

from __future__ import annotations

from dataclasses import dataclass, field

import sympy

from dpalogic.compile.names import _var, input_name
from dpalogic.compile.printers import _is_one, _is_zero, _LinkPrinter, _py
from dpalogic.semantics import circuit
from dpalogic.semantics.links import Z
from dpalogic.semantics.program import LINKS, Program, Term, circuit_text, structure_circuits

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
    grad_sign: list[float] = field(default_factory=list)  # input → ±1: its gradient is that one, or its negation
    uses_margin: bool = False  # some term's z is shifted by the per-pair margin

    def shift_by_margin(self, var: str, sign: str) -> None:
        """``var {sign}= margin_i`` when a per-pair margin is given: a branch on its presence (a ``constexpr`` in the
        kernel), so the loss without margins runs exactly the statements it ran before."""
        self.uses_margin = True
        if self.sfx:
            self.emit("if HAS_MARGIN:")
            self.emit(f"    {var} = {var} {sign} tl.load(pair_margin_ptr + offs, mask=mask, other=0.0).to(dt)")
        else:
            self.emit("if pair_margin is not None:")
            self.emit(f"    {var} = {var} {sign} pair_margin")

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


def check_link(link) -> None:
    """Raise a :class:`DPALogicError` unless the link and its derivative can be emitted for torch and Triton."""
    for sfx in ("", "_tl"):
        _emit_link(_Body(sfx), link, 1, {}, lambda v, stem: _py(sympy.sympify(v), 2))


def _emit_link(
    body: _Body, link, k: int, params: dict, const, z: tuple[str, str] | None = None, margin: str = ""
) -> bool:
    """``f{k} = f(z{k})`` and ``df{k} = f'(z{k})`` from the link's expression; shared parts computed once.

    ``z`` is the text of ``z{k}`` and of ``−z{k}``: when the link uses z only as −z (the logistic link, softplus(−z)),
    −z is computed directly, one pass fewer. A derivative with a leading minus (−σ(−z)) is emitted as
    ``ndf{k} = −f'(z{k})`` and True returned: the caller folds the sign into its scalar factor, another pass fewer.
    ``margin`` (``"-"`` or ``"+"``) shifts z by the per-pair margin right where z (or −z) is computed: ``z − m_i``.
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
        if margin:
            body.shift_by_margin(f"z{k}", margin)
    for sym, e in temps:
        if not printer._scalar(e):
            printer.dynamic.add(sym)
        body.emit(f"{sym} = {z[1] if z is not None and sym == neg_z else printer.doprint(e)}")
        if margin and z is not None and sym == neg_z:  # −z shifts the other way
            body.shift_by_margin(str(sym), "+" if margin == "-" else "-")
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
    top_c, bot_c = structure_circuits(s)
    top, bot = circuit_text(top_c, s.atoms), circuit_text(bot_c, s.atoms)
    out = [f"# term {k}: {t.text()}{' (per token)' if t.normalized else ''}"]
    out.append(f"#   log WMC(top) = {top}")
    out.append(f"#   log WMC(bottom) = {bot}")
    return out


class _Constants:
    """Hyperparameter expressions as inline scalars, or named once (``k1 = 1.0 / (2 * beta)``) when compound."""

    def __init__(self) -> None:
        self.lines: list[str] = []
        self.names: dict[str, str] = {}

    def __call__(self, e: sympy.Expr, stem: str) -> str:
        e = sympy.sympify(e)
        if e.is_Symbol or e.is_Number:
            return _py(e, 2)
        text = _py(e)
        if text not in self.names:
            self.names[text] = f"{stem}{len(self.names) + 1}"
            self.lines.append(f"{self.names[text]} = {text}")
        return self.names[text]


def _body(program: Program, sfx: str) -> _Body:
    """The straight-line loss-and-gradient statements of a program, for one flavor.

    Inputs are the variables ``m_yw``, ``ref_yl``, … (log-probs in the compute dtype) and ``n_yw``, … (token counts
    clamped to ≥ 1); outputs are ``loss`` and ``d_<input name>`` for every atom.
    """
    body = _Body(sfx)
    const = _Constants()
    normalized_vars = _normalized_weights(body, program)
    if any(c is circuit.ONE for t in program.terms for c in structure_circuits(t.structure)):
        body.emit(f"zero = {_var(program.atoms[0])} * 0.0  # log 1: a side that holds in every world")
    loss_parts = [_term(body, k, t, const) for k, t in enumerate(program.terms, 1)]
    body.emit("loss = " + " + ".join(loss_parts))
    _gradients(body, program.atoms, normalized_vars)
    body.lines = const.lines + body.lines
    return body


def _normalized_weights(body: _Body, program: Program) -> dict[str, tuple[str, str]]:
    """Length-normalized weights first (shared by every term that uses them): token variable → (sequence, length)."""
    normalized_vars: dict[str, tuple[str, str]] = {}
    for t in program.terms:
        if t.normalized:
            for a in t.structure.atoms:
                normalized_vars.setdefault(_var(a) + "_tok", (_var(a), f"n_{a.answer}"))
    for v, (seq, n) in sorted(normalized_vars.items()):
        body.emit(f"{v} = {seq} / {n}  # per-token log-weight (length-normalized)")
    return normalized_vars


def _term(body: _Body, k: int, t: Term, const: _Constants) -> str:
    """Term k forward (both sides' circuits, z, the link) and its adjoints; returns its part of the loss."""
    s = t.structure
    names = [_var(a) + ("_tok" if t.normalized else "") for a in s.atoms]
    for c in _term_comment(k, t):
        body.emit(c)
    top_circuit, bottom_circuit = structure_circuits(s)
    top, bot = _circuit_forward(body, top_circuit, names), _circuit_forward(body, bottom_circuit, names)
    body.emit(f"top{k} = {top}")
    body.emit(f"bot{k} = {bot}")
    scale = const(t.scale, "k") if not _is_one(t.scale) else None
    z = f"{scale} * (top{k} - bot{k})" if scale else f"top{k} - bot{k}"
    neg_z = f"{scale} * (bot{k} - top{k})" if scale else f"bot{k} - top{k}"
    shift = sympy.sympify(t.shift)
    if not _is_zero(shift):
        minus = shift.could_extract_minus_sign()
        z += f" + {const(-shift, 'g')}" if minus else f" - {const(shift, 'g')}"
        neg_z += f" - {const(-shift, 'g')}" if minus else f" + {const(shift, 'g')}"
    # a per-pair margin m_i shifts a preference term's z to z − m_i, as a per-pair γ would; a smoothing term is its
    # preference term reversed (z → −z, γ → −γ), so its z becomes z + m_i; NLL terms have no preference to shift
    margin = {"preference": "-", "smoothing": "+"}.get(t.role, "")
    negated = _emit_link(body, LINKS[t.link], k, dict(t.link_params), const, (z, neg_z), margin)
    # the factor carries the derivative's sign and the caller's grad_scale (a mean's 1/B): scalars multiplied in
    # Python, then one pass over the tensor — (−β·s)·ndf is one pass where β·(−ndf), then ·s, would be three
    if negated:
        grad_factor = f"-{scale} * grad_scale * ndf{k}" if scale else f"-grad_scale * ndf{k}"
    else:
        grad_factor = f"{scale} * grad_scale * df{k}" if scale else f"grad_scale * df{k}"
    coef = sympy.sympify(t.coef)
    if coef.free_symbols:
        # a coefficient may vanish (label smoothing 0, alpha 0): the term then contributes exactly nothing
        c = const(coef, "c")
        part = f"{body.helper('scaled')}({c}, f{k})"
        # the sign and grad_scale on the scalar (c · s is 0 exactly when c is: grad_scale > 0)
        cf = (f"-{c} * grad_scale", f"ndf{k}") if negated and not scale else (c, grad_factor)
        body.emit(f"a{k} = {body.helper('scaled')}({cf[0]}, {cf[1]})  # d loss / d log rho_{k}")
    elif _is_one(coef):
        part = f"f{k}"
        body.emit(f"a{k} = {grad_factor}  # d loss / d log rho_{k}")
    else:
        c = _py(coef, 2)
        part = f"{c} * f{k}"
        body.emit(f"a{k} = {c} * {grad_factor}  # d loss / d log rho_{k}")
    _circuit_backward(body, top_circuit, f"a{k}", "+", names)
    _circuit_backward(body, bottom_circuit, f"a{k}", "-", names)
    return part


def _gradients(body: _Body, atoms, normalized_vars: dict[str, tuple[str, str]]) -> None:
    """Collect each input's adjoint: through its log1mexp variable and its length-normalized weight."""
    body.emit("# backward: the chain rule through the plans, collected per input")
    # log1mexp variables first: their adjoints flow into the variable they were computed from
    for v, lv in sorted(body.l1m.items()):
        if lv in body.grads:
            body.emit(f"g_{lv} = {_sum_terms(body.grads[lv])}")
            body.contribute(v, f"+g_{lv} * d{lv}")
    for v in sorted(normalized_vars):
        if v in body.grads:
            body.emit(f"g_{v} = {_sum_terms(body.grads[v])}")
    slot: dict[str, int] = {}  # gradient expression → its distinct gradient's index
    for a in atoms:
        v = _var(a)
        parts = list(body.grads.get(v, []))
        tok = v + "_tok"
        if tok in normalized_vars and tok in body.grads:
            parts.append(f"+g_{tok} / n_{a.answer}")
        rhs = _sum_terms(parts) if parts else f"{v} * 0.0"
        # inputs whose gradients agree up to sign (DPO: d chosen = d ref rejected = −d rejected) share one distinct
        # gradient, computed, stored and saved once; GRAD_SIGN gives each input its sign
        neg = _negation(rhs)
        if rhs in slot:
            body.grad_slot.append(slot[rhs])
            body.grad_sign.append(1.0)
        elif neg in slot:
            body.grad_slot.append(slot[neg])
            body.grad_sign.append(-1.0)
        else:
            body.emit(f"d_{input_name(a)} = {rhs}")
            body.grad_slot.append(slot.setdefault(rhs, len(slot)))
            body.grad_sign.append(1.0)


def _negation(rhs: str) -> str | None:
    """The text of −rhs when rhs is a name or a negated name (``a1`` ↔ ``-a1``), else None."""
    if rhs.isidentifier():
        return "-" + rhs
    if rhs.startswith("-") and rhs[1:].isidentifier():
        return rhs[1:]
    return None
