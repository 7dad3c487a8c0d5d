"""The lattice's drawing and its text formats: a layered layout (longest-path ranks, virtual points on long
edges, barycenter sweeps), the matplotlib drawing (PNG, SVG), Graphviz DOT, GraphML and a self-contained HTML page.

matplotlib and networkx are imported lazily, inside the functions that need them.
"""

from __future__ import annotations

import html
import io
import textwrap
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dpalogic.errors import DPALogicError

if TYPE_CHECKING:  # pragma: no cover
    import networkx as nx

# the lattice's two groups of losses (by atom set), each drawn in its own colour
REFERENCE_FREE = "reference-free"
WITH_REFERENCE = "with reference"


# --------------------------------------------------------------------------------------------------- layout


Route = tuple[str, str, list[tuple[float, float]]]


def _layers(g: nx.DiGraph) -> list[tuple[str, list[list[Any]], dict[tuple[str, str], list[Any]]]]:
    """Per group: its ordered layers (node ids and virtual points) and each edge's chain through them.

    Layers are the longest-path ranks; an edge that skips layers gets a virtual point on each layer it crosses
    (so it is routed between boxes, not through them), and each layer is ordered by barycenter sweeps, down then
    up, to reduce crossings.
    """
    out = []
    for group in g.graph["groups"]:
        nodes = [v for v, d in g.nodes(data=True) if d["group"] == group]
        rank: dict[Any, int] = {v: g.nodes[v]["rank"] for v in nodes}
        up: dict[Any, list[Any]] = {v: [] for v in nodes}  # neighbours one layer up / down
        down: dict[Any, list[Any]] = {v: [] for v in nodes}
        chains: dict[tuple[str, str], list[Any]] = {}
        for u, v in g.edges():
            if u not in rank:
                continue
            chain: list[Any] = [u, *(("virtual", u, v, r) for r in range(rank[u] + 1, rank[v])), v]
            for point in chain[1:-1]:
                rank[point] = point[3]
                up[point], down[point] = [], []
            for a, b in zip(chain, chain[1:]):
                down[a].append(b)
                up[b].append(a)
            chains[(u, v)] = chain
        layers: dict[int, list[Any]] = {}
        for v in rank:  # nodes first, in insertion order, then virtual points
            layers.setdefault(rank[v], []).append(v)
        depth = max(layers) + 1
        for sweep in range(8):
            downward = sweep % 2 == 0
            for r in range(1, depth) if downward else range(depth - 2, -1, -1):
                nbrs = up if downward else down
                index = {v: i for lay in layers.values() for i, v in enumerate(lay)}
                bary = {
                    v: sum(index[w] for w in nbrs[v]) / len(nbrs[v]) if nbrs[v] else float(i)
                    for i, v in enumerate(layers[r])
                }
                layers[r].sort(key=lambda v: bary[v])
        out.append((group, [layers[r] for r in range(depth)], chains))
    return out


def layout(
    g: nx.DiGraph,
    sizes: dict[str, tuple[float, float]] | None = None,
    gap: float = 0.3,
    virtual_width: float = 0.15,
) -> tuple[dict[str, tuple[float, float]], list[Route]]:
    """A layered top-to-bottom layout: node centres and, per Hasse edge, its polyline (virtual points included).

    ``sizes`` gives each node's box (width, height) in any unit (default 1 × 0.5); boxes in a layer sit side by
    side ``gap`` apart, centred on their group; layers are one box height plus ``2·gap`` apart; groups sit side by
    side. y grows upwards, so the strongest layer is on top.
    """
    sizes = sizes or {v: (1.0, 0.5) for v in g}
    step = max((h for _, h in sizes.values()), default=0.5) + 2 * gap
    pos: dict[str, tuple[float, float]] = {}
    routes: list[Route] = []
    x0 = 0.0
    for _group, layers, chains in _layers(g):

        def width(v: Any) -> float:
            return virtual_width if isinstance(v, tuple) else sizes[v][0]

        # start with each layer centred, then pull every item towards the mean of its neighbours (a few sweeps),
        # keeping the layer's order and spacing: x = (leftmost feasible + rightmost feasible) / 2 stays feasible
        where: dict[Any, list[float]] = {}
        totals = [sum(width(v) for v in lay) + gap * (len(lay) - 1) for lay in layers]
        for r, (lay, total) in enumerate(zip(layers, totals)):
            x = -total / 2
            for v in lay:
                where[v] = [x + width(v) / 2, -r * step]
                x += width(v) + gap
        nbrs = {v: [] for v in where}
        for chain in chains.values():
            for a, b in zip(chain, chain[1:]):
                nbrs[a].append(b)
                nbrs[b].append(a)
        for _ in range(6):
            for lay in layers:
                want = [sum(where[w][0] for w in nbrs[v]) / len(nbrs[v]) if nbrs[v] else where[v][0] for v in lay]
                sep = [(width(a) + width(b)) / 2 + gap for a, b in zip(lay, lay[1:])]
                lo, hi = want[:], want[:]
                for i in range(1, len(lay)):
                    lo[i] = max(want[i], lo[i - 1] + sep[i - 1])
                for i in range(len(lay) - 2, -1, -1):
                    hi[i] = min(want[i], hi[i + 1] - sep[i])
                for v, a, b in zip(lay, lo, hi):
                    where[v][0] = (a + b) / 2
        left = min(where[v][0] - width(v) / 2 for v in where)
        right = max(where[v][0] + width(v) / 2 for v in where)
        for xy in where.values():
            xy[0] += x0 - left
        pos.update({v: (xy[0], xy[1]) for v, xy in where.items() if not isinstance(v, tuple)})
        routes.extend((u, v, [(where[c][0], where[c][1]) for c in chain]) for (u, v), chain in chains.items())
        x0 += right - left + 2 * gap
    return pos, routes


def _label(d: dict[str, Any]) -> str:
    """A node's label: its names (wrapped), then ``P``, and ``P_C``/``P_A`` when they are not the defaults."""
    names = textwrap.fill(", ".join(d["names"]), width=34, break_long_words=False)
    core, given, additive = d["label_parts"]
    lines = [names, core]
    if d["given"] != "true" or d["additive"] != "false":
        lines.append("given " + given)
    if d["additive"] != "false":
        lines.append("also ✗ " + additive)
    return "\n".join(lines)


ARROW_GAP = 0.03  # inches between an arrow's ends and the boxes they join


def _on_border(rect, towards: tuple[float, float], gap: float = ARROW_GAP) -> tuple[float, float]:
    """Where the segment from the centre of ``rect`` (``[[x0, y0], [x1, y1]]``) to ``towards`` leaves the box, moved
    ``gap`` further out along it."""
    (x0, y0), (x1, y1) = rect
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    dx, dy = towards[0] - cx, towards[1] - cy
    length = (dx * dx + dy * dy) ** 0.5
    if length == 0:
        return (cx, cy)
    s = min((x1 - x0) / 2 / abs(dx) if dx else float("inf"), (y1 - y0) / 2 / abs(dy) if dy else float("inf"))
    return (cx + dx * s + gap * dx / length, cy + dy * s + gap * dy / length)


_COLORS = {REFERENCE_FREE: "#dbe9f6", WITH_REFERENCE: "#fbe3cf"}
_TEXT = {"ha": "center", "va": "center", "fontsize": 8.5, "linespacing": 1.35}
_BOX = {"boxstyle": "round,pad=0.45", "ec": "#555555", "lw": 0.9}


def draw(g: nx.DiGraph, path: str | Path | None = None, fmt: str | None = None) -> bytes:
    """Draw the lattice with matplotlib (Agg) as PNG or SVG; writes ``path`` if given and returns the bytes.

    Boxes are measured first, then laid out in inches (one data unit = one inch), so long labels never overlap.
    SVG keeps its text as text (``svg.fonttype = none``): names stay searchable and selectable.
    """
    import matplotlib
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fmt = fmt or (Path(path).suffix.lstrip(".") if path else "svg")
    if g.number_of_nodes() == 0:
        raise DPALogicError("the lattice is empty: give at least one single-structure loss")
    labels = {v: _label(d) for v, d in g.nodes(data=True)}
    with matplotlib.rc_context({"svg.fonttype": "none", "font.family": "DejaVu Sans", "svg.hashsalt": "dpalogic"}):
        # 1. measure every box (Figure + Agg canvas directly: no pyplot state, no GUI backend)
        probe = Figure(dpi=100)
        canvas = FigureCanvasAgg(probe)
        texts = {v: probe.text(0.5, 0.5, labels[v], bbox={**_BOX, "fc": "white"}, **_TEXT) for v in labels}
        canvas.draw()
        renderer = canvas.get_renderer()
        sizes = {}
        for v, t in texts.items():
            ext = t.get_bbox_patch().get_window_extent(renderer)
            sizes[v] = (ext.width / probe.dpi, ext.height / probe.dpi)
        # 2. lay out in inches and draw
        pos, routes = layout(g, sizes, gap=0.35)
        margin, title = 0.25, 0.45
        xs = [p[0] for _, _, pts in routes for p in pts]  # virtual points may stick out of the boxes' span
        left = min([x - sizes[v][0] / 2 for v, (x, _) in pos.items()] + xs) - margin
        right = max([x + sizes[v][0] / 2 for v, (x, _) in pos.items()] + xs) + margin
        bottom = min(y - sizes[v][1] / 2 for v, (_, y) in pos.items()) - margin - 0.2
        top = max(y + sizes[v][1] / 2 for v, (_, y) in pos.items()) + margin + title
        fig = Figure(figsize=(right - left, top - bottom), dpi=150)
        FigureCanvasAgg(fig)
        ax = fig.add_axes((0, 0, 1, 1))
        ax.set_xlim(left, right)
        ax.set_ylim(bottom, top)
        ax.axis("off")
        boxes = {}
        for v, (x, y) in pos.items():
            d = g.nodes[v]
            boxes[v] = ax.text(x, y, labels[v], zorder=3, gid=f"node-{v}", bbox={**_BOX, "fc": _COLORS[d["group"]]},
                               **_TEXT)  # fmt: skip
        for group in g.graph["groups"]:
            gx = [
                (pos[v][0] - sizes[v][0] / 2, pos[v][0] + sizes[v][0] / 2) for v in pos if g.nodes[v]["group"] == group
            ]
            ax.text((min(a for a, _ in gx) + max(b for _, b in gx)) / 2, top - margin, group, ha="center",
                    va="top", fontsize=10, fontweight="bold", color="#333333")  # fmt: skip
        # Arrows are clipped to the boxes here, in data units (inches), not by matplotlib's patchA/patchB: those
        # clip against each box's patch as last drawn, in display pixels, and the SVG backend draws at 72 dpi with the
        # patches still sized for the Agg draw at 150 dpi (arrows come before boxes), so each arrow ran into its
        # target box and its head was hidden under it.
        fig.canvas.draw()  # the boxes' patches get their size here
        to_data = ax.transData.inverted()
        rects = {
            v: to_data.transform(t.get_bbox_patch().get_window_extent(fig.canvas.get_renderer()).get_points())
            for v, t in boxes.items()
        }
        for u, v, pts in routes:
            pts = [_on_border(rects[u], pts[1]), *pts[1:-1], _on_border(rects[v], pts[-2])]
            if len(pts) > 2:  # through the virtual points
                ax.plot([p[0] for p in pts[:-1]], [p[1] for p in pts[:-1]], color="#666666", lw=1.1, zorder=1,
                        solid_capstyle="butt", gid=f"edge-path-{u}-{v}")  # fmt: skip
            arrow = ax.annotate("", xy=pts[-1], xytext=pts[-2], zorder=2,
                                arrowprops={"arrowstyle": "-|>", "color": "#666666", "lw": 1.1, "shrinkA": 0,
                                            "shrinkB": 0, "mutation_scale": 12})  # fmt: skip
            arrow.arrow_patch.set_gid(f"edge-{u}-{v}")
        ax.text(left + 0.1, bottom + 0.08, "arrows: stronger → weaker (its loss is ≥ under a shared monotone link)",
                fontsize=7, color="#666666", va="bottom")  # fmt: skip
        buf = io.BytesIO()
        fig.savefig(buf, format=fmt, metadata={"Date": None} if fmt == "svg" else None)
    data = buf.getvalue()
    if path is not None:
        Path(path).write_bytes(data)
    return data


def to_dot(g: nx.DiGraph) -> str:
    """Graphviz DOT text, one cluster per group (written by hand: no pydot/pygraphviz needed)."""

    def q(s: str) -> str:
        return '"' + s.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'

    lines = ["digraph dpalogic_lattice {", "  rankdir=TB;", '  node [shape=box, style="rounded,filled"];']
    for k, (group, atoms) in enumerate(g.graph["groups"].items()):
        lines.append(f"  subgraph cluster_{k} {{")
        lines.append(f"    label={q(group + ' (' + ', '.join(atoms) + ')')};")
        for v, d in g.nodes(data=True):
            if d["group"] == group:
                lines.append(f"    {q(v)} [label={q(_label(d))}, fillcolor={q(_COLORS[group])}];")
        lines.append("  }")
    for u, v in g.edges():
        lines.append(f"  {q(u)} -> {q(v)};")
    lines.append("}")
    return "\n".join(lines) + "\n"


def write_graphml(g: nx.DiGraph, path: str | Path) -> None:
    """GraphML: list attributes become comma-separated strings (GraphML has only scalar types)."""
    import networkx as nx

    h = nx.DiGraph()
    for v, d in g.nodes(data=True):
        h.add_node(v, **{k: ", ".join(x) if isinstance(x, list) else x for k, x in d.items()})
    h.add_edges_from(g.edges(data=True))
    h.graph["id_note"] = g.graph["id_note"]
    nx.write_graphml(h, str(path))


def to_html(g: nx.DiGraph) -> str:
    """A self-contained page: the drawing as inline SVG, then the nodes and edges as tables. No scripts."""
    svg = draw(g, fmt="svg").decode("utf-8")
    svg = svg[svg.index("<svg") :]  # drop the XML prolog and DOCTYPE: inline SVG lives in the HTML document
    e = html.escape
    rows = "\n".join(
        f"<tr><td>{e(v)}</td><td>{e(', '.join(d['names']))}</td><td>{e(d['group'])}</td><td>{d['rank']}</td>"
        f"<td><code>{e(d['structure'])}</code></td><td><code>{e(d['top'])}</code></td>"
        f"<td><code>{e(d['bottom'])}</code></td><td><code>{e(d['rho'])}</code></td></tr>"
        for v, d in g.nodes(data=True)
    )
    edges = "\n".join(f"<li>{e(u)} → {e(v)}</li>" for u, v in g.edges()) or "<li>(none)</li>"
    notes = "".join(f"<p class='note'>{e(n)}</p>" for n in g.graph["notes"])
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>dpalogic: the lattice of preference losses</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1400px; color: #222; }}
figure {{ margin: 1em 0; overflow-x: auto; }}
figure svg {{ max-width: 100%; height: auto; }}
table {{ border-collapse: collapse; font-size: 0.9em; }}
td, th {{ border: 1px solid #ccc; padding: 0.3em 0.6em; text-align: left; vertical-align: top; }}
th {{ background: #f3f3f3; }}
.note {{ color: #666; }}
</style>
</head>
<body>
<h1>The lattice of preference losses</h1>
<p>Each box is a preference structure (losses with the same structure share a box, named by the first). An arrow
goes from a <em>stronger</em> loss to a <em>weaker</em> one: ✓<sub>1</sub> ⊨ ✓<sub>2</sub> and
✗<sub>2</sub> ⊨ ✗<sub>1</sub>, so under a shared monotone link the stronger loss is at least as large on every
input. Only the Hasse edges are drawn; the order is their transitive closure.</p>
<figure>
{svg}
</figure>
<h2>Nodes</h2>
<p>{e(g.graph["id_note"])}.</p>
<table>
<tr><th>id</th><th>names</th><th>group</th><th>rank</th><th>structure</th><th>✓</th><th>✗</th><th>ρ</th></tr>
{rows}
</table>
<h2>Hasse edges (stronger → weaker)</h2>
<ul>
{edges}
</ul>
{notes}
</body>
</html>
"""
