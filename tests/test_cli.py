"""The command line: derive, list, show; JSON output; errors exit 2 without a traceback; no torch on import."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from dpalogic.cli import main

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
        (["show", "kto"], "outside"),
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
        (["derive", " & ".join(f"M(y{i})" for i in range(1, 14))], "at most 12 atoms"),
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
    assert out["core"].count("^") == 7 and out["equivalent_to"] == []
