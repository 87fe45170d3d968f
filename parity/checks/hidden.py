"""Hidden states: every point whose local (teacher-forced) error exceeds its threshold is a finding, with a
cause attributed from the other checks' findings (weights, config, LoRA, mask, inputs) by the verdict's cause
precedence (`parity.verdict.attribute_cause`)."""

from __future__ import annotations

from ..compare.align import exceeded_positions
from ..compare.metrics import fmt_metric
from ..records import Finding
from ..verdict import attribute_cause
from .base import CheckContext, CheckOutput


def run(ctx: CheckContext, prior: list[Finding]) -> CheckOutput:
    out = CheckOutput()
    for p in ctx.points:
        if not p.exceeded or p.local is None:
            continue
        pos = exceeded_positions(p)
        cause, source = attribute_cause(p, prior)
        by = p.local.get("by_class", {})
        classes = ", ".join(f"{c} {fmt_metric(m['rel_l2'])}" for c, m in by.items())
        why = f" Cause: {source.message}" if source is not None else (
            " No conversion or config finding explains it: numeric drift beyond the noise floor."
            if cause == "numeric_drift" else "")
        where = f"layer {p.layer}, {p.module}" if p.layer is not None else p.module
        out.findings.append(Finding(
            check="hidden", severity="error", cause=cause, layer=p.layer, module=p.module, positions=pos,
            case=p.case,
            message=(f"{where}: local error {fmt_metric(p.local['rel_l2'])} exceeds {fmt_metric(p.threshold)} "
                     f"(noise floor {fmt_metric(p.floor)}) on {pos} rows [{classes}]; end-to-end {fmt_metric(p.e2e['rel_l2'])}."
                     + why),
            metrics={"local_rel_l2": p.local["rel_l2"], "e2e_rel_l2": p.e2e["rel_l2"], "floor": p.floor,
                     "threshold": p.threshold, "max_abs": p.local["max_abs"],
                     "max_abs_row": p.local["max_abs_row"], "max_abs_col": p.local["max_abs_col"]},
        ))
    return out
