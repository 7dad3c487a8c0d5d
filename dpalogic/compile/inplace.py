"""In-place arithmetic for the torch twin: a temporary consumed by its last use is overwritten instead of copied.

The twin is straight-line code over ``[B]`` tensors of one dtype, run where autograd records nothing (inside the
module's ``autograd.Function``). Every binary operation there allocates a new ``[B]`` buffer, and on the CPU a fresh
buffer costs more than the arithmetic on it once B is large. This pass rewrites ``x + y`` as ``x.add_(y)`` when the
tensor ``x`` holds is a temporary of the twin's own (never an input, whose buffer is the caller's) that nothing reads
afterwards, and likewise ``-x``, ``*``, ``/`` and ``−``. ``+`` and ``*`` may take the other operand's buffer (IEEE
addition and multiplication are commutative). The statements are the emitter's own text, parsed with :mod:`ast`; a
rewritten line that would not fit the line length keeps its original form.
"""

from __future__ import annotations

import ast
import itertools

_METHOD = {ast.Add: "add_", ast.Sub: "sub_", ast.Mult: "mul_", ast.Div: "div_"}
_COMMUTES = (ast.Add, ast.Mult)


def _split(line: str) -> tuple[str, str, str]:
    """``(indent, code, comment)`` of one emitted line (the emitter writes no ``#`` inside code)."""
    code = line.lstrip(" ")
    indent = line[: len(line) - len(code)]
    code, hash_, comment = code.partition("  #")
    return indent, code, hash_ + comment


def _statements(lines: list[str]) -> list[ast.Assign | None]:
    """Each line's assignment, or None for comments, ``if`` headers and anything else left as it is."""
    out: list[ast.Assign | None] = []
    for line in lines:
        _, code, _ = _split(line)
        tree = ast.parse(code) if code and not code.startswith(("#", "if ")) else None
        stmt = tree.body[0] if tree is not None and len(tree.body) == 1 else None
        out.append(stmt if isinstance(stmt, ast.Assign) and len(stmt.targets) == 1 else None)
    return out


def _targets(stmt: ast.Assign) -> list[str]:
    t = stmt.targets[0]
    return [e.id for e in t.elts] if isinstance(t, ast.Tuple) else [t.id]


def _tensor_call(e: ast.expr) -> bool:
    """A call that returns a new tensor: a torch function, or a twin helper (``_softplus``, ``_log1mexp``, …: each
    returns new buffers). Not ``math.exp(tau)`` (a Python float) nor a method (``x.to(dt)`` may return its input)."""
    if not isinstance(e, ast.Call):
        return False
    f = e.func
    if isinstance(f, ast.Name):
        return f.id.startswith("_")
    root = f
    while isinstance(root, ast.Attribute):
        root = root.value
    return isinstance(root, ast.Name) and root.id == "torch"


def _has_tensor(e: ast.expr, tensors: set[str]) -> bool:
    """Is a tensor among the values ``e`` computes with (a tensor name, or a call that makes one)?"""
    return any((isinstance(n, ast.Name) and n.id in tensors) or _tensor_call(n) for n in ast.walk(e))


def _is_fresh(e: ast.expr, tensors: set[str]) -> bool:
    """Does ``e`` evaluate to a new tensor: arithmetic on a tensor, or a tensor call (:func:`_tensor_call`)."""
    if isinstance(e, ast.BinOp | ast.UnaryOp):
        return _has_tensor(e, tensors)
    return _tensor_call(e)


class _Rewriter(ast.NodeTransformer):
    """Rewrite one statement's arithmetic in place, given which names hold buffers free to overwrite here."""

    def __init__(self, free: set[str], tensors: set[str]) -> None:
        self.free, self.tensors = free, tensors
        self.made: set[int] = set()  # the in-place calls made here: each returns the buffer it overwrote, owned

    def _tensor(self, e: ast.expr) -> bool:
        return _has_tensor(e, self.tensors)

    def _owned(self, e: ast.expr) -> bool:
        """A buffer this expression may overwrite: a free name, or an intermediate result made within it."""
        if isinstance(e, ast.Name):
            return e.id in self.free
        return id(e) in self.made or _is_fresh(e, self.tensors)

    def _call(self, target: ast.expr, method: str, args: list[ast.expr]) -> ast.Call:
        if isinstance(target, ast.Name):
            self.free.discard(target.id)  # one overwrite per buffer and statement
        call = ast.Call(ast.Attribute(target, method, ast.Load()), args, [])
        self.made.add(id(call))
        return call

    def visit_BinOp(self, node: ast.BinOp) -> ast.expr:
        node = self.generic_visit(node)
        method = _METHOD.get(type(node.op))
        if method is None or not self._tensor(node):
            return node
        if self._owned(node.left):
            return self._call(node.left, method, [node.right])
        if isinstance(node.op, _COMMUTES) and self._owned(node.right):
            return self._call(node.right, method, [node.left])
        return node

    def visit_UnaryOp(self, node: ast.UnaryOp) -> ast.expr:
        node = self.generic_visit(node)
        if isinstance(node.op, ast.USub) and self._tensor(node.operand) and self._owned(node.operand):
            return self._call(node.operand, "neg_", [])
        return node


def in_place(lines: list[str], inputs: list[str], outputs: set[str], width: int) -> list[str]:
    """The twin's statements with temporaries overwritten in place where that is safe (see the module docstring).

    ``inputs`` are the tensors bound before the statements (the caller's buffers, or views of them); ``outputs`` the
    names returned after them; ``width`` the length a rewritten line must fit. Lines inside an ``if`` (indented) are
    left as they are, and what they assign is taken as a buffer that is not the twin's to overwrite.
    """
    stmts = _statements(lines)
    start = {name: k for k, name in enumerate(inputs)}  # name → the buffer (an object id) it holds
    binding, ids = dict(start), itertools.count(len(inputs))
    fresh: set[int] = set()
    tensors = set(inputs)
    reads: list[list[str]] = []  # per statement: the names it reads
    writes: list[list[tuple[str, int]]] = []  # per statement: the names it binds, to which buffer
    last: dict[int, int] = {}  # buffer → the last statement that reads it
    for i, (line, stmt) in enumerate(zip(lines, stmts)):
        names = [n.id for n in ast.walk(stmt.value) if isinstance(n, ast.Name)] if stmt is not None else []
        reads.append(names)
        for n in names:
            if n in binding:
                last[binding[n]] = i
        out: list[tuple[str, int]] = []
        if stmt is not None:
            if isinstance(stmt.value, ast.Name) and stmt.value.id in binding:  # an alias: the same buffer
                out = [(t, binding[stmt.value.id]) for t in _targets(stmt)]
            else:
                conditional = line.startswith(" ")
                new = not conditional and _is_fresh(stmt.value, tensors)
                for t in _targets(stmt):
                    if conditional and t in binding:
                        # a rebinding that may not happen: the name may still hold its old buffer (and so may
                        # its aliases), so that buffer is no longer the pass's to overwrite
                        fresh.discard(binding[t])
                    out.append((t, next(ids)))
                    if new:
                        fresh.add(out[-1][1])
            if _has_tensor(stmt.value, tensors):
                tensors.update(_targets(stmt))
        for t, obj in out:
            binding[t] = obj
        writes.append(out)
    for name in outputs & binding.keys():  # returned: live past the last statement
        last[binding[name]] = len(lines)
    result, binding = [], dict(start)
    for i, (line, stmt) in enumerate(zip(lines, stmts)):
        names = reads[i]
        held = [binding.get(n) for n in names]
        # a buffer read once in the line (under one name, once): no other part of the statement sees it overwritten
        free = {n for n, b in zip(names, held) if b in fresh and last[b] == i and held.count(b) == 1}
        if stmt is not None and not line.startswith(" ") and free:
            indent, _, comment = _split(line)
            value = _Rewriter(free, tensors).visit(stmt.value)
            text = f"{indent}{', '.join(_targets(stmt))} = {ast.unparse(value)}{comment}"
            if len(text) <= width:
                line = text
        for t, obj in writes[i]:
            binding[t] = obj
        result.append(line)
    return result
