"""Find the parts of a loaded HF model structurally, so users' real checkpoints work, not only fixtures.

A PLoRA linear is any module with `Plora_A` and `Plora_B` children. Its qualified name tells the decoder
layer (`...layers.{i}.`) and, through `LINEAR_ALIASES`, the canonical point. Norms, the final norm, the
LM head and the embedding table are found by name among a few known spellings.

Qwen2-style models have three PLoRA projections `self_attn.{q,k,v}_proj` where XComposer2 has one `wqkv`.
They become one canonical `attention.wqkv` linear whose module is a `FusedQKV` view: the exact XComposer2
equivalent (grouped output columns, fused LoRA `A = cat(A_q, A_k, A_v)`, `B = blockdiag(s_q B_q, s_k B_k,
s_v B_v)` re-packed, scale 1.0 -- `parity.reference.qwen2`). Its rank is r_q + r_k + r_v and its scale 1.0:
what a faithful conversion of the model (`parity disguise`) must make the engine resolve.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch
from torch import nn

from ..errors import ParityInputError
from ..hfconfig import AttnShape, head_dim_of, kv_heads_of
from ..names import LINEAR_ALIASES, NORM_ALIASES, QWEN2_QKV_PART

_LAYER_RE = re.compile(r"^(?P<prefix>.*layers)\.(?P<index>\d+)\.(?P<local>.+)$")


class _Frozen(nn.Module):
    """A bias-free linear over a given weight (the fused LoRA factors of a `FusedQKV`)."""

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.weight = weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.linear(x, self.weight.to(x.dtype))


class FusedQKV(nn.Module):
    """Read-only view of separate q/k/v PLoRA projections as one XComposer2 `wqkv` PLoRA linear.

    Not part of the model (nothing is registered in it). `weight`, `bias`, `Plora_A`, `Plora_B` are computed
    from the parts on access; `forward(x, im_mask)` equals the three projections' outputs in the grouped
    column layout (up to float rounding).
    """

    def __init__(self, q: nn.Module, k: nn.Module, v: nn.Module, heads: int, kv_heads: int, head_dim: int):
        super().__init__()
        object.__setattr__(self, "parts", {"q": q, "k": k, "v": v})  # not registered as children
        self.shape = AttnShape(heads, kv_heads, head_dim)
        self.lora_r = sum(int(m.Plora_A.weight.shape[0]) for m in (q, k, v))
        self.lora_alpha = float(self.lora_r)
        self.lora_scaling = 1.0

    def part_scales(self) -> tuple[float, float, float]:
        return tuple(float(getattr(m, "lora_scaling", None) or m.lora_alpha / m.lora_r)  # type: ignore[misc]
                     for m in self.parts.values())

    @property
    def weight(self) -> torch.Tensor:
        from .qwen2 import fuse_qkv_rows

        return fuse_qkv_rows(*(m.weight for m in self.parts.values()), self.shape)

    @property
    def bias(self) -> torch.Tensor | None:
        from .qwen2 import fuse_qkv_rows

        b = [m.bias for m in self.parts.values()]
        if all(x is None for x in b):
            return None
        b = [x if x is not None else torch.zeros(m.weight.shape[0], dtype=m.weight.dtype, device=m.weight.device)
             for x, m in zip(b, self.parts.values())]
        return fuse_qkv_rows(*b, self.shape)

    def _fused(self) -> tuple[torch.Tensor, torch.Tensor]:
        from .qwen2 import fuse_qkv_lora

        ms = list(self.parts.values())
        a, b = fuse_qkv_lora(tuple(m.Plora_A.weight for m in ms), tuple(m.Plora_B.weight for m in ms),
                             self.part_scales(), self.shape)
        dt = ms[0].Plora_B.weight.dtype
        return a.to(dt), b.to(dt)

    @property
    def Plora_A(self) -> nn.Module:  # noqa: N802 - XComposer2's name
        return _Frozen(self._fused()[0])

    @property
    def Plora_B(self) -> nn.Module:  # noqa: N802 - XComposer2's name
        return _Frozen(self._fused()[1])

    def forward(self, x: torch.Tensor, im_mask: torch.Tensor | None = None) -> torch.Tensor:
        from .qwen2 import fuse_qkv_rows

        q, k, v = (m(x, im_mask) for m in self.parts.values())
        return fuse_qkv_rows(q.reshape(-1, q.shape[-1]).t(), k.reshape(-1, k.shape[-1]).t(),
                             v.reshape(-1, v.shape[-1]).t(), self.shape).t().reshape(*x.shape[:-1], -1)


@dataclass
class PloraLinear:
    layer: int
    point: str                 # canonical name, e.g. "attention.wqkv"
    qualname: str              # name in the HF model (a FusedQKV: "...self_attn.{q,k,v}_proj")
    module: nn.Module

    @property
    def rank(self) -> int:
        if isinstance(self.module, FusedQKV):
            return self.module.lora_r
        return int(self.module.Plora_A.weight.shape[0])

    @property
    def fused(self) -> bool:
        """True for a FusedQKV (separate q/k/v projections seen as one wqkv)."""
        return isinstance(self.module, FusedQKV)

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


def _attn_dims(model: nn.Module, source: str) -> tuple[int, int, int]:
    cfg = getattr(model, "config", None)
    heads = getattr(cfg, "num_attention_heads", None)
    if heads is None:
        raise ParityInputError(
            f"{source} has separate q/k/v PLoRA projections but no config.num_attention_heads; parity needs the "
            "head layout to see them as one XComposer2 wqkv."
        )
    values = cfg.to_dict()
    return int(heads), kv_heads_of(values), head_dim_of(values)


def discover(model: nn.Module, source: str = "the model") -> Anatomy:
    linears: dict[int, dict[str, PloraLinear]] = {}
    qkv_parts: dict[int, dict[str, tuple[str, nn.Module]]] = {}
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
        if m["local"] in QWEN2_QKV_PART:
            qkv_parts.setdefault(int(m["index"]), {})[QWEN2_QKV_PART[m["local"]]] = (name, mod)
            continue
        point = LINEAR_ALIASES.get(m["local"])
        if point is None:
            unknown.append(name)
            continue
        linears.setdefault(int(m["index"]), {})[point] = PloraLinear(int(m["index"]), point, name, mod)
    if qkv_parts:
        heads, kv, head_dim = _attn_dims(model, source)
        for i, parts in sorted(qkv_parts.items()):
            if set(parts) != {"q", "k", "v"}:
                raise ParityInputError(
                    f"{source}: layer {i} has PLoRA on {', '.join(sorted(parts))}_proj only; parity sees q/k/v as "
                    "XComposer2's single wqkv and needs PLoRA on all three (q_proj, k_proj, v_proj)."
                )
            if "attention.wqkv" in linears.get(i, {}):
                raise ParityInputError(f"{source}: layer {i} has both a wqkv and separate q/k/v PLoRA projections.")
            view = FusedQKV(parts["q"][1], parts["k"][1], parts["v"][1], heads, kv, head_dim)
            qual = parts["q"][0][: -len("q_proj")] + "{q,k,v}_proj"
            linears.setdefault(i, {})["attention.wqkv"] = PloraLinear(i, "attention.wqkv", qual, view)
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
