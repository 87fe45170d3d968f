"""Properties of the comparison metrics (float64, non-finite safe) and of the thresholds."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
import numpy as np

from parity.compare.metrics import by_class, compare, row_errors
from parity.compare.thresholds import Thresholds, load_thresholds
from parity.errors import ParityInputError

finite = st.floats(-1e4, 1e4, allow_nan=False, width=32)
shapes = st.tuples(st.integers(1, 12), st.integers(1, 16))


@st.composite
def pairs(draw):
    shape = draw(shapes)
    a = draw(arrays(np.float32, shape, elements=finite))
    b = draw(arrays(np.float32, shape, elements=finite))
    return torch.from_numpy(a), torch.from_numpy(b)


@given(pairs())
@settings(max_examples=200, deadline=None)
def test_identity_is_exact(p):
    a, _ = p
    m = compare(a, a.clone())
    assert m["rel_l2"] == 0.0 and m["max_abs"] == 0.0 and m["mean_abs"] == 0.0
    assert m["cosine"] == pytest.approx(1.0) or float(a.abs().sum()) == 0.0
    assert m["nonfinite_ref"] == m["nonfinite_eng"] == 0


@given(pairs())
@settings(max_examples=200, deadline=None)
def test_metric_bounds_and_argmax(p):
    a, b = p
    m = compare(a, b)
    assert -1.0 - 1e-9 <= m["cosine"] <= 1.0 + 1e-9          # computed in float64, never above 1
    assert m["rel_l2"] >= 0 and m["max_abs"] >= m["mean_abs"] >= 0
    d = (b.double() - a.double()).abs()
    assert d[m["max_abs_row"], m["max_abs_col"]] == pytest.approx(m["max_abs"])
    assert float(d.max()) == pytest.approx(m["max_abs"])


@given(pairs(), st.floats(0.1, 10))
@settings(max_examples=100, deadline=None)
def test_rel_l2_scale_invariant(p, k):
    a, b = p
    m1, m2 = compare(a, b), compare(a * k, b * k)
    if m1["ref_norm"] > 1e-3:
        assert m2["rel_l2"] == pytest.approx(m1["rel_l2"], rel=1e-4, abs=1e-9)


def test_nonfinite_is_counted_not_raised():
    a = torch.ones(3, 4)
    b = a.clone()
    b[1, 2] = float("nan")
    m = compare(a, b)
    assert m["nonfinite_eng"] == 1 and m["nonfinite_ref"] == 0
    assert math.isinf(m["rel_l2"])
    rows = row_errors(a, b)
    assert math.isinf(rows[1]) and rows[0] == 0 and rows[2] == 0
    both = compare(b, b.clone())  # the same NaN on both sides is not an error of the engine
    assert both["rel_l2"] == 0.0 and both["nonfinite_ref"] == 1


@given(pairs())
@settings(max_examples=100, deadline=None)
def test_by_class_partitions_rows(p):
    a, b = p
    n = a.shape[0]
    image = torch.zeros(n, dtype=torch.bool)
    image[: n // 2] = True
    out = by_class(a, b, {"image": image, "text": ~image})
    assert sum(v["rows"] for v in out.values()) == n


@given(st.floats(0, 1), st.sampled_from(["fp32", "emulate"]))
def test_threshold_is_clamped(floor, numeric):
    t = Thresholds()
    lo, hi = t.bounds(numeric)
    assert lo <= t.threshold(floor, numeric) <= hi


def test_thresholds_from_pyproject(tmp_path):
    p = tmp_path / "pyproject.toml"
    p.write_text("[tool.parity]\nfloor_factor = 20\n")
    assert load_thresholds(p).floor_factor == 20
    assert load_thresholds(p, floor_factor=5).floor_factor == 5
    p.write_text("[tool.parity]\nfloor_factr = 20\n")
    with pytest.raises(ParityInputError, match="floor_factr") as e:
        load_thresholds(p)
    assert f"{p} [tool.parity]" in str(e.value) and "floor_factor" in str(e.value)


@pytest.mark.parametrize("section, words", [
    ("fp32_min_rel = 1e-3\nfp32_max_rel = 1e-5", ("fp32_min_rel", "larger than", "fp32_max_rel")),
    ("lowp_min_rel = 0.5", ("lowp_min_rel", "larger than", "lowp_max_rel")),
    ("floor_factor = 0", ("floor_factor", "at least 1")),
    ("floor_factor = nan", ("floor_factor", "finite")),
    ("fp32_max_rel = inf", ("fp32_max_rel", "finite")),
    ("lowp_max_rel = 2.0", ("lowp_max_rel", "below 1")),
    ("delta_cosine = 1.5", ("delta_cosine", "between 0 and 1")),
    ("scale_tolerance = -0.1", ("scale_tolerance",)),
    ("floor_factor = true", ("floor_factor", "number")),
    ('floor_factor = "ten"', ("floor_factor", "number")),
])
def test_nonsense_thresholds_in_pyproject_are_rejected_naming_the_file(tmp_path, section, words):
    """Inverted bounds or impossible values used to be accepted (and a NaN makes every comparison pass)."""
    p = tmp_path / "pyproject.toml"
    p.write_text(f"[tool.parity]\n{section}\n")
    with pytest.raises(ParityInputError) as e:
        load_thresholds(p)
    msg = str(e.value)
    assert f"{p} [tool.parity]" in msg
    for w in words:
        assert w in msg, msg


def test_inverted_thresholds_from_flags_name_the_flags(tmp_path):
    with pytest.raises(ParityInputError, match="lowp_min_rel = 0.1 is larger than lowp_max_rel = 0.05"):
        load_thresholds(tmp_path / "none.toml", lowp_min_rel=0.1)
    with pytest.raises(ParityInputError, match="--floor-factor"):
        load_thresholds(tmp_path / "none.toml", floor_factor=float("nan"))


@given(st.floats(1, 1e6), st.floats(1e-12, 0.999), st.floats(1e-12, 0.999))
def test_every_ordered_threshold_set_is_accepted(factor, a, b):
    t = Thresholds(floor_factor=factor, fp32_min_rel=min(a, b), fp32_max_rel=max(a, b))
    assert t.bounds("fp32") == (min(a, b), max(a, b))
