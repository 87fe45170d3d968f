"""Hidden states: every point whose local (teacher-forced) error exceeds its threshold is a finding, with a
cause attributed from the other checks' findings (weights, config, LoRA, mask, inputs) by the verdict's cause
precedence (`parity.verdict.attribute_cause`)."""

from __future__ import annotations

from typing import Any

from ..compare.align import exceeded_positions
from ..compare.metrics import fmt_metric
from ..records import Finding, PointResult
from ..verdict import attribute_cause
from .base import CheckContext, CheckOutput


def run(ctx: CheckContext, prior: list[Finding]) -> CheckOutput:
    out = CheckOutput()
    for p in ctx.points:
        if not p.exceeded or p.local is None:
            continue
        out.findings.append(exceeded_finding(p, prior))
    return out


def exceeded_finding(p: PointResult, prior: list[Finding], *, where: str | None = None,
                     measured: str = "local error", drift_note: str = "",
                     extra: dict[str, Any] | None = None) -> Finding:
    """The error finding of one exceeded point, its cause from `prior` (the verdict's precedence).

    `where` names the point (default "layer L, module"), `measured` the error judged; the end-to-end error is
    added where it is another value than the judged one. `drift_note` is appended when nothing explains the
    point (numeric drift), `extra` adds metrics (e.g. the live per-layer run's `layers_kept`)."""
    pos = exceeded_positions(p)
    cause, source = attribute_cause(p, prior)
    by = p.local.get("by_class", {})
    classes = ", ".join(f"{c} {fmt_metric(m['rel_l2'])}" for c, m in by.items())
    why = f" Cause: {source.message}" if source is not None else (
        " No conversion or config finding explains it: numeric drift beyond the noise floor." + drift_note
        if cause == "numeric_drift" else "")
    if where is None:
        where = f"layer {p.layer}, {p.module}" if p.layer is not None else p.module
    e2e = f"; end-to-end {fmt_metric(p.e2e['rel_l2'])}" if p.e2e is not p.local else ""
    return Finding(
        check="hidden", severity="error", cause=cause, layer=p.layer, module=p.module, positions=pos, case=p.case,
        message=(f"{where}: {measured} {fmt_metric(p.local['rel_l2'])} exceeds {fmt_metric(p.threshold)} "
                 f"(noise floor {fmt_metric(p.floor)}) on {pos} rows [{classes}]{e2e}." + why),
        metrics={"local_rel_l2": p.local["rel_l2"], "e2e_rel_l2": p.e2e["rel_l2"], "floor": p.floor,
                 "threshold": p.threshold, "max_abs": p.local["max_abs"],
                 "max_abs_row": p.local["max_abs_row"], "max_abs_col": p.local["max_abs_col"], **(extra or {})},
    )
