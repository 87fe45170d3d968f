"""Proposal: one pass over each (reference, other) pair per point, from which every metric is derived.

`parity.compare.align.compare_case` calls, per canonical point, `compare` + `by_class` for e2e, local and
the local floor, `compare` for the e2e floor and `row_errors` for some points. Each `compare` upcasts both
tensors to float64 and makes ~15 full passes (isfinite x3, where x2, sub, three norms, two normalised
copies and their product, abs, argmax, mean); `by_class` repeats all of it on boolean-indexed copies of
the rows of each class (the image class is ~94 % of a 1,300-row prompt, so almost the whole tensor again).
Per point that is ~100 passes over float64 data.

`row_stats` reads both tensors once, in row chunks (bounded temporaries even for [1300, 92544] logits), and
keeps per-row sums: |r|^2, |e|^2, |d|^2, r.e, sum|d|, max|d| and its column, non-finite counts, one-sided
non-finite flags. Global metrics, metrics per row class and per-row errors are sums over rows of those.
Results equal `parity.compare.metrics` up to float64 summation order (relative 1e-12; the benchmark checks
every PointResult), with the same conventions (non-finite handling, first argmax, cosine clamp).

How to adopt: replace the bodies of `compare`/`by_class`/`row_errors` callers in
`parity/compare/align.py::compare_case` with `point_metrics` below (the output dicts are the same), or move
`row_stats`/`from_stats` into `parity/compare/metrics.py` and express `compare`, `by_class`, `row_errors`
through them.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from parity.compare.align import ROW_ERROR_POINTS, CaseTraces, _bad, row_classes, undo_layout
from parity.points import execution_order
from parity.records import PointResult

EPS = 1e-30
CHUNK_ELEMS = 1 << 22  # ~32 MB of float64 per temporary


def row_stats(ref: torch.Tensor, eng: torch.Tensor) -> dict[str, torch.Tensor]:
    r_all = ref.detach().reshape(ref.shape[0] if ref.dim() > 0 else 1, -1)
    e_all = eng.detach().reshape(r_all.shape)
    n, cols = r_all.shape
    step = max(1, CHUNK_ELEMS // max(cols, 1))
    keys = ("sr2", "se2", "sd2", "sre", "sad", "maxad")
    out = {k: torch.empty(n, dtype=torch.float64) for k in keys}
    out["argmax"] = torch.empty(n, dtype=torch.long)
    out["nf_r"] = torch.empty(n, dtype=torch.long)
    out["nf_e"] = torch.empty(n, dtype=torch.long)
    out["mismatch"] = torch.empty(n, dtype=torch.bool)
    for s in range(0, n, step):
        r = r_all[s:s + step].to(torch.float64)
        e = e_all[s:s + step].to(torch.float64)
        fr, fe = torch.isfinite(r), torch.isfinite(e)
        out["nf_r"][s:s + step] = (~fr).sum(1)
        out["nf_e"][s:s + step] = (~fe).sum(1)
        out["mismatch"][s:s + step] = (fr != fe).any(1)
        fin = fr & fe
        if not bool(fin.all()):
            r = torch.where(fin, r, 0.0)
            e = torch.where(fin, e, 0.0)
        out["sr2"][s:s + step] = (r * r).sum(1)
        out["se2"][s:s + step] = (e * e).sum(1)
        out["sre"][s:s + step] = (r * e).sum(1)
        d = e - r
        out["sd2"][s:s + step] = (d * d).sum(1)
        d.abs_()
        out["sad"][s:s + step] = d.sum(1)
        if cols:
            m, idx = d.max(1)
            out["maxad"][s:s + step] = m
            out["argmax"][s:s + step] = idx
        else:
            out["maxad"][s:s + step] = 0.0
            out["argmax"][s:s + step] = 0
    out["cols"] = torch.tensor(cols)
    return out


def from_stats(st: dict[str, torch.Tensor], rows: torch.Tensor | None = None) -> dict[str, Any]:
    """`parity.compare.metrics.compare`'s dict for the selected rows (all rows when None)."""
    sel = (lambda t: t) if rows is None else (lambda t: t[rows])
    cols = int(st["cols"])
    ref_norm = math.sqrt(float(sel(st["sr2"]).sum()))
    eng_norm = math.sqrt(float(sel(st["se2"]).sum()))
    diff_norm = math.sqrt(float(sel(st["sd2"]).sum()))
    rel = 0.0 if diff_norm == 0.0 else (diff_norm / ref_norm if ref_norm > 0.0 else math.inf)
    if ref_norm == 0.0 and eng_norm == 0.0:
        cos = 1.0
    elif ref_norm == 0.0 or eng_norm == 0.0:
        cos = 0.0
    else:
        cos = max(-1.0, min(1.0, float(sel(st["sre"]).sum()) / ref_norm / eng_norm))
    maxad = sel(st["maxad"])
    if maxad.numel() and cols:
        k = int(torch.argmax(maxad))
        row, col, max_abs = k, int(sel(st["argmax"])[k]), float(maxad[k])
        mean_abs = float(sel(st["sad"]).sum()) / (maxad.numel() * cols)
    else:
        row = col = 0
        max_abs = mean_abs = 0.0
    nf_r, nf_e = int(sel(st["nf_r"]).sum()), int(sel(st["nf_e"]).sum())
    out = {"cosine": cos, "rel_l2": rel, "max_abs": max_abs, "max_abs_row": row, "max_abs_col": col,
           "mean_abs": mean_abs, "ref_norm": ref_norm, "nonfinite_ref": nf_r, "nonfinite_eng": nf_e}
    if (nf_r or nf_e) and bool(sel(st["mismatch"]).any()):
        out["rel_l2"] = math.inf
        out["cosine"] = math.nan
    return out


def by_class_from_stats(st, classes: dict[str, torch.Tensor]) -> dict[str, dict[str, Any]]:
    out = {}
    for name, rows in classes.items():
        if rows.numel() == 0 or not bool(rows.any()):
            continue
        m = from_stats(st, rows)
        out[name] = {k: m[k] for k in ("rel_l2", "max_abs", "cosine", "nonfinite_ref", "nonfinite_eng")}
        out[name]["rows"] = int(rows.sum())
    return out


def row_errors_from_stats(st) -> torch.Tensor:
    num = st["sd2"].sqrt()
    den = st["sr2"].sqrt()
    scale = torch.clamp(den, min=float(den.mean()) * 1e-3 + EPS)
    err = num / scale
    return torch.where(st["mismatch"], torch.full_like(err, math.inf), err)


def point_metrics(ref, other, classes) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    st = row_stats(ref, other)
    m = from_stats(st)
    m["by_class"] = by_class_from_stats(st, classes)
    return m, st


def fast_compare_case(ct: CaseTraces, thresholds, numeric: str) -> list[PointResult]:
    """`compare_case` with one pass per pair (same PointResults up to float64 summation order)."""
    classes = row_classes(ct.prepared)
    rows = int(ct.prepared.image_rows.numel())
    results: list[PointResult] = []
    for layer, point in execution_order(ct.reference.num_layers):
        ref = ct.reference.get(layer, point)
        eng = ct.engine.get(layer, point)
        if ref is None or eng is None:
            continue
        eng = undo_layout(ct.engine, point, eng)
        if ref.shape != eng.shape or ref.shape[0] != rows:
            continue
        loc = ct.engine_local.get(layer, point)
        loc = undo_layout(ct.engine_local, point, loc) if loc is not None else None
        fl = ct.floor_local.get(layer, point)
        fe = ct.floor_e2e.get(layer, point)
        e2e, st_e2e = point_metrics(ref, eng, classes)
        local = point_metrics(ref, loc, classes)[0] if loc is not None else {**e2e, "by_class": {
            k: dict(v) for k, v in e2e["by_class"].items()}}
        floor_local = point_metrics(ref, fl, classes)[0] if fl is not None else {"rel_l2": 0.0, "by_class": {}}
        floor_e2e = from_stats(row_stats(ref, fe))["rel_l2"] if fe is not None else 0.0
        threshold = thresholds.threshold(floor_local["rel_l2"], numeric)
        exceeded = _bad(local["rel_l2"]) or local["rel_l2"] > threshold
        for cls, cm in local["by_class"].items():
            cf = floor_local["by_class"].get(cls, {}).get("rel_l2", floor_local["rel_l2"])
            cm["floor"] = cf
            cm["threshold"] = thresholds.threshold(cf, numeric)
            cm["exceeded"] = _bad(cm["rel_l2"]) or cm["rel_l2"] > cm["threshold"]
            exceeded = exceeded or cm["exceeded"]
        local["floor_e2e"] = floor_e2e
        results.append(PointResult(
            case=ct.prepared.name, layer=layer, module=point, e2e=e2e, local=local, floor=floor_local["rel_l2"],
            threshold=threshold,
            row_err=row_errors_from_stats(st_e2e).tolist() if point in ROW_ERROR_POINTS else [],
            exceeded=bool(exceeded)))
    return results


def max_disagreement(a: list[PointResult], b: list[PointResult]) -> dict[str, Any]:
    """How far two compare_case outputs are apart: worst relative difference of any float metric, and
    whether the verdict-relevant fields (points, exceeded flags) are identical."""
    worst = 0.0
    same_points = [(p.layer, p.module) for p in a] == [(p.layer, p.module) for p in b]
    same_exceeded = [p.exceeded for p in a] == [p.exceeded for p in b]

    def walk(x, y):
        nonlocal worst
        if isinstance(x, dict):
            for k in x:
                if k in y:
                    walk(x[k], y[k])
        elif isinstance(x, list):
            for u, v in zip(x, y):
                walk(u, v)
        elif isinstance(x, float) and isinstance(y, float):
            if math.isfinite(x) and math.isfinite(y):
                worst = max(worst, abs(x - y) / max(abs(x), abs(y), 1e-300))
            elif not (math.isnan(x) and math.isnan(y)) and x != y:
                worst = math.inf

    for p, q in zip(a, b):
        walk(p.e2e, q.e2e)
        walk(p.local, q.local)
        walk([p.floor, p.threshold], [q.floor, q.threshold])
        walk(p.row_err, q.row_err)
    return {"same_points": same_points, "same_exceeded": same_exceeded, "max_rel_diff": worst}
