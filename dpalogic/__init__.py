"""dpalogic: preference losses as symbolic programs (Richardson, Srikumar & Sabharwal, ICML 2025).

The pipeline, one subpackage per stage:

    grammar/preference.lark   the language of formulas
    dpalogic.language         formula text → SymPy Boolean IR and printers; equations and links parsed safely
    dpalogic.logic            preference structures (P, P_C, P_A), their sides (✓, ✗), truth tables
    dpalogic.semantics        the log-space circuit IR, links as SymPy expressions, loss programs, the catalog
    dpalogic.analysis         order, compare, decompile, lattice, landscape (exact counts by factoring)
    dpalogic.compile          programs → generated modules (a fused Triton kernel and its torch twin)
    dpalogic.runtime          PreferenceLoss, FusedLinearPreferenceLoss, the backend rule (imported lazily)
    dpalogic.training         the training loop (accelerate, FSDP2, LoRA), data, checkpoints, the demo
    dpalogic.integrations     the TRL adapter
    dpalogic.cli              the ``dpalogic`` command
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from dpalogic.errors import (
    DegenerateStructureError,
    DPALogicError,
    FormulaSyntaxError,
    NoPolicyAtomWarning,
    UnknownNameError,
)
from dpalogic.language.syntax import parse_formula
from dpalogic.logic.structure import Structure
from dpalogic.semantics.program import Program, Term

__version__ = "0.1.0"

__all__ = [
    "DPALogicError",
    "DegenerateStructureError",
    "FormulaSyntaxError",
    "FusedLinearPreferenceLoss",
    "NoPolicyAtomWarning",
    "PreferenceLoss",
    "Program",
    "Structure",
    "Term",
    "UnknownNameError",
    "parse_formula",
]

if TYPE_CHECKING:  # pragma: no cover
    from dpalogic.runtime.fused import FusedLinearPreferenceLoss
    from dpalogic.runtime.preference_loss import PreferenceLoss


def __dir__() -> list[str]:
    # the lazily imported torch-facing names are public too: list them without importing torch
    return sorted(set(__all__) | {"__version__"} | {n for n in globals() if n.startswith("__") and n.endswith("__")})


def __getattr__(name: str):
    # torch is imported only when a torch-facing object is asked for (fast start for symbolic commands)
    if name == "PreferenceLoss":
        from dpalogic.runtime.preference_loss import PreferenceLoss

        return PreferenceLoss
    if name == "FusedLinearPreferenceLoss":
        from dpalogic.runtime.fused import FusedLinearPreferenceLoss

        return FusedLinearPreferenceLoss
    raise AttributeError(f"module 'dpalogic' has no attribute {name!r}")
