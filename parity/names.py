"""The one name table: canonical points <-> HF checkpoint names <-> TurboMind workspace names, and its parser.

Canonical linears are XComposer2's module names (`parity.points.PLORA_LINEARS`), so an XComposer2 checkpoint's
tensor is `model.layers.{i}.{linear}.{kind}` with kind `weight`, `bias`, `Plora_A.weight`, `Plora_B.weight`.
TurboMind (lmdeploy 0.7.1's converter, its LoRA patterns and config.yaml) names the same tensor
`layers.{i}.{tm_linear}.{tm_kind}` ("merged" names: no tensor-parallel rank; `parity.deploy.layout` owns the
rank files). Qwen2-style checkpoints spell the linears and norms their own way; their aliases are here too, so
every stage that meets a name asks this module and no other.
"""

from __future__ import annotations

import re

from .errors import ParityInputError
from .points import PLORA_LINEARS

# canonical linear -> TurboMind's linear (`layers.{i}.` + this, as its LoRA patterns match it)
TM_LINEAR_OF: dict[str, str] = dict(zip(PLORA_LINEARS, (
    "attention.w_qkv", "attention.wo", "feed_forward.w1", "feed_forward.w3", "feed_forward.w2")))
CANONICAL_OF_TM: dict[str, str] = {tm: canon for canon, tm in TM_LINEAR_OF.items()}
# TurboMind's linears in execution order, and in lmdeploy's own (sorted) order: w_qkv, wo, w1, w2, w3
TM_LINEARS_IN_ORDER: tuple[str, ...] = tuple(TM_LINEAR_OF.values())
TM_LINEARS: tuple[str, ...] = tuple(sorted(CANONICAL_OF_TM))
# per-layer norms (the same name on all three sides)
NORMS: tuple[str, ...] = ("attention_norm", "ffn_norm")
# a decoder layer's tensors in execution order (how a workspace's names are listed)
TM_LAYER_ORDER: tuple[str, ...] = (NORMS[0], *TM_LINEARS_IN_ORDER[:2], NORMS[1], *TM_LINEARS_IN_ORDER[2:])

# tensor kinds of a linear: HF -> TurboMind
TM_KIND_OF_HF: dict[str, str] = {"weight": "weight", "bias": "bias", "Plora_A.weight": "lora_a.weight",
                                 "Plora_B.weight": "lora_b.weight"}
HF_KIND_OF_TM: dict[str, str] = {tm: hf for hf, tm in TM_KIND_OF_HF.items()}
TM_LORA_KINDS: tuple[str, ...] = ("lora_a.weight", "lora_b.weight")
HF_LORA_KINDS: tuple[str, ...] = ("Plora_A.weight", "Plora_B.weight")

# tensors outside the layers: TurboMind name -> (XComposer2 checkpoint name, canonical point), in file order
TM_GLOBALS: dict[str, tuple[str, str]] = {
    "tok_embeddings.weight": ("model.tok_embeddings.weight", "embeddings"),
    "norm.weight": ("model.norm.weight", "norm"),
    "output.weight": ("output.weight", "output"),
}

# Qwen2 / Llama spellings: separate q/k/v projections that together are the canonical `attention.wqkv`,
# the other four projections, the norms and the tensors outside the layers.
QWEN2_QKV_PART: dict[str, str] = {"self_attn.q_proj": "q", "self_attn.k_proj": "k", "self_attn.v_proj": "v"}
QWEN2_QKV_PROJECTIONS: tuple[str, ...] = tuple(QWEN2_QKV_PART)
QWEN2_LINEAR_OF: dict[str, str] = {
    "self_attn.o_proj": "attention.wo",
    "mlp.gate_proj": "feed_forward.w1",
    "mlp.up_proj": "feed_forward.w3",
    "mlp.down_proj": "feed_forward.w2",
}
QWEN2_PROJECTIONS: tuple[str, ...] = QWEN2_QKV_PROJECTIONS + tuple(QWEN2_LINEAR_OF)
QWEN2_NORM_OF: dict[str, str] = {"input_layernorm": "attention_norm", "post_attention_layernorm": "ffn_norm"}
QWEN2_GLOBAL_OF: dict[str, str] = {
    "model.embed_tokens.weight": "model.tok_embeddings.weight",
    "model.norm.weight": "model.norm.weight",
    "lm_head.weight": "output.weight",
}
# every known spelling of a canonical linear (one module each; q/k/v are parts, see QWEN2_QKV_PART)
LINEAR_ALIASES: dict[str, str] = {**{lin: lin for lin in PLORA_LINEARS}, **QWEN2_LINEAR_OF}
NORM_ALIASES: dict[str, str] = {"attention_norm": "attention_norm", "input_layernorm": "attention_norm",
                                "ffn_norm": "ffn_norm", "post_attention_layernorm": "ffn_norm"}


def _alternatives(names) -> str:
    return "|".join(re.escape(n) for n in names)


_TM_LINEAR_RE = re.compile(rf"^layers\.(\d+)\.({_alternatives(TM_LINEARS)})\.({_alternatives(TM_KIND_OF_HF.values())})$")
_TM_NORM_RE = re.compile(rf"^layers\.(\d+)\.({_alternatives(NORMS)})\.weight$")
_TM_LOCATION_RE = re.compile(rf"^layers\.(\d+)\.({_alternatives(TM_LINEARS + NORMS)})\.")


def canonical_linear(local: str) -> str | None:
    """A module's name inside a decoder layer -> the canonical linear it is (or is a q/k/v part of)."""
    if local in LINEAR_ALIASES:
        return LINEAR_ALIASES[local]
    return "attention.wqkv" if local in QWEN2_QKV_PART else None


def tm_linear_prefix(layer: int, linear: str) -> str:
    """`layers.{layer}.{tm_linear}` of a canonical linear: the name TurboMind's LoRA patterns match."""
    return f"layers.{layer}.{TM_LINEAR_OF[linear]}"


def parse_tm_name(name: str) -> tuple[int | None, str | None, str]:
    """Merged TurboMind name -> (layer, tm_linear or norm name, kind). Globals give (None, None, name)."""
    m = _TM_LINEAR_RE.match(name)
    if m:
        return int(m.group(1)), m.group(2), m.group(3)
    m = _TM_NORM_RE.match(name)
    if m:
        return int(m.group(1)), m.group(2), "weight"
    if name in TM_GLOBALS:
        return None, None, name
    raise ParityInputError(f"{name!r} is not a TurboMind tensor name this harness knows.")


def is_tm_norm(name: str) -> bool:
    """A per-layer norm's merged TurboMind name (one file: it carries no tensor-parallel rank)."""
    return _TM_NORM_RE.match(name) is not None


def tm_name_location(name: str) -> tuple[int | None, str | None]:
    """`layers.3.attention.w_qkv.lora_b.weight` -> (3, "attention.wqkv"); globals map to their points."""
    m = _TM_LOCATION_RE.match(name)
    if m:
        part = m.group(2)
        return int(m.group(1)), CANONICAL_OF_TM.get(part, part)
    for tm, (_, point) in TM_GLOBALS.items():
        if name.startswith(tm.split(".")[0]):
            return None, point
    return None, None


def hf_name_of_tm(name: str) -> str:
    """Merged TurboMind name -> the XComposer2 checkpoint's name of the same tensor
    (`layers.0.attention.w_qkv.lora_b.weight` -> `model.layers.0.attention.wqkv.Plora_B.weight`)."""
    layer, part, kind = parse_tm_name(name)
    if layer is None:
        return TM_GLOBALS[kind][0]
    if part in NORMS:
        return f"model.layers.{layer}.{part}.weight"
    return f"model.layers.{layer}.{CANONICAL_OF_TM[part]}.{HF_KIND_OF_TM[kind]}"


def qwen2_names_of_tm(name: str) -> str:
    """Merged TurboMind name -> the Qwen2 PLoRA checkpoint's tensor(s) a disguise fuses into it
    (`layers.0.attention.w_qkv.weight` -> `model.layers.0.self_attn.{q,k,v}_proj.weight`). `o_proj.bias` may be
    absent from the original: the disguise then writes the zeros TurboMind's `wo.bias` needs."""
    layer, part, kind = parse_tm_name(name)
    if layer is None:
        return next(q for q, x in QWEN2_GLOBAL_OF.items() if x == TM_GLOBALS[kind][0])
    p = f"model.layers.{layer}."
    if part in NORMS:
        return p + next(q for q, n in QWEN2_NORM_OF.items() if n == part) + ".weight"
    canon, hkind = CANONICAL_OF_TM[part], HF_KIND_OF_TM[kind]
    if canon == "attention.wqkv":
        return p + "self_attn.{" + ",".join(QWEN2_QKV_PART.values()) + "}_proj." + hkind
    return p + next(q for q, c in QWEN2_LINEAR_OF.items() if c == canon) + "." + hkind
