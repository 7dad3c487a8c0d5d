"""``dpalogic decompile --python FILE.py:FUNCTION``: import the user's own file, call the function once on symbolic
stand-ins (:mod:`dpalogic.analysis.trace`, which also states the trust model) and decompile the traced loss.

A parameter is a log-probability when its name is one of TRL's, Liger's, OpenRLHF's, HALOs', SimPO's or the reference
DPO code's (:data:`KNOWN_NAMES`) or when ``--arg NAME=ROLE`` maps it; any other parameter is a hyperparameter.
"""

from __future__ import annotations

import importlib.util
import inspect
import sys
from pathlib import Path
from typing import Any

import sympy

from dpalogic.analysis.decompile import LEN, LOGP, REF_LOGP, decompile_expression, report
from dpalogic.analysis.trace import Namespace, Traced, TraceError, Tracer, _result_expr, call_traced
from dpalogic.errors import DPALogicError, unknown

# parameter names of TRL, Liger, OpenRLHF, HALOs, SimPO and the reference DPO code → dpalogic's variables
_SIDES = {"w": ("chosen", "w"), "l": ("rejected", "l")}
ROLES: dict[str, sympy.Symbol] = {"logp_w": LOGP["w"], "logp_l": LOGP["l"], "ref_logp_w": REF_LOGP["w"]}
ROLES.update({"ref_logp_l": REF_LOGP["l"], "len_w": LEN["w"], "len_l": LEN["l"]})
KNOWN_NAMES: dict[str, str] = {}
for _k, (_side, _) in _SIDES.items():
    for _stem in ("logps", "logp", "log_probs", "logprobs"):
        KNOWN_NAMES[f"{_side}_{_stem}"] = f"logp_{_k}"
        KNOWN_NAMES[f"policy_{_side}_{_stem}"] = f"logp_{_k}"
        KNOWN_NAMES[f"ref_{_side}_{_stem}"] = f"ref_logp_{_k}"
        KNOWN_NAMES[f"reference_{_side}_{_stem}"] = f"ref_logp_{_k}"
    for _stem in ("lengths", "length", "lens", "len"):
        KNOWN_NAMES[f"{_side}_{_stem}"] = f"len_{_k}"
    KNOWN_NAMES[f"len_{_side}"] = f"len_{_k}"
KNOWN_NAMES.update({r: r for r in ROLES})


def load_function(spec: str):
    """``FILE.py:FUNCTION`` or ``FILE.py:Class.method`` → the function (the user's own file is imported)."""
    path, sep, qual = spec.rpartition(":")
    if not sep or not path or not qual:
        raise DPALogicError(f"--python takes FILE.py:FUNCTION (or FILE.py:Class.method), got {spec!r}")
    file = Path(path)
    if not file.is_file():
        raise DPALogicError(f"--python: no such file {path!r}")
    name = f"_dpalogic_trace_{abs(hash(str(file.resolve())))}"
    mspec = importlib.util.spec_from_file_location(name, file)
    if mspec is None or mspec.loader is None:
        raise DPALogicError(f"--python: {path!r} is not a Python file")
    module = importlib.util.module_from_spec(mspec)
    sys.modules[name] = module
    try:
        mspec.loader.exec_module(module)
    except Exception as e:  # the user's file failed to import: say so, without our traceback
        raise DPALogicError(f"--python: importing {path} failed: {type(e).__name__}: {e}") from None
    obj: Any = module
    for part in qual.split("."):
        if not hasattr(obj, part):
            names = [n for n in dir(obj) if not n.startswith("_")]
            raise unknown("function", part, names, f"in {path}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise DPALogicError(f"--python: {qual} in {path} is not a function")
    return obj


def parse_hp(items: list[str] | None) -> dict[str, Any]:
    """``k=v`` pairs: numbers as numbers, true/false as flags, anything else as text (a loss_type …)."""
    out: dict[str, Any] = {}
    for item in items or []:
        k, sep, v = item.partition("=")
        if not sep or not k.strip().isidentifier():
            raise DPALogicError(f"--hp takes name=value, got {item!r}")
        v = v.strip()
        try:
            out[k.strip()] = int(v) if v.lstrip("+-").isdigit() else float(v)
        except ValueError:
            out[k.strip()] = {"true": True, "false": False, "none": None}.get(v.lower(), v)
    return out


def parse_args_map(items: list[str] | None) -> dict[str, str]:
    out = {}
    for item in items or []:
        k, sep, v = item.partition("=")
        if not sep or v.strip() not in ROLES:
            raise DPALogicError(f"--arg takes NAME=ROLE with ROLE one of {'|'.join(ROLES)}, got {item!r}")
        out[k.strip()] = v.strip()
    return out


def trace_function(func, args_map: dict[str, str] | None = None, hp: dict[str, Any] | None = None) -> sympy.Expr:
    """Call ``func`` on stand-ins and return its loss as a SymPy expression over dpalogic's variables."""
    hp = dict(hp or {})
    mapping = {**KNOWN_NAMES, **(args_map or {})}
    tracer = Tracer({})
    try:
        sig = inspect.signature(func)
    except (TypeError, ValueError):
        raise DPALogicError(f"cannot read the parameters of {func!r}") from None
    args, kwargs = [], {}
    for i, (name, p) in enumerate(sig.parameters.items()):
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            continue
        if i == 0 and name in ("self", "cls"):
            value: Any = Namespace(tracer, hp)
        elif name in mapping:
            value = Traced(ROLES[mapping[name]], tracer)
        elif p.default is not p.empty or name in hp:
            value = tracer.hyper(name, None if p.default is p.empty else p.default, hp)
        else:
            raise DPALogicError(
                f"the parameter {name!r} is neither a log-probability nor a hyperparameter: map it with --arg "
                f"{name}={'|'.join(ROLES)}, or give it a value with --hp {name}=…"
            )
        if p.kind == p.KEYWORD_ONLY:
            kwargs[name] = value
        else:
            args.append(value)
    try:
        out = call_traced(func, args, kwargs, tracer)
    except DPALogicError:
        raise
    except Exception as e:  # the traced code itself failed on a stand-in: say where, not a traceback
        raise TraceError(f"tracing {getattr(func, '__qualname__', func)} failed: {type(e).__name__}: {e}") from None
    return _result_expr(out)


def decompile_python(spec: str, args: list[str] | None = None, hp: list[str] | dict | None = None) -> dict[str, Any]:
    """``dpalogic decompile --python FILE.py:FUNCTION``: trace, then decompile the traced expression."""
    func = load_function(spec)
    values = hp if isinstance(hp, dict) else parse_hp(hp)
    expr = trace_function(func, parse_args_map(args), values)
    info = report(decompile_expression(expr, str(expr)))
    info["python"] = spec
    return info


__all__ = ["KNOWN_NAMES", "ROLES", "decompile_python", "load_function", "parse_hp", "trace_function"]
