"""One-pass row statistics (parity.compare.rowstats) against the float64 metrics they replaced, the
statistics-only floor trace (parity.compare.stream), and compare_case with such a floor."""

from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from parity.compare import rowstats
from parity.compare.align import CaseTraces, compare_case, exceeded_positions, row_classes
from parity.compare.metrics import by_class, compare, row_errors
from parity.compare.rowstats import RowStats, row_stats, row_stats_multi
from parity.compare.stream import StatsTrace, StatsWriter
from parity.compare.thresholds import Thresholds
from parity.points import execution_order
from parity.records import PreparedInput
from parity.trace import Trace, TraceMeta, TraceWriter

# ---- the float64 implementation RowStats replaced (parity/compare/metrics.py before it), verbatim ----------
EPS = 1e-30


def _oracle_compare(ref: torch.Tensor, eng: torch.Tensor) -> dict[str, Any]:
    r = ref.detach().to(torch.float64).reshape(ref.shape[0] if ref.dim() > 0 else 1, -1)
    e = eng.detach().to(torch.float64).reshape(r.shape)
    fin_r, fin_e = torch.isfinite(r), torch.isfinite(e)
    nf_r = int(r.numel() - fin_r.sum())
    nf_e = int(e.numel() - fin_e.sum())
    if nf_r or nf_e:  # metrics over the entries finite on both sides
        finite = fin_r & fin_e
        rz = torch.where(finite, r, torch.zeros_like(r))
        ez = torch.where(finite, e, torch.zeros_like(e))
    else:  # the common case: no masking passes
        rz, ez = r, e
    d = ez - rz
    ref_norm = float(torch.linalg.vector_norm(rz))
    diff_norm = float(torch.linalg.vector_norm(d))
    eng_norm = float(torch.linalg.vector_norm(ez))
    if diff_norm == 0.0:
        rel = 0.0
    else:
        rel = diff_norm / ref_norm if ref_norm > 0.0 else math.inf
    if ref_norm == 0.0 and eng_norm == 0.0:
        cos = 1.0
    elif ref_norm == 0.0 or eng_norm == 0.0:
        cos = 0.0
    else:  # normalise first: a product of two tiny norms underflows
        cos = float(((rz / ref_norm) * (ez / eng_norm)).sum())
        cos = max(-1.0, min(1.0, cos))
    ad = d.abs()
    if ad.numel():
        flat = int(torch.argmax(ad))
        row, col = divmod(flat, ad.shape[1])
        max_abs = float(ad.reshape(-1)[flat])
        mean_abs = float(ad.mean())
    else:
        row = col = 0
        max_abs = mean_abs = 0.0
    out = {
        "cosine": cos,
        "rel_l2": rel,
        "max_abs": max_abs,
        "max_abs_row": row,
        "max_abs_col": col,
        "mean_abs": mean_abs,
        "ref_norm": ref_norm,
        "nonfinite_ref": nf_r,
        "nonfinite_eng": nf_e,
    }
    if nf_r or nf_e:
        # a value that is finite on one side and not on the other is an infinite error
        mismatch = torch.isfinite(r) != torch.isfinite(e)
        if bool(mismatch.any()):
            out["rel_l2"] = math.inf
            out["cosine"] = math.nan
    return out


def _oracle_row_errors(ref: torch.Tensor, eng: torch.Tensor) -> torch.Tensor:
    r = ref.detach().to(torch.float64).reshape(ref.shape[0], -1)
    e = eng.detach().to(torch.float64).reshape(r.shape)
    finite = torch.isfinite(r) & torch.isfinite(e)
    d = torch.where(finite, e - r, torch.zeros_like(r))
    rz = torch.where(finite, r, torch.zeros_like(r))
    num = torch.linalg.vector_norm(d, dim=1)
    den = torch.linalg.vector_norm(rz, dim=1)
    scale = torch.clamp(den, min=float(den.mean()) * 1e-3 + EPS)
    err = num / scale
    bad = (torch.isfinite(r) != torch.isfinite(e)).any(dim=1)
    return torch.where(bad, torch.full_like(err, math.inf), err)


def _oracle_by_class(ref, eng, classes):
    out = {}
    for name, rows in classes.items():
        if rows.numel() == 0 or not bool(rows.any()):
            continue
        m = _oracle_compare(ref[rows], eng[rows])
        out[name] = {k: m[k] for k in ("rel_l2", "max_abs", "cosine", "nonfinite_ref", "nonfinite_eng")}
        out[name]["rows"] = int(rows.sum())
    return out


# ---- agreement ---------------------------------------------------------------------------------------------
REL = 1e-6       # relative tolerance of sums (float32 accumulation against float64)
COS = 1e-6       # absolute tolerance of cosines
EXACT = ("max_abs", "max_abs_row", "max_abs_col", "nonfinite_ref", "nonfinite_eng", "rows")
worst = {"rel": 0.0, "cos": 0.0}


def _close(key: str, want, got) -> bool:
    if key in EXACT:
        return want == got
    if math.isnan(want) or math.isnan(got):
        return math.isnan(want) and math.isnan(got)
    if math.isinf(want) or math.isinf(got):
        return want == got
    if key == "cosine":
        worst["cos"] = max(worst["cos"], abs(want - got))
        return abs(want - got) <= COS
    err = abs(want - got) / max(abs(want), abs(got), 1e-300)
    worst["rel"] = max(worst["rel"], err)
    return err <= REL or abs(want - got) <= 1e-300


def assert_same_metrics(want: dict, got: dict) -> None:
    assert set(want) == set(got)
    for k in want:
        assert _close(k, want[k], got[k]), (k, want[k], got[k])


def assert_same_by_class(want: dict, got: dict) -> None:
    assert set(want) == set(got)
    for c in want:
        assert_same_metrics(want[c], got[c])


def assert_same_row_errors(want: torch.Tensor, got: torch.Tensor) -> None:
    assert want.shape == got.shape and got.dtype == torch.float64
    assert torch.equal(torch.isinf(want), torch.isinf(got))
    assert torch.equal(torch.isnan(want), torch.isnan(got))
    fin = torch.isfinite(want)
    assert torch.allclose(got[fin], want[fin], rtol=REL, atol=1e-300)


@contextmanager
def chunk_elems(n: int | None):
    old = rowstats._CHUNK_ELEMS
    rowstats._CHUNK_ELEMS = n or old
    try:
        yield
    finally:
        rowstats._CHUNK_ELEMS = old


_special = st.sampled_from([math.nan, math.inf, -math.inf, 0.0, -0.0, 3e38, -3e38, 1e20, 1e-40, -1e-42, 1e-25])
_values = st.one_of(st.floats(-1e3, 1e3, allow_nan=False, width=32), st.floats(-2.0 ** -66, 2.0 ** -66, width=32),
                    _special)
_dtypes = st.sampled_from([(torch.float32, torch.float32)] * 4 + [
    (torch.float32, torch.float64), (torch.float64, torch.float64), (torch.bfloat16, torch.bfloat16),
    (torch.float16, torch.float32), (torch.float64, torch.float32)])


@st.composite
def pairs(draw, max_rows: int = 6):
    rows = draw(st.integers(1, max_rows))
    cols = draw(st.sampled_from([1, 2, 3, 5, 17, 63, 64, 65, 130]))
    n = rows * cols
    mode = draw(st.sampled_from(["values", "values", "dense", "ulps"]))
    if mode == "values":  # hypothesis' own values, incl. non-finite, huge, subnormal
        ref = torch.tensor(draw(st.lists(_values, min_size=n, max_size=n)), dtype=torch.float64).reshape(rows, cols)
        noise = torch.tensor(draw(st.lists(_values, min_size=n, max_size=n)), dtype=torch.float64).reshape(rows, cols)
        keep = torch.tensor(draw(st.lists(st.booleans(), min_size=n, max_size=n))).reshape(rows, cols)
        other = torch.where(keep, ref, noise)
    else:  # realistic: a dense reference and a slightly different other (ulp-level: many ties)
        g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
        scale = draw(st.sampled_from([1e-30, 1e-3, 1.0, 1e4]))
        ref = torch.randn(rows, cols, generator=g, dtype=torch.float64) * scale
        rel = 1e-3 if mode == "dense" else 2.0 ** -23
        other = ref * (1 + rel * torch.randint(-2, 3, (rows, cols), generator=g))
    dr, do = draw(_dtypes)
    ref, other = ref.to(dr), other.to(do)
    if draw(st.booleans()) and cols == 1:
        ref, other = ref.reshape(-1), other.reshape(-1)  # 1-D
    return ref, other


def _classes(draw, rows: int) -> dict[str, torch.Tensor]:
    image = torch.tensor(draw(st.lists(st.booleans(), min_size=rows, max_size=rows)))
    bos = torch.zeros(rows, dtype=torch.bool)
    bos[0] = not bool(image[0])
    return {"image": image, "text": ~image & ~bos, "bos": bos}


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(pairs(), st.sampled_from([None, 1, 64, 200]), st.data())
def test_rowstats_equal_the_float64_metrics(pair, chunk, data):
    ref, other = pair
    classes = _classes(data.draw, ref.shape[0])
    with chunk_elems(chunk):
        stt = row_stats(ref, other)
        assert_same_metrics(_oracle_compare(ref, other), stt.metrics())
        assert_same_metrics(_oracle_compare(ref, other), compare(ref, other))
        assert_same_by_class(_oracle_by_class(ref, other, classes), stt.by_class(classes))
        assert_same_by_class(_oracle_by_class(ref, other, classes), by_class(ref, other, classes))
        assert_same_row_errors(_oracle_row_errors(ref, other), stt.row_errors())
        assert_same_row_errors(_oracle_row_errors(ref, other), row_errors(ref, other))
        for rows in classes.values():
            if bool(rows.any()):
                assert_same_metrics(_oracle_compare(ref[rows], other[rows]), stt.metrics(rows))
        # max |other| per row, over every entry (NaN-propagating), as the PLoRA check reads it
        raw = other.detach().double().reshape(ref.shape[0], -1).abs().amax(1)
        assert torch.equal(torch.isnan(raw), torch.isnan(stt.max_e))
        assert torch.equal(raw.nan_to_num(), stt.max_e.nan_to_num())


@settings(max_examples=100, deadline=None)
@given(pairs(), pairs(), st.sampled_from([None, 64]))
def test_many_pairs_in_one_pass_equal_one_pair_at_a_time(a, b, chunk):
    ref, o1 = a
    o2 = b[1]
    if o2.numel() != ref.numel():
        o2 = o1.to(torch.float64) * 2
    with chunk_elems(chunk):
        many = row_stats_multi(ref, [o1, o2, o1])
        for o, got in zip((o1, o2, o1), many):
            want = row_stats(ref, o)
            for k in rowstats._FLOAT_FIELDS + rowstats._INT_FIELDS + ("mismatch",):
                assert torch.equal(getattr(want, k).nan_to_num(), getattr(got, k).nan_to_num()), k


def test_float32_rounding_ties_resolve_to_the_float64_first_maximum():
    # |d| in float64: [1 - 1e-8, 1.0]: float32 rounds both to 1.0, the float64 maximum is the second column
    r = torch.tensor([[1e-8, 0.0], [0.0, 0.0]], dtype=torch.float32)
    e = torch.tensor([[1.0, 1.0], [1.0, 0.0]], dtype=torch.float32)
    m, want = compare(r, e), _oracle_compare(r, e)
    assert (m["max_abs_row"], m["max_abs_col"], m["max_abs"]) == (0, 1, 1.0) == (
        want["max_abs_row"], want["max_abs_col"], want["max_abs"])
    # across rows: row 0's float64 maximum is below row 1's, although both round to 1.0
    r2 = torch.tensor([[1e-8, 1e-8], [0.0, 0.0]], dtype=torch.float32)
    assert compare(r2, e)["max_abs_row"] == _oracle_compare(r2, e)["max_abs_row"] == 1
    # real ties (identical float64 values) keep the first one, across column blocks too
    e3 = torch.zeros(2, 200)
    e3[1, 130] = e3[1, 7] = e3[0, 199] = 2.0
    m3 = compare(torch.zeros(2, 200), e3)
    assert (m3["max_abs_row"], m3["max_abs_col"]) == (0, 199)
    assert compare(torch.zeros(1, 200), e3[1:])["max_abs_col"] == 7


def test_zero_rows_and_zero_columns():
    for shape in ((0, 5), (0,), (3, 0)):
        s = row_stats(torch.zeros(shape), torch.zeros(shape))
        m = s.metrics()
        assert m["rel_l2"] == 0.0 and m["cosine"] == 1.0 and m["max_abs"] == 0.0 and m["mean_abs"] == 0.0
        assert (m["max_abs_row"], m["max_abs_col"], m["nonfinite_ref"]) == (0, 0, 0)
        assert s.rows == shape[0] and s.row_errors().shape == (shape[0],)
        assert s.by_class({"a": torch.zeros(shape[0], dtype=torch.bool)}) == {}


def test_underflow_and_overflow_fall_back_to_float64():
    tiny = torch.full((2, 70), 1e-30)          # float32 squares underflow to 0
    huge = torch.full((2, 70), 1e30)           # float32 squares overflow
    for r in (tiny, huge, tiny * 1e8):
        e = r * 1.5
        assert_same_metrics(_oracle_compare(r, e), compare(r, e))
        assert_same_row_errors(_oracle_row_errors(r, e), row_errors(r, e))
    r = torch.zeros(1, 70)
    e = torch.full((1, 70), 1e-40)             # subnormal difference: not an exact zero
    assert compare(r, e)["rel_l2"] == math.inf == _oracle_compare(r, e)["rel_l2"]


@pytest.mark.parametrize("noise", [1e-7, 1e-4, 1e-1])
def test_accuracy_at_model_widths(noise):
    """Float32 accumulation over realistic rows: rel_l2 within 1e-6 relative, cosine 1e-6 absolute."""
    g = torch.Generator().manual_seed(1)
    for cols in (4096, 14336):
        r = torch.randn(6, cols, generator=g) * torch.logspace(-2, 2, 6)[:, None]
        r[:, :5] *= 50  # outlier channels, as in LLM activations
        e = (r.double() * (1 + noise * torch.randn(6, cols, generator=g, dtype=torch.float64))).float()
        classes = {"image": torch.tensor([True, False] * 3), "bos": torch.tensor([True] + [False] * 5)}
        assert_same_metrics(_oracle_compare(r, e), compare(r, e))
        assert_same_by_class(_oracle_by_class(r, e, classes), by_class(r, e, classes))
        assert_same_row_errors(_oracle_row_errors(r, e), row_errors(r, e))


def test_storage_round_trip():
    r = torch.randn(5, 9)
    e = r.clone()
    e[2, 3] = math.nan
    s = row_stats(r, e)
    d = s.to_tensors("attention.wqkv:delta")
    assert all(k.startswith("attention.wqkv:delta/") for k in d)
    back = RowStats.from_tensors(d, "attention.wqkv:delta")
    assert RowStats.prefixes(d) == ["attention.wqkv:delta"]
    assert back.cols == s.cols
    for k in rowstats._FLOAT_FIELDS + rowstats._INT_FIELDS + ("mismatch",):
        assert torch.equal(getattr(back, k).nan_to_num(), getattr(s, k).nan_to_num()) and \
            getattr(back, k).dtype == getattr(s, k).dtype


# ---- the statistics-only floor trace ---------------------------------------------------------------------
def _write_trace(root, layers: int, rows: int, cols: int, seed: int, dtype=torch.float32, like: Trace | None = None,
                 rel: float = 1e-7, side: str = "reference", bump: dict | None = None) -> Trace:
    """A small trace with every canonical point and the wqkv PLoRA parts; `like` + relative noise if given."""
    g = torch.Generator().manual_seed(seed)

    def value(layer, key, shape):
        if like is not None:
            base = like.get(layer, key)
            k = (bump or {}).get((layer, key), rel)
            return (base.double() * (1 + k * torch.randn(base.shape, generator=g, dtype=torch.float64))).to(dtype)
        return torch.randn(shape, generator=g).to(dtype)

    w = TraceWriter(root, TraceMeta(side=side, case="c", num_layers=layers, dtype=str(dtype)))
    w.pre("embeddings", value(None, "embeddings", (rows, cols)))
    for i in range(layers):
        vals = {p: value(i, p, (rows, cols)) for p in ("attention_norm", "attention.wqkv", "attention", "attention.wo",
                                                         "ffn_norm", "feed_forward.w1", "feed_forward.w3",
                                                         "feed_forward.w2", "layer")}
        vals["attention.wqkv:delta"] = value(i, "attention.wqkv:delta", (rows, cols))
        vals["attention.wqkv:mask"] = torch.ones(rows, dtype=torch.uint8)
        w.layer(i, vals)
    w.post("norm", value(None, "norm", (rows, cols)))
    w.post("output", value(None, "output", (rows, 2 * cols)))
    w.meta.plora = {"0": {"attention.wqkv": {"rank": 4, "scale": 0.5}}}
    return w.close()


def _drive(writer, trace: Trace, mangle: bool = True):
    """Replay `trace` through a writer, as capture_reference would (`mangle`: plus keys to be skipped)."""
    writer.pre("embeddings", trace.get(None, "embeddings"))
    for i in range(trace.num_layers):
        vals = trace.layer(i)
        if mangle:
            vals["only_here"] = torch.ones(3)                 # a key the reference lacks
        writer.layer(i, vals)
    writer.post("norm", trace.get(None, "norm")[None])    # batch of one, squeezed like a trace
    output = trace.get(None, "output")
    writer.post("output", output[:, :-1] if mangle else output)  # mangled: a shape the reference lacks
    writer.meta.plora = trace.meta.plora
    return writer.close()


def test_stats_writer_round_trip(tmp_path):
    ref = _write_trace(tmp_path / "ref", 2, 7, 70, seed=0)
    floor = _write_trace(tmp_path / "floor", 2, 7, 70, seed=1, dtype=torch.float64, like=ref, side="floor")
    meta = TraceMeta(side="floor-local", case="c", num_layers=2, dtype="float64")
    stt = _drive(StatsWriter(tmp_path / "stats", meta, against=ref), floor)
    assert isinstance(stt, StatsTrace) and stt.num_layers == 2 and stt.meta.side == "floor-local"
    assert stt.plora(0, "attention.wqkv") == {"rank": 4, "scale": 0.5}
    assert not any(p.suffix == ".tmp" for p in (tmp_path / "stats").iterdir())
    again = StatsTrace(tmp_path / "stats")
    for layer, point in list(execution_order(2)) + [(0, "attention.wqkv:delta"), (1, "attention.wqkv:delta")]:
        got = again.stats(layer, point)
        if point == "output":
            assert got is None
            continue
        want = row_stats(ref.get(layer, point), floor.get(layer, point))
        assert got is not None and got.cols == want.cols
        for k in rowstats._FLOAT_FIELDS + rowstats._INT_FIELDS + ("mismatch",):
            assert torch.equal(getattr(got, k), getattr(want, k)), (layer, point, k)
    assert again.stats(0, "attention.wqkv:mask") is None and again.stats(0, "only_here") is None
    assert again.stats(5, "layer") is None
    assert "attention.wqkv:delta" in again.points(0)
    # skip_parts leaves PLoRA parts out
    st2 = _drive(StatsWriter(tmp_path / "stats2", meta, against=ref, skip_parts={"delta"}), floor)
    assert st2.stats(0, "attention.wqkv:delta") is None and st2.stats(0, "layer") is not None


def _prepared(rows: int) -> PreparedInput:
    image = torch.zeros(rows, dtype=torch.bool)
    image[2:rows - 2] = True
    bos = torch.zeros(rows, dtype=torch.bool)
    bos[0] = True
    return PreparedInput(name="c", token_ids=[0] * rows, image_rows=image, bos_rows=bos,
                         embeddings=torch.zeros(rows, 4), image_features=[], ranges=[(2, rows - 2)],
                         bos_policy="first", placeholder_id=0)


def _oracle_compare_case(ct: CaseTraces, thresholds: Thresholds, numeric: str) -> list[tuple]:
    """parity/compare/align.py's compare_case before RowStats, on the oracle metrics (floor as values)."""
    classes = row_classes(ct.prepared)
    out = []
    for layer, point in execution_order(ct.reference.num_layers):
        ref, eng = ct.reference.get(layer, point), ct.engine.get(layer, point)
        loc = ct.engine_local.get(layer, point)
        fl = ct.floor_local.get(layer, point)

        def met(a, b):
            m = _oracle_compare(a, b)
            m["by_class"] = _oracle_by_class(a, b, classes)
            return m
        e2e, local, floor_local = met(ref, eng), met(ref, loc), met(ref, fl)
        threshold = thresholds.threshold(floor_local["rel_l2"], numeric)
        exceeded = not math.isfinite(local["rel_l2"]) or local["rel_l2"] > threshold
        for cls, cm in local["by_class"].items():
            cf = floor_local["by_class"].get(cls, {}).get("rel_l2", floor_local["rel_l2"])
            cm["floor"], cm["threshold"] = cf, thresholds.threshold(cf, numeric)
            cm["exceeded"] = not math.isfinite(cm["rel_l2"]) or cm["rel_l2"] > cm["threshold"]
            exceeded = exceeded or cm["exceeded"]
        row_err = _oracle_row_errors(ref, eng).tolist() if point in ("layer", "embeddings", "norm") else []
        out.append((layer, point, e2e, local, floor_local["rel_l2"], threshold, row_err, bool(exceeded)))
    return out


def test_compare_case_with_a_statistics_floor_equals_a_value_floor(tmp_path):
    rows, cols = 9, 70
    ref = _write_trace(tmp_path / "ref", 2, rows, cols, seed=0)
    floor = _write_trace(tmp_path / "floor", 2, rows, cols, seed=1, dtype=torch.float64, like=ref, rel=1e-7)
    eng = _write_trace(tmp_path / "eng", 2, rows, cols, seed=2, like=ref, rel=3e-6)
    loc = _write_trace(tmp_path / "loc", 2, rows, cols, seed=3, like=ref, rel=3e-7,
                       bump={(1, "feed_forward.w2"): 1e-3, (0, "attention"): 3e-6})
    meta = TraceMeta(side="floor-local", case="c", num_layers=2, dtype="float64")
    stats = _drive(StatsWriter(tmp_path / "stats", meta, against=ref), floor, mangle=False)
    p, th = _prepared(rows), Thresholds()
    with_stats = compare_case(CaseTraces(p, ref, None, stats, eng, loc), th, "fp32")
    with_values = compare_case(CaseTraces(p, ref, None, floor, eng, loc), th, "fp32")
    assert with_stats == with_values
    assert all("floor_e2e" not in r.local for r in with_stats)
    assert any(r.exceeded for r in with_stats) and not all(r.exceeded for r in with_stats)
    # the live path: the end-to-end floor as values in both roles
    live = compare_case(CaseTraces(p, ref, floor, floor, eng, loc), th, "fp32")
    assert [r.local.pop("floor_e2e") for r in live] == [r.floor for r in live]
    assert live == with_values
    # and against the float64 implementation: same points, same verdicts, metrics within tolerance
    want = _oracle_compare_case(CaseTraces(p, ref, floor, floor, eng, loc), th, "fp32")
    assert [(w[0], w[1]) for w in want] == [(r.layer, r.module) for r in with_stats]
    assert [w[7] for w in want] == [r.exceeded for r in with_stats]
    for w, r in zip(want, with_stats):
        assert exceeded_positions(r) in ("image", "text", "all")
        for mine, theirs in ((r.e2e, w[2]), (r.local, w[3])):
            by_mine, by_theirs = mine.pop("by_class"), theirs.pop("by_class")
            assert_same_metrics(theirs, mine)
            judged = ("floor", "threshold", "exceeded")
            for c in by_theirs:
                assert by_mine[c].get("exceeded") == by_theirs[c].get("exceeded")
                assert_same_metrics({k: v for k, v in by_theirs[c].items() if k not in judged},
                                    {k: v for k, v in by_mine[c].items() if k not in judged})
        assert _close("rel_l2", w[4], r.floor)
        assert_same_row_errors(torch.tensor(w[6], dtype=torch.float64), torch.tensor(r.row_err, dtype=torch.float64))
    # no teacher-forced trace (engine_local is the engine): local = e2e
    same = compare_case(CaseTraces(p, ref, None, stats, eng, eng), th, "fp32")
    for r in same:
        assert r.local["rel_l2"] == r.e2e["rel_l2"] and r.local["by_class"].keys() == r.e2e["by_class"].keys()


def test_max_abs_other_is_recovered_exactly_from_the_float32_square():
    """max |other| comes from max other^2 in float32 (one pass fewer): fl32(sqrt64(fl32(x^2))) == x for every
    float32 x of [1, 4) - every mantissa at both exponent parities, so every binade of the normal range -
    and row_stats recovers sampled values exactly, also near the ends of the range it accepts."""
    lo, hi = (torch.tensor(v).view(torch.int32).item() for v in (1.0, 4.0))
    x = torch.arange(lo, hi, dtype=torch.int32).view(torch.float32)
    assert torch.equal((x * x).to(torch.float64).sqrt_().to(torch.float32), x)
    for scale in (1.0, 2.0 ** -45, 2.0 ** 60):
        e = (x[::97] * scale).reshape(-1, 1)
        assert torch.equal(row_stats(torch.zeros_like(e), e).max_e, e.flatten().double())
        e = e[: e.numel() // 64 * 64].reshape(-1, 64)
        assert torch.equal(row_stats(torch.zeros_like(e), -e).max_e, e.amax(1).double())
