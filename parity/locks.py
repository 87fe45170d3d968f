"""Exclusive locks between processes: `flock` on a lock file, released by the kernel when its holder exits
(a killed holder included), so a lock is never left stale. Used where several processes (pytest -n, --jobs,
two users) may write one thing: a cache entry (`held_lock`), a run's temp root and report folder (`try_lock`)."""

from __future__ import annotations

import contextlib
import fcntl
import os
import time
from pathlib import Path
from typing import Iterator

from .errors import ParityInputError


def _open(path: Path, hint: str) -> int:
    try:
        return os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    except OSError as e:
        raise ParityInputError(f"Cannot create the lock file {path} ({e.strerror or e}); expected {hint}.") from None


def try_lock(path: Path | str, hint: str = "a writable folder") -> int | None:
    """An fd holding an exclusive flock on `path` (created if absent), or None when another process holds it.
    Closing the fd releases the lock."""
    fd = _open(Path(path), hint)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    except OSError as e:  # e.g. ENOLCK: a file system without locks
        os.close(fd)
        raise ParityInputError(f"Cannot lock {path} ({e.strerror or e}); expected {hint} on a file system "
                               "that supports file locks.") from None
    return fd


@contextlib.contextmanager
def held_lock(path: Path | str, timeout: float | None = None, hint: str = "a writable folder") -> Iterator[None]:
    """Hold an exclusive flock on `path` for the block, waiting while another process holds it (at most
    `timeout` seconds, then TimeoutError; None: as long as it takes)."""
    path = Path(path)
    fd = _open(path, hint)
    try:
        if timeout is None:
            fcntl.flock(fd, fcntl.LOCK_EX)
        else:
            deadline = time.monotonic() + timeout
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() > deadline:
                        raise TimeoutError(f"could not lock {path} within {timeout} s") from None
                    time.sleep(0.05)
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the lock


def entry_lock(path: Path | str) -> contextlib.AbstractContextManager[None]:
    """The lock one cache entry is filled under: one process converts (or quantizes), the others wait for
    it and reuse its result."""
    return held_lock(path, hint="a writable cache folder (for `parity run`, --cache-dir)")
