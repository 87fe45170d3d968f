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
from ..records import EngineRun, PointResult, PreparedInput
from ..trace import Trace
from .rowstats import RowStats, row_stats_multi
from .stream import FloorOnDemand, StatsTrace
from .thresholds import Thresholds

# Points whose per-row error the report draws as a heatmap.
ROW_ERROR_POINTS = {"layer", "embeddings", "norm"}


@dataclass
class CaseTraces:
    """Everything captured for one case. `floor_*` are the reference at the other precision: `floor_local`
    as per-row statistics against the reference (`StatsTrace`, or a `FloorOnDemand` of one) or as values
    (the live path passes the end-to-end floor there), `floor_e2e` as values, only where something reads it
    (the live path)."""

    prepared: PreparedInput
    reference: Trace
    floor_e2e: Trace | None
    floor_local: Trace | StatsTrace | FloorOnDemand | None
    engine: Trace | StatsTrace  # the end-to-end run: values, or its statistics against the reference
    engine_local: Trace
    run: EngineRun | None = None  # what the engine reported about this case (ranges, masks, settings)
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


def class_metrics(st: RowStats, classes: dict[str, torch.Tensor]) -> dict[str, Any]:
    """A pair's metrics (`compare`) with `by_class`: the same restricted to each row class."""
    m = st.metrics()
    m["by_class"] = st.by_class(classes)
    return m


def exceeds(value: float, threshold: float) -> bool:
    """An error beyond its threshold; a non-finite error always is."""
    return not math.isfinite(value) or value > threshold


def floor_stats(floor: Trace | StatsTrace | FloorOnDemand | None, layer: int | None, point: str,
                ref: torch.Tensor) -> RowStats | None:
    """The floor's row statistics against `ref` at one point, from statistics or from values (a
    `FloorOnDemand` is measured here if it has not been)."""
    if floor is None:
        return None
    if isinstance(floor, FloorOnDemand):
        floor = floor.resolve()
    if isinstance(floor, StatsTrace):
        st = floor.stats(layer, point)
        return st if st is not None and st.rows == (ref.shape[0] if ref.dim() else 1) else None
    value = floor.get(layer, point)
    return row_stats_multi(ref, [value])[0] if value is not None else None


def judge_value(value: float, floor: float, thresholds: Thresholds, numeric: str,
                unmeasured: bool = False) -> tuple[float, bool]:
    """(threshold, exceeded) of one error against its noise floor. Unmeasured floor: the threshold is the
    bound that decides whatever the floor is (max_rel for an error above it, else min_rel)."""
    threshold = thresholds.threshold(floor, numeric)
    exceeded = exceeds(value, threshold)
    if unmeasured:
        threshold = thresholds.bounds(numeric)[1 if exceeded else 0]
    return threshold, exceeded


def judge_classes(metrics: dict[str, Any], floor: dict[str, Any], thresholds: Thresholds, numeric: str,
                  unmeasured: bool = False) -> tuple[float, bool]:
    """(threshold, exceeded) of a value's metrics (`compare` plus `by_class`) against its floor's, overall and
    per row class, each class with its own floor (else the overall one); writes each class's floor, threshold
    and exceeded flag into `metrics["by_class"]`. An unmeasured floor (`unmeasured`): the threshold shown is the
    bound that decides whatever the floor is (an error above max_rel exceeds max_rel, one at or below min_rel
    is within min_rel), and the class floors are None."""

    def judge(value: float, fl: float) -> tuple[float, bool]:
        return judge_value(value, fl, thresholds, numeric, unmeasured)

    threshold, exceeded = judge(metrics["rel_l2"], floor["rel_l2"])
    for cls, cm in metrics["by_class"].items():
        cf = floor["by_class"].get(cls, {}).get("rel_l2", floor["rel_l2"])
        cm["floor"] = None if unmeasured else cf
        cm["threshold"], cm["exceeded"] = judge(cm["rel_l2"], cf)
        exceeded = exceeded or cm["exceeded"]
    return threshold, bool(exceeded)


def floor_needed(floor, values, thresholds: Thresholds, numeric: str) -> bool:
    """Whether `floor` must be read to judge `values` (errors): always for a floor already at hand; for a
    `FloorOnDemand` not yet measured, only when the floor can change a verdict on one of them."""
    if floor is None:
        return False
    if not isinstance(floor, FloorOnDemand) or floor.measured:
        return True
    return any(thresholds.floor_decides(v, numeric) for v in values)


def compare_case(ct: CaseTraces, thresholds: Thresholds, numeric: str) -> list[PointResult]:
    """Every point's metrics, then the judgement. The floor statistics are read only when a judgement needs
    them (`floor_needed`); unmeasured, a point's `floor` is None and its threshold the bound that decides
    (min_rel for an error at or below it, max_rel for one above): the verdict the measured floor gives."""
    classes = row_classes(ct.prepared)
    rows = int(ct.prepared.image_rows.numel())
    floor_values = isinstance(ct.floor_local, Trace)  # values (live path) rather than statistics
    measured: list[tuple[int | None, str, torch.Tensor, dict[str, RowStats | None], dict, dict]] = []
    e2e_stats = isinstance(ct.engine, StatsTrace)  # the end-to-end run compared as it ran (its statistics)
    for layer, point in execution_order(ct.reference.num_layers):
        ref = ct.reference.get(layer, point)
        if ref is None:
            continue
        # every value compared with the reference at this point, in one pass over the reference
        others: dict[str, torch.Tensor] = {}
        if e2e_stats:
            done = ct.engine.stats(layer, point)  # kept only where the shapes matched
            if done is None or ref.shape[0] != rows:
                continue
        else:
            eng = ct.engine.get(layer, point)
            if eng is None:
                continue
            eng = undo_layout(ct.engine, point, eng)
            if ref.shape != eng.shape or ref.shape[0] != rows:
                continue  # the input check reports row-count mismatches; nothing here is comparable
            others["e2e"] = eng
        if ct.engine_local is not ct.engine:
            loc = ct.engine_local.get(layer, point)
            if loc is not None:
                others["local"] = undo_layout(ct.engine_local, point, loc)
        if floor_values:
            fl = ct.floor_local.get(layer, point)
            if fl is not None:
                others["floor_local"] = fl
        if ct.floor_e2e is not None and ct.floor_e2e is not ct.floor_local:
            fe = ct.floor_e2e.get(layer, point)
            if fe is not None:
                others["floor_e2e"] = fe
        st: dict[str, RowStats | None] = dict(zip(others, row_stats_multi(ref, list(others.values()))))
        if e2e_stats:
            st["e2e"] = done
        e2e = class_metrics(st["e2e"], classes)
        local = class_metrics(st.get("local", st["e2e"]), classes)  # no teacher-forced value: local = e2e
        measured.append((layer, point, ref, st, e2e, local))
    judged = [v for *_, local in measured for v in (local["rel_l2"], *(c["rel_l2"] for c in local["by_class"].values()))]
    use_floor = not floor_values and floor_needed(ct.floor_local, judged, thresholds, numeric)
    results: list[PointResult] = []
    for layer, point, ref, st, e2e, local in measured:
        if use_floor:
            st["floor_local"] = floor_stats(ct.floor_local, layer, point, ref)
        if ct.floor_e2e is not None and ct.floor_e2e is ct.floor_local:
            st["floor_e2e"] = st.get("floor_local")
        fls = st.get("floor_local")
        unmeasured = fls is None and isinstance(ct.floor_local, FloorOnDemand) and not use_floor
        floor_local = class_metrics(fls, classes) if fls is not None else {"rel_l2": 0.0, "by_class": {}}
        threshold, exceeded = judge_classes(local, floor_local, thresholds, numeric, unmeasured)
        if ct.floor_e2e is not None:  # only the live path reads it
            fes = st.get("floor_e2e")
            local["floor_e2e"] = fes.metrics()["rel_l2"] if fes is not None else 0.0
        results.append(
            PointResult(
                case=ct.prepared.name,
                layer=layer,
                module=point,
                e2e=e2e,
                local=local,
                floor=None if unmeasured else floor_local["rel_l2"],
                threshold=threshold,
                row_err=st["e2e"].row_errors().tolist() if point in ROW_ERROR_POINTS else [],
                exceeded=bool(exceeded),
            )
        )
    return results


def exceeded_positions(p: PointResult) -> str:
    """Which position classes a point's local error exceeds in: image, text (incl. BOS) or all."""
    return positions_of((p.local or {}).get("by_class", {}))


def positions_of(by_class: dict[str, dict[str, Any]]) -> str:
    """Which position classes exceed (`judge_classes` flags): image, text (incl. BOS) or all."""
    bad = {c for c, m in by_class.items() if m.get("exceeded")}
    text = bool(bad & {"text", "bos"})
    image = "image" in bad
    if image and not text:
        return "image"
    if text and not image:
        return "text"
    return "all"
