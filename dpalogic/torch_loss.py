"""Torch compiler: a loss program becomes a stable ``torch.nn.Module`` (docs/semantics.md §6).

Every side's ``log WMC`` is evaluated from its log-space plan (``log p``, ``log1mexp(log p)``, sums, and
``logaddexp`` only where a side is a genuine sum), so DPO costs four additions and ORPO two ``log1mexp`` calls.
Inputs in float32 or bfloat16 are computed in float32 (float64 stays float64); log-probabilities anywhere in
``[-1e4, 0]`` give finite values and gradients.
"""

from __future__ import annotations

import math
import os
import re
import warnings
from collections.abc import Mapping
from dataclasses import dataclass

import sympy
import torch
import torch.nn.functional as F

from dpalogic.errors import DPALogicError, NoPolicyAtomWarning
from dpalogic.semantics import Program, Term, log_wmc_plan
from dpalogic.syntax import Atom

LN2 = math.log(2.0)
_ATOM_NAME = re.compile(r"(M|Ref)\((yw|yl|y[1-9][0-9]*)\)")
BACKENDS = ("auto", "triton", "torch")
POSITIVE_SLACK = 1e-2  # log-probs up to this far above 0 are taken as rounding noise, not as an input mistake


def _triton_installed() -> bool:
    import importlib.util

    return importlib.util.find_spec("triton") is not None


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """``log(1 − exp(x))`` for ``x ≤ 0``, accurate on both sides of ``−log 2`` (Mächler 2012).

    ``x`` is clamped just below 0 so that ``p = 1`` gives a large finite negative value (and a finite gradient)
    instead of ``−inf``. Each branch gets an input that is safe for it, so the unused branch never produces the
    ``inf · 0 = nan`` gradients that a plain ``torch.where`` would.
    """
    tiny = torch.finfo(x.dtype).tiny
    x = x.clamp(max=-tiny)
    near0 = x > -LN2
    x_near = torch.where(near0, x, torch.full_like(x, -LN2))
    x_far = torch.where(near0, torch.full_like(x, -LN2 - 1.0), x)
    return torch.where(near0, torch.log(-torch.expm1(x_near)), torch.log1p(-torch.exp(x_far)))


class _ComputeIn(torch.autograd.Function):
    """``x.to(dtype)`` whose backward saturates the gradient at the largest finite value of ``x``'s dtype.

    Near ``log p = 0`` the exact gradient of a ``log1mexp(log p)`` factor is about ``1/|log p|`` (1e6 at −1e-6):
    finite in float32, but beyond float16's range (65504). Autograd's own cast would return ±inf there.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        ctx.in_dtype = x.dtype
        return x.to(dtype)

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        big = torch.finfo(ctx.in_dtype).max
        return g.clamp(-big, big).to(ctx.in_dtype), None


def compute_in(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``x`` in the compute dtype; gradients come back finite in ``x``'s own dtype (saturated, never ±inf)."""
    if x.dtype == dtype or not x.requires_grad or torch.finfo(x.dtype).max >= torch.finfo(dtype).max:
        return x.to(dtype)
    return _ComputeIn.apply(x, dtype)


def _link(name: str, z: torch.Tensor, params: Mapping[str, float]) -> torch.Tensor:
    if name == "logistic":
        return F.softplus(-z)
    if name == "hinge":
        return torch.relu(params.get("margin", 1.0) - z)
    if name == "squared":
        return z * z
    if name == "sigmoid":
        # exp(log σ(−z)) rather than σ(−z): autograd's σ' = s(1 − s) cancels when s ≈ 1, log σ's derivative does not
        return torch.exp(F.logsigmoid(-z))
    if name == "exponential":
        return torch.exp(-z)
    if name == "exo":
        eps = params["epsilon"]
        lq, lnq = F.logsigmoid(z), F.logsigmoid(-z)
        return torch.exp(lq) * (lq - math.log1p(-eps)) + torch.exp(lnq) * (lnq - math.log(eps))
    if name == "discopop":
        tau = params["tau"]
        # σ(z/τ)·exp(−z) is formed in log space: finite for any z (the published form overflows for z ≪ 0)
        return torch.sigmoid(-z / tau) * F.softplus(-z) + torch.exp(F.logsigmoid(z / tau) - z)
    raise DPALogicError(f"link {name!r} has no torch implementation")  # pragma: no cover


def _eval_plan(node, lp: list[torch.Tensor], l1m: dict[int, torch.Tensor]) -> torch.Tensor | float:
    kind = node[0]
    if kind == "zero":
        return 0.0
    if kind == "lit":
        i = node[1]
        if node[2]:
            return lp[i]
        if i not in l1m:
            l1m[i] = log1mexp(lp[i])
        return l1m[i]
    vals = [_eval_plan(c, lp, l1m) for c in node[1:]]
    if kind == "add":
        out = vals[0]
        for v in vals[1:]:
            out = out + v
        return out
    a, b = vals
    if not isinstance(a, torch.Tensor):
        a = torch.full_like(b, float(a))
    if not isinstance(b, torch.Tensor):
        b = torch.full_like(a, float(b))
    return torch.logaddexp(a, b)


@dataclass(frozen=True)
class BoundTerm:
    """A term with its hyperparameters substituted: plain floats and plans, ready for torch."""

    atoms: tuple[Atom, ...]
    top_plan: tuple
    bottom_plan: tuple | None  # None: empty ✗ side, log ρ = +inf
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
            raise DPALogicError(f"with {hp} the {what} {e} = {v} is not a finite number: choose other hyperparameters")
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
        log_wmc_plan(s.top, s.n),
        log_wmc_plan(s.bottom, s.n),
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

    ``backend``: ``"torch"`` evaluates the plans with torch autograd; ``"triton"`` runs the fused forward+backward
    kernel generated by :mod:`dpalogic.codegen` (CUDA tensors, or any tensors under ``TRITON_INTERPRET=1``);
    ``"auto"`` (default) picks Triton for CUDA tensors when triton is installed and torch otherwise.

    Inputs are per-sequence *summed* log-probabilities ``[B]``; ``chosen_lengths``/``rejected_lengths`` (token
    counts) are needed by length-normalized losses (SimPO, IPO, ORPO, the NLL terms). Formulas over answers
    ``y1 … yK`` take ``logps={"M(y1)": …, "Ref(y1)": …}`` and ``lengths={"y1": …}`` instead.
    """

    def __init__(self, spec, *, reduction: str = "mean", backend: str = "auto", **hyperparameters: float) -> None:
        super().__init__()
        from dpalogic.catalog import resolve

        if reduction not in ("mean", "sum", "none"):
            raise DPALogicError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
        if backend not in BACKENDS:
            raise DPALogicError(f"backend must be 'auto', 'triton' or 'torch', got {backend!r}")
        self.backend = backend
        self._generated: dict = {}  # generated modules (dpalogic.codegen), compiled on first Triton use
        self.program: Program = resolve(spec)
        self.hyperparameters = self.program.bind(**hyperparameters)
        self.reduction = reduction
        self.terms = [bind_term(t, self.hyperparameters) for t in self.program.terms]
        self.terms = [t for t in self.terms if t.coef != 0.0]  # e.g. label smoothing 0, alpha 0
        self.atoms = self.program.atoms
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
        return f"{self.program.name or 'derived'}, {hp}, reduction={self.reduction!r}"

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
        logps: Mapping[str, torch.Tensor] | None = None,
        lengths: Mapping[str, torch.Tensor] | None = None,
    ) -> torch.Tensor:
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
        if not atom_lp:
            raise DPALogicError("no log-probabilities given")
        self._check_inputs(atom_lp, ans_len)
        if self._use_triton(atom_lp):
            return self._reduce(self._per_pair_generated(atom_lp, ans_len))
        return self._reduce(self.per_pair(atom_lp, ans_len))

    def _use_triton(self, atom_lp: Mapping[str, torch.Tensor]) -> bool:
        if self.backend == "torch" or not atom_lp:
            return False
        first = next(iter(atom_lp.values()))
        if self.backend == "auto":
            return first.is_cuda and _triton_installed()
        if not _triton_installed():
            raise DPALogicError("backend='triton' needs the triton package (pip install triton)")
        if not first.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
            raise DPALogicError(
                "backend='triton' needs CUDA tensors; on the CPU it runs only in Triton's interpreter: set "
                "TRITON_INTERPRET=1 before triton is imported (or use backend='torch')"
            )
        return True

    def _per_pair_generated(
        self, atom_lp: Mapping[str, torch.Tensor], ans_len: Mapping[str, torch.Tensor]
    ) -> torch.Tensor:
        """The loss of every pair from the generated fused kernel (values and gradients as ``per_pair``)."""
        from dpalogic.codegen import module_for

        mode = os.environ.get("TRITON_INTERPRET") == "1"  # the interpreter or the compiler: one module each
        if mode not in self._generated:
            self._generated[mode] = module_for(self.program)
        mod = self._generated[mode]
        args = []
        for atom in self.program.atoms:
            if atom.name not in atom_lp:
                raise DPALogicError(self._missing(atom))
            args.append(atom_lp[atom.name])
        needed = {a.answer for t in self.terms if t.normalized for a in t.atoms}  # terms with a non-zero coefficient
        for answer in self._generated_answers():
            if answer in ans_len:
                args.append(ans_len[answer])
            elif answer in needed:
                arg = {"yw": "chosen_lengths", "yl": "rejected_lengths"}.get(answer, f"lengths[{answer!r}]")
                raise DPALogicError(
                    f"{self.program.name or 'this loss'} length-normalizes answer {answer}: pass {arg} (token counts)"
                )
            else:  # only switched-off terms use it: any count gives the same loss
                args.append(torch.ones_like(args[0], dtype=torch.long))
        return mod.per_pair_loss(*args, **self.hyperparameters, backend="triton")

    def _generated_answers(self) -> list[str]:
        answers = {a.answer for t in self.program.terms if t.normalized for a in t.structure.atoms}
        return sorted(answers, key=lambda s: Atom("M", s).sort_key)

    def per_pair(self, atom_lp: Mapping[str, torch.Tensor], ans_len: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """The loss of every pair, ``[B]``, from log-probs keyed by atom name and lengths keyed by answer."""
        if not atom_lp:
            raise DPALogicError("no log-probabilities given")
        self._check_inputs(atom_lp, ans_len)  # cheap: shapes and types only, no device sync
        first = next(iter(atom_lp.values()))
        dtype = torch.float64 if first.dtype == torch.float64 else torch.float32
        cache: dict[tuple[str, bool], torch.Tensor] = {}

        def weight(atom: Atom, normalized: bool) -> torch.Tensor:
            key = (atom.name, normalized)
            if key in cache:
                return cache[key]
            if atom.name not in atom_lp:
                raise DPALogicError(self._missing(atom))
            x = compute_in(atom_lp[atom.name], dtype)
            if normalized:
                if atom.answer not in ans_len:
                    arg = {"yw": "chosen_lengths", "yl": "rejected_lengths"}.get(
                        atom.answer, f"lengths[{atom.answer!r}]"
                    )
                    raise DPALogicError(
                        f"{self.program.name or 'this loss'} length-normalizes {atom.name}: pass {arg} (token counts)"
                    )
                x = x / ans_len[atom.answer].to(dtype).clamp(min=1.0)
            cache[key] = x
            return x

        total = None
        for t in self.terms:
            lp = [weight(a, t.normalized) for a in t.atoms]
            l1m: dict[int, torch.Tensor] = {}
            log_rho = _eval_plan(t.top_plan, lp, l1m) - _eval_plan(t.bottom_plan, lp, l1m)
            if not isinstance(log_rho, torch.Tensor):  # a constant ratio (structure without atoms left)
                log_rho = torch.full_like(lp[0] if lp else first.to(dtype), float(log_rho))
            z = t.scale * log_rho - t.shift
            value = t.coef * _link(t.link, z, t.params)
            total = value if total is None else total + value
        if total is None:
            return torch.zeros_like(first, dtype=dtype)
        return total

    def _check_inputs(self, atom_lp: Mapping[str, torch.Tensor], ans_len: Mapping[str, torch.Tensor]) -> None:
        """Every input a tensor of one shape [B] (no silent broadcasting), every key a known atom/answer."""
        known = {a.name for a in self.atoms}
        shape = None
        for kind, mapping in (("log-probs", atom_lp), ("lengths", ans_len)):
            for k, v in mapping.items():
                if not isinstance(v, torch.Tensor):
                    raise DPALogicError(f"{kind} for {k} must be a torch.Tensor, got {type(v).__name__}")
                if kind == "log-probs" and k not in known and not _ATOM_NAME.fullmatch(k):
                    # unused atoms are fine (a reference passed to a reference-free loss); a misspelled key is not
                    from dpalogic.errors import unknown

                    raise unknown("atom", k, sorted(known), f"this loss's atoms are {', '.join(sorted(known))}")
                if kind == "log-probs" and not (v.is_floating_point()):
                    raise DPALogicError(f"log-probs for {k} must be floating point, got {v.dtype}")
                if kind == "log-probs" and v.numel() and bool((v > POSITIVE_SLACK).any()):
                    # probabilities or logits passed by mistake; a hair above 0 is rounding in a log-softmax sum
                    worst = float(v.detach().max())
                    raise DPALogicError(
                        f"log-probabilities must be <= 0: {k} has {worst:.6g} (pass summed log-probs, "
                        "not probabilities or logits)"
                    )
                if shape is None:
                    shape = v.shape
                elif v.shape != shape:
                    raise DPALogicError(
                        f"all inputs must have the same shape [B]: {k} has {tuple(v.shape)}, another has {tuple(shape)}"
                    )

    def _missing(self, atom: Atom) -> str:
        arg = {
            "M(yw)": "chosen_logps",
            "M(yl)": "rejected_logps",
            "Ref(yw)": "ref_chosen_logps",
            "Ref(yl)": "ref_rejected_logps",
        }.get(atom.name, f"logps[{atom.name!r}]")
        why = "it uses a reference model" if atom.pred == "Ref" else "its structure mentions it"
        return f"{self.program.name or 'this loss'} needs {arg} for {atom.name}: {why}"

    def _reduce(self, losses: torch.Tensor) -> torch.Tensor:
        if self.reduction == "mean":
            return losses.mean()
        if self.reduction == "sum":
            return losses.sum()
        return losses
