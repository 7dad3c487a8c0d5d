"""The listwise decompiler on what a new user writes: sums of softmax cross-entropies sharing one logsumexp (ListNet
with target weights, checked against torch's log_softmax), answer names outside y1 … y256, the equation limits
against logsumexp's 256 arguments, and the pairwise catalog's names for two-answer softmaxes (checked against the
catalog's own ρ)."""

from __future__ import annotations

from fractions import Fraction

import pytest
import sympy
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dpalogic.analysis.decompile import decompile_spec
from dpalogic.analysis.decompile_listwise import MAX_ANSWERS, OutsideListwiseError, decompile_listwise
from dpalogic.cli import main
from dpalogic.errors import DPALogicError
from dpalogic.runtime.preference_loss import PreferenceLoss
from dpalogic.semantics.program import Program, Term, rho_sympy


def _lo(j: int) -> str:
    return f"logodds(logp_{j})"


def _lse(K: int) -> str:
    return f"logsumexp({', '.join(_lo(j) for j in range(1, K + 1))})"


def _program(text: str) -> Program:
    terms = tuple(Term(t.structure, coef=t.coef, scale=t.scale, shift=t.shift) for t in decompile_listwise(text))
    return Program(terms, ())


def _ce(x: torch.Tensor) -> torch.Tensor:
    """−log softmax over the log-odds, each answer: the equation's softmax evaluated directly."""
    return -torch.log_softmax(x - torch.log(-torch.expm1(x)), 1)


def _inputs(B: int, K: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(K)
    return -(torch.rand(B, K, generator=g, dtype=torch.float64) * 6 + 0.01)


# ------------------------------------------------------------------------------- ListNet: one shared logsumexp


def test_the_reported_equations():
    L = _lse(3)
    out = decompile_spec(f"0.5*({L} - {_lo(1)}) + 0.5*({L} - {_lo(2)})")
    assert [t["coef"] for t in out["terms"]] == ["0.5", "0.5"]
    assert [t["structure"] for t in out["terms"]] == [f"(M(y{j}), ExactlyOne(M(y1..y3)))" for j in (1, 2)]
    assert out["matches"] == ["listnet with target weights (0.5, 0.5, 0) (beta = 1)"]
    out = decompile_spec(f"({L} - {_lo(1)}) + 2*({L} - {_lo(2)})")
    assert [t["coef"] for t in out["terms"]] == ["1", "2"]
    assert out["matches"] == ["listnet with target weights (1, 2, 0) (beta = 1)"]
    assert main(["decompile", f"0.5*({L} - {_lo(1)}) + 0.5*({L} - {_lo(2)})"]) == 0


@settings(max_examples=15, deadline=None)
@given(
    st.integers(2, 5).flatmap(
        lambda K: st.lists(
            st.sampled_from([0, 1, 2, 3, Fraction(1, 2), Fraction(1, 10), Fraction(7, 10)]), min_size=K, max_size=K
        )
    ),
    st.booleans(),
)
def test_listnet_with_target_weights(weights, decimals):
    if not any(weights):
        weights = [1] + weights[1:]
    K = len(weights)
    written = [str(float(t)) if decimals else str(t) for t in weights]
    text = " + ".join(f"({t})*({_lse(K)} - {_lo(j)})" for j, (t, v) in enumerate(zip(written, weights), 1) if v != 0)
    terms = decompile_listwise(text)
    # one top-1 term per nonzero weight, over the whole set, with that weight exactly (0.1 read as 1/10)
    assert [(t.top, sympy.Rational(t.coef)) for t in terms] == [
        (j, sympy.Rational(t.numerator, t.denominator)) for j, t in enumerate(map(Fraction, weights), 1) if t != 0
    ]
    assert all(t.structure.text("ascii") == f"(M(y{t.top}), ExactlyOne({_answers(K)}))" for t in terms)
    x = _inputs(3, K)
    ref = (_ce(x) * torch.tensor([float(t) for t in weights], dtype=torch.float64)).sum(1)
    ours = PreferenceLoss(_program(text), reduction="none")(logps=x)
    torch.testing.assert_close(ours, ref, rtol=1e-9, atol=1e-9)


def _answers(K: int) -> str:
    return "M(y1), M(y2)" if K == 2 else f"M(y1..y{K})"


def test_listnet_with_symbolic_weights_and_plackett_luce_mixed():
    terms = decompile_listwise(f"t1*({_lse(3)} - {_lo(1)}) + t2*({_lse(3)} - {_lo(3)})")
    assert [(t.top, str(t.coef)) for t in terms] == [(1, "t1"), (3, "t2")]
    # a nested set beside a shared one: the loss is the same whichever way the shared score is split
    text = f"0.5*({_lse(3)} - {_lo(2)}) + 0.5*({_lse(3)} - {_lo(1)}) + logsumexp({_lo(2)}, {_lo(3)}) - {_lo(2)}"
    x = _inputs(4, 3)
    ref = 0.5 * _ce(x)[:, 1] + 0.5 * _ce(x)[:, 0] + _ce(x[:, 1:])[:, 0]
    torch.testing.assert_close(PreferenceLoss(_program(text), reduction="none")(logps=x), ref, rtol=1e-9, atol=1e-9)


def test_unmatched_shares_are_refused_with_numbers_as_written():
    with pytest.raises(OutsideListwiseError, match=r"^2·logsumexp\(…\) over y1, y2, y3 is not matched"):
        decompile_listwise(f"2*{_lse(3)} - 0.5*{_lo(1)} - 0.5*{_lo(2)}")
    with pytest.raises(OutsideListwiseError, match="left over"):
        decompile_listwise(f"{_lse(3)} - {_lo(1)} - 0.5*{_lo(2)}")


# ------------------------------------------------------------------------------- names and limits


@pytest.mark.parametrize(
    "name,message",
    [
        ("logp_300", "unknown answer y300 \\(answers go up to y256"),
        ("ref_logp_257", "unknown answer y257"),
        ("logp_0", "y0 is not an answer"),
        ("logp_w", "listwise softmaxes use logp_1 … logp_K"),
        ("logp_x", "did you mean"),
    ],
)
def test_bad_answer_names(name, message):
    text = f"logsumexp(logodds({name}), {_lo(1)}) - {_lo(1)}"
    with pytest.raises(DPALogicError, match=message):
        decompile_spec(text)
    assert main(["decompile", text]) == 2


def test_a_softmax_over_every_answer_fits_the_equation_limits():
    K = MAX_ANSWERS
    score = [f"{_lo(j)} - logodds(ref_logp_{j})" for j in range(1, K + 1)]
    (t,) = decompile_listwise(f"logsumexp({', '.join(score)}) - ({score[0]})")
    assert (t.kind, t.top, t.others) == ("odds_vs_ref", 1, tuple(range(2, K + 1)))
    with pytest.raises(DPALogicError, match=f"logsumexp takes 1 to {K} argument"):
        decompile_listwise(f"{_lse(K)[:-1]}, logodds(logp_{K + 1})) - {_lo(1)}")


# ------------------------------------------------------------------------------- two answers: the pairwise names


@pytest.mark.parametrize(
    "text,name,w,lo",
    [
        ("logsumexp(logp_1, logp_2) - logp_1", "cpo", 1, 2),
        ("logsumexp(logp_2, logp_1) - logp_2", "cpo", 2, 1),
        (f"logsumexp({_lo(1)}, {_lo(2)}) - {_lo(1)}", "orpo", 1, 2),
        ("-logsigmoid(beta*((logp_2 - ref_logp_2) - logsumexp(logp_1 - ref_logp_1)))", "dpo", 2, 1),
    ],
)
def test_two_answer_softmaxes_name_the_pairwise_structure(text, name, w, lo):
    from dpalogic.semantics.catalog import lookup

    (term,) = decompile_spec(text)["terms"]
    assert f"{name} (y{w} as yw, y{lo} as yl)" in term["same_structure_as"]
    # the catalog's own ρ, its answers renamed, is the decompiled term's
    (t,) = decompile_listwise(text)
    theirs = rho_sympy(lookup(name).program.structure)
    ours = rho_sympy(t.structure)
    rename = {
        s: sympy.Symbol(s.name.replace("w", str(w)).replace("l", str(lo)), **s.assumptions0)
        for s in theirs.free_symbols
    }
    mine = {s.name: s for s in ours.free_symbols}
    theirs = theirs.xreplace({s: mine.get(r.name, r) for s, r in rename.items()})
    assert sympy.simplify(theirs - ours) == 0
