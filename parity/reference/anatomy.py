"""Find the parts of a loaded HF model structurally, so users' real checkpoints work, not only fixtures.

A PLoRA linear is any module with `Plora_A` and `Plora_B` children. Its qualified name tells the decoder
layer (`...layers.{i}.`) and, through `LINEAR_ALIASES`, the canonical point. Norms, the final norm, the
LM head and the embedding table are found by name among a few known spellings.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch
from torch import nn

from ..errors import ParityInputError

# Known spellings of each canonical linear (XComposer2 / InternLM2 first).
LINEAR_ALIASES: dict[str, str] = {
    "attention.wqkv": "attention.wqkv",
    "attention.wo": "attention.wo",
    "feed_forward.w1": "feed_forward.w1",
    "feed_forward.w3": "feed_forward.w3",
    "feed_forward.w2": "feed_forward.w2",
    "self_attn.o_proj": "attention.wo",
    "mlp.gate_proj": "feed_forward.w1",
    "mlp.up_proj": "feed_forward.w3",
    "mlp.down_proj": "feed_forward.w2",
}
NORM_ALIASES: dict[str, str] = {
    "attention_norm": "attention_norm",
    "input_layernorm": "attention_norm",
    "ffn_norm": "ffn_norm",
    "post_attention_layernorm": "ffn_norm",
}
_LAYER_RE = re.compile(r"^(?P<prefix>.*layers)\.(?P<index>\d+)\.(?P<local>.+)$")


@dataclass
class PloraLinear:
    layer: int
    point: str                 # canonical name, e.g. "attention.wqkv"
    qualname: str              # name in the HF model
    module: nn.Module

    @property
    def rank(self) -> int:
        return int(self.module.Plora_A.weight.shape[0])

    @property
    def scale(self) -> float:
        m = self.module
        if hasattr(m, "lora_scaling"):
            return float(m.lora_scaling)
        return float(m.lora_alpha) / float(m.lora_r)


@dataclass
class Anatomy:
    layers: list[nn.Module]
    linears: dict[int, dict[str, PloraLinear]]          # layer -> point -> linear
    norms: dict[int, dict[str, nn.Module]]              # layer -> "attention_norm"|"ffn_norm" -> module
    final_norm: nn.Module
    lm_head: nn.Module
    embed_tokens: nn.Module
    layer_prefix: str
    unknown_linears: list[str] = field(default_factory=list)

    @property
    def num_layers(self) -> int:
        return len(self.layers)


def _find(model: nn.Module, names: tuple[str, ...], what: str) -> nn.Module:
    mods = dict(model.named_modules())
    for n in names:
        if n in mods:
            return mods[n]
    raise ParityInputError(
        f"The model has no {what} module under any of the names {', '.join(names)}; parity finds XComposer2-"
        "style models structurally but needs these parts to exist."
    )


def discover(model: nn.Module, source: str = "the model") -> Anatomy:
    linears: dict[int, dict[str, PloraLinear]] = {}
    unknown: list[str] = []
    prefix = None
    for name, mod in model.named_modules():
        if not (hasattr(mod, "Plora_A") and hasattr(mod, "Plora_B")):
            continue
        m = _LAYER_RE.match(name)
        if not m:
            unknown.append(name)
            continue
        prefix = m["prefix"]
        point = LINEAR_ALIASES.get(m["local"])
        if point is None:
            unknown.append(name)
            continue
        linears.setdefault(int(m["index"]), {})[point] = PloraLinear(int(m["index"]), point, name, mod)
    if not linears:
        raise ParityInputError(
            f"{source} has no PLoRA linears (modules with `Plora_A` and `Plora_B` children inside "
            "`...layers.N.`); parity compares partial-LoRA models such as InternLM-XComposer2 and needs them."
        )
    layer_list = model.get_submodule(prefix)
    layers = list(layer_list)
    norms: dict[int, dict[str, nn.Module]] = {}
    for i, layer in enumerate(layers):
        found = {}
        for n, child in layer.named_modules():
            if n in NORM_ALIASES:
                found[NORM_ALIASES[n]] = child
        if set(found) != {"attention_norm", "ffn_norm"}:
            raise ParityInputError(
                f"{source}: layer {i} has no attention/FFN norms under the names {', '.join(NORM_ALIASES)}."
            )
        norms[i] = found
    parent = prefix.rsplit(".", 1)[0] if "." in prefix else ""
    base = parent + "." if parent else ""
    return Anatomy(
        layers=layers,
        linears=linears,
        norms=norms,
        final_norm=_find(model, (base + "norm",), "final norm"),
        lm_head=_find(model, ("output", "lm_head"), "LM head"),
        embed_tokens=_find(model, (base + "tok_embeddings", base + "embed_tokens"), "token embedding"),
        layer_prefix=prefix,
        unknown_linears=unknown,
    )


def is_plora_model_class(model: nn.Module) -> bool:
    return any(hasattr(m, "Plora_A") for m in model.modules())


def torch_dtype(name: str) -> torch.dtype:
    return {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16,
            "float16": torch.float16}[name]
