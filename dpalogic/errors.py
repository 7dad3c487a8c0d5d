"""The one error family dpalogic raises for bad input.

Every user-facing mistake (a malformed formula, an unknown atom or loss name, a degenerate structure, a missing
input tensor) is a :class:`DPALogicError`; its message is complete and readable on its own, so the CLI prints it
and exits with status 2 instead of showing a traceback.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class DPALogicError(ValueError):
    """A user-facing error; ``str(err)`` is the whole explanation."""


class FormulaSyntaxError(DPALogicError):
    """The text is not a formula or structure; the message shows the position with a caret."""

    def __init__(self, message: str, text: str, pos: int) -> None:
        self.text = text
        self.pos = pos
        self.reason = message
        line_start = text.rfind("\n", 0, pos) + 1
        line_end = text.find("\n", pos)
        line = text[line_start : None if line_end < 0 else line_end]
        col = pos - line_start
        super().__init__(f"{message}\n  {line}\n  {' ' * col}^")


class UnknownNameError(DPALogicError):
    """An unknown atom, answer, connective or loss name, with the closest valid ones."""


class DegenerateStructureError(DPALogicError):
    """A structure whose ✓ or ✗ side is empty (or whose conditioning is literally false)."""


class NoPolicyAtomWarning(UserWarning):
    """A loss whose formula has no ``M(…)`` atom: constant in the policy, so training with it changes nothing."""


def closest(name: str, valid: Iterable[str], n: int = 3) -> list[str]:
    """The valid names closest to ``name`` (case-insensitive first, then by edit similarity)."""
    valid = list(valid)
    exact_ci = [v for v in valid if v.lower() == name.lower()]
    fuzzy = difflib.get_close_matches(name, valid, n=n, cutoff=0.5)
    fuzzy_ci = [
        v for v in valid if v.lower() in difflib.get_close_matches(name.lower(), [x.lower() for x in valid], n, 0.5)
    ]
    out: list[str] = []
    for v in exact_ci + fuzzy + fuzzy_ci:
        if v not in out:
            out.append(v)
    return out[:n]


def unknown(kind: str, name: str, valid: Iterable[str], hint: str = "") -> UnknownNameError:
    """Build an :class:`UnknownNameError` that suggests the closest valid names."""
    valid = list(valid)
    near = closest(name, valid)
    msg = f"unknown {kind} {name!r}"
    if near:
        msg += "; did you mean " + " or ".join(repr(v) for v in near) + "?"
    else:
        msg += f"; valid {kind}s: " + ", ".join(valid[:20]) + (" ..." if len(valid) > 20 else "")
    if hint:
        msg += f"\n{hint}"
    return UnknownNameError(msg)
