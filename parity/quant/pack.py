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
  (kernels/gemm/transform.h): one fp16 rounding of the exact q*s + m (bit-exact, see the function).
"""

from __future__ import annotations

import torch

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)
NATURAL_ORDER = tuple(range(8))


def _unpack(x: torch.Tensor, order: tuple[int, ...]) -> torch.Tensor:
    if x.dtype != torch.int32:
        raise TypeError(f"packed u4 tensors are int32, got {x.dtype}")
    # little-endian bytes: byte j of an int32 holds nibbles 2j (low) and 2j + 1 (high)
    b = x.contiguous().view(torch.uint8).reshape(*x.shape, 4)
    nib = torch.stack((b & 15, b >> 4), dim=-1).reshape(*x.shape, 8)  # nibble i at [..., i]
    if order != NATURAL_ORDER:
        inverse = [0] * 8
        for i, c in enumerate(order):
            inverse[c] = i
        nib = nib[..., inverse]  # column c takes the nibble that holds it
    return nib.reshape(*x.shape[:-1], x.shape[-1] * 8)


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


def _grouped(q: torch.Tensor, t: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """q [in, out] as [in/g, g, out] and t [in/g, out] as [in/g, 1, out] (broadcast over each group's rows)."""
    rows, cols = q.shape
    if group_size < 1 or rows % group_size or t.shape[0] * group_size != rows:
        raise ValueError(f"{t.shape[0]} groups of {group_size} rows do not cover {rows} input rows")
    return q.reshape(rows // group_size, group_size, cols), t.unsqueeze(1)


def dequantize_exact(q: torch.Tensor, zeros: torch.Tensor, scales: torch.Tensor, group_size: int) -> torch.Tensor:
    """(q - z) * s in float32, exact. q [in, out] u4, zeros/scales [in/g, out]; returns [in, out]."""
    qg, z = _grouped(q, zeros.float(), group_size)
    s = scales.to(torch.float16).float().unsqueeze(1)
    return ((qg.float() - z) * s).reshape(q.shape)


def dequantize_turbomind(q: torch.Tensor, zeros: torch.Tensor, scales: torch.Tensor, group_size: int) -> torch.Tensor:
    """TurboMind's fp16 weights: hfma(q, s, fp16(-z*s)). q [in, out] u4, zeros/scales [in/g, out] fp16.

    Exact in float32 before the one rounding: with s = S * 2^k (S < 2^11), q*s and m = fp16(-z*s) are integer
    multiples of 2^k below 2^16 * 2^k, so q*s + m has at most 17 significant bits; float32 -> float16 rounds
    once, to nearest even."""
    s16 = scales.to(torch.float16)
    m = (-(zeros.to(torch.float16).float()) * s16.float()).to(torch.float16).float()  # -z*s exact, one rounding
    qg, s = _grouped(q, s16.float(), group_size)
    return (qg.float() * s + m.unsqueeze(1)).reshape(q.shape).to(torch.float16)


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
