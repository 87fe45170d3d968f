"""Qwen2-based PLoRA models and their exact XComposer2 equivalent (names, grouped wqkv, fused LoRA).

A Qwen2 PLoRA model has seven PLoRA projections per layer; XComposer2 (and lmdeploy's xcomposer2 reader)
has five. The mapping (all exact, no rounding when the scale folding is by powers of two):

* `self_attn.o_proj` -> `attention.wo`, `mlp.gate_proj` -> `feed_forward.w1`, `mlp.up_proj` -> `w3`,
  `mlp.down_proj` -> `w2`, `input_layernorm` -> `attention_norm`, `post_attention_layernorm` -> `ffn_norm`,
  `model.embed_tokens` -> `model.tok_embeddings`, `lm_head` -> `output`, `model.norm` as is.
* q/k/v -> one `attention.wqkv` whose output columns are grouped per kv head (gs = heads // kv_heads query
  heads, then that group's k head, then its v head: InternLM2's packing, `parity.deploy.layout`).
* The three LoRAs fuse into one: `A = cat(A_q, A_k, A_v)` (rank r_q + r_k + r_v) and
  `B = blockdiag(s_q B_q, s_k B_k, s_v B_v)` with its rows re-packed into the grouped order. The per-
  projection scales s = alpha / r are folded into B, so the fused linear's scale is exactly 1.0:
  `B (A x) = [s_q B_q A_q x ; s_k B_k A_k x ; s_v B_v A_v x]` (grouped).
  Folding multiplies B by s in float32 and rounds to the checkpoint dtype: exact when s is a power of two.

Nothing here imports the reference or the deployment side; both use it.
"""

from __future__ import annotations

from typing import Any, Mapping

import torch

from ..deploy.layout import join_grouped_qkv, split_grouped_qkv
from ..errors import ParityInputError
from ..hfconfig import AttnShape
from ..names import (HF_LORA_KINDS, QWEN2_GLOBAL_OF, QWEN2_LINEAR_OF, QWEN2_NORM_OF, QWEN2_PROJECTIONS,
                     QWEN2_QKV_PROJECTIONS)

QWEN2_PLORA_ARCH = "Qwen2PLoRAForCausalLM"
PLAIN_QWEN2_ARCH = "Qwen2ForCausalLM"  # transformers' own Qwen2 (PLoRA only with remote code)
XCOMPOSER2_ARCH = "InternLMXComposer2ForCausalLM"

# Tensors outside the language model that the disguise carries over unchanged (the XComposer2 vision part).
VISION_PREFIXES: tuple[str, ...] = ("vit.", "vision_proj.", "plora_glb_GN", "plora_sub_GN")
# Buffers some checkpoints carry that mean nothing to the XComposer2 checkpoint (recomputed by the code).
IGNORED_SUFFIXES: tuple[str, ...] = ("rotary_emb.inv_freq",)


def is_qwen2_plora(cfg: Mapping[str, Any]) -> bool:
    """A Qwen2-based PLoRA checkpoint: our `Qwen2PLoRAForCausalLM`, or `Qwen2ForCausalLM` shipping its own code.

    (A plain `Qwen2ForCausalLM` without `auto_map` is transformers' own Qwen2, which has no PLoRA.)
    """
    archs = cfg.get("architectures") or []
    arch = archs[0] if archs and isinstance(archs, list) else None
    if arch == QWEN2_PLORA_ARCH:
        return True
    auto_map = cfg.get("auto_map") or {}
    if any(XCOMPOSER2_ARCH in str(v) for v in auto_map.values()):
        return False
    return arch == PLAIN_QWEN2_ARCH and isinstance(auto_map, dict) and "AutoModelForCausalLM" in auto_map


# ---------------------------------------------------------------------------------------- fusion math


def _compute_dtype(*ts: torch.Tensor) -> torch.dtype:
    return torch.float64 if any(t.dtype == torch.float64 for t in ts) else torch.float32


def fuse_qkv_rows(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, shape: AttnShape) -> torch.Tensor:
    """q/k/v tensors whose dim 0 is the output (weights [out, in], biases [out], B [out, r]) -> grouped rows."""
    if q.dim() == 1:
        return join_grouped_qkv(q, k, v, shape.heads, shape.kv_heads, shape.head_dim)
    return join_grouped_qkv(q.t(), k.t(), v.t(), shape.heads, shape.kv_heads, shape.head_dim).t().contiguous()


def split_qkv_rows(x: torch.Tensor, shape: AttnShape) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Inverse of `fuse_qkv_rows`."""
    if x.dim() == 1:
        return split_grouped_qkv(x, shape.heads, shape.kv_heads, shape.head_dim)
    q, k, v = split_grouped_qkv(x.t(), shape.heads, shape.kv_heads, shape.head_dim)
    return q.t().contiguous(), k.t().contiguous(), v.t().contiguous()


def fuse_qkv_lora(a: tuple[torch.Tensor, torch.Tensor, torch.Tensor], b: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
                  scales: tuple[float, float, float], shape: AttnShape) -> tuple[torch.Tensor, torch.Tensor]:
    """(A [r_q+r_k+r_v, in], B [out_qkv, r_q+r_k+r_v]) of the fused wqkv LoRA, scales folded into B, B's rows grouped.

    Computed in float32 (float64 when any input is float64); the caller casts to the checkpoint dtype.
    """
    ct = _compute_dtype(*a, *b)
    a_f = torch.cat([t.to(ct) for t in a], dim=0)
    ranks = [int(t.shape[1]) for t in b]
    outs = [int(t.shape[0]) for t in b]
    blocks = torch.zeros(sum(outs), sum(ranks), dtype=ct, device=b[0].device)
    r0 = o0 = 0
    for t, s, r, o in zip(b, scales, ranks, outs):
        blocks[o0:o0 + o, r0:r0 + r] = t.to(ct) * float(s)
        r0 += r
        o0 += o
    q, k, v = torch.split(blocks, outs, dim=0)
    return a_f, fuse_qkv_rows(q, k, v, shape)


# ---------------------------------------------------------------------------------------- whole state dicts


def scale_of(scales: Mapping[Any, float], layer: int, projection: str) -> float:
    """The LoRA scale of `projection` in `layer`: a (layer, projection) entry, else the projection's."""
    if (layer, projection) in scales:
        return float(scales[(layer, projection)])
    if projection in scales:
        return float(scales[projection])
    raise ParityInputError(f"No LoRA scale known for layers.{layer}.{projection}.")


def layer_indices(names) -> list[int]:
    out = set()
    for n in names:
        if n.startswith("model.layers."):
            rest = n[len("model.layers."):]
            idx = rest.split(".", 1)[0]
            if idx.isdigit():
                out.add(int(idx))
    return sorted(out)


def to_xcomposer2(state: Mapping[str, torch.Tensor], shape: AttnShape, scales: Mapping[str, float], *,
                  out_dtype: torch.dtype | None = None, zero_wo_bias: bool | None = None,
                  where: str = "the model") -> dict[str, torch.Tensor]:
    """A Qwen2 PLoRA state dict (Qwen2 names) -> the XComposer2 checkpoint's state dict (InternLM2 names).

    `scales`: projection (e.g. "self_attn.q_proj") or (layer, projection) -> lora_alpha / lora_r. Fused wqkv LoRA as in the module
    docstring; tensors are cast to `out_dtype` (default: each source tensor's own dtype; the fused B takes
    B_q's). `zero_wo_bias` (default: when q/k/v have biases) writes a zero `attention.wo.bias`, because
    XComposer2's config has one `bias` flag for wqkv and wo together. Vision tensors are carried over.
    Unknown tensors raise ParityInputError (they would be lost silently otherwise).
    """
    names = set(state)
    out: dict[str, torch.Tensor] = {}

    def cast(t: torch.Tensor, like: torch.Tensor | None = None) -> torch.Tensor:
        dt = out_dtype or (like.dtype if like is not None else t.dtype)
        return t.to(dt).contiguous()

    def need(name: str) -> torch.Tensor:
        if name not in state:
            raise ParityInputError(
                f"{where} has no tensor {name}; a Qwen2 PLoRA checkpoint needs q/k/v/o_proj and gate/up/down_proj "
                "with Plora_A/Plora_B in every layer."
            )
        return state[name]

    used: set[str] = set()
    for src, dst in QWEN2_GLOBAL_OF.items():
        if src in state:
            out[dst] = cast(state[src])
            used.add(src)
    if "output.weight" not in out and "model.tok_embeddings.weight" in out:  # tied embeddings
        out["output.weight"] = out["model.tok_embeddings.weight"].clone()
    if "model.tok_embeddings.weight" not in out:
        need("model.embed_tokens.weight")
    has_bias = False
    for i in layer_indices(names):
        p, t = f"model.layers.{i}.", f"model.layers.{i}."
        for norm, canon in QWEN2_NORM_OF.items():
            out[f"{t}{canon}.weight"] = cast(need(f"{p}{norm}.weight"))
            used.add(f"{p}{norm}.weight")
        w = [need(f"{p}{q}.weight") for q in QWEN2_QKV_PROJECTIONS]
        a = [need(f"{p}{q}.Plora_A.weight") for q in QWEN2_QKV_PROJECTIONS]
        b = [need(f"{p}{q}.Plora_B.weight") for q in QWEN2_QKV_PROJECTIONS]
        used.update(f"{p}{q}.{k}" for q in QWEN2_QKV_PROJECTIONS for k in ("weight", *HF_LORA_KINDS))
        out[f"{t}attention.wqkv.weight"] = cast(fuse_qkv_rows(*w, shape), w[0])
        a_f, b_f = fuse_qkv_lora(tuple(a), tuple(b), tuple(scale_of(scales, i, q) for q in QWEN2_QKV_PROJECTIONS), shape)
        out[f"{t}attention.wqkv.Plora_A.weight"] = cast(a_f, a[0])
        out[f"{t}attention.wqkv.Plora_B.weight"] = cast(b_f, b[0])
        biases = [state.get(f"{p}{q}.bias") for q in QWEN2_QKV_PROJECTIONS]
        if any(x is not None for x in biases):
            if any(x is None for x in biases):
                raise ParityInputError(
                    f"{where}: layer {i} has a bias on only some of q/k/v_proj; XComposer2's wqkv has one bias for "
                    "all three (expected all or none)."
                )
            has_bias = True
            out[f"{t}attention.wqkv.bias"] = cast(fuse_qkv_rows(*biases, shape), biases[0])
            used.update(f"{p}{q}.bias" for q in QWEN2_QKV_PROJECTIONS)
        for proj, canon in QWEN2_LINEAR_OF.items():
            for kind in ("weight", *HF_LORA_KINDS):
                out[f"{t}{canon}.{kind}"] = cast(need(f"{p}{proj}.{kind}"))
                used.add(f"{p}{proj}.{kind}")
            if f"{p}{proj}.bias" in state:
                if proj != "self_attn.o_proj":
                    raise ParityInputError(
                        f"{where}: {p}{proj}.bias exists, but XComposer2's feed-forward linears have no bias."
                    )
                out[f"{t}attention.wo.bias"] = cast(state[f"{p}{proj}.bias"])
                used.add(f"{p}{proj}.bias")
        if (has_bias if zero_wo_bias is None else zero_wo_bias) and f"{t}attention.wo.bias" not in out:
            wo = out[f"{t}attention.wo.weight"]
            out[f"{t}attention.wo.bias"] = torch.zeros(wo.shape[0], dtype=wo.dtype)
    biased = [i for i in layer_indices(names) if f"model.layers.{i}.attention.wqkv.bias" in out]
    if biased and len(biased) != len(layer_indices(names)):
        raise ParityInputError(
            f"{where}: only layers {biased[:5]} have q/k/v biases; XComposer2's config has one `bias` flag for all "
            "layers (expected biases in every layer or in none)."
        )
    for n in sorted(names - used):
        if n.startswith(VISION_PREFIXES):
            out[n] = cast(state[n]) if state[n].is_floating_point() else state[n]
        elif n.endswith(IGNORED_SUFFIXES):
            continue
        else:
            raise ParityInputError(
                f"{where} has a tensor {n} that has no place in an XComposer2 checkpoint (expected Qwen2 language-"
                "model tensors, vit.* and vision_proj.*); refusing rather than dropping it silently."
            )
    return dict(sorted(out.items()))


def fold_is_exact(b: torch.Tensor, scale: float, dtype: torch.dtype) -> bool:
    """Whether `b * scale`, stored in `dtype`, is exactly the real product (always for powers of two, barring
    under/overflow)."""
    exact = b.to(torch.float64) * float(scale)
    return bool(torch.equal(exact.to(dtype).to(torch.float64), exact))


# ---------------------------------------------------------------------------------------- loaded models


def module_scales(model: torch.nn.Module) -> dict[tuple[int, str], float]:
    """(layer, projection) -> the PLoRA module's `lora_scaling` (or lora_alpha / lora_r), from a loaded model."""
    out: dict[tuple[int, str], float] = {}
    for name, mod in model.named_modules():
        if not (hasattr(mod, "Plora_A") and hasattr(mod, "Plora_B")):
            continue
        for proj in QWEN2_PROJECTIONS:
            if name.endswith("." + proj):
                layer = name[: -len(proj) - 1].rsplit(".", 1)[-1]
                if layer.isdigit():
                    s = getattr(mod, "lora_scaling", None)
                    out[(int(layer), proj)] = float(s if s is not None else mod.lora_alpha / mod.lora_r)
    return out


def xcomposer2_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The model's state dict under XComposer2 names: what `parity.disguise.disguise` writes for this model.

    For a Qwen2 PLoRA model: q/k/v grouped into wqkv, the three LoRAs fused with their scales folded into B
    (computed in float32/float64, kept in the model's dtype), Qwen2 names mapped; for an XComposer2 model
    (no `self_attn.q_proj`): its own state dict. The parity pipeline's weights audit transforms this to
    TurboMind's layout (`hf_to_tm`) and compares it with the workspace.
    """
    state = model.state_dict()
    if not any(n.startswith("model.layers.") and ".self_attn.q_proj.Plora_A." in n for n in state):
        return state
    cfg = model.config.to_dict() if hasattr(model.config, "to_dict") else dict(model.config)
    dtype = next(iter(state.values())).dtype
    return to_xcomposer2(state, AttnShape.from_config(cfg), module_scales(model), out_dtype=dtype, where="the reference model")
