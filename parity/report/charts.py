"""Plotly figures of the HTML report (built with plotly.graph_objects, embedded as figure JSON).

Each builder returns a plain figure dict (`{"data": [...], "layout": {...}}`) ready for
`Plotly.newPlot(div, fig.data, fig.layout, config)`, or None when there is nothing to draw.
Non-finite values are drawn as gaps (the heatmap paints them black as a separate layer).
"""

from __future__ import annotations

import html
import math
from typing import Any, Sequence

import plotly.graph_objects as go

from parity.records import CaseSummary, Divergence, PointResult
from parity.report._common import to_float

COLORS = {
    "e2e": "#2563eb",
    "local": "#ea580c",
    "floor": "#6b7280",
    "threshold": "#dc2626",
    "image": "#7c3aed",
    "diverge": "#dc2626",
}
FONT = "system-ui, -apple-system, 'Segoe UI', Roboto, 'Helvetica Neue', Arial, sans-serif"


def base_layout(height: int, **kw: Any) -> dict[str, Any]:
    layout: dict[str, Any] = dict(
        # "none": no plotly.py template (a template is ~10 kB per figure and slow to validate); the look of
        # plotly_white is set by hand below.
        template="none",
        height=height,
        paper_bgcolor="#ffffff",
        plot_bgcolor="#ffffff",
        margin=dict(l=70, r=20, t=36, b=40),
        font=dict(family=FONT, size=12, color="#1f2937"),
        hoverlabel=dict(font=dict(family=FONT, size=12)),
    )
    layout.update(kw)
    for ax in ("xaxis", "yaxis"):
        a = layout.setdefault(ax, {})
        a.setdefault("gridcolor", "#ebf0f8")
        a.setdefault("linecolor", "#c8d0dc")
        a.setdefault("zerolinecolor", "#ebf0f8")
        a.setdefault("automargin", True)
        a.setdefault("ticks", "")
    return layout


def fig_dict(fig: go.Figure) -> dict[str, Any]:
    d = fig.to_plotly_json()
    return {"data": d.get("data", []), "layout": d.get("layout", {})}


def _finite_or_none(x: Any) -> float | None:
    v = to_float(x)
    return v if v is not None and math.isfinite(v) else None


def _round3(v: float) -> float:
    """3 significant digits: what the hover shows, a third of the JSON."""
    return float(f"{v:.3g}")


def _label(labels: Sequence[str], row: int) -> str:
    # Plotly renders hover text through its own pseudo-HTML: escape so that "<s>" shows as text.
    text = labels[row] if 0 <= row < len(labels) else ""
    return html.escape(str(text), quote=False)


def layer_points(points: Sequence[PointResult], case: str, module: str = "layer") -> list[PointResult]:
    """The case's points of one module that belong to a decoder layer, by layer (last one wins)."""
    by_layer: dict[int, PointResult] = {}
    for p in points:
        if p.case == case and p.module == module and p.layer is not None:
            by_layer[int(p.layer)] = p
    return [by_layer[k] for k in sorted(by_layer)]


def worst_points(points: Sequence[PointResult], case: str) -> dict[int, PointResult]:
    """Per layer, the module whose local error is largest relative to its threshold.

    The layer output's own local error is zero by construction (teacher forcing feeds it the reference's
    sums), so the local curve must show where inside the layer error was created."""
    worst: dict[int, tuple[float, PointResult]] = {}
    for p in points:
        if p.case != case or p.layer is None or not p.local:
            continue
        r, t = p.local.get("rel_l2"), p.threshold
        if not isinstance(r, (int, float)) or not math.isfinite(r):
            ratio = math.inf
        elif not isinstance(t, (int, float)) or not math.isfinite(t) or t <= 0:
            ratio = 0.0
        else:
            ratio = r / t
        if int(p.layer) not in worst or ratio > worst[int(p.layer)][0]:
            worst[int(p.layer)] = (ratio, p)
    return {k: v[1] for k, v in worst.items()}


def _metric(d: dict[str, Any] | None, key: str) -> float | None:
    if not d:
        return None
    return _finite_or_none(d.get(key))


# ---------------------------------------------------------------- per-layer error curves


def curves_figure(points: Sequence[PointResult], case: str, divergence: Divergence | None) -> dict | None:
    """Per layer: end-to-end rel_l2 of the layer output, and for the layer's worst module its local
    (teacher-forced) rel_l2, noise floor and threshold."""
    pts = layer_points(points, case)
    if not pts:
        return None
    xs = [p.layer for p in pts]
    worst = worst_points(points, case)
    w = [worst.get(int(p.layer), p) for p in pts]
    fig = go.Figure()
    series = [
        ("end-to-end rel_l2 (layer output)", [_metric(p.e2e, "rel_l2") for p in pts], COLORS["e2e"], "solid",
         "lines+markers"),
        ("local rel_l2, worst module (teacher-forced)", [_metric(p.local, "rel_l2") for p in w], COLORS["local"],
         "solid", "lines+markers"),
        ("noise floor (that module)", [_finite_or_none(p.floor) for p in w], COLORS["floor"], "dot", "lines"),
        ("threshold (that module)", [_finite_or_none(p.threshold) for p in w], COLORS["threshold"], "dash", "lines"),
    ]
    for name, ys, color, dash, mode in series:
        if all(y is None for y in ys):
            continue
        fig.add_trace(go.Scatter(
            x=xs, y=ys, name=name, mode=mode, connectgaps=False,
            line=dict(color=color, dash=dash, width=2 if mode != "lines" else 1.5),
            marker=dict(size=6),
            customdata=[q.module for q in w],
            hovertemplate=f"{name}<br>layer %{{x}}: %{{y:.3g}} (%{{customdata}})<extra></extra>",
        ))
    # Layers whose check failed: red crosses on the local curve (or e2e when there is no local run).
    bad = [p for p in w if p.exceeded]
    if bad:
        ys = [_metric(p.local, "rel_l2") or _metric(p.e2e, "rel_l2") for p in bad]
        fig.add_trace(go.Scatter(
            x=[p.layer for p in bad], y=ys, name="exceeded", mode="markers",
            marker=dict(symbol="x", size=11, color=COLORS["diverge"], line=dict(width=1)),
            hovertemplate="threshold exceeded at layer %{x}<extra></extra>",
        ))
    # Non-finite layers: a marker at the top, since the value itself cannot be drawn.
    nonfin = [p for p in pts if _nonfinite(p)]
    if nonfin:
        fig.add_trace(go.Scatter(
            x=[p.layer for p in nonfin], y=[1.0] * len(nonfin), yaxis="y", name="non-finite", mode="markers",
            marker=dict(symbol="triangle-down", size=11, color="#111827"),
            hovertemplate="non-finite error at layer %{x}<extra></extra>",
        ))
    shapes, annotations = [], []
    if divergence is not None and divergence.layer is not None and (divergence.case in (None, case)):
        shapes.append(dict(type="line", xref="x", yref="paper", x0=divergence.layer, x1=divergence.layer,
                           y0=0, y1=1, line=dict(color=COLORS["diverge"], width=1.5, dash="dash")))
        annotations.append(dict(xref="x", yref="paper", x=divergence.layer, y=1, yanchor="bottom", xanchor="left",
                                text=f"first divergence (layer {divergence.layer})", showarrow=False,
                                font=dict(color=COLORS["diverge"], size=11)))
    positive = [y for tr in fig.data for y in (tr.y or ()) if y is not None and y > 0]
    decades = math.log10(max(positive) / min(positive)) if positive else 0.0
    fig.update_layout(**base_layout(
        360,
        xaxis=dict(title=dict(text="layer", standoff=4), dtick=1 if len(xs) <= 16 else None, zeroline=False,
                   range=[min(xs) - 0.5, max(xs) + 0.5]),
        # one label per decade once the curves span 2+ decades (no 2 / 5 minor labels cluttering the axis)
        yaxis=dict(title="relative L2 error", type="log", exponentformat="power", dtick=1 if decades >= 2 else None),
        legend=dict(orientation="h", yanchor="top", y=-0.2, x=0, font=dict(size=11)),
        margin=dict(l=70, r=20, t=24, b=40),
        shapes=shapes, annotations=annotations,
    ))
    return fig_dict(fig)


def _nonfinite(p: PointResult) -> bool:
    for d in (p.e2e, p.local):
        if not d:
            continue
        v = to_float(d.get("rel_l2"))
        if v is not None and not math.isfinite(v):
            return True
        if (to_float(d.get("nonfinite_eng")) or 0) > 0:
            return True
    return False


# ---------------------------------------------------------------- layer x position heatmap


def heatmap_figure(points: Sequence[PointResult], case: CaseSummary | None, case_name: str,
                   divergence: Divergence | None) -> dict | None:
    """Per-row error of the "layer" point: x = row, y = layer, colour = log10(error)."""
    pts = [p for p in layer_points(points, case_name) if p.row_err]
    if not pts:
        return None
    n_rows = max(len(p.row_err) for p in pts)
    labels = case.row_labels if case else []
    layers = [p.layer for p in pts]
    z: list[list[float | None]] = []
    raw: list[list[float | None]] = []
    bad: list[list[float | None]] = []
    any_bad = False
    for p in pts:
        zr, rr, br = [], [], []
        for i in range(n_rows):
            v = to_float(p.row_err[i]) if i < len(p.row_err) else None
            if v is None:
                zr.append(None), rr.append(None), br.append(None)
            elif not math.isfinite(v):
                zr.append(None), rr.append(None), br.append(1.0)
                any_bad = True
            else:
                zr.append(round(math.log10(v), 3) if v > 0 else None)
                rr.append(_round3(v))
                br.append(None)
        z.append(zr), raw.append(rr), bad.append(br)
    row_text = [_label(labels, i) for i in range(n_rows)]
    text = [row_text for _ in pts]
    fig = go.Figure()
    # The traces are built (and validated) by plotly with a 1x1 stand-in; the big arrays are put into the
    # figure dict afterwards — validating 32 x 2000 cells three times costs seconds and adds nothing.
    fig.add_trace(go.Heatmap(
        z=[[0.0]], x=[0], y=[0], customdata=[[0.0]], text=[[""]],
        colorscale="Viridis", hoverongaps=False,
        colorbar=dict(title=dict(text="log10 err", side="right"), thickness=12, len=0.9),
        hovertemplate="layer %{y}, row %{x} <b>%{text}</b><br>error %{customdata:.3g}<extra></extra>",
        name="row error",
    ))
    big = [dict(z=z, x=list(range(n_rows)), y=layers, customdata=raw, text=text)]
    if any_bad:
        fig.add_trace(go.Heatmap(
            z=[[1.0]], x=[0], y=[0], text=[[""]], showscale=False, hoverongaps=False,
            colorscale=[[0, "#000000"], [1, "#000000"]],
            hovertemplate="layer %{y}, row %{x} <b>%{text}</b><br>error non-finite<extra></extra>",
            name="non-finite",
        ))
        big.append(dict(z=bad, x=list(range(n_rows)), y=layers, text=text))
    shapes, annotations = [], []
    for k, (b, e) in enumerate(case.image_spans if case else []):
        shapes.append(dict(type="rect", xref="x", yref="paper", x0=b - 0.5, x1=e - 0.5, y0=0, y1=1,
                           line=dict(color=COLORS["image"], width=2), fillcolor="rgba(0,0,0,0)"))
        annotations.append(dict(xref="x", yref="paper", x=(b + e - 1) / 2, y=1, yanchor="bottom",
                                text=f"image {k} [{b}, {e})", showarrow=False,
                                font=dict(color=COLORS["image"], size=11)))
    if divergence is not None and divergence.layer is not None and divergence.case in (None, case_name) \
            and divergence.layer in layers:
        shapes.append(dict(type="rect", xref="paper", yref="y", x0=0, x1=1, y0=divergence.layer - 0.5,
                           y1=divergence.layer + 0.5, line=dict(color=COLORS["diverge"], width=2, dash="dot"),
                           fillcolor="rgba(0,0,0,0)"))
    height = max(220, min(560, 90 + 18 * len(layers)))
    fig.update_layout(**base_layout(
        height,
        xaxis=dict(title="row (token position)", zeroline=False, showgrid=False),
        yaxis=dict(title="layer", autorange="reversed", dtick=1 if len(layers) <= 32 else None,
                   zeroline=False, showgrid=False),
        margin=dict(l=60, r=20, t=40, b=40),
        shapes=shapes, annotations=annotations,
    ))
    out = fig_dict(fig)
    for trace, arrays in zip(out["data"], big):
        trace.update(arrays)
    return out


# ---------------------------------------------------------------- mask strip

_MASK_NAMES = (("hf", "HF im_mask"), ("engine", "engine mask"), ("eng", "engine mask"), ("tm", "engine mask"),
               ("turbomind", "engine mask"), ("canonical", "canonical"), ("expected", "canonical"))


def mask_label(key: str) -> str:
    low = key.lower()
    for k, name in _MASK_NAMES:
        if low == k or low.startswith(k + "_") or low.startswith(k):
            return name
    return key


def _canonical_mask(case: CaseSummary) -> list[int]:
    m = [0] * case.rows
    for b, e in case.image_spans:
        for i in range(max(0, b), min(case.rows, e)):
            m[i] = 1
    return m


def mask_rows(case: CaseSummary) -> tuple[list[tuple[str, list[int]]], list[int], dict[str, list[int]]]:
    """(rows of the strip as (label, mask), canonical mask, {label: mismatching row indices})."""
    masks = case.masks or {}
    canon_key = next((k for k in masks if mask_label(k) == "canonical"), None)
    canonical = [int(bool(v)) for v in masks[canon_key]] if canon_key else _canonical_mask(case)
    rows: list[tuple[str, list[int]]] = []
    mismatch: dict[str, list[int]] = {}
    for k, m in masks.items():
        if k == canon_key:
            continue
        vals = [int(bool(v)) for v in m]
        label = mask_label(k)
        rows.append((label, vals))
        n = max(len(vals), len(canonical))
        diff = [i for i in range(n) if (vals[i] if i < len(vals) else None) != (canonical[i] if i < len(canonical)
                                                                             else None)]
        if diff:
            mismatch[label] = diff
    rows.sort(key=lambda r: {"HF im_mask": 0, "engine mask": 1}.get(r[0], 2))
    rows.append(("canonical" if canon_key else "canonical (from spans)", canonical))
    return rows, canonical, mismatch


def mask_figure(case: CaseSummary) -> dict | None:
    """A strip chart: one row per mask (1 = image row), plus a red "mismatch" row under them."""
    rows, _canonical, mismatch = mask_rows(case)
    n = max([case.rows] + [len(m) for _, m in rows])
    if n == 0:
        return None
    labels = case.row_labels
    names = [r[0] for r in rows]
    z = [[(m[i] if i < len(m) else None) for i in range(n)] for _, m in rows]
    bad_rows = sorted({i for v in mismatch.values() for i in v})
    bad_set = set(bad_rows)
    names.append("mismatch")
    z.append([2 if i in bad_set else None for i in range(n)])
    text = [[_label(labels, i) for i in range(n)] for _ in names]
    hover_val = [[("image" if v == 1 else "text" if v == 0 else "MISMATCH" if v == 2 else "–") for v in row]
                 for row in z]
    fig = go.Figure(go.Heatmap(  # 1x1 stand-in, the arrays are set below (see heatmap_figure)
        z=[[0]], x=[0], y=[names[0]], text=[[""]], customdata=[[""]], zmin=0, zmax=2, showscale=False,
        colorscale=[[0.0, "#e5e7eb"], [0.33, "#e5e7eb"], [0.34, "#7c3aed"], [0.66, "#7c3aed"],
                    [0.67, "#dc2626"], [1.0, "#dc2626"]],
        xgap=1 if n <= 200 else 0, ygap=2, hoverongaps=False,
        hovertemplate="%{y}, row %{x} <b>%{text}</b>: %{customdata}<extra></extra>",
    ))
    fig.update_layout(**base_layout(
        60 + 26 * len(names),
        xaxis=dict(title=None, zeroline=False, showgrid=False),
        yaxis=dict(autorange="reversed", zeroline=False, showgrid=False, tickfont=dict(size=11)),
        margin=dict(l=150, r=20, t=10, b=26),
    ))
    out = fig_dict(fig)
    out["data"][0].update(z=z, x=list(range(n)), y=names, text=text, customdata=hover_val)
    return out


_CLASS_DASH = {"image": "solid", "text": "dash", "bos": "dot"}


def quant_cost_figure(rows: Sequence[dict[str, Any]], series: Sequence[tuple[str, str]], case: str) -> dict | None:
    """Quantization cost per layer: one line per (series, position class), log scale. `series` is
    [(row key, label)], e.g. [("smoothing", "smoothing alone"), ("quantized", ...), ("budget", ...)]."""
    rows = [r for r in rows if r.get("case") == case]
    if not rows:
        return None
    palette = ["#7c3aed", "#2563eb", "#6b7280", "#ea580c"]
    fig = go.Figure()
    for si, (key, label) in enumerate(series):
        for cls in ("image", "text", "bos"):
            pts = sorted((r["layer"], _finite_or_none(r.get(key))) for r in rows if r.get("class") == cls)
            if not pts or all(y is None for _, y in pts):
                continue
            fig.add_trace(go.Scatter(
                x=[x for x, _ in pts], y=[y for _, y in pts], name=f"{label}, {cls} rows", mode="lines+markers",
                line=dict(color=palette[si % len(palette)], dash=_CLASS_DASH[cls], width=2), marker=dict(size=6),
                hovertemplate=f"{label}, {cls} rows<br>layer %{{x}}: %{{y:.3g}}<extra></extra>",
            ))
    if not fig.data:
        return None
    fig.update_layout(**base_layout(
        340,
        xaxis=dict(title=dict(text="layer", standoff=4), dtick=1, zeroline=False),
        yaxis=dict(title="relative L2 vs unquantized", type="log", exponentformat="power"),
        legend=dict(orientation="h", yanchor="top", y=-0.2, x=0, font=dict(size=11)),
        margin=dict(l=70, r=20, t=24, b=40),
    ))
    return fig_dict(fig)
