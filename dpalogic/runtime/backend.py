"""The one rule that picks Triton or torch, for PreferenceLoss, the fused path and every generated module.

:func:`backend_rule` is pure (no imports, no dpalogic names) so that :mod:`dpalogic.compile.codegen` copies its source into
each generated module, which must run without dpalogic: one rule, written once, generated everywhere else.
"""

from __future__ import annotations

import functools
import importlib.util
import os

from dpalogic.errors import DPALogicError

BACKENDS = ("auto", "triton", "torch")


def backend_rule(backend: str, is_cuda: bool, triton_ready: bool, interpreting: bool) -> tuple[bool, str]:
    """``(use Triton?, why not allowed)``: ``"torch"`` never; ``"auto"`` on CUDA when Triton is ready;
    ``"triton"`` always, but on the CPU only in Triton's interpreter. A non-empty message means refuse."""
    if backend not in ("auto", "triton", "torch"):
        return False, f"backend must be 'auto', 'triton' or 'torch', got {backend!r}"
    if backend == "torch":
        return False, ""
    if backend == "auto":
        return is_cuda and triton_ready, ""
    if not triton_ready:
        return False, "backend='triton' needs the triton package (pip install triton)"
    if not is_cuda and not interpreting:
        return False, (
            "backend='triton' needs CUDA tensors; on the CPU it runs only in Triton's interpreter: set "
            "TRITON_INTERPRET=1 before triton is imported (or use backend='torch')"
        )
    return True, ""


@functools.cache  # looked up once per process: a search of sys.path costs more than a small loss itself
def triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None


def use_triton(backend: str, tensor) -> bool:
    """Whether to run the Triton kernels on ``tensor``'s device (a :class:`DPALogicError` when it is refused)."""
    interpreting = backend == "triton" and os.environ.get("TRITON_INTERPRET") == "1"  # only "triton" asks
    yes, why = backend_rule(backend, bool(getattr(tensor, "is_cuda", False)), triton_installed(), interpreting)
    if why:
        raise DPALogicError(why)
    return yes
