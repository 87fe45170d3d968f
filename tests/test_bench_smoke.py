"""Smoke test of the benchmark (benchmarks/bench.py) on tiny shapes: it runs and writes every ratio. No timing
is asserted (CI machines are shared); the numbers are only required to exist and be positive."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks.models import bench_spec, write_safetensors_streaming  # noqa: E402


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
    assert ratios["run_vs_forwards"]["numbers"]["status"] == "pass"
    assert data["projection"]["layers"] == 32
    assert "capture overhead" in proc.stdout and "run_parity / forwards" in proc.stdout
