"""Rich display in notebooks: structures and programs as LaTeX, comparisons as HTML, lattices as inline SVG.

Jupyter calls ``_repr_latex_`` / ``_repr_html_`` / ``_repr_svg_``; these tests call them the same way and check that
the output is well formed (balanced TeX groups, XML that parses) and says what the object's own text says.
"""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET

import pytest

from dpalogic.analysis.lattice import build_lattice, text_summary
from dpalogic.analysis.order import compare
from dpalogic.cli import main
from dpalogic.language.syntax import to_latex
from dpalogic.logic.structure import Structure
from dpalogic.semantics.catalog import entries, pair_names

SVG = "{http://www.w3.org/2000/svg}"


def balanced(tex: str) -> bool:
    depth = 0
    for i, ch in enumerate(tex):
        if ch in "{}" and tex[i - 1 : i] != "\\":
            depth += 1 if ch == "{" else -1
            if depth < 0:
                return False
    delimiters = [len(re.findall(rf"\\{cmd}(?![a-z])", tex)) for cmd in ("left", "right", "begin", "end")]
    return depth == 0 and delimiters[0] == delimiters[1] and delimiters[2] == delimiters[3]


def rows(tex: str) -> dict[str, str]:
    """``$$\\begin{aligned}k &= v \\\\ …\\end{aligned}$$`` → ``{k: v}``."""
    assert tex.startswith(r"$$\begin{aligned}") and tex.endswith(r"\end{aligned}$$")
    body = tex[len(r"$$\begin{aligned}") : -len(r"\end{aligned}$$")]
    return dict(row.strip().split(" &= ", 1) for row in body.split(r" \\ "))


@pytest.mark.parametrize("name", ["ccpo", "orpo", "dpo", "modified_dpo"])
def test_structure_latex(name):
    s = entries()[name].program.structure
    tex = s._repr_latex_()
    assert balanced(tex)
    r = rows(tex)
    assert r["(P, P_C, P_A)"] == "(" + ", ".join(to_latex(x) for x in s.readable_triple()) + ")"
    assert (r[r"\checkmark"], r[r"\times"]) == (to_latex(s.top_formula), to_latex(s.bottom_formula))
    for atom in s.atoms:  # every atom's probability appears in ρ, typeset as πθ / πref
        policy = atom.pred == "M"
        sub = {"yw": "y_w", "yl": "y_l"}[atom.answer]
        assert (r"\pi_\theta" if policy else r"\pi_{\mathrm{ref}}") + f"({sub})" in r[r"\rho"]
    assert r"-\log\sigma(\log\rho)" in r and "p_w" not in tex


def test_structure_latex_known_ratios():
    # the paper's closed forms (SEMANTICS §3): cCPO ρ = p_w / (p_l (1 − p_w)), DPO ρ = p_w r_l / (p_l r_w)
    ccpo = rows(entries()["ccpo"].program.structure._repr_latex_())[r"\rho"]
    assert ccpo == r"\frac{\pi_\theta(y_w)}{\pi_\theta(y_l) \left(1 - \pi_\theta(y_w)\right)}"
    dpo = rows(entries()["dpo"].program.structure._repr_latex_())[r"\rho"]
    num, den = dpo[len(r"\frac{") : -1].split("}{")
    assert sorted(num.split()) == [r"\pi_\theta(y_w)", r"\pi_{\mathrm{ref}}(y_l)"]
    assert sorted(den.split()) == [r"\pi_\theta(y_l)", r"\pi_{\mathrm{ref}}(y_w)"]


def test_degenerate_structure_latex_says_so():
    r = rows(Structure.parse("M(yw) & ~M(yw)")._repr_latex_())
    assert r[r"\checkmark"] == r"\bot" and "degenerate" in r[r"\rho"]


@pytest.mark.parametrize("name", list(entries()))
def test_program_latex(name):
    p = entries()[name].program
    tex = p._repr_latex_()
    assert tex.startswith("$$") and tex.endswith("$$") and balanced(tex)
    assert tex.startswith(r"$$\mathcal{L}_{\mathrm{" + name.replace("_", r"\_") + "}} = ")
    best = r"\pi_\theta(y_w)" if name in pair_names() else r"\pi_\theta(y_{1})"  # TPO: y1 is the gold answer
    assert best in tex  # every catalog loss involves the chosen answer
    assert ("ref" in tex) == any(a.pred == "Ref" for a in p.atoms)
    rhs = tex.split(" = ", 1)[1]
    assert "label_" not in rhs and "discopop" not in rhs and "p_w" not in rhs  # typeset, not raw symbol names
    typeset = {"beta": r"\beta", "gamma": r"\gamma", "alpha": r"\alpha", "label_smoothing": r"\varepsilon_{\mathrm{ls}}",
               "discopop_tau": r"\tau", "tpo_alpha": r"\alpha_{\mathrm{TPO}}",
               "tpo_l_gamma": r"\gamma_{\mathrm{TPO}}"}  # fmt: skip
    if p.hyperparameters:
        hp = ", ".join(f"{typeset[k]} = {v:g}" for k, v in p.hyperparameters)
        assert tex.endswith(rf"\qquad ({hp})$$") and tex.count(r"\qquad") == 1
    else:
        assert r"\qquad" not in tex


def test_comparison_html_matches_the_cli(capsys):
    c = compare("cpo", "orpo")
    root = ET.fromstring(c._repr_html_())
    shown = [root.find("p").find("strong").text] + [li.text for li in root.iter("li")]
    assert shown == c.lines() == str(c).splitlines()
    assert main(["compare", "cpo", "orpo"]) == 0
    assert capsys.readouterr().out.splitlines() == c.lines()
    assert shown[0] == "cpo is incomparable with orpo" and any(line.startswith("witness: ") for line in shown)
    # names, programs and structures all work, and escaping keeps the HTML well formed
    c = compare(entries()["ceunl"].program, Structure.parse("M(yl) -> M(yw)"))
    assert c.lines()[0] == "ceunl is stronger than B"
    assert "M(yl) -&gt; M(yw)" in c._repr_html_()
    ET.fromstring(c._repr_html_())


def test_lattice_displays_as_its_drawing():
    g = build_lattice(["ceunl", "ce", "cunl", "ccpo"])
    root = ET.fromstring(g._repr_svg_())
    assert root.tag == f"{SVG}svg"
    ids = {el.get("id") for el in root.iter(f"{SVG}g")}
    assert {f"node-{v}" for v in g} <= ids and {f"edge-{u}-{v}" for u, v in g.edges} <= ids
    page = ET.fromstring(g._repr_html_())
    assert page.tag == "figure" and page.find(f"{SVG}svg") is not None
    assert page.find("figcaption").find("pre").text == text_summary(g)
    assert build_lattice(["apo_zero"])._repr_svg_() is None  # nothing to draw: Jupyter falls back to the text repr
