"""Decompiler: equations back to structures, rearranged inputs, precise out-of-fragment reasons, round trips."""

from __future__ import annotations

import json

import pytest
import sympy
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from sympy.logic.boolalg import And, Implies, Not, Or, Xor

from dpalogic.analysis.decompile import OutsideFragmentError, decompile, program_equation, report
from dpalogic.cli import main
from dpalogic.errors import DPALogicError
from dpalogic.logic.structure import Structure, align
from dpalogic.semantics.catalog import entries, pair_names
from dpalogic.semantics.program import same_ratio, semantic_loss_sympy, wmc_sympy

yw, yl, rw, rl = (sympy.Symbol(n) for n in ["M(yw)", "M(yl)", "Ref(yw)", "Ref(yl)"])


def sides_equal(s1: Structure, s2: Structure) -> bool:
    a, b = align(s1, s2)
    return (a.top, a.bottom) == (b.top, b.bottom)


def only_term(text):
    d = decompile(text)
    assert len(d.terms) == 1, d.terms
    return d.terms[0]


DPO = Structure.from_sides(And(yw, rl), And(yl, rw))
CPO = Structure.from_sides(yw, yl)
ORPO = Structure.from_sides(And(yw, Not(yl)), And(yl, Not(yw)))


@pytest.mark.parametrize(
    "text,structure,link,beta,gamma,normalized",
    [
        ("-log(sigmoid(beta*((logp_w - ref_logp_w) - (logp_l - ref_logp_l))))", DPO, "logistic", "beta", "0", False),
        ("softplus(-beta*(logp_w - logp_l - ref_logp_w + ref_logp_l))", DPO, "logistic", "beta", "0", False),
        ("-logsigmoid(beta*log(p_w*ref_p_l/(p_l*ref_p_w)))", DPO, "logistic", "beta", "0", False),
        ("-logsigmoid(beta*(logp_w/len_w - logp_l/len_l) - gamma)", CPO, "logistic", "beta", "gamma", True),
        ("-log(p_w/(p_w + p_l))", CPO, "logistic", "1", "0", False),
        ("relu(1 - beta*(logp_w - logp_l))", CPO, "hinge", "beta", "0", False),
        ("Max(0, 1 - beta*(logp_w - logp_l))", CPO, "hinge", "beta", "0", False),
        # ORPO written with odds, with log(1 - p), with log1mexp, and as a ratio of probabilities
        ("-logsigmoid(log(p_w/(1 - p_w)) - log(p_l/(1 - p_l)))", ORPO, "logistic", "1", "0", False),
        ("-logsigmoid(logp_w - logp_l - log(1 - exp(logp_w)) + log(1 - exp(logp_l)))", ORPO, "logistic", "1", "0", False),
        ("-logsigmoid((logp_w - logp_l) - (log1mexp(logp_w) - log1mexp(logp_l)))", ORPO, "logistic", "1", "0", False),
        ("-log(p_w*(1-p_l) / (p_w*(1-p_l) + p_l*(1-p_w)))", ORPO, "logistic", "1", "0", False),
        ("((logp_w - ref_logp_w)/len_w - (logp_l - ref_logp_l)/len_l - 1/(2*beta))**2", DPO, "squared", "1", "1/(2*beta)", True),
        ("sigmoid(-beta*(logp_w - ref_logp_w - logp_l + ref_logp_l))", DPO, "sigmoid", "beta", "0", False),
        ("exp(-beta*(logp_w - logp_l))", CPO, "exponential", "beta", "0", False),
        # Bradley–Terry: −log(A/(A + B)) is −log σ(log A − log B), with powers or constants in A and B
        ("-log(p_w**beta/(p_w**beta + p_l**beta))", CPO, "logistic", "beta", "0", False),
        ("-log(2*p_w/(2*p_w + p_l))", CPO, "logistic", "1", "-log(2)", False),
        # unlikelihood in log-prob form
        ("-log(1 - exp(logp_l))", Structure.from_sides(Not(yl), yl), "logistic", "1", "0", False),
        ("-log1p(-exp(logp_l))", Structure.from_sides(Not(yl), yl), "logistic", "1", "0", False),
    ],
)  # fmt: skip
def test_recognises_link_beta_gamma_and_structure(text, structure, link, beta, gamma, normalized):
    t = only_term(text)
    assert t.link == link
    assert sympy.simplify(t.scale - sympy.sympify(beta, locals={"beta": sympy.Symbol("beta", positive=True)})) == 0
    g = sympy.sympify(
        gamma, locals={"beta": sympy.Symbol("beta", positive=True), "gamma": sympy.Symbol("gamma", positive=True)}
    )
    assert sympy.simplify(t.shift - g) == 0
    assert t.normalized == normalized
    assert sides_equal(t.structure, structure)


def test_sums_of_terms_and_matches():
    d = decompile("-logsigmoid(beta*(logp_w - logp_l)) - alpha*logp_w/len_w")
    r = report(d)
    # CPO has label smoothing: without it, the equation is CPO only at label_smoothing = 0 (matching is symbolic)
    assert r["matches"] == [] and r["matches_with"] == ["cpo with label_smoothing := 0"]
    links = sorted((t["link"], t["structure"], t["normalized"]) for t in r["terms"])
    assert links == [("logistic", "(M(yl) -> M(yw), M(yw) | M(yl), M(yw) & M(yl))", False), ("logistic", "M(yw)", True)]


def test_conservative_loss_is_two_terms():
    d = decompile("-(1-eps)*logsigmoid(beta*(logp_w - logp_l)) - eps*logsigmoid(-beta*(logp_w - logp_l))")
    assert len(d.terms) == 2
    structures = {(t.structure.top, t.structure.bottom) for t in d.terms}
    assert structures == {(CPO.top, CPO.bottom), (CPO.bottom, CPO.top)}  # the smoothing term is the reversed structure
    assert all(t.scale == sympy.Symbol("beta", positive=True) for t in d.terms)


@pytest.mark.parametrize("name", pair_names())
def test_every_catalog_program_round_trips(name):
    r = report(decompile(program_equation(entries()[name].program)))
    assert name in r["matches"]


@pytest.mark.parametrize(
    "text,fragment",
    [
        ("-log(p_w**2/(p_w**2 + p_l))", "numerator p_w**2 has degree 2 in p_w"),
        ("-logsigmoid(beta*(logp_w - sqrt(2)*logp_l))", "non-integer power"),
        # f-DPO's JS score log 2 + logsigmoid(log t): ρ = p_w·(p_l + r_l) / (p_l·(p_w + r_w))
        (
            "-logsigmoid(beta*(logsigmoid(logp_w - ref_logp_w) - logsigmoid(logp_l - ref_logp_l)))",
            "numerator p_w*(p_l + r_l) takes the value 2 at the corner M(yw)=1, M(yl)=1, Ref(yw)=0, Ref(yl)=1",
        ),
        ("-exp((logp_w + logp_l)/len_w)*logsigmoid(beta*(logp_w - logp_l))", "a weight that depends on the log-prob"),
        ("-logsigmoid(log(p_w**2/p_l))", "degree 2 in p_w"),
        ("-logsigmoid(beta*(logp_w/len_w - logp_l))", "lengths do not cancel"),
        ("-logsigmoid(beta*(exp(logp_w) - exp(logp_l)))", "not β·log ρ − γ"),
    ],
)
def test_outside_the_fragment_says_why(text, fragment):
    with pytest.raises(OutsideFragmentError) as info:
        decompile(text)
    assert fragment in str(info.value)


@pytest.mark.parametrize("text", ["-log(foo(p_w))", "-log(p_w", "beta*gamma"])
def test_bad_equations(text):
    with pytest.raises(DPALogicError):
        decompile(text)


def test_cli(capsys):
    assert main(["decompile", "-log(sigmoid(beta*((logp_w - ref_logp_w) - (logp_l - ref_logp_l))))", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert {"terms", "matches"} <= set(out)
    assert {"link", "top", "bottom", "core", "given", "additive"} <= set(out["terms"][0])
    assert "dpo" in out["matches"]
    assert main(["decompile", "simpo", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["matches"] == ["simpo"]
    assert main(["decompile", "-log(2*p_w)"]) == 2


# ------------------------------------------------------------------------------------ property: compiled → decompiled

ATOMS = [yw, yl, rw, rl]


@st.composite
def structures(draw):
    atoms = ATOMS[: draw(st.sampled_from([2, 3, 4]))]
    leaves = st.sampled_from(atoms)
    f = st.recursive(
        leaves,
        lambda sub: st.one_of(
            sub.map(Not),
            st.tuples(sub, sub).map(lambda t: And(*t)),
            st.tuples(sub, sub).map(lambda t: Or(*t)),
            st.tuples(sub, sub).map(lambda t: Xor(*t)),
            st.tuples(sub, sub).map(lambda t: Implies(*t)),
        ),
        max_leaves=5,
    )
    return Structure.from_parts(
        draw(f), draw(st.one_of(st.just(sympy.true), f)), draw(st.one_of(st.just(sympy.false), f))
    )


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(structures())
def test_decompiling_a_compiled_structure_gives_it_back(s):
    assume(not s.problems() and s.top != s.bottom)  # ✓ = ✗ is the constant loss log 2: nothing to decompile
    names = {"p_w": "p_w", "p_l": "p_l", "r_w": "ref_p_w", "r_l": "ref_p_l"}
    text = str(semantic_loss_sympy(s))
    for a, b in names.items():
        text = text.replace(a, b) if a.startswith("r_") else text
    t = only_term(text)
    assert t.link == "logistic" and t.scale == 1
    assert same_ratio(t.structure, s)  # always the same loss function
    num, den = wmc_sympy(s.top, s.atoms, factored=False), wmc_sympy(s.bottom, s.atoms, factored=False)
    if sympy.gcd(num, den).is_number:  # ρ already in lowest terms: the very same structure comes back
        assert sides_equal(t.structure, s)


# ------------------------------------------------------------------------------------ the safe equation parser (#9)

BETA = sympy.Symbol("beta", positive=True)


@pytest.mark.parametrize("name", ["I", "E", "N", "S", "Q", "pi", "oo", "zoo", "nan", "beta", "lambda_", "β"])
def test_any_other_name_is_a_hyperparameter(name):
    t = only_term(f"-logsigmoid({name}*(logp_w - logp_l))")
    assert t.scale == sympy.Symbol(name, positive=True)  # a positive symbol, not SymPy's constant of that name
    assert t.link == "logistic" and sides_equal(t.structure, CPO)


def test_equations_never_run_code(tmp_path):
    target = tmp_path / "pwned"
    for text in [
        f"__import__('os').system('touch {target}')",
        f"__import__('os').system('touch {target}') + logp_w",
        f"logp_w + exec(\"open('{target}', 'w')\")",
        f"logp_w + open('{target}', 'w').close()",
        "logp_w.__class__",
        "(lambda: 1)()",
    ]:
        with pytest.raises(DPALogicError):
            decompile(text)
        assert main(["decompile", text]) == 2
    assert not target.exists()


@pytest.mark.parametrize(
    "text,fragment,pos",
    [
        ("logp_w * 9**9**9", "exponent 387420489 is not a number between -100 and 100", 12),
        ("logp_w ** 1000", "exponent 1000", 10),
        ("((p_w + p_l)**50)**50", "exponent beyond ±100", 0),  # SymPy merges the powers: the result is checked
        ("exp(5000*log(p_w + p_l))", "exponent beyond ±100", 0),
        ("(9**100)**100 * logp_w", "about 9603 digits; the limit is 1000", 0),
        ("logp_w * " + "9" * 101, "more than 100 digits", 9),
        ("logp_w * 1e999", "too large for a float", 9),
        ("logp_w / 0", "zoo", 0),
        ("log(logp_w - logp_w)", "zoo", 0),
        ("-" * 51 + "logp_w", "more than 50 operators deep", 50),
        ("sigmoid(" * 31 + "logp_w" + ")" * 31, "more than 120 levels once written out", 0),
        ("logp_w ^ 2", "write ** for a power", 0),
        ("logp_w.real", "an attribute", 0),
        ("logp_w[0]", "indexing", 0),
        ("'logp_w'", "a string", 0),
        ("1j * logp_w", "the constant 1j", 0),
        ("logp_w if beta else logp_l", "a conditional expression", 0),
        ("logp_w < logp_l", "a comparison", 0),
        ("os.system('ls')", "os.system is not a function", 0),
        ("foo(logp_w)", "unknown function 'foo'", 0),
        ("logp_w + lgo(p_w)", "did you mean 'log'", 9),
        ("log(logp_w, base=2)", "the keyword base= is not allowed", 12),
        ("clamp(logp_w, low=0)", "clamp takes min= and max=", 14),
        ("clamp(logp_w)", "clamp needs a bound", 0),
        ("exp(logp_w, 2)", "exp takes 1 argument(s), got 2", 0),
        ("log * logp_w", "log is a function: write log(...)", 0),
        ("-log(p_w", "'(' was never closed", 4),
        ("logp_w\n+ logp_l", "invalid syntax", 7),
        ("logp_w \x00", "NUL character", 7),
        ("logp_w + \ud800", "not text", 9),
    ],
)
def test_refusals_point_at_the_problem(text, fragment, pos):
    from dpalogic.errors import FormulaSyntaxError

    with pytest.raises(FormulaSyntaxError) as info:
        decompile(text)
    assert fragment in str(info.value)
    assert info.value.pos == pos
    assert str(info.value).splitlines()[-1].index("^") - 2 == pos - info.value.text.rfind("\n", 0, pos) - 1


def test_length_and_size_limits():
    from dpalogic.language.equation import MAX_EQUATION_CHARS, MAX_EQUATION_DEPTH, MAX_EQUATION_NODES

    with pytest.raises(DPALogicError, match=f"characters long; the limit is {MAX_EQUATION_CHARS}"):
        decompile("logp_w" + " " * MAX_EQUATION_CHARS)
    with pytest.raises(DPALogicError, match=f"more than {MAX_EQUATION_NODES} parts"):
        decompile("+".join(["logp_w"] + ["a"] * 1000))
    # a long flat sum is one level; at the depth limit the equation still parses and decompiles
    assert decompile("-logsigmoid(" + " + ".join(["beta*logp_w - beta*logp_l"] * 50) + ")").terms[0].scale == 50 * BETA
    deep = "logp_w"
    for _ in range(MAX_EQUATION_DEPTH):
        deep = f"-({deep})"
    assert parse_equation_text(deep) == (-1) ** MAX_EQUATION_DEPTH * sympy.Symbol("logp_w", real=True)
    with pytest.raises(DPALogicError, match=f"more than {MAX_EQUATION_DEPTH} operators deep"):
        parse_equation_text(f"-({deep})")


def parse_equation_text(text):
    from dpalogic.analysis.decompile import parse_equation

    return parse_equation(text)


@pytest.mark.parametrize(
    "text,plain",
    [
        ("F.logsigmoid(-beta*(logp_w - logp_l))", "logsigmoid(-beta*(logp_w - logp_l))"),
        ("-torch.nn.functional.logsigmoid(beta*(logp_w - logp_l))", "-logsigmoid(beta*(logp_w - logp_l))"),
        ("torch.log1p(torch.exp(-beta*(logp_w - logp_l)))", "log(1 + exp(-beta*(logp_w - logp_l)))"),
        ("math.log(p_w)", "log(p_w)"),
        ("torch.clamp(1 - beta*(logp_w - logp_l), min=0)", "Max(0, 1 - beta*(logp_w - logp_l))"),
        ("clamp(1 - beta*(logp_w - logp_l), 0)", "Max(0, 1 - beta*(logp_w - logp_l))"),
        ("F.relu(1 - beta*(logp_w - logp_l))", "max(0, 1 - beta*(logp_w - logp_l))"),
        ("torch.sigmoid(-beta*(logp_w - logp_l))", "1/(1 + exp(beta*(logp_w - logp_l)))"),
        ("F.softplus(-beta*(logp_w - logp_l))", "log(1 + exp(-beta*(logp_w - logp_l)))"),
        ("torch.expm1(logp_w) + 1", "exp(logp_w)"),
    ],
)
def test_code_spellings_are_the_same_equation(text, plain):
    a, b = decompile(text).terms, decompile(plain).terms
    assert [(t.link, t.coef, t.scale, t.shift, t.structure) for t in a] == [
        (t.link, t.coef, t.scale, t.shift, t.structure) for t in b
    ]


# random equations from the whitelist, written as text and built directly in SymPy: the parser must agree
_X = {n: sympy.Symbol(n, real=True) for n in ("logp_w", "logp_l", "ref_logp_w")}
_H = {n: sympy.Symbol(n, positive=True) for n in ("beta", "N", "E", "I")}
_UNARY = {
    "exp": sympy.exp,
    "log": sympy.log,
    "tanh": sympy.tanh,
    "abs": sympy.Abs,
    "sqrt": sympy.sqrt,
    "sigmoid": lambda x: 1 / (1 + sympy.exp(-x)),
    "softplus": lambda x: sympy.log(1 + sympy.exp(x)),
    "log1p": lambda x: sympy.log(1 + x),
    "relu": lambda x: sympy.Max(0, x),
}


@st.composite
def equations(draw, depth=3):
    if depth == 0 or draw(st.integers(0, 3)) == 0:
        kind = draw(st.sampled_from(["x", "h", "n"]))
        if kind == "x":
            name = draw(st.sampled_from(sorted(_X)))
            return name, _X[name]
        if kind == "h":
            name = draw(st.sampled_from(sorted(_H)))
            return name, _H[name]
        n = draw(st.integers(0, 20))
        return str(n), sympy.Integer(n)
    op = draw(st.sampled_from(["+", "-", "*", "/", "**", "neg", "call", "max", "clamp"]))
    a_text, a = draw(equations(depth - 1))
    if op == "neg":
        return f"-({a_text})", -a
    if op == "call":
        f = draw(st.sampled_from(sorted(_UNARY)))
        return f"{f}({a_text})", _UNARY[f](a)
    if op == "**":
        assume(not a.has(sympy.zoo, sympy.nan, sympy.oo))  # zoo**0 collapses to 1 in SymPy; the parser refuses zoo
        k = draw(st.integers(-3, 3))
        return f"({a_text})**{k}", a**k
    b_text, b = draw(equations(depth - 1))
    if op in ("max", "clamp"):
        assume(not (a.has(sympy.zoo, sympy.nan) or b.has(sympy.zoo, sympy.nan)))  # SymPy's Max refuses them
    if op == "max":
        return f"max({a_text}, {b_text})", sympy.Max(a, b)
    if op == "clamp":
        return f"clamp({a_text}, min={b_text})", sympy.Max(a, b)
    py = {"+": lambda: a + b, "-": lambda: a - b, "*": lambda: a * b, "/": lambda: a / b}
    return f"({a_text}) {op} ({b_text})", py[op]()


@settings(max_examples=150, deadline=None)
@given(equations())
def test_parser_agrees_with_sympy(eq):
    text, expected = eq
    assume(not expected.has(sympy.zoo, sympy.nan, sympy.oo))  # division by zero is refused (tested above)
    from dpalogic.analysis.decompile import _simplify_logs

    assert parse_equation_text(text) == _simplify_logs(expected)


def test_constants_are_not_expanded():
    # SymPy's expand_log(force=True) never returns on log(-log(1 - σ(2))); the decompiler holds constants aside
    d = decompile("-logsigmoid(beta*(logp_w - logp_l)) + log(-log(1 - sigmoid(2)))")
    assert len(d.terms) == 1 and sides_equal(d.terms[0].structure, CPO)
    assert d.constant == sympy.log(-sympy.log(1 - 1 / (1 + sympy.exp(-2))))


@pytest.mark.parametrize(
    "text,fragment",
    [
        ("log1mexp(2) * logp_w", "complex number"),  # log(1 − e²) < … : log of a negative number
        ("sqrt(-2) * logp_w", "complex number"),
        ("log(N*p_w)", "depends on N"),
        ("-log(-exp(p_w))**3", "complex or infinite value"),
        ("clamp(logsigmoid(ref_logp_w) + p_l, min=log1mexp(exp(logp_l) - p_l))", "complex or infinite value"),
    ],
)
def test_complex_or_infinite_values_are_refused(text, fragment):
    with pytest.raises(DPALogicError, match=fragment):
        decompile(text)


def test_sympy_depth_at_the_limit():
    """sigmoid(x) is four SymPy levels: the deepest nest that parses still decompiles to a stated reason."""
    from dpalogic.language.equation import MAX_SYMPY_DEPTH

    def nest(k):
        return "sigmoid(" * k + "logp_w - logp_l" + ")" * k

    def depth(e):
        return 1 + max((depth(a) for a in e.args), default=0)

    k = 1
    while True:
        try:
            parse_equation_text(nest(k + 1))
        except DPALogicError as e:
            assert f"more than {MAX_SYMPY_DEPTH} levels" in str(e)
            break
        k += 1
    assert MAX_SYMPY_DEPTH - 4 < depth(parse_equation_text(nest(k))) <= MAX_SYMPY_DEPTH
    with pytest.raises(OutsideFragmentError):  # a sigmoid of a sigmoid … is no link of z; never a RecursionError
        decompile(nest(k))
    assert main(["decompile", nest(k)]) == 2
