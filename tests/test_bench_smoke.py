"""Smoke test of the benchmark (benchmarks/bench.py) on tiny shapes: it runs, writes every ratio, and the
proposals it measures are exact. No timing is asserted (CI machines are shared); the numbers are only
required to exist and be positive."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks.models import bench_spec, write_safetensors_streaming  # noqa: E402
from benchmarks.proposals.fast_compare import (  # noqa: E402
    by_class_from_stats,
    from_stats,
    row_errors_from_stats,
    row_stats,
)
from parity.compare.metrics import by_class, compare, row_errors  # noqa: E402


def _env():
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def test_streaming_writer_is_byte_identical_to_the_generator(tmp_path):
    from parity.fixtures.generator import build_state_dict, safetensors_bytes

    spec = bench_spec(2, quick=True)
    n = write_safetensors_streaming(spec, tmp_path / "m.safetensors")
    want = safetensors_bytes(build_state_dict(spec))
    assert n == len(want)
    assert (tmp_path / "m.safetensors").read_bytes() == want


def test_seven_b_spec_has_the_real_shapes():
    s = bench_spec(2)
    assert (s.hidden, s.intermediate, s.heads, s.kv_heads, s.head_dim) == (4096, 14336, 32, 8, 128)
    assert s.image_tokens == 1225
    assert {r for r, _ in s.lora_layout().values()} == {256}


_vals = st.one_of(st.floats(-1e3, 1e3, allow_nan=False, width=32), st.sampled_from([math.nan, math.inf, -math.inf]))


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 6), st.integers(1, 5), st.data())
def test_one_pass_metrics_equal_parity_metrics(rows, cols, data):
    ref = torch.tensor(data.draw(st.lists(_vals, min_size=rows * cols, max_size=rows * cols)),
                       dtype=torch.float32).reshape(rows, cols)
    noise = torch.tensor(data.draw(st.lists(_vals, min_size=rows * cols, max_size=rows * cols)),
                         dtype=torch.float32).reshape(rows, cols)
    keep = torch.tensor(data.draw(st.lists(st.booleans(), min_size=rows * cols, max_size=rows * cols))).reshape(rows, cols)
    eng = torch.where(keep, ref, noise)
    cls = torch.tensor(data.draw(st.lists(st.booleans(), min_size=rows, max_size=rows)))
    classes = {"a": cls, "b": ~cls}
    stt = row_stats(ref, eng)

    def close(x, y):
        if isinstance(x, float) and isinstance(y, float):
            if math.isnan(x) or math.isnan(y):
                return math.isnan(x) and math.isnan(y)
            return x == y or abs(x - y) <= 1e-9 * max(abs(x), abs(y)) + 1e-300
        return x == y

    want, got = compare(ref, eng), from_stats(stt)
    for k in ("rel_l2", "max_abs", "mean_abs", "ref_norm", "nonfinite_ref", "nonfinite_eng", "max_abs_row",
              "max_abs_col"):
        assert close(want[k], got[k]), (k, want[k], got[k])
    if math.isfinite(want["cosine"]) and want["ref_norm"] > 1e-150:
        assert abs(want["cosine"] - got["cosine"]) <= 1e-9
    wb, gb = by_class(ref, eng, classes), by_class_from_stats(stt, classes)
    assert set(wb) == set(gb)
    for c in wb:
        for k in ("rel_l2", "max_abs", "nonfinite_ref", "nonfinite_eng", "rows"):
            assert close(wb[c][k], gb[c][k]), (c, k)
    we, ge = row_errors(ref, eng), row_errors_from_stats(stt)
    assert torch.equal(torch.isinf(we), torch.isinf(ge))
    fin = torch.isfinite(we)
    assert torch.allclose(we[fin], ge[fin], rtol=1e-9, atol=1e-300)


def test_a_child_that_would_exhaust_memory_stops_itself(tmp_path):
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "bench.py"), "--quick", "--layers", "1", "--memory-only",
         "--root", str(tmp_path / "root"), "--out", str(out), "--min-available-gib", "100000"],
        cwd=REPO, env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stderr[-2000:]
    data = json.loads(out.read_text())
    conv = data["results"]["convert_L1"]
    assert conv["aborted"] is True and "MemAvailable" in conv["reason"]


@pytest.mark.slow
def test_quick_bench_writes_every_ratio(tmp_path):
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "bench.py"), "--quick", "--layers", "1", "--repeat", "1",
         "--root", str(REPO / ".cache" / "bench-smoke"), "--out", str(out)],
        cwd=REPO, env=_env(), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    data = json.loads(out.read_text())
    ratios = data["ratios"]
    assert set(ratios) == {"capture_overhead", "replay_vs_reference", "compare_vs_memcpy", "run_vs_forwards",
                           "memory_2L_vs_L"}
    for name, r in ratios.items():
        assert isinstance(r["value"], float) and r["value"] > 0 and math.isfinite(r["value"]), name
        assert r["ok"] in (True, False)
    cap = ratios["capture_overhead"]["numbers"]
    # the base-output tap is now part of parity.reference.capture (covered bit for bit by tests/test_capture.py);
    # the benchmark compares it against the recompute only while it is still a proposal
    assert cap["base_tap_adopted"] is True or cap["base_tap_bit_identical"] is True
    assert data["results"]["forwards"]["streaming_floor_bit_identical"] is True
    agree = ratios["compare_vs_memcpy"]["numbers"]["fast_compare_agrees"]
    assert agree["same_points"] and agree["same_exceeded"] and agree["max_rel_diff"] < 1e-9
    assert data["projection"]["layers"] == 32
    assert "capture overhead" in proc.stdout and "run_parity / forwards" in proc.stdout
