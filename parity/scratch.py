"""What a run holds on disk while it runs: one temp root, and a lock on its report folder.

Temp root: every temporary folder of a run (reference and engine traces, worker scratch, transformers' remote
code copies) is made under `<tmp>/parity-run-<pid>-<random>/`, because `tempfile`'s default folder (and
`TMPDIR`, which spawned `--jobs` workers read) point into it for the run. The root is removed when the run ends
— normally, on an error, on Ctrl-C, and on SIGTERM/SIGHUP where the CLI turns those into an exception. A run
killed outright (SIGKILL, the OOM killer) cannot clean up; its root still holds a lock file whose `flock` the
kernel released with the process, so the next run removes it at start.

Report lock: two runs writing one `--out` would overwrite each other's report.json / report.html halfway. A
run takes an exclusive `flock` on `<out parent>/.<out name>.parity-lock` for its whole duration; a second run
into the same folder is refused at once (exit 2) naming the other run's pid.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import tempfile
import uuid
from pathlib import Path
from typing import Iterator

from .errors import ParityInputError
from .locks import try_lock

ROOT_PREFIX = "parity-run-"
LOCK_NAME = ".lock"
_active: list[Path] = []  # the temp root of the run in progress in this process (nested runs reuse it)


def remove_stale_roots(parent: Path | str | None = None) -> list[Path]:
    """Remove the temp roots under `parent` (default: the temp folder) whose run is gone; returns them."""
    parent = Path(parent or tempfile.gettempdir())
    removed = []
    for root in sorted(parent.glob(f"{ROOT_PREFIX}*")):
        if not root.is_dir() or root.is_symlink():
            continue
        lock = root / LOCK_NAME
        if not lock.is_file():
            # a root whose lock was never written: created in the instant before; leave it to its run
            continue
        fd = try_lock(lock)
        if fd is None:
            continue  # its run is alive
        try:
            shutil.rmtree(root, ignore_errors=True)
            removed.append(root)
        finally:
            os.close(fd)
    return removed


@contextlib.contextmanager
def run_scratch() -> Iterator[Path]:
    """The run's temp root (see the module docstring); nested uses share the outer root."""
    if _active:
        yield _active[-1]
        return
    base = Path(tempfile.gettempdir())
    remove_stale_roots(base)
    root = base / f"{ROOT_PREFIX}{os.getpid()}-{uuid.uuid4().hex[:8]}"
    root.mkdir(mode=0o700)
    fd = try_lock(root / LOCK_NAME)
    saved_tempdir, saved_env = tempfile.tempdir, os.environ.get("TMPDIR")
    tempfile.tempdir = str(root)
    os.environ["TMPDIR"] = str(root)
    _active.append(root)
    try:
        yield root
    finally:
        _active.pop()
        tempfile.tempdir = saved_tempdir
        if saved_env is None:
            os.environ.pop("TMPDIR", None)
        else:
            os.environ["TMPDIR"] = saved_env
        shutil.rmtree(root, ignore_errors=True)
        if fd is not None:
            os.close(fd)


class Terminated(BaseException):
    """SIGTERM or SIGHUP arrived: unwinds the run like Ctrl-C does, so every `finally` cleans up."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


@contextlib.contextmanager
def terminate_as_exception() -> Iterator[None]:
    """For the CLI's main thread: SIGTERM/SIGHUP raise `Terminated` instead of ending the process on the spot."""
    def handler(signum, frame):
        raise Terminated(signum)

    saved = {}
    for sig in (signal.SIGTERM, signal.SIGHUP):
        try:
            saved[sig] = signal.signal(sig, handler)
        except ValueError:  # not the main thread: leave signals alone
            break
    try:
        yield
    finally:
        for sig, old in saved.items():
            signal.signal(sig, old)


@contextlib.contextmanager
def out_lock(out: Path | str) -> Iterator[Path]:
    """Hold the report folder `out` for this run; a second run into it is refused (ParityInputError)."""
    out = Path(out)
    parent = out.resolve().parent
    parent.mkdir(parents=True, exist_ok=True)
    path = parent / f".{out.resolve().name}.parity-lock"
    while True:
        fd = try_lock(path)
        if fd is None:
            try:
                holder = path.read_text().strip() or "unknown"
            except OSError:
                holder = "unknown"
            raise ParityInputError(
                f"Report folder {out} is in use by another parity run (pid {holder}); two runs into one --out "
                "would overwrite each other's report. Wait for it, or give this run its own --out.")
        # the holder before us may have removed the file after we opened it: only the file at `path` counts
        try:
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    try:
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        yield path
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        os.close(fd)
