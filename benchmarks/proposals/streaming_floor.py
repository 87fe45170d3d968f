"""Proposal: run the float64 noise-floor forward on the loaded model, casting only the modules that run,
one at a time, instead of a float64 copy of the whole model.

History: `ReferenceModel.with_dtype(torch.float64)` used to be `copy.deepcopy(self.model).to(float64)`, 3x
the fp32 weights in memory (an 8-layer 7B-shaped model: 10.6 GB + 21 GB). The project has since adopted a
per-layer cast (`parity/reference/precision.py::compute_dtype`), which the benchmark now measures. What is
left here is the refinement: `compute_dtype` casts *every* module outside the decoder layers for the whole
forward, including `tok_embeddings` (never run: the capture passes `inputs_embeds`; 1.5 GB fp32 -> 3.0 GB
fp64 at XComposer2's 92,544-token vocabulary) and the vision tower. Here forward pre-hooks on each decoder
layer, the final norm and the LM head cast that module's parameters to the dtype of the activations it
receives (float64 in a floor run; nothing to do in an fp32 run) and the post-hooks cast them back; buffers
are restored from the originals (not re-cast), so state a forward recomputes never leaks between runs.
fp32 -> fp64 -> fp32 (and bf16 -> fp64 -> bf16) is exact; the benchmark checks the final-norm output is
bit-identical to the project's floor.

How to adopt: in `compute_dtype`, cast outside the decoder layers only the modules that run in the
forward (final norm, LM head: pre/post hooks as below), and apply the float64 LM head in vocabulary chunks.
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
