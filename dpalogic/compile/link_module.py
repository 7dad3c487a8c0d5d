"""A link alone, ``f(z)`` and ``f′(z)``, generated with the same emitter as the pair modules' links.

K-answer programs compute ``log ρ`` with vectorized torch (:mod:`dpalogic.runtime.listwise`); what follows —
the link and its derivative — is printed from the link's SymPy expression exactly as in a compiled pair module, so a
link means the same code in both places.
"""

from __future__ import annotations

import types
from collections.abc import Mapping
from functools import lru_cache

from dpalogic.compile.emit import _Body, _Constants, _emit_link
from dpalogic.compile.helpers import _TORCH_DEPS, _TORCH_HELPERS, _closure
from dpalogic.semantics.links import LINKS


def link_source(link: str, params: Mapping[str, float]) -> str:
    """Source of ``link_and_grad(z) -> (f(z), f′(z))`` for torch, with the link's parameters as constants."""
    body = _Body("")
    const = _Constants()
    negated = _emit_link(body, LINKS[link], 1, dict(params), const, ("z", "-z"))
    lines = ["import torch", ""]
    for n in _closure(body.used, _TORCH_DEPS):
        lines += [*_TORCH_HELPERS[n].strip("\n").split("\n"), "", ""]
    lines += ["def link_and_grad(z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:"]
    lines += ["    " + x for x in const.lines + body.lines]
    lines.append("    return f1, " + ("-ndf1" if negated else "df1"))
    return "\n".join(lines) + "\n"


def link_function(link: str, params: Mapping[str, float]):
    """The loaded ``link_and_grad`` of a link with these parameter values (generated once per link and values)."""
    return _link_function(link, tuple(sorted(params.items())))


@lru_cache(maxsize=64)
def _link_function(link: str, params: tuple[tuple[str, float], ...]):
    from dpalogic.compile.codegen import load

    source = link_source(link, dict(params))
    return load(types.SimpleNamespace(name="link", source=source)).link_and_grad
