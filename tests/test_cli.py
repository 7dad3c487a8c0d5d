"""The command line: derive, list, show; JSON output; errors exit 2 without a traceback; no torch on import."""

from __future__ import annotations

import itertools
import json
import re
import subprocess
import sys

import pytest

from dpalogic.cli import main
from dpalogic.language.syntax import parse_formula

DERIVE_KEYS = {"core", "given", "additive", "top", "bottom", "rho", "loss", "latex", "equivalent_to", "same_loss_as"}


def run_json(capsys, *argv):
    assert main(list(argv)) == 0
    return json.loads(capsys.readouterr().out)


def test_derive_with_given(capsys):
    out = run_json(capsys, "derive", "M(yl) -> M(yw)", "--given", "M(yw) ^ M(yl)", "--json")
    assert DERIVE_KEYS <= set(out)
    assert out["top"] == "M(yw) & ~M(yl)"
    assert out["bottom"] == "~M(yw) & M(yl)"
    assert out["equivalent_to"] == ["orpo"]
    assert "orpo" in out["same_loss_as"]
    assert out["rho"] == "p_w*(1 - p_l)/(p_l*(1 - p_w))"


def test_derive_pasted_from_the_paper(capsys):
    out = run_json(capsys, "derive", "(Implies(M(x,yl), M(x,yw)), Or(M(x,yl), M(x,yw)))", "--json")
    assert out["equivalent_to"] == ["ccpo"]
    assert (out["core"], out["given"], out["additive"]) == ("M(yl) -> M(yw)", "M(yw) | M(yl)", "false")


def test_derive_same_loss_but_different_structure(capsys):
    out = run_json(capsys, "derive", "(M(yw) & M(yl), M(yl))", "--json")
    assert out["equivalent_to"] == []
    assert {"ce", "sft"} <= set(out["same_loss_as"])


def test_derive_additive(capsys):
    out = run_json(
        capsys, "derive", "M(yl) -> M(yw)", "--given", "M(yw) | M(yl)", "--additive", "M(yw) & M(yl)", "--json"
    )
    assert out["top"] == "M(yw)" and out["bottom"] == "M(yl)"
    assert "cpo" in out["equivalent_to"]


def test_derive_pretty(capsys):
    assert main(["derive", "M(yw) & ~M(yl)"]) == 0
    text = capsys.readouterr().out
    assert "ceunl" in text and "ρ" in text and "LaTeX" in text


def test_list(capsys):
    rows = run_json(capsys, "list", "--json")
    names = [r["name"] for r in rows]
    for want in ["dpo", "ipo", "cpo", "orpo", "simpo", "ccpo", "uncpo", "cunl", "modified_dpo"]:
        assert want in names
    assert main(["list"]) == 0
    assert "kto" in capsys.readouterr().out  # the outside-fragment table


def test_show(capsys):
    out = run_json(capsys, "show", "orpo", "--json")
    assert out["citation"].startswith("Hong")
    assert out["hyperparameters"] == {"beta": 0.1, "alpha": 1.0}
    assert [t["role"] for t in out["terms"]] == ["preference", "nll"]
    assert out["structure"] == "(M(yl) -> M(yw), M(yw) ^ M(yl))"
    assert "\\pi_\\theta" in out["latex"]
    # hyperparameter names typeset by their letters, not as SymPy's subscripts (label_{smoothing})
    exo = run_json(capsys, "show", "exo_pair", "--json")["latex"]
    assert r"\varepsilon_{\mathrm{ls}}" in exo and "label_" not in exo
    assert main(["show", "dpo"]) == 0
    assert "Rafailov" in capsys.readouterr().out


@pytest.mark.parametrize(
    "argv,fragment",
    [
        (["derive", "M(yw) &"], "^"),
        (["derive", "Mx(yw)"], "did you mean 'M'"),
        (["derive", "(M(yw), false)"], "literally 'false'"),
        (["derive", "M(yw) & ~M(yw)"], "✓ side"),
        (["show", "orpoo"], "did you mean 'orpo'"),
        (["nonsense"], "invalid choice"),
    ],
)
def test_errors_exit_2_without_traceback(argv, fragment):
    proc = subprocess.run([sys.executable, "-m", "dpalogic", *argv], capture_output=True, text=True)
    assert proc.returncode == 2
    assert fragment in proc.stderr
    assert "Traceback" not in proc.stderr


def test_symbolic_commands_do_not_import_torch():
    code = (
        "import sys; from dpalogic.cli import main; "
        "main(['derive', 'M(yl) -> M(yw)', '--json']); main(['show', 'dpo', '--json']); main(['list', '--json']); "
        "main(['derive', '(M(y1), ExactlyOne(M(y1..y64)))', '--json']); main(['derive', 'Ranked(M(y1..y20))']); "
        "main(['derive', 'M(yl) -> M(yw)', '--link', 'softplus(m - z)', '--hp', 'm=1', '--json']); "
        "main(['compile', 'dpo']); "
        "bad = [m for m in ('torch', 'triton', 'transformers') if m in sys.modules]; "
        "assert not bad, bad"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


@pytest.mark.parametrize(
    "argv,fragment",
    [
        (["compare", "cpo", "orpo", "--plot", "/nonexistent-dir/x.png"], "cannot write"),
        (["derive", "(M(yw), M(yl))", "--given", "M(yw)"], "P_C is given twice"),
        (["derive", "(M(yw), M(yl), M(yw))", "--additive", "M(yl)"], "P_A is given twice"),
        (["compare", "false", "cpo"], "degenerate structure"),
        (["decompile", "-log(sigmoid(beta*(logp_w - logp_q)))"], "unknown variable 'logp_q'"),
        (["derive", "ExactlyOne(M(y1..y257))"], "answers go up to y256"),
        (["derive", "~M(yw)", "--given", "-M(yl)"], "unexpected character '-'"),
    ],
)
def test_more_user_mistakes_exit_2(argv, fragment):
    proc = subprocess.run([sys.executable, "-m", "dpalogic", *argv], capture_output=True, text=True)
    assert proc.returncode == 2, proc.stderr
    assert fragment in proc.stderr
    assert "Traceback" not in proc.stderr


def test_equation_starting_with_minus_and_json_in_any_order(capsys):
    assert main(["decompile", "--json", "-log(p_w)"]) == 0
    assert json.loads(capsys.readouterr().out)["terms"][0]["top"] == "M(yw)"
    assert main(["decompile", "-log(p_w)", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["terms"][0]["top"] == "M(yw)"


def test_broken_pipe_is_not_a_traceback():
    proc = subprocess.run(
        f"{sys.executable} -m dpalogic list --json | head -c 10", shell=True, capture_output=True, text=True
    )
    assert proc.stdout == '[\n  {\n    "'[:10]
    assert "Traceback" not in proc.stderr and "BrokenPipe" not in proc.stderr


def test_many_atoms_print_as_written(capsys):
    formula = " ^ ".join(f"M(y{i})" for i in range(1, 9))  # 8 atoms: beyond minimization, shown as written
    assert main(["derive", formula, "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    # a run of consecutive answers prints as a range, and reads back as the same formula
    assert out["core"] == "Xor(M(y1..y8))" and out["equivalent_to"] == []
    assert parse_formula(out["core"]) == parse_formula(formula)


# --------------------------------------------------------------------------------------------------- known losses outside the fragment


def test_show_a_loss_outside_the_fragment_is_not_an_error(capsys):
    from dpalogic.semantics.catalog import OUTSIDE

    out = run_json(capsys, "show", "kto", "--json")
    kto = OUTSIDE["kto"]
    assert out == {"name": "kto", "aliases": [], "in_fragment": False, "reason": kto.reason, "citation": kto.citation,
                   "trainable": True, "train_with": ["kto"]}  # fmt: skip
    assert run_json(capsys, "show", "AOT-pair", "--json")["name"] == "aot"  # aliases, any case, - for _
    proc = subprocess.run([sys.executable, "-m", "dpalogic", "show", "kto"], capture_output=True, text=True)
    assert proc.returncode == 0 and proc.stderr == ""
    assert "outside" in proc.stdout and kto.reason in proc.stdout and kto.citation in proc.stdout
    # other commands still cannot use it, and say why
    assert main(["compare", "kto", "dpo"]) == 2
    assert kto.reason in capsys.readouterr().err


def test_list_json_marks_what_is_in_the_fragment(capsys):
    from dpalogic.semantics.catalog import OUTSIDE, entries

    rows = run_json(capsys, "list", "--json")
    inside = {r["name"] for r in rows if r["in_fragment"] is True}
    outside = {r["name"]: r for r in rows if r["in_fragment"] is False}
    assert len(rows) == len(inside) + len(outside)  # every row says which it is
    assert inside == set(entries()) and set(outside) == set(OUTSIDE) and len(OUTSIDE) == 6
    for name, r in outside.items():
        assert (r["reason"], r["citation"]) == (OUTSIDE[name].reason, OUTSIDE[name].citation)
    assert not inside & set(outside)


# --------------------------------------------------------------------------------------------------- small output fixes


@pytest.mark.parametrize("name", ["dpo", "sigmoid", "MDPO", "kto"])
def test_derive_of_a_loss_name_suggests_show(name):
    proc = subprocess.run([sys.executable, "-m", "dpalogic", "derive", name], capture_output=True, text=True)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert f"dpalogic show {name}" in proc.stderr


def test_output_to_a_file_is_not_wrapped(capsys):
    from dpalogic.cli.derive import derive
    from dpalogic.cli.show import show

    formula = "(M(yl) -> M(yw), M(yw) ^ M(yl), M(y3) & M(y4))"
    latex = derive(formula)["latex"]
    assert len(latex) > 200  # far wider than any terminal
    assert main(["derive", formula]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [ln.split(None, 1)[1] for ln in lines if ln.startswith("LaTeX")] == [latex]  # one line, whole
    assert all(ln == ln.rstrip() for ln in lines)  # and no padding to a table width
    assert main(["show", "apo_zero"]) == 0
    shown = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("LaTeX: ")]
    assert shown == ["LaTeX: " + show("apo_zero")["latex"]]


def test_output_to_a_terminal_is_wrapped(capsys, monkeypatch):
    import io

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    term = Terminal()
    monkeypatch.setattr(sys, "stdout", term)
    monkeypatch.setenv("COLUMNS", "80")
    monkeypatch.delenv("TERM", raising=False)
    assert main(["derive", "(M(yl) -> M(yw), M(yw) ^ M(yl), M(y3) & M(y4))"]) == 0
    lines = [re.sub(r"\x1b\[[0-9;]*m", "", ln) for ln in term.getvalue().splitlines()]  # colours are not width
    assert len(lines) > 12 and max(len(ln) for ln in lines) <= 80


def test_rho_names_say_which_structure_each_term_uses():
    from dpalogic.cli.show import rho_names, show, term_texts
    from dpalogic.semantics.catalog import entries

    for name, e in entries().items():
        p = e.program
        names, legend = rho_names(p)
        structures = [t.structure for t in p.terms]
        for i, j in itertools.combinations(range(len(structures)), 2):
            assert (names[i] == names[j]) == (structures[i] == structures[j]), name
        meaning = {n: (s, back) for n, s, back in legend}
        for n, s in zip(names, structures):
            if len(set(names)) == 1:
                assert n == "ρ" and not legend
                continue
            got, back = meaning[n]
            assert got == s
            if back is not None:  # ρ_k = 1/ρ_j: the reversed structure
                assert meaning[back][0] == s.reversed()
        for text, n in zip(term_texts(p), names):
            assert f"log {n}" in text and text.count("log ρ") == text.count(f"log {n}")
    assert term_texts(entries()["apo_zero"].program) == ["σ(−(β·log ρ₁))", "σ(−(β·log ρ₂))"]
    cpo, dpo = show("cpo"), show("dpo")  # the program's structure is named as in its terms
    assert (cpo["rho_name"], cpo["ratios"][0]) == ("ρ₁", "ρ₁: (M(yl) → M(yw), M(yw) ∨ M(yl), M(yw) ∧ M(yl))")
    assert cpo["program"].startswith("[(1 - ε_ls)·[−log σ(β·log ρ₁)]] + [ε_ls·[−log σ(β·log ρ₂)]]")
    assert (dpo["rho_name"], dpo["ratios"], dpo["program"]) == ("ρ", [], "−log σ(β·log ρ)")


def test_the_readme_catalog_table_is_generated(capsys):
    from pathlib import Path

    from dpalogic.cli.list_ import catalog_markdown
    from dpalogic.semantics.catalog import entries

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text(encoding="utf-8")
    table = catalog_markdown()
    assert table in readme, "regenerate the README's catalog table with `dpalogic list --markdown`"
    assert main(["list", "--markdown"]) == 0
    assert capsys.readouterr().out == table
    rows = {r.split(" | ")[0].strip("| `").split("`")[0]: r for r in table.splitlines()[2:]}
    assert list(rows) == list(entries())
    assert "σ(−(β·log ρ₁)) + σ(−(β·log ρ₂))" in rows["apo_zero"]
    assert "ρ₂ = 1/ρ₁" in rows["cpo"] and "ρ₃: `M(yw)`" in rows["cpo"]


# --------------------------------------------------------------------------------------------------- compare --plot


def test_plot_range_shows_where_ipo_and_hinge_differ():
    from dpalogic.cli.compare import compare_figure
    from dpalogic.semantics.catalog import entries

    beta = entries()["hinge"].program.defaults["beta"]
    margin = float(dict(entries()["hinge"].program.terms[0].link_params)["margin"])
    kink = margin / beta  # hinge: max(0, m − β·δ) bends at δ = m/β (10)
    ipo_min = 1 / (2 * entries()["ipo"].program.defaults["beta"])  # IPO: (δ − 1/(2β))² is smallest at 5
    fig = compare_figure("ipo", "hinge")
    lo, hi = fig.axes[0].get_xlim()
    assert fig.axes[1].get_xlim() == (lo, hi)
    assert lo < min(0, ipo_min) and kink + 1 < hi and hi - lo < 40  # the kink well inside, the picture not vast
    ipo, hinge = (line.get_xydata() for line in fig.axes[0].get_lines()[:2])
    assert (hinge[:, 0].min(), hinge[:, 0].max()) == (lo, hi)
    flat = hinge[:, 0] > kink + 1e-9
    assert flat.any() and (hinge[flat, 1] == 0).all() and (hinge[hinge[:, 0] < kink - 0.1, 1] > 0).all()
    assert ipo[:, 1].argmin() == abs(ipo[:, 0] - ipo_min).argmin()
    for ax in fig.axes:
        assert ax.get_yscale() == "linear"


def test_plot_range_holds_the_bend_of_a_logistic_loss():
    import math

    from dpalogic.cli.compare import compare_figure

    fig = compare_figure("dpo", "ipo", log_y=True)
    lo, hi = fig.axes[0].get_xlim()
    beta = 0.1  # DPO's gradient −β·σ(−β·δ) goes from 95 % to 5 % of −β over |β·δ| ≤ log 19
    assert beta * min(-lo, hi) > math.log(19)
    assert [ax.get_yscale() for ax in fig.axes] == ["symlog", "symlog"]
    assert fig.axes[0].get_ylim()[0] == 0  # losses are ≥ 0: no empty negative decades
    assert fig.axes[1].get_ylim()[0] < 0 < fig.axes[1].get_ylim()[1]  # IPO's gradient changes sign


def test_compare_plot_says_where_it_wrote(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["compare", "ipo", "hinge", "--plot", "cmp.png"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[-1].startswith("wrote cmp.png (margins δ from ")
    assert (tmp_path / "cmp.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    out = run_json(capsys, "compare", "dpo", "ipo", "--plot", str(tmp_path / "c.svg"), "--json", "--log-y")
    assert out["plot"] == str(tmp_path / "c.svg") and out["plot_yscale"] == "symlog"
    lo, hi = out["plot_margin_range"]
    assert lo < 0 < hi and -2 * out["plot_base"] >= max(-lo, hi)  # every log-prob drawn is ≤ 0
    out = run_json(capsys, "compare", "ipo", "hinge", "--plot", str(tmp_path / "c.png"), "--json", "--base", "-3")
    assert out["plot_base"] == -3 and -6 <= out["plot_margin_range"][0] < out["plot_margin_range"][1] <= 6
    assert main(["compare", "ipo", "hinge", "--plot", str(tmp_path / "c.png"), "--base", "1"]) == 2
    assert "--base must be negative" in capsys.readouterr().err


def test_json_output_stays_parseable_when_a_library_prints(monkeypatch, capsys):
    """--json: stdout is the JSON alone; a library's notice printed meanwhile (DeepSpeed's, on import) goes to stderr."""
    import dpalogic.cli.derive as derive_cli

    real = derive_cli.derive

    def noisy(*args, **kwargs):
        print("[WARNING] Setting accelerator to CPU")
        return real(*args, **kwargs)

    monkeypatch.setattr(derive_cli, "derive", noisy)
    assert main(["derive", "M(yl) -> M(yw)", "--json"]) == 0
    out, err = capsys.readouterr()
    assert json.loads(out)["core"] == "M(yl) -> M(yw)"
    assert "Setting accelerator" in err and "Setting accelerator" not in out
