"""The landscape of preference structures (docs/semantics.md §2, §5, §7): how many loss functions, what lies between two.

* ``landscape(n)`` — over ``n ≤ 8`` atoms: ``4^(2^n)`` structures, the exact number of distinct non-degenerate
  loss functions (187 for ``n = 2``, 4,294,246,507 for ``n = 4``), how many structures share each one, and the
  degenerate classes; counted by factoring WMC polynomials (:mod:`dpalogic.analysis.factoring`), with no enumeration.
  ``loss_classes(n)`` enumerates every structure for ``n ≤ 3``: the independent check the tests use.
* ``explore(a, b)`` — the structures strictly between two comparable losses, with the catalog's names and closed
  forms: the paper's way of deriving new losses from first principles. Intervals up to ``MAX_INTERVAL`` are keyed
  in full (smallest readable structure first, distinct losses counted); larger ones are counted exactly and
  listed lazily.

Whether two structures give the same loss function is decided exactly by :mod:`dpalogic.semantics.loss_keys`.
"""

from __future__ import annotations

import heapq
import itertools
from collections import Counter
from dataclasses import dataclass
from functools import lru_cache
from math import comb
from operator import add
from typing import Any

from dpalogic.errors import DPALogicError
from dpalogic.language.syntax import Atom
from dpalogic.logic.structure import Structure, align, common_atoms, full_mask, readable
from dpalogic.semantics.catalog import catalog_index
from dpalogic.semantics.loss_keys import Q, _key, _ratio_ids, _subset_vectors, loss_key
from dpalogic.semantics.loss_keys import _world_weights as _world_weights  # re-exported

MAX_EXACT_ATOMS = 3  # 4^(2^4) ≈ 4.3e9 structures: the exact count stops at three atoms
MAX_ATOMS = 8
MAX_INTERVAL = 1 << 18  # explore enumerates at most this many structures


# --------------------------------------------------------------------------------------------------- landscape


def landscape_atoms(n: int) -> tuple[Atom, ...]:
    """The atoms used to print examples: ``M(yw), M(yl)`` for a pair, ``M(y1) … M(yn)`` beyond two."""
    if n <= 2:
        return (Atom("M", "yw"), Atom("M", "yl"))[:n]
    if n == 4:  # the paper's question: a pair of answers with a reference model
        return (Atom("M", "yw"), Atom("M", "yl"), Atom("Ref", "yw"), Atom("Ref", "yl"))
    return tuple(Atom("M", f"y{i}") for i in range(1, n + 1))


LISTED_MEMBERS = 8  # members printed per example class (a class over 4 atoms can hold 65,535 structures)


@dataclass
class Landscape:
    atoms: int
    structures: int
    non_degenerate_structures: int
    loss_functions: int  # distinct non-degenerate loss functions
    degenerate: list[dict[str, Any]]
    class_sizes: dict[int, int]  # structures per loss function → how many loss functions have that many
    by_support: dict[int, int]  # atoms a loss function depends on → how many loss functions
    largest: list[tuple[int, list[tuple[int, int]]]]  # example classes, largest first: (size, first members)

    def as_dict(self, example_atoms: tuple[Atom, ...]) -> dict[str, Any]:
        def text(t: int, b: int) -> str:
            return Structure(example_atoms, t, b).text("ascii")

        return {
            "atoms": self.atoms,
            "atom_names": [a.name for a in example_atoms],
            "worlds": 1 << self.atoms,
            "structures": self.structures,
            "non_degenerate_structures": self.non_degenerate_structures,
            "loss_functions": self.loss_functions,
            "degenerate": self.degenerate,
            "classes": self.loss_functions + len(self.degenerate),
            "class_sizes": {str(k): v for k, v in sorted(self.class_sizes.items())},
            "loss_functions_by_support": {str(k): v for k, v in sorted(self.by_support.items())},
            "largest_classes": [
                {"structures": size, "members": [text(t, b) for t, b in members]} for size, members in self.largest
            ],
        }


def loss_classes(n: int) -> tuple[dict[tuple[int, ...], list[tuple[int, int]]], dict[str, int]]:
    """Every structure over ``n ≤ 3`` atoms, grouped by loss function: ``{key: [(✓, ✗), …]}``, and the counts of
    the degenerate ones (``empty ✓``, ``empty ✗``, ``both empty``), all found by enumerating the ``4^(2^n)`` pairs.
    """
    if n > MAX_EXACT_ATOMS:
        raise DPALogicError(f"the exact landscape enumerates structures: at most {MAX_EXACT_ATOMS} atoms, got {n}")
    sides = 1 << (1 << n)
    degenerate = {"empty ✓": 0, "empty ✗": 0, "both empty": 0}
    vecs = _subset_vectors(0, full_mask(n), n)  # every truth table with its WMC vector
    ids, t1 = _ratio_ids(n), Q**n + 1
    lookup = ids.__getitem__
    classes: dict[tuple[int, ...], list[tuple[int, int]]] = {}
    for top, vt in vecs:
        if top == 0:
            degenerate["both empty"] += 1
            degenerate["empty ✓"] += sides - 1
            continue
        degenerate["empty ✗"] += 1
        scaled = [a * t1 for a in vt]
        for bottom, vb in vecs:
            if bottom == 0:
                continue
            # ids[a·(T+1) + b] at every grid point: the reduced values of ρ, i.e. the canonical key
            key = tuple(map(lookup, map(add, scaled, vb)))
            members = classes.get(key)
            if members is None:
                classes[key] = [(top, bottom)]
            else:
                members.append((top, bottom))
    return classes, degenerate


def landscape(n: int, examples: int = 3) -> Landscape:
    """Exact counts over ``n`` atoms, from the factorization of WMC polynomials (:mod:`dpalogic.analysis.factoring`).

    No structure is enumerated: the counts are closed-form sums over big integers, and the example classes are
    built from their canonical structures. ``loss_classes`` (enumeration, ``n ≤ 3``) is the independent check.
    """
    from dpalogic.analysis import factoring

    if not isinstance(n, int) or isinstance(n, bool) or n < 1 or n > MAX_ATOMS:
        raise DPALogicError(f"--atoms must be an integer from 1 to {MAX_ATOMS}, got {n!r}")
    sides = 1 << (1 << n)  # truth tables per side
    counts = {"empty ✓": sides - 1, "empty ✗": sides - 1, "both empty": 1}
    largest = []
    for t, b in factoring.smallest_support_classes(n, examples) if examples else ():
        size = factoring.class_of(t, b, n)[1]
        largest.append((size, list(itertools.islice(factoring.class_members(t, b, n), LISTED_MEMBERS))))
    return Landscape(
        n,
        sides * sides,
        (sides - 1) ** 2,
        factoring.loss_function_count(n),
        _degenerate_rows(counts),
        factoring.class_size_histogram(n),
        {k: comb(n, k) * factoring.depending_on_all(k) for k in range(n + 1)},
        largest,
    )


def _degenerate_rows(counts: dict[str, int]) -> list[dict[str, Any]]:
    meaning = {
        "empty ✓": "WMC(✓) = 0: loss +∞ everywhere",
        "empty ✗": "WMC(✗) = 0: loss 0 everywhere",
        "both empty": "0/0: no loss at all",
    }
    return [{"kind": k, "loss": meaning[k], "structures": v} for k, v in counts.items()]


# --------------------------------------------------------------------------------------------------- explore


def _leaves(e) -> int:
    """Atom occurrences in a formula."""
    if e.is_Symbol:
        return 1
    return sum(_leaves(a) for a in e.args)


@lru_cache(maxsize=65536)
def _mask_size(mask: int, atoms: tuple[Atom, ...]) -> int:
    """Atom occurrences in the readable formula of a truth table (constants: 0)."""
    if mask == 0 or mask == full_mask(len(atoms)):
        return 0
    return _leaves(readable(mask, atoms))


@lru_cache(maxsize=65536)
def _mask_size_bound(mask: int, atoms: tuple[Atom, ...]) -> int:
    """A lower bound on ``_mask_size``, exact whenever the readable search's small-formula table has the mask.

    That table holds every truth table expressible with ≤ 3 atom occurrences (≤ 2 from five atoms on), so a
    mask outside it needs at least one more — computing it exactly would take SymPy's minimizer.
    """
    from dpalogic.logic.structure import _small_formulas

    n = len(atoms)
    if mask == 0 or mask == full_mask(n):
        return 0
    if n > 6:
        return 1
    if mask in _small_formulas(n):
        return _mask_size(mask, atoms)
    return 4 if n <= 4 else 3


def _parts(top: int, bottom: int, full: int) -> tuple[int, int, int]:
    """The readable triple's truth tables ``(✗ → ✓, ✓ ∨ ✗, ✓ ∧ ✗)``."""
    return (full & ~bottom) | top, top | bottom, top & bottom


def structure_size(s: Structure) -> int:
    """Atom occurrences in the printed readable triple (the parts ``P_C = true``/``P_A = false`` have none)."""
    return sum(_mask_size(m, s.atoms) for m in _parts(s.top, s.bottom, full_mask(s.n)))


def _sort_key(top: int, bottom: int, atoms: tuple[Atom, ...], exact: bool) -> tuple:
    full = full_mask(len(atoms))
    core, given, additive = _parts(top, bottom, full)
    size_of = _mask_size if exact else _mask_size_bound
    size = size_of(core, atoms) + size_of(given, atoms) + size_of(additive, atoms)
    # fewer printed parts first (a bare formula before a conditioned one), then a fixed order
    parts = 1 + (given != full or additive != 0) + (additive != 0)
    return (size, parts, top, bottom)


def _in_size_order(cands: list[tuple[int, int]], atoms: tuple[Atom, ...]):
    """Yield ``(sort key, (✓, ✗))`` in exact size order, computing exact sizes lazily (best-first on bounds).

    Each exact key is ≥ its bound, so once the smallest exact key seen is ≤ the next bound, it is the minimum.
    """
    bounded = sorted((_sort_key(t, b, atoms, exact=False), (t, b)) for t, b in cands)
    heap: list = []
    i = 0
    while i < len(bounded) or heap:
        while i < len(bounded) and (not heap or bounded[i][0] <= heap[0][0]):
            t, b = bounded[i][1]
            heapq.heappush(heap, (_sort_key(t, b, atoms, exact=True), (t, b)))
            i += 1
        yield heapq.heappop(heap)


def _structure_of(spec: str) -> Structure:
    from dpalogic.semantics.catalog import resolve

    p = resolve(spec)
    if p.structure is None:
        raise DPALogicError(
            f"{spec!r} has several structures ({len(p.structures)} preference terms); explore needs "
            "single-structure losses"
        )
    return p.structure


def _parse_atoms(texts: list[str] | None) -> tuple[Atom, ...]:
    from dpalogic.language.syntax import atoms_of, parse_formula

    out: list[Atom] = []
    for chunk in texts or []:
        for text in (t.strip() for t in chunk.split(",")):
            if not text:
                continue
            e = parse_formula(text)
            if not e.is_Symbol:
                raise DPALogicError(f"--atoms takes atoms such as M(yw) or Ref(yl), got the formula {text!r}")
            out.extend(atoms_of(e))
    return tuple(out)


def _endpoints(
    a: str | Structure, b: str | Structure, atoms: list[str] | tuple[Atom, ...] | None
) -> tuple[Structure, Structure, str, str, bool]:
    """The two losses over common atoms, stronger first: ``(stronger, weaker, its name, its name, swapped)``."""
    from dpalogic.analysis.order import join, meet, relation

    name_a = a if isinstance(a, str) else a.text("ascii")
    name_b = b if isinstance(b, str) else b.text("ascii")
    sa = _structure_of(a) if isinstance(a, str) else a.check()
    sb = _structure_of(b) if isinstance(b, str) else b.check()
    extra = atoms if isinstance(atoms, tuple) else _parse_atoms(atoms)
    if extra:  # explore over more atoms than the two losses mention
        target = common_atoms(sa, sb, Structure(extra, 0, 0))
        sa, sb = sa.over(target), sb.over(target)
    else:
        sa, sb = align(sa, sb)
    rel = relation(sa, sb)
    if rel == "weaker":
        return sb, sa, name_b, name_a, True
    if rel == "equivalent":
        raise DPALogicError(f"{name_a} and {name_b} have the same structure: nothing lies strictly between them")
    if rel == "incomparable":
        m, j = meet(sa, sb), join(sa, sb)
        raise DPALogicError(
            f"{name_a} and {name_b} are incomparable, so no interval lies between them; both lie between their "
            f"meet {m.text('ascii')!r} and their join {j.text('ascii')!r} (try: dpalogic explore --between "
            f"'{m.text('ascii')}' '{j.text('ascii')}')"
        )
    return sa, sb, name_a, name_b, False


def _row_maker(at: tuple[Atom, ...], by_sides: dict, by_key: dict, closed_forms: bool):
    """``row(✓, ✗, size)``: one listed structure with its catalog names, its class and (optionally) closed forms."""
    from dpalogic.analysis import factoring
    from dpalogic.semantics.program import rho_sympy, semantic_loss_sympy

    n = len(at)

    def row_of(t: int, b_: int, size: int | None) -> dict[str, Any]:
        s = Structure(at, t, b_)
        row: dict[str, Any] = {
            **s.text_fields(),
            "size": size,
            "catalog": by_sides.get((t, b_), []),
            "same_loss_as": by_key.get(loss_key(s), []),
            # structures over these atoms with this loss function (the whole landscape, by factoring)
            "class_size": factoring.class_of(t, b_, n)[1] if n <= factoring.MAX_FACTOR_ATOMS else None,
        }
        if closed_forms:
            row["rho"] = str(rho_sympy(s))
            row["loss"] = str(semantic_loss_sympy(s))
        return row

    return row_of


def _list_all(sa: Structure, sb: Structure, free_top: int, free_bottom: int, row_of, limit: int, distinct: bool):
    """Small enough to key every member: the members' loss keys (an exact distinct count), and the first ``limit``
    rows in readable-size order."""
    at, n = sa.atoms, sa.n
    endpoints = {(sa.top, sa.bottom), (sb.top, sb.bottom)}
    tops = _subset_vectors(sa.top, free_top, n)
    bottoms = _subset_vectors(sb.bottom, free_bottom, n)
    keys: dict[tuple[int, int], tuple] = {}
    for t, vt in tops:
        for b_, vb in bottoms:
            if (t, b_) not in endpoints and t and b_:
                keys[(t, b_)] = _key(vt, vb, n)
    members = Counter(keys.values())
    seen: set[tuple] = set()
    listed: list[dict[str, Any]] = []
    for sort_key, (t, b_) in _in_size_order(list(keys), at) if limit else ():
        k = keys[(t, b_)]
        if distinct and k in seen:
            continue
        seen.add(k)
        listed.append({**row_of(t, b_, sort_key[0]), "structures_with_this_loss": members[k]})
        if len(listed) >= limit:
            break
    return listed, keys, members


def _list_lazily(sa: Structure, sb: Structure, free_top: int, free_bottom: int, row_of, limit: int, distinct: bool):
    """Too many to enumerate (up to 2^(2·2^n)): the first ``limit`` rows from the stronger end."""
    from dpalogic.analysis import factoring

    endpoints = {(sa.top, sa.bottom), (sb.top, sb.bottom)}
    first_seen: dict[tuple[int, int], int] = {}
    listed: list[dict[str, Any]] = []
    for t, b_ in _interval_members(sa.top, free_top, sb.bottom, free_bottom) if limit else ():
        if (t, b_) in endpoints:
            continue
        canon = factoring.canonical_structure(t, b_, sa.n)
        if distinct and canon in first_seen:
            continue
        row = row_of(t, b_, None)
        row["same_loss_as_listed"] = first_seen.get(canon)
        first_seen.setdefault(canon, len(listed) + 1)
        listed.append(row)
        if len(listed) >= limit:
            break
    return listed


def explore(
    a: str | Structure,
    b: str | Structure,
    atoms: list[str] | tuple[Atom, ...] | None = None,
    limit: int = 20,
    distinct: bool = False,
    closed_forms: bool = True,
) -> dict[str, Any]:
    """The structures strictly between two comparable losses, smallest readable triple first.

    With ``A`` stronger than ``B`` the interval is ``✓_A ⊆ ✓ ⊆ ✓_B`` and ``✗_B ⊆ ✗ ⊆ ✗_A`` (docs/semantics.md §5);
    the endpoints are left out. ``distinct`` keeps the smallest structure of each loss function.
    """
    if limit < 0:
        raise DPALogicError(f"--limit must be ≥ 0, got {limit}")
    sa, sb, name_a, name_b, swapped = _endpoints(a, b, atoms)
    at, full = sa.atoms, full_mask(sa.n)
    free_top = sb.top & ~sa.top & full
    free_bottom = sa.bottom & ~sb.bottom & full
    free = free_top.bit_count() + free_bottom.bit_count()
    by_sides, by_key = catalog_index(at)  # one catalog index: dpalogic.semantics.catalog
    endpoints = {(sa.top, sa.bottom), (sb.top, sb.bottom)}
    row_of = _row_maker(at, by_sides, by_key, closed_forms)
    enumerated = 1 << free <= MAX_INTERVAL
    if enumerated:
        listed, keys, members = _list_all(sa, sb, free_top, free_bottom, row_of, limit, distinct)
        inside = [sides for sides in by_sides if sides in keys]
        strictly, distinct_losses = len(keys), len(members)
    else:
        listed = _list_lazily(sa, sb, free_top, free_bottom, row_of, limit, distinct)
        inside = [sd for sd in by_sides if sd not in endpoints and _inside(sd, sa, sb)]
        # every member has ✓ ⊇ ✓_A ≠ ∅ and ✗ ⊇ ✗_B ≠ ∅: none is degenerate
        strictly, distinct_losses = (1 << free) - len(endpoints), None
    # catalog losses inside the interval, smallest structure first; equivalent ones (cpo = slic = …) grouped
    inside.sort(key=lambda sd: _sort_key(*sd, at, exact=True))
    catalog_groups = [by_sides[sides] for sides in inside]
    return {
        "stronger": name_a,
        "weaker": name_b,
        "swapped": swapped,
        "atoms": [x.name for x in at],
        "stronger_structure": sa.text("ascii"),
        "weaker_structure": sb.text("ascii"),
        "stronger_structure_unicode": sa.text("unicode"),
        "weaker_structure_unicode": sb.text("unicode"),
        "interval": 1 << free,
        "strictly_between": strictly,
        "distinct_losses": distinct_losses,
        "enumerated": enumerated,
        "order": "readable size" if enumerated else "worlds moved from the stronger end, fewest first",
        "catalog_between": [name for group in catalog_groups for name in group],
        "catalog_between_groups": catalog_groups,
        "distinct": distinct,
        "listed": listed,
    }


def _inside(sides: tuple[int, int], sa: Structure, sb: Structure) -> bool:
    t, b = sides
    return sa.top & ~t == 0 and t & ~sb.top == 0 and sb.bottom & ~b == 0 and b & ~sa.bottom == 0


def _interval_members(top: int, free_top: int, bottom: int, free_bottom: int):
    """``(✓, ✗)`` over the interval lazily: ``r`` free worlds moved (added to ✓ or taken from ✗), ``r = 0, 1, …``."""
    moves = [("t", 1 << w) for w in range(free_top.bit_length()) if (free_top >> w) & 1]
    moves += [("b", 1 << w) for w in range(free_bottom.bit_length()) if (free_bottom >> w) & 1]
    for r in range(len(moves) + 1):
        for chosen in itertools.combinations(moves, r):
            t, b = top, bottom | free_bottom  # the stronger end: smallest ✓, largest ✗
            for side, bit in chosen:
                if side == "t":
                    t |= bit
                else:
                    b &= ~bit
            yield t, b
