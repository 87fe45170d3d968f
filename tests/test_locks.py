"""parity.locks: one process at a time holds a lock; a killed holder leaves none behind."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from parity.errors import ParityInputError
from parity.locks import held_lock, try_lock

REPO = str(Path(__file__).resolve().parents[1])


def _holder(path: Path) -> subprocess.Popen:
    """Another process that takes the lock, says so, and keeps it until killed."""
    proc = subprocess.Popen([sys.executable, "-c", (
        "import sys, time\n"
        "from parity.locks import held_lock\n"
        "with held_lock(sys.argv[1]):\n"
        "    print('held', flush=True)\n"
        "    time.sleep(120)\n"), str(path)], stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": REPO})
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_a_held_lock_refuses_others_and_is_free_once_its_holder_is_killed(tmp_path):
    lock = tmp_path / ".entry.lock"
    proc = _holder(lock)
    try:
        assert try_lock(lock) is None
        t0 = time.monotonic()
        with pytest.raises(TimeoutError, match="could not lock"):
            with held_lock(lock, timeout=0.3):
                pass
        assert time.monotonic() - t0 >= 0.3
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    fd = try_lock(lock)  # the kernel released the killed holder's lock
    assert fd is not None
    os.close(fd)
    with held_lock(lock, timeout=5):
        assert try_lock(lock) is None  # flock is per open file: a second open in this process is refused too


def test_a_lock_that_cannot_be_created_is_bad_input(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(ParityInputError, match="Cannot create the lock file .*writable cache folder"):
        with held_lock(tmp_path / "file" / ".x.lock", hint="a writable cache folder"):
            pass
