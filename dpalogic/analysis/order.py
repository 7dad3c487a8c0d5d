"""Relational analysis: how two losses relate (docs/semantics.md §5), meet and join, with numeric witnesses.

``P̄1`` is *stronger* than ``P̄2`` when ``✓1 ⊨ ✓2`` and ``✗2 ⊨ ✗1`` (truth tables: ``t1 & ~t2 == 0`` …); then
``ρ1 ≤ ρ2`` everywhere and, under a shared non-increasing link, ``ℓ1 ≥ ℓ2``. Incomparable structures come with two
witness inputs where each loss is the larger, found on a grid and checked numerically.
"""

from __future__ import annotations

import itertools
import math
import random
from dataclasses import dataclass, field

from dpalogic.analysis import order_large
from dpalogic.logic.structure import Structure, align, full_mask
from dpalogic.semantics import circuit
from dpalogic.semantics.program import LINKS, Program, side_circuit
from dpalogic.semantics.program import same_ratio as _same_ratio_tables


def same_ratio(s1, s2) -> bool:
    """Equal ρ as polynomials: on truth tables up to 12 atoms, exactly on OBDDs beyond (:mod:`.order_large`)."""
    return (order_large.same_ratio if order_large.is_large(s1, s2) else _same_ratio_tables)(s1, s2)


def relation(s1: Structure, s2: Structure) -> str:
    """``equivalent``, ``stronger`` (s1 entails s2's loss bound), ``weaker`` or ``incomparable``."""
    if order_large.is_large(s1, s2):  # beyond truth tables: decided on OBDDs
        return order_large.relation(s1, s2)
    a, b = align(s1, s2)
    full = full_mask(a.n)
    le = (a.top & ~b.top & full) == 0 and (b.bottom & ~a.bottom & full) == 0  # a stronger-or-equal b
    ge = (b.top & ~a.top & full) == 0 and (a.bottom & ~b.bottom & full) == 0
    if le and ge:
        return "equivalent"
    if le:
        return "stronger"
    if ge:
        return "weaker"
    return "incomparable"


def meet(s1: Structure, s2: Structure) -> Structure:
    """The weakest structure stronger than both: ``(✓1 ∧ ✓2, ✗1 ∨ ✗2)``."""
    if order_large.is_large(s1, s2):
        return order_large.meet(s1, s2)
    a, b = align(s1, s2)
    return Structure(a.atoms, a.top & b.top, a.bottom | b.bottom)


def join(s1: Structure, s2: Structure) -> Structure:
    """The strongest structure weaker than both: ``(✓1 ∨ ✓2, ✗1 ∧ ✗2)``."""
    if order_large.is_large(s1, s2):
        return order_large.join(s1, s2)
    a, b = align(s1, s2)
    return Structure(a.atoms, a.top | b.top, a.bottom & b.bottom)


# --------------------------------------------------------------------------------------------------- numerics


def _log1mexp(x: float) -> float:
    x = min(x, -1e-300)
    return math.log(-math.expm1(x)) if x > -math.log(2) else math.log1p(-math.exp(x))


def _eval(node: circuit.Node, lp: list[float]) -> float:
    def lae(vals: list[float]) -> float:
        m = max(vals)
        return m + math.log(sum(math.exp(v - m) for v in vals))

    return circuit.fold(node, lit=lambda i, pos: lp[i] if pos else _log1mexp(lp[i]), one=lambda: 0.0, prod=sum, sum=lae)


def log_rho(s: Structure, logps: dict[str, float]) -> float:
    """``log ρ`` at the given atom log-probabilities (plain floats; used for witnesses)."""
    lp = [logps[a.name] for a in s.atoms]
    top = _eval(side_circuit(s.top, s.n), lp) if s.top else -math.inf
    bottom = _eval(side_circuit(s.bottom, s.n), lp) if s.bottom else -math.inf
    return top - bottom


def semantic_loss(s: Structure, logps: dict[str, float]) -> float:
    z = log_rho(s, logps)
    return math.log1p(math.exp(-z)) if z > -30 else -z + math.log1p(math.exp(z))


_GRID = [math.log(p) for p in (0.01, 0.1, 0.3, 0.5, 0.7, 0.9, 0.99)]


MAX_WITNESS_POINTS = 7**5  # the full grid up to 5 atoms; beyond, a fixed sample of this many points


def _witness_points(n: int):
    """The grid ``_GRID^n`` when it is small; otherwise its corners-and-middle grid, or a fixed-seed sample of it,
    so that comparing structures over many atoms takes the same bounded work (7^12 points would take hours)."""
    if len(_GRID) ** n <= MAX_WITNESS_POINTS:
        return itertools.product(_GRID, repeat=n)
    coarse = (_GRID[0], _GRID[3], _GRID[-1])
    if len(coarse) ** n <= MAX_WITNESS_POINTS:
        return itertools.product(coarse, repeat=n)
    rng = random.Random(0)
    return (tuple(rng.choice(_GRID) for _ in range(n)) for _ in range(MAX_WITNESS_POINTS))


def witnesses(s1: Structure, s2: Structure) -> list[dict]:
    """Inputs (atom log-probs) where loss 1 > loss 2 and where loss 2 > loss 1, each checked numerically."""
    if order_large.is_large(s1, s2):
        return order_large.witnesses(s1, s2)
    a, b = align(s1, s2)
    best_1, best_2 = None, None
    for point in _witness_points(a.n):
        lp = {atom.name: v for atom, v in zip(a.atoms, point)}
        d = semantic_loss(a, lp) - semantic_loss(b, lp)
        if best_1 is None or d > best_1[0]:
            best_1 = (d, lp)
        if best_2 is None or d < best_2[0]:
            best_2 = (d, lp)
    out = []
    for d, lp in (best_1, best_2):
        if abs(d) > 1e-9:
            out.append(
                {
                    "logps": {k: round(v, 6) for k, v in lp.items()},
                    "loss_a": semantic_loss(a, lp),
                    "loss_b": semantic_loss(b, lp),
                    "larger": "a" if d > 0 else "b",
                }
            )
    return out


# --------------------------------------------------------------------------------------------------- compare


@dataclass
class Comparison:
    """How loss ``a`` relates to loss ``b``: :meth:`as_dict` is ``compare --json``, :meth:`lines` its text."""

    relation: str
    same_loss: bool
    links: list[str]
    notes: list[str] = field(default_factory=list)
    witnesses: list[dict] = field(default_factory=list)
    terms: list[dict] = field(default_factory=list)
    a: str = "A"
    b: str = "B"
    structure_a: str | None = None  # ASCII structure text; None for a program with several structures
    structure_b: str | None = None

    def as_dict(self) -> dict:
        return {
            "relation": self.relation,
            "same_loss": self.same_loss,
            "links": self.links,
            "notes": self.notes,
            "witnesses": self.witnesses,
            "terms": self.terms,
            "a": self.a,
            "b": self.b,
            "structure_a": self.structure_a,
            "structure_b": self.structure_b,
        }

    def lines(self) -> list[str]:
        return comparison_lines(self.as_dict())

    def __str__(self) -> str:
        return "\n".join(self.lines())

    def _repr_html_(self) -> str:
        """Jupyter: the verdict, then the rest of :meth:`lines` as a list."""
        import html

        first, *rest = self.lines()
        items = "".join(f"<li>{html.escape(line)}</li>" for line in rest)
        return f"<div class='dpalogic-comparison'><p><strong>{html.escape(first)}</strong></p><ul>{items}</ul></div>"


_VERBS = {"stronger": "is stronger than", "weaker": "is weaker than", "equivalent": "is equivalent to",
          "incomparable": "is incomparable with"}  # fmt: skip


def _witness_text(logps: dict[str, float]) -> str:
    """``log M(y1) = -4.6, log M(y2..y9) = -2.3, …``: consecutive answers of one predicate with one value as a range
    (a witness over 64 answers is a line, not 64 entries)."""
    import re

    runs: list[list] = []  # [pred, first answer, last answer, value, name]
    for name, v in logps.items():
        m = re.fullmatch(r"(M|Ref)\(y(\d+)\)", name)
        if m and runs and runs[-1][0] == m.group(1) and runs[-1][2] + 1 == int(m.group(2)) and runs[-1][3] == v:
            runs[-1][2] += 1
            continue
        runs.append([m.group(1), int(m.group(2)), int(m.group(2)), v, name] if m else [None, 0, 0, v, name])
    parts = []
    for pred, first, last, v, name in runs:
        label = name if pred is None or first == last else f"{pred}(y{first}..y{last})"
        parts.append(f"log {label} = {v:g}")
    return ", ".join(parts)


def comparison_lines(info: dict) -> list[str]:
    """The text report of a comparison (``compare``'s output; ``info`` is :meth:`Comparison.as_dict`)."""
    a, b, rel = info["a"], info["b"], info["relation"]
    out = [f"{a} {_VERBS[rel]} {b}"]
    for name, key in ((a, "structure_a"), (b, "structure_b")):
        if info[key] != name:  # a loss name: show its structure (a formula given as such is its own structure)
            out.append(f"  {name}: {info[key] or '(several structures)'}")
    out += [
        f"same loss function: {'yes' if info['same_loss'] else 'no'}; links: {info['links'][0]} vs {info['links'][1]}",
    ]
    if rel == "stronger":
        out.append(f"so under a shared monotone link, {a}'s loss ≥ {b}'s loss on every input")
    if rel == "weaker":
        out.append(f"so under a shared monotone link, {a}'s loss ≤ {b}'s loss on every input")
    out += [f"- {n}" for n in info["notes"]]
    for w in info["witnesses"]:
        lp = _witness_text(w["logps"])
        out.append(f"witness: {lp}: −log σ(log ρ) of {a} = {w['loss_a']:.4f}, of {b} = {w['loss_b']:.4f}")
    out += [f"term {t['term']}: {t['relation']}{' (same loss)' if t['same_loss'] else ''}" for t in info["terms"]]
    return out


def _link_note(name: str, p: Program) -> str | None:
    t = p.preference_terms[0]
    info = LINKS[t.link]
    if info.monotone:
        return None
    if t.link == "squared":
        return (
            f"{name}'s squared link is not monotone: it is smallest at β·log ρ = γ (here log ρ = {t.shift / t.scale}),"
            f" so {name} stops rewarding margins beyond that point and penalizes larger ones"
        )
    return f"{name}'s {t.link} link ({info.formula}) is not monotone, so the structure order bounds it only partly"


def _term_key(t, p: Program) -> tuple:
    """A term's link and numbers at the program's default hyperparameters (what decides the loss function)."""
    import sympy

    subs = {sympy.Symbol(k): v for k, v in p.defaults.items()}

    def num(e):
        v = e.subs(subs)
        return round(float(v), 12) if not v.free_symbols else str(v)

    params = tuple((k, num(v)) for k, v in t.link_params)
    return (t.link, params, num(t.coef), num(t.scale), num(t.shift), t.normalized)


def compare(a, b, name_a: str | None = None, name_b: str | None = None) -> Comparison:
    """How two losses relate: per preference term when they have several.

    ``a`` and ``b`` are programs, structures, catalog names or structure text (``compare("cpo", "orpo")``); names
    default to the text given, else the program's name, else ``A`` and ``B``.
    """
    from dpalogic.semantics.catalog import resolve

    name_a = name_a or (a if isinstance(a, str) else getattr(a, "name", None) or "A")
    name_b = name_b or (b if isinstance(b, str) else getattr(b, "name", None) or "B")
    a, b = resolve(a), resolve(b)
    texts = {
        "a": name_a,
        "b": name_b,
        "structure_a": a.structure.text("ascii") if a.structure is not None else None,
        "structure_b": b.structure.text("ascii") if b.structure is not None else None,
    }
    pa, pb = a.preference_terms, b.preference_terms
    links = [pa[0].link, pb[0].link]
    notes = [n for n in (_link_note(name_a, a), _link_note(name_b, b)) if n]
    if a.structure is not None and b.structure is not None:
        s1, s2 = a.structure, b.structure
        rel = relation(s1, s2)
        same_rho = same_ratio(s1, s2)
        t1, t2 = pa[0], pb[0]
        same_program_shape = len(a.terms) == len(b.terms) and all(
            _term_key(x, a) == _term_key(y, b) for x, y in zip(a.terms, b.terms)
        )
        same = (
            same_rho
            and same_program_shape
            and all(same_ratio(x.structure, y.structure) for x, y in zip(a.terms[1:], b.terms[1:]))
        )
        if same_rho and not same:
            notes.append(f"equal ρ, but the programs differ (link {t1.link} vs {t2.link}, or hyperparameters/terms)")
        a1, a2 = order_large.shared(s1, s2) if order_large.is_large(s1, s2) else align(s1, s2)
        (c1, g1, x1), (c2, g2, x2) = a1.readable_triple(), a2.readable_triple()
        if rel != "equivalent" and c1 == c2:
            from dpalogic.language.syntax import to_unicode

            notes.append(
                f"same core formula P = {to_unicode(c1)} under different conditioning: "
                f"P_C = {to_unicode(g1)} vs {to_unicode(g2)}, P_A = {to_unicode(x1)} vs {to_unicode(x2)}"
            )
        if rel == "equivalent" and links[0] != links[1]:
            notes.append(
                f"same structure, different links ({links[0]} vs {links[1]}): the same meaning, trained differently"
            )
        if rel != "equivalent" and same_rho:
            notes.append("different structures that give the same loss function (equal ρ as polynomials)")
        wit = witnesses(s1, s2) if rel == "incomparable" else []
        return Comparison(rel, same, links, notes, wit, **texts)
    # several structures: compare term by term, in order
    terms = []
    for k, (t1, t2) in enumerate(zip(pa, pb), 1):
        terms.append(
            {
                "term": k,
                "relation": relation(t1.structure, t2.structure),
                "same_loss": same_ratio(t1.structure, t2.structure),
            }
        )
    rels = {t["relation"] for t in terms}
    rel = rels.pop() if len(rels) == 1 and len(pa) == len(pb) else "incomparable"
    notes.append(f"programs with several structures ({len(pa)} and {len(pb)} preference terms): compared term by term")
    same = len(pa) == len(pb) and all(t["same_loss"] for t in terms)
    return Comparison(rel, same, links, notes, [], terms, **texts)
