"""Teacher forcing on demand (parity.compare.gate): the replay's teacher-forced run starts at the first layer
where the end-to-end run leaves min_rel, with the same diagnoses as running it at every layer."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from conftest import diagnosis_key
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from parity.api import run
from parity.compare.gate import TeacherForcingGate
from parity.compare.rowstats import row_stats
from parity.compare.thresholds import Thresholds

REPO = Path(__file__).resolve().parents[1]
CACHE = REPO / ".cache"


def _gate(numeric: str = "fp32", rows: int = 6) -> TeacherForcingGate:
    image = torch.zeros(rows, dtype=torch.bool)
    image[1:rows - 1] = True
    classes = {"image": image, "text": ~image}
    return TeacherForcingGate(reference=None, thresholds=Thresholds(), numeric=numeric, classes=classes)


@settings(max_examples=60, deadline=None)
@given(rows=st.integers(3, 12), cols=st.integers(1, 24), seed=st.integers(0, 2**31 - 1),
       scale=st.sampled_from([0.0, 1e-9, 3e-7, 9e-7, 1e-6, 1.2e-6, 1e-5, 1e-2]),
       numeric=st.sampled_from(["fp32", "emulate"]))
def test_the_gate_lets_pass_exactly_what_passes_at_min_rel(rows, cols, seed, scale, numeric):
    """A layer the gate lets pass is judged on its end-to-end values: they must pass at min_rel in total and in
    every class the comparison judges, and anything that does passes the gate."""
    g = torch.Generator().manual_seed(seed)
    ref = torch.randn(rows, cols, generator=g)
    noise = torch.randn(rows, cols, generator=g) * scale * (1 if numeric == "fp32" else 2e3)
    other = ref + noise * torch.rand(rows, 1, generator=g)
    gate = _gate(numeric, rows)
    stats = row_stats(ref, other)
    judged = [stats.metrics()["rel_l2"]] + [m["rel_l2"] for m in stats.by_class(gate.classes).values()]
    lo = Thresholds().bounds(numeric)[0]
    assert gate.leaves(ref, other) == (not all(v <= lo for v in judged))


def test_the_gate_catches_each_kind_of_departure():
    gate = _gate()
    ref = torch.randn(6, 32)
    assert not gate.leaves(ref, ref.clone())
    assert not gate.leaves(ref, ref * (1 + 0.5e-6))
    bad = ref.clone()
    bad[0] *= 1 + 2e-6  # the one text row off by 2 x min_rel (the whole tensor's error is under min_rel)
    assert row_stats(ref, bad).metrics()["rel_l2"] < gate.min_rel and gate.leaves(ref, bad)
    zero = ref.clone()
    zero[0] = zero[5] = 0  # a PLoRA delta: zero on the text rows
    off = zero.clone()
    off[0, 5] = 1e-30  # must be matched exactly there
    assert not gate.leaves(zero, zero.clone()) and gate.leaves(zero, off)
    nan = ref.clone()
    nan[0, 0] = math.nan
    assert gate.leaves(ref, nan) and gate.leaves(nan, nan.clone())


@pytest.mark.parametrize("numeric", ["fp32", "emulate"])
@pytest.mark.parametrize("broken", [False, True])
def test_same_diagnosis_as_teacher_forcing_everywhere(fixture_models, broken_w2_ws, default_xc2_run, numeric,
                                                     broken):
    model = fixture_models["xcomposer2-tiny"]
    ws = broken_w2_ws if broken else None
    gated = default_xc2_run(numeric, broken)
    full = run(model, trust_remote_code=True, numeric=numeric, cache_dir=CACHE, workspace=ws,
               teacher_forced_everywhere=True)
    assert diagnosis_key(gated) == diagnosis_key(full)
    assert full.engine["teacher_forced"] == {"default": "from layer 0 (every layer)"}
    # every layer and linear has its PLoRA row, also the layers judged end to end (in fp32 from the statistics
    # the end-to-end run kept of its deltas, which are not written a second time)
    rows = [(r["layer"], r["linear"], r.get("status")) for r in gated.plora_table]
    assert rows == [(r["layer"], r["linear"], r.get("status")) for r in full.plora_table] and rows
    for g, f in zip(gated.plora_table, full.plora_table):  # the same deltas, not only the same verdicts
        # end to end against teacher-forced on a clean layer: equal within fp32's min_rel
        where = (g["layer"], g["linear"])
        assert g["text_max_abs"] == f["text_max_abs"], where
        for key in ("delta_rel_l2", "factor"):
            if isinstance(f.get(key), float) and math.isfinite(f[key]):
                assert g[key] == pytest.approx(f[key], rel=0, abs=1e-6), (where, key)
    started = gated.engine["teacher_forced"]["default"]
    if numeric == "fp32" and not broken:  # every clean fp32 value is within min_rel: no teacher-forced run
        assert gated.status == "pass" and started.startswith("not run")
    if numeric == "fp32" and broken:  # layer 0 is clean: the teacher-forced run starts at the faulted layer
        assert started.startswith("from layer 1 ")
        (p,) = [p for p in gated.points if p.layer == 1 and p.module == "feed_forward.w2"]
        (q,) = [p for p in full.points if p.layer == 1 and p.module == "feed_forward.w2"]
        assert p.exceeded and p.local == q.local  # judged on its own teacher-forced value
