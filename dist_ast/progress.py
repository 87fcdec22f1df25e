"""A rich progress bar for the training loop (rank 0), silent elsewhere."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator

from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn


class _Bar:
    """Shows the loss of the last log step only: between log steps the loss is a device
    tensor, and formatting it would wait for the GPU every step (``log_metrics`` turns
    ``out["loss"]`` into a float, picked up at this update or the next)."""

    def __init__(self, progress: Progress | None, total: int) -> None:
        self.progress, self.total = progress, total
        self.task = progress.add_task("train", total=total, info="") if progress else None
        self._t0, self._s0 = time.perf_counter(), 0
        self._last: dict | None = None  # the previous step's record, maybe logged since
        self._loss = ""

    def advance_to(self, step: int) -> None:
        self._s0 = step
        if self.progress is not None:
            self.progress.update(self.task, completed=step)

    def update(self, step: int, out: dict) -> None:
        if self.progress is None:
            return
        for record in (self._last, out):
            loss = None if record is None else record.get("loss")
            if isinstance(loss, int | float):  # read by a log step; a tensor is not read
                self._loss = f" loss {loss:.3f}"
        self._last = out
        rate = (step - self._s0) / max(time.perf_counter() - self._t0, 1e-9)
        sub = "all" if out.get("subnet") is None else out["subnet"]
        info = f"sub-net {sub}{self._loss} lr {out['lr']:.4f} {rate:.1f} it/s"
        self.progress.update(self.task, completed=step, info=info)


@contextlib.contextmanager
def training_progress(total: int, enabled: bool = True) -> Iterator[_Bar]:
    if not enabled:
        yield _Bar(None, total)
        return
    columns = (
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total}"),
        TextColumn("{task.fields[info]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
    )
    with Progress(*columns, transient=False) as progress:
        yield _Bar(progress, total)
