"""End to end through the public entry points: clean runs pass silently, a broken workspace fails with the
right layer, module, positions and cause — in report.json, the CLI exit code and the pytest assertion."""

import json
import shutil
from pathlib import Path

import pytest

from parity.api import assert_parity, run
from parity.cli import main
from parity.deploy.convert import convert_cached
from parity.deploy.workspace import Workspace
from parity.fixtures import DEFAULT_INPUTS

REPO = Path(__file__).resolve().parents[1]
CACHE = REPO / ".cache"


@pytest.mark.parametrize("name", ["xcomposer2-tiny", "xcomposer2-4khd-tiny"])
@pytest.mark.parametrize("numeric", ["fp32", "emulate"])
def test_clean_conversion_passes_with_zero_errors(fixture_models, name, numeric, tmp_path):
    report = run(fixture_models[name], trust_remote_code=True, numeric=numeric, cache_dir=CACHE,
                 out=tmp_path / "out")
    assert report.errors() == [], [f.message for f in report.errors()]
    assert report.status == "pass" and report.first_divergence is None
    data = json.loads((tmp_path / "out" / "report.json").read_text())
    assert data["status"] == "pass" and data["first_divergence"] is None
    assert {"status", "engine", "findings", "first_divergence", "layers"} <= set(data)
    assert data["engine"]["kind"] == "replay" and data["engine"]["lmdeploy_version"] == "0.7.1"
    assert (tmp_path / "out" / "report.html").stat().st_size > 10_000
    # every canonical point of every layer was compared
    layers = {(p["layer"], p["module"]) for p in data["layers"]}
    assert len(layers) == 9 * 3 + 3


def test_multiple_cases_in_one_report(fixture_models, tmp_path):
    report = run(fixture_models["xcomposer2-tiny"], trust_remote_code=True, inputs=DEFAULT_INPUTS, cache_dir=CACHE)
    assert report.status == "pass"
    assert [c.name for c in report.cases] == ["one-image", "two-images", "text-only"]
    assert {p.case for p in report.points} == {"one-image", "two-images", "text-only"}


@pytest.fixture
def broken_workspace(fixture_models, tmp_path):
    """A real converted workspace with one LoRA tensor zeroed: layer 1, feed_forward.w2, lora_b."""
    src = convert_cached(fixture_models["xcomposer2-tiny"], CACHE / "workspaces")
    ws_dir = tmp_path / "ws"
    shutil.copytree(src, ws_dir, symlinks=True)
    ws = Workspace.open(ws_dir)
    name = "layers.1.feed_forward.w2.lora_b.weight"
    path = ws.file_path(name, 0)
    path.write_bytes(bytes(path.stat().st_size))
    return ws_dir


def test_broken_workspace_fails_with_layer_module_positions_cause(fixture_models, broken_workspace, tmp_path):
    out = tmp_path / "report"
    code = main(["run", str(fixture_models["xcomposer2-tiny"]), "--trust-remote-code", "--workspace",
                 str(broken_workspace), "--out", str(out), "--cache-dir", str(CACHE)])
    assert code == 1
    data = json.loads((out / "report.json").read_text())
    assert data["status"] == "fail"
    assert data["first_divergence"] == {**data["first_divergence"], "layer": 1, "module": "feed_forward.w2",
                                        "positions": "image", "cause": "weight_mismatch"}
    errors = [f for f in data["findings"] if f["severity"] == "error"]
    assert any(f["check"] == "weights" and "lora_b" in f["message"] for f in errors)
    # nothing before the fault diverges: every error is at layer 1's w2 or later in execution order
    assert all(f["layer"] is None or f["layer"] >= 1 for f in errors)


def test_assert_parity_message_names_the_divergence(fixture_models, broken_workspace):
    report = run(fixture_models["xcomposer2-tiny"], trust_remote_code=True, workspace=broken_workspace,
                 cache_dir=CACHE)
    with pytest.raises(AssertionError) as e:
        assert_parity(report)
    text = str(e.value)
    assert "feed_forward.w2" in text and "weight_mismatch" in text and "1" in text and "image" in text
    assert_parity(run(fixture_models["xcomposer2-tiny"], trust_remote_code=True, cache_dir=CACHE))


def test_pytest_plugin_fixture(pytester, fixture_models):
    pytester.makepyfile(f"""
        def test_release(parity_run, parity_assert):
            report = parity_run({str(fixture_models['xcomposer2-tiny'])!r}, trust_remote_code=True,
                                cache_dir={str(CACHE)!r})
            parity_assert(report)
    """)
    pytester.runpytest_subprocess().assert_outcomes(passed=1)


def test_cli_clean_run_exit_0(fixture_models, tmp_path, capsys):
    code = main(["run", str(fixture_models["xcomposer2-tiny"]), "--trust-remote-code", "--out", str(tmp_path / "r"),
                 "--cache-dir", str(CACHE)])
    assert code == 0
    assert "PASS" in capsys.readouterr().out
