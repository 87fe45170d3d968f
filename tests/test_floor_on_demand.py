"""The noise floor measured only where a verdict needs it (FloorOnDemand, Thresholds.floor_decides): the same
diagnoses as measuring it everywhere, at a fraction of the cost on clean fp32 runs."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from conftest import diagnosis_key
from hypothesis import given
from hypothesis import strategies as st

from parity.api import run
from parity.compare.stream import FloorOnDemand
from parity.compare.thresholds import Thresholds

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


@pytest.mark.parametrize("numeric", ["fp32", "emulate"])
@pytest.mark.parametrize("broken", [False, True])
def test_same_diagnosis_as_measuring_everywhere(fixture_models, broken_w2_ws, default_xc2_run, numeric, broken):
    model = fixture_models["xcomposer2-tiny"]
    ws = broken_w2_ws if broken else None
    lazy = default_xc2_run(numeric, broken)
    full = run(model, trust_remote_code=True, numeric=numeric, cache_dir=CACHE, workspace=ws, measure_floor=True)
    assert diagnosis_key(lazy) == diagnosis_key(full)
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
    assert diagnosis_key(lazy) == diagnosis_key(full)
    assert [p.floor for p in lazy.points] == [p.floor for p in full.points]
    assert all(p.floor is not None for p in lazy.points)
