"""Compiler backend: a loss program becomes a self-contained Python module with a fused Triton kernel.

For every program ``loss = Σ_k c_k · f_k(β_k · log ρ_k − γ_k)`` the generator writes straight-line code, once for
Triton and once for torch (the *twin*, same statements, torch functions), that computes the per-pair loss **and** its
derivative with respect to every log-probability input in one pass:

* each side's ``log WMC`` is its circuit (:mod:`dpalogic.semantics.circuit`), emitted by a fold: a positive literal
  is the log-prob itself, a negative one ``log1mexp`` of it, a product a sum and a genuine sum ``logaddexp`` — DPO's
  kernel is one logistic of four log-probs, ORPO's needs two ``log1mexp`` and no enumeration of worlds;
* derivatives are reverse mode over the same DAG (adjoints summed where subcircuits are shared), emitted as
  straight-line code: ``∂/∂a logaddexp(a, b) = σ(a − b)``, ``∂/∂x log1mexp(x) = −eˣ/(1 − eˣ)``;
* each link ``f`` and ``f′`` are printed from the link's SymPy expression (:mod:`dpalogic.semantics.links`) and
  SymPy's derivative of it, with shared parts computed once; the stable primitives (softplus, sigmoid, log1mexp,
  logaddexp) are the only hand-written helpers, once per backend;
* hyperparameters are kernel arguments (floats); token counts are inputs where a term is length-normalized.

The generated module holds ``loss_and_grads_torch`` (the twin), ``loss_and_grads_triton`` (launches the kernel), a
``torch.autograd.Function`` that saves the gradients and scales them by ``grad_output`` in backward, and
``per_pair_loss(..., backend=)``. It imports triton lazily (guarded), so it imports and runs its torch twin on machines
without triton. Output is deterministic (no timestamps, sorted names): ``dpalogic compile --catalog`` rewrites
``generated/`` byte for byte.

This module imports only SymPy and dpalogic's symbolic stages; torch is needed only to *load* a generated module.
"""

from __future__ import annotations

import hashlib
import keyword
import linecache
import os
import shlex
import sys
import types
from pathlib import Path

from dpalogic.compile.emit import check_link  # noqa: F401 - re-exported
from dpalogic.compile.module import BLOCK, Compiled, compile_program  # noqa: F401 - re-exported
from dpalogic.compile.names import input_name, length_answers, length_name  # noqa: F401 - re-exported
from dpalogic.errors import DPALogicError
from dpalogic.semantics.program import Program

REGENERATE = "dpalogic compile --catalog"

# --------------------------------------------------------------------------------------------------- catalog & loading


def compile_catalog_entry(name: str) -> Compiled:
    from dpalogic.semantics.catalog import lookup

    e = lookup(name)
    return compile_program(e.program, e.name, title=e.title, citation=e.citation)


def compile_spec(
    spec, name: str | None = None, command: str | None = None, link: str | None = None, hyperparameters=None
) -> Compiled:
    """A catalog name, structure text, Structure or Program → its compiled module source.

    ``command`` is the command line written into the header as the way to regenerate the file; ``link`` an
    expression in ``z`` that replaces the preference terms' link (its parameters' defaults from ``hyperparameters``).
    """
    from dpalogic.semantics.catalog import entries, resolve
    from dpalogic.semantics.program import with_link

    key = spec.strip().lower().replace("-", "_") if isinstance(spec, str) else None
    if key in entries() and name in (None, key) and link is None and not hyperparameters:
        return compile_catalog_entry(key)
    program = resolve(spec)
    if link is not None:
        program = with_link(program, link, hyperparameters)
    if hyperparameters:  # every name the program's (a misspelling is refused), β and γ too beside a link's own
        program = program.with_hyperparameters(**program.bind(**hyperparameters))
    origin = None
    if isinstance(spec, str) and program.name is None:
        origin = f"the structure {spec.strip()!r}"
    name = name or program.name or "derived"
    command = command or (
        f"dpalogic compile {_shell_quote(spec.strip())} --name {name}" if isinstance(spec, str) else REGENERATE
    )
    return compile_program(program, name, origin=origin, command=command)


def _shell_quote(text: str) -> str:
    return shlex.quote(text)


_LOADED: dict[str, types.ModuleType] = {}


def load(compiled: Compiled) -> types.ModuleType:
    """Import a generated module from its source (cached by content); triton sees its source through linecache."""
    digest = hashlib.sha256(compiled.source.encode()).hexdigest()[:16]
    # @triton.jit picks the interpreter or the compiler when the module is executed: one module per mode
    mode = "interpret" if os.environ.get("TRITON_INTERPRET") == "1" else "jit"
    key = f"{digest}_{mode}"
    if key in _LOADED:
        return _LOADED[key]
    modname = f"dpalogic_generated_{compiled.name}_{key}"
    filename = f"<dpalogic-generated {compiled.name} {key}>"
    linecache.cache[filename] = (len(compiled.source), None, compiled.source.splitlines(True), filename)
    mod = types.ModuleType(modname)
    mod.__file__ = filename
    sys.modules[modname] = mod
    exec(compile(compiled.source, filename, "exec"), mod.__dict__)
    _LOADED[key] = mod
    return mod


def module_for(program: Program) -> types.ModuleType:
    """The loaded generated module of a program (what ``PreferenceLoss(backend=...)`` runs)."""
    return load(compile_program(program, _ident_from(program.name)))


def _ident_from(name: str | None) -> str:
    if not name:
        return "derived"
    out = "".join(c if c.isalnum() or c == "_" else "_" for c in name)
    return out if out.isidentifier() and not keyword.iskeyword(out) else "derived"


GENERATED_MARK = '"""Generated by dpalogic'


def refuse_to_clobber(path: Path, overwrite: bool) -> None:
    """Replacing an earlier generated module is regeneration; replacing anything else needs ``--overwrite``."""
    if overwrite or not path.exists():
        return
    if path.is_dir():
        raise DPALogicError(f"{str(path)!r} is a folder: give a file path for --out")
    try:
        with path.open(encoding="utf-8") as f:
            head = f.read(len(GENERATED_MARK))
    except (OSError, UnicodeDecodeError):
        head = ""
    if head != GENERATED_MARK:
        raise DPALogicError(f"{str(path)!r} exists and was not generated by dpalogic; pass --overwrite to replace it")


def write_catalog(out_dir: Path, overwrite: bool = False) -> list[Path]:
    """Write ``<out_dir>/<name>.py`` for every catalog loss; returns the paths written.

    A file there that dpalogic did not generate is left alone (an error) unless ``overwrite``.
    """
    from dpalogic.semantics.catalog import entries

    out_dir.mkdir(parents=True, exist_ok=True)
    names = sorted(entries())
    for name in names:
        refuse_to_clobber(out_dir / f"{name}.py", overwrite)
    paths = []
    for name in names:
        path = out_dir / f"{name}.py"
        path.write_text(compile_catalog_entry(name).source, encoding="utf-8")
        paths.append(path)
    return paths
