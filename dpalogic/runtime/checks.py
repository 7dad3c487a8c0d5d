"""The one check of log-prob values, for PreferenceLoss, the K-answer evaluator and every generated module.

:func:`check_log_probs` is pure (torch only, no dpalogic names) so that :mod:`dpalogic.compile.module` copies its source
into each generated module, as it does the backend rule: the modules run without dpalogic, and check what they are
given inside their autograd function, where stacking the inputs records no graph.
"""

from __future__ import annotations

from collections.abc import Sequence  # generated modules import it too

import torch


def check_log_probs(tensors: Sequence[torch.Tensor], names: Sequence[str], error: type = ValueError) -> None:
    """Refuse probabilities or logits passed by mistake: every value must be at most 0 (up to 1e-2 above it is
    rounding in a log-softmax sum). ``names[i]`` names ``tensors[i]`` in the message.

    One max is a single pass over a tensor, a third of what a comparison and any() cost, and amax a quarter faster than
    max() on large ones (it keeps no index). Up to 2^14 values in all, one max over the stacked inputs: per-op overhead
    dominates small tensors (4 × 1k values: 4 µs stacked, 7 µs one by one); beyond, the stack's new buffer costs more
    than it saves. NaN itself passes (a tensor holding one is compared value by value, so its other values are still
    checked) and gives a NaN loss: a diverged model's log-probs
    are the training loop's to stop on, with the last good checkpoint kept, on every rank alike — an exception on one
    rank would leave the others waiting.
    """
    slack = 1e-2
    if torch.is_grad_enabled():  # outside an autograd function: keep the check out of the graph
        tensors = [t.detach() for t in tensors]
    if not tensors or not tensors[0].numel():
        return
    if 1 < len(tensors) and len(tensors) * tensors[0].numel() <= 1 << 14:
        try:  # one shape (a mixed dtype is promoted): the usual case, and asking would cost more than trying
            worst = float(torch.amax(torch.stack(tensors)))
        except RuntimeError:  # shapes differ: one by one below
            worst = float("nan")
        if worst <= slack:  # NaN compares false: one by one below
            return
    for name, t in zip(names, tensors):
        worst = float(torch.amax(t)) if t.numel() else 0.0
        if worst != worst:  # a NaN: the max says nothing of the other values; the slower comparison does
            above = t[t > slack]
            worst = float(torch.amax(above)) if above.numel() else 0.0
        if worst > slack:
            raise error(
                f"log-probabilities must be <= 0: {name} has {worst:.6g} (pass summed log-probs, not probabilities "
                "or logits)"
            )
