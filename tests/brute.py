"""An independent reference for the semantics: enumerate every world, evaluate formulas with SymPy's own ``subs``.

Nothing here uses dpalogic's truth tables, plans or torch code; it follows docs/semantics.md §1–§2 literally:
``WMC(φ) = Σ_{worlds ⊨ φ} Π p_i^{w_i} (1 − p_i)^{1 − w_i}``, ``✓ = P ∧ P_C``, ``✗ = (¬P ∧ P_C) ∨ P_A``,
``loss = −log(WMC(✓) / (WMC(✓) + WMC(✗)))``.
"""

from __future__ import annotations

import itertools
import math

import sympy
from sympy.logic.boolalg import And, Not, Or


def wmc(formula, probs: dict[str, float]) -> float:
    names = sorted(probs)
    syms = [sympy.Symbol(n) for n in names]
    total = 0.0
    for values in itertools.product([False, True], repeat=len(names)):
        world = dict(zip(syms, values))
        if bool(formula.subs(world)):
            w = 1.0
            for n, v in zip(names, values):
                w *= probs[n] if v else 1.0 - probs[n]
            total += w
    return total


def sides(core, given=sympy.true, additional=sympy.false):
    return And(core, given), Or(And(Not(core), given), additional)


def semantic_loss(core, given, additional, probs: dict[str, float], beta: float = 1.0, gamma: float = 0.0) -> float:
    """``−log σ(β·log ρ − γ)`` by enumeration of worlds."""
    top, bottom = sides(core, given, additional)
    z = beta * (math.log(wmc(top, probs)) - math.log(wmc(bottom, probs))) - gamma
    return math.log1p(math.exp(-z)) if z > -30 else -z + math.log1p(math.exp(z))
