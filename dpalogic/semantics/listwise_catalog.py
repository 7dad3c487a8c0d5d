"""Listwise losses as programs of K-answer structures: the known ones derived, and new ones the logic adds (§8).

Every constructor returns a :class:`~dpalogic.semantics.program.Program` over answers ``y1 … yK`` (``y1`` ranked
first), trainable with ``PreferenceLoss(program)(logps=[B, K], ref_logps=[B, K])``. Scores are log-odds
``s_j = log(p_j / (1 − p_j))`` (odds ``o_j``), because a softmax over log-odds is exactly ExactlyOne conditioning:

* :func:`top1_softmax`: ``(M(y1), ExactlyOne(M(y1..yK)))``, ``ρ = o_1 / e_1(o_2 … o_K)`` — the top-1 softmax
  cross-entropy of ListNet (one-hot target) and of LiPO's softmax objective.
* :func:`listnet`: ``Σ_j t_j · (M(yj), ExactlyOne(M(y1..yK)))`` — ListNet's cross-entropy with target weights t_j.
* :func:`plackett_luce`: ``Σ_{i<K} (M(yi), ExactlyOne(M(yi..yK)))`` — the Plackett–Luce negative log-likelihood of
  the ranking y1 ≻ … ≻ yK, one top-1 structure per position over the answers not yet placed (K − 1 terms).
* :func:`pairwise_dpo`: ``Σ_{i<j} DPO(yi ≻ yj)`` — K(K − 1)/2 DPO structures ``(M(yi) ∧ Ref(yj), M(yj) ∧ Ref(yi))``.

What the logic adds — conditionings a hand-written softmax has no name for, each with a closed form in the
elementary symmetric polynomials ``e_c`` of the other answers' odds:

* :func:`in_top_k`: ``(M(y1), Exactly(k, M(y1..yK)))`` — y1 is among the k valid answers:
  ``ρ = o_1·e_{k−1}(o_{−1}) / e_k(o_{−1})``, the conditional-Bernoulli probability that y1 is in a k-set.
* :func:`with_abstention`: ``(M(y1), AtMost(k, M(y1..yK)))`` — y1 valid given at most k valid:
  ``ρ = o_1·Σ_{c<k} e_c(o_{−1}) / Σ_{c≤k} e_c(o_{−1})``; at k = 1 a softmax with a "none is valid" option of
  log-odds 0, so no answer is forced up when every answer is bad.
* :func:`top_k_set`: ``(Ranked(M(y1..yK)), Exactly(k, M(y1..yK)))`` — the k valid answers are exactly y1 … yk:
  ``−log σ(log ρ) = −log(Π_{i≤k} o_i / e_k(o))``, the likelihood of the top-k *set*, order inside it free.
* :func:`ranked_consistency`: ``Ranked(M(y1..yK))`` — the valid answers form a prefix of the ranking:
  ``−log Σ_{j=0}^{K} Π_{i≤j} p_i Π_{i>j} (1 − p_i)``.
"""

from __future__ import annotations

from collections.abc import Sequence

import sympy

from dpalogic.errors import DPALogicError
from dpalogic.semantics.program import Program, Term

BETA = sympy.Symbol("beta")  # every term's scale; its default is each constructor's beta=


def _answers(first: int, last: int) -> str:
    return f"M(y{first})" if first == last else f"M(y{first}..y{last})"


def _structure(text: str):
    from dpalogic.logic.listwise import parse_any

    return parse_any(text).check()


def _program(name: str, terms: list[Term], beta: float) -> Program:
    if not (isinstance(beta, (int, float)) and beta > 0):  # β ≤ 0 would reward the answers ranked lower
        raise DPALogicError(f"{name}: beta must be a positive number, or the loss rewards the lower-ranked answers")
    return Program(tuple(terms), (("beta", float(beta)),), name)


def top1_softmax(K: int, beta: float = 1.0) -> Program:
    """``−log softmax(s)_1`` over the log-odds: one term ``(M(y1), ExactlyOne(M(y1..yK)))``."""
    _k(K)
    return _program("top1_softmax", [Term(_structure(f"(M(y1), ExactlyOne({_answers(1, K)}))"), scale=BETA)], beta)


def listnet(weights: Sequence[float], beta: float = 1.0) -> Program:
    """ListNet's ``Σ_j t_j · (−log softmax(s)_j)``: one top-1 structure per answer with a nonzero target weight."""
    K = len(weights)
    _k(K)
    numbers = [sympy.sympify(t) for t in weights]
    if any(t.is_number and not (t.is_finite and t >= 0) for t in numbers):  # a symbol is the caller's to choose
        raise DPALogicError(f"listnet's target weights must be finite numbers ≥ 0, got {list(weights)}")
    terms = [
        Term(_structure(f"(M(y{j}), ExactlyOne({_answers(1, K)}))"), coef=sympy.nsimplify(t), scale=BETA)
        for j, t in enumerate(weights, 1)
        if t != 0
    ]
    if not terms:
        raise DPALogicError("listnet needs a nonzero target weight")
    return _program("listnet", terms, beta)


def plackett_luce(K: int, beta: float = 1.0) -> Program:
    """The Plackett–Luce NLL of y1 ≻ … ≻ yK over log-odds: ``Σ_{i<K} (M(yi), ExactlyOne(M(yi..yK)))``."""
    _k(K)
    terms = [Term(_structure(f"(M(y{i}), ExactlyOne({_answers(i, K)}))"), scale=BETA) for i in range(1, K)]
    return _program("plackett_luce", terms, beta)


def pairwise_dpo(K: int, beta: float = 0.1) -> Program:
    """DPO on every pair ``yi ≻ yj``, ``i < j``: K(K − 1)/2 terms (TRL's β default)."""
    from dpalogic.language.syntax import parse_formula
    from dpalogic.logic.structure import Structure

    _k(K)
    terms = [
        Term(
            Structure.from_sides(parse_formula(f"M(y{i}) & Ref(y{j})"), parse_formula(f"M(y{j}) & Ref(y{i})")),
            scale=BETA,
        )
        for i in range(1, K + 1)
        for j in range(i + 1, K + 1)
    ]
    return _program("pairwise_dpo", terms, beta)


def in_top_k(K: int, k: int, beta: float = 1.0) -> Program:
    """y1 is among the k valid answers: ``(M(y1), Exactly(k, M(y1..yK)))`` (k = 1 is :func:`top1_softmax`)."""
    _k(K, k)
    return _program("in_top_k", [Term(_structure(f"(M(y1), Exactly({k}, {_answers(1, K)}))"), scale=BETA)], beta)


def with_abstention(K: int, k: int = 1, beta: float = 1.0) -> Program:
    """y1 is valid given at most k valid answers: ``(M(y1), AtMost(k, M(y1..yK)))``."""
    _k(K, k)
    return _program("with_abstention", [Term(_structure(f"(M(y1), AtMost({k}, {_answers(1, K)}))"), scale=BETA)], beta)


def top_k_set(K: int, k: int, beta: float = 1.0) -> Program:
    """The valid answers are exactly y1 … yk: ``(Ranked(M(y1..yK)), Exactly(k, M(y1..yK)))``."""
    _k(K, k)
    text = f"(Ranked({_answers(1, K)}), Exactly({k}, {_answers(1, K)}))"
    return _program("top_k_set", [Term(_structure(text), scale=BETA)], beta)


def ranked_consistency(K: int, beta: float = 1.0) -> Program:
    """The valid answers form a prefix of the ranking y1 ≻ … ≻ yK: ``Ranked(M(y1..yK))``."""
    _k(K)
    return _program("ranked_consistency", [Term(_structure(f"Ranked({_answers(1, K)})"), scale=BETA)], beta)


MAX_K = 256


def _k(K: int, k: int | None = None) -> None:
    if not isinstance(K, int) or not 2 <= K <= MAX_K:
        raise DPALogicError(f"K must be an integer from 2 to {MAX_K} (answers y1 … yK), got {K!r}")
    if k is not None and (not isinstance(k, int) or not 1 <= k < K):
        raise DPALogicError(f"k must be an integer from 1 to K − 1 = {K - 1}, got {k!r}")
