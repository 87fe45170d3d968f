"""im_mask placement: what HF received vs what the engine derived from its ranges vs the canonical rows."""

from __future__ import annotations

import torch

from ..points import plora_key
from ..records import Finding
from .base import CheckContext, CheckOutput


def masks_for(ct) -> dict[str, torch.Tensor]:
    canon = ct.prepared.image_rows.to(torch.uint8)
    out = {"canonical": canon}
    m = ct.reference.get(0, plora_key("attention.wqkv", "mask")) if ct.reference.num_layers else None
    if m is not None:
        out["hf"] = m.to(torch.uint8).reshape(-1)
    # the image rows the engine derived from its ranges (whether or not its LoRA then used them)
    if ct.run is not None and ct.run.image_rows is not None:
        out["engine"] = ct.run.image_rows.to(torch.uint8).reshape(-1)
    return out


def run(ctx: CheckContext) -> CheckOutput:
    out = CheckOutput()
    for ct in ctx.cases:
        if (ct.run is not None and ct.run.ranges_rejected) or (
                ct.engine_mask is not None and not torch.equal(ct.engine_mask, ct.prepared.image_rows.bool())):
            continue  # the inputs check already names skipped embeddings and mis-ranged rows
        masks = masks_for(ct)
        canon = masks["canonical"]
        for side in ("hf", "engine"):
            m = masks.get(side)
            if m is None or m.shape != canon.shape:
                continue
            bad = torch.nonzero(m != canon).flatten().tolist()
            if bad:
                out.findings.append(Finding(
                    check="mask", severity="error", cause="im_mask_mismatch", layer=0, module="attention.wqkv",
                    positions="all", case=ct.prepared.name,
                    message=(f"The {'HF model' if side == 'hf' else 'engine'}'s image mask differs from the image "
                             f"rows of the input at {len(bad)} row(s), first at row {bad[0]}: rows {bad[:8]}."),
                    metrics={"rows": bad[:64], "side": side},
                ))
        out.table.append({"case": ct.prepared.name, **{k: v.tolist() for k, v in masks.items()}})
    return out
