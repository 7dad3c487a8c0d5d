"""Structures over many answers: the sides ✓/✗ as OBDDs instead of truth tables (docs/semantics.md §8).

A :class:`ListStructure` means exactly what a :class:`~dpalogic.logic.structure.Structure` means —
``✓ = P ∧ P_C``, ``✗ = (¬P ∧ P_C) ∨ P_A`` — but holds its sides as nodes of one shared OBDD, so it scales to
hundreds of atoms. Structures with at most :data:`~dpalogic.logic.structure.MAX_ATOMS` atoms stay truth tables
(every analysis works on them); :func:`parse_any` picks the representation.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property

import sympy
from sympy.logic.boolalg import And, Boolean, BooleanFalse, Not, Or

from dpalogic.errors import DegenerateStructureError, DPALogicError
from dpalogic.language.syntax import Atom, atoms_of, parse_structure_text, to_ascii
from dpalogic.logic.bdd import BDD, FALSE, compile_formula, to_circuit
from dpalogic.logic.structure import MAX_ATOMS, Structure, text_fields, triple_text

MAX_LIST_ATOMS = 512  # M and Ref of y1 … y256


def bdd_order(atoms: tuple[Atom, ...]) -> tuple[Atom, ...]:
    """The variable order: by answer, then M before Ref — keeps per-answer constraints (M(yj) ∨ Ref(yj)) local."""
    return tuple(sorted(atoms, key=lambda a: (a.sort_key[1], a.sort_key[0])))


@dataclass(frozen=True, eq=False)
class ListStructure:
    """A preference structure whose sides are OBDD nodes; ``atoms`` in canonical order (as for Structure)."""

    atoms: tuple[Atom, ...]
    source: tuple[Boolean, Boolean, Boolean]
    given_is_literal_false: bool = False
    bdd: BDD = field(repr=False, default=None)  # type: ignore[assignment]
    top: int = FALSE
    bottom: int = FALSE
    order: tuple[Atom, ...] = ()
    sides_text: tuple[Boolean, Boolean] | None = None  # ✓ and ✗ as written, when built from sides (meet, join)

    @classmethod
    def from_parts(
        cls,
        core: Boolean,
        given: Boolean | None = None,
        additional: Boolean | None = None,
        given_is_literal_false: bool = False,
    ) -> ListStructure:
        given = sympy.true if given is None else given
        additional = sympy.false if additional is None else additional
        atoms = atoms_of(core, given, additional)
        if len(atoms) > MAX_LIST_ATOMS:
            raise DPALogicError(
                f"{len(atoms)} atoms: a structure takes at most {MAX_LIST_ATOMS} (M and Ref of y1 … y256)"
            )
        order = bdd_order(atoms)
        index = {a.name: i for i, a in enumerate(order)}
        bdd = BDD(len(order))
        p, c, a = (compile_formula(bdd, e, index) for e in (core, given, additional))
        top = bdd.apply("and", p, c)
        bottom = bdd.apply("or", bdd.apply("and", bdd.neg(p), c), a)
        return cls(atoms, (core, given, additional), given_is_literal_false, bdd, top, bottom, order)

    # ---- views
    @property
    def n(self) -> int:
        return len(self.atoms)

    @cached_property
    def _atom_of_var(self) -> tuple[int, ...]:
        pos = {a: i for i, a in enumerate(self.atoms)}
        return tuple(pos[a] for a in self.order)

    def side_circuit(self, which: str):
        """``log WMC`` of ``"top"`` or ``"bottom"`` as a circuit over ``self.atoms`` (indices as in Structure)."""
        if which not in self._circuits:
            raise ValueError("log WMC of an unsatisfiable side is -inf; check the structure first")
        return self._circuits[which]

    @cached_property
    def _circuits(self) -> dict:
        # built once: compile, derive's sizes and the evaluators all ask for the same two circuits
        return {
            w: to_circuit(self.bdd, getattr(self, w), self._atom_of_var)
            for w in ("top", "bottom")
            if getattr(self, w) != FALSE
        }

    def sizes(self) -> dict[str, int]:
        """OBDD nodes of each side and circuit nodes of both together (shared subcircuits counted once)."""
        from dpalogic.semantics import circuit

        roots = [self.side_circuit(w) for w in ("top", "bottom") if getattr(self, w) != FALSE]
        nodes = {id(x) for r in roots for x in circuit.topological(r)}
        return {
            "bdd_top": len(self.bdd.support(self.top)),
            "bdd_bottom": len(self.bdd.support(self.bottom)),
            "circuit": len(nodes),
        }

    @property
    def top_formula(self) -> Boolean:
        if self.sides_text is not None:
            return self.sides_text[0]
        core, given, _ = self.source
        return And(core, given)

    @property
    def bottom_formula(self) -> Boolean:
        if self.sides_text is not None:
            return self.sides_text[1]
        core, given, additional = self.source
        return Or(And(Not(core), given), additional)

    def readable_triple(self) -> tuple[Boolean, Boolean, Boolean]:
        return self.source

    def text(self, style: str = "unicode") -> str:
        return triple_text(self.source, style)

    def text_fields(self) -> dict[str, str]:
        return text_fields(self)

    def __str__(self) -> str:
        return self.text()

    # ---- checks (decided on the OBDDs: no enumeration of 2^n worlds)
    def problems(self) -> list[str]:
        out = []
        if self.given_is_literal_false:
            out.append("P_C is the literal false: no world is counted, the loss is undefined")
        else:
            if self.top == FALSE:
                out.append("the ✓ side P ∧ P_C is unsatisfiable, so WMC(✓) = 0 and the loss is +∞ everywhere")
            if self.bottom == FALSE:
                out.append("the ✗ side (¬P ∧ P_C) ∨ P_A is unsatisfiable, so WMC(✗) = 0 and the loss is 0 everywhere")
        return out

    def check(self) -> ListStructure:
        probs = self.problems()
        if probs:
            raise DegenerateStructureError(f"degenerate structure {self.text()}: " + "; ".join(probs))
        return self


def parse_any(text: str, given: str | None = None, additional: str | None = None) -> Structure | ListStructure:
    """Structure text as a truth-table Structure (≤ 12 atoms) or, beyond, a ListStructure.

    ``given``/``additional`` override ``P_C``/``P_A`` as in :meth:`Structure.parse` (the CLI's --given/--additive).
    """
    from dpalogic.language.syntax import parse_formula

    ps = parse_structure_text(text)
    g, a, lit_false = ps.given, ps.additional, ps.given_is_literal_false
    extra = [parse_formula(x) for x in (given, additional) if x is not None]
    parts = [x for x in (ps.core, g, a, *extra) if x is not None]
    if len(atoms_of(*parts)) <= MAX_ATOMS:
        return Structure.parse(text, given, additional)
    if given is not None:
        if g is not None:
            raise DPALogicError(f"P_C is given twice: in the structure text ({to_ascii(g)}) and by --given ({given})")
        g = parse_formula(given)
        lit_false = isinstance(g, BooleanFalse)
    if additional is not None:
        if a is not None:
            raise DPALogicError(f"P_A is given twice: in the structure text ({to_ascii(a)}) and by --additive")
        a = parse_formula(additional)
    return ListStructure.from_parts(ps.core, g, a, lit_false)


def as_list_structure(s: Structure | ListStructure) -> ListStructure:
    """Any structure as OBDD sides (a Structure through its parsed source, or its sides as written)."""
    if isinstance(s, ListStructure):
        return s
    core, given, additional = s.source if s.source is not None else s.readable_triple()
    return ListStructure.from_parts(core, given, additional, s.given_is_literal_false)
