"""The preference language: parsing, precedence, printers and errors (property-based where it counts)."""

from __future__ import annotations

import pytest
import sympy
from hypothesis import given, settings
from hypothesis import strategies as st
from sympy.logic.boolalg import And, Equivalent, Implies, Not, Or, Xor

from dpalogic.errors import DPALogicError, FormulaSyntaxError
from dpalogic.language.syntax import parse_formula, parse_structure_text, to_ascii, to_latex, to_unicode
from dpalogic.logic.structure import Structure

yw, yl, rw, rl = (sympy.Symbol(n) for n in ["M(yw)", "M(yl)", "Ref(yw)", "Ref(yl)"])
y1, y2, y3 = (sympy.Symbol(f"M(y{i})") for i in (1, 2, 3))


def equivalent(a, b) -> bool:
    """Semantic equivalence by SymPy's own satisfiability check (independent of dpalogic's truth tables)."""
    return not sympy.satisfiable(Xor(a, b))


@pytest.mark.parametrize(
    "text,expected",
    [
        ("M(yw)", yw),
        ("M(x, yw)", yw),
        ("M(y_w) & Ref(y_l)", And(yw, rl)),
        ("~M(yw) & M(yl)", And(Not(yw), yl)),
        ("¬M(yw) ∧ M(yl)", And(Not(yw), yl)),
        ("not M(yw) and M(yl)", And(Not(yw), yl)),
        ("M(yw) | M(yl) & Ref(yw)", Or(yw, And(yl, rw))),  # & binds tighter than |
        ("M(yw) ^ M(yl) & Ref(yw)", Xor(yw, And(yl, rw))),  # & binds tighter than ^
        ("M(yw) | M(yl) ^ Ref(yw)", Or(yw, Xor(yl, rw))),  # ^ binds tighter than |
        ("M(yw) ⊕ M(yl) ∨ Ref(yw)", Or(Xor(yw, yl), rw)),
        ("M(yw) xor M(yl) or Ref(yw)", Or(Xor(yw, yl), rw)),
        ("M(y1) -> M(y2) -> M(y3)", Implies(y1, Implies(y2, y3))),  # right-associative
        ("M(y1) → M(y2) ∨ M(y3)", Implies(y1, Or(y2, y3))),
        ("M(y1) implies M(y2)", Implies(y1, y2)),
        ("M(y1) <-> M(y2) -> M(y3)", Equivalent(y1, Implies(y2, y3))),  # iff is loosest
        ("M(y1) ↔ M(y2)", Equivalent(y1, y2)),
        ("M(y1) iff M(y2)", Equivalent(y1, y2)),
        ("true & M(yw)", yw),
        ("⊤ ∧ M(yw) ∨ ⊥", yw),
        ("Implies(M(x,yl), M(x,yw))", Implies(yl, yw)),
        ("And(M(yw), Not(M(yl)), Ref(yl))", And(yw, Not(yl), rl)),
        ("XOR(M(yw), M(yl))", Xor(yw, yl)),
        ("Equivalent(M(yw), M(yl))", Equivalent(yw, yl)),
        ("Or(M(yw), (M(yl)))", Or(yw, yl)),
    ],
)
def test_parse(text, expected):
    assert equivalent(parse_formula(text), expected)


def test_structures():
    s = parse_structure_text("(M(yl) -> M(yw), M(yw) | M(yl), M(yw) & M(yl))")
    assert equivalent(s.core, Implies(yl, yw)) and equivalent(s.given, Or(yw, yl))
    assert equivalent(s.additional, And(yw, yl))
    pair = parse_structure_text("(Implies(M(x,yl), M(x,yw)), Or(M(x,yl), M(x,yw)))")
    assert pair.additional is None and equivalent(pair.given, Or(yl, yw))
    bare = parse_structure_text("M(yl) -> M(yw)")
    assert bare.given is None and bare.additional is None
    # a bare formula means (P, true, false)
    assert Structure.parse("M(yl) -> M(yw)") == Structure.parse("(M(yl) -> M(yw), true, false)")


# ------------------------------------------------------------------------------------ printers round trip

ATOMS = [yw, yl, rw, rl, y1, y2]


def formulas():
    leaves = st.sampled_from(ATOMS) | st.sampled_from([sympy.true, sympy.false])
    return st.recursive(
        leaves,
        lambda sub: st.one_of(
            sub.map(Not),
            st.lists(sub, min_size=2, max_size=3).map(lambda xs: And(*xs)),
            st.lists(sub, min_size=2, max_size=3).map(lambda xs: Or(*xs)),
            st.lists(sub, min_size=2, max_size=3).map(lambda xs: Xor(*xs)),
            st.tuples(sub, sub).map(lambda t: Implies(*t)),
            st.lists(sub, min_size=2, max_size=3).map(lambda xs: Equivalent(*xs)),
        ),
        max_leaves=8,
    )


@settings(max_examples=150, deadline=None)
@given(formulas())
def test_ascii_round_trip(f):
    assert equivalent(parse_formula(to_ascii(f)), f)


@settings(max_examples=100, deadline=None)
@given(formulas())
def test_unicode_round_trip(f):
    assert equivalent(parse_formula(to_unicode(f)), f)


def test_printers():
    f = Implies(And(yl, rw), And(yw, rl))
    assert to_ascii(f) == "(M(yl) & Ref(yw)) -> (M(yw) & Ref(yl))"
    assert to_unicode(f) == "(M(yl) ∧ Ref(yw)) → (M(yw) ∧ Ref(yl))"
    assert to_latex(f) == (
        r"\left(M(y_l) \land \mathrm{Ref}(y_w)\right) \rightarrow \left(M(y_w) \land \mathrm{Ref}(y_l)\right)"
    )
    assert to_ascii(Implies(Implies(y1, y2), y3)) == "(M(y1) -> M(y2)) -> M(y3)"
    assert to_ascii(Implies(y1, Implies(y2, y3))) == "M(y1) -> M(y2) -> M(y3)"


# ------------------------------------------------------------------------------------ errors


@pytest.mark.parametrize(
    "text,fragment,pos",
    [
        ("M(yw) &", "expected a formula", 7),
        ("M(yw) -> (M(yl)", "expected ')'", 15),
        ("M(yw) $ M(yl)", "unexpected character '$'", 6),
        ("Mx(yw)", "did you mean 'M'", 0),
        ("Reff(yw) -> M(yw)", "did you mean 'Ref'", 0),
        ("M(yz)", "unknown answer 'yz'", 2),
        ("M(z, yw)", "unknown prompt 'z'", 2),
        ("yw -> M(yl)", "did you mean M(yw) or Ref(yw)", 0),
        ("Implies(M(yw))", "exactly 2", 0),
        ("", "empty formula", 0),
        ("(M(yw), M(yl), M(yw), M(yl))", "expected ')'", 20),
    ],
)
def test_errors_point_at_the_problem(text, fragment, pos):
    with pytest.raises(FormulaSyntaxError) as info:
        parse_structure_text(text)
    err = info.value
    assert fragment in str(err)
    assert err.pos == pos
    lines = str(err).splitlines()
    caret_col = lines[-1].index("^")
    assert caret_col - 2 == pos  # the caret sits under the offending position (two spaces of indent)


@settings(max_examples=300, deadline=None)
@given(
    st.lists(st.sampled_from(list("M()Refyxwl12 ,&|^~->¬∧∨→↔⊕⊤⊥tru") + ["and", "not", "M(yw)"]), max_size=30).map(
        "".join
    )
)
def test_parser_fuzz_only_documented_errors(text):
    try:
        parse_structure_text(text)
    except DPALogicError:
        pass


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=40))
def test_parser_fuzz_arbitrary_text(text):
    try:
        parse_structure_text(text)
    except DPALogicError:
        pass


# ------------------------------------------------------------------------------------ limits (issue #9)


def nested(levels: int) -> str:
    """A formula whose operators nest ``levels`` deep: & and | alternate, so no chain flattens."""
    f = "M(y1)"
    for k in range(1, levels + 1):
        f = f"M(y{k % 5 + 1}) {'&' if k % 2 else '|'} ({f})"
    return f


def expected_nested(levels: int):
    f = y1
    for k in range(1, levels + 1):
        a = sympy.Symbol(f"M(y{k % 5 + 1})")
        f = And(a, f) if k % 2 else Or(a, f)
    return f


def test_nesting_at_the_limit_parses_and_prints():
    from dpalogic.language.syntax import MAX_NESTING

    f = parse_formula(nested(MAX_NESTING))
    assert f == expected_nested(MAX_NESTING)  # SymPy builds the same tree, so the comparison is structural
    for printer in (to_ascii, to_unicode):
        assert parse_formula(printer(f)) == f
    assert to_latex(f).count(r"\land") == (MAX_NESTING + 1) // 2


@pytest.mark.parametrize(
    "text,levels,pos",
    [
        ("~" * 986 + "M(yw)", 986, 100),
        ("Not(" * 329 + "M(yw)" + ")" * 329, 329, 400),
        ("M(yw) -> " * 300 + "M(yw)", 300, 900),  # -> is right-associative: each arrow nests one level
        ("(M(yw) <-> " * 150 + "M(yl)" + ")" * 150, 150, 1101),  # the 101st operator starts after its "("
    ],
)
def test_too_deep_is_a_stated_limit_with_a_caret(text, levels, pos):
    from dpalogic.language.syntax import MAX_NESTING

    with pytest.raises(FormulaSyntaxError) as info:
        parse_formula(text)
    msg = str(info.value)
    assert f"nests {levels} operators deep; the limit is {MAX_NESTING} levels" in msg
    assert info.value.pos == pos  # the first operator beyond the limit, reading from the left


def test_just_above_the_limit_is_refused():
    from dpalogic.language.syntax import MAX_NESTING

    with pytest.raises(FormulaSyntaxError, match=f"nests {MAX_NESTING + 1} operators deep"):
        parse_formula(nested(MAX_NESTING + 1))


def test_long_chains_of_one_operator_are_one_level():
    assert parse_formula("M(yw) & " * 493 + "M(yw)") == yw
    ys = [sympy.Symbol(f"M(y{i})") for i in range(1, 7)]
    text = " | ".join(f"M(y{i % 6 + 1})" for i in range(1200))
    assert parse_formula(text) == Or(*ys)
    assert parse_formula("(" * 4000 + "M(yw)" + ")" * 4000) == yw  # parentheses alone nest nothing


def test_huge_answer_index_is_an_unknown_answer():
    with pytest.raises(FormulaSyntaxError, match="unknown answer") as info:
        parse_formula("M(y" + "1" * 4301 + ")")
    assert info.value.pos == 2
    with pytest.raises(FormulaSyntaxError, match="unknown answer"):
        parse_formula("M(y257)")  # one past MAX_ANSWERS
    assert parse_formula("M(y256)") == sympy.Symbol("M(y256)")


def test_overlong_text_is_refused():
    from dpalogic.language.syntax import MAX_FORMULA_CHARS

    text = "M(yw) | " * (MAX_FORMULA_CHARS // 8) + "M(yl)"
    with pytest.raises(DPALogicError, match=f"characters long; the limit is {MAX_FORMULA_CHARS}"):
        parse_formula(text)


def test_every_command_survives_the_deepest_formula():
    """At the nesting limit the analysis, the printers, SymPy and the WMC all run (no RecursionError); one level
    more is the stated limit, with exit status 2."""
    import contextlib
    import io
    import json

    from dpalogic.cli import main
    from dpalogic.language.syntax import MAX_NESTING

    def run(*argv):
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = main(list(argv))
        return code, out.getvalue(), err.getvalue()

    deep = nested(MAX_NESTING)
    code, out, _ = run("derive", f"({deep}, M(yw) | M(y1))", "--json")
    assert code == 0
    info = json.loads(out)
    s = Structure.parse(f"({deep}, M(yw) | M(y1))")
    assert info["atoms"] == [a.name for a in s.atoms]
    for argv in (["derive", deep], ["compile", deep], ["compare", deep, "M(y1) | M(y2)"], ["lattice", deep, "M(y1)"]):
        assert run(*argv)[0] == 0, argv
    too_deep = nested(MAX_NESTING + 1)
    for argv in (["derive", too_deep], ["compile", too_deep], ["compare", too_deep, "cpo"]):
        code, _, err = run(*argv)
        assert code == 2 and f"the limit is {MAX_NESTING} levels" in err
