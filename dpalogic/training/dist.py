"""This process's place in a training run: rank, world size, device, and the collectives the loop needs.

A thin view of an ``accelerate.Accelerator``, so that :mod:`dpalogic.training.loop` and the checkpoint code
(:mod:`dpalogic.training.resume`) ask one object for the rank, barriers and sums whether or not the run is distributed.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from dpalogic.errors import DPALogicError


class Dist:
    """This process's place in the run, read from its ``Accelerator``."""

    def __init__(self, acc, owns_group: bool) -> None:
        self.acc = acc
        self.rank: int = acc.process_index
        self.world: int = acc.num_processes
        self.device: torch.device = acc.device
        self.owns_group = owns_group

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        self.acc.wait_for_everyone()

    def sum(self, t: torch.Tensor) -> torch.Tensor:
        """``t`` summed over every rank (a new tensor)."""
        return self.acc.reduce(t, "sum")

    def on_main(self, fn: Callable[[], Any]) -> Any:
        """``fn()`` on rank 0 only (it reads and hashes files); every rank gets its result or raises its error."""
        if self.world <= 1:
            return fn()
        from accelerate.utils import broadcast_object_list

        box: list[Any] = [None, None]
        if self.main:
            try:
                box[0] = fn()
            except DPALogicError as e:
                box[1] = str(e)
        broadcast_object_list(box, from_process=0)
        if box[1] is not None:
            raise DPALogicError(box[1])
        return box[0]
