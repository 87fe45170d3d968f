"""The command line and the Python/pytest entry points as a new user meets them: help for every option with its
default, `--version`, defaults that land where a user expects, the Makefile's report folders, and a failing
`assert_parity` that names the report and hides parity's own frames."""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from parity.api import run
from parity.cli import build_parser, main
from parity.errors import ParityInputError
from parity.places import CACHE_ENV, default_cache_dir, default_report_dir

REPO = Path(__file__).resolve().parents[1]
CACHE = REPO / ".cache"


def _subparsers(ap: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    sub = next(a for a in ap._actions if isinstance(a, argparse._SubParsersAction))
    return dict(sub.choices)


def _flat(text: str) -> str:
    return " ".join(text.split())


@pytest.mark.parametrize("command", sorted(_subparsers(build_parser())))
def test_every_option_has_help_and_shows_its_default(command):
    parser = _subparsers(build_parser())[command]
    text = _flat(parser.format_help())
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        name = "/".join(action.option_strings) or action.dest
        assert action.help and action.help.strip(), f"parity {command}: {name} has no help text"
        if action.option_strings and isinstance(action.default, list):  # repeatable: said in words
            assert "default" in action.help, f"parity {command}: {name} does not say what happens without it"
        elif action.option_strings and action.default not in (None, False):
            shown = (f"default: {action.default}", f"default {action.default}", f"{action.default} (default)")
            assert any(_flat(w) in text for w in shown), \
                f"parity {command} --help does not show {name}'s default {action.default!r}"


def test_version(capsys):
    from importlib.metadata import version

    from parity import __version__

    assert main(["--version"]) == 0
    out = capsys.readouterr().out
    assert f"parity {__version__}" in out and f"lmdeploy {version('lmdeploy')}" in out


def test_caches_default_to_the_users_cache_folder(monkeypatch, tmp_path):
    """Not `.cache` under whatever folder the command runs in."""
    monkeypatch.delenv(CACHE_ENV, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_cache_dir() == tmp_path / "xdg" / "parity"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert default_cache_dir() == Path.home() / ".cache" / "parity"
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "mine"))
    assert default_cache_dir() == tmp_path / "mine"
    args = build_parser().parse_args(["run", str(tmp_path)])
    assert args.cache_dir == tmp_path / "mine" and args.cache_dir.is_absolute()
    assert build_parser().parse_args(["fixtures"]).out == tmp_path / "mine" / "fixtures"
    from parity.pipeline import RunOptions

    assert RunOptions(model=tmp_path).cache_dir == tmp_path / "mine"


def test_report_folders_of_same_named_models_differ(tmp_path):
    a, b = tmp_path / "team-a" / "xc2", tmp_path / "team-b" / "xc2"
    a.mkdir(parents=True)
    b.mkdir(parents=True)
    ra, rb = default_report_dir(a), default_report_dir(b)
    assert ra != rb and ra.parent == rb.parent == Path("reports")
    assert ra.name.startswith("xc2-") and rb.name.startswith("xc2-")
    assert default_report_dir(a) == default_report_dir(tmp_path / "team-a" / "." / "xc2")  # one path, one folder


@pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")
def test_makefile_report_folder_and_clean():
    def dry(*args: str) -> str:
        return subprocess.run(["make", "-n", "-C", str(REPO), *args], capture_output=True, text=True,
                              timeout=60).stdout

    runs = [ln for ln in dry("parity", "MODEL=/models/a/xc2").splitlines() if "parity run" in ln]
    assert runs and all("--out" not in ln for ln in runs), runs  # parity's own per-path default
    assert any("--out my/place" in ln for ln in dry("parity", "MODEL=/m/xc2", "OUT=my/place").splitlines())
    clean = dry("clean")
    assert "rm " in clean and "reports" not in clean, clean


def test_cli_run_without_out_writes_the_per_model_report_folder(fixture_models, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    model = fixture_models["xcomposer2-tiny"]
    assert main(["run", str(model), "--trust-remote-code", "--cache-dir", str(CACHE)]) == 0
    folder = tmp_path / default_report_dir(model)
    assert (folder / "report.html").is_file() and (folder / "report.json").is_file()
    out = capsys.readouterr().out
    assert folder.name in out  # the summary says where the report went
    # progress: one plain line per stage start and end (not a terminal here), with the time taken
    stages = [ln for ln in out.splitlines() if ln.startswith("parity: [")]
    for name in (rf"load reference \({re.escape(str(model))}\)", "convert", r"reference \(default\)",
                 r"engine \(default\)", "compare"):
        assert any(re.search(rf"\] {name} \.\.\.$", ln) for ln in stages), (name, out)
        assert any(re.search(rf"\] {name}: \d+\.\d s$", ln) for ln in stages), (name, out)


def test_misspelt_run_option_lists_the_valid_ones(tmp_path):
    with pytest.raises(ParityInputError) as e:
        run(tmp_path, trust_remote_cod=True)
    msg = str(e.value)
    assert "'trust_remote_cod'" in msg and "did you mean 'trust_remote_code'" in msg
    assert "valid options:" in msg and "inputs" in msg and "numeric" in msg


def test_failing_assert_names_the_report_and_hides_parity_frames(pytester, fixture_models):
    """What a CI log shows: the user's line, the divergence, the report path; no parity frames, no Report dump."""
    pytester.makepyfile(f"""
        import shutil
        from parity.deploy.convert import convert_cached
        from parity.deploy.workspace import Workspace

        MODEL = {str(fixture_models['xcomposer2-tiny'])!r}
        CACHE = {str(CACHE)!r}

        def broken(tmp_path):
            ws_dir = tmp_path / "ws"
            shutil.copytree(convert_cached(MODEL, CACHE + "/workspaces"), ws_dir, symlinks=True)
            path = Workspace.open(ws_dir).file_path("layers.1.feed_forward.w2.lora_b.weight", 0)
            path.write_bytes(bytes(path.stat().st_size))
            return ws_dir

        def test_release(parity_run, parity_assert, tmp_path):
            report = parity_run(MODEL, trust_remote_code=True, cache_dir=CACHE, workspace=broken(tmp_path))
            parity_assert(report)

        def test_plain_assert(parity_run, tmp_path):
            report = parity_run(MODEL, trust_remote_code=True, cache_dir=CACHE, workspace=broken(tmp_path))
            assert report
    """)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    result.assert_outcomes(failed=2)
    out = result.stdout.str()
    reports = re.findall(r"report: (\S+report\.html)", out)
    assert reports and all(Path(p).is_file() for p in reports), out
    assert "parity-report" in reports[0]
    assert "__tracebackhide__" not in out and "def assert_parity" not in out and "render_failure_message" not in out
    assert "<Report FAIL" in out  # the plain `assert report` shows the short form ...
    assert "PointResult(" not in out and "Finding(" not in out  # ... not the dataclass of every point


def test_summary_is_not_hard_wrapped_in_ci_logs(capsys):
    """Not a terminal (a pipe, a CI log): no line is broken at rich's default 80 columns."""
    from parity.cli import out_console
    from parity.report.demo import demo_report
    from parity.report.terminal import print_summary

    path = "/ci/workspace/" + "deep/" * 20 + "report.html"
    rep = demo_report()
    print_summary(rep, out_console(), paths={"html": path})
    out = capsys.readouterr().out
    assert path in out.splitlines()[-1]
    d = rep.first_divergence
    assert any(d.message[:100] in line for line in out.splitlines()), out
