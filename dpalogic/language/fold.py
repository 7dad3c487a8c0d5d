"""Post-order folding of a parse tree with an explicit stack, shared by the formula and the equation parsers.

The walk keeps its own stack rather than recursing, so that a long chain (``a & b & …``, ``a + b + …``) or a deep
nesting ends in a stated limit, never in a RecursionError.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


def fold(
    root: Any,
    expand: Callable[[Any], Any],
    combine: Callable[[Any, list, Any], Any],
    *,
    max_level: int,
    too_deep: Callable[[Any], Exception],
    visit: Callable[[Any], None] | None = None,
) -> Any:
    """The value of ``root``: ``expand(node)`` is a leaf's value, or ``(func, operands)`` for an operator, whose
    value is ``combine(func, values of the operands, node)``. A node below ``max_level`` operator levels raises
    ``too_deep(node)``; ``visit(node)`` sees every node before it is expanded (to count them)."""
    values: list = []
    stack: list[tuple] = [(root, 1, None)]
    while stack:
        node, level, pending = stack.pop()
        if pending is not None:  # its operands are built, left on `values`: combine them
            func, count = pending
            args = values[len(values) - count :]
            del values[len(values) - count :]
            values.append(combine(func, args, node))
            continue
        if visit is not None:
            visit(node)
        step = expand(node)
        if not isinstance(step, tuple):  # a leaf
            values.append(step)
            continue
        if level > max_level:
            raise too_deep(node)
        func, operands = step
        stack.append((node, level, (func, len(operands))))
        stack.extend((c, level + 1, None) for c in reversed(operands))
    return values[0]
