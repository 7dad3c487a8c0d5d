"""Listwise losses as programs of K-answer structures (dpalogic.semantics.listwise_catalog) and the listwise
decompiler (dpalogic.analysis.decompile_listwise): values and gradients against independent torch implementations
(Plackett–Luce, ListNet, DPO on all pairs), closed forms with elementary symmetric polynomials computed by
enumerating subsets, and brute-force world enumeration at small K."""

from __future__ import annotations

import itertools
import math

import pytest
import sympy
import torch
import torch.nn.functional as F
from brute import semantic_loss as brute_loss

from dpalogic.analysis.decompile import decompile_spec
from dpalogic.analysis.decompile_listwise import OutsideListwiseError, decompile_listwise
from dpalogic.errors import DPALogicError
from dpalogic.language.cardinality import expand_constructs
from dpalogic.runtime.preference_loss import PreferenceLoss
from dpalogic.semantics import listwise_catalog as lc
from dpalogic.semantics.program import Program, Term


def _inputs(B: int, K: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = -(torch.rand(B, K, generator=g, dtype=torch.float64) * 6 + 0.01)
    r = -(torch.rand(B, K, generator=g, dtype=torch.float64) * 6 + 0.01)
    return x.requires_grad_(True), r


def _log_odds(x: torch.Tensor) -> torch.Tensor:
    return x - torch.log(-torch.expm1(x))


def _ours(program: Program, x: torch.Tensor, r: torch.Tensor | None = None) -> torch.Tensor:
    return PreferenceLoss(program, reduction="none")(logps=x, ref_logps=r)


def _same_values_and_grads(ours: torch.Tensor, ref: torch.Tensor, x: torch.Tensor) -> None:
    torch.testing.assert_close(ours, ref, rtol=1e-9, atol=1e-9)
    (g1,) = torch.autograd.grad(ours.sum(), x, retain_graph=True)
    (g2,) = torch.autograd.grad(ref.sum(), x)
    torch.testing.assert_close(g1, g2, rtol=1e-7, atol=1e-9)


@pytest.mark.parametrize("K", [2, 3, 5, 8, 20])
def test_plackett_luce_is_the_pl_negative_log_likelihood(K):
    x, _ = _inputs(7, K)
    s = _log_odds(x)
    pl = -sum(s[:, i] - torch.logsumexp(s[:, i:], dim=1) for i in range(K - 1))  # −log Π_i softmax(s_{i:})_0
    program = lc.plackett_luce(K)
    assert len(program.terms) == K - 1
    _same_values_and_grads(_ours(program, x), pl, x)


@pytest.mark.parametrize("K", [2, 4, 6])
def test_pairwise_dpo_is_dpo_summed_over_all_pairs(K):
    x, r = _inputs(5, K, seed=1)
    reward = 0.1 * (x - r)
    ref = sum(-F.logsigmoid(reward[:, i] - reward[:, j]) for i in range(K) for j in range(i + 1, K))
    program = lc.pairwise_dpo(K)
    assert len(program.terms) == K * (K - 1) // 2
    _same_values_and_grads(_ours(program, x, r), ref, x)


def test_top1_softmax_and_listnet_are_softmax_cross_entropies():
    K = 16
    x, _ = _inputs(6, K, seed=2)
    _same_values_and_grads(_ours(lc.top1_softmax(K), x), -torch.log_softmax(_log_odds(x), 1)[:, 0], x)
    t = [0.5, 0.25, 0.0, 0.25] + [0.0] * (K - 4)
    ref = -(torch.tensor(t, dtype=torch.float64) * torch.log_softmax(_log_odds(x), 1)).sum(1)
    _same_values_and_grads(_ours(lc.listnet(t), x), ref, x)


def _esym(odds: list[float], c: int) -> float:
    """e_c by enumerating c-subsets (independent of any recurrence)."""
    return sum(math.prod(sub) for sub in itertools.combinations(odds, c))


def _closed_forms(p: list[float], k: int) -> dict[str, float]:
    o = [q / (1 - q) for q in p]
    rest = o[1:]
    K = len(p)
    prefix = sum(math.prod(p[:j]) * math.prod(1 - q for q in p[j:]) for j in range(K + 1))
    return {
        "in_top_k": -math.log(o[0] * _esym(rest, k - 1) / (o[0] * _esym(rest, k - 1) + _esym(rest, k))),
        "with_abstention": math.log1p(
            sum(_esym(rest, c) for c in range(k + 1)) / (o[0] * sum(_esym(rest, c) for c in range(k)))
        ),
        "top_k_set": -math.log(math.prod(o[:k]) / _esym(o, k)),
        "ranked_consistency": -math.log(prefix),
    }


def _programs(K: int, k: int) -> dict[str, Program]:
    return {
        "in_top_k": lc.in_top_k(K, k),
        "with_abstention": lc.with_abstention(K, k),
        "top_k_set": lc.top_k_set(K, k),
        "ranked_consistency": lc.ranked_consistency(K),
    }


@pytest.mark.parametrize("K, k", [(3, 1), (4, 2), (5, 2), (5, 3)])
def test_new_losses_against_world_enumeration(K, k):
    g = torch.Generator().manual_seed(K * 10 + k)
    p = (torch.rand(K, generator=g, dtype=torch.float64) * 0.9 + 0.05).tolist()
    probs = {f"M(y{j})": q for j, q in enumerate(p, 1)}
    x = torch.tensor([[math.log(q) for q in p]], dtype=torch.float64)
    closed = _closed_forms(p, k)
    for name, program in _programs(K, k).items():
        core, given, additional = (expand_constructs(e) for e in program.terms[0].structure.source)
        brute = brute_loss(core, given, additional, probs)
        assert brute == pytest.approx(closed[name], rel=1e-10), name  # the closed form in the module docstring
        assert _ours(program, x).item() == pytest.approx(brute, rel=1e-9), name


def test_new_losses_against_closed_forms_at_large_k():
    K, k = 14, 3  # e_c by subsets: C(13, 3) = 286 products
    g = torch.Generator().manual_seed(3)
    p = (torch.rand(K, generator=g, dtype=torch.float64) * 0.9 + 0.05).tolist()
    x = torch.tensor([[math.log(q) for q in p]], dtype=torch.float64)
    closed = _closed_forms(p, k)
    for name, program in _programs(K, k).items():
        assert _ours(program, x).item() == pytest.approx(closed[name], rel=1e-9), name


def test_constructors_refuse_bad_sizes():
    from dpalogic.errors import DPALogicError

    for bad in (lambda: lc.plackett_luce(1), lambda: lc.in_top_k(4, 4), lambda: lc.top_k_set(4, 0)):
        with pytest.raises(DPALogicError):
            bad()


# ------------------------------------------------------------------------------------------ decompile


def _lo(j: int) -> str:
    return f"logodds(logp_{j})"


def _pl_equation(K: int) -> str:
    return " + ".join(f"logsumexp({', '.join(_lo(j) for j in range(i, K + 1))}) - {_lo(i)}" for i in range(1, K))


def _as_program(text: str) -> Program:
    def plain(e):  # the equation's hyperparameters are positive symbols; a program's are plain ones
        return e.xreplace({s: sympy.Symbol(s.name) for s in e.free_symbols})

    terms = tuple(
        Term(t.structure, coef=plain(t.coef), scale=plain(t.scale), shift=plain(t.shift))
        for t in decompile_listwise(text)
    )
    return Program(terms, (("beta", 1.0), ("gamma", 0.0)))


@pytest.mark.parametrize("K", [4, 16])
def test_decompiled_softmax_is_exactly_one_conditioning(K):
    others = ", ".join(_lo(j) for j in range(2, K + 1))
    every = ", ".join(_lo(j) for j in range(1, K + 1))
    forms = [f"-logsigmoid({_lo(1)} - logsumexp({others}))", f"-({_lo(1)} - logsumexp({every}))"]
    forms.append(f"softplus(logsumexp({others}) - {_lo(1)})")
    x, _ = _inputs(4, K, seed=4)
    ref = -torch.log_softmax(_log_odds(x), 1)[:, 0]  # the equation, evaluated directly
    for text in forms:
        (t,) = decompile_listwise(text)
        assert t.structure.text("ascii") == f"(M(y1), ExactlyOne(M(y1..y{K})))"
        torch.testing.assert_close(_ours(_as_program(text), x), ref, rtol=1e-9, atol=1e-9)


def test_decompiled_plackett_luce_is_the_catalog_program():
    K = 6
    text = _pl_equation(K)
    got = [t.structure.text("ascii") for t in decompile_listwise(text)]
    assert got == [t.structure.text("ascii") for t in lc.plackett_luce(K).terms]
    x, _ = _inputs(3, K, seed=5)
    torch.testing.assert_close(_ours(_as_program(text), x), _ours(lc.plackett_luce(K), x), rtol=1e-9, atol=1e-9)


def test_decompiled_reference_forms():
    K = 3
    x, r = _inputs(4, K, seed=6)
    # log-odds against the reference's log-odds: ExactlyOne with each answer's M and Ref disagreeing
    score = [f"{_lo(j)} - logodds(ref_logp_{j})" for j in range(1, K + 1)]
    text = f"logsumexp({', '.join(score)}) - ({score[0]})"
    (t,) = decompile_listwise(text)
    assert t.kind == "odds_vs_ref"
    s = _log_odds(x) - _log_odds(r)
    torch.testing.assert_close(_ours(_as_program(text), x, r), -torch.log_softmax(s, 1)[:, 0], rtol=1e-9, atol=1e-9)
    # two answers: DPO's implicit rewards give DPO's structure, log-probs CPO's (β outside the softmax)
    program = _as_program("-logsigmoid(beta*((logp_1 - ref_logp_1) - logsumexp(logp_2 - ref_logp_2)))")
    program = program.with_hyperparameters(beta=0.1)
    ref = -F.logsigmoid(0.1 * ((x[:, 0] - r[:, 0]) - (x[:, 1] - r[:, 1])))
    torch.testing.assert_close(_ours(program, x[:, :2], r[:, :2]), ref, rtol=1e-9, atol=1e-9)
    program = _as_program("logsumexp(logp_2, logp_1) - logp_1")
    torch.testing.assert_close(_ours(program, x[:, :2]), F.softplus(x[:, 1] - x[:, 0]), rtol=1e-9, atol=1e-9)


def test_decompile_refuses_what_is_not_a_structure_and_says_why():
    with pytest.raises(OutsideListwiseError, match="corner"):  # softmax over log-probs of 3 answers
        decompile_listwise("logsumexp(logp_1, logp_2, logp_3) - logp_1")
    with pytest.raises(OutsideListwiseError, match="corner"):  # over implicit rewards
        decompile_listwise(
            "logsumexp(logp_1 - ref_logp_1, logp_2 - ref_logp_2, logp_3 - ref_logp_3) - logp_1 + ref_logp_1"
        )
    with pytest.raises(OutsideListwiseError, match="temperature"):
        decompile_listwise(f"logsumexp(2*{_lo(1)}, 2*{_lo(2)}, 2*{_lo(3)}) - 2*{_lo(1)}")
    with pytest.raises(OutsideListwiseError, match="not matched"):
        decompile_listwise(f"logsumexp({_lo(1)}, {_lo(2)}) - {_lo(3)}")


def test_decompile_command_reads_listwise_equations():
    out = decompile_spec(f"-logsigmoid(beta*({_lo(1)} - logsumexp({', '.join(_lo(j) for j in range(2, 33))})) - gamma)")
    (term,) = out["terms"]
    assert term["structure"] == "(M(y1), ExactlyOne(M(y1..y32)))"
    assert (term["beta"], term["gamma"]) == ("beta", "gamma")
    assert term["rho"] == "o_1 / e_1(o[M(y2..y32)])"


def test_constructors_refuse_a_ranking_reversed():
    """β ≤ 0 or a negative target weight would reward the lower-ranked answers: refused, as training refuses it."""
    with pytest.raises(DPALogicError, match="beta must be a positive number"):
        lc.top1_softmax(4, beta=-1)
    with pytest.raises(DPALogicError, match="target weights must be finite numbers ≥ 0"):
        lc.listnet([1, -1])
    assert lc.plackett_luce(4, beta=0.5).defaults == {"beta": 0.5}
