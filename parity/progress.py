"""Where a run is, for the person waiting on it: one message when a stage starts and one when it ends, with
its time, on the logger `parity.progress` (INFO). The library stays silent unless someone listens; the CLI
prints them (parity.cli: dim lines on a terminal, plain one-line messages in a pipe or a CI log)."""

from __future__ import annotations

import logging
import time
from contextlib import contextmanager
from typing import Iterator

log = logging.getLogger("parity.progress")


@contextmanager
def stage(name: str, detail: str = "") -> Iterator[None]:
    what = f"{name} ({detail})" if detail else name
    log.info("%s ...", what)
    t = time.perf_counter()
    try:
        yield
    finally:
        log.info("%s: %.1f s", what, time.perf_counter() - t)
