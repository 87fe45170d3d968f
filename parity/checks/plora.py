"""Partial-LoRA deltas: per layer and linear, the engine's delta on image rows against the reference's
(teacher-forced, so each linear sees the reference's input), and exactly zero on text rows."""

from __future__ import annotations

import math

import torch

from ..compare.align import floor_needed, floor_stats, judge_value
from ..compare.rowstats import RowStats, row_stats
from ..compare.stream import StatsTrace
from ..compare.thresholds import Thresholds
from ..deploy.layout import tm_qkv_cols_to_hf
from ..hfconfig import AttnShape
from ..names import tm_linear_prefix
from ..points import PLORA_LINEARS, plora_key
from ..records import Finding
from .base import CheckContext, CheckOutput


def run(ctx: CheckContext) -> CheckOutput:
    out = CheckOutput()
    t = ctx.thresholds
    for ct in ctx.cases:
        if ct.run is not None and ct.run.ranges_rejected:
            continue
        image = ct.prepared.image_rows.bool()
        text = ~image
        for layer in range(ct.reference.num_layers):
            for linear in PLORA_LINEARS:
                key = plora_key(linear, "delta")
                ref = ct.reference.get(layer, key)
                eng = ct.engine_local.get(layer, key)
                # a layer judged end to end (teacher forcing on demand, fp32): the statistics of the engine's
                # delta against the reference's, kept as the end-to-end run went (`parity.compare.stream`)
                kept = ct.engine.stats(layer, key) if eng is None and isinstance(ct.engine, StatsTrace) else None
                if ref is None or (kept is None and (eng is None or ref.shape != eng.shape)):
                    continue
                r_meta = ct.reference.plora(layer, linear)
                e_meta = ct.engine.plora(layer, linear)
                row = {"case": ct.prepared.name, "layer": layer, "linear": linear,
                       "rank_ref": r_meta.get("rank"), "scale_ref": r_meta.get("scale"),
                       "rank_eng": e_meta.get("rank"), "scale_eng": e_meta.get("scale")}
                expected = None
                if bool(image.any()) and ctx.numeric != "fp32" and eng is not None:
                    expected = _faithful_lowp_delta(ctx, ct, layer, linear, image)
                # one pass over the pair: the image-row comparison and the text rows' max |delta|
                st = kept if kept is not None else \
                    row_stats(ref, eng) if expected is None or bool(text.any()) else None
                text_max = float(st.max_e[text].max()) if bool(text.any()) else 0.0
                row["text_max_abs"] = text_max
                if text_max > 0 or not math.isfinite(text_max):
                    rows = torch.nonzero(st.max_e[text] > 0).flatten()
                    text_idx = torch.nonzero(text).flatten()[rows].tolist()
                    out.findings.append(Finding(
                        check="plora", severity="error", cause="lora_outside_mask", layer=layer, module=linear,
                        positions="text", case=ct.prepared.name,
                        message=(f"The engine added a LoRA delta on {len(text_idx)} text row(s) of {linear} "
                                 f"(first rows {text_idx[:6]}, max |delta| {text_max:.3g}); PLoRA must leave text "
                                 "rows untouched."),
                        metrics={"rows": text_idx[:64], "max_abs": text_max}))
                if not bool(image.any()):
                    out.table.append(row)
                    continue
                if expected is not None:
                    # In the deployment dtype a tiny delta is dominated by how its *input* was rounded, which
                    # the reference's own floor does not share; so the engine's delta is judged against a
                    # faithful low-precision LoRA on the engine's own input, from the HF weights and scale.
                    e_img = eng[image]
                    sti, sel = row_stats(expected, e_img), None
                    floor = 0.0
                    raw = lambda: (expected, e_img)  # noqa: E731
                else:
                    sti, sel = st, image
                    floor = None  # not measured: at or below min_rel, or above max_rel, the floor changes nothing
                    # the floor is read (and measured, if it has not been) only where it can change the verdict
                    if floor_needed(ct.floor_local, [sti.metrics(sel)["rel_l2"]], t, ctx.numeric):
                        fst = floor_stats(ct.floor_local, layer, key, ref)
                        floor = fst.metrics(image)["rel_l2"] if fst is not None else 0.0
                    # kept statistics are of finite values only: a non-finite one starts the teacher-forced run
                    raw = (lambda: (ref[image], eng[image])) if eng is not None else None  # noqa: E731
                m = sti.metrics(sel)
                limit, exceeded = judge_value(m["rel_l2"], floor or 0.0, t, ctx.numeric, unmeasured=floor is None)
                denom, cross, eng_sq = _dots(sti, sel, m, raw)
                factor = cross / denom if denom > 0 else (0.0 if eng_sq == 0 else math.inf)
                row.update({"delta_rel_l2": m["rel_l2"], "delta_cosine": m["cosine"], "factor": factor,
                            "floor": floor, "threshold": limit})
                ok = not exceeded
                row["status"] = "ok" if ok else "diverges"
                out.table.append(row)
                if ok:
                    continue
                ref_norm = math.sqrt(denom)
                eng_norm = math.sqrt(eng_sq)
                cause = lora_cause(ref_norm > 0 and eng_norm == 0, m["cosine"], factor, t)
                why = {"lora_not_applied": "the engine added no LoRA delta at all on image rows",
                       "lora_scale_mismatch": (f"the engine's delta is {factor:.4g}× the reference's (same direction, "
                                               f"cosine {m['cosine']:.6f}): the LoRA scale differs"),
                       "weight_mismatch": (f"the engine's delta points elsewhere (cosine {m['cosine']:.4g}): the "
                                           "LoRA A/B weights differ")}[cause]
                out.findings.append(Finding(
                    check="plora", severity="error", cause=cause, layer=layer, module=linear, positions="image",
                    case=ct.prepared.name,
                    message=f"PLoRA delta of {linear} on image rows: relative error {m['rel_l2']:.3g} > {limit:.3g}; {why}.",
                    metrics={"rel_l2": m["rel_l2"], "cosine": m["cosine"], "factor": factor, "floor": floor}))
    return out


def lora_cause(not_applied: bool, cosine: float, factor: float, t: Thresholds) -> str:
    """Why a LoRA contribution (a linear's delta, or the live engine's PLoRA effect on the output) that exceeds
    its threshold differs from the reference's: none at all (`not_applied`, the caller's test), the same
    direction at another size (a scale: cosine above `delta_cosine`, `factor` off 1 by more than
    `scale_tolerance`), or another direction (the A/B weights)."""
    if not_applied:
        return "lora_not_applied"
    if math.isfinite(cosine) and cosine > t.delta_cosine and abs(factor - 1) > t.scale_tolerance:
        return "lora_scale_mismatch"
    return "weight_mismatch"


def _dots(st: RowStats, rows: torch.Tensor | None, m: dict, raw) -> tuple[float, float, float]:
    """(r.r, e.r, e.e) over the compared rows, float64. From the row sums, which cover the entries finite on
    both sides; with a non-finite entry, the dot products of the raw values `raw()` (they propagate it)."""
    if (m["nonfinite_ref"] or m["nonfinite_eng"]) and raw is not None:
        r, e = raw()
        rr = r.double().reshape(-1)
        ee = e.double().reshape(-1)
        return float(rr @ rr), float(ee @ rr), float(ee @ ee)

    def total(t: torch.Tensor) -> float:
        return float((t if rows is None else t[rows]).sum())

    return total(st.sr2), total(st.sre), total(st.se2)


def _faithful_lowp_delta(ctx: CheckContext, ct, layer: int, linear: str, image: torch.Tensor) -> torch.Tensor | None:
    """rnd(scale * (rnd(rnd(x) @ A) @ B)) on the image rows of the engine's own input, HF's A, B and scale —
    TurboMind's op order (notes, section 5) with the weights and scale the model really has."""
    hf, ws = ctx.hf_tm_tensors, ctx.workspace
    tm = tm_linear_prefix(layer, linear)
    x = ct.engine_local.get(layer, plora_key(linear, "input"))
    meta = ctx.hf_plora.get(layer, {}).get(linear)
    if hf is None or ws is None or x is None or meta is None or f"{tm}.lora_a.weight" not in hf:
        return None
    dt = ws.dtype
    a, b = hf[f"{tm}.lora_a.weight"].to(dt).float(), hf[f"{tm}.lora_b.weight"].to(dt).float()
    t = (x[image].to(dt).float() @ a).to(dt).float()
    out = (float(meta["scale"]) * (t @ b)).to(dt).float()
    if linear == "attention.wqkv":
        shape = AttnShape.from_config(ctx.hf_config)
        out = tm_qkv_cols_to_hf(out, shape.heads, shape.kv_heads, shape.head_dim)
    return out
