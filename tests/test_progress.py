"""Progress while a run works: on a terminal a rich bar per stage filled by its decoder layers, with elapsed
time and ETA; in a pipe or a CI log one plain line per stage start and end, never a per-layer line, never
wrapped at 80 columns, no terminal codes."""

from __future__ import annotations

import io
import logging
import re

import pytest
from rich.console import Console

from parity import progress
from parity.cli import main, progress_handler
from parity.pipeline import RunOptions, run_parity

STAGES = logging.getLogger("parity.progress")


@pytest.fixture
def listening():
    """Attach a handler to parity.progress as the CLI does, and take it off again."""
    attached = []

    def attach(console: Console) -> logging.Handler:
        h = progress_handler(console)
        STAGES.addHandler(h)
        STAGES.setLevel(h.level)
        attached.append(h)
        return h

    old = STAGES.level
    yield attach
    for h in attached:
        h.close()
        STAGES.removeHandler(h)
    STAGES.setLevel(old)


def test_terminal_shows_layers_elapsed_and_eta(fixture_models, listening):
    buf = io.StringIO()
    handler = listening(Console(file=buf, force_terminal=True, width=140, color_system=None))
    assert isinstance(handler, progress.StageProgress)
    run_parity(RunOptions(model=fixture_models["xcomposer2-tiny"], trust_remote_code=True))
    handler.close()
    out = buf.getvalue()
    for stage in ("reference (default)", "engine (default)"):   # the stages that walk the decoder layers
        assert re.search(rf"{re.escape(stage)} .*3/3 layers \d:\d\d:\d\d ETA", out), (stage, out[-3000:])
    assert re.search(r"1/3 layers \d:\d\d:\d\d ETA (-:--:--|\d:\d\d:\d\d)", out)   # an estimate while running
    assert re.search(r"parity: \[ *\d+\.\d s\] compare: \d+\.\d s", out)           # a finished stage: one line


def test_ci_log_has_plain_stage_lines_only(listening):
    buf = io.StringIO()
    listening(Console(file=buf, width=80))                       # not a terminal: a pipe, a CI log
    long = "a stage about a model in /models/" + "x" * 100
    with progress.stage(long):
        for i in range(3):
            progress.layer_done(i + 1, 3)
    lines = buf.getvalue().splitlines()
    assert len(lines) == 2 and "\x1b" not in buf.getvalue()      # start and end; no layer line, no codes
    assert re.fullmatch(rf"parity: \[ *\d+\.\d s\] {re.escape(long)} \.\.\.", lines[0])
    assert re.fullmatch(rf"parity: \[ *\d+\.\d s\] {re.escape(long)}: \d+\.\d s", lines[1])   # not wrapped at 80


def test_cli_in_a_pipe_prints_no_layer_lines(fixture_models, tmp_path, capsys):
    model = fixture_models["xcomposer2-tiny"]
    assert main(["run", str(model), "--trust-remote-code", "--out", str(tmp_path / "r")]) == 0
    out = capsys.readouterr().out
    stages = [ln for ln in out.splitlines() if ln.startswith("parity: [")]
    assert stages and not [ln for ln in stages if "layer " in ln] and "\x1b" not in out
    assert any(ln.endswith(f"load reference ({model}) ...") for ln in stages)
