"""Where a run is, for the person waiting on it, on the logger `parity.progress`: one INFO message when a stage
starts and one when it ends, with its time (`stage`), and a DEBUG message per decoder layer a stage finishes
(`layer_done`: the reference capture and the engine's replay report theirs). The library stays silent unless
someone listens; the CLI does (parity.cli): on a terminal a rich progress bar per stage with its layers, elapsed
time and ETA (`StageProgress`), in a pipe or a CI log the stage messages only, as plain one-line messages.

Each record carries its stage and event as attributes (`parity_stage`, `parity_event`: "start", "layer" or
"end", with `parity_layers` (done, total) or `parity_seconds`), so a handler needs no parsing."""

from __future__ import annotations

import logging
import time
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Iterator, MutableMapping

log = logging.getLogger("parity.progress")
_current: ContextVar[str | None] = ContextVar("parity_progress_stage", default=None)


@contextmanager
def stage(name: str, detail: str = "") -> Iterator[None]:
    what = f"{name} ({detail})" if detail else name
    log.info("%s ...", what, extra={"parity_stage": what, "parity_event": "start"})
    token = _current.set(what)
    t = time.perf_counter()
    try:
        yield
    finally:
        _current.reset(token)
        took = time.perf_counter() - t
        log.info("%s: %.1f s", what, took, extra={"parity_stage": what, "parity_event": "end", "parity_seconds": took})


def layer_done(done: int, total: int) -> None:
    """`done` of `total` decoder layers of the current pass are through (a stage may make several passes: the
    reference and its noise floor, the engine end to end and teacher-forced)."""
    if log.isEnabledFor(logging.DEBUG):
        log.debug("%s: layer %d/%d", _current.get() or "run", done, total,
                  extra={"parity_stage": _current.get(), "parity_event": "layer", "parity_layers": (done, total)})


class StageProgress(logging.Handler):
    """parity.progress records as rich progress bars on a terminal: one bar per stage, filled by its layers,
    with elapsed time and ETA; a finished stage leaves one dim line with its time. `close()` stops the display."""

    def __init__(self, console) -> None:
        from rich.progress import (BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn,
                                   TimeRemainingColumn)

        super().__init__(logging.DEBUG)
        self.console = console
        self.start = time.perf_counter()
        self.bars = Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(),
                             TextColumn("{task.fields[layers]}"), TimeElapsedColumn(),
                             TextColumn("ETA"), TimeRemainingColumn(), console=console, transient=True)
        self.tasks: dict[str, int] = {}

    def emit(self, record: logging.LogRecord) -> None:
        name, event = getattr(record, "parity_stage", None), getattr(record, "parity_event", None)
        if event == "start":
            self.bars.start()
            self.tasks[name] = self.bars.add_task(name, total=None, layers="")  # a stage with no layers: no count
        elif event == "layer" and name in self.tasks:
            done, total = record.parity_layers
            task = self.tasks[name]
            if done < self.bars.tasks[self._index(task)].completed:
                self.bars.reset(task, total=total)  # the stage's next pass
            self.bars.update(task, completed=done, total=total, layers=f"{done}/{total} layers", refresh=True)
        elif event == "end":
            task = self.tasks.pop(name, None)
            if task is not None:
                self.bars.remove_task(task)
            self._line(f"parity: [{time.perf_counter() - self.start:6.1f} s] {record.getMessage()}")
            if not self.tasks:
                self.bars.stop()
        elif event is None:  # a message of no stage
            self._line(f"parity: {record.getMessage()}")

    def _line(self, text: str) -> None:
        from rich.text import Text

        self.bars.console.print(Text(text, style="dim"))

    def _index(self, task: int) -> int:
        return next(i for i, t in enumerate(self.bars.tasks) if t.id == task)

    def close(self) -> None:
        self.bars.stop()
        super().close()


@contextmanager
def timed(timings: MutableMapping[str, float], name: str, detail: str = "") -> Iterator[None]:
    """A stage shown as `stage` shows it, its seconds added to `timings[name]` (the report's timings)."""
    t = time.perf_counter()
    try:
        with stage(name, detail):
            yield
    finally:
        timings[name] = timings.get(name, 0.0) + time.perf_counter() - t
