"""Error metrics between two aligned tensors, computed in float64.

Pure functions: no I/O, no knowledge of points or engines. Non-finite values never raise; they are
counted and the finite-only metrics are computed over rows where both sides are finite.
"""

from __future__ import annotations

import math
from typing import Any

import torch

EPS = 1e-30


def compare(ref: torch.Tensor, eng: torch.Tensor) -> dict[str, Any]:
    """Metrics of `eng` against `ref` (same shape, 1-D or 2-D [rows, cols])."""
    r = ref.detach().to(torch.float64).reshape(ref.shape[0] if ref.dim() > 0 else 1, -1)
    e = eng.detach().to(torch.float64).reshape(r.shape)
    fin_r, fin_e = torch.isfinite(r), torch.isfinite(e)
    nf_r = int(r.numel() - fin_r.sum())
    nf_e = int(e.numel() - fin_e.sum())
    if nf_r or nf_e:  # metrics over the entries finite on both sides
        finite = fin_r & fin_e
        rz = torch.where(finite, r, torch.zeros_like(r))
        ez = torch.where(finite, e, torch.zeros_like(e))
    else:  # the common case: no masking passes
        rz, ez = r, e
    d = ez - rz
    ref_norm = float(torch.linalg.vector_norm(rz))
    diff_norm = float(torch.linalg.vector_norm(d))
    eng_norm = float(torch.linalg.vector_norm(ez))
    if diff_norm == 0.0:
        rel = 0.0
    else:
        rel = diff_norm / ref_norm if ref_norm > 0.0 else math.inf
    if ref_norm == 0.0 and eng_norm == 0.0:
        cos = 1.0
    elif ref_norm == 0.0 or eng_norm == 0.0:
        cos = 0.0
    else:  # normalise first: a product of two tiny norms underflows
        cos = float(((rz / ref_norm) * (ez / eng_norm)).sum())
        cos = max(-1.0, min(1.0, cos))
    ad = d.abs()
    if ad.numel():
        flat = int(torch.argmax(ad))
        row, col = divmod(flat, ad.shape[1])
        max_abs = float(ad.reshape(-1)[flat])
        mean_abs = float(ad.mean())
    else:
        row = col = 0
        max_abs = mean_abs = 0.0
    out = {
        "cosine": cos,
        "rel_l2": rel,
        "max_abs": max_abs,
        "max_abs_row": row,
        "max_abs_col": col,
        "mean_abs": mean_abs,
        "ref_norm": ref_norm,
        "nonfinite_ref": nf_r,
        "nonfinite_eng": nf_e,
    }
    if nf_r or nf_e:
        # a value that is finite on one side and not on the other is an infinite error
        mismatch = torch.isfinite(r) != torch.isfinite(e)
        if bool(mismatch.any()):
            out["rel_l2"] = math.inf
            out["cosine"] = math.nan
    return out


def row_errors(ref: torch.Tensor, eng: torch.Tensor) -> torch.Tensor:
    """Per-row relative L2 error (float64 [rows]); a row with a one-sided non-finite value is inf."""
    r = ref.detach().to(torch.float64).reshape(ref.shape[0], -1)
    e = eng.detach().to(torch.float64).reshape(r.shape)
    finite = torch.isfinite(r) & torch.isfinite(e)
    d = torch.where(finite, e - r, torch.zeros_like(r))
    rz = torch.where(finite, r, torch.zeros_like(r))
    num = torch.linalg.vector_norm(d, dim=1)
    den = torch.linalg.vector_norm(rz, dim=1)
    # rows are judged against the tensor's typical row norm, so a near-zero row does not explode
    scale = torch.clamp(den, min=float(den.mean()) * 1e-3 + EPS)
    err = num / scale
    bad = (torch.isfinite(r) != torch.isfinite(e)).any(dim=1)
    return torch.where(bad, torch.full_like(err, math.inf), err)


def by_class(ref: torch.Tensor, eng: torch.Tensor, classes: dict[str, torch.Tensor]) -> dict[str, dict[str, Any]]:
    """Metrics restricted to row classes (e.g. image / text / bos); classes with no rows are left out."""
    out = {}
    for name, rows in classes.items():
        if rows.numel() == 0 or not bool(rows.any()):
            continue
        m = compare(ref[rows], eng[rows])
        out[name] = {k: m[k] for k in ("rel_l2", "max_abs", "cosine", "nonfinite_ref", "nonfinite_eng")}
        out[name]["rows"] = int(rows.sum())
    return out
