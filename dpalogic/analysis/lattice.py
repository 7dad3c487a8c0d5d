"""The entailment lattice of losses (docs/semantics.md §5) as a Hasse diagram: build it, lay it out, export it.

``build_lattice(specs)`` returns a ``networkx.DiGraph`` whose nodes are structures (losses with equivalent
structures merged into one node, named by their first name) and whose edges go from the stronger loss to the
weaker one, transitively reduced. Losses are grouped by atom set — reference-free (only ``M`` atoms) and with a
reference model (``Ref`` atoms) — and compared within their group over the group's atoms; no edge joins two groups
(a reference-free loss is not a reference loss with ``πref`` ignored; the paper draws them apart).

Exports by file extension: ``.json``, ``.dot``, ``.graphml``, ``.png``/``.svg`` (a layered drawing made with
matplotlib's Agg backend, no graphviz needed) and ``.html`` (a self-contained page: inline SVG, no scripts).

networkx and matplotlib are imported lazily: importing this module (as ``dpalogic lattice`` does) costs nothing.
"""

from __future__ import annotations

import html
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dpalogic.analysis.lattice_draw import REFERENCE_FREE, WITH_REFERENCE, draw, to_dot, to_html, write_graphml
from dpalogic.analysis.lattice_draw import layout as layout  # re-exported
from dpalogic.errors import DPALogicError

if TYPE_CHECKING:  # pragma: no cover
    import networkx as nx

    Lattice = nx.DiGraph

    from dpalogic.logic.structure import Structure
    from dpalogic.semantics.program import Program

ID_NOTE = "each node's id is the first of its names; edges are [stronger, weaker] pairs of node ids"
EXTENSIONS = (".json", ".dot", ".graphml", ".png", ".svg", ".html")


# --------------------------------------------------------------------------------------------------- the graph


def _lattice_class() -> type:
    """``Lattice``: a ``networkx.DiGraph`` that draws itself in Jupyter. Made on first use, so that importing this
    module (every CLI start) does not import networkx; ``dpalogic.analysis.lattice.Lattice`` reaches it too."""
    cls = globals().get("Lattice")
    if cls is None:
        import networkx as nx

        class Lattice(nx.DiGraph):
            """The Hasse diagram :func:`build_lattice` returns; displays as its drawing in a notebook."""

            def _repr_svg_(self) -> str | None:
                if self.number_of_nodes() == 0:
                    return None
                svg = draw(self, fmt="svg").decode("utf-8")
                return svg[svg.index("<svg") :]

            def _repr_html_(self) -> str | None:
                svg = self._repr_svg_()
                if svg is None:
                    return None
                text = html.escape(text_summary(self))
                return f"<figure class='dpalogic-lattice'>{svg}<figcaption><pre>{text}</pre></figcaption></figure>"

        Lattice.__module__, Lattice.__qualname__ = __name__, "Lattice"  # pickles as dpalogic.analysis.lattice.Lattice
        globals()["Lattice"] = cls = Lattice
    return cls


def __getattr__(name: str):
    if name == "Lattice":
        return _lattice_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# --------------------------------------------------------------------------------------------------- building


def _group_of(s: Structure) -> str:
    return WITH_REFERENCE if any(a.pred == "Ref" for a in s.atoms) else REFERENCE_FREE


def _named_programs(specs) -> list[tuple[str, Program]]:
    """``(name, program)`` for each spec: catalog names keep their canonical name, structures their text."""
    from dpalogic.logic.structure import Structure
    from dpalogic.semantics.catalog import entries, lookup, pair_names, resolve
    from dpalogic.semantics.program import Program

    if specs is None:  # the pair losses: TPO's structure is CPO's on other answers (y2, y3), comparable to none
        return [(name, entries()[name].program) for name in pair_names()]
    out: list[tuple[str, Program]] = []
    for spec in specs:
        if isinstance(spec, Program):
            name = spec.name or (spec.structure.text("ascii") if spec.structure is not None else "program")
        elif isinstance(spec, Structure):
            name = spec.text("ascii")
        elif isinstance(spec, str) and spec.strip() and "(" not in spec.strip():
            name = lookup(spec).name  # aliases (sigmoid, mdpo) become the catalog name
        elif isinstance(spec, str):
            name = spec.strip()
        else:
            raise DPALogicError(
                f"expected a loss name, structure text, Structure or Program, got {type(spec).__name__}"
            )
        if name not in (n for n, _ in out):
            out.append((name, resolve(spec)))
    return out


def build_lattice(specs=None) -> Lattice:
    """The Hasse diagram of the given losses (default: every single-structure catalog entry).

    Nodes carry ``names`` (merged equivalent structures, in the order given), ``group``, ``atoms`` (the group's),
    the readable triple (``core``, ``given``, ``additive``), ``structure`` (its text), ``top``/``bottom`` (✓/✗),
    ``rho`` and ``rank`` (0 = strongest layer, by longest path). Edges go from stronger to weaker. Programs with
    several structures are skipped, with a note in ``graph["notes"]``.
    """
    import networkx as nx

    from dpalogic.analysis.order import relation
    from dpalogic.language.syntax import to_ascii, to_unicode
    from dpalogic.logic.structure import Structure, common_atoms
    from dpalogic.semantics.program import rho_sympy

    named = _named_programs(specs)
    large = [name for name, p in named if p.structure is not None and not isinstance(p.structure, Structure)]
    if large:  # a drawing of 2^n-world truth tables; K-answer structures are compared pairwise instead
        raise DPALogicError(
            f"lattice draws structures over at most 12 atoms; {', '.join(large)} has more: use `dpalogic compare`, "
            "`meet` and `join`, which decide on OBDDs (docs/semantics.md §8)"
        )
    notes: list[str] = []
    skipped = [name for name, p in named if p.structure is None]
    if skipped:
        notes.append(
            f"skipped {', '.join(skipped)}: programs with several structures have no single place in the lattice"
        )
    groups: dict[str, list[tuple[str, Structure]]] = {}
    for name, p in named:
        if p.structure is not None:
            groups.setdefault(_group_of(p.structure), []).append((name, p.structure))

    g = _lattice_class()(id_note=ID_NOTE, notes=notes, groups={})
    for group in (REFERENCE_FREE, WITH_REFERENCE):  # fixed order: reference-free first, as in the paper
        members = groups.get(group)
        if not members:
            continue
        atoms = common_atoms(*(s for _, s in members))
        g.graph["groups"][group] = [a.name for a in atoms]
        merged: dict[tuple[int, int], list[str]] = {}  # (✓, ✗) over the group's atoms → names
        shapes: dict[tuple[int, int], Structure] = {}
        for name, s in members:
            s = s.over(atoms)
            merged.setdefault((s.top, s.bottom), []).append(name)
            shapes[(s.top, s.bottom)] = s
        sub = nx.DiGraph()
        for sides, names in merged.items():
            s = shapes[sides]
            core, given, additive = s.readable_triple()
            sub.add_node(
                names[0],
                names=list(names),
                group=group,
                atoms=[a.name for a in atoms],
                structure=s.text("unicode"),
                structure_ascii=s.text("ascii"),
                core=to_ascii(core),
                given=to_ascii(given),
                additive=to_ascii(additive),
                top=to_ascii(s.top_formula),
                bottom=to_ascii(s.bottom_formula),
                rho=str(rho_sympy(s)),
                label_parts=[to_unicode(core), to_unicode(given), to_unicode(additive)],
                _structure=s,
            )
        for u, v in ((u, v) for u in sub for v in sub if u != v):
            if relation(sub.nodes[u]["_structure"], sub.nodes[v]["_structure"]) == "stronger":
                sub.add_edge(u, v)
        hasse = nx.transitive_reduction(sub)  # the strict order is acyclic: equivalent structures were merged
        hasse.add_nodes_from(sub.nodes(data=True))
        for v in nx.topological_sort(hasse):  # longest path from the strongest layer
            preds = [hasse.nodes[u]["rank"] for u in hasse.predecessors(v)]
            hasse.nodes[v]["rank"] = 1 + max(preds) if preds else 0
        # nodes strongest layer first (then in the order given): networkx lists edges in node order
        place = {v: (d["rank"], i) for i, (v, d) in enumerate(hasse.nodes(data=True))}
        for v in sorted(hasse, key=place.__getitem__):
            data = dict(hasse.nodes[v])
            data.pop("_structure")
            g.add_node(v, **data)
        g.add_edges_from(sorted(hasse.edges(), key=lambda e: (place[e[0]], place[e[1]])), relation="stronger")  # noqa: B023
    return g


# --------------------------------------------------------------------------------------------------- views


def to_json(g: nx.DiGraph) -> dict[str, Any]:
    """``{"id_note", "groups", "nodes": [...], "edges": [[stronger, weaker], ...], "notes"}``."""
    keys = ("names", "group", "rank", "structure", "core", "given", "additive", "top", "bottom", "rho", "atoms")
    return {
        "id_note": g.graph["id_note"],
        "groups": g.graph["groups"],
        "nodes": [{"id": v, **{k: d[k] for k in keys}} for v, d in g.nodes(data=True)],
        "edges": [[u, v] for u, v in g.edges()],
        "notes": g.graph["notes"],
    }


def plural(n: int, noun: str, nouns: str | None = None) -> str:
    """``1 node``, ``2 nodes``."""
    return f"{n} {noun if n == 1 else nouns or noun + 's'}"


def text_summary(g: nx.DiGraph) -> str:
    """The lattice as text: each group's layers (strongest first) and Hasse edges."""
    lines: list[str] = []
    for group, atoms in g.graph["groups"].items():
        nodes = [v for v, d in g.nodes(data=True) if d["group"] == group]
        edges = [(u, v) for u, v in g.edges() if u in nodes]
        lines.append(
            f"{group} (atoms {', '.join(atoms)}): {plural(len(nodes), 'node')}, {plural(len(edges), 'Hasse edge')}"
        )
        width = max(len(" = ".join(g.nodes[v]["names"])) for v in nodes)
        for v in sorted(nodes, key=lambda v: (g.nodes[v]["rank"], nodes.index(v))):
            d = g.nodes[v]
            lines.append(f"  rank {d['rank']}  {' = '.join(d['names']):<{width}}  {d['structure']}")
        if edges:
            lines.append("  stronger → weaker: " + ", ".join(f"{u} → {v}" for u, v in edges))
    lines.extend(f"note: {n}" for n in g.graph["notes"])
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------- export


def export(g: nx.DiGraph, path: str | Path) -> Path:
    """Write the lattice in the format named by ``path``'s extension (one of ``EXTENSIONS``)."""
    p = Path(path)
    ext = p.suffix.lower()
    if ext not in EXTENSIONS:
        raise DPALogicError(f"cannot write {str(path)!r}: the extension must be one of {', '.join(EXTENSIONS)}")
    if not p.parent.exists():
        raise DPALogicError(f"cannot write {str(path)!r}: the folder {str(p.parent)!r} does not exist")
    try:
        if ext == ".json":
            p.write_text(json.dumps(to_json(g), indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        elif ext == ".dot":
            p.write_text(to_dot(g), encoding="utf-8")
        elif ext == ".graphml":
            write_graphml(g, p)
        elif ext in (".png", ".svg"):
            draw(g, p, ext[1:])
        else:
            p.write_text(to_html(g), encoding="utf-8")
    except OSError as err:
        raise DPALogicError(f"cannot write {str(path)!r}: {err.strerror or err}") from err
    return p
