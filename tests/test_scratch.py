"""A run's footprint on disk: its temp folders are gone after every way a run can end (a kill -9 included, at the
next start), and two runs into one --out do not overwrite each other. Real `parity run` processes, real signals."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from parity.cli import main
from parity.deploy.convert import convert_cached
from parity.locks import try_lock
from parity.scratch import LOCK_NAME, ROOT_PREFIX, out_lock, remove_stale_roots, run_scratch

REPO = Path(__file__).resolve().parents[1]
CACHE = REPO / ".cache"


@pytest.fixture
def model_ws(fixture_models):
    model = fixture_models["xcomposer2-tiny"]
    return model, convert_cached(model, CACHE / "workspaces")


def _start_run(model: Path, ws: Path, out: Path, tmp: Path) -> subprocess.Popen:
    code = "import sys; from parity.cli import main; sys.exit(main(sys.argv[1:]))"
    argv = [sys.executable, "-c", code, "run", str(model), "--trust-remote-code", "--workspace", str(ws),
            "--out", str(out), "--cache-dir", str(CACHE),
            "--decode", "32"]  # seconds of work left after the first traces: the signal lands mid-run, not after it
    return subprocess.Popen(argv, env={**os.environ, "TMPDIR": str(tmp)}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=tmp.parent, preexec_fn=_interruptible)


def _interruptible() -> None:
    """In the child: SIGINT back to its default. A suite started as a background job of a script (CI) inherits
    SIGINT *ignored* (POSIX shells without job control do that to `&` jobs), and Python then never raises
    KeyboardInterrupt: the run ignored the signal and exited 0. A user's terminal delivers it; so does this."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _wait_for(pred, proc: subprocess.Popen, what: str, timeout: float = 240) -> None:
    end = time.monotonic() + timeout
    while not pred():
        if proc.poll() is not None:
            pytest.fail(f"the run ended (rc {proc.returncode}) before {what}: {proc.stderr.read()}")
        if time.monotonic() > end:
            proc.kill()
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.05)


def _traces_written(tmp: Path):
    return lambda: any(tmp.glob(f"{ROOT_PREFIX}*/parity-ref-*/*"))


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT, signal.SIGHUP], ids=lambda s: s.name)
def test_temp_root_removed_when_the_run_is_signalled(model_ws, tmp_path, sig):
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    proc = _start_run(*model_ws, tmp_path / "out", tmp)
    _wait_for(_traces_written(tmp), proc, "the reference traces were being written")
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == (130 if sig == signal.SIGINT else 128 + sig), err
    assert "Traceback" not in err and "temp folders removed" in err, err
    assert list(tmp.iterdir()) == []
    assert not (tmp_path / "out").exists()  # no half-written report


def test_killed_run_is_cleaned_at_the_next_start(model_ws, tmp_path, monkeypatch):
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    proc = _start_run(*model_ws, tmp_path / "out", tmp)
    _wait_for(_traces_written(tmp), proc, "the reference traces were being written")
    proc.kill()  # SIGKILL: nothing in the process can clean up
    proc.communicate(timeout=60)
    stale = list(tmp.glob(f"{ROOT_PREFIX}*"))
    assert len(stale) == 1 and any(stale[0].glob("parity-ref-*"))  # what a kill leaves behind
    # a live run's root beside it must survive the cleaning
    live = tmp / f"{ROOT_PREFIX}999999-live"
    live.mkdir()
    fd = try_lock(live / LOCK_NAME)
    try:
        monkeypatch.setattr(tempfile, "tempdir", str(tmp))
        with run_scratch() as root:  # what every parity command does first
            assert root.parent == tmp and tempfile.gettempdir() == str(root)
            assert not any(p.exists() for p in stale)
            assert live.is_dir()
        assert sorted(tmp.iterdir()) == [live]
    finally:
        os.close(fd)
    assert remove_stale_roots(tmp) == [live]  # once its run is gone, it goes too


def test_every_temp_folder_of_a_run_is_under_its_root(model_ws, tmp_path, monkeypatch):
    """The run's stages (reference session, engine traces, worker scratch) make their folders with tempfile:
    pointing tempfile at the root catches them all, and the root is gone afterwards."""
    model, ws = model_ws
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp))
    seen: list[str] = []
    real = tempfile.mkdtemp

    def spy(*a, **k):
        path = real(*a, **k)
        seen.append(path)
        return path

    monkeypatch.setattr(tempfile, "mkdtemp", spy)
    assert main(["run", str(model), "--trust-remote-code", "--workspace", str(ws), "--out", str(tmp_path / "r"),
                 "--cache-dir", str(CACHE)]) == 0
    assert seen and all(Path(p).parent.name.startswith(ROOT_PREFIX) for p in seen), seen
    assert list(tmp.iterdir()) == []


def test_concurrent_runs_into_one_out_are_refused(model_ws, tmp_path, capsys):
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    out = tmp_path / "shared-out"
    first = _start_run(*model_ws, out, tmp)
    lock = tmp_path / ".shared-out.parity-lock"

    def locked() -> bool:
        if not lock.is_file():
            return False
        fd = try_lock(lock)
        if fd is None:
            return True
        os.close(fd)
        return False

    _wait_for(locked, first, "the first run held its report folder")
    model, ws = model_ws
    rc = main(["run", str(model), "--trust-remote-code", "--workspace", str(ws), "--out", str(out),
               "--cache-dir", str(CACHE)])
    err = capsys.readouterr().err
    assert rc == 2, err
    assert "in use by another parity run" in err and f"pid {first.pid}" in err and str(out) in " ".join(err.split())
    _, ferr = first.communicate(timeout=300)
    assert first.returncode == 0, ferr
    assert (out / "report.json").is_file() and not lock.exists()
    with out_lock(out):  # free again once the first run ended
        pass
