"""4-bit packing and dequantization, as the AWQ checkpoint and the TurboMind workspace store them.

Two packings of eight u4 values into one int32 (lowest nibble first):
* AWQ ("gemm" version, what `lmdeploy lite auto_awq` saves): nibble i of packed column c holds output column
  `8c + AWQ_ORDER[i]` (real-deployments.md §3);
* TurboMind's workspace (`pack_u4_row` in lmdeploy's turbomind/deploy/parameter.py): nibble i holds column `8c + i`.

Dequantization, two ways:
* `dequantize_exact`: (q - z) * s, exact in float32 (|q - z| < 16 and s is fp16, so the product has at most
  15 significant bits) — the AWQ model's own weights, the reference side's;
* `dequantize_turbomind`: what TurboMind's int4 GEMM computes (v0.7.1): at load, `fuse_scales_and_zeros`
  stores (s, fp16(-z*s)) (kernels/gemm/cast.cu); in the main loop every weight is `__hfma(q, s, -z*s)` in half
  (kernels/gemm/transform.h): one fp16 rounding of the exact q*s + m. The sum is exact in float64 and numpy's
  float64 -> float16 conversion rounds once (to nearest even), so the result is bit-exact.
"""

from __future__ import annotations

import numpy as np
import torch

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)
NATURAL_ORDER = tuple(range(8))


def _unpack(x: torch.Tensor, order: tuple[int, ...]) -> torch.Tensor:
    if x.dtype != torch.int32:
        raise TypeError(f"packed u4 tensors are int32, got {x.dtype}")
    nib = [((x >> (4 * i)) & 15).to(torch.uint8) for i in range(8)]
    cols: list[torch.Tensor] = [torch.empty(0)] * 8
    for i, c in enumerate(order):
        cols[c] = nib[i]
    return torch.stack(cols, dim=-1).reshape(*x.shape[:-1], x.shape[-1] * 8)


def _pack(u: torch.Tensor, order: tuple[int, ...]) -> torch.Tensor:
    if u.shape[-1] % 8:
        raise ValueError(f"the last dim ({u.shape[-1]}) must be a multiple of 8 to pack u4 values")
    if u.numel() and (int(u.min()) < 0 or int(u.max()) > 15):
        raise ValueError("u4 values must lie in 0..15")
    v = u.to(torch.int64).reshape(*u.shape[:-1], u.shape[-1] // 8, 8)
    out = torch.zeros(v.shape[:-1], dtype=torch.int64)
    for i, c in enumerate(order):
        out |= v[..., c] << (4 * i)
    # the top nibble may set bit 31: wrap to int32's two's complement like the C++/torch shifts do
    out = torch.where(out >= 2**31, out - 2**32, out)
    return out.to(torch.int32)


def unpack_awq(x: torch.Tensor) -> torch.Tensor:
    """int32 [..., n/8] in AWQ nibble order -> uint8 [..., n]."""
    return _unpack(x, AWQ_ORDER)


def pack_awq(u: torch.Tensor) -> torch.Tensor:
    """uint8/int [..., n] (0..15) -> int32 [..., n/8] in AWQ nibble order."""
    return _pack(u, AWQ_ORDER)


def unpack_rows(x: torch.Tensor) -> torch.Tensor:
    """int32 [..., n/8] in TurboMind's workspace order -> uint8 [..., n]."""
    return _unpack(x, NATURAL_ORDER)


def pack_rows(u: torch.Tensor) -> torch.Tensor:
    """uint8/int [..., n] (0..15) -> int32 [..., n/8] in TurboMind's workspace order."""
    return _pack(u, NATURAL_ORDER)


def _per_row(t: torch.Tensor, rows: int, group_size: int) -> torch.Tensor:
    """[rows / group_size, n] -> [rows, n]: each group's value repeated over its input rows."""
    if group_size < 1 or rows % group_size or t.shape[0] * group_size != rows:
        raise ValueError(f"{t.shape[0]} groups of {group_size} rows do not cover {rows} input rows")
    return t.repeat_interleave(group_size, dim=0)


def dequantize_exact(q: torch.Tensor, zeros: torch.Tensor, scales: torch.Tensor, group_size: int) -> torch.Tensor:
    """(q - z) * s in float32, exact. q [in, out] u4, zeros/scales [in/g, out]; returns [in, out]."""
    z = _per_row(zeros.float(), q.shape[0], group_size)
    s = _per_row(scales.to(torch.float16).float(), q.shape[0], group_size)
    return (q.float() - z) * s


def dequantize_turbomind(q: torch.Tensor, zeros: torch.Tensor, scales: torch.Tensor, group_size: int) -> torch.Tensor:
    """TurboMind's fp16 weights: hfma(q, s, fp16(-z*s)). q [in, out] u4, zeros/scales [in/g, out] fp16."""
    s16 = scales.to(torch.float16)
    m16 = (-(zeros.to(torch.float16).float()) * s16.float()).to(torch.float16)  # -z*s exact in fp32, one rounding
    s = _per_row(s16.double(), q.shape[0], group_size)
    m = _per_row(m16.double(), q.shape[0], group_size)
    exact = (q.double() * s + m).numpy()  # exact in float64
    return torch.from_numpy(exact.astype(np.float16))


def quantize_rtn(w: torch.Tensor, bits: int, group_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Round-to-nearest asymmetric quantization of w [in, out] per (group of input rows, output column), the
    rule of lmdeploy's `pseudo_quantize_tensor` (scale = (max - min) / (2^bits - 1) clamped at 1e-5, zero =
    -round(min / scale)). Returns (q uint8 [in, out], zeros fp16 [in/g, out], scales fp16 [in/g, out]).
    Used for the quantization budget (what round-to-nearest of the same weights costs) and in tests."""
    rows, cols = w.shape
    if rows % group_size:
        raise ValueError(f"{rows} input rows are not a multiple of group size {group_size}")
    g = w.float().reshape(rows // group_size, group_size, cols)
    hi, lo = g.amax(dim=1), g.amin(dim=1)
    top = 2**bits - 1
    scales = ((hi - lo).clamp(min=1e-5) / top)
    zeros = (-torch.round(lo / scales)).clamp(0, top)
    q = torch.clamp(torch.round(g / scales.unsqueeze(1)) + zeros.unsqueeze(1), 0, top)
    return q.reshape(rows, cols).to(torch.uint8), zeros.to(torch.float16), scales.to(torch.float16)
