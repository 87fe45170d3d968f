"""The HTML report's decode section (`--decode N`): both sides' tokens aligned step by step (the first divergent
one marked, each side's top-k on hover), a per-step error chart and the step x layer heatmap of the
teacher-forced errors relative to their thresholds."""

from __future__ import annotations

import math
from typing import Any

import plotly.graph_objects as go

from parity.records import DecodeSection
from parity.report.charts import COLORS, base_layout, fig_dict


def _f(x: Any) -> str:
    try:
        v = float(x)
    except (TypeError, ValueError):
        return str(x)
    return f"{v:.3g}" if math.isfinite(v) else str(v)


def _topk(side: dict[str, Any]) -> str:
    return "; ".join(f"{t['text']!r} {_f(t['logprob'])}" for t in side.get("topk", []))


def token_rows(sec: DecodeSection) -> list[dict[str, Any]]:
    """One entry per step: both tokens, whether they match, whether it is the first divergence, hover text."""
    rows = []
    for t in sec.tokens:
        k = t["step"]
        title = (f"step {k}: reference {t['ref']['text']!r} (logprob {_f(t['ref']['logprob'])}), engine "
                 f"{t['eng']['text']!r} (logprob {_f(t['eng']['logprob'])})\n"
                 f"reference top-k: {_topk(t['ref'])}\nengine top-k: {_topk(t['eng'])}")
        rows.append({"step": k, "ref": t["ref"]["text"], "eng": t["eng"]["text"], "match": t["match"],
                     "first": k == sec.first_divergent_step,
                     "after": sec.first_divergent_step is not None and k > sec.first_divergent_step,
                     "tie": bool(t.get("near_tie")), "title": title})
    return rows


def _ratio(p: dict[str, Any]) -> float | None:
    th, loc = float(p["threshold"]), float(p["local"])
    if not math.isfinite(loc):
        return None
    return loc / th if th > 0 else None


def steps_figure(sec: DecodeSection) -> dict | None:
    """Per step: the worst teacher-forced error / threshold over every layer and module, and the end-to-end
    error of the logits (the engine's own state drifting with the reference's tokens)."""
    worst: dict[int, float] = {}
    e2e: dict[int, float] = {}
    for p in sec.points:
        if p["module"].endswith(":delta"):
            continue
        r = _ratio(p)
        if r is not None:
            worst[p["step"]] = max(worst.get(p["step"], 0.0), r)
        if p["layer"] is None and p["module"] == "output" and math.isfinite(float(p["e2e"])):
            e2e[p["step"]] = float(p["e2e"])
    if not worst:
        return None
    steps = sorted(worst)
    fig = go.Figure()
    fig.add_trace(go.Scatter(x=steps, y=[max(worst[s], 1e-12) for s in steps], mode="lines+markers",
                             name="worst local / threshold", line=dict(color=COLORS["local"])))
    if e2e:
        es = sorted(e2e)
        fig.add_trace(go.Scatter(x=es, y=[max(e2e[s], 1e-12) for s in es], mode="lines+markers",
                                 name="logits end-to-end rel. error", line=dict(color=COLORS["e2e"])))
    fig.add_hline(y=1.0, line=dict(color=COLORS["threshold"], dash="dash"))
    if sec.first_divergent_step is not None:
        fig.add_vline(x=sec.first_divergent_step, line=dict(color=COLORS["diverge"], dash="dot"))
    fig.update_layout(**base_layout(300, xaxis=dict(title="decode step"),
                                     yaxis=dict(title="ratio / rel. error", type="log"),
                                     legend=dict(orientation="h", y=1.12)))
    return fig_dict(fig)


def heatmap_figure(sec: DecodeSection) -> dict | None:
    """Step x layer: log10 of the worst teacher-forced error / threshold among the layer's modules."""
    cells: dict[tuple[int, int], tuple[float, str]] = {}
    for p in sec.points:
        if p["layer"] is None or p["module"].endswith(":delta"):
            continue
        r = _ratio(p)
        v = 1e6 if r is None else r
        key = (p["layer"], p["step"])
        if key not in cells or v > cells[key][0]:
            cells[key] = (v, p["module"])
    if not cells:
        return None
    layers = sorted({k[0] for k in cells})
    steps = sorted({k[1] for k in cells})
    z = [[math.log10(max(cells[(l, s)][0], 1e-12)) if (l, s) in cells else None for s in steps] for l in layers]
    text = [[f"step {s}, layer {l}: {cells[(l, s)][1]} at {_f(cells[(l, s)][0])} x threshold" if (l, s) in cells
             else "" for s in steps] for l in layers]
    fig = go.Figure(go.Heatmap(z=z, x=steps, y=layers, text=text, hoverinfo="text", colorscale="RdYlBu",
                               reversescale=True, zmid=0, colorbar=dict(title="log10 ratio")))
    fig.update_layout(**base_layout(260, xaxis=dict(title="decode step"), yaxis=dict(title="layer")))
    return fig_dict(fig)
