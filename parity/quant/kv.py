"""KV-cache quantization as TurboMind 0.7.1 does it (`quant_policy` 8 -> u8, 4 -> u4), for the replay and decode.

Read from lmdeploy v0.7.1 `src/turbomind/kernels/attention/quantization.h` and `kv_cache_utils_v2.cu`
(`ProcessKV_v2` writes the cache, `FlattenKV_v2` reads it back for prefill attention; decoding reads it too):
* per token and per head, asymmetric, over the head's channels of K (after rotary) and V, in the compute type T
  (fp16 or bf16): `scale = T((float(max) - float(min)) * (1 / (2^bits - 1)))`, `zero = min` (`warp_stats`);
* quantize (`ConvertKvCache<T, u8/u4>`): `inv = T(1 / float(scale))`, `q = cvt.rni.sat(T(T(x - zero) * inv))`
  (round half to even, saturated to 0..255, then min(q, 2^bits - 1));
* dequantize (`ConvertKvCache<u8/u4, T>`): `q * scale + zero` in T, emulated as one rounding (a fused
  multiply-add, what nvcc contracts `a * b + c` into by default).
The scale and zero are stored in T beside the codes. Not reproduced bit for bit: `fdividef` (an approximate
division, <= 2 ulp in float32) is taken as the exact float32 division.

API (the decode path calls it; shapes are free as long as the last dim is the head dim):
    kv = quantize_kv(x, bits, dtype)      # KVQuant(q uint8, scale, zero) per [..., head]
    y = dequantize_kv(kv, dtype)         # x as the attention reads it back
    y = kv_roundtrip(x, bits, dtype)     # both, the one-liner for a cache store
`QUANT_POLICY_BITS = {4: 4, 8: 8}` maps `--quant-policy` to bits (0: no quantization).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

QUANT_POLICY_BITS = {4: 4, 8: 8}


@dataclass
class KVQuant:
    q: torch.Tensor       # uint8 codes, x's shape
    scale: torch.Tensor   # [..., 1] in the compute dtype
    zero: torch.Tensor    # [..., 1] in the compute dtype
    bits: int


def _round_to(x64: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """One correct rounding of float64 values to fp16 (numpy); bf16 goes through float32 (a double rounding in
    rare ties, not reproduced)."""
    if dtype == torch.float16:
        return torch.from_numpy(x64.numpy().astype(np.float16))
    return x64.to(torch.float32).to(dtype)  # the float64 values here are exact in float32 (products of 2 halves)


def bits_for_policy(quant_policy: int) -> int:
    if quant_policy == 0:
        return 0
    if quant_policy not in QUANT_POLICY_BITS:
        raise ValueError(f"quant_policy must be 0, 4 or 8, got {quant_policy}")
    return QUANT_POLICY_BITS[quant_policy]


def quantize_kv(x: torch.Tensor, bits: int, dtype: torch.dtype = torch.float16,
                scale_factor: float = 1.0) -> KVQuant:
    """TurboMind's per-(token, head) asymmetric quantization of x [..., head_dim] computed in `dtype`.
    `scale_factor` != 1 stores a scale other than the one the codes were made with (only for the fault catalogue:
    a KV cache read back with a wrong scale)."""
    if bits not in (4, 8):
        raise ValueError(f"bits must be 4 or 8, got {bits}")
    t = x.to(dtype)
    lo = t.amin(dim=-1, keepdim=True)
    hi = t.amax(dim=-1, keepdim=True)
    inv_q_max = np.float32(1.0) / np.float32(2**bits - 1)
    scale = ((hi.float() - lo.float()) * float(inv_q_max)).to(dtype)
    inv = (1.0 / scale.float()).to(dtype)           # inf where scale == 0 or 1/scale overflows the half range
    diff = (t.float() - lo.float()).to(dtype)       # exact in float32, one rounding to T
    v = (diff.float() * inv.float()).to(dtype)      # product of two T values: exact in float32, one rounding
    # cvt.rni.sat.u8: NaN (0 * inf: a row's minimum when inv is inf) -> 0, +inf saturates to 255
    v = torch.nan_to_num(v.float(), nan=0.0, posinf=255.0)
    q = torch.round(v).clamp(0, 255).clamp(max=2**bits - 1).to(torch.uint8)  # cvt.rni.sat.u8, then min
    if scale_factor != 1.0:  # the codes were made with the right scale; the cache stores (and reads) another
        scale = (scale.float() * scale_factor).to(dtype)
    return KVQuant(q=q, scale=scale, zero=lo, bits=bits)


def dequantize_kv(kv: KVQuant, dtype: torch.dtype = torch.float16) -> torch.Tensor:
    """What the attention reads back: q * scale + zero in `dtype` (one rounding)."""
    exact = kv.q.double() * kv.scale.double() + kv.zero.double()
    return _round_to(exact, dtype)


def kv_roundtrip(x: torch.Tensor, bits: int, dtype: torch.dtype = torch.float16,
                 scale_factor: float = 1.0) -> torch.Tensor:
    """x [..., head_dim] stored in a `bits`-bit KV cache and read back (in `dtype`)."""
    return dequantize_kv(quantize_kv(x, bits, dtype, scale_factor), dtype)


@dataclass(frozen=True)
class QuantizedStorage:
    """A `parity.deploy.kvcache.KVStorage` holding TurboMind's u8/u4 codes with a scale and zero per token and
    head (in `dtype`): the decode path's cache with `--quant-policy`."""

    bits: int
    dtype: torch.dtype = torch.float16
    device: torch.device = torch.device("cpu")
    scale_factor: float = 1.0  # fault catalogue only

    @property
    def name(self) -> str:
        return f"u{self.bits} ({str(self.dtype).replace('torch.', '')} scale and zero)"

    def alloc(self, kv_heads: int, block_len: int, dim: int) -> dict:
        return {"q": torch.zeros(kv_heads, block_len, dim, dtype=torch.uint8),
                "scale": torch.zeros(kv_heads, block_len, 1, dtype=self.dtype),
                "zero": torch.zeros(kv_heads, block_len, 1, dtype=self.dtype)}

    def write(self, block: dict, offset: int, x: torch.Tensor) -> None:
        kv = quantize_kv(x.detach().cpu(), self.bits, self.dtype, self.scale_factor)
        n = x.shape[1]
        block["q"][:, offset: offset + n] = kv.q
        block["scale"][:, offset: offset + n] = kv.scale
        block["zero"][:, offset: offset + n] = kv.zero

    def read(self, block: dict, n: int) -> torch.Tensor:
        kv = KVQuant(block["q"][:, :n], block["scale"][:, :n], block["zero"][:, :n], self.bits)
        return dequantize_kv(kv, self.dtype).float().to(self.device)

    def nbytes(self, block: dict) -> int:
        # what TurboMind allocates: bits per value plus the two T-sized parameters per token and head
        q = block["q"]
        return q.numel() * self.bits // 8 + 2 * block["scale"].numel() * block["scale"].element_size()
