"""Proposal: run the float64 noise-floor forward on the loaded float32 model, one layer at a time, instead
of keeping a float64 deep copy of the whole model.

Today `ReferenceModel.with_dtype(torch.float64)` (parity/reference/loader.py) does
`copy.deepcopy(self.model).to(float64)`: the session then holds the fp32 model AND an fp64 copy, 3x the
fp32 weights (for an 8-layer 7B-shaped model with its 92,544-token vocabulary: 10.6 GB + 21 GB; for a full
7B model 32 GB + 64 GB). The floor only ever needs one layer in fp64 at a time.

`streaming_with_dtype(ref, dtype)` returns a `ReferenceModel` that shares the fp32 module. Forward
pre-hooks on every decoder layer, the final norm and the LM head cast that module's parameters to the
dtype of the activations it receives (fp64 in a floor run; nothing to do in an fp32 run) and the
post-hooks cast them back; buffers are restored from the originals (not re-cast), so state a forward
recomputes (e.g. upstream's rotary cos/sin cache) never leaks from the fp64 run into the fp32 one.
fp32 -> fp64 -> fp32 (and bf16 -> fp64 -> bf16) is exact, so the fp32 model is bit-for-bit unchanged
after each module, and the fp64 values are exactly those of the deep copy's (the weights are the same
fp32 values upcast): the benchmark checks the logits are bit-identical to the deep copy's.

Memory: one layer's fp64 weights (1.9 GB for 7B shapes) plus the LM head's while it runs (3.0 GB at a
92,544 vocabulary), instead of 2x the whole model. Time: one upcast and one downcast of each layer per
floor forward (~2-4 % of an fp64 layer forward here).

How to adopt: make `ReferenceModel.with_dtype` (loader.py) do this instead of the deep copy (install the
hooks once per model; `ReferenceSession.floor_model` is unchanged). Everything else in the floor forward
(the attention mask, rotary) already follows the input dtype, as the deep copy relies on too.
"""

from __future__ import annotations

from dataclasses import replace

import torch
from torch import nn

_INSTALLED = "_parity_streaming_cast_hooks"


def _first_float(args, kwargs) -> torch.dtype | None:
    for v in list(args) + list(kwargs.values()):
        if isinstance(v, torch.Tensor) and v.is_floating_point():
            return v.dtype
    return None


def _install(module: nn.Module, home: torch.dtype) -> None:
    if getattr(module, _INSTALLED, None):
        return
    saved: dict[str, torch.Tensor] = {}

    def pre(mod, args, kwargs):
        dt = _first_float(args, kwargs)
        if dt is None or dt == home or not dt.is_floating_point:
            return None
        saved.clear()
        for name, buf in mod.named_buffers():
            saved[name] = buf
        with torch.no_grad():
            for p in mod.parameters():
                p.data = p.data.to(dt)
        return None

    def post(mod, args, kwargs, output):
        if not saved and all(p.dtype == home for p in mod.parameters()):
            return None
        with torch.no_grad():
            for p in mod.parameters():
                if p.dtype != home:
                    p.data = p.data.to(home)
        for name, buf in saved.items():
            owner, _, leaf = name.rpartition(".")
            target = mod.get_submodule(owner) if owner else mod
            target._buffers[leaf] = buf
        saved.clear()
        return None

    h1 = module.register_forward_pre_hook(pre, with_kwargs=True)
    h2 = module.register_forward_hook(post, with_kwargs=True, always_call=True)
    setattr(module, _INSTALLED, (h1, h2))


def streaming_with_dtype(ref, dtype: torch.dtype):
    """A ReferenceModel running `dtype` on `ref`'s own module, one layer's weights cast at a time."""
    if dtype == ref.dtype:
        return ref
    a = ref.anatomy
    for m in list(a.layers) + [a.final_norm, a.lm_head]:
        _install(m, ref.dtype)
    return replace(ref, dtype=dtype)


def remove_hooks(ref) -> None:
    a = ref.anatomy
    for m in list(a.layers) + [a.final_norm, a.lm_head]:
        hs = getattr(m, _INSTALLED, None)
        if hs:
            for h in hs:
                h.remove()
            delattr(m, _INSTALLED)
