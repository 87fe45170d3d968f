"""The reference side of a quantized KV cache: the HF model's attention reading K and V back from TurboMind's
u8/u4 cache (`parity.quant.kv`), so a `--quant-policy` deployment is judged against the same model with the
same cache, and the cost of the cache is measured apart.

XComposer2's attention (InternLM2 code, genuine and fixtures alike) passes the rotated K and the V of every kv
head through the module-level `repeat_kv(states [batch, kv_heads, seq, head_dim], n_rep)` right before the
product with Q; the patch quantizes that input per (token, head) and reads it back, exactly where TurboMind
stores the cache (after rotary).
"""

from __future__ import annotations

import contextlib
import sys
from typing import Callable, Iterator

import torch
from torch import nn

from ..errors import ParityInputError
from ..patching import patched
from ..reference.precision import unwidened
from .kv import kv_roundtrip

Quantizer = Callable[[torch.Tensor], torch.Tensor]


def turbomind_kv(bits: int, dtype: torch.dtype, scale_factor: float = 1.0) -> Quantizer:
    """TurboMind's cache round trip of `bits` in the deployment dtype."""
    return lambda x: kv_roundtrip(x, bits, dtype, scale_factor).to(x.dtype)


def ideal_kv(bits: int, dtype: torch.dtype) -> Quantizer:
    """The budget: the same storage format (values, scale and zero in `dtype`, per-(token, head) asymmetric
    `bits`-bit grid) with exact arithmetic in between (float64 division and products, one rounding at the end)."""
    def q(x: torch.Tensor) -> torch.Tensor:
        t = x.to(dtype).double()
        lo, hi = t.amin(-1, keepdim=True), t.amax(-1, keepdim=True)
        step = ((hi - lo) / (2**bits - 1)).to(dtype).double()
        safe = torch.where(step > 0, step, torch.ones_like(step))
        codes = torch.where(step > 0, torch.round((t - lo) / safe).clamp(0, 2**bits - 1), torch.zeros_like(t))
        return (codes * step + lo).to(dtype).to(x.dtype)
    return q


@contextlib.contextmanager
def quantized_kv_cache(model: nn.Module, quantizer: Quantizer | None) -> Iterator[None]:
    """While active, every attention of `model` reads K and V through `quantizer` (None: unchanged)."""
    if quantizer is None:
        yield
        return
    modules = {type(m).__module__ for m in model.modules()}
    owners = [sys.modules[name] for name in sorted(modules)
              if name in sys.modules and callable(getattr(sys.modules[name], "repeat_kv", None))]
    if not owners:
        raise ParityInputError(
            "--quant-policy needs the model's attention to pass K and V through a module-level repeat_kv (InternLM2 "
            "and XComposer2 code do); this model's code has none, so its KV cache cannot be emulated.")
    def wrap(orig):
        def repeat_kv(states, n_rep):
            return orig(unwidened(quantizer)(states), n_rep)  # TurboMind's arithmetic, also in a float64 run
        return repeat_kv

    with contextlib.ExitStack() as stack:
        for mod in owners:
            stack.enter_context(patched(mod, "repeat_kv", wrap(mod.repeat_kv)))
        yield
