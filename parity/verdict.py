"""The verdict: pass only with zero error findings; the first divergence is the earliest point, in
execution order, whose local error exceeds its threshold, with its cause. The cause precedence (which finding
explains an exceeded point when several could) lives here, in `attribute_cause`; the hidden-state check asks it."""

from __future__ import annotations

from .compare.align import exceeded_positions
from .points import execution_order
from .records import Divergence, Finding, FindingGroup, PointResult

# When several findings could explain a point, the more specific cause wins.
# Wrong inputs or a wrong mask explain every later difference of their case, so they are asked first.
# A workspace converted from another model explains every difference of the run.
_CASE_WIDE = ("workspace_from_other_model", "embeddings_skipped", "im_mask_mismatch", "input_mismatch")
# Then root causes before symptoms: a wrong tensor (weights audit), then a wrong config value (the config
# audit: per-linear LoRA settings, and model-wide fields that shape every layer), then what the LoRA check
# saw (a missing, scaled or misdirected delta), then the runtime release.
_WEIGHTS = ("nonfinite", "missing_tensor", "shape_mismatch", "weight_mismatch")
_CONFIG_LINEAR = ("lora_rank_mismatch", "lora_scale_mismatch", "lora_not_applied")
_CONFIG_MODEL = ("bias_dropped", "config_mismatch")


def _applies(f: Finding, p) -> bool:
    """Whether finding `f` sits where `p` (a PointResult or another Finding: case, layer, module) is."""
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


def _explain(p, positions: str | None, prior: list[Finding]) -> tuple[str, Finding] | None:
    """The most specific earlier error finding that explains a difference at `p` (case, layer, module) on
    `positions` rows, with the cause it gives that difference; None when no finding explains it."""
    errors = [f for f in prior if f.severity == "error" and f is not p]
    wide = [f for f in errors if f.cause in _CASE_WIDE and (f.case is None or f.case == p.case)]
    if wide:  # another model's workspace first, then the case's inputs as their checks found them
        f = next((f for f in wide if f.cause == _CASE_WIDE[0]), wide[0])
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
    if version and positions == "image":
        return "lora_not_applied", version[0]
    return None


def attribute_cause(p: PointResult, prior: list[Finding]) -> tuple[str, Finding | None]:
    """The cause of an exceeded point: the most specific earlier error finding that explains it (and that
    finding), else non-finite values the engine made, else numeric drift."""
    explained = _explain(p, exceeded_positions(p), prior)
    if explained is not None:
        return explained
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


# ---------------------------------------------------------------- grouping: one fault, one group
# A symptom is explained by findings of a lower level: the PLoRA and non-finite checks see what a wrong tensor or
# setting does to one linear, the hidden-state check what it does to the module's output, the decode checks what
# it does to generated tokens. Every other check (inputs, mask, config, weights, engine, ...) audits a cause.
_SYMPTOM_LEVEL = {"plora": 1, "nonfinite": 1, "hidden": 2, "decode": 3, "decode-tokens": 4}
# Checks whose unexplained findings of one cause are one fault wherever they sit (a run-wide setting, the
# quantization procedure, or a difference that repeats in every layer); other checks' findings (a tensor of the
# weights audit) are one fault per layer, but for file sizes: config.yaml fixes those for every layer at once.
_RUN_WIDE = ("config", "plora", "nonfinite", "hidden", "decode", "decode-tokens", "inputs", "mask", "quant")
_RUN_WIDE_CAUSES = ("shape_mismatch",)
# A shape the engine cannot load follows from a LoRA rank the config resolves wrongly.
_SHAPE_CAUSES = ("missing_tensor", "shape_mismatch", "lora_rank_mismatch")


def _level(f: Finding) -> int:
    return _SYMPTOM_LEVEL.get(f.check, 0)


def _explaining(i: int, findings: list[Finding], errors: list[int]) -> int | None:
    """The index of the finding that explains error finding `i`, by the verdict's cause precedence; None for
    a root cause."""
    f = findings[i]
    level = _level(f)
    if level:
        prior = [findings[j] for j in errors if _level(findings[j]) < level]
        got = _explain(f, f.positions, prior)
        if got:
            return next(j for j in errors if findings[j] is got[1])
        # else a lower-level finding of the same cause (a run-wide setting; the decode step a token follows)
        return next((j for j in errors if _level(findings[j]) < level and findings[j].cause == f.cause
                     and findings[j].case in (None, f.case)), None)
    other_model = next((j for j in errors if findings[j].cause == _CASE_WIDE[0] and not _level(findings[j])), None)
    if other_model is not None and other_model != i:  # every difference follows from another model's workspace
        return other_model
    if f.check == "engine" and f.cause in _SHAPE_CAUSES:  # the engine refused a workspace the audits explain
        return next((j for j in errors if j != i and findings[j].check in ("config", "weights")
                     and findings[j].cause in _SHAPE_CAUSES and findings[j].case in (None, f.case)), None)
    if f.cause == "shape_mismatch":  # a LoRA file of the size the files hold, not the rank the config resolves
        return next((j for j in errors if findings[j].check == "config" and findings[j].cause == "lora_rank_mismatch"
                     and _applies(findings[j], f)), None)
    return None


def group_findings(findings: list[Finding]) -> list[FindingGroup]:
    """The error findings grouped by root cause (indices into `findings`), a group where its first member is.

    A finding joins the finding that explains it (`_explain`, the precedence the hidden check attributes with:
    a LoRA delta or a module output under the tensor or setting that makes it differ; else a symptom under a
    lower-level finding of its cause, such as a run-wide setting; a file the engine cannot load under the LoRA
    rank that makes its size wrong; every finding under a workspace converted from another model); findings
    left unexplained that share a check and a cause (and a layer, for the weights audit's values) join the first
    of them. Every error finding is in exactly one group; warnings and info are in none. The verdict does not
    depend on the grouping."""
    errors = [i for i, f in enumerate(findings) if f.severity == "error"]
    parent = {i: _explaining(i, findings, errors) for i in errors}
    first_of: dict[tuple, int] = {}
    for i in errors:
        if parent[i] is None:
            f = findings[i]
            key = (f.check, f.cause, f.case, None if f.check in _RUN_WIDE or f.cause in _RUN_WIDE_CAUSES else f.layer)
            parent[i] = first_of.setdefault(key, i)
            if parent[i] == i:
                parent[i] = None

    def root(i: int) -> int:
        seen = {i}
        while parent[i] is not None and parent[i] not in seen:
            i = parent[i]
            seen.add(i)
        return i

    members: dict[int, list[int]] = {}
    for i in errors:
        members.setdefault(root(i), []).append(i)
    return [FindingGroup(root=r, related=tuple(j for j in m if j != r))
            for r, m in sorted(members.items(), key=lambda kv: kv[1][0])]
