"""Hostile text at every symbolic entry point (issue #9): only the project's error escapes, every CLI run exits 0 or 2.

The CLI runs in-process through ``dpalogic.cli.main`` (a ``SystemExit`` from argparse counts as its exit code), so
that the whole file takes seconds. Inputs: a fixed list of strings that once gave tracebacks or ran code, deep and
long constructions of every connective, mutations of valid formulas and equations, and arbitrary text (NUL bytes and
lone surrogates included). The training entry points (``--loss``, ``--hp``, config files) are fuzzed beside
``dpalogic train``'s own tests.
"""

from __future__ import annotations

import contextlib
import io

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dpalogic.analysis.decompile import decompile, decompile_spec
from dpalogic.cli import main
from dpalogic.errors import DPALogicError
from dpalogic.language.equation import MAX_EQUATION_CHARS
from dpalogic.language.syntax import MAX_FORMULA_CHARS, MAX_NESTING, atoms_of, parse_formula, parse_structure_text
from dpalogic.logic.structure import Structure

FUZZ = settings(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])


def cli(*argv: str) -> int:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(list(argv))
        except SystemExit as e:  # argparse's usage errors
            code = e.code
    assert code in (0, 2), (argv, code, err.getvalue()[-2000:])
    assert "Traceback" not in err.getvalue()
    if code == 2:
        assert err.getvalue().strip(), argv  # an error says what went wrong
    return code


def api(func, *args, **kwargs) -> None:
    try:
        func(*args, **kwargs)
    except DPALogicError:
        pass


def few_atoms(text: str, n: int = 4) -> bool:
    """Whether ``text`` parses with at most ``n`` atoms. `compare` searches a grid of 7^n points for its witnesses
    and `explore` enumerates structures over the atoms (seconds at 6 atoms, hours at 12): a cost of the analysis, not
    of parsing, so they get small inputs only."""
    try:
        s = parse_structure_text(text)
    except DPALogicError:
        return True  # refused before any analysis
    parts = [p for p in (s.core, s.given, s.additional) if p is not None]
    return len(atoms_of(*parts)) <= n


def formula_entry_points(text: str) -> None:
    """Every place a formula or structure typed by a user goes."""
    api(parse_formula, text)
    api(Structure.parse, text)
    cli("derive", "--", text)
    cli("derive", "M(yw)", f"--given={text}")
    cli("derive", "M(yl) -> M(yw)", f"--additive={text}", "--json")
    cli("show", "--", text)
    cli("compile", "--", text)
    cli("lattice", "--json", "--", text)
    cli("explore", "--between", "ceunl", "uncpo", "--atoms", text, "--limit", "2")
    if few_atoms(text):
        cli("explore", "--between", text, "uncpo", "--limit", "2")
        cli("compare", "--", text, "cpo")
        cli("meet", "--", "cpo", text)


def equation_entry_points(text: str) -> None:
    api(decompile, text)
    api(decompile_spec, text)
    cli("decompile", text)
    cli("decompile", "--json", "--", text)


# ------------------------------------------------------------------------------------ fixed hostile strings

_OPS = [
    "&",
    "|",
    "^",
    "->",
    "<->",
    "=>",
    "<=>",
    "&&",
    "||",
    "and",
    "or",
    "xor",
    "implies",
    "iff",
    "∧",
    "∨",
    "⊕",
    "→",
    "↔",
]
_CALLS = ["And", "Or", "Xor", "Implies", "Equivalent", "Not", "AND", "IFF"]
_DEEP = MAX_NESTING + 2  # just past the limit: longer strings only cost parsing time

HOSTILE_FORMULAS = [
    # issue #9's tracebacks
    "~" * 986 + "M(yw)",
    "M(yw) & " * 493 + "M(yw)",
    "Not(" * 329 + "M(yw)" + ")" * 329,
    "M(y" + "1" * 4301 + ")",
    # deep nesting and long chains of every connective, infix and call forms
    *[f"(M(yw) {op} " * _DEEP + "M(yl)" + ")" * _DEEP for op in _OPS],
    *[f"M(yw) {op} " * _DEEP + "M(yl)" for op in _OPS],
    *[f"{c}(M(yw), " * _DEEP + "M(yl)" + ")" * _DEEP for c in _CALLS],
    *[neg * _DEEP + "M(yw)" for neg in ("~", "¬", "!", "not ", "~(")],
    "(" * 4000 + "M(yw)" + ")" * 4000,
    "(" * MAX_FORMULA_CHARS + "M(yw)" + ")" * MAX_FORMULA_CHARS,
    " | ".join(f"{p}(y{i})" for i in range(1, 7) for p in ("M", "Ref")) * 1,
    " & ".join(f"M(y{i})" for i in range(1, 14)),  # 13 atoms, one past the limit
    # unbalanced, empty and odd structures
    "(" * 100 + "M(yw)",
    "M(yw)" + ")" * 100,
    "(M(yw), M(yl)",
    ")(",
    "((,,))",
    "(M(yw),)",
    "(M(yw), M(yl), M(yw), M(yl))",
    "(M(yw), false, false)",
    "(false, true)",
    "",
    " ",
    "\n\t\r",
    "true",
    "⊥",
    # answers, prompts and names
    "M(y99999999999999999999)",
    "M(y0)",
    "M(y-1)",
    "M(y_17)",
    "M(x, y" + "9" * 5000 + ")",
    "M(z, yw)",
    "M(x, x, yw)",
    "M()",
    "M(M(yw))",
    "M(" + "y" * 9000 + ")",
    "A" * 9000,
    "Mx" * 4000 + "(yw)",
    "M" * (MAX_FORMULA_CHARS + 1),
    # NUL bytes, lone surrogates and other odd characters
    "M(yw)\x00",
    "\x00",
    "M(\x00yw)",
    "M(yw)\ud800",
    "\udcff",
    "M(yw) \ud83d -> M(yl)",
    "Ｍ(yw)",
    "M（yw）",
    "M\u200b(yw)",
    "\u202eM(yw)",
    "M(yw) ⇒ M(yl)",
    "M(yw) ∧∧ M(yl)",
    "M(y\u0301w)",
    "M(yw)\u2028M(yl)",
    # catalog-looking names
    "dpo",
    "DPO",
    "-dpo",
    "dpo-",
    "d p o",
    "__init__",
    "true_",
]


@pytest.mark.parametrize("text", HOSTILE_FORMULAS, ids=range(len(HOSTILE_FORMULAS)))
def test_hostile_formulas(text):
    formula_entry_points(text)


HOSTILE_EQUATIONS = [
    "__import__('os').system('echo pwned')",
    "__import__('os').system('echo pwned') + logp_w",
    "logp_w + exec('1')",
    "logp_w + eval('1')",
    "().__class__.__bases__[0].__subclasses__()",
    "logp_w.__class__",
    "logp_w; import os",
    "logp_w\nimport os",
    "f'{logp_w}'",
    "[logp_w]",
    "{logp_w}",
    "{'a': logp_w}",
    "lambda: logp_w",
    "(x for x in logp_w)",
    "logp_w if 1 else 2",
    "logp_w := 1",
    "logp_w * 9**9**9",
    "logp_w" + "**9" * 30,
    "(((p_w + p_l)**99)**99)**99",
    "exp(1000*log(p_w + p_l))",
    "(10**99)**(10**99) * logp_w",
    "9" * 5000,
    "9" * 4000 + " * logp_w",
    "1e309 * logp_w",
    "1e-400 * logp_w",
    "-" * 3000 + "logp_w",
    "(" * 150 + "logp_w" + ")" * 150,
    "(" * 1000 + "logp_w" + ")" * 1000,
    "log(" * 60 + "p_w" + ")" * 60,
    "sigmoid(" * 40 + "logp_w" + ")" * 40,
    "exp(" * 40 + "logp_w" + ")" * 40,
    " + ".join(["logp_w"] * 600),
    "max(" + "logp_w, " * 200 + "0)",
    "clamp(logp_w, min=0, max=0, min=1)",
    "clamp(logp_w, *a)",
    "log(**{'x': 1})",
    "logp_w / 0",
    "log(0) * logp_w",
    "log1mexp(0) * logp_w",
    "sqrt(-1) * logp_w",
    "logp_w ^ logp_l",
    "logp_w @ logp_l",
    "logp_w < logp_l",
    "logp_w and logp_l",
    "not logp_w",
    "~logp_w",
    "logp_w % 2",
    "logp_w // 2",
    "logp_w << 2",
    "1j * logp_w",
    "True * logp_w",
    "None",
    "...",
    "b'logp_w'",
    "I * E * N * S * Q * pi * oo * zoo * nan * logp_w",
    "-logsigmoid(I*(logp_w - logp_l))",
    "torch.os.system('echo pwned')",
    "F.__dict__",
    "math.pi * logp_w",
    "torch.nn.functional.logsigmoid.__call__(logp_w)",
    "logp_q - logp_w",
    "-log(p_w",
    "-log(p_w))",
    "",
    "\x00",
    "logp_w\x00",
    "logp_w + \ud800",
    "\udcff",
    "ｌｏｇｐ＿ｗ",
    "logp_w " + " " * (MAX_EQUATION_CHARS + 1),
    "dpo",
    "exo_pair",
    "no_such_loss",
]


@pytest.mark.parametrize("text", HOSTILE_EQUATIONS, ids=range(len(HOSTILE_EQUATIONS)))
def test_hostile_equations(text, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # "echo pwned" would print; a file written would show up here
    equation_entry_points(text.replace("echo pwned", "touch pwned"))
    assert not any(tmp_path.iterdir())


def test_undecodable_command_line_bytes():
    """Bytes that are not UTF-8 reach Python as lone surrogates; the error message must still print."""
    import os
    import subprocess
    import sys

    for argv in ([b"derive", b"M(yw) \xff"], [b"decompile", b"logp_w \xff"]):
        r = subprocess.run(
            [os.fsencode(sys.executable), b"-m", b"dpalogic", *argv], capture_output=True, env={**os.environ}
        )
        assert r.returncode == 2, r.stderr
        assert b"Traceback" not in r.stderr and b"error:" in r.stderr


def test_cli_usage_errors_exit_2():
    for argv in (["derive"], ["decompile"], ["compare", "cpo"], ["explore", "--between", "cpo"], ["no-such-command"]):
        assert cli(*argv) == 2


# ------------------------------------------------------------------------------------ generated

ATOMS = ["M(yw)", "M(yl)", "Ref(yw)", "Ref(yl)", "M(x, y_w)", "M(y1)", "M(y16)"]
FORMULA_SEEDS = [
    "M(yl) -> M(yw)",
    "(M(yl) -> M(yw), M(yw) | M(yl), M(yw) & M(yl))",
    "(M(yl) & Ref(yw)) -> (M(yw) & Ref(yl))",
    "¬M(yl) ∧ (M(yw) ⊕ M(yl))",
    "Implies(M(x,yl), Or(M(x,yw), Not(Ref(y1))))",
    "not M(yw) iff M(yl) xor true",
]
EQUATION_SEEDS = [
    "-log(sigmoid(beta*((logp_w - ref_logp_w) - (logp_l - ref_logp_l))))",
    "-logsigmoid(beta*(logp_w/len_w - logp_l/len_l) - gamma)",
    "relu(1 - beta*(logp_w - logp_l))",
    "((logp_w - ref_logp_w)/len_w - (logp_l - ref_logp_l)/len_l - 1/(2*beta))**2",
    "-logsigmoid(log(p_w/(1 - p_w)) - log(p_l/(1 - p_l)))",
    "torch.clamp(1 - F.logsigmoid(N*(logp_w - logp_l)), min=0, max=I)",
]
_ALPHABET = list("()[]{},.;:&|^~!-<>=*/+%@'\"\\ \n\t0123456789_xywlMRefpgbIEN") + [
    "\x00",
    "\ud800",
    "¬",
    "∧",
    "∨",
    "→",
    "↔",
    "⊕",
    "⊤",
    "⊥",
    "**",
    "9**9**9",
    "__import__",
    "M(y",
    "log(",
    "1" * 50,
]


@st.composite
def mutated(draw, seeds: list[str]) -> str:
    """A valid input, then a few edits: inserted characters, deleted or repeated spans, truncation."""
    text = draw(st.sampled_from(seeds))
    for _ in range(draw(st.integers(1, 4))):
        i = draw(st.integers(0, len(text)))
        j = draw(st.integers(i, min(len(text), i + 12)))
        edit = draw(st.sampled_from(["insert", "delete", "repeat", "replace", "truncate", "wrap"]))
        if edit == "insert":
            text = text[:i] + draw(st.sampled_from(_ALPHABET) | st.characters()) + text[i:]
        elif edit == "delete":
            text = text[:i] + text[j:]
        elif edit == "repeat":
            text = text[:i] + text[i:j] * draw(st.integers(2, 300)) + text[j:]
        elif edit == "replace":
            text = text[:i] + draw(st.sampled_from(_ALPHABET)) + text[j:]
        elif edit == "truncate":
            text = text[:i]
        else:
            n = draw(st.integers(1, 2 * MAX_NESTING))
            text = draw(st.sampled_from(["(", "~(", "Not(", "log(", "-("])) * n + text + ")" * n
    return text


@st.composite
def deep_formulas(draw) -> str:
    """Formulas nested around the limit: each level a random connective, written infix or as a call."""
    depth = draw(st.integers(MAX_NESTING - 3, MAX_NESTING + 3) | st.integers(0, 3 * MAX_NESTING))
    text = draw(st.sampled_from(ATOMS))
    for _ in range(depth):
        atom = draw(st.sampled_from(ATOMS))
        form = draw(st.sampled_from(["infix", "call", "not"]))
        if form == "infix":
            text = f"{atom} {draw(st.sampled_from(_OPS))} ({text})"
        elif form == "call":
            text = f"{draw(st.sampled_from(_CALLS))}({text}, {atom})"  # Not(a, b) is an arity error: also tested
        else:
            text = f"{draw(st.sampled_from(['~', '¬', 'not ', 'Not']))}({text})"
    return text


ANY_TEXT = st.lists(st.characters() | st.characters(categories=["Cs"]) | st.sampled_from(_ALPHABET), max_size=40).map(
    "".join
)


@settings(FUZZ, max_examples=40)
@given(mutated(FORMULA_SEEDS))
def test_mutated_formulas(text):
    formula_entry_points(text)


@settings(FUZZ, max_examples=25)
@given(deep_formulas())
def test_deep_formulas(text):
    formula_entry_points(text)


@settings(FUZZ, max_examples=60)
@given(ANY_TEXT)
def test_arbitrary_text_as_a_formula(text):
    api(parse_structure_text, text)
    cli("derive", "--", text)


@settings(FUZZ, max_examples=40)
@given(mutated(EQUATION_SEEDS))
def test_mutated_equations(text):
    equation_entry_points(text)


@settings(FUZZ, max_examples=60)
@given(ANY_TEXT)
def test_arbitrary_text_as_an_equation(text):
    api(decompile, text)
    cli("decompile", "--", text)


def test_preference_loss_specs():
    pytest.importorskip("torch")
    from dpalogic.runtime.preference_loss import PreferenceLoss

    for text in HOSTILE_FORMULAS + FORMULA_SEEDS + ["dpo", "no_such_loss", "M(yw) -> M(yl)"]:
        api(PreferenceLoss, text)
