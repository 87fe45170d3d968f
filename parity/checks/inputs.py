"""Both sides must have been *asked* the same thing: the engine call's rows (looked up in the reference's
own table) and image mask against the HF call's. The engine's weights play no part here."""

from __future__ import annotations

import torch

from ..records import Finding
from .base import CheckContext, CheckOutput


def first_differing_row(a: torch.Tensor, b: torch.Tensor) -> int | None:
    n = min(a.shape[0], b.shape[0])
    if n:
        diff = (a[:n].double() - b[:n].double()).abs().amax(dim=1)
        bad = torch.nonzero(diff > 0).flatten()
        if bad.numel():
            return int(bad[0])
    return None if a.shape[0] == b.shape[0] else n


def run(ctx: CheckContext) -> CheckOutput:
    out = CheckOutput()
    for ct in ctx.cases:
        name = ct.prepared.name
        if ct.run is not None and ct.run.ranges_rejected:
            out.findings.append(Finding(
                check="inputs", severity="error", cause="embeddings_skipped", layer=None, module="embeddings",
                positions="image", case=name,
                message=("TurboMind rejects these input_embedding_ranges "
                         f"({ct.run.ranges.reason or 'invalid ranges'}): it logs '[ImageFeature] "
                         "Skip invalid input embeddings' and runs with no image features and no LoRA at all."),
                metrics={"ranges": [list(r) for r in ct.run.ranges.accepted]},
            ))
            continue
        if ct.engine_rows is None:
            continue
        hf_rows, hf_mask = ct.prepared.embeddings, ct.prepared.image_rows.bool()
        rows, mask = ct.engine_rows, ct.engine_mask
        if mask.shape == hf_mask.shape and not torch.equal(mask, hf_mask):
            bad = torch.nonzero(mask != hf_mask).flatten().tolist()
            out.findings.append(Finding(
                check="inputs", severity="error", cause="im_mask_mismatch", layer=None, module="embeddings",
                positions="all", case=name,
                message=(f"The engine's input_embedding_ranges mark different rows as image than the HF im_mask: "
                         f"{len(bad)} row(s) differ, first at row {bad[0]} (rows {bad[:8]}). TurboMind applies "
                         "PLoRA exactly on the ranged rows, so LoRA lands on the wrong rows."),
                metrics={"rows": bad[:64]},
            ))
            continue
        row = first_differing_row(hf_rows, rows)
        if row is not None:
            image = bool(hf_mask[row]) if row < hf_mask.numel() else False
            out.findings.append(Finding(
                check="inputs", severity="error", cause="input_mismatch", layer=None, module="embeddings",
                positions="image" if image else "text", case=name,
                message=(f"The two sides were not given the same input: HF has {hf_rows.shape[0]} rows, the engine "
                         f"call {rows.shape[0]}; first differing row {row} ({'image' if image else 'text'} row). "
                         "Check the BOS policy and that both sides use the same image features."),
                metrics={"first_row": row, "rows_ref": int(hf_rows.shape[0]), "rows_eng": int(rows.shape[0]),
                         "hash_ref": ct.reference.meta.extras.get("content_hash"),
                         "hash_eng": ct.engine.meta.extras.get("content_hash")},
            ))
    return out
