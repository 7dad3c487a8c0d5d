"""The loss catalog: every published loss as a *program* built from structures and links — no hand-written torch.

Names follow TRL where TRL has the loss (``dpo`` is TRL's ``sigmoid``). Hyperparameters keep TRL's names and
defaults (``beta``, ``label_smoothing``, ``discopop_tau``, SimPO's ``gamma``); ``alpha`` weighs the auxiliary NLL
term as in TRL's and Liger's CPO, so ``alpha=0`` leaves the preference term alone.

TPO (Triple Preference Optimization) is a program over three answers, ``y1`` gold, ``y2`` preferred, ``y3``
rejected: a reference-free preference of y2 over y3 plus ``tpo_alpha`` times the NLL of the gold answer y1, with
TRL's TPOConfig names and defaults (``beta=0.01``, ``tpo_alpha``, TPO-L's margin ``tpo_l_gamma``). K-answer rows
sorted best first train it as they are.

Auxiliary NLL terms are the CE structure ``M(yw)`` under the logistic link (``−log σ(log(p/(1−p))) = −log p``),
length-normalized: the mean token NLL of the chosen answer, per pair. (TRL and Liger average tokens over the whole
batch instead; the two agree when chosen answers have equal lengths.)
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import sympy

from dpalogic.errors import unknown
from dpalogic.language.syntax import parse_formula
from dpalogic.logic.structure import Structure
from dpalogic.semantics.program import OutsideFragment, Program, Term

beta, gamma, alpha = sympy.symbols("beta gamma alpha")
ls, tau = sympy.symbols("label_smoothing discopop_tau")
tpo_alpha, tpo_l_gamma = sympy.symbols("tpo_alpha tpo_l_gamma")


def sides(top: str, bottom: str) -> Structure:
    return Structure.from_sides(parse_formula(top), parse_formula(bottom))


@dataclass(frozen=True)
class Entry:
    name: str
    program: Program
    title: str
    citation: str
    verified_by: str
    aliases: tuple[str, ...] = ()
    trl_name: str | None = None


@lru_cache(maxsize=1)
def _structures() -> dict[str, Structure]:
    return {
        "dpo": sides("M(yw) & Ref(yl)", "M(yl) & Ref(yw)"),
        "cpo": sides("M(yw)", "M(yl)"),
        "ce": Structure.parse("M(yw)"),
        "orpo": sides("M(yw) & ~M(yl)", "M(yl) & ~M(yw)"),
        "chosen": sides("M(yw)", "Ref(yw)"),  # log ρ = log πθ(yw)/πref(yw)
        "rejected": sides("M(yl)", "Ref(yl)"),  # log ρ = log πθ(yl)/πref(yl)
        "ceunl": Structure.parse("M(yw) & ~M(yl)"),
        "cunl": Structure.parse("(~M(yl), M(yw) | M(yl))"),
        "ccpo": Structure.parse("(M(yl) -> M(yw), M(yw) | M(yl))"),
        "uncpo": Structure.parse("M(yl) -> M(yw)"),
        "tpo": sides("M(y2)", "M(y3)"),  # TPO's preferred y2 over rejected y3 (y1 is the gold answer)
        "gold": Structure.parse("M(y1)"),
        "modified_dpo": sides("M(yw) & ~M(yl) & Ref(yl)", "M(yl) & ~M(yw) & Ref(yw)"),
    }


def _nll() -> Term:
    return Term(_structures()["ce"], "logistic", coef=alpha, normalized=True, role="nll")


def _tpo(name: str, terms: list[Term], **hp: float) -> Program:
    """A TPO variant: its preference terms on (y2, y3), then ``tpo_alpha`` · the gold answer's mean token NLL."""
    gold = Term(_structures()["gold"], "logistic", coef=tpo_alpha, normalized=True, role="nll")
    return _program(name, [*terms, gold], beta=0.01, **hp, tpo_alpha=1.0)


def _smoothed(s: Structure, scale, shift=0, normalized: bool = False) -> list[Term]:
    """Conservative (label-smoothed) logistic: (1−ε)·(−log σ(z)) + ε·(−log σ(−z)); −z is the reversed structure."""
    return [
        Term(s, "logistic", coef=1 - ls, scale=scale, shift=shift, normalized=normalized),
        Term(s.reversed(), "logistic", coef=ls, scale=scale, shift=-shift, normalized=normalized, role="smoothing"),
    ]


def _each_answer(link: str, **kw) -> list[Term]:
    """Each answer scored on its own, with one link: the chosen one up, the rejected one down (BCO, SPPO, APO-zero)."""
    S = _structures()
    return [Term(S["chosen"], link, **kw), Term(S["rejected"].reversed(), link, **kw)]


def _program(name: str, terms: list[Term], **hp: float) -> Program:
    return Program(tuple(terms), tuple(hp.items()), name)


# Longer than 80 lines on purpose: this is the catalog's data table, one Entry (program, paper, checks, TRL/Liger
# names) per loss in one list, so it reads and is reviewed as a table; splitting it would only scatter the rows.
@lru_cache(maxsize=1)
def entries() -> dict[str, Entry]:
    S = _structures()
    dpo, cpo, ce = S["dpo"], S["cpo"], S["ce"]
    chosen, rejected = S["chosen"], S["rejected"]
    half = sympy.Rational(1, 2)
    E: list[Entry] = [
        Entry("dpo", _program("dpo", [Term(dpo, "logistic", scale=beta)], beta=0.1),
              "Direct Preference Optimization", "Rafailov et al. 2023, arXiv:2305.18290",
              "Liger DPO 'sigmoid' (values, gradients), brute-force WMC", ("sigmoid",), "sigmoid"),
        Entry("ipo", _program("ipo", [Term(dpo, "squared", scale=1, shift=1 / (2 * beta), normalized=True)], beta=0.1),
              "Identity Preference Optimization", "Azar et al. 2023, arXiv:2310.12036",
              "TRL's documented equation (length-normalized log-ratios)", (), "ipo"),
        Entry("hinge", _program("hinge", [Term(dpo, "hinge", scale=beta, link_params=(("margin", 1),))], beta=0.1),
              "Hinge loss on the DPO log-ratio (SLiC-style)", "Zhao et al. 2023, arXiv:2305.10425",
              "Liger DPO 'hinge'", (), "hinge"),
        Entry("sigmoid_norm", _program("sigmoid_norm", [Term(dpo, "logistic", scale=beta, normalized=True)], beta=0.1),
              "DPO on length-normalized log-ratios", "TRL DPOTrainer loss_type='sigmoid_norm'",
              "TRL's documented equation", (), "sigmoid_norm"),
        Entry("robust", _program("robust", [
                  Term(dpo, "logistic", coef=(1 - ls) / (1 - 2 * ls), scale=beta),
                  Term(dpo.reversed(), "logistic", coef=-ls / (1 - 2 * ls), scale=beta, role="smoothing")],
                  beta=0.1, label_smoothing=0.0),
              "Robust DPO (unbiased under flipped labels)", "Chowdhury et al. 2024, arXiv:2403.00409",
              "Liger DPO 'robust'", (), "robust"),
        Entry("exo_pair", _program("exo_pair", [
                  Term(dpo, "exo", scale=beta, link_params=(("epsilon", ls),))], beta=0.1, label_smoothing=1e-3),
              "EXact Optimization (pairwise)", "Ji et al. 2024, arXiv:2402.00856",
              "Liger DPO 'exo_pair'", (), "exo_pair"),
        Entry("nca_pair", _program("nca_pair", [
                  Term(chosen, "logistic", scale=beta),
                  Term(chosen.reversed(), "logistic", coef=half, scale=beta),
                  Term(rejected.reversed(), "logistic", coef=half, scale=beta)], beta=0.1),
              "Noise Contrastive Alignment (pairwise)", "Chen et al. 2024, arXiv:2402.05369",
              "Liger DPO 'nca_pair'", (), "nca_pair"),
        Entry("bco_pair", _program("bco_pair", _each_answer("logistic", scale=beta), beta=0.1),
              "Binary Classifier Optimization (pairwise, no reward shift)", "Jung et al. 2024, arXiv:2404.04656",
              "Liger DPO 'bco_pair'", (), "bco_pair"),
        Entry("sppo_hard", _program("sppo_hard", _each_answer("squared", scale=1, shift=half / beta), beta=0.1),
              "Self-Play Preference Optimization (hard labels)", "Wu et al. 2024, arXiv:2405.00675",
              "Liger DPO 'sppo_hard'", (), "sppo_hard"),
        Entry("apo_zero", _program("apo_zero", _each_answer("sigmoid", scale=beta), beta=0.1),
              "Anchored Preference Optimization (zero)", "D'Oosterlinck et al. 2024, arXiv:2408.06266",
              "Liger DPO 'apo_zero'", (), "apo_zero"),
        Entry("apo_down", _program("apo_down", [
                  Term(chosen.reversed(), "sigmoid", scale=beta), Term(dpo, "sigmoid", scale=beta)], beta=0.1),
              "Anchored Preference Optimization (down)", "D'Oosterlinck et al. 2024, arXiv:2408.06266",
              "Liger DPO 'apo_down'", (), "apo_down"),
        Entry("discopop", _program("discopop", [
                  Term(dpo, "discopop", scale=beta, link_params=(("tau", tau),))], beta=0.1, discopop_tau=0.05),
              "Discovered Preference Optimization (log-ratio modulated)", "Lu et al. 2024, arXiv:2406.08414",
              "Liger DPO 'discopop'", (), "discopop"),
        Entry("cpo", _program("cpo", [*_smoothed(cpo, beta), _nll()], beta=0.1, label_smoothing=0.0, alpha=1.0),
              "Contrastive Preference Optimization", "Xu et al. 2024, arXiv:2401.08417",
              "TRL cpo_loss 'sigmoid', Liger CPO", (), "sigmoid (CPOTrainer)"),
        Entry("slic", _program("slic", [
                  Term(cpo, "hinge", scale=beta, link_params=(("margin", 1),)), _nll()], beta=0.1, alpha=1.0),
              "Sequence Likelihood Calibration (SLiC-HF)", "Zhao et al. 2023, arXiv:2305.10425",
              "TRL cpo_loss 'hinge'", (), "hinge (CPOTrainer)"),
        Entry("simpo", _program("simpo", _smoothed(cpo, beta, gamma, normalized=True),
                                beta=0.1, gamma=0.5, label_smoothing=0.0),
              "Simple Preference Optimization", "Meng et al. 2024, arXiv:2405.14734",
              "TRL cpo_loss 'simpo', Liger SimPO", (), "simpo (CPOTrainer)"),
        Entry("orpo", _program("orpo", [
                  Term(S["orpo"], "logistic", coef=beta, normalized=True), _nll()], beta=0.1, alpha=1.0),
              "Odds Ratio Preference Optimization", "Hong et al. 2024, arXiv:2403.07691",
              "TRL odds_ratio_loss, Liger ORPO, brute-force WMC", (), "ORPOTrainer"),
        Entry("rrhf", _program("rrhf", [
                  Term(cpo, "hinge", scale=1, normalized=True, link_params=(("margin", 0),)), _nll()], alpha=1.0),
              "Rank Responses to align with Human Feedback (pairwise)", "Yuan et al. 2023, arXiv:2304.05302",
              "paper equation (ranking hinge on length-normalized log-probs + NLL)"),
        Entry("ce", _program("ce", [Term(ce, "logistic")]),
              "Cross-entropy on the chosen answer (sequence level)", "Richardson et al. 2025, arXiv:2412.17696",
              "brute-force WMC"),
        Entry("sft", _program("sft", [Term(ce, "logistic", normalized=True)]),
              "Supervised fine-tuning: mean token NLL of the chosen answer", "standard",
              "brute-force WMC (length-normalized)"),
        Entry("ceunl", _program("ceunl", [Term(S["ceunl"], "logistic")]),
              "Cross-entropy with unlikelihood", "Welleck et al. 2019, arXiv:1908.04319",
              "brute-force WMC"),
        Entry("cunl", _program("cunl", [Term(S["cunl"], "logistic", scale=beta)], beta=1.0),
              "Conditioned unlikelihood (paper)", "Richardson et al. 2025, arXiv:2412.17696", "brute-force WMC"),
        Entry("ccpo", _program("ccpo", [Term(S["ccpo"], "logistic", scale=beta)], beta=1.0),
              "Conditioned CPO (paper)", "Richardson et al. 2025, arXiv:2412.17696", "brute-force WMC"),
        Entry("uncpo", _program("uncpo", [Term(S["uncpo"], "logistic", scale=beta)], beta=1.0),
              "Unconditioned CPO (paper)", "Richardson et al. 2025, arXiv:2412.17696", "brute-force WMC"),
        Entry("modified_dpo", _program("modified_dpo", [Term(S["modified_dpo"], "logistic", scale=beta)], beta=0.1),
              "Modified DPO: ORPO's structure with a reference model (paper)",
              "Richardson et al. 2025, arXiv:2412.17696", "brute-force WMC", ("mdpo",)),
        Entry("tpo", _tpo("tpo", _smoothed(S["tpo"], beta), label_smoothing=0.0),
              "Triple Preference Optimization (y1 gold, y2 preferred, y3 rejected)",
              "Saeidi et al. 2024, arXiv:2405.16681", "TRL TPOTrainer 'sigmoid'", (), "sigmoid (TPOTrainer)"),
        Entry("tpo_hinge", _tpo("tpo_hinge", [Term(S["tpo"], "hinge", scale=beta, link_params=(("margin", 1),))]),
              "TPO with SLiC's hinge (y1 gold, y2 preferred, y3 rejected)", "Saeidi et al. 2024, arXiv:2405.16681",
              "TRL TPOTrainer 'hinge'", (), "hinge (TPOTrainer)"),
        Entry("tpo_ipo", _tpo("tpo_ipo", [Term(S["tpo"], "squared", shift=1 / (2 * beta), normalized=True)]),
              "TPO with IPO's squared loss (y1 gold, y2 preferred, y3 rejected)",
              "Saeidi et al. 2024, arXiv:2405.16681", "TRL TPOTrainer 'ipo'", (), "ipo (TPOTrainer)"),
        Entry("tpo_l", _tpo("tpo_l", _smoothed(S["tpo"], beta, tpo_l_gamma, normalized=True),
                            label_smoothing=0.0, tpo_l_gamma=0.5),
              "TPO-L: length-normalized TPO with a target margin (y1 gold, y2 preferred, y3 rejected)",
              "Saeidi et al. 2024, arXiv:2405.16681", "TRL TPOTrainer 'tpo-l'", (), "tpo-l (TPOTrainer)"),
    ]  # fmt: skip
    return {e.name: e for e in E}


OUTSIDE: dict[str, OutsideFragment] = {
    o.name: o
    for o in [
        OutsideFragment("aot", "AOT sorts the log-ratios across the batch before pairing them: the loss of one "
                        "example depends on the others, so it is not a function of one pair's log-probabilities",
                        "Melnyk et al. 2024, arXiv:2406.05882", ("aot_pair", "aot_unpaired")),
        OutsideFragment("kto", "KTO compares each answer with a batch-level reference point (a KL estimate over "
                        "mismatched pairs) and is unpaired: no per-pair ratio ρ of atom probabilities",
                        "Ethayarajh et al. 2024, arXiv:2402.01306"),
        OutsideFragment("alphapo", "AlphaPO's reward (1 − p^(−α))/α is not the logarithm of a ratio of "
                        "polynomials in the probabilities, so it is not β·log ρ for any structure",
                        "Gupta et al. 2025, arXiv:2501.03884"),
        OutsideFragment("dpop", "DPOP subtracts λ·max(0, log πref(yw)/πθ(yw)) inside the ratio: a piecewise "
                        "penalty, not the log of a polynomial ratio (each piece is: DPO, or a ratio with a "
                        "non-integer power πθ(yw)^(1+λ))", "Pal et al. 2024, arXiv:2402.13228"),
        OutsideFragment("bco", "BCO (unpaired) shifts rewards by a running mean δ over past batches: a batch "
                        "statistic, not a function of one pair (its pairwise form without δ is 'bco_pair')",
                        "Jung et al. 2024, arXiv:2404.04656"),
        OutsideFragment("f_dpo", "f-divergence DPO (forward KL, JS, α) replaces log(π/πref) by f'(π/πref), "
                        "e.g. 1 − πref/π: not a log-ratio of WMCs", "Wang et al. 2023, arXiv:2309.16240",
                        ("f_dpo_reverse_kl", "f_dpo_forward_kl", "f_dpo_js_divergence", "f_dpo_alpha_divergence")),
    ]
}  # fmt: skip


# The losses above that train anyway, as plain torch with no structure (dpalogic.runtime.unstructured): trainable
# name → the OUTSIDE entry saying why it has none. Kept here, torch-free, so `show` can say so without importing torch.
UNSTRUCTURED: dict[str, str] = {
    "kto": "kto", "bco": "bco", "dpop": "dpop", "alphapo": "alphapo",
    "aot": "aot", "aot_pair": "aot", "aot_unpaired": "aot",
    "f_dpo": "f_dpo", "f_dpo_reverse_kl": "f_dpo", "f_dpo_forward_kl": "f_dpo", "f_dpo_js_divergence": "f_dpo",
    "f_dpo_alpha_divergence": "f_dpo",
}  # fmt: skip


def unstructured_name(name: str) -> str | None:
    """``name`` normalized, if it is a loss trainable without a structure (KTO, BCO, f-DPO, …), else None."""
    key = name.strip().lower().replace("-", "_")
    return key if key in UNSTRUCTURED else None


def names() -> list[str]:
    return list(entries())


def pair_names() -> list[str]:
    """The catalog losses over one pair ``yw``, ``yl`` (every one but TPO's, which are over ``y1 … y3``)."""
    return [n for n, e in entries().items() if all(a.answer in ("yw", "yl") for a in e.program.atoms)]


def _alias_map() -> dict[str, str]:
    out = {}
    for e in entries().values():
        out[e.name] = e.name
        for a in e.aliases:
            out[a] = e.name
    return out


def lookup(name: str) -> Entry:
    """A catalog entry by name or alias; unknown names suggest the closest, outside-fragment names explain why."""
    key = name.strip().lower().replace("-", "_")
    amap = _alias_map()
    if key in amap:
        return entries()[amap[key]]
    o = outside(name)
    if o is not None:
        from dpalogic.errors import DPALogicError

        trainable = [n for n, o2 in UNSTRUCTURED.items() if o2 == o.name]
        hint = f"; it trains without a structure (--loss {trainable[0]})" if trainable else ""
        raise DPALogicError(
            f"{name!r} is a known loss outside dpalogic's program fragment: {o.reason} ({o.citation}){hint}"
        )
    raise unknown("loss name", name, list(amap) + list(OUTSIDE))


def outside(name: str) -> OutsideFragment | None:
    """The known loss outside the fragment called ``name`` (or one of its aliases), else None."""
    key = name.strip().lower().replace("-", "_")
    return next((o for o in OUTSIDE.values() if key == o.name or key in o.aliases), None)


def resolve(spec) -> Program:
    """A catalog name, structure text, :class:`Structure` or :class:`Program` → a :class:`Program`."""
    from dpalogic.semantics.program import single_structure_program

    if isinstance(spec, Program):
        return spec
    from dpalogic.logic.listwise import ListStructure, parse_any

    if isinstance(spec, (Structure, ListStructure)):
        return single_structure_program(spec.check())
    if not isinstance(spec, str):
        from dpalogic.errors import DPALogicError

        raise DPALogicError(f"expected a loss name, structure text, Structure or Program, got {type(spec).__name__}")
    text = spec.strip()
    constants = {"true", "True", "false", "False"}
    if text and all(c.isalnum() or c in "_-" for c in text) and text not in constants:
        return lookup(text).program
    return single_structure_program(parse_any(text).check())


@lru_cache(maxsize=16)
def catalog_index(atoms: tuple) -> tuple[dict, dict]:
    """Catalog single structures over (a subset of) ``atoms``, lifted to them: by ``(✓, ✗)`` and by loss key."""
    from dpalogic.semantics.loss_keys import loss_key

    by_sides: dict[tuple[int, int], list[str]] = {}
    by_key: dict[tuple, list[str]] = {}
    for name, e in entries().items():
        s = e.program.structure
        if s is None or not set(s.atoms) <= set(atoms):
            continue
        s = s.over(atoms)
        by_sides.setdefault((s.top, s.bottom), []).append(name)
        by_key.setdefault(loss_key(s), []).append(name)
    return by_sides, by_key


def catalog_matches(s: Structure) -> tuple[list[str], list[str]]:
    """Catalog names whose (single) structure is equivalent to ``s``, and those with the same loss function.

    Both are looked up over the union of ``s``'s and the catalog's atoms: lifting structures to more atoms keeps
    equal sides equal and equal ratios equal, so one index answers every query.
    """
    if not isinstance(s, Structure):  # OBDD sides (more than 12 atoms): no catalog loss has that many
        return [], []
    from dpalogic.logic.structure import common_atoms
    from dpalogic.semantics.loss_keys import loss_key

    singles = [e.program.structure for e in entries().values() if e.program.structure is not None]
    catalog_atoms = {a for t in singles for a in t.atoms}
    if not set(s.atoms) <= catalog_atoms:  # an atom no catalog loss has (y3, …): nothing can match
        return [], []
    atoms = common_atoms(s, *singles)
    lifted = s.over(atoms)
    by_sides, by_key = catalog_index(atoms)
    return list(by_sides.get((lifted.top, lifted.bottom), [])), list(by_key.get(loss_key(lifted), []))
