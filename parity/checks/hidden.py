"""Hidden states: every point whose local (teacher-forced) error exceeds its threshold is a finding, with a
cause attributed from the other checks' findings (weights, config, LoRA, mask, inputs)."""

from __future__ import annotations

from ..compare.align import exceeded_positions
from ..compare.metrics import fmt_metric
from ..records import Finding, PointResult
from .base import CheckContext, CheckOutput

# When several findings could explain a point, the more specific cause wins.
# Wrong inputs or a wrong mask explain every later difference of their case, so they are asked first.
_CASE_WIDE = ("embeddings_skipped", "im_mask_mismatch", "input_mismatch")
# Then root causes before symptoms: a wrong tensor (weights audit), then a wrong config value (the config
# audit: per-linear LoRA settings, and model-wide fields that shape every layer), then what the LoRA check
# saw (a missing, scaled or misdirected delta), then the runtime release.
_WEIGHTS = ("nonfinite", "missing_tensor", "shape_mismatch", "weight_mismatch")
_CONFIG_LINEAR = ("lora_rank_mismatch", "lora_scale_mismatch", "lora_not_applied")
_CONFIG_MODEL = ("bias_dropped", "config_mismatch")


def _applies(f: Finding, p: PointResult) -> bool:
    if f.case is not None and f.case != p.case:
        return False
    if f.module is not None and f.module != p.module:
        return False
    layers = f.metrics.get("layers") if isinstance(f.metrics, dict) else None
    if layers is not None:
        return p.layer in layers
    return f.layer is None or f.layer == p.layer


def _pick(found: list[Finding], order: tuple[str, ...]) -> Finding | None:
    found = [f for f in found if f.cause in order]
    return min(found, key=lambda f: order.index(f.cause)) if found else None


def attribute(p: PointResult, prior: list[Finding]) -> tuple[str, Finding | None]:
    errors = [f for f in prior if f.severity == "error"]
    for f in errors:
        if f.cause in _CASE_WIDE and (f.case is None or f.case == p.case):
            return f.cause, f
    here = [f for f in errors if f.module is not None and _applies(f, p)]
    steps = (
        _pick([f for f in here if f.check == "weights"], _WEIGHTS),
        _pick([f for f in here if f.check == "config"], _CONFIG_LINEAR + _CONFIG_MODEL),
        _pick([f for f in errors if f.check == "config"], _CONFIG_MODEL),
        _pick([f for f in here if f.check == "plora"], ("lora_not_applied", "lora_scale_mismatch",
                                                          "lora_outside_mask", "weight_mismatch")),
    )
    for f in steps:
        if f is not None:
            return f.cause, f
    version = [f for f in errors if f.cause in ("unsupported_version", "lora_not_applied") and f.layer is None]
    if version and exceeded_positions(p) == "image":
        return "lora_not_applied", version[0]
    if p.local and (p.local.get("nonfinite_eng", 0) > p.local.get("nonfinite_ref", 0)):
        return "nonfinite", None
    return "numeric_drift", None


def run(ctx: CheckContext, prior: list[Finding]) -> CheckOutput:
    out = CheckOutput()
    for p in ctx.points:
        if not p.exceeded or p.local is None:
            continue
        pos = exceeded_positions(p)
        cause, source = attribute(p, prior)
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
