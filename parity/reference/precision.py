"""Run the reference at another precision without a second copy of the model.

The noise floor needs the reference in float64 (or the deployment dtype). A cast copy of a 7B model would
cost 56 GB; instead each decoder layer's parameters and buffers are cast just before the layer runs and the
originals put back right after, so only one layer at a time exists in the compute dtype. Everything outside
the decoder layers (final norm, LM head) is cast once for the duration of the forward. Restoring swaps the
original tensors back, so a down-cast (float32 storage, bfloat16 compute) loses nothing.
"""

from __future__ import annotations

from contextlib import ExitStack, contextmanager
from typing import Iterator

import torch
from torch import nn


def _swap(module: nn.Module, dtype: torch.dtype, recurse: bool = True) -> list[tuple[object, str, torch.Tensor]]:
    saved = []
    for p in module.parameters(recurse=recurse):
        if p.is_floating_point() and p.dtype != dtype:
            saved.append((p, "data", p.data))
            p.data = p.data.to(dtype)
    mods = module.modules() if recurse else [module]
    for m in mods:
        for name, b in list(m._buffers.items()):
            if b is not None and b.is_floating_point() and b.dtype != dtype:
                saved.append((m, name, b))
                m._buffers[name] = b.to(dtype)
    return saved


def _restore(saved: list[tuple[object, str, torch.Tensor]]) -> None:
    for owner, name, t in reversed(saved):
        if name == "data":
            owner.data = t
        else:
            owner._buffers[name] = t


@contextmanager
def compute_dtype(model: nn.Module, layers: list[nn.Module], dtype: torch.dtype) -> Iterator[None]:
    """Within the block, `model` computes in `dtype`, one decoder layer at a time."""
    storage = next(model.parameters()).dtype
    if storage == dtype:
        yield
        return
    layer_ids = {id(m) for layer in layers for m in layer.modules()}
    rest: list[tuple[object, str, torch.Tensor]] = []
    for m in model.modules():  # everything outside the decoder layers, once
        if id(m) not in layer_ids:
            rest += _swap(m, dtype, recurse=False)
    pending: dict[int, list] = {}

    def before(i):
        def hook(module, args, kwargs):
            pending[i] = _swap(module, dtype)
        return hook

    def after(i):
        def hook(module, args, output):
            _restore(pending.pop(i, []))
        return hook

    with ExitStack() as stack:
        for i, layer in enumerate(layers):
            stack.callback(layer.register_forward_pre_hook(before(i), with_kwargs=True).remove)
            # registered first: it must restore after every capture hook has read the layer's output
            stack.callback(layer.register_forward_hook(after(i), prepend=False).remove)
        try:
            yield
        finally:
            for saved in pending.values():
                _restore(saved)
            _restore(rest)
