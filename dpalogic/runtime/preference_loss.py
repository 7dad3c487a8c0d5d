"""PreferenceLoss: a loss program as a ``torch.nn.Module`` that runs its compiled module (docs/semantics.md §6).

There is one execution path: :mod:`dpalogic.compile.codegen` compiles the program once into a module with a fused
forward+backward Triton kernel and its torch twin; :func:`dpalogic.runtime.backend.use_triton` picks the kernel for CUDA
tensors and the twin elsewhere. Every side's ``log WMC`` comes from its circuit (``log p``, ``log1mexp(log p)``,
sums, ``logaddexp`` only where a side is a genuine sum), so values and gradients are finite for log-probabilities
anywhere in ``[-1e4, 0]``; float32, bfloat16 and float16 inputs are computed in float32 (float64 stays float64).
"""

from __future__ import annotations

import os
import re
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, replace

import sympy
import torch

from dpalogic.compile.codegen import length_answers, module_for
from dpalogic.errors import DPALogicError, NoPolicyAtomWarning
from dpalogic.language.syntax import Atom
from dpalogic.logic.listwise import ListStructure
from dpalogic.runtime.backend import BACKENDS, backend_rule, use_triton
from dpalogic.runtime.checks import check_log_probs
from dpalogic.runtime.lifted_eval import LOG_FLOOR
from dpalogic.runtime.listwise import ListwiseProgram, as_mapping, matrix_columns, reduce
from dpalogic.semantics.program import Program, Term, with_link

_PAIR_ATOMS = ("M(yw)", "M(yl)", "Ref(yw)", "Ref(yl)")  # forward's positional log-probs, in order
_ATOM_NAME = re.compile(r"(M|Ref)\((yw|yl|y[1-9][0-9]*)\)")
# [B, K] inputs of a truth-table structure run the vectorized K-answer evaluator from this many atoms on (torch path):
# below it the compiled twin is as fast or faster (benchmarks/listwise.py, K = 4 vs 8 vs 12 on the CPU)
LIST_EVALUATOR_ATOMS = 8


@dataclass(frozen=True)
class BoundTerm:
    """A term with its hyperparameters substituted (plain floats), after the checks that need their values."""

    atoms: tuple[Atom, ...]
    link: str
    coef: float
    scale: float
    shift: float
    params: dict
    normalized: bool


def bind_term(term: Term, values: Mapping[str, float]) -> BoundTerm:
    subs = {sympy.Symbol(k): v for k, v in values.items()}

    def num(e: sympy.Expr, what: str) -> float:
        v = e.subs(subs)
        if v.free_symbols:
            raise DPALogicError(f"hyperparameter(s) {sorted(s.name for s in v.free_symbols)} have no value")
        if not (v.is_real and v.is_finite):  # e.g. IPO's 1/(2β) at β = 0, robust's 1/(1 − 2ε) at ε = 1/2
            hp = ", ".join(f"{k}={x:g}" for k, x in values.items())
            if isinstance(e, sympy.Symbol):  # "the link parameter margin", "the scale β (beta)"
                named = what if e.name in what else f"{what} ({e.name})"
            else:
                named = f"{what} {e}"
            raise DPALogicError(f"with {hp} the {named} = {v} is not a finite number: choose other hyperparameters")
        return float(v)

    params = {k: num(v, f"link parameter {k}") for k, v in term.link_params}
    if term.link == "exo" and not 0.0 < params.get("epsilon", 0.5) < 1.0:
        raise DPALogicError(f"EXO's ε (label_smoothing) must lie strictly between 0 and 1, got {params['epsilon']:g}")
    if term.link == "discopop" and not params.get("tau", 1.0) > 0.0:
        raise DPALogicError(f"DiscoPOP's τ (discopop_tau) must be positive, got {params['tau']:g}")
    s = term.structure
    s.check()
    return BoundTerm(
        s.atoms,
        term.link,
        num(term.coef, "coefficient"),
        num(term.scale, "scale β"),
        num(term.shift, "shift γ"),
        params,
        term.normalized,
    )


def _answer_atoms(pred: str) -> dict[str, str]:
    return {"yw": f"{pred}(yw)", "yl": f"{pred}(yl)"}


class PreferenceLoss(torch.nn.Module):
    """A preference loss compiled from a catalog name, structure text, :class:`Structure` or :class:`Program`.

    >>> loss_fn = PreferenceLoss("dpo", beta=0.1)
    >>> loss = loss_fn(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps)  # doctest: +SKIP

    For structure text the program is one logistic term ``−log σ(β·log ρ − γ)`` with ``beta=1.0``, ``gamma=0.0``.
    ``link="<expression in z>"`` replaces the preference terms' link by one of the user's own (``z = β·log ρ − γ``;
    its other names are hyperparameters: ``link="softplus(margin - z)", margin=0.5``).

    Names of losses outside the fragment that train anyway (``kto``, ``bco``, ``f_dpo``, ``dpop``, ``alphapo``,
    ``aot``, …) build a plain torch module with no structure instead (:mod:`dpalogic.runtime.unstructured`).

    The loss runs the program's compiled module (:mod:`dpalogic.compile.codegen`): ``backend="torch"`` its torch twin,
    ``"triton"`` its fused forward+backward kernel (CUDA tensors, or any tensors under ``TRITON_INTERPRET=1``), and
    ``"auto"`` (default) Triton for CUDA tensors when triton is installed and the twin otherwise.

    Inputs are per-sequence *summed* log-probabilities ``[B]``; ``chosen_lengths``/``rejected_lengths`` (token
    counts) are needed by length-normalized losses (SimPO, IPO, ORPO, the NLL terms). Formulas over answers
    ``y1 … yK`` take ``logps=`` a ``[B, K]`` tensor (column j is answer y(j+1), y1 ranked first), ``ref_logps=`` the
    reference's ``[B, K]`` and ``lengths=`` ``[B, K]`` token counts — or the same keyed by name:
    ``logps={"M(y1)": …, "Ref(y1)": …}``, ``lengths={"y1": …}``. ``margin=`` ``[B]`` shifts every preference term's
    ``z`` per example (``z − margin_i``; docs/semantics.md §3).

    >>> listwise = PreferenceLoss("(M(y1), ExactlyOne(M(y1..y4)))")  # a softmax over the answers' log-odds
    >>> loss = listwise(logps=logps)  # logps: [B, 4]  # doctest: +SKIP
    """

    def __new__(cls, spec=None, *args, **kwargs):
        # a loss outside the fragment that trains anyway (KTO, BCO, f-DPO, DPOP, AlphaPO, AOT) is a plain torch module
        # with no structure: the name builds that module instead (dpalogic.runtime.unstructured)
        if cls is PreferenceLoss and isinstance(spec, str):
            from dpalogic.semantics.catalog import unstructured_name

            if unstructured_name(spec) is not None:
                from dpalogic.runtime.unstructured_stats import make_unstructured

                # these always check their log-probs and have no K-answer terms to compile: the flags change nothing
                for flag in ("validate", "compile"):
                    if not isinstance(kwargs.pop(flag, False), bool):
                        raise DPALogicError(f"{flag} must be True or False")
                return make_unstructured(spec, *args, **kwargs)
        return super().__new__(cls)

    def __init__(
        self,
        spec,
        *,
        reduction: str = "mean",
        backend: str = "auto",
        link: str | None = None,
        validate: bool = True,
        compile: bool = False,
        **hyperparameters: float,
    ) -> None:
        super().__init__()
        from dpalogic.semantics.catalog import resolve

        if reduction not in ("mean", "sum", "none"):
            raise DPALogicError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
        if backend not in BACKENDS:
            raise DPALogicError(backend_rule(backend, False, False, False)[1])
        self.backend = backend
        # check every call's log-probs (≤ 0): one max per input, as torch.distributions' validate_args — off, a
        # training loop that has checked its first batches saves a pass over the inputs (a tenth of DPO's loss time)
        if not isinstance(validate, bool):
            raise DPALogicError(f"validate must be True or False, got {validate!r}")
        self.validate = validate
        # K-answer terms computed in one fused pass (ExactlyOne, AtMost(1), …) under torch.compile: the passes over
        # [B, K] fused into one loop (opt-in: compiling takes seconds, and needs a C++ compiler on the CPU). On the
        # CPU, one-against-the-rest terms (top-1 ExactlyOne, Plackett–Luce stages) keep their eager pass: faster
        if not isinstance(compile, bool):
            raise DPALogicError(f"compile must be True or False, got {compile!r}")
        self._compile = compile
        self._generated: dict = {}  # the compiled module (dpalogic.compile.codegen), per Triton mode, built on first use
        self.program: Program = resolve(spec)
        if link is not None:  # a link of the user's own, f(z) with z = β·log ρ − γ; its parameters are hyperparameters
            self.program = with_link(self.program, link, hyperparameters)
        self.hyperparameters = self.program.bind(**hyperparameters)
        self.reduction = reduction
        bound = [bind_term(t, self.hyperparameters) for t in self.program.terms]
        self.terms = [t for t in bound if t.coef != 0.0]  # e.g. label smoothing 0, alpha 0
        self.atoms = self.program.atoms
        # the program that runs: without the terms these hyperparameters switch off (they add exactly 0; ORPO with
        # alpha=0 need not evaluate its NLL term), and what per_pair passes its compiled module, worked out once
        kept = tuple(t for t, b in zip(self.program.terms, bound) if b.coef != 0.0)
        self._running = replace(self.program, terms=kept) if kept else self.program
        self._running_atoms = self._running.atoms
        self._running_names = [a.name for a in self._running_atoms]
        self._running_name_set = set(self._running_names)
        self._known = {a.name for a in self.atoms}
        # structures beyond truth tables (K answers, OBDD sides) run the vectorized listwise evaluator instead
        self._listwise = None
        self._kept_bound = (kept, [b for b in bound if b.coef != 0.0])
        self._list_evaluator = None  # [B, K] inputs of a truth-table structure on the torch path (built on first use)
        if any(isinstance(t.structure, ListStructure) for t in kept):
            if backend == "triton":
                raise DPALogicError(
                    "backend='triton': structures beyond 12 atoms run on the vectorized torch evaluator, which has no "
                    "Triton kernel; use backend='auto' or 'torch'"
                )
            self._listwise = ListwiseProgram(*self._kept_bound, compile=compile)
        self._length_answers = length_answers(self._running)
        self._needed_lengths = {a.answer for t in self.terms if t.normalized for a in t.atoms}
        # what a [B, K] input must match (named answers yw/yl; the last answer), worked out once: 64 atoms a call
        named = sorted({a.name for a in self._running_atoms if not a.answer[1:].isdigit()})
        self._list_width = (named, max((int(a.answer[1:]) for a in self._running_atoms if not named), default=None))
        self._uses_module = bool(self.terms and self._running_atoms and self._listwise is None)  # the generated module
        # the common call — forward's positional tensors, for a compiled loss over yw/yl — runs without name maps:
        # which positional arguments the module takes, in its order (None: every call takes the general path)
        self._positional = None
        order = {**{name: i for i, name in enumerate(_PAIR_ATOMS)}, "yw": 4, "yl": 5}
        wanted = self._running_names + list(self._length_answers)
        lengths_needed = all(a in self._needed_lengths for a in self._length_answers)
        if self._uses_module and lengths_needed:
            if all(n in order for n in wanted):
                self._positional = tuple(order[n] for n in wanted)
        if not any(a.pred == "M" for t in self.terms for a in t.atoms):
            # legal (a loss can be evaluated on reference log-probs), but a training run would learn nothing
            warnings.warn(
                f"{self.program.name or 'this loss'} mentions no policy atom M(…): its value does not depend on "
                "the policy, so it cannot train it",
                NoPolicyAtomWarning,
                stacklevel=2,
            )

    def extra_repr(self) -> str:
        hp = ", ".join(f"{k}={v:g}" for k, v in self.hyperparameters.items())
        flags = (", validate=False" if not self.validate else "") + (", compile=True" if self._compile else "")
        return f"{self.program.name or 'derived'}, {hp}, reduction={self.reduction!r}{flags}"

    @property
    def needs_reference(self) -> bool:
        return any(a.pred == "Ref" for t in self.terms for a in t.atoms)

    @property
    def needs_lengths(self) -> bool:
        return any(t.normalized for t in self.terms)

    def forward(
        self,
        chosen_logps: torch.Tensor | None = None,
        rejected_logps: torch.Tensor | None = None,
        ref_chosen_logps: torch.Tensor | None = None,
        ref_rejected_logps: torch.Tensor | None = None,
        chosen_lengths: torch.Tensor | None = None,
        rejected_lengths: torch.Tensor | None = None,
        *,
        logps: Mapping[str, torch.Tensor] | torch.Tensor | None = None,
        lengths: Mapping[str, torch.Tensor] | torch.Tensor | None = None,
        ref_logps: torch.Tensor | None = None,
        margin: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The loss, reduced as asked: from ``[B]`` chosen/rejected log-probs (and the reference's), from ``[B, K]``
        matrices (``logps=``, ``ref_logps=``, ``lengths=``), or from tensors keyed by atom and answer name."""
        for name, v in (("logps", logps), ("lengths", lengths)):
            if v is not None and not isinstance(v, torch.Tensor | Mapping):
                raise DPALogicError(
                    f"{name} must be a [B, K] tensor (column j is answer y(j+1)) or a mapping from "
                    f"{'atom names' if name == 'logps' else 'answers'} to [B] tensors, got {type(v).__name__}"
                )
        if isinstance(logps, torch.Tensor) or ref_logps is not None:  # K answers: [B, K] matrices
            pair_args = (chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps, chosen_lengths)
            if any(t is not None for t in (*pair_args, rejected_lengths)):
                raise DPALogicError(
                    "pass either [B, K] matrices (logps=, ref_logps=, lengths=) or the pair's [B] tensors, not both"
                )
            return self._list_loss(logps, ref_logps, lengths, margin, self.reduction)
        given = (chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps, chosen_lengths, rejected_lengths)
        if self._positional is not None and logps is None and lengths is None:
            args = [given[i] for i in self._positional]
            if all(a is not None for a in args):  # else the general path says what is missing
                self._check_tensors(
                    [(n, t) for n, t in zip(_PAIR_ATOMS, given[:4]) if t is not None],
                    [(n, t) for n, t in zip(("yw", "yl"), given[4:]) if t is not None],
                )
                if margin is not None:
                    self._check_margin(margin, args[0])
                if self.validate and len(self._positional) < sum(t is not None for t in given):
                    self._check_unused({n: t for n, t in zip(_PAIR_ATOMS, given[:4]) if t is not None})
                return self._apply_compiled(args, margin, self.reduction)
        atom_lp: dict[str, torch.Tensor] = dict(logps or {})
        for name, t in (
            ("M(yw)", chosen_logps),
            ("M(yl)", rejected_logps),
            ("Ref(yw)", ref_chosen_logps),
            ("Ref(yl)", ref_rejected_logps),
        ):
            if t is not None:
                atom_lp[name] = t
        ans_len: dict[str, torch.Tensor] = dict(lengths or {})
        if chosen_lengths is not None:
            ans_len["yw"] = chosen_lengths
        if rejected_lengths is not None:
            ans_len["yl"] = rejected_lengths
        return self._pair_loss(atom_lp, ans_len, margin, self.reduction)

    def per_pair(
        self,
        atom_lp: Mapping[str, torch.Tensor],
        ans_len: Mapping[str, torch.Tensor],
        *,
        margin: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The loss of every pair, ``[B]``, from log-probs keyed by atom name and lengths keyed by answer.

        Runs the program's compiled module: its Triton kernel on CUDA tensors, its torch twin elsewhere (the
        backend rule of :func:`dpalogic.runtime.backend.use_triton`). Gradients reach every log-prob input.
        ``margin [B]`` shifts each pair's link (docs/semantics.md, per-example margins): every preference term's
        ``z = β·log ρ − γ`` becomes ``z − margin_i``, a smoothing term's (the preference reversed, ``−z``)
        ``−z + margin_i``, NLL terms are unchanged. Margins are data: no gradient flows to them.
        """
        return self._pair_loss(atom_lp, ans_len, margin, "none")

    def _pair_loss(
        self,
        atom_lp: Mapping[str, torch.Tensor],
        ans_len: Mapping[str, torch.Tensor],
        margin: torch.Tensor | None,
        reduction: str,
    ) -> torch.Tensor:
        """:meth:`per_pair`, reduced as asked: the compiled module reduces inside its autograd function (one node
        where ``sum() / B`` would add two, a third of DPO's time at B = 1024 on the CPU)."""
        if not atom_lp:
            raise DPALogicError("no log-probabilities given")
        self._check_inputs(atom_lp, ans_len)  # shapes and types: refused before any kernel runs
        if self.validate and not self._uses_module:
            check_log_probs(list(atom_lp.values()), list(atom_lp), DPALogicError)
        elif self.validate:  # the compiled module checks the values of its own inputs: here only the others
            self._check_unused(atom_lp)
        first = next(iter(atom_lp.values()))
        if margin is not None:
            self._check_margin(margin, first)
        dtype = torch.float64 if first.dtype == torch.float64 else torch.float32
        if not self.terms:  # every coefficient is zero (label smoothing 0 and alpha 0 and …)
            return self._reduce(torch.zeros_like(first, dtype=dtype), reduction)
        if not self._running_atoms:  # a constant structure (its formula reduced to true/false parts): no kernel
            if margin is not None:
                raise DPALogicError(
                    "this loss is a constant (its structure mentions no atom): a margin cannot shift it"
                )
            values = {sympy.Symbol(k): v for k, v in self.hyperparameters.items()}
            constant = torch.full_like(first, float(self._running.sympy().xreplace(values)), dtype=dtype)
            return self._reduce(constant, reduction)
        if self._listwise is not None:  # OBDD sides: the vectorized evaluator, on the named columns
            return self._reduce(self._listwise.per_pair_named(atom_lp, ans_len, margin), reduction)
        args = []
        for atom, name in zip(self._running_atoms, self._running_names):
            if name not in atom_lp:
                raise DPALogicError(self._missing(atom))
            args.append(atom_lp[name])
        for answer in self._length_answers:
            if answer in ans_len:
                args.append(ans_len[answer])
            elif answer in self._needed_lengths:  # terms with a non-zero coefficient
                arg = {"yw": "chosen_lengths", "yl": "rejected_lengths"}.get(answer, f"lengths[{answer!r}]")
                raise DPALogicError(
                    f"{self.program.name or 'this loss'} length-normalizes answer {answer}: pass {arg} (token counts)"
                )
            else:  # only switched-off terms use it: any count gives the same loss
                args.append(torch.ones_like(args[0], dtype=torch.long))
        return self._apply_compiled(args, margin, reduction)

    def _apply_compiled(self, args: list[torch.Tensor], margin: torch.Tensor | None, reduction: str) -> torch.Tensor:
        """The compiled module's autograd function on checked inputs (the module's order): _check_tensors has done
        what its per_pair_loss would check (one shape, one device) and use_triton its backend rule — each skipped
        step is a few µs of a small batch's ~50."""
        triton = use_triton(self.backend, args[0])
        # Triton's interpreter or its compiler: one module each (the torch twin is the same in both)
        mode = triton and os.environ.get("TRITON_INTERPRET") == "1"
        mod = self._generated.get(mode)
        if mod is None:
            mod = self._generated[mode] = module_for(self._running)
        if margin is not None:
            margin = margin.detach()
        return mod.LossFunction.apply(triton, self.hyperparameters, margin, reduction, self.validate, *args)

    def per_list(
        self,
        logps: torch.Tensor,
        ref_logps: torch.Tensor | None = None,
        lengths: torch.Tensor | None = None,
        *,
        margin: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The loss of every prompt, ``[B]``, from ``[B, K]`` log-probs (column j is answer y(j+1)).

        The vectorized evaluator of :mod:`dpalogic.runtime.listwise` runs it, except for a truth-table structure
        where the backend rule picks Triton or the structure is small (``LIST_EVALUATOR_ATOMS``): there its compiled
        module runs on the columns (from 8 atoms on, the evaluator's pass per level beats the twin's per node).
        """
        return self._list_loss(logps, ref_logps, lengths, margin, "none")

    def _list_loss(
        self,
        logps: torch.Tensor,
        ref_logps: torch.Tensor | None,
        lengths: torch.Tensor | None,
        margin: torch.Tensor | None,
        reduction: str,
    ) -> torch.Tensor:
        """:meth:`per_list`, reduced as asked (the evaluator reduces term by term, see ``ListwiseProgram.per_pair``)."""
        if not isinstance(logps, torch.Tensor):
            raise DPALogicError("ref_logps [B, K] goes with logps [B, K] (column j is answer y(j+1))")
        columns, lengths = matrix_columns(logps, ref_logps, lengths)
        self._check_list_width(logps.shape[1])
        evaluator = self._listwise
        if evaluator is None:  # a truth-table structure
            small = len(self._running_atoms) < LIST_EVALUATOR_ATOMS
            if not self.terms or small or use_triton(self.backend, logps):
                # −inf (an answer masked out) floored as the K-answer evaluator floors it: the module's gradient
                # there is NaN, and the floor's is 0
                floored = {name: m.clamp(min=LOG_FLOOR) for name, m in columns.items()}
                atom_lp, ans_len = as_mapping(floored, lengths)
                return self._reduce(self.per_pair(atom_lp, ans_len, margin=margin), reduction)
            if self._list_evaluator is None:
                self._list_evaluator = ListwiseProgram(*self._kept_bound, compile=self._compile)
            evaluator = self._list_evaluator
        check = None
        if self.validate:
            if evaluator.checks_for_itself(columns):  # its pass takes the row maxima anyway
                check = (DPALogicError, "logps")
            else:
                names = ["logps" if name == "M" else "ref_logps" for name in columns]
                check_log_probs(list(columns.values()), names, DPALogicError)
        if margin is not None:
            self._check_margin(margin, logps[:, 0])
        return evaluator.per_pair(columns, lengths, margin, reduction, check)

    def _check_list_width(self, k: int) -> None:
        """[B, K] inputs carry answers y1 … yK: K must be the loss's own (a list of another length is a mistake, as a
        row with another K is a bad row in training), and a loss over yw/yl takes named inputs instead."""
        named, want = self._list_width
        if named:
            raise DPALogicError(
                f"{self.program.name or 'this loss'} is over {', '.join(named)}, not y1 … yK: pass chosen_logps, "
                "rejected_logps (and the reference's) instead of a [B, K] matrix"
            )
        if want is not None and k != want:
            raise DPALogicError(
                f"logps has K = {k} columns but {self.program.name or 'this loss'} is over y1 … y{want}: pass "
                f"[B, {want}] (column j is answer y(j+1))"
            )

    def _check_margin(self, margin: torch.Tensor, first: torch.Tensor) -> None:
        """A margin is a finite float tensor of the log-probs' shape, for a loss with a preference to shift."""
        if not isinstance(margin, torch.Tensor):
            raise DPALogicError(f"margin must be a torch.Tensor [B], got {type(margin).__name__}")
        if not margin.is_floating_point():
            raise DPALogicError(f"margin must be floating point, got {margin.dtype}")
        if margin.shape != first.shape:
            raise DPALogicError(
                f"margin must have the log-probs' shape {tuple(first.shape)}, got {tuple(margin.shape)}"
            )
        if margin.device != first.device:
            raise DPALogicError(f"margin is on {margin.device} but the log-probs are on {first.device}")
        if not bool(torch.isfinite(margin.detach()).all()):
            raise DPALogicError("margin holds a NaN or an infinite value")
        if not any(t.role in ("preference", "smoothing") for t in self._running.terms):
            raise DPALogicError(f"{self.program.name or 'this loss'} has no preference term for a margin to shift")

    def _check_inputs(self, atom_lp: Mapping[str, torch.Tensor], ans_len: Mapping[str, torch.Tensor]) -> None:
        """Every key a known atom (unused ones are fine: a reference passed to a reference-free loss; a misspelling is
        not), and every tensor as :meth:`_check_tensors` wants it."""
        known = self._known
        for k in atom_lp:
            if k not in known and not _ATOM_NAME.fullmatch(k):
                from dpalogic.errors import unknown

                raise unknown("atom", k, sorted(known), f"this loss's atoms are {', '.join(sorted(known))}")
        self._check_tensors(list(atom_lp.items()), list(ans_len.items()))

    def _check_unused(self, atom_lp: Mapping[str, torch.Tensor]) -> None:
        """The values of log-probs given but not used by the compiled module (a reference passed to a reference-free
        loss): still log-probs, and a positive one is still a mistake worth naming."""
        unused = {k: v for k, v in atom_lp.items() if k not in self._running_name_set and v.is_floating_point()}
        if unused:
            check_log_probs(list(unused.values()), list(unused), DPALogicError)

    @staticmethod
    def _check_tensors(logps: list[tuple[str, torch.Tensor]], lengths: list[tuple[str, torch.Tensor]]) -> None:
        """Every input a tensor of one shape [B] on one device (no silent broadcasting), log-probs floating point and
        at most 0."""
        shape = device = None
        for kind, items in (("log-probs", logps), ("lengths", lengths)):
            for k, v in items:
                if not isinstance(v, torch.Tensor):
                    raise DPALogicError(f"{kind} for {k} must be a torch.Tensor, got {type(v).__name__}")
                if kind == "log-probs" and not v.is_floating_point():
                    raise DPALogicError(f"log-probs for {k} must be floating point, got {v.dtype}")
                if shape is None:
                    shape, device = v.shape, v.device
                elif v.shape != shape:
                    raise DPALogicError(
                        f"all inputs must have the same shape [B]: {k} has {tuple(v.shape)}, another has {tuple(shape)}"
                    )
                elif v.device != device:
                    raise DPALogicError(f"all inputs must be on one device: {k} is on {v.device}, another on {device}")

    def _missing(self, atom: Atom) -> str:
        arg = {
            "M(yw)": "chosen_logps",
            "M(yl)": "rejected_logps",
            "Ref(yw)": "ref_chosen_logps",
            "Ref(yl)": "ref_rejected_logps",
        }.get(atom.name, f"logps[{atom.name!r}]")
        why = "it uses a reference model" if atom.pred == "Ref" else "its structure mentions it"
        return f"{self.program.name or 'this loss'} needs {arg} for {atom.name}: {why}"

    def _reduce(self, losses: torch.Tensor, reduction: str | None = None) -> torch.Tensor:
        return reduce(losses, reduction or self.reduction)
