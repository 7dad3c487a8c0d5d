"""Preference structures ``(P, P_C, P_A)``, their canonical sides ``(✓, ✗)`` and truth tables as bitmasks.

A truth table over atoms ``a_0 … a_{n-1}`` is a Python int of ``2^n`` bits: bit ``w`` is set when the formula holds
in world ``w``, where atom ``a_i`` is true in world ``w`` exactly when bit ``i`` of ``w`` is set. Entailment is
``f & ~g == 0`` and equivalence is ``f == g`` — no satisfiability solver on the hot paths (docs/semantics.md §2, §5).

    ✓ = P ∧ P_C        ✗ = (¬P ∧ P_C) ∨ P_A
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cache, lru_cache

import sympy
from sympy.logic.boolalg import And, Boolean, BooleanFalse, BooleanTrue, Equivalent, Implies, Not, Or, Xor

from dpalogic.errors import DegenerateStructureError, DPALogicError
from dpalogic.language.cardinality import Count, Ranked
from dpalogic.language.syntax import Atom, atoms_of, parse_structure_text, to_ascii, to_latex, to_unicode

# --------------------------------------------------------------------------------------------------- truth tables


MAX_ATOMS = 12  # 2^12 worlds: truth tables, plans and polynomials stay fast
MINIMIZE_ATOMS = 6  # readable minimal formulas up to here; larger parsed structures print as written


def full_mask(n: int) -> int:
    return (1 << (1 << n)) - 1


@cache
def atom_mask(i: int, n: int) -> int:
    """Truth table of atom ``i`` among ``n`` atoms."""
    m = 0
    for w in range(1 << n):
        if (w >> i) & 1:
            m |= 1 << w
    return m


def truth_table(expr: Boolean, atoms: tuple[Atom, ...]) -> int:
    """Truth table of a SymPy Boolean expression over ``atoms`` (which must cover its atoms)."""
    n = len(atoms)
    index = {a.name: i for i, a in enumerate(atoms)}
    full = full_mask(n)

    def ev(e) -> int:
        if isinstance(e, BooleanTrue):
            return full
        if isinstance(e, BooleanFalse):
            return 0
        if isinstance(e, sympy.Symbol):
            return atom_mask(index[e.name], n)
        f = e.func
        if f is Count:  # masks of "exactly c operands true", c = 0 … hi, built one operand at a time
            exact = [full]
            for v in (ev(a) for a in e.operands):
                nxt = [exact[0] & ~v & full]
                for c in range(1, min(len(exact), e.hi) + 1):
                    nxt.append(((exact[c] if c < len(exact) else 0) & ~v & full) | (exact[c - 1] & v))
                exact = nxt
            out = 0
            for c in range(e.lo, min(e.hi, len(exact) - 1) + 1):
                out |= exact[c]
            return out
        if f is Ranked:
            return ev(e.expanded())
        if f is Not:
            return full & ~ev(e.args[0])
        vals = [ev(a) for a in e.args]
        if f is And:
            out = full
            for v in vals:
                out &= v
            return out
        if f is Or:
            out = 0
            for v in vals:
                out |= v
            return out
        if f is Xor:
            out = 0
            for v in vals:
                out ^= v
            return out
        if f is Implies:
            return (full & ~vals[0]) | vals[1]
        if f is Equivalent:
            all_true, all_false = full, full
            for v in vals:
                all_true &= v
                all_false &= ~v
            return all_true | all_false
        raise TypeError(f"unsupported connective {f}")  # pragma: no cover - the parser builds only the above

    return ev(expr)


def extend_mask(mask: int, atoms: tuple[Atom, ...], to: tuple[Atom, ...]) -> int:
    """Re-express a truth table over ``atoms`` as one over the superset ``to``."""
    pos = [to.index(a) for a in atoms]
    out = 0
    for w in range(1 << len(to)):
        sub = 0
        for i, p in enumerate(pos):
            if (w >> p) & 1:
                sub |= 1 << i
        if (mask >> sub) & 1:
            out |= 1 << w
    return out


def has_construct(e: Boolean) -> bool:
    """Does a formula use Count/Ranked? Written that way it reads better than any minimized And/Or form."""
    return isinstance(e, (Count, Ranked)) or any(has_construct(a) for a in e.args if isinstance(a, Boolean))


def worlds(mask: int, n: int) -> list[int]:
    return [w for w in range(1 << n) if (mask >> w) & 1]


# --------------------------------------------------------------------------------------------------- readable formulas
# A truth table is turned back into the shortest formula we can find: an exhaustive search over formulas with at
# most three atom occurrences (covers ⊕, ↔, → and small conjunctions exactly), else SymPy's minimal sum/product of
# products, rewritten so that "¬a ∨ ¬b ∨ c" reads "a ∧ b → c".

_OPS = ("and", "or", "implies", "xor", "iff")


@lru_cache(maxsize=8)
def _small_formulas(n: int) -> dict[int, tuple]:
    """mask → smallest formula tree (cost = 2·leaves + negations), over formulas with ≤ 3 leaves."""
    full = full_mask(n)
    best: dict[int, tuple[int, tuple]] = {full: (0, ("true",)), 0: (0, ("false",))}
    levels: list[list[int]] = [[]]
    lvl1 = []
    for i in range(n):
        for neg in (False, True):
            m = atom_mask(i, n) if not neg else full & ~atom_mask(i, n)
            tree = ("atom", i) if not neg else ("not", ("atom", i))
            if m not in best:
                best[m] = (2 + neg, tree)
                lvl1.append(m)
    levels.append(lvl1)
    max_leaves = 3 if n <= 4 else 2
    for leaves in range(2, max_leaves + 1):
        new = []
        for left in range(1, leaves):
            for a in levels[left]:
                ca, ta = best[a]
                for b in levels[leaves - left]:
                    cb, tb = best[b]
                    for op in _OPS:
                        if op != "implies" and a >= b and left == leaves - left:
                            continue  # commutative: one order is enough
                        m = _apply(op, a, b, full)
                        # a right-nested implication "a → b → c" reads worse than "a ∧ b → c": small penalty
                        c = ca + cb + (op == "implies" and tb[0] == "implies")
                        old = best.get(m)
                        if old is None or c < old[0]:
                            if old is None:
                                new.append(m)
                            best[m] = (c, (op, ta, tb))
        levels.append(new)
    return {m: t for m, (c, t) in best.items()}


def _apply(op: str, a: int, b: int, full: int) -> int:
    if op == "and":
        return a & b
    if op == "or":
        return a | b
    if op == "implies":
        return (full & ~a) | b
    if op == "xor":
        return a ^ b
    return full & ~(a ^ b)


def _tree_to_sympy(t: tuple, atoms: tuple[Atom, ...]) -> Boolean:
    kind = t[0]
    if kind == "true":
        return sympy.true
    if kind == "false":
        return sympy.false
    if kind == "atom":
        return atoms[t[1]].symbol
    if kind == "not":
        return Not(_tree_to_sympy(t[1], atoms))
    a, b = _tree_to_sympy(t[1], atoms), _tree_to_sympy(t[2], atoms)
    return {"and": And, "or": Or, "implies": Implies, "xor": Xor, "iff": Equivalent}[kind](a, b)


def _as_implication(e: Boolean) -> Boolean:
    """``¬a ∨ ¬b ∨ c ∨ d`` → ``a ∧ b → c ∨ d`` (same meaning, reads like a rule)."""
    if e.func is Or:
        neg = [a.args[0] for a in e.args if a.func is Not]
        pos = [a for a in e.args if a.func is not Not]
        if neg and pos:
            return Implies(And(*neg), Or(*pos))
    if e.func is And:
        return And(*[_as_implication(a) for a in e.args])
    return e


@lru_cache(maxsize=4096)
def readable(mask: int, atoms: tuple[Atom, ...]) -> Boolean:
    """The simplest readable formula with truth table ``mask`` over ``atoms``."""
    n = len(atoms)
    small = _small_formulas(n) if n <= 6 else {}
    if mask in small:
        return _tree_to_sympy(small[mask], atoms)
    syms = [a.symbol for a in atoms]
    minterms = [[(w >> i) & 1 for i in range(n)] for w in worlds(mask, n)]
    on, off = mask.bit_count(), (1 << n) - mask.bit_count()
    candidates = []
    # Quine–McCluskey is exponential in the number of terms it starts from: use each form only from few terms
    if n <= 6 or on <= MAX_MINIMIZED_TERMS:
        candidates.append(_as_implication(sympy.SOPform(syms, minterms)))
    if n <= 6 or off <= MAX_MINIMIZED_TERMS:
        candidates.append(_as_implication(sympy.POSform(syms, minterms)))
    if not candidates:  # many worlds on both sides: the side's circuit read as a formula (exact, instant)
        return _circuit_formula(mask, atoms)
    return min(candidates, key=lambda e: (sympy.count_ops(e), len(str(e))))


MAX_MINIMIZED_TERMS = 24


def _circuit_formula(mask: int, atoms: tuple[Atom, ...]) -> Boolean:
    """The truth table as its Shannon-expansion circuit reads: literals, ∧ for products, ∨ for sums."""
    from dpalogic.semantics import circuit

    def lit(i: int, positive: bool) -> Boolean:
        return atoms[i].symbol if positive else Not(atoms[i].symbol)

    root = circuit.from_truth_table(mask, len(atoms))
    return circuit.fold(root, lit=lit, one=lambda: sympy.true, prod=lambda xs: And(*xs), sum=lambda xs: Or(*xs))


# --------------------------------------------------------------------------------------------------- structures


@dataclass(frozen=True)
class Structure:
    """A preference structure ``(P, P_C, P_A)`` over a fixed, canonically ordered atom set.

    ``top`` (✓) and ``bottom`` (✗) are truth tables over ``atoms``. Two structures mean the same thing exactly when
    their sides agree (on a common atom set).
    """

    atoms: tuple[Atom, ...]
    top: int
    bottom: int
    source: tuple[Boolean, Boolean, Boolean] | None = field(default=None, compare=False, repr=False)
    given_is_literal_false: bool = field(default=False, compare=False, repr=False)

    # ---- construction
    @classmethod
    def from_parts(
        cls,
        core: Boolean,
        given: Boolean | None = None,
        additional: Boolean | None = None,
        atoms: tuple[Atom, ...] | None = None,
        given_is_literal_false: bool = False,
    ) -> Structure:
        given = sympy.true if given is None else given
        additional = sympy.false if additional is None else additional
        atoms = atoms or atoms_of(core, given, additional)
        if len(atoms) > MAX_ATOMS:
            raise DPALogicError(
                f"{len(atoms)} atoms: dpalogic enumerates the 2^n worlds of a structure, so it takes at most "
                f"{MAX_ATOMS} atoms (M and Ref of each answer count separately)"
            )
        p, c, a = (truth_table(e, atoms) for e in (core, given, additional))
        full = full_mask(len(atoms))
        top = p & c
        bottom = ((full & ~p) & c) | a
        return cls(atoms, top, bottom, (core, given, additional), given_is_literal_false)

    @classmethod
    def from_sides(cls, top: Boolean | int, bottom: Boolean | int, atoms: tuple[Atom, ...] | None = None) -> Structure:
        """Build from ✓ and ✗ given as formulas (or truth tables over ``atoms``)."""
        if isinstance(top, int) and isinstance(bottom, int):
            assert atoms is not None
            return cls(atoms, top, bottom)
        atoms = atoms or atoms_of(top, bottom)
        return cls(atoms, truth_table(top, atoms), truth_table(bottom, atoms))

    @classmethod
    def parse(cls, text: str, given: str | None = None, additional: str | None = None) -> Structure:
        """Parse structure text; ``given``/``additional`` override ``P_C``/``P_A`` (the CLI's --given/--additive)."""
        from dpalogic.language.syntax import parse_formula

        ps = parse_structure_text(text)
        core, g, a, lit_false = ps.core, ps.given, ps.additional, ps.given_is_literal_false
        if given is not None and g is not None:
            raise DPALogicError(f"P_C is given twice: in the structure text ({to_ascii(g)}) and by --given ({given})")
        if additional is not None and a is not None:
            raise DPALogicError(
                f"P_A is given twice: in the structure text ({to_ascii(a)}) and by --additive ({additional})"
            )
        if given is not None:
            g = parse_formula(given)
            lit_false = isinstance(g, BooleanFalse)
        if additional is not None:
            a = parse_formula(additional)
        return cls.from_parts(core, g, a, given_is_literal_false=lit_false)

    # ---- views
    @property
    def n(self) -> int:
        return len(self.atoms)

    def over(self, atoms: tuple[Atom, ...]) -> Structure:
        """The same structure with its truth tables extended to a superset of atoms."""
        if atoms == self.atoms:
            return self
        return Structure(atoms, extend_mask(self.top, self.atoms, atoms), extend_mask(self.bottom, self.atoms, atoms))

    @property
    def _as_written(self) -> bool:
        """Beyond MINIMIZE_ATOMS atoms, minimizing formulas (Quine–McCluskey) costs seconds to minutes, so a parsed
        structure is shown as written instead."""
        return self.source is not None and (self.n > MINIMIZE_ATOMS or any(has_construct(e) for e in self.source))

    @property
    def top_formula(self) -> Boolean:
        if self._as_written:
            core, given, _ = self.source
            return And(core, given)
        return readable(self.top, self.atoms)

    @property
    def bottom_formula(self) -> Boolean:
        if self._as_written:
            core, given, additional = self.source
            return Or(And(Not(core), given), additional)
        return readable(self.bottom, self.atoms)

    def readable_triple(self) -> tuple[Boolean, Boolean, Boolean]:
        """The paper's triple ``(✗ → ✓, ✓ ∨ ✗, ✓ ∧ ✗)``, each part in its simplest form (docs/semantics.md §2)."""
        if self._as_written:
            return self.source
        full = full_mask(self.n)
        t, b = self.top, self.bottom
        core = (full & ~b) | t
        given = t | b
        additional = t & b
        return (readable(core, self.atoms), readable(given, self.atoms), readable(additional, self.atoms))

    def text(self, style: str = "unicode") -> str:
        """The readable triple as text, dropping ``P_A = false`` and then ``P_C = true``."""
        return triple_text(self.readable_triple(), style)

    def text_fields(self) -> dict[str, str]:
        """The structure, its readable triple and ✓/✗ as text: the fields ``derive --json`` and ``explore`` share."""
        return text_fields(self)

    def __str__(self) -> str:
        return self.text("unicode")

    def _repr_latex_(self) -> str:
        """Jupyter: the triple, ✓ and ✗, and (when the structure defines a loss) ρ and the loss, typeset."""
        from dpalogic.semantics.program import LATEX_HYPERPARAMETERS, latex_names, rho_sympy, semantic_loss_sympy

        rows = [
            (r"(P, P_C, P_A)", "(" + ", ".join(to_latex(part) for part in self.readable_triple()) + ")"),
            (r"\checkmark", to_latex(self.top_formula)),
            (r"\times", to_latex(self.bottom_formula)),
        ]
        if self.problems():
            rows.append((r"\rho", r"\text{undefined: a degenerate structure}"))
        else:
            names = {**latex_names(self.atoms), **LATEX_HYPERPARAMETERS}
            rows.append((r"\rho", sympy.latex(rho_sympy(self), symbol_names=names)))
            rows.append((r"-\log\sigma(\log\rho)", sympy.latex(semantic_loss_sympy(self), symbol_names=names)))
        return r"$$\begin{aligned}" + r" \\ ".join(f"{k} &= {v}" for k, v in rows) + r"\end{aligned}$$"

    def reversed(self) -> Structure:
        """Swap ✓ and ✗: the structure whose log-ratio is the negation of this one's."""
        return Structure(self.atoms, self.bottom, self.top)

    # ---- degeneracy
    def problems(self) -> list[str]:
        """Why this structure cannot define a training loss (empty list when it can)."""
        out = []
        if self.given_is_literal_false:
            out.append(
                "the conditioning P_C is literally 'false', so no world counts: the paper's tables write ⊥ for "
                "'no conditioning'; in dpalogic leave P_C out (or write true) for that"
            )
        if self.top == 0:
            out.append("the ✓ side P ∧ P_C is unsatisfiable, so WMC(✓) = 0 and the loss is +∞ everywhere")
        if self.bottom == 0:
            out.append("the ✗ side (¬P ∧ P_C) ∨ P_A is unsatisfiable, so WMC(✗) = 0 and the loss is 0 everywhere")
        return out

    def check(self) -> Structure:
        """Raise :class:`DegenerateStructureError` if the structure is degenerate."""
        probs = self.problems()
        if probs:
            raise DegenerateStructureError(
                f"degenerate structure {self.text('ascii') if self.top or self.bottom else ''}".rstrip()
                + ":\n  - "
                + "\n  - ".join(probs)
            )
        return self


def triple_text(triple: tuple[Boolean, Boolean, Boolean], style: str = "unicode") -> str:
    """``(P, P_C, P_A)`` as text, dropping ``P_A = false`` and then ``P_C = true``."""
    fmt = {"unicode": to_unicode, "ascii": to_ascii, "latex": to_latex}[style]
    parts = list(triple)
    if isinstance(parts[2], BooleanFalse):
        parts.pop()
        if isinstance(parts[1], BooleanTrue):
            parts.pop()
    if len(parts) == 1:
        return fmt(parts[0])
    return "(" + ", ".join(fmt(p) for p in parts) + ")"


def text_fields(s) -> dict[str, str]:
    """A structure's text, readable triple and ✓/✗ (any structure: truth tables or OBDD sides)."""
    core, given, additive = s.readable_triple()
    return {
        "structure": s.text("ascii"),
        "structure_unicode": s.text("unicode"),
        "core": to_ascii(core),
        "given": to_ascii(given),
        "additive": to_ascii(additive),
        "top": to_ascii(s.top_formula),
        "bottom": to_ascii(s.bottom_formula),
        "top_unicode": to_unicode(s.top_formula),
        "bottom_unicode": to_unicode(s.bottom_formula),
    }


def common_atoms(*structures: Structure) -> tuple[Atom, ...]:
    found = set()
    for s in structures:
        found.update(s.atoms)
    return tuple(sorted(found, key=lambda a: a.sort_key))


def align(*structures: Structure) -> list[Structure]:
    atoms = common_atoms(*structures)
    return [s.over(atoms) for s in structures]
