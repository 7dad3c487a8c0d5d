"""What a run reports as it goes: ``out/log.jsonl``, accelerate's TensorBoard tracker, the callbacks, and the
Ctrl-C / SIGTERM handling that turns an interrupt into a checkpoint."""

from __future__ import annotations

import json
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from dpalogic.training.resume import LOG_FILE, trim_log


def say(msg: str, quiet: bool) -> None:
    """A message on stderr that does not break a live progress bar."""
    if not quiet:
        from tqdm import tqdm

        tqdm.write(msg, file=sys.stderr)


class RunLog:
    """The run's records: kept in :attr:`history` on every rank, written and tracked on rank 0, passed to callbacks."""

    def __init__(self, out: Path, acc, callbacks: list[Callable[[dict[str, Any]], None]]) -> None:
        self.out = out
        self.acc = acc
        self.callbacks = callbacks
        self.history: list[dict[str, Any]] = []
        self.tracking = False

    def open(self, step: int, say: Callable[[str], None]) -> None:
        """Start (or, resuming at ``step``, continue) the log, and the tracker when one was asked for."""
        if not self.acc.is_main_process:
            return
        self.out.mkdir(parents=True, exist_ok=True)
        log = self.out / LOG_FILE
        if log.exists():
            trim_log(log, step, say)
        if self.acc.log_with:  # tensorboard when asked for and installed (accelerate's tracker): out/tensorboard
            self.acc.init_trackers("tensorboard")
            self.tracking = True

    def __call__(self, record: dict[str, Any]) -> None:
        self.history.append(record)
        if self.acc.is_main_process:
            with (self.out / LOG_FILE).open("a") as f:
                f.write(json.dumps(record) + "\n")
            if self.tracking:
                values = {f"{record['split']}/{k}": v for k, v in record.items() if k not in ("step", "epoch")}
                self.acc.log({k: v for k, v in values.items() if isinstance(v, (int, float))}, step=record["step"])
        for cb in self.callbacks:
            cb(record)


@contextmanager
def interrupts(on_signal: Callable[[int, Any], None]) -> Iterator[None]:
    """``on_signal`` handles SIGINT and SIGTERM inside the block; the previous handlers come back after it."""
    handlers = {}
    if threading.current_thread() is threading.main_thread():  # handlers can only be installed from the main thread
        for s in (signal.SIGINT, signal.SIGTERM):
            handlers[s] = signal.signal(s, on_signal)
    try:
        yield
    finally:
        for s, h in handlers.items():
            signal.signal(s, h)
