"""Partial-LoRA deltas: per layer and linear, the engine's delta on image rows against the reference's
(teacher-forced, so each linear sees the reference's input), and exactly zero on text rows."""

from __future__ import annotations

import math

import torch

from ..compare.metrics import compare
from ..points import PLORA_LINEARS, plora_key
from ..records import Finding
from .base import CheckContext, CheckOutput


def run(ctx: CheckContext) -> CheckOutput:
    out = CheckOutput()
    t = ctx.thresholds
    for ct in ctx.cases:
        if (ct.engine_info or {}).get("ranges_valid") is False:
            continue
        image = ct.prepared.image_rows.bool()
        text = ~image
        for layer in range(ct.reference.num_layers):
            for linear in PLORA_LINEARS:
                key = plora_key(linear, "delta")
                ref = ct.reference.get(layer, key)
                eng = ct.engine_local.get(layer, key)
                if ref is None or eng is None or ref.shape != eng.shape:
                    continue
                fl = ct.floor_local.get(layer, key)
                r_meta = ct.reference.plora(layer, linear)
                e_meta = ct.engine.plora(layer, linear)
                row = {"case": ct.prepared.name, "layer": layer, "linear": linear,
                       "rank_ref": r_meta.get("rank"), "scale_ref": r_meta.get("scale"),
                       "rank_eng": e_meta.get("rank"), "scale_eng": e_meta.get("scale")}
                text_max = float(eng[text].abs().max()) if bool(text.any()) else 0.0
                row["text_max_abs"] = text_max
                if text_max > 0 or not math.isfinite(text_max):
                    rows = torch.nonzero((eng[text].abs().amax(dim=1) > 0)).flatten()
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
                r, e = ref[image], eng[image]
                m = compare(r, e)
                floor = compare(r, fl[image])["rel_l2"] if fl is not None else 0.0
                limit = t.threshold(floor, ctx.numeric)
                rr = r.double().reshape(-1)
                ee = e.double().reshape(-1)
                denom = float(rr @ rr)
                factor = float(ee @ rr) / denom if denom > 0 else (0.0 if float(ee @ ee) == 0 else math.inf)
                row.update({"delta_rel_l2": m["rel_l2"], "delta_cosine": m["cosine"], "factor": factor,
                            "floor": floor, "threshold": limit})
                ok = math.isfinite(m["rel_l2"]) and m["rel_l2"] <= limit
                row["status"] = "ok" if ok else "diverges"
                out.table.append(row)
                if ok:
                    continue
                ref_norm = math.sqrt(denom)
                eng_norm = float(torch.linalg.vector_norm(ee))
                if ref_norm > 0 and eng_norm == 0:
                    cause, why = "lora_not_applied", "the engine added no LoRA delta at all on image rows"
                elif (math.isfinite(m["cosine"]) and m["cosine"] > t.delta_cosine
                      and abs(factor - 1) > t.scale_tolerance):
                    cause = "lora_scale_mismatch"
                    why = (f"the engine's delta is {factor:.4g}× the reference's (same direction, cosine "
                           f"{m['cosine']:.6f}): the LoRA scale differs")
                else:
                    cause = "weight_mismatch"
                    why = f"the engine's delta points elsewhere (cosine {m['cosine']:.4g}): the LoRA A/B weights differ"
                out.findings.append(Finding(
                    check="plora", severity="error", cause=cause, layer=layer, module=linear, positions="image",
                    case=ct.prepared.name,
                    message=f"PLoRA delta of {linear} on image rows: relative error {m['rel_l2']:.3g} > {limit:.3g}; {why}.",
                    metrics={"rel_l2": m["rel_l2"], "cosine": m["cosine"], "factor": factor, "floor": floor}))
    return out
