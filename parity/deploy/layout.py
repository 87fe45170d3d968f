"""Exact transforms between HF XComposer2 tensors and TurboMind's layout.

HF's `wqkv` output columns are grouped per kv head: (kv, gs + 2, D) with gs = heads // kv_heads query
slots, then one k and one v slot. TurboMind's fused qkv is [q | k | v] with q and k in the adjacent-pair
rotary order (`permute_v2`). These functions act on the last dimension, so they serve both weights stored
[in, out] and activations [rows, out].
"""

from __future__ import annotations

import torch


def rotary_to_pairs(x: torch.Tensor, head_dim: int) -> torch.Tensor:
    """Rotate-half order -> adjacent-pair order, per head, on the last dim (lmdeploy's permute_v2)."""
    n = x.shape[-1] // head_dim
    lead = x.shape[:-1]
    return x.reshape(*lead, n, 2, head_dim // 2).transpose(-1, -2).reshape(*lead, n * head_dim)


def pairs_to_rotary(x: torch.Tensor, head_dim: int) -> torch.Tensor:
    """Inverse of `rotary_to_pairs`."""
    n = x.shape[-1] // head_dim
    lead = x.shape[:-1]
    return x.reshape(*lead, n, head_dim // 2, 2).transpose(-1, -2).reshape(*lead, n * head_dim)


def split_grouped_qkv(x: torch.Tensor, heads: int, kv_heads: int, head_dim: int):
    """HF grouped qkv columns -> (q, k, v) columns, heads in HF order."""
    gs = heads // kv_heads
    lead = x.shape[:-1]
    g = x.reshape(*lead, kv_heads, gs + 2, head_dim)
    q = g[..., :gs, :].reshape(*lead, heads * head_dim)
    k = g[..., gs, :].reshape(*lead, kv_heads * head_dim)
    v = g[..., gs + 1, :].reshape(*lead, kv_heads * head_dim)
    return q, k, v


def join_grouped_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, kv_heads: int, head_dim: int):
    """(q, k, v) columns -> HF grouped qkv columns."""
    gs = heads // kv_heads
    lead = q.shape[:-1]
    qg = q.reshape(*lead, kv_heads, gs, head_dim)
    kg = k.reshape(*lead, kv_heads, 1, head_dim)
    vg = v.reshape(*lead, kv_heads, 1, head_dim)
    return torch.cat([qg, kg, vg], dim=-2).reshape(*lead, (heads + 2 * kv_heads) * head_dim)


def hf_qkv_cols_to_tm(x: torch.Tensor, heads: int, kv_heads: int, head_dim: int, permute: bool = True):
    """HF grouped qkv (last dim) -> TurboMind [q | k | v] with q/k in adjacent-pair rotary order (tp=1)."""
    q, k, v = split_grouped_qkv(x, heads, kv_heads, head_dim)
    if permute:
        q, k = rotary_to_pairs(q, head_dim), rotary_to_pairs(k, head_dim)
    return torch.cat([q, k, v], dim=-1)


def tm_qkv_cols_to_hf(x: torch.Tensor, heads: int, kv_heads: int, head_dim: int, permute: bool = True):
    """Inverse of `hf_qkv_cols_to_tm`."""
    q, k, v = torch.split(x, [heads * head_dim, kv_heads * head_dim, kv_heads * head_dim], dim=-1)
    if permute:
        q, k = pairs_to_rotary(q, head_dim), pairs_to_rotary(k, head_dim)
    return join_grouped_qkv(q, k, v, heads, kv_heads, head_dim)
