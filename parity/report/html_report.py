"""report.html: one self-contained page (no network: plotly.js is inlined once, gzip+base64) for the person whose
conversion just broke. Top to bottom: verdict banner with the first divergence in plain words, engine /
model / thresholds, findings (root causes first, the findings each explains collapsed under it), per case the input with image spans and the mask strip, the
per-layer error curves and the layer x position heatmap, then the module table and the PLoRA, config and
weights audits.

Rendered with jinja2 (`autoescape=True`, templates in `parity/report/templates/`): every string from the
report (model paths, prompt tokens, finding messages) is escaped. Figure JSON is embedded in
`<script type="application/json">` blocks with `<`, `>` and `&` written as \\u escapes, so no string can
close the script element. Numbers show 3 significant digits (scientific below 1e-3 and from 1e4); NaN and
inf are shown as such.

Example::

    from parity.report.html_report import write_html
    write_html(report, "reports/run1/report.html")
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
from pathlib import Path
from typing import Any, Iterable, Sequence

import jinja2
from markupsafe import Markup

from parity.points import LAYER_POINTS, POST_POINTS, PRE_POINTS
from parity.records import CaseSummary, Divergence, PointResult, Report
from parity.report import charts
from parity.report._common import (
    POSITION_WORDS,
    atomic_write_text,
    divergence_parts,
    divergence_sentence,
    finding_groups,
    fmt_num,
    fmt_value,
    related_words,
    sorted_findings,
    status_word,
    to_float,
)

__all__ = ["render_html", "write_html"]

TEMPLATES = Path(__file__).parent / "templates"
MAX_AUDIT_OK_ROWS = 5000   # OK rows of the weights audit listed (collapsed); more are only counted


PARTIAL_BUNDLE = Path(__file__).parent / "vendor" / "plotly-cartesian.min.js"


@functools.lru_cache(maxsize=1)
def plotly_bundle() -> tuple[str, str]:
    """(name, gzip+base64 text) of the plotly.js the page inlines: the cartesian partial bundle when
    scripts/fetch-plotly-partial.sh (run by `make setup`) has put it in place, else the full bundle of the
    Python plotly package. report.js inflates it in the browser (DecompressionStream): offline either way."""
    import base64
    import gzip

    if PARTIAL_BUNDLE.is_file():
        name, js = "plotly.js cartesian", PARTIAL_BUNDLE.read_text()
    else:
        from plotly.offline import get_plotlyjs

        name, js = "plotly.js", get_plotlyjs()
    return name, base64.b64encode(gzip.compress(js.encode(), compresslevel=9, mtime=0)).decode("ascii")


@functools.lru_cache(maxsize=1)
def _env() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(TEMPLATES)),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters["num"] = fmt_num
    env.filters["val"] = fmt_value
    return env


def _script_json(obj: Any) -> Markup:
    """JSON safe to place inside <script type="application/json"> (no '<', '>', '&' characters)."""
    try:  # the builders already replaced non-finite values; _strict is the slow safety net
        text = json.dumps(obj, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    except (ValueError, TypeError):
        text = json.dumps(_strict(obj), separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    text = text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")
    text = text.replace("\u2028", "\\u2028").replace("\u2029", "\\u2029")
    return Markup(text)


def _strict(obj: Any) -> Any:
    """Figure data for JSON: non-finite floats become null (plotly draws a gap); numpy etc. -> lists."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): _strict(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_strict(v) for v in obj]
    if obj is None or isinstance(obj, (bool, int, str)):
        return obj
    tolist = getattr(obj, "tolist", None)
    if callable(tolist):
        return _strict(tolist())
    return str(obj)


# ---------------------------------------------------------------- view model


def _num_class(v: Any) -> str:
    f = to_float(v)
    if f is None:
        return ""
    return "num nonfinite" if not math.isfinite(f) else "num"


def _cell(v: Any) -> dict[str, str]:
    """A table cell: text plus CSS class (numbers right-aligned, non-finite in red)."""
    f = to_float(v)
    if f is not None and not isinstance(v, str):
        return {"text": fmt_num(v), "cls": _num_class(v)}
    if isinstance(v, str) and f is not None:  # "nan"/"inf" strings
        return {"text": fmt_num(v), "cls": "num nonfinite"}
    if isinstance(v, bool):
        return {"text": "✓" if v else "✗", "cls": "ok" if v else "bad-text"}
    return {"text": fmt_value(v), "cls": ""}


def _is_bad_row(row: dict[str, Any]) -> bool:
    if row.get("ok") is False:
        return True
    st = row.get("status")
    if st is not None and str(st).lower() not in ("ok", "match", "matches", "equal", "pass", "same", "identical"):
        return True
    return False


def _generic_table(rows: Sequence[dict[str, Any]], first: Sequence[str] = ()) -> dict[str, Any]:
    cols: list[str] = [c for c in first if any(c in r for r in rows)]
    for r in rows:
        for k in r:
            if k not in cols:
                cols.append(k)
    out = []
    for r in rows:
        out.append({"bad": _is_bad_row(r), "cells": [_cell(r.get(c)) if c in r else {"text": "", "cls": ""}
                                                     for c in cols]})
    return {"columns": cols, "rows": out, "n_bad": sum(1 for r in out if r["bad"])}


_ORDER = {**{p: (0, i) for i, p in enumerate(PRE_POINTS)}, **{p: (1, i) for i, p in enumerate(LAYER_POINTS)},
          **{p: (2, i) for i, p in enumerate(POST_POINTS)}}


def _exec_key(p: PointResult, idx: int) -> tuple:
    """Execution order: pre points, then each layer's points in LAYER_POINTS order, then post points."""
    base = p.module.split(":", 1)[0]
    phase, pos = _ORDER.get(base, (1 if p.layer is not None else 2, len(LAYER_POINTS)))
    if p.layer is not None:
        phase = 1
    return (phase, p.layer if p.layer is not None else 0, pos, idx)


def _matches(div: Divergence | None, case: str | None, layer: Any, module: str | None) -> bool:
    if div is None:
        return False
    if div.case is not None and case is not None and div.case != case:
        return False
    return div.layer == layer and div.module == module


def _module_rows(report: Report) -> list[dict[str, Any]]:
    case_order = {c.name: i for i, c in enumerate(report.cases)}
    indexed = list(enumerate(report.points))
    indexed.sort(key=lambda t: (case_order.get(t[1].case, len(case_order)), t[1].case) + _exec_key(t[1], t[0]))
    div = report.first_divergence
    rows, first_marked = [], False
    for _, p in indexed:
        src, src_name = (p.local, "local") if p.local else (p.e2e or {}, "e2e")
        by = (src or {}).get("by_class") or {}
        judged = to_float((p.local or {}).get("rel_l2")) if p.local else to_float((p.e2e or {}).get("rel_l2"))
        thr = to_float(p.threshold)
        over = judged is not None and (not math.isfinite(judged) or (thr is not None and judged > thr))
        is_first = not first_marked and _matches(div, p.case, p.layer, p.module)
        first_marked = first_marked or is_first
        max_abs = src.get("max_abs")
        r, c = src.get("max_abs_row"), src.get("max_abs_col")
        at = ""
        if r is not None or c is not None:
            at = f"r{fmt_num(r)}" + (f" c{fmt_num(c)}" if c is not None else "")
        rows.append({
            "case": p.case,
            "layer": "—" if p.layer is None else str(p.layer),
            "module": p.module,
            "e2e": _cell((p.e2e or {}).get("rel_l2")),
            "local": _cell(p.local.get("rel_l2")) if p.local else {"text": "—", "cls": "num muted"},
            "over_e2e": not p.local and over,
            "over_local": bool(p.local) and over,
            "cosine": _cell(src.get("cosine")),
            "max_abs": _cell(max_abs),
            "max_at": at,
            "floor": _cell(p.floor),
            "threshold": _cell(p.threshold),
            "img": _cell((by.get("image") or {}).get("rel_l2")) if by.get("image") else {"text": "—",
                                                                                          "cls": "num muted"},
            "txt": _cell((by.get("text") or {}).get("rel_l2")) if by.get("text") else {"text": "—",
                                                                                        "cls": "num muted"},
            "src": src_name,
            "exceeded": bool(p.exceeded),
            "first": is_first,
        })
    return rows


def _finding_row(f, is_first: bool) -> dict[str, Any]:
    return {
        "severity": f.severity,
        "check": f.check,
        "cause": f.cause,
        "case": f.case or "",
        "layer": "—" if f.layer is None else str(f.layer),
        "module": f.module or "—",
        "positions": POSITION_WORDS.get(str(f.positions), str(f.positions)) if f.positions else "—",
        "message": f.message,
        "metrics": ", ".join(f"{k}={fmt_value(v)}" for k, v in (f.metrics or {}).items()),
        "first": is_first,
        "related": [],
        "related_words": "",
    }


def _finding_rows(report: Report) -> list[dict[str, Any]]:
    """One row per root cause (its related findings collapsed under it, `report.groups`), then warnings and
    info. The group holding the first divergence is marked on its root."""
    div = report.first_divergence

    def is_div(f) -> bool:
        return div is not None and f.cause == div.cause and _matches(div, f.case, f.layer, f.module)

    out, marked = [], False
    for root, related in finding_groups(report):
        first = not marked and any(is_div(f) for f in [root, *related])
        marked = marked or first
        row = _finding_row(root, first)
        row["related"] = [_finding_row(f, False) for f in related]
        row["related_words"] = related_words(related)
        out.append(row)
    out += [_finding_row(f, False) for f in sorted_findings(report.findings) if f.severity != "error"]
    return out


def _spans(rows: Iterable[int]) -> str:
    """[3, 4, 5, 9] -> '3–5, 9'."""
    rows = sorted(set(rows))
    parts, i = [], 0
    while i < len(rows):
        j = i
        while j + 1 < len(rows) and rows[j + 1] == rows[j] + 1:
            j += 1
        parts.append(str(rows[i]) if i == j else f"{rows[i]}–{rows[j]}")
        i = j + 1
    if len(parts) > 12:
        return ", ".join(parts[:12]) + f", … ({len(parts) - 12} more spans)"
    return ", ".join(parts)


def _token_text(label: str) -> str:
    if label == "":
        return "∅"
    return label.replace("\n", "↵").replace("\t", "⇥").replace("\r", "␍")


def _input_chips(case: CaseSummary, mismatch_rows: set[int]) -> list[dict[str, Any]]:
    chips: list[dict[str, Any]] = []
    span_at = {b: (k, b, e) for k, (b, e) in enumerate(case.image_spans)}
    bos = set(case.bos_rows)
    n = max(case.rows, len(case.row_labels))
    i = 0
    while i < n:
        if i in span_at and span_at[i][2] > i:
            k, b, e = span_at[i]
            bad = any(r in mismatch_rows for r in range(b, e))
            chips.append({"kind": "image", "text": f"image {k} · {e - b} rows", "title": f"rows [{b}, {e})",
                          "row": b, "bad": bad, "bos": False})
            i = e
            continue
        label = case.row_labels[i] if i < len(case.row_labels) else "?"
        chips.append({"kind": "bos" if i in bos else "text", "text": _token_text(label),
                      "title": f"row {i}" + (" · BOS" if i in bos else ""), "row": i, "bad": i in mismatch_rows,
                      "bos": i in bos})
        i += 1
    return chips


def _kv(d: dict[str, Any] | None) -> list[tuple[str, str]]:
    return [(str(k), fmt_value(v)) for k, v in (d or {}).items()]


def _engine_items(engine: dict[str, Any]) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """(main items in a fixed order, semantics items)."""
    engine = dict(engine or {})
    sem = engine.pop("semantics", None)
    if dataclasses.is_dataclass(sem) and not isinstance(sem, type):
        sem = dataclasses.asdict(sem)  # a RuntimeSemantics record
    names = [("kind", "kind"), ("lmdeploy_version", "lmdeploy"), ("numeric", "numeric mode")]
    items = [(label, fmt_value(engine.pop(k))) for k, label in names if k in engine]
    items += [(k, fmt_value(v)) for k, v in engine.items()]
    if isinstance(sem, dict):
        sem_items = [(str(k), fmt_value(v)) for k, v in sem.items()]
    elif sem is None:
        sem_items = []
    else:
        sem_items = [("semantics", fmt_value(sem))]
    return items, sem_items


def _worst(report: Report, case: str) -> str:
    """One line about the case's layer curve: the layer with the largest local (else e2e) error, and how that
    sits with the verdict (a FAIL whose fault is inside a module may leave every layer output in bounds)."""
    pts = charts.layer_points(report.points, case)
    best, best_v = None, -1.0
    for p in pts:
        v = to_float((p.local or p.e2e or {}).get("rel_l2"))
        if v is None:
            continue
        v = math.inf if not math.isfinite(v) else v
        if v > best_v:
            best, best_v = p, v
    if best is None:
        return ""
    n_ex = sum(1 for p in pts if p.exceeded)
    kind = "local" if best.local else "end-to-end"
    head = f"largest {kind} error at layer {best.layer}: {fmt_num(best_v)} (threshold {fmt_num(best.threshold)}); "
    if n_ex:
        return head + f"{n_ex} of {len(pts)} layer outputs over threshold"
    errors = [f for f in sorted_findings(report.findings) if f.severity == "error" and f.case in (case, None)]
    if not errors:
        return head + f"all {len(pts)} layer outputs within threshold"
    first = errors[0]
    where = ", ".join(x for x in (f"layer {first.layer}" if first.layer is not None else "", first.module or "") if x)
    return head + (f"no layer output over threshold, yet {len(errors)} error finding(s) for this case "
                   f"(first: {where + ': ' if where else ''}{first.cause}; see Findings)")


def _quantization(report: Report, add_fig) -> dict[str, Any] | None:
    """The quantization section (`report.quantization`): smoothing check, cost of weight quantization and of the
    KV cache, each a table and a chart per layer and position class (per case)."""
    q = report.quantization or {}
    if not q:
        return None
    out: dict[str, Any] = {"original": q.get("original"), "smoothing_kept": q.get("smoothing_kept"),
                           "smoothing": None, "cost": None, "kv_cache": None}
    if q.get("smoothing"):
        out["smoothing"] = _generic_table(
            [{**{k: v for k, v in r.items() if k not in ("module", "status")}, "status": r["status"],
              "ok": r["status"] != "not compensated"} for r in q["smoothing"]], first=("layer", "tensor", "status"))
    charts_out = []
    for key, series in (("cost", (("smoothing", "smoothing alone"), ("quantized", "quantized"),
                                  ("budget", "round-to-nearest budget"))),
                        ("kv_cache", (("drift", "KV cache"), ("budget", "budget")))):
        section = q.get(key)
        if not section:
            continue
        out[key] = _generic_table([{**r, "ok": not r.get("over_budget")} for r in section.get("rows", [])],
                                  first=("case", "layer", "class"))
        for i, case in enumerate(dict.fromkeys(r["case"] for r in section.get("rows", []))):
            fid = add_fig(charts.quant_cost_figure(section["rows"], series, case), f"fig-quant-{key}-{i}")
            if fid:
                charts_out.append({"key": key, "case": case, "fig": fid})
    out["charts"] = charts_out
    return out


def build_context(report: Report, *, inline_plotlyjs: bool = True) -> dict[str, Any]:
    div = report.first_divergence
    figures: list[dict[str, Any]] = []

    def add_fig(fig: dict | None, fid: str) -> str | None:
        if fig is None:
            return None
        figures.append({"id": fid, "json": _script_json(fig)})
        return fid

    case_names = [c.name for c in report.cases]
    for p in report.points:  # points of cases without a CaseSummary still get their charts
        if p.case not in case_names:
            case_names.append(p.case)
    by_name = {c.name: c for c in report.cases}
    cases = []
    for ci, name in enumerate(case_names):
        c = by_name.get(name)
        mask_note, chips, mismatch_all = [], [], set()
        if c is not None:
            _rows, _canon, mismatch = charts.mask_rows(c)
            for label, rows in mismatch.items():
                mask_note.append(f"{label} differs from the canonical mask at {len(rows)} row(s): {_spans(rows)}")
                mismatch_all.update(rows)
            chips = _input_chips(c, mismatch_all)
        cases.append({
            "name": name,
            "anchor": f"case-{ci}",
            "summary": c,
            "n_image_rows": sum(e - b for b, e in c.image_spans) if c else 0,
            "spans": ", ".join(f"[{b}, {e})" for b, e in c.image_spans) if c else "",
            "bos": _spans(c.bos_rows) if c and c.bos_rows else "none",
            "hashes": _kv(c.hashes) if c else [],
            "chips": chips,
            "mask_note": mask_note,
            "masks_recorded": bool(c and c.masks),
            "mask_fig": add_fig(charts.mask_figure(c), f"fig-mask-{ci}") if c else None,
            "curves_fig": add_fig(charts.curves_figure(report.points, name, div), f"fig-curves-{ci}"),
            "heat_fig": add_fig(charts.heatmap_figure(report.points, c, name, div), f"fig-heat-{ci}"),
            "worst": _worst(report, name),
            "is_div_case": div is not None and (div.case == name or (div.case is None and ci == 0)),
        })

    from parity.report import decode_view

    decode = [{
        "section": sec, "anchor": f"decode-{di}", "tokens": decode_view.token_rows(sec),
        "steps_fig": add_fig(decode_view.steps_figure(sec), f"fig-decode-steps-{di}"),
        "heat_fig": add_fig(decode_view.heatmap_figure(sec), f"fig-decode-heat-{di}"),
        "engine": _kv(sec.engine),
    } for di, sec in enumerate(report.decode)]
    quant = _quantization(report, add_fig)
    findings = _finding_rows(report)
    modules = _module_rows(report)
    engine_items, sem_items = _engine_items(report.engine)
    weights = _generic_table(report.weights_audit,
                             first=("file", "hf_tensor", "status", "shape", "max_abs_diff", "tensor"))
    w_bad = {**weights, "rows": [r for r in weights["rows"] if r["bad"]]}
    w_ok = [r for r in weights["rows"] if not r["bad"]]
    n_err = sum(1 for f in report.findings if f.severity == "error")
    n_warn = sum(1 for f in report.findings if f.severity == "warning")
    n_info = sum(1 for f in report.findings if f.severity == "info")
    return {
        "title": f"parity {status_word(report.status)} — {report.model}",
        "status": str(report.status).lower(),
        "status_word": status_word(report.status),
        "sentence": divergence_sentence(report),
        "parts": dict(zip(("where", "cause", "message"), divergence_parts(report))),
        "has_divergence": div is not None or n_err > 0,
        "first_case_anchor": next((c["anchor"] for c in cases if c["is_div_case"]), None),
        "counts": {"errors": n_err, "roots": sum(1 for f in findings if f["severity"] == "error"), "warnings": n_warn,
                   "infos": n_info, "points": len(report.points),
                   "exceeded": sum(1 for p in report.points if p.exceeded), "cases": len(case_names)},
        "model": report.model,
        "workspace": report.workspace,
        "parity_version": report.parity_version,
        "engine_items": engine_items,
        "semantics_items": sem_items,
        "thresholds": _kv(report.thresholds),
        "timings": [(k, fmt_num(v) + " s" if to_float(v) is not None else fmt_value(v))
                    for k, v in (report.timings or {}).items()],
        "findings": findings,
        "many_cases": len(case_names) > 1,
        "cases": cases,
        "decode": decode,
        "modules": modules,
        "first_in_modules": any(r["first"] for r in modules),
        "plora": _generic_table(report.plora_table, first=("case", "layer", "linear")),
        "config": _generic_table(report.config_audit, first=("field", "hf", "engine", "ok", "note")),
        "weights_bad": w_bad,
        "weights_ok": w_ok[:MAX_AUDIT_OK_ROWS],
        "weights_ok_count": len(w_ok),
        "weights_columns": weights["columns"],
        "quant": quant,
        "figures": figures,
        "plotlyjs": plotly_bundle()[1] if inline_plotlyjs else None,
    }


def render_html(report: Report, *, inline_plotlyjs: bool = True) -> str:
    """The report page as a string. `inline_plotlyjs=False` leaves plotly.js out (tests only: charts
    then do not draw)."""
    return _env().get_template("report.html.j2").render(**build_context(report, inline_plotlyjs=inline_plotlyjs))


def write_html(report: Report, path: str | os.PathLike) -> Path:
    """Write report.html atomically; returns the path. Raises ParityInputError when the folder is unwritable."""
    return atomic_write_text(path, render_html(report))
