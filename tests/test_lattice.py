"""The lattice: the paper's Hasse diagram (docs/semantics.md §5, written out by hand), merged nodes, every export format."""

from __future__ import annotations

import itertools
import json
import re
import subprocess
import sys
import xml.etree.ElementTree as ET

import networkx as nx
import pytest

from dpalogic.analysis.lattice import build_lattice, export, layout, to_dot, to_json
from dpalogic.analysis.order import relation
from dpalogic.cli import main
from dpalogic.semantics.catalog import entries

REF_FREE = ["ce", "ceunl", "cunl", "cpo", "orpo", "ccpo", "uncpo"]
# docs/semantics.md §5, stronger → weaker
HASSE = {("ceunl", "ce"), ("ceunl", "cunl"), ("cunl", "cpo"), ("cunl", "orpo"), ("ce", "ccpo"), ("cpo", "ccpo"),
         ("orpo", "ccpo"), ("ccpo", "uncpo")}  # fmt: skip


def S(name):
    return entries()[name].program.structure


def entails(a, b) -> bool:
    """Truth tables as sets of worlds, over the union of atoms (independent of analysis.relation)."""
    from dpalogic.logic.structure import align

    x, y = align(a, b)
    tops = {w for w in range(1 << x.n) if (x.top >> w) & 1} <= {w for w in range(1 << x.n) if (y.top >> w) & 1}
    bots = {w for w in range(1 << x.n) if (y.bottom >> w) & 1} <= {w for w in range(1 << x.n) if (x.bottom >> w) & 1}
    return tops and bots


@pytest.fixture(scope="module")
def full():
    return build_lattice()


def test_reference_free_lattice_is_the_papers():
    g = build_lattice(REF_FREE)
    assert set(g.nodes) == set(REF_FREE)
    assert set(g.edges) == HASSE
    for u, v in g.edges:
        assert relation(S(u), S(v)) == "stronger"


def test_hasse_diagram_is_the_transitive_reduction_of_entailment(full):
    # reachability in the diagram = strict entailment, and no edge is implied by two others
    for group in full.graph["groups"]:
        nodes = [v for v, d in full.nodes(data=True) if d["group"] == group]
        for u, v in itertools.permutations(nodes, 2):
            stronger = entails(S(u), S(v)) and not entails(S(v), S(u))
            assert nx.has_path(full, u, v) == stronger, (u, v)
    for u, v in full.edges:
        assert not any(nx.has_path(full, u, w) and nx.has_path(full, w, v) for w in full if w not in (u, v))


def test_catalog_lattice_merges_equivalent_structures(full):
    names = {v: d["names"] for v, d in full.nodes(data=True)}
    assert names["dpo"] == ["dpo", "ipo", "hinge", "sigmoid_norm", "robust", "exo_pair", "discopop"]
    assert names["ce"] == ["ce", "sft"]
    assert names["cpo"] == ["cpo", "slic", "simpo", "rrhf"]
    assert set(full.nodes) == set(REF_FREE) | {"dpo", "modified_dpo"}
    assert {(u, v) for u, v in full.edges} == HASSE  # DPO and modified DPO are incomparable: no edge
    assert relation(S("dpo"), S("modified_dpo")) == "incomparable"
    assert full.graph["groups"] == {
        "reference-free": ["M(yw)", "M(yl)"],
        "with reference": ["M(yw)", "M(yl)", "Ref(yw)", "Ref(yl)"],
    }
    assert {d["group"] for v, d in full.nodes(data=True) if v in REF_FREE} == {"reference-free"}
    note = " ".join(full.graph["notes"])
    for multi in ("nca_pair", "bco_pair", "sppo_hard", "apo_zero", "apo_down"):
        assert multi in note and multi not in full
    # every merged name really has that node's structure
    for v, d in full.nodes(data=True):
        for name in d["names"]:
            assert relation(S(name), S(v)) == "equivalent"


def test_ranks_are_longest_paths(full):
    want = {"ceunl": 0, "ce": 1, "cunl": 1, "cpo": 2, "orpo": 2, "ccpo": 3, "uncpo": 4, "dpo": 0, "modified_dpo": 0}
    assert {v: d["rank"] for v, d in full.nodes(data=True)} == want


def test_structure_text_merges_with_a_name():
    g = build_lattice(["cpo", "(M(yl) -> M(yw), M(yw) | M(yl), M(yw) & M(yl))", "ccpo", "nca_pair"])
    assert g.nodes["cpo"]["names"] == ["cpo", "(M(yl) -> M(yw), M(yw) | M(yl), M(yw) & M(yl))"]
    assert set(g.edges) == {("cpo", "ccpo")}
    assert "nca_pair" in g.graph["notes"][0]


def test_layout_puts_stronger_above_and_boxes_apart(full):
    sizes = {v: (1.0, 0.5) for v in full}
    pos, routes = layout(full, sizes, gap=0.3)
    for u, v, pts in routes:
        assert pos[u][1] > pos[v][1] and pts[0] == pos[u] and pts[-1] == pos[v]
        assert len(pts) == full.nodes[v]["rank"] - full.nodes[u]["rank"] + 1  # one virtual point per skipped layer
    for u, v in itertools.combinations(full, 2):
        if pos[u][1] == pos[v][1]:
            assert abs(pos[u][0] - pos[v][0]) >= 1.0 + 0.3 - 1e-9


def test_json_export(full, tmp_path):
    path = export(full, tmp_path / "lattice.json")
    data = json.loads(path.read_text(encoding="utf-8"))
    assert data == json.loads(json.dumps(to_json(full), ensure_ascii=False))
    assert "first of its names" in data["id_note"]
    assert {tuple(e) for e in data["edges"]} == HASSE
    node = {n["id"]: n for n in data["nodes"]}
    assert node["orpo"]["top"] == "M(yw) & ~M(yl)" and node["orpo"]["bottom"] == "~M(yw) & M(yl)"
    assert (node["ccpo"]["core"], node["ccpo"]["given"], node["ccpo"]["additive"]) == (
        "M(yl) -> M(yw)",
        "M(yw) | M(yl)",
        "false",
    )
    assert node["ce"]["names"] == ["ce", "sft"]


def test_graphml_export(full, tmp_path):
    path = export(full, tmp_path / "lattice.graphml")
    back = nx.read_graphml(str(path))
    assert set(back.nodes) == set(full.nodes)
    assert set(back.edges) == set(full.edges)
    assert back.nodes["dpo"]["names"].split(", ")[:2] == ["dpo", "ipo"]
    assert back.nodes["uncpo"]["rank"] == 4


def test_dot_export(full, tmp_path):
    path = export(full, tmp_path / "lattice.dot")
    text = path.read_text(encoding="utf-8")
    assert text == to_dot(full)
    assert text.startswith("digraph") and text.count("{") == text.count("}")
    assert set(re.findall(r'^\s*"([^"]+)" -> "([^"]+)";$', text, flags=re.M)) == HASSE
    for v in full:
        assert f'"{v}" [label=' in text


def test_png_export(full, tmp_path):
    path = export(full, tmp_path / "lattice.png")
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    assert width > 600 and height > 600  # a real drawing, large enough for its labels


def test_svg_and_html_exports_hold_the_names(full, tmp_path):
    svg = export(full, tmp_path / "lattice.svg").read_text(encoding="utf-8")
    ET.fromstring(svg.encode("utf-8"))  # well-formed XML
    page = export(full, tmp_path / "lattice.html").read_text(encoding="utf-8")
    assert page.startswith("<!DOCTYPE html>") and "<svg" in page
    for name in ("ceunl", "ccpo", "uncpo", "orpo", "modified_dpo", "sigmoid_norm", "M(yl) → M(yw)"):
        assert name in svg and name in page
    # self-contained: no scripts, stylesheets or images fetched from elsewhere
    assert "<script" not in page and "<link" not in page and not re.search(r'(src|href)="https?:', page)


def test_cli(capsys, tmp_path):
    out = tmp_path / "l.json"
    assert main(["lattice", *REF_FREE, "--out", str(out), "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert {tuple(e) for e in printed["edges"]} == HASSE
    assert json.loads(out.read_text(encoding="utf-8"))["edges"] == printed["edges"]
    assert main(["lattice"]) == 0
    text = capsys.readouterr().out
    assert "ccpo → uncpo" in text and "ce = sft" in text and "skipped nca_pair" in text
    assert main(["lattice", "--out", str(tmp_path / "l.pdf")]) == 2
    assert "extension" in capsys.readouterr().err
    assert main(["lattice", "--out", str(tmp_path / "missing" / "l.svg")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["lattice", "not_a_loss"]) == 2
    assert "unknown loss name" in capsys.readouterr().err


def test_analysis_commands_do_not_import_torch(tmp_path):
    # the modules themselves (tests/test_cli.py checks the whole CLI, with every registered command)
    code = (
        "import sys; from dpalogic.analysis.lattice import build_lattice, export; "
        "from dpalogic.analysis.landscape import explore, landscape; "
        f"export(build_lattice(), {str(tmp_path / 'l.svg')!r}); landscape(2); explore('ceunl', 'ccpo'); "
        "bad = [m for m in ('torch', 'triton', 'transformers') if m in sys.modules]; "
        "assert not bad, bad"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_counts_read_as_words(capsys, tmp_path):
    assert main(["lattice", "ce"]) == 0
    assert "(atoms M(yw)): 1 node, 0 Hasse edges" in capsys.readouterr().out
    assert main(["lattice", "ce", "ccpo", "--out", str(tmp_path / "l.json")]) == 0
    out = capsys.readouterr().out
    assert "2 nodes, 1 Hasse edge\n" in out and "(2 nodes, 1 Hasse edge)" in out


# --------------------------------------------------------------------------------------------------- arrowheads

SVG = "{http://www.w3.org/2000/svg}"


def _points(d: str) -> list[tuple[float, float]]:
    nums = [float(x) for x in re.findall(r"-?\d+(?:\.\d+)?(?:e[-+]?\d+)?", d)]
    return list(zip(nums[::2], nums[1::2]))


def _outside_by(p, box) -> float:
    """How far point p lies outside the rectangle box = (x0, y0, x1, y1); negative: how deep inside."""
    x0, y0, x1, y1 = box
    dx, dy = max(x0 - p[0], 0, p[0] - x1), max(y0 - p[1], 0, p[1] - y1)
    if dx or dy:
        return (dx * dx + dy * dy) ** 0.5
    return -min(p[0] - x0, x1 - p[0], p[1] - y0, y1 - p[1])


def check_arrows(svg: str, g) -> None:
    """Every Hasse edge is drawn with a filled head whose tip touches its target box from outside (SVG units: pt)."""
    groups = {el.get("id"): el for el in ET.fromstring(svg.encode("utf-8")).iter(f"{SVG}g") if el.get("id")}

    def box(v):
        xs, ys = zip(*_points(groups[f"node-{v}"].find(f".//{SVG}path").get("d")))
        return min(xs), min(ys), max(xs), max(ys)

    assert g.number_of_edges() > 0
    for u, v in g.edges:
        shaft, head = groups[f"edge-{u}-{v}"].findall(f"{SVG}path")
        assert "fill: none" in shaft.get("style") and "fill: #666666" in head.get("style")
        head_pts, shaft_pts = _points(head.get("d")), _points(shaft.get("d"))
        tip = shaft_pts[-1]
        assert len(head_pts) == 3 and tip in head_pts  # a triangle at the end of the shaft
        assert 0.5 < _outside_by(tip, box(v)) < 4  # on the border of the target, just outside, not under it
        assert all(_outside_by(p, box(v)) > 0.5 for p in head_pts)
        bend = groups.get(f"edge-path-{u}-{v}")  # an edge that skips layers: a polyline, then the arrow
        start = _points(bend.find(f"{SVG}path").get("d"))[0] if bend is not None else shaft_pts[0]
        assert 0.5 < _outside_by(start, box(u)) < 4
        assert (bend is not None) == (g.nodes[v]["rank"] - g.nodes[u]["rank"] > 1)


def test_svg_and_html_arrows_end_at_their_target_boxes(full, tmp_path):
    check_arrows(export(full, tmp_path / "l.svg").read_text(encoding="utf-8"), full)
    page = export(full, tmp_path / "l.html").read_text(encoding="utf-8")
    check_arrows(page[page.index("<svg") : page.index("</svg>") + 6], full)
    one = build_lattice(["ce", "ccpo"])  # a single edge, boxes of other sizes
    check_arrows(export(one, tmp_path / "one.svg").read_text(encoding="utf-8"), one)
