"""parity.atomic: a target is replaced whole or not at all, and no temp survives any exit path."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from parity import atomic
from parity.atomic import remove_leftovers, replaced_file, replaced_folder, write_file

REPO = str(Path(__file__).resolve().parents[1])


class WriterFailed(Exception):
    pass


def _tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _old_folder(root: Path) -> Path:
    dest = root / "model"
    (dest / "sub").mkdir(parents=True)
    (dest / "config.json").write_text('{"old": true}\n')
    (dest / "sub" / "w.bin").write_bytes(b"\x00" * 64)
    return dest


names = st.text(st.characters(min_codepoint=ord("a"), max_codepoint=ord("z")), min_size=1, max_size=8)


@settings(max_examples=30, deadline=None)
@given(files=st.dictionaries(names, st.binary(max_size=256), min_size=1, max_size=5), fail_after=st.integers(0, 5),
       exc=st.sampled_from([WriterFailed, KeyboardInterrupt, OSError]))
def test_folder_writer_failing_midway_leaves_old_folder_and_no_temp(tmp_path_factory, files, fail_after, exc):
    root = tmp_path_factory.mktemp("swap")
    dest = _old_folder(root)
    before = _tree(dest)
    with pytest.raises(exc):
        with replaced_folder(dest, "converting") as tmp:
            tmp.mkdir()
            for i, (name, data) in enumerate(files.items()):
                if i == fail_after:
                    (tmp / name).write_bytes(data[: len(data) // 2])  # a half-written file, then the failure
                    raise exc("writer failed")
                (tmp / name).write_bytes(data)
            raise exc("writer failed after the last file")
    assert _tree(dest) == before
    assert sorted(p.name for p in root.iterdir()) == ["model"]


@settings(max_examples=20, deadline=None)
@given(files=st.dictionaries(names, st.binary(max_size=256), min_size=1, max_size=5), existed=st.booleans())
def test_folder_finished_replaces_the_old_one_whole(tmp_path_factory, files, existed):
    root = tmp_path_factory.mktemp("swap")
    dest = _old_folder(root) if existed else root / "model"
    with replaced_folder(dest) as tmp:
        tmp.mkdir()
        for name, data in files.items():
            (tmp / name).write_bytes(data)
    assert _tree(dest) == files
    assert sorted(p.name for p in root.iterdir()) == ["model"]


def test_folder_final_rename_failing_puts_the_old_folder_back(tmp_path, monkeypatch):
    dest = _old_folder(tmp_path)
    before = _tree(dest)
    real_rename = os.rename

    def rename(src, dst):
        if ".converting." in Path(src).name:
            raise OSError(28, "No space left on device")
        return real_rename(src, dst)

    monkeypatch.setattr(atomic.os, "rename", rename)
    with pytest.raises(OSError, match="No space"):
        with replaced_folder(dest, "converting") as tmp:
            tmp.mkdir()
            (tmp / "config.json").write_text('{"new": true}\n')
    assert _tree(dest) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_folder_keep_leaves_a_finished_concurrent_result(tmp_path):
    dest = _old_folder(tmp_path)
    before = _tree(dest)
    with replaced_folder(dest, keep=lambda d: (d / "config.json").is_file()) as tmp:
        tmp.mkdir()
        (tmp / "config.json").write_text('{"new": true}\n')
    assert _tree(dest) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]
    (dest / "config.json").unlink()  # a half folder (no marker) is replaced
    with replaced_folder(dest, keep=lambda d: (d / "config.json").is_file()) as tmp:
        tmp.mkdir()
        (tmp / "config.json").write_text('{"new": true}\n')
    assert _tree(dest) == {"config.json": b'{"new": true}\n'}


def test_folder_replaces_a_symlink_not_its_target(tmp_path):
    target = _old_folder(tmp_path)
    before = _tree(target)
    link = tmp_path / "link"
    link.symlink_to(target, target_is_directory=True)
    with replaced_folder(link) as tmp:
        tmp.mkdir()
        (tmp / "a").write_bytes(b"new")
    assert not link.is_symlink() and _tree(link) == {"a": b"new"}
    assert _tree(target) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link", "model"]


@settings(max_examples=30, deadline=None)
@given(old=st.binary(max_size=512), new=st.binary(min_size=1, max_size=512), cut=st.integers(0, 512),
       exc=st.sampled_from([WriterFailed, KeyboardInterrupt, OSError]))
def test_file_writer_failing_midway_leaves_old_file_and_no_temp(tmp_path_factory, old, new, cut, exc):
    root = tmp_path_factory.mktemp("file")
    path = root / "report.json"
    path.write_bytes(old)
    with pytest.raises(exc):
        with replaced_file(path) as tmp:
            with open(tmp, "wb") as fh:
                fh.write(new[:cut])
            raise exc("writer failed")
    assert path.read_bytes() == old
    assert [p.name for p in root.iterdir()] == ["report.json"]


@settings(max_examples=20, deadline=None)
@given(text=st.text(max_size=200))
def test_write_file_round_trips_text_and_leaves_no_temp(tmp_path_factory, text):
    root = tmp_path_factory.mktemp("file")
    path = write_file(root / "meta.json", text)
    assert path.read_bytes() == text.encode("utf-8")
    assert [p.name for p in root.iterdir()] == ["meta.json"]


def test_write_file_permissions_are_a_plain_opens(tmp_path):
    umask = os.umask(0o022)
    try:
        write_file(tmp_path / "a.html", "x")
    finally:
        os.umask(umask)
    assert (tmp_path / "a.html").stat().st_mode & 0o777 == 0o644


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_write_file_into_a_readonly_folder_raises_and_leaves_nothing(tmp_path):
    folder = tmp_path / "ro"
    folder.mkdir()
    (folder / "a.json").write_text("old")
    folder.chmod(0o555)
    try:
        with pytest.raises(PermissionError):
            write_file(folder / "a.json", "new")
        assert [p.name for p in folder.iterdir()] == ["a.json"] and (folder / "a.json").read_text() == "old"
    finally:
        folder.chmod(0o755)


def test_write_file_under_a_file_raises_and_leaves_nothing(tmp_path):
    (tmp_path / "not-a-folder").write_text("x")
    with pytest.raises(NotADirectoryError):
        write_file(tmp_path / "not-a-folder" / "a.json", "new")
    assert [p.name for p in tmp_path.iterdir()] == ["not-a-folder"]


def _killed_writer(dest: Path) -> None:
    """A process SIGKILLed halfway through `replaced_folder(dest)`: it leaves a hidden temp folder."""
    killed = subprocess.run([sys.executable, "-c", (
        "import os, signal, sys\n"
        "from parity.atomic import replaced_folder\n"
        "with replaced_folder(sys.argv[1]) as tmp:\n"
        "    tmp.mkdir(); (tmp / 'half.bin').write_bytes(b'x')\n"
        "    os.kill(os.getpid(), signal.SIGKILL)\n"), str(dest)], env={**os.environ, "PYTHONPATH": REPO})
    assert killed.returncode == -signal.SIGKILL


def test_remove_leftovers_clears_what_a_killed_writer_left_and_nothing_else(tmp_path):
    dest = _old_folder(tmp_path)
    before = _tree(dest)
    _killed_writer(dest)
    assert _tree(dest) == before
    left = [p for p in tmp_path.iterdir() if p.name != "model"]
    assert len(left) == 1 and left[0].name.startswith(".model.tmp.")
    others = [tmp_path / ".model.stamp.json", tmp_path / ".model-4khd.tmp.1.aaaaaaaaaaaa"]
    others[0].write_text("{}")
    others[1].mkdir()
    assert remove_leftovers(dest) == left
    assert sorted(tmp_path.iterdir()) == sorted(others + [dest])


def test_remove_leftovers_of_dead_writers_only_keeps_a_running_writers_temp(tmp_path):
    """Without a lock (the truncated-model cache), only a writer that no longer runs loses its temp folder."""
    dest = _old_folder(tmp_path)
    _killed_writer(dest)
    (dead,) = [p for p in tmp_path.iterdir() if p.name != "model"]
    with replaced_folder(dest) as running:  # this process is the running writer
        running.mkdir()
        assert remove_leftovers(dest, dead_writers_only=True) == [dead]
        assert running.is_dir() and not dead.exists()
        (running / "new.bin").write_bytes(b"new")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"] and (dest / "new.bin").is_file()


def test_cli_json_outputs_are_replaced_whole(fixture_models, tmp_path, monkeypatch, capsys):
    """`parity audit --json FILE`: a failure at the final rename leaves the previous FILE, not half a JSON."""
    import json

    from parity.cli import main

    out = tmp_path / "audit.json"
    out.write_text('{"previous": true}')
    model = str(fixture_models["xcomposer2-tiny"])
    real_replace = os.replace

    def failing_replace(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(atomic.os, "replace", failing_replace)
    capsys.readouterr()
    assert main(["audit", model, "--trust-remote-code", "--json", str(out)]) == 2  # bad input, not a traceback
    err = capsys.readouterr().err
    assert "No space left on device" in err and str(tmp_path) in " ".join(err.split()) and "Traceback" not in err
    assert json.loads(out.read_text()) == {"previous": True}
    assert [p.name for p in tmp_path.iterdir()] == ["audit.json"]
    monkeypatch.setattr(atomic.os, "replace", real_replace)
    main(["audit", model, "--trust-remote-code", "--json", str(out)])
    assert "previous" not in json.loads(out.read_text())
    assert [p.name for p in tmp_path.iterdir()] == ["audit.json"]
