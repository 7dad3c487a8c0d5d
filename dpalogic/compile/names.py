"""Names in generated code: inputs, lengths, kernel variables and module names."""

from __future__ import annotations

import keyword

from dpalogic.errors import DPALogicError
from dpalogic.language.syntax import Atom
from dpalogic.semantics.program import Program

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
