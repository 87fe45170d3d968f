"""The verdict: pass only with zero error findings; the first divergence is the earliest point, in
execution order, whose local error exceeds its threshold, with its cause. The cause precedence (which finding
explains an exceeded point when several could) lives here, in `attribute_cause`; the hidden-state check asks it."""

from __future__ import annotations

from .compare.align import exceeded_positions
from .points import execution_order
from .records import Divergence, Finding, PointResult

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


def attribute_cause(p: PointResult, prior: list[Finding]) -> tuple[str, Finding | None]:
    """The cause of an exceeded point: the most specific earlier error finding that explains it (and that
    finding), else non-finite values the engine made, else numeric drift."""
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
    # a runtime that applies no PLoRA (a release, or the live engine's PLoRA on/off run of this case)
    version = [f for f in errors if f.cause in ("unsupported_version", "lora_not_applied") and f.layer is None
               and (f.case is None or f.case == p.case)]
    if version and exceeded_positions(p) == "image":
        return "lora_not_applied", version[0]
    if p.local and (p.local.get("nonfinite_eng", 0) > p.local.get("nonfinite_ref", 0)):
        return "nonfinite", None
    return "numeric_drift", None


def _order_key(f: Finding, order: dict, cases: list[str]) -> tuple:
    # prefill findings (step None) first, then decode steps in order, each in execution order
    step = -1 if f.step is None else f.step
    return (step, order.get((f.layer, f.module), len(order)), cases.index(f.case) if f.case in cases else -1)


def decide(findings: list[Finding], num_layers: int, cases: list[str]) -> tuple[str, Divergence | None]:
    errors = [f for f in findings if f.severity == "error"]
    if not errors:
        return "pass", None
    order = {pt: n for n, pt in enumerate(execution_order(num_layers))}
    # where a value first exceeds its floor: prefill points, else decode steps, else any error
    hidden = [f for f in errors if f.check == "hidden"]
    decode = [f for f in errors if f.check == "decode"]
    pool = hidden or decode or errors
    first = min(pool, key=lambda f: _order_key(f, order, cases))
    return "fail", Divergence(layer=first.layer, module=first.module, positions=first.positions,
                              cause=first.cause, case=first.case, message=first.message, step=first.step)


def sort_findings(findings: list[Finding], num_layers: int, cases: list[str]) -> list[Finding]:
    order = {pt: n for n, pt in enumerate(execution_order(num_layers))}
    rank = {"error": 0, "warning": 1, "info": 2}
    return sorted(findings, key=lambda f: (rank[f.severity], _order_key(f, order, cases)))
