"""Decode findings: a truncated session, teacher-forced steps beyond their noise floor (with the cause the
step's evidence gives), and the free-running token divergence (near tie: warning; clear flip: error).

Cause of a step's first exceeded point, most specific first: a LoRA delta on a generated row
(`lora_outside_mask`), the token placed at another position than TurboMind's (`position_mismatch`), another
rotary base than the prefill's rule gives at that context length (`rope_mismatch`), a KV cache stored
otherwise than the workspace says (`kv_cache_precision`); else the prefill's own first divergence cause,
else `numeric_drift`.
"""

from __future__ import annotations

from ..records import ORIGINAL_MODEL_CAUSES, DecodeSection, Divergence, Finding
from .base import CheckOutput
from ..compare.metrics import fmt_metric


def _engine_divergence(prefill: Divergence | None) -> bool:
    """Whether the prefill's first divergence is one of the engine against the reference (a structural finding
    about the checked model against its original, e.g. AWQ smoothing, cannot move a decode step's error)."""
    return prefill is not None and prefill.cause not in ORIGINAL_MODEL_CAUSES


def _cause(sec: DecodeSection, point: dict, step: dict | None, prefill: Divergence | None) -> tuple[str, str]:
    lora = [p for p in sec.points if p["step"] == point["step"] and p["module"].endswith(":delta")
            and p["layer"] <= point["layer"]] if point["layer"] is not None else []
    if lora:
        p = lora[0]
        return "lora_outside_mask", (f"layer {p['layer']} {p['module'].split(':')[0]} added a LoRA delta (max |delta| "
                                     f"{fmt_metric(p['max_abs'])}) on a generated row, where TurboMind's mask is 0.")
    if step is not None and step["position"] != step["expected_position"]:
        return "position_mismatch", (f"the token was placed at position {step['position']}; TurboMind places it "
                                     f"at {step['expected_position']} (prompt rows + step - 1).")
    if step is not None and step["rope_theta"] != step["expected_rope_theta"]:
        return "rope_mismatch", (f"rotary base {step['rope_theta']:g} on this generated row; the prefill's rule gives "
                                 f"{step['expected_rope_theta']:g} at this context length.")
    eng = sec.engine
    if eng.get("kv_storage") != eng.get("kv_expected"):
        return "kv_cache_precision", (f"the KV cache is stored as {eng.get('kv_storage')}; the workspace (and "
                                      f"quant policy) says {eng.get('kv_expected')}.")
    if _engine_divergence(prefill):
        return prefill.cause, f"the prefill already diverged ({prefill.cause})."
    return "numeric_drift", "no decode or conversion finding explains it: numeric drift beyond the noise floor."


def run(sections: list[DecodeSection], prefill: Divergence | None, floor_factor: float) -> CheckOutput:
    out = CheckOutput()
    for sec in sections:
        steps = {t["step"]: t for t in sec.tokens}
        trunc = sec.engine.get("truncated_at")
        if trunc is not None:
            out.findings.append(Finding(
                check="decode", severity="error", cause="session_truncated", case=sec.case, step=trunc,
                message=(f"The engine stopped after {trunc} of {sec.requested} generated tokens: the sequence reached "
                         f"session_len {sec.engine.get('session_len')} (prompt {sec.prompt_rows} rows); TurboMind "
                         "ends the request there. Raise session_len or ask for fewer tokens."),
                metrics={"session_len": sec.engine.get("session_len"), "prompt_rows": sec.prompt_rows,
                         "requested": sec.requested}))
        # the first exceeded point of each step (steps in order, points in execution order); steps that
        # fail at the same place for the same cause make one finding, at the first of them
        grouped: dict[tuple, Finding] = {}
        seen_steps: set[int] = set()
        for p in sec.points:
            if not p["exceeded"] or p["step"] in seen_steps or p["module"].endswith(":delta"):
                continue
            seen_steps.add(p["step"])
            cause, why = _cause(sec, p, steps.get(p["step"]), prefill)
            key = (p["layer"], p["module"], cause)
            if key in grouped:
                grouped[key].metrics["steps"].append(p["step"])
                continue
            where = f"layer {p['layer']}, {p['module']}" if p["layer"] is not None else p["module"]
            # a live engine's step is judged end to end (fed the reference's tokens; nothing per layer to force)
            judged = "end-to-end" if p.get("judged") == "e2e" else "teacher-forced"
            grouped[key] = Finding(
                check="decode", severity="error", cause=cause, layer=p["layer"], module=p["module"],
                positions="generated", case=sec.case, step=p["step"],
                message=(f"decode step {p['step']}, {where}: {judged} error {fmt_metric(p['local'])} exceeds "
                         f"{fmt_metric(p['threshold'])} (noise floor {fmt_metric(p['floor'])}); end-to-end {fmt_metric(p['e2e'])}. "
                         f"Cause: {why}"),
                metrics={**{k: p[k] for k in ("local", "e2e", "floor", "threshold", "max_abs")},
                         "steps": [p["step"]]})
            out.findings.append(grouped[key])
        for f in grouped.values():
            later = len(f.metrics["steps"]) - 1
            if later:
                f.message += f" The same point fails at {later} later step(s) for the same cause."
        k = sec.first_divergent_step
        if k is not None:
            t = steps[k]
            gap, tie = t["ref_gap"], floor_factor * sec.logprob_noise
            near = t["near_tie"]
            earlier = [f for f in out.findings if f.case == sec.case and f.check == "decode" and f.step is not None
                       and f.step <= k and f.cause != "session_truncated"]
            cause = earlier[0].cause if earlier else (prefill.cause if _engine_divergence(prefill) else "numeric_drift")
            out.findings.append(Finding(
                check="decode-tokens", severity="warning" if near else "error", cause=cause, module="output",
                positions="generated", case=sec.case, step=k,
                message=(f"Free-running generation diverges at step {k} after {sec.matched_prefix} matching tokens: "
                         f"reference {t['ref']['text']!r} (logprob {fmt_metric(t['ref']['logprob'])}), engine "
                         f"{t['eng']['text']!r} (logprob {fmt_metric(t['eng']['logprob'])}); the reference's gap between "
                         f"them is {fmt_metric(gap)} against a tie threshold of {fmt_metric(tie)} "
                         f"({'a near tie' if near else 'a clear flip'}); engine token in the reference's top-k: "
                         f"{t['eng_in_ref_topk']}, reference token in the engine's: {t['ref_in_eng_topk']}."),
                metrics={"ref_gap": gap, "tie_threshold": tie, "matched_prefix": sec.matched_prefix,
                         "eng_in_ref_topk": t["eng_in_ref_topk"], "ref_in_eng_topk": t["ref_in_eng_topk"]}))
        free = sec.engine.get("free_running")  # the live engine: its own generation beside the token-fed steps
        if free and not free.get("agrees_with_forced", True):
            k = free.get("disagrees_at")
            out.findings.append(Finding(
                check="decode-tokens", severity="warning", cause="numeric_drift", module="output",
                positions="generated", case=sec.case, step=k,
                message=(f"The engine's free-running generation chose token {free['tokens'][k]} at step {k}, but fed "
                         "the same tokens before it through its KV cache its logits put another first (largest "
                         f"logit difference between the two runs {fmt_metric(free.get('max_abs_logits_diff'))}): "
                         "the judged steps are not the generation a user sees from this step on (sampling that "
                         "is not greedy, or a continuation that differs from generation).")))
    return out
