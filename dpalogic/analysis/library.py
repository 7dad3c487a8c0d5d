"""Decompile a library's own losses (``dpalogic decompile --library trl|liger``): every pairwise loss type, traced
from the installed package's code (not from a transcription), as a table of structures, links and catalog matches.

* Liger-Kernel: each ``liger_kernel/chunked_loss/*_loss.py`` class's ``preference_loss_fn`` static method is called on
  stand-ins (:mod:`dpalogic.analysis.trace`), once per ``loss_type`` its source compares against; log-probs are
  length-normalized where the class's ``forward`` averages them (``average_log_prob``).
* TRL: ``DPOTrainer._compute_loss`` computes every loss type inline, after the model's forward pass. Its statements
  from the log-ratios to the end of the loss loop are taken from the installed source and run as one function on
  stand-ins (a model-free slice of TRL's own code), once per loss type, plus the f-divergence and WPO variants.

The trust model is the tracer's: the installed library's own code runs, nothing else.
"""

from __future__ import annotations

import ast
import inspect
import textwrap
from typing import Any

import sympy

from dpalogic.analysis.decompile import LEN, LOGP, REF_LOGP, OutsideFragmentError, decompile_expression, report
from dpalogic.analysis.trace import Namespace, Traced, TraceError, Tracer, _result_expr, call_traced
from dpalogic.errors import DPALogicError, unknown

LIBRARIES = ("trl", "liger")


def _row(name: str, trace) -> dict[str, Any]:
    """One table row: trace, decompile, match; or the precise reason the loss is outside the fragment."""
    row: dict[str, Any] = {"loss_type": name}
    try:
        expr = trace()
        info = report(decompile_expression(expr, str(expr)))
    except (OutsideFragmentError, TraceError) as e:
        row["outside"] = str(e)
        return row
    except DPALogicError as e:
        row["outside"] = str(e)
        return row
    row["equation"] = info["equation"]
    row["terms"] = [
        {k: t[k] for k in ("link", "coef", "beta", "gamma", "normalized", "structure", "link_params")}
        for t in info["terms"]
    ]
    row["matches"] = info["matches"]
    row["matches_with"] = info["matches_with"]
    return row


def _compared_names(source: str, variable: str = "loss_type") -> list[str]:
    """The string constants ``variable`` is compared against (``loss_type == "sigmoid"``), in source order."""
    out = []
    for node in ast.walk(ast.parse(textwrap.dedent(source))):
        if isinstance(node, ast.Compare) and isinstance(node.left, ast.Name) and node.left.id == variable:
            for c in node.comparators:
                if isinstance(c, ast.Constant) and isinstance(c.value, str) and c.value not in out:
                    out.append(c.value)
    return out


# --------------------------------------------------------------------------------------------------- Liger


def _liger_classes() -> list[tuple[str, type]]:
    import importlib
    import pkgutil

    import liger_kernel.chunked_loss as pkg

    out = []
    for m in sorted(pkgutil.iter_modules(pkg.__path__), key=lambda m: m.name):
        if not m.name.endswith("_loss"):
            continue
        module = importlib.import_module(f"{pkg.__name__}.{m.name}")
        for _, cls in inspect.getmembers(module, inspect.isclass):
            if cls.__module__ == module.__name__ and "preference_loss_fn" in cls.__dict__:
                out.append((m.name.removesuffix("_loss"), cls))
    return out


def _averages(cls: type) -> bool:
    """Whether the class's forward averages log-probs over tokens by default (SimPO, ORPO) or sums them (DPO)."""
    from liger_kernel.chunked_loss.fused_linear_preference import LigerFusedLinearPreferenceBase

    for f in (cls.forward, LigerFusedLinearPreferenceBase.forward):
        p = inspect.signature(f).parameters.get("average_log_prob")
        if p is not None and p.default is not p.empty:
            return bool(p.default)
    return True


def liger_rows() -> list[dict[str, Any]]:
    rows = []
    for short, cls in _liger_classes():
        fn = cls.preference_loss_fn
        params = inspect.signature(fn).parameters
        label = f"{short} ({cls.__name__})"
        if "chosen_logps" not in params or "rejected_logps" not in params:
            first = ", ".join(list(params)[:3])
            rows.append(
                {"loss_type": label, "outside": f"not pairwise: preference_loss_fn({first}, …) takes one answer's "
                 "log-probs and its label, with batch-level statistics (unpaired), not a chosen/rejected pair"}
            )  # fmt: skip
            continue
        normalized = _averages(cls)
        types_ = _compared_names(inspect.getsource(fn)) or [None]
        for lt in types_:
            name = label if lt is None else f"{short}: {lt}"
            rows.append(_row(name, lambda fn=fn, lt=lt, n=normalized: _trace_liger(fn, lt, n)))
    return rows


def _trace_liger(fn, loss_type: str | None, normalized: bool) -> sympy.Expr:
    tracer = Tracer({})
    kwargs: dict[str, Any] = {}
    for name, p in inspect.signature(fn).parameters.items():
        if name in ("chosen_logps", "rejected_logps"):
            k = "w" if name.startswith("chosen") else "l"
            kwargs[name] = Traced(LOGP[k] / LEN[k] if normalized else LOGP[k], tracer)
        elif name in ("ref_chosen_logps", "ref_rejected_logps"):
            k = "w" if "chosen" in name else "l"
            kwargs[name] = Traced(REF_LOGP[k] / LEN[k] if normalized else REF_LOGP[k], tracer)
        elif name == "full_target":
            kwargs[name] = Traced(sympy.Integer(0), tracer)  # only its .shape[0] // 2 (the pair count) is read
        elif name == "loss_type":
            kwargs[name] = loss_type
        elif p.default is not p.empty:
            # hyperparameters stay symbolic; conditions on them see their default (exo_pair needs ε > 0: 1e-3)
            default = 1e-3 if (name == "label_smoothing" and loss_type == "exo_pair") else p.default
            kwargs[name] = tracer.hyper(name, default)
    try:
        out = call_traced(fn, [], kwargs, tracer)
    except DPALogicError:
        raise
    except NotImplementedError as e:
        raise TraceError(f"Liger raises NotImplementedError: {e}") from None
    except Exception as e:
        raise TraceError(f"tracing Liger's preference_loss_fn failed: {type(e).__name__}: {e}") from None
    return _result_expr(out)


# --------------------------------------------------------------------------------------------------- TRL

_TRL_ARGS = ["self", "chosen_logps", "rejected_logps", "ref_chosen_logps", "ref_rejected_logps"]
_TRL_ARGS += ["completion_mask", "shift_completion_mask", "per_token_logps", "outputs", "device", "seq_len"]


def _trl_loss_function():
    """TRL's loss block as a function: ``_compute_loss``'s statements from ``chosen_logratios = …`` through the loss
    loop, run in the trainer module's own namespace."""
    import trl.trainer.dpo_trainer as mod

    source = textwrap.dedent(inspect.getsource(mod.DPOTrainer._compute_loss))
    fdef = ast.parse(source).body[0]
    body = fdef.body
    start = next(
        (
            i
            for i, s in enumerate(body)
            if isinstance(s, ast.Assign) and ast.unparse(s.targets[0]) == "chosen_logratios"
        ),
        None,
    )
    stop = next(
        (i for i, s in enumerate(body) if isinstance(s, ast.For) and "loss_type" in ast.unparse(s.target)), None
    )
    if start is None or stop is None:
        import trl

        raise DPALogicError(
            f"TRL {trl.__version__}: DPOTrainer._compute_loss no longer has the log-ratio assignment and the loss "
            "loop this reader expects; the installed TRL cannot be decompiled"
        )
    ret = ast.Return(ast.Name("loss", ast.Load()))
    args = ast.arguments(
        posonlyargs=[], args=[ast.arg(a) for a in _TRL_ARGS], kwonlyargs=[], kw_defaults=[], defaults=[]
    )
    func = ast.FunctionDef(name="_trl_loss", args=args, body=[*body[start : stop + 1], ret], decorator_list=[])
    module = ast.fix_missing_locations(ast.Module([func], []))
    namespace = dict(vars(mod))
    exec(compile(module, inspect.getsourcefile(mod) or "dpo_trainer.py", "exec"), namespace)  # TRL's own code
    return namespace["_trl_loss"], source


class _Mask:
    """TRL's completion mask: ``chunk(2)`` gives the chosen/rejected halves, whose ``sum(dim=1)`` is a length."""

    def __init__(self, tracer: Tracer, side: str | None = None) -> None:
        self.tracer, self.side = tracer, side

    def chunk(self, n, dim=0):
        return _Mask(self.tracer, "w"), _Mask(self.tracer, "l")

    def sum(self, *a, **k):
        if self.side is None:  # both halves' lengths, per token: only WPO's weighting reads them so
            return _Tokens(self.tracer)
        return Traced(LEN[self.side], self.tracer)

    def bool(self):
        return self

    def size(self, dim=None):
        return 1


class _Tokens:
    """Per-token log-probs: ``chunk(2)`` halves; ``[mask].mean()`` is the mean token log-prob; any other use
    combines the policy's own token probabilities (WPO's weight), which no program term does."""

    def __init__(self, tracer: Tracer, side: str | None = None) -> None:
        self.tracer, self.side = tracer, side

    def chunk(self, n, dim=0):
        return _Tokens(self.tracer, "w"), _Tokens(self.tracer, "l")

    def __getitem__(self, index):
        if isinstance(index, _Mask) and self.side:
            return self
        raise OutsideFragmentError(
            "the loss is weighted by the policy's own per-token probabilities (TRL's use_weighting, WPO: "
            "exp(mean(log p − log Σp²)) per answer): a weight that depends on the policy, not c in c·f(β·log ρ − γ)"
        )

    def mean(self, *a, **k):
        return Traced(LOGP[self.side] / LEN[self.side], self.tracer)

    def size(self, dim=None):
        return 1

    def clamp_min(self, *a, **k):
        return self

    def __sub__(self, other):
        return self[None]

    __mul__ = __add__ = __sub__


def trl_rows() -> list[dict[str, Any]]:
    fn, source = _trl_loss_function()
    variants = [(lt, lt, {}) for lt in _compared_names(source)]
    for f in ("forward_kl", "js_divergence", "alpha_divergence"):
        if f'"{f}"' in source:
            variants.append((f"sigmoid, f_divergence_type={f}", "sigmoid", {"f_divergence_type": f}))
    if "use_weighting" in source:
        variants.append(("sigmoid, use_weighting=True (WPO)", "sigmoid", {"use_weighting": True}))
    return [_row(name, lambda lt=lt, extra=extra: _trace_trl(fn, lt, extra)) for name, lt, extra in variants]


def _trace_trl(fn, loss_type: str, extra: dict[str, Any]) -> sympy.Expr:
    tracer = Tracer({})
    settings = {
        "loss_types": [loss_type],
        "loss_weights": [1],
        "f_divergence_type": "reverse_kl",
        "use_weighting": False,
        "ld_alpha": None,
        "f_alpha_divergence_coef": 0.5,
        **extra,
    }
    defaults = {"beta": 0.1, "label_smoothing": 1e-3 if loss_type == "exo_pair" else 0.0, "discopop_tau": 0.05}
    self = Namespace(tracer, settings, defaults)
    mask = _Mask(tracer)
    args = [self, Traced(LOGP["w"], tracer), Traced(LOGP["l"], tracer), Traced(REF_LOGP["w"], tracer)]
    args += [Traced(REF_LOGP["l"], tracer), mask, mask, _Tokens(tracer), _Outputs(), "cpu", 1]
    try:
        out = call_traced(fn, args, {}, tracer)
    except DPALogicError:
        raise
    except Exception as e:
        raise TraceError(f"tracing TRL's {loss_type} failed: {type(e).__name__}: {e}") from None
    return _result_expr(out)


class _Outputs:
    log_sum_sq_probs = _Tokens(Tracer({}))


def library_rows(name: str) -> list[dict[str, Any]]:
    key = name.strip().lower().replace("-", "_")
    if key in ("liger", "liger_kernel"):
        try:
            return liger_rows()
        except ImportError:
            raise DPALogicError("--library liger: liger-kernel is not installed (pip install liger-kernel)") from None
    if key == "trl":
        try:
            return trl_rows()
        except ImportError:
            raise DPALogicError("--library trl: TRL is not installed (pip install trl)") from None
    raise unknown("library", name, LIBRARIES)


def library_version(name: str) -> str:
    from importlib.metadata import version

    return version({"liger": "liger-kernel", "trl": "trl"}.get(name.lower(), name))


def row_summary(row: dict[str, Any]) -> tuple[str, str, str]:
    """(structures, links, catalog match or reason) as short text for the table."""
    if "outside" in row:
        return "—", "—", "outside: " + row["outside"]
    structures = "; ".join(dict.fromkeys(t["structure"] for t in row["terms"]))
    links = ", ".join(dict.fromkeys(t["link"] + (" (per-token)" if t["normalized"] else "") for t in row["terms"]))
    match = ", ".join(row["matches"]) or "; ".join(row["matches_with"]) or "(no catalog loss)"
    return structures, links, match


def markdown_table(name: str, rows: list[dict[str, Any]]) -> str:
    lines = [f"| {name} loss type | structure(s) | link(s) | catalog match / reason |", "|---|---|---|---|"]
    for r in rows:
        s, link, m = row_summary(r)
        cells = [c.replace("|", "\\|") for c in (s, link, m)]
        lines.append(f"| `{r['loss_type']}` | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


__all__ = ["LIBRARIES", "library_rows", "library_version", "markdown_table", "row_summary"]
