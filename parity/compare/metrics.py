"""Error metrics between two aligned tensors, accumulated in float64.

Pure functions: no I/O, no knowledge of points or engines. Non-finite values never raise; they are
counted and the finite-only metrics are computed over the entries where both sides are finite.
All three are one pass over the pair (`parity.compare.rowstats.row_stats`); callers that need several of
them for the same pair should call `row_stats` once and use its methods.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from .rowstats import EPS, row_stats

__all__ = ["EPS", "by_class", "compare", "row_errors"]


def compare(ref: torch.Tensor, eng: torch.Tensor) -> dict[str, Any]:
    """Metrics of `eng` against `ref` (same shape, 1-D or 2-D [rows, cols]): cosine, rel_l2, max_abs,
    max_abs_row, max_abs_col (first maximum), mean_abs, ref_norm, nonfinite_ref, nonfinite_eng. A value finite
    on one side only makes rel_l2 inf and cosine nan."""
    return row_stats(ref, eng).metrics()


def row_errors(ref: torch.Tensor, eng: torch.Tensor) -> torch.Tensor:
    """Per-row relative L2 error (float64 [rows]); a row with a one-sided non-finite value is inf."""
    if ref.dim() == 0:
        raise IndexError("row_errors needs a tensor with rows")
    return row_stats(ref, eng).row_errors()


def by_class(ref: torch.Tensor, eng: torch.Tensor, classes: dict[str, torch.Tensor]) -> dict[str, dict[str, Any]]:
    """Metrics restricted to row classes (e.g. image / text / bos); classes with no rows are left out."""
    return row_stats(ref, eng).by_class(classes)


def fmt_metric(x: float | None) -> str:
    """A metric as findings show it: three significant digits, nan/inf as such, None as not measured (a
    floor the verdict did not need)."""
    if x is None:
        return "not measured"
    return f"{x:.3g}" if math.isfinite(x) else str(x)
