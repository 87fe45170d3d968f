"""Smoke test of `benchmarks/decode_bench.py` (run by `make bench`) on tiny shapes: it runs end to end and
writes both of issue 18's numbers (decode step / prefill row, peak memory at 2N / N). No timing is asserted."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_quick_decode_bench_writes_both_ratios(tmp_path):
    out = tmp_path / "bench-decode.json"
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "decode_bench.py"), "--quick", "--steps", "3", "--rows", "64",
         "--vocab", "256", "--root", str(REPO / ".cache" / "bench"), "--out", str(out)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads(out.read_text())
    for key in ("decode_step_vs_prefill_row", "memory_2N_vs_N"):
        assert math.isfinite(data[key]) and data[key] > 0, key
    n = data["numbers"]
    assert n["N"] == 3 and n["rows"] == 64 and n["peak_rss_2N"] > 0
    assert 0 < n["cache_bytes_N"] <= n["cache_bytes_2N"]  # the KV cache grows with the tokens, nothing else does
    assert "decode step / prefill row" in proc.stdout and "memory 2N / N" in proc.stdout
