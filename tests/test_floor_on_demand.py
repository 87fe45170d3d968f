"""The noise floor measured only where a verdict needs it (FloorOnDemand, Thresholds.floor_decides): the same
diagnoses as measuring it everywhere, at a fraction of the cost on clean fp32 runs."""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from parity.api import run
from parity.compare.stream import FloorOnDemand
from parity.compare.thresholds import Thresholds
from parity.deploy.convert import convert_cached
from parity.deploy.workspace import Workspace

REPO = Path(__file__).resolve().parents[1]
CACHE = REPO / ".cache"


@given(floor=st.floats(0, 1), value=st.floats(allow_nan=True, allow_infinity=True),
       numeric=st.sampled_from(["fp32", "emulate"]))
def test_floor_decides_exactly_when_the_floor_can_change_the_verdict(floor, value, numeric):
    """Outside (min_rel, max_rel] the verdict with any floor equals the verdict with floor 0."""
    t = Thresholds()
    verdict = lambda f: not math.isfinite(value) or value > t.threshold(f, numeric)  # noqa: E731
    if not t.floor_decides(value, numeric):
        assert verdict(floor) == verdict(0.0)


def test_on_demand_measures_once():
    calls = []
    f = FloorOnDemand(lambda: calls.append(1) or "trace")
    assert not f.measured and calls == []
    assert f.resolve() == "trace" and f.resolve() == "trace" and f.measured and calls == [1]
    g = FloorOnDemand(lambda: calls.append(2) or Path("/x/y"))
    assert g.name == "y" and g.measured and calls == [1, 2]  # any other use measures it, then delegates


def _key(report):
    d = report.first_divergence
    return ([(f.check, f.severity, f.cause, f.layer, f.module, f.positions, f.case) for f in report.findings],
            (d.layer, d.module, d.positions, d.cause, d.case) if d else None,
            [(p.case, p.layer, p.module, p.exceeded) for p in report.points], report.status)


@pytest.fixture(scope="module")
def broken_ws(fixture_models, tmp_path_factory):
    """Layer 1's feed_forward.w2 lora_b zeroed in a copy of the real converted workspace."""
    src = convert_cached(fixture_models["xcomposer2-tiny"], CACHE / "workspaces")
    dst = tmp_path_factory.mktemp("broken") / "ws"
    shutil.copytree(src, dst, symlinks=True)
    path = Workspace.open(dst).file_path("layers.1.feed_forward.w2.lora_b.weight", 0)
    size = path.stat().st_size
    path.unlink()
    path.write_bytes(bytes(size))
    return dst


@pytest.mark.parametrize("numeric", ["fp32", "emulate"])
@pytest.mark.parametrize("broken", [False, True])
def test_same_diagnosis_as_measuring_everywhere(fixture_models, broken_ws, numeric, broken):
    model = fixture_models["xcomposer2-tiny"]
    ws = broken_ws if broken else None
    lazy = run(model, trust_remote_code=True, numeric=numeric, cache_dir=CACHE, workspace=ws)
    full = run(model, trust_remote_code=True, numeric=numeric, cache_dir=CACHE, workspace=ws, measure_floor=True)
    assert _key(lazy) == _key(full)
    assert all(p.floor is not None for p in full.points)
    if numeric == "fp32" and not broken:  # every clean fp32 error is under min_rel: no float64 pass at all
        assert lazy.status == "pass" and all(p.floor is None for p in lazy.points)
        assert all(p.threshold == Thresholds().fp32_min_rel for p in lazy.points)
    if numeric == "fp32" and broken:  # the fault's point exceeds max_rel: said so, without a floor
        (p,) = [p for p in lazy.points if p.layer == 1 and p.module == "feed_forward.w2"]
        assert p.exceeded and p.floor is None and p.threshold == Thresholds().fp32_max_rel


def test_floor_measured_when_an_error_lies_in_the_band(fixture_models):
    """With min_rel below the clean run's errors, every error is in the band: the floor is measured and the
    report equals the measured-everywhere one, floors included."""
    model = fixture_models["xcomposer2-tiny"]
    t = Thresholds(fp32_min_rel=1e-12)
    lazy = run(model, trust_remote_code=True, cache_dir=CACHE, thresholds=t)
    full = run(model, trust_remote_code=True, cache_dir=CACHE, thresholds=t, measure_floor=True)
    assert _key(lazy) == _key(full)
    assert [p.floor for p in lazy.points] == [p.floor for p in full.points]
    assert all(p.floor is not None for p in lazy.points)
