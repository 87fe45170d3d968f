"""Both sides must have received the same rows: same count, same embeddings (after the engine's cast)."""

from __future__ import annotations

import torch

from ..records import Finding
from .base import CheckContext, CheckOutput


def _first_diff(a: torch.Tensor, b: torch.Tensor) -> int | None:
    n = min(a.shape[0], b.shape[0])
    diff = (a[:n].double() - b[:n].double()).abs().amax(dim=1) if n else torch.zeros(0)
    scale = a[:n].double().abs().amax(dim=1).clamp(min=1e-30) if n else torch.zeros(0)
    bad = torch.nonzero(diff / scale > 1e-2).flatten()  # beyond any dtype cast of the embedding rows
    if bad.numel():
        return int(bad[0])
    return None if a.shape[0] == b.shape[0] else n


def run(ctx: CheckContext) -> CheckOutput:
    out = CheckOutput()
    for ct in ctx.cases:
        info = ct.engine_info or {}
        if info.get("ranges_valid") is False:
            out.findings.append(Finding(
                check="inputs", severity="error", cause="embeddings_skipped", layer=None, module="embeddings",
                positions="image", case=ct.prepared.name,
                message=("TurboMind rejects these input_embedding_ranges "
                         f"({info.get('warning') or 'invalid ranges'}): it logs '[ImageFeature] Skip invalid "
                         "input embeddings' and runs with no image features and no LoRA at all."),
                metrics={"ranges": [list(r) for r in ct.engine.meta.extras.get("ranges", ct.prepared.ranges)]},
            ))
            continue
        ref = ct.reference.get(None, "embeddings")
        eng = ct.engine.get(None, "embeddings")
        if ref is None or eng is None:
            continue
        row = _first_diff(ref, eng)
        if row is not None:
            image = bool(ct.prepared.image_rows[row]) if row < ct.prepared.image_rows.numel() else False
            out.findings.append(Finding(
                check="inputs", severity="error", cause="input_mismatch", layer=None, module="embeddings",
                positions="image" if image else "text", case=ct.prepared.name,
                message=(f"The two sides did not receive the same input rows: reference has {ref.shape[0]} rows, "
                         f"engine {eng.shape[0]}; first differing row {row} "
                         f"({'image' if image else 'text'} row). Check the BOS policy and the image features."),
                metrics={"first_row": row, "rows_ref": int(ref.shape[0]), "rows_eng": int(eng.shape[0]),
                         "hash_ref": ct.reference.meta.extras.get("content_hash"),
                         "hash_eng": ct.engine.meta.extras.get("content_hash")},
            ))
    return out
