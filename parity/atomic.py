"""Atomic writes: a file or a folder appears whole or not at all.

Everything parity writes that another step (or a later run) trusts goes through here: workspaces, disguises,
quantized folders, truncated models and fixture models (`replaced_folder`), and report, trace and stamp files
(`replaced_file`, `write_file`). Each is built under a unique hidden temp name beside its target, then renamed onto
it, so a reader sees the old target or the complete new one, never a half-written one; the temp is removed on every
exit path (an exception in the writer included). A kill between build and rename leaves only a hidden sibling,
which `remove_leftovers` clears (under a lock that keeps other writers out, or only a dead writer's).
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import uuid
from pathlib import Path
from typing import Callable, Iterator

_OLD = "old"


def _tag() -> str:
    return f"{os.getpid()}.{uuid.uuid4().hex[:12]}"


def _sibling(target: Path, label: str) -> Path:
    return target.parent / f".{target.name}.{label}.{_tag()}"


def _temp_file(target: Path) -> Path:
    return target.parent / f".{target.name}.{_tag()}.tmp"


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(OSError):
            path.unlink()


@contextlib.contextmanager
def replaced_folder(dest: str | os.PathLike, label: str = "tmp",
                    keep: Callable[[Path], bool] | None = None) -> Iterator[Path]:
    """Yield a temp folder path beside `dest` (not created: the body makes it) and, when the body returns, move
    it onto `dest`. An existing `dest` is renamed aside first and put back if the final rename fails, then
    removed; with `keep`, an existing `dest` for which `keep(dest)` is true (another writer finished first) is
    kept and the new build discarded. The temp folder is removed on every exit path."""
    dest = Path(dest)
    tmp = _sibling(dest, label)
    try:
        yield tmp
        if keep is not None and keep(dest):
            return
        _install(tmp, dest)
    finally:
        if tmp.exists() or tmp.is_symlink():
            _remove(tmp)


def _install(tmp: Path, dest: Path) -> None:
    if not (dest.exists() or dest.is_symlink()):
        os.rename(tmp, dest)
        return
    old = _sibling(dest, _OLD)
    os.rename(dest, old)
    try:
        os.rename(tmp, dest)
    except BaseException:
        os.rename(old, dest)
        raise
    _remove(old)


@contextlib.contextmanager
def replaced_file(path: str | os.PathLike, fsync: bool = True) -> Iterator[Path]:
    """Yield a temp file path beside `path` for the body to write; when the body returns, flush it to disk
    (`fsync`, for files a user keeps) and `os.replace` it onto `path` with the permissions a plain open() gives.
    The temp file is removed on every exit path."""
    path = Path(path)
    tmp = _temp_file(path)
    try:
        yield tmp
        if fsync:
            fd = os.open(tmp, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        os.replace(tmp, path)
    finally:
        if tmp.exists() or tmp.is_symlink():
            _remove(tmp)


def write_file(path: str | os.PathLike, data: str | bytes, fsync: bool = True) -> Path:
    """Write `data` (text as UTF-8 with "\\n" line ends, or bytes) to `path` atomically (`replaced_file`).
    OSError (an unwritable folder, a full disk) propagates after the temp file is removed."""
    path = Path(path)
    raw = data.encode("utf-8") if isinstance(data, str) else data
    with replaced_file(path, fsync) as tmp:
        tmp.write_bytes(raw)
    return path


def remove_leftovers(dest: str | os.PathLike, label: str = "tmp", dead_writers_only: bool = False) -> list[Path]:
    """Remove the temp and set-aside folders a killed `replaced_folder(dest, label)` left beside `dest`.
    Only safe while no other process writes `dest` (hold the caller's lock); without such a lock,
    `dead_writers_only` removes only those whose writer (the process id in the name) no longer runs on this
    machine."""
    dest = Path(dest)
    pattern = re.compile(rf"^\.{re.escape(dest.name)}\.(?:{re.escape(label)}|{_OLD})\.(\d+)\.[0-9a-f]{{12}}$")
    removed = []
    if dest.parent.is_dir():
        for p in dest.parent.iterdir():
            m = pattern.match(p.name)
            if m and not (dead_writers_only and _running(int(m.group(1)))):
                _remove(p)
                removed.append(p)
    return removed


def _running(pid: int) -> bool:
    """Whether process `pid` exists here (a live one of another user counts; a reused id keeps a leftover)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
