"""The replay's KV cache, laid out and stored the way TurboMind 0.7.1 keeps it.

TurboMind writes each token's keys *after* the rotary embedding (`ProcessKV_v2`, `kv_cache_utils_v2.cu`) into
fixed-size blocks of `cache_block_seq_len` tokens (`attention_config`, 64 by default), one block holding, per
layer, `[2 (k, v), kv_head_num, block_seq_len, size_per_head]`; blocks are taken from the block manager as a
sequence grows, and a sequence may hold at most `session_len` tokens (`model_config`). With `quant_policy` 0
the values are stored in the activation dtype T (the weight dtype); 4 and 8 store integers with a scale and
zero point per token and head. Attention, prefill included, reads keys and values back from the cache.

How values are stored is a `KVStorage`, so a quantized storage (`--quant-policy`:
`parity.quant.kv.QuantizedStorage`) plugs in without touching the cache or the decoder. The cache never holds
more than the tokens written to it (plus one partly filled block per layer), which is what keeps a long
decode's memory bounded by the cache itself.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from ..errors import ParityInputError


class KVStorage(Protocol):
    """How one block of keys (or values) is held. `write`/`read` take and give float32 `[kv_heads, n, dim]`."""

    name: str

    def alloc(self, kv_heads: int, block_len: int, dim: int) -> Any: ...

    def write(self, block: Any, offset: int, x: torch.Tensor) -> None: ...

    def read(self, block: Any, n: int) -> torch.Tensor: ...

    def nbytes(self, block: Any) -> int: ...


@dataclass(frozen=True)
class DtypeStorage:
    """`quant_policy` 0: values rounded to one floating dtype (T in emulate mode, float32 in fp32 mode)."""

    dtype: torch.dtype
    device: torch.device = torch.device("cpu")

    @property
    def name(self) -> str:
        return str(self.dtype).replace("torch.", "")

    def alloc(self, kv_heads: int, block_len: int, dim: int) -> torch.Tensor:
        return torch.zeros(kv_heads, block_len, dim, dtype=self.dtype, device=self.device)

    def write(self, block: torch.Tensor, offset: int, x: torch.Tensor) -> None:
        block[:, offset: offset + x.shape[1]] = x.to(self.dtype)

    def read(self, block: torch.Tensor, n: int) -> torch.Tensor:
        return block[:, :n].float()

    def nbytes(self, block: torch.Tensor) -> int:
        return block.numel() * block.element_size()


class SessionFull(Exception):
    """The sequence reached `session_len`: TurboMind ends the request there (finish reason "length")."""


@dataclass
class _LayerCache:
    k: list[Any] = field(default_factory=list)
    v: list[Any] = field(default_factory=list)
    length: int = 0


class KVCache:
    """One sequence's cache for every layer: blocks of `block_len` tokens, at most `capacity` tokens."""

    def __init__(self, num_layers: int, kv_heads: int, dim: int, storage: KVStorage, capacity: int,
                 block_len: int = 64):
        if block_len <= 0 or capacity <= 0:
            raise ValueError(f"KV cache needs a positive block length and capacity, got {block_len}, {capacity}.")
        self.kv_heads, self.dim, self.storage = kv_heads, dim, storage
        self.capacity, self.block_len = capacity, block_len
        self._layers = [_LayerCache() for _ in range(num_layers)]

    def length(self, layer: int = 0) -> int:
        return self._layers[layer].length

    def room(self, layer: int = 0) -> int:
        return self.capacity - self._layers[layer].length

    def append(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store `n` tokens' keys and values (float32 `[n, kv_heads, dim]`, keys already rotated)."""
        lc = self._layers[layer]
        n = k.shape[0]
        if lc.length + n > self.capacity:
            raise SessionFull(f"{lc.length} + {n} tokens exceed session_len {self.capacity}")
        kt, vt = k.transpose(0, 1), v.transpose(0, 1)  # [kv_heads, n, dim]
        done = 0
        while done < n:
            pos = lc.length + done
            b, off = divmod(pos, self.block_len)
            if b == len(lc.k):
                lc.k.append(self.storage.alloc(self.kv_heads, self.block_len, self.dim))
                lc.v.append(self.storage.alloc(self.kv_heads, self.block_len, self.dim))
            take = min(n - done, self.block_len - off)
            self.storage.write(lc.k[b], off, kt[:, done: done + take])
            self.storage.write(lc.v[b], off, vt[:, done: done + take])
            done += take
        lc.length += n

    def read(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Every stored token's keys and values as float32 `[kv_heads, length, dim]` (what attention reads)."""
        lc = self._layers[layer]
        ks, vs = [], []
        for b in range(len(lc.k)):
            n = min(self.block_len, lc.length - b * self.block_len)
            ks.append(self.storage.read(lc.k[b], n))
            vs.append(self.storage.read(lc.v[b], n))
        if not ks:
            empty = torch.zeros(self.kv_heads, 0, self.dim, device=getattr(self.storage, "device", None))
            return empty, empty.clone()
        return torch.cat(ks, dim=1), torch.cat(vs, dim=1)

    def nbytes(self) -> int:
        return sum(self.storage.nbytes(b) for lc in self._layers for b in lc.k + lc.v)


def session_len(workspace) -> int:
    """`model_config.session_len` of a workspace's config.yaml: the most tokens one sequence may hold."""
    value = (getattr(workspace, "config", None) or {}).get("model_config", {}).get("session_len")
    if value is None:
        raise ParityInputError(
            f"{workspace.weights_dir}/config.yaml has no model_config.session_len; decoding needs it (the most "
            "tokens TurboMind keeps for one sequence).")
    return _positive_int(workspace, "model_config.session_len", value)


def _positive_int(workspace, key: str, value: Any) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ParityInputError(f"{workspace.weights_dir}/config.yaml {key} is {value!r}; expected a positive integer.")
    return value


def block_len(workspace) -> int:
    """`attention_config.cache_block_seq_len` (TurboMind's default 64 when absent)."""
    value = (getattr(workspace, "attention", None) or {}).get("cache_block_seq_len", 64) or 64
    return _positive_int(workspace, "attention_config.cache_block_seq_len", value)
