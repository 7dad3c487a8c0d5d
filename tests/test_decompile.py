"""Decompiler: equations back to structures, rearranged inputs, precise out-of-fragment reasons, round trips."""

from __future__ import annotations

import json

import pytest
import sympy
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from sympy.logic.boolalg import And, Implies, Not, Or, Xor

from dpalogic.catalog import entries
from dpalogic.cli import main
from dpalogic.decompile import OutsideFragmentError, decompile, program_equation, report
from dpalogic.errors import DPALogicError
from dpalogic.semantics import same_ratio, semantic_loss_sympy, wmc_sympy
from dpalogic.structure import Structure, align

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
    assert r["matches"] == ["cpo"]
    links = sorted((t["link"], t["structure"], t["normalized"]) for t in r["terms"])
    assert links == [("logistic", "(M(yl) -> M(yw), M(yw) | M(yl), M(yw) & M(yl))", False), ("logistic", "M(yw)", True)]


def test_conservative_loss_is_two_terms():
    d = decompile("-(1-eps)*logsigmoid(beta*(logp_w - logp_l)) - eps*logsigmoid(-beta*(logp_w - logp_l))")
    assert len(d.terms) == 2
    structures = {(t.structure.top, t.structure.bottom) for t in d.terms}
    assert structures == {(CPO.top, CPO.bottom), (CPO.bottom, CPO.top)}  # the smoothing term is the reversed structure
    assert all(t.scale == sympy.Symbol("beta", positive=True) for t in d.terms)


@pytest.mark.parametrize("name", list(entries()))
def test_every_catalog_program_round_trips(name):
    r = report(decompile(program_equation(entries()[name].program)))
    assert name in r["matches"]


@pytest.mark.parametrize(
    "text,fragment",
    [
        ("-log(p_w**2/(p_w**2 + p_l))", "numerator p_w**2 has degree 2 in p_w"),
        ("-logsigmoid(beta*(logp_w - sqrt(2)*logp_l))", "non-integer power"),
        ("-log(2*p_w/(2*p_w + p_l))", "takes the value 2 at the corner M(yw)=1, M(yl)=0"),
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
