"""The report writers: strict JSON with the contract keys, an escaped self-contained HTML page, atomic writes,
an unwritable folder as ParityInputError, the pytest failure message and the terminal summary."""

from __future__ import annotations

import html.parser
import io
import json
import math
import os
import re

import markupsafe
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from rich.console import Console

from parity.errors import ParityInputError
from parity.points import LAYER_POINTS, PLORA_LINEARS
from parity.records import CaseSummary, Divergence, Finding, PointResult, Report
from parity.report import render_failure_message, write_reports
from parity.report._common import fmt_num
from parity.report.html_report import render_html, write_html
from parity.report.json_report import read_json, report_to_json, write_json
from parity.report.terminal import print_summary

EVIL = "<script>alert(1)</script>"
LAYERS = 3

# ---------------------------------------------------------------- synthetic reports


def _metrics(rel: float, img: float | None = None, txt: float | None = None) -> dict:
    img = rel if img is None else img
    txt = rel if txt is None else txt
    return {"cosine": 1 - rel * rel / 2, "rel_l2": rel, "max_abs": 10 * rel, "max_abs_row": 3, "max_abs_col": 17,
            "mean_abs": rel / 2, "nonfinite_ref": 0, "nonfinite_eng": 0,
            "by_class": {"image": {"rel_l2": img, "max_abs": 10 * img, "cosine": 1.0, "rows": 4},
                         "text": {"rel_l2": txt, "max_abs": 10 * txt, "cosine": 1.0, "rows": 6}}}


def _case(name: str, spans: list[tuple[int, int]], rows: int, engine_shift: bool = False) -> CaseSummary:
    labels = ["<s>"] + [f"▁w{i}" for i in range(1, rows)]
    canon = [0] * rows
    for k, (b, e) in enumerate(spans):
        for i in range(b, e):
            labels[i] = f"<img {k}>"
            canon[i] = 1
    engine = list(canon)
    if engine_shift:
        engine[spans[0][0]] = 0
    return CaseSummary(name=name, rows=rows, bos_policy="first", image_spans=spans, bos_rows=[0], row_labels=labels,
                       hashes={"token_ids": "abc123"}, masks={"hf": canon, "engine": engine, "canonical": canon})


def make_report(failing: bool) -> Report:
    """2 cases x 3 layers x 9 points; the failing one has a LoRA scale bug on image rows, NaN / inf metrics,
    and '<script>' in the model path, a finding message and a row label."""
    cases = [_case("single", [(2, 6)], 10), _case("double", [(1, 4), (5, 8)], 10, engine_shift=failing)]
    floor, thr = 2e-3, 2e-2
    points = []
    for c in cases:
        for layer in range(LAYERS):
            for mod in LAYER_POINTS:
                bad = failing and mod in PLORA_LINEARS + ("attention", "layer")
                local = _metrics(0.15 if bad else 1e-3, img=0.2 if bad else 1e-3)
                e2e = _metrics(0.05 * (layer + 1) if failing else 1.5e-3)
                row_err = [0.3 if (failing and i in range(2, 6)) else 1e-3 for i in range(c.rows)] \
                    if mod == "layer" else []
                points.append(PointResult(case=c.name, layer=layer, module=mod, e2e=e2e, local=local, floor=floor,
                                          threshold=thr, row_err=row_err, exceeded=bad))
        points.append(PointResult(case=c.name, layer=None, module="embeddings", e2e=_metrics(0.0), local=None,
                                  floor=floor, threshold=thr))
    findings, div = [], None
    if failing:
        # the awkward values
        points[5].e2e["rel_l2"] = math.nan
        points[5].e2e["max_abs"] = math.inf
        points[8].local["cosine"] = -math.inf
        points[8].row_err[3] = math.nan
        points[9].e2e["max_abs"] = 1.7e308
        div = Divergence(layer=0, module="attention.wqkv", positions="image", cause="lora_scale_mismatch",
                         case="single", message="image-row LoRA delta is 2x the reference's")
        findings = [
            Finding(check="plora", severity="warning", cause="im_mask_mismatch", message="engine mask shifted",
                    module="embeddings", positions="image", case="double"),
            Finding(check="plora", severity="error", cause="lora_scale_mismatch",
                    message="image-row LoRA delta is 2x the reference's", layer=0, module="attention.wqkv",
                    positions="image", case="single", metrics={"ratio": 2.0, "rel_l2": math.nan}),
            Finding(check="nonfinite", severity="error", cause="nonfinite", message=f"bad tensor {EVIL}",
                    layer=0, module="ffn_norm", positions="all", case="single",
                    metrics={"max_abs": math.inf, "neg": -math.inf}),
            Finding(check="config", severity="info", cause="config_mismatch", message="fyi"),
        ]
    return Report(
        status="fail" if failing else "pass",
        engine={"kind": "turbomind", "lmdeploy_version": "0.7.1", "numeric": "bf16",
                "semantics": {"version": "0.7.1", "runtime_applies_plora": True}},
        model=f"/models/tiny{EVIL}" if failing else "/models/tiny",
        workspace=None,
        findings=findings,
        first_divergence=div,
        points=points,
        cases=cases,
        config_audit=[{"field": "lora_scale", "hf": 1.0, "engine": 2.0 if failing else 1.0, "ok": not failing,
                       "note": EVIL}],
        weights_audit=[{"tensor": f"layers.{i}.attention.wqkv.weight", "status": "ok", "shape": [8, 8],
                        "max_abs_diff": 0.0} for i in range(LAYERS)]
        + ([{"tensor": "layers.0.lora_b", "status": "missing", "shape": None, "max_abs_diff": math.nan}]
           if failing else []),
        plora_table=[{"case": "single", "layer": 0, "linear": "attention.wqkv", "rank_ref": 8, "rank_eng": 8,
                      "scale_ref": 1.0, "scale_eng": 2.0 if failing else 1.0, "ok": not failing}],
        thresholds={"floor_factor": 10.0},
        timings={"reference": 0.5},
        parity_version="0.1.0",
    )


def _reject(name):
    raise ValueError(f"non-standard JSON constant {name}")


def strict_loads(text: str):
    return json.loads(text, parse_constant=_reject)


@pytest.fixture(params=["clean", "failing"])
def report(request) -> Report:
    return make_report(request.param == "failing")


# ---------------------------------------------------------------- JSON


def test_json_is_strict_and_has_the_contract_keys(report, tmp_path):
    paths = write_reports(report, tmp_path / "out")
    doc = strict_loads(paths["json"].read_text(encoding="utf-8"))
    assert doc["status"] == report.status
    assert {"kind", "lmdeploy_version"} <= set(doc["engine"])
    assert isinstance(doc["findings"], list) and len(doc["findings"]) == len(report.findings)
    for f in doc["findings"]:
        assert {"check", "severity", "layer", "module", "positions", "cause", "message", "metrics"} <= set(f)
    if report.first_divergence is None:
        assert doc["first_divergence"] is None
    else:
        assert {"layer", "module", "positions", "cause"} <= set(doc["first_divergence"])
        assert doc["first_divergence"]["module"] == "attention.wqkv"
    assert isinstance(doc["layers"], list) and len(doc["layers"]) == len(report.points) == 2 * (LAYERS * 9 + 1)
    assert {"case", "layer", "module", "e2e", "local", "floor", "threshold", "row_err", "exceeded"} \
        <= set(doc["layers"][0])
    assert read_json(paths["json"]) == doc


def test_json_nonfinite_are_strings(tmp_path):
    rep = make_report(True)
    path = write_json(rep, tmp_path / "r.json")
    text = path.read_text(encoding="utf-8")
    assert "NaN" not in text and "Infinity" not in text
    doc = strict_loads(text)
    assert doc["layers"][5]["e2e"]["rel_l2"] == "nan"
    assert doc["layers"][5]["e2e"]["max_abs"] == "inf"
    assert doc["layers"][8]["local"]["cosine"] == "-inf"
    assert doc["layers"][8]["row_err"][3] == "nan"
    assert doc["layers"][9]["e2e"]["max_abs"] == 1.7e308
    assert doc["layers"][-1]["local"] is None           # "not measured" stays null
    back = read_json(path, restore_nonfinite=True)
    assert math.isnan(back["layers"][5]["e2e"]["rel_l2"]) and back["layers"][8]["local"]["cosine"] == -math.inf


# ---------------------------------------------------------------- HTML


class _Collector(html.parser.HTMLParser):
    def __init__(self):
        super().__init__()
        self.scripts: list[dict] = []
        self._in: dict | None = None
        self.text: list[str] = []

    def handle_starttag(self, tag, attrs):
        if tag == "script":
            self._in = {"attrs": dict(attrs), "body": []}

    def handle_endtag(self, tag):
        if tag == "script" and self._in is not None:
            self._in["body"] = "".join(self._in["body"])
            self.scripts.append(self._in)
            self._in = None

    def handle_data(self, data):
        if self._in is not None:
            self._in["body"].append(data)
        else:
            self.text.append(data)


def _parse(page: str) -> _Collector:
    c = _Collector()
    c.feed(page)
    c.close()
    return c


def test_html_is_self_contained_and_escaped(tmp_path):
    rep = make_report(True)
    page = write_html(rep, tmp_path / "report.html").read_text(encoding="utf-8")
    assert "alert(1)" in page
    assert EVIL not in page                                   # never raw
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page     # shown as text
    doc = _parse(page)
    figures = [s for s in doc.scripts if "data-figure" in s["attrs"]]
    code = [s for s in doc.scripts if "data-figure" not in s["attrs"]]
    assert len(figures) >= 2 * 3 - 1                           # mask + curves + heatmap per case
    assert len(code) == 2                                      # plotly.js once + the page script
    packed = [s for s in code if "plotly-gz" in str(s["attrs"])]  # plotly.js gzip+base64, inflated by the page
    assert len(packed) == 1
    import base64
    import gzip

    js = gzip.decompress(base64.b64decode(packed[0]["body"])).decode()
    assert "Plotly" in js and len(js) > 1_000_000
    assert all("src" not in s["attrs"] for s in doc.scripts)    # nothing loaded from elsewhere
    assert not re.search(r"""(src|href)=["']?(https?:)?//""", page.split("<script>", 1)[0])
    for s in figures:
        fig = strict_loads(s["body"])                          # strict JSON: NaN became null
        assert fig["data"] and "layout" in fig
        assert "<" not in s["body"]
    text = " ".join(doc.text)
    assert "FAIL" in text and "Layer 0, module attention.wqkv, image rows" in text
    assert "lora_scale_mismatch" in text and "image-row LoRA delta is 2x" in text
    assert "NaN" in text and "inf" in text
    # errors before warnings before info in the findings table
    sev = re.findall(r'<span class="sev (error|warning|info)">', page.split('id="findings-table"')[1]
                     .split("</table>")[0])
    assert sev == sorted(sev, key=["error", "warning", "info"].index) and sev[0] == "error"
    assert 'id="first-divergence"' in page


def test_html_clean_report(tmp_path):
    page = write_html(make_report(False), tmp_path / "report.html").read_text(encoding="utf-8")
    assert 'class="verdict pass"' in page and ">PASS<" in page
    assert "No divergence" in page
    assert "3 tensor(s) OK" in page


def test_html_error_status_and_empty_report():
    rep = Report(status="error", engine={}, model="m", workspace=None, findings=[
        Finding(check="engine", severity="error", cause="unsupported_version", message="lmdeploy 0.9.2 asserts")],
        first_divergence=None)
    page = render_html(rep, inline_plotlyjs=False)
    assert 'class="verdict error"' in page and "unsupported_version" in page and "lmdeploy 0.9.2 asserts" in page
    assert "No points were compared" in page


# ---------------------------------------------------------------- writes


def test_atomic_writes_leave_no_temp_files(tmp_path):
    out = tmp_path / "out"
    write_reports(make_report(True), out)
    write_reports(make_report(False), out)   # overwrite in place
    assert sorted(p.name for p in out.iterdir()) == ["report.html", "report.json"]
    assert strict_loads((out / "report.json").read_text())["status"] == "pass"
    mode = (out / "report.json").stat().st_mode & 0o777
    assert mode & 0o044  # readable by others (not mkstemp's 0600)


def test_failed_write_keeps_old_file_and_removes_temp(tmp_path, monkeypatch):
    out = tmp_path / "out"
    write_reports(make_report(False), out)
    before = (out / "report.json").read_text()

    def boom(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(ParityInputError, match="No space left"):
        write_reports(make_report(True), out)
    monkeypatch.undo()
    assert (out / "report.json").read_text() == before
    assert sorted(p.name for p in out.iterdir()) == ["report.html", "report.json"]


def test_unwritable_folder_raises_parity_input_error(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    target = blocker / "reports"       # a folder under a regular file: impossible even for root
    with pytest.raises(ParityInputError) as exc:
        write_reports(make_report(True), target)
    msg = str(exc.value)
    assert str(target) in msg and "\n" not in msg
    with pytest.raises(ParityInputError):
        write_reports(make_report(True), blocker)   # the "folder" is a file


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root ignores folder permissions")
def test_read_only_folder_raises_parity_input_error(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        with pytest.raises(ParityInputError, match=re.escape(str(ro))):
            write_reports(make_report(True), ro)
    finally:
        ro.chmod(0o700)


# ---------------------------------------------------------------- text outputs


def test_failure_message():
    rep = make_report(True)
    msg = render_failure_message(rep, top=5)
    lines = msg.splitlines()
    assert lines[0].startswith("parity FAIL") and "2 error(s)" in lines[0]
    assert lines[1].startswith("first divergence: ")
    assert "Layer 0, module attention.wqkv, image rows: lora_scale_mismatch" in lines[1]
    assert len(lines) == 2 + 2 + 1
    assert "[lora_scale_mismatch]" in lines[2] and "[nonfinite]" in lines[3]   # errors only, in order
    assert lines[4].startswith("report: not written")  # where to look, or how to get a report
    assert len(render_failure_message(rep, top=1).splitlines()) == 2 + 1 + 1 + 1  # "… 1 more"
    assert "first divergence" not in render_failure_message(make_report(False))


def test_terminal_summary():
    rep = make_report(True)
    con = Console(record=True, width=200, file=io.StringIO())
    print_summary(rep, con, paths={"html": "/tmp/x/report.html", "json": "/tmp/x/report.json"})
    out = con.export_text()
    assert "FAIL" in out and "attention.wqkv" in out and "lora_scale_mismatch" in out
    assert "/tmp/x/report.html" in out and EVIL in out           # plain text in a terminal: shown as is
    narrow = Console(record=True, width=80, file=io.StringIO())
    print_summary(make_report(False), narrow)
    assert "PASS" in narrow.export_text()


def test_number_format():
    assert fmt_num(math.nan) == "NaN" and fmt_num(math.inf) == "inf" and fmt_num(-math.inf) == "-inf"
    assert fmt_num(0.0) == "0" and fmt_num(None) == "—" and fmt_num(3) == "3"
    assert fmt_num(0.123456) == "0.123" and fmt_num(1.5e-5) == "1.50e-05" and fmt_num(123456.0) == "1.23e+05"
    assert fmt_num("nan") == "NaN" and fmt_num(True) == "yes"


# ---------------------------------------------------------------- property: any metric value

_floats = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([math.nan, math.inf, -math.inf, 0.0, -0.0, 1e308, -1e308, 5e-324, 1e-300]),
    st.integers(min_value=-(2 ** 70), max_value=2 ** 70),
    st.none(),
)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(vals=st.lists(_floats, min_size=12, max_size=12), row=st.lists(_floats, min_size=10, max_size=10),
       text=st.text(max_size=40))
def test_any_metric_values_give_valid_json_and_html(vals, row, text):
    rep = make_report(True)
    p = rep.points[0]
    for key, v in zip(("cosine", "rel_l2", "max_abs", "max_abs_row", "max_abs_col", "mean_abs"), vals):
        p.e2e[key] = v
        p.local[key] = v
    p.local["by_class"]["image"]["rel_l2"] = vals[6]
    p.floor, p.threshold = vals[7], vals[8]
    lp = next(q for q in rep.points if q.module == "layer")
    lp.row_err = row
    lp.e2e["rel_l2"], lp.local["rel_l2"] = vals[9], vals[10]
    rep.findings[1].metrics = {"x": vals[11], "msg": text}
    rep.findings[2].message = text
    rep.model = text
    rep.cases[0].row_labels[1] = text
    doc = strict_loads(report_to_json(rep))
    assert doc["model"] == text
    page = render_html(rep, inline_plotlyjs=False)
    parsed = _parse(page)
    for s in parsed.scripts:
        if "data-figure" in s["attrs"]:
            strict_loads(s["body"])
    assert str(markupsafe.escape(text)) in page   # the model path, escaped
    assert EVIL not in page


def test_layer_curve_subtitle_agrees_with_the_verdict():
    """A FAIL whose fault sits inside a module (no layer output over threshold) used to be captioned
    "0 of 3 layers exceeded" under the FAIL banner."""
    from parity.report.html_report import build_context

    rep = make_report(True)
    for p in rep.points:
        p.exceeded = False  # the fault shows only in the findings (e.g. the weights audit)
    worst = {c["name"]: c["worst"] for c in build_context(rep, inline_plotlyjs=False)["cases"]}
    assert "0 of" not in worst["single"]
    assert "no layer output over threshold, yet 2 error finding(s)" in worst["single"]
    assert "lora_scale_mismatch" in worst["single"] and "layer 0" in worst["single"]
    assert "within threshold" in worst["double"]  # no error finding names that case
    clean = build_context(make_report(False), inline_plotlyjs=False)["cases"]
    assert all("all 3 layer outputs within threshold" in c["worst"] for c in clean)
    bad = build_context(make_report(True), inline_plotlyjs=False)["cases"]
    assert all("3 of 3 layer outputs over threshold" in c["worst"] for c in bad)


def test_report_is_small_and_self_contained(tmp_path, monkeypatch):
    """plotly.js was 4.8 MB of a 4.9 MB report: now the cartesian partial bundle, gzip+base64 (inflated by the
    browser, tests/test_report_browser.py), so a report is at most 1.5 MB; without the partial bundle the full
    one is inlined the same way (larger, still offline)."""
    import base64
    import gzip

    from parity.report import html_report
    from parity.report.demo import demo_report

    if not html_report.PARTIAL_BUNDLE.is_file():
        pytest.skip("the plotly.js partial bundle is not in place: run scripts/fetch-plotly-partial.sh (make setup)")
    html_report.plotly_bundle.cache_clear()
    paths = write_reports(demo_report(), tmp_path / "r")
    page = paths["html"].read_text()
    assert paths["html"].stat().st_size <= 1.5e6
    packed = page.split('id="plotly-gz">')[1].split("</script>")[0]
    js = gzip.decompress(base64.b64decode(packed)).decode()
    assert js == html_report.PARTIAL_BUNDLE.read_text()
    monkeypatch.setattr(html_report, "PARTIAL_BUNDLE", tmp_path / "absent.js")
    html_report.plotly_bundle.cache_clear()
    try:
        full = write_reports(demo_report(), tmp_path / "full")["html"]
        assert 1.5e6 < full.stat().st_size < 2.5e6 and 'id="plotly-gz"' in full.read_text()
    finally:
        html_report.plotly_bundle.cache_clear()
