"""Align reference and engine traces point by point and judge each point's local error against its floor.

For every canonical point of a case this yields a `PointResult`: end-to-end metrics (the engine's own
forward), local metrics (the engine fed the reference's inputs, i.e. where error is created), the noise
floor (the reference against itself at the engine's precision, measured the same local way), per position
class (image / text / bos), and whether the local error exceeds its threshold in any class.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch

from ..deploy.layout import tm_qkv_cols_to_hf
from ..points import execution_order
from ..records import PointResult, PreparedInput
from ..trace import Trace
from .metrics import by_class, compare, row_errors
from .thresholds import Thresholds

# Points whose per-row error the report draws as a heatmap.
ROW_ERROR_POINTS = {"layer", "embeddings", "norm"}


@dataclass
class CaseTraces:
    """Everything captured for one case. `floor_*` are the reference at the other precision."""

    prepared: PreparedInput
    reference: Trace
    floor_e2e: Trace
    floor_local: Trace
    engine: Trace
    engine_local: Trace
    engine_info: dict[str, Any] = field(default_factory=dict)
    # What the engine call asked for (rows via the reference's table, image mask from its ranges)
    engine_rows: torch.Tensor | None = None
    engine_mask: torch.Tensor | None = None


def row_classes(p: PreparedInput) -> dict[str, torch.Tensor]:
    image = p.image_rows.bool()
    bos = p.bos_rows.bool()
    return {"image": image, "text": ~image & ~bos, "bos": bos}


def undo_layout(trace: Trace, point: str, value: torch.Tensor) -> torch.Tensor:
    """Bring an engine value into the reference's layout (the engine says which layout it used)."""
    tag = trace.meta.layouts.get(point)
    if tag is None:
        return value
    if tag == "tm_qkv":
        x = trace.meta.extras
        return tm_qkv_cols_to_hf(value, x["head_num"], x["kv_head_num"], x["size_per_head"])
    raise ValueError(f"unknown layout {tag!r} for point {point}")


def _metrics(ref: torch.Tensor, eng: torch.Tensor, classes: dict[str, torch.Tensor]) -> dict[str, Any]:
    m = compare(ref, eng)
    m["by_class"] = by_class(ref, eng, classes)
    return m


def _bad(x: float) -> bool:
    return not math.isfinite(x)


def compare_case(ct: CaseTraces, thresholds: Thresholds, numeric: str) -> list[PointResult]:
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
            continue  # the input check reports row-count mismatches; nothing here is comparable
        loc = ct.engine_local.get(layer, point)
        loc = undo_layout(ct.engine_local, point, loc) if loc is not None else eng
        fl = ct.floor_local.get(layer, point)
        fe = ct.floor_e2e.get(layer, point)
        e2e = _metrics(ref, eng, classes)
        local = _metrics(ref, loc, classes)
        floor_local = _metrics(ref, fl, classes) if fl is not None else {"rel_l2": 0.0, "by_class": {}}
        floor_e2e = compare(ref, fe)["rel_l2"] if fe is not None else 0.0
        threshold = thresholds.threshold(floor_local["rel_l2"], numeric)
        exceeded = _bad(local["rel_l2"]) or local["rel_l2"] > threshold
        for cls, cm in local["by_class"].items():
            cf = floor_local["by_class"].get(cls, {}).get("rel_l2", floor_local["rel_l2"])
            cm["floor"] = cf
            cm["threshold"] = thresholds.threshold(cf, numeric)
            cm["exceeded"] = _bad(cm["rel_l2"]) or cm["rel_l2"] > cm["threshold"]
            exceeded = exceeded or cm["exceeded"]
        local["floor_e2e"] = floor_e2e
        results.append(
            PointResult(
                case=ct.prepared.name,
                layer=layer,
                module=point,
                e2e=e2e,
                local=local,
                floor=floor_local["rel_l2"],
                threshold=threshold,
                row_err=row_errors(ref, eng).tolist() if point in ROW_ERROR_POINTS else [],
                exceeded=bool(exceeded),
            )
        )
    return results


def exceeded_positions(p: PointResult) -> str:
    """Which position classes a point's local error exceeds in: image, text (incl. BOS) or all."""
    by = (p.local or {}).get("by_class", {})
    bad = {c for c, m in by.items() if m.get("exceeded")}
    text = bool(bad & {"text", "bos"})
    image = "image" in bad
    if image and not text:
        return "image"
    if text and not image:
        return "text"
    return "all"
