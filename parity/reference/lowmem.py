"""Load a checkpoint too large for float32 memory: float32 *construction*, checkpoint-dtype *storage*.

A 7B model in float32 is 28 GB, over a 24 GiB machine. Loading it in bfloat16 instead is not faithful:
remote code computes some buffers at construction in the load dtype (XComposer2's rotary cos/sin cache),
so a "float32" reference would carry bfloat16 rotary tables. Here the model is built in float32 with its
parameters on the meta device — every buffer is computed exactly as a float32 load computes it — and the
checkpoint's tensors are then assigned as the parameters, in their stored dtype. Computation is upcast one
decoder layer at a time (parity.reference.precision), so results equal a float32 load bit for bit.
"""

from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import torch
from safetensors import safe_open
from torch import nn

from ..errors import ParityInputError
from ..patching import patched


@contextmanager
def _parameters_on_meta() -> Iterator[None]:
    """Like accelerate's init_empty_weights(include_buffers=False): parameters on meta, buffers real."""
    original = nn.Module.register_parameter

    def register(module, name, param):
        original(module, name, param)
        if param is not None:
            p = module._parameters[name]
            module._parameters[name] = nn.Parameter(p.to("meta"), requires_grad=False)

    with patched(nn.Module, "register_parameter", register):
        yield


def _checkpoint_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.is_file():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [path / n for n in names]
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise ParityInputError(f"Model folder {path} has no *.safetensors files; low-memory loading needs them.")
    return files


def storage_dtype(path: Path) -> torch.dtype:
    with safe_open(str(_checkpoint_files(path)[0]), "pt") as f:
        return f.get_tensor(next(iter(f.keys()))).dtype


def load_lowmem(path: Path, trust_remote_code: bool) -> nn.Module:
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(str(path), trust_remote_code=trust_remote_code)
    config._attn_implementation = "eager"
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float32)
    try:
        with _parameters_on_meta():
            model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code,
                                                     torch_dtype=torch.float32)
    finally:
        torch.set_default_dtype(previous)
    state: dict[str, torch.Tensor] = {}
    for file in _checkpoint_files(path):
        with safe_open(str(file), "pt") as f:
            for key in f.keys():
                state[key] = f.get_tensor(key)
    model.load_state_dict(state, strict=False, assign=True)
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()
    missing = [n for n, p in model.named_parameters() if p.device.type == "meta"]
    if missing:
        raise ParityInputError(
            f"The checkpoint in {path} lacks {len(missing)} parameter(s) the model defines, e.g. {missing[:3]}."
        )
    return model
