"""The model side of the deployment audit, read without building the model.

A genuine XComposer2 model cannot be built without its weights: its `__init__` downloads the CLIP ViT by hub
id, which fails on the meta device and needs the HF cache otherwise. So the audit reads what the folder
says about itself:

- the safetensors headers (names, shapes; `model.safetensors.index.json` for shards): every PLoRA linear per
  layer and its rank (`Plora_A` rows), q/k/v biases, the vision tower's geometry (position table, patch
  size, width), the projector, XComposer2.5 task LoRAs (`lora_web_A`, `lora_sft_A`, ...);
- the remote code's classes: one decoder layer, found through the model class's `_no_split_modules`, built
  alone with empty weights (it downloads nothing), gives each linear's rank and scale as the code passes them
  at its call sites (ranks live in code, not in config.json);
- config.json: `img_size` and the attention shape.

What cannot be read is listed in `ModelSide.missing`; the audit then ends INCOMPLETE, never OK.
"""

from __future__ import annotations

import json
import math
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..checkpoint import safetensors_headers
from ..names import QWEN2_QKV_PART, canonical_linear

_LAYER_RE = re.compile(r"^(?:.*\.)?layers\.(?P<layer>\d+)\.(?P<local>.+)\.Plora_A\.weight$")
# XComposer2.5's extra LoRAs per PLoRA linear, merged per task by lmdeploy's merge_xcomposer2d5_task.py
TASK_LORAS = {"lora_web": "web", "lora_sft": "write", "lora_dpo": "write"}
_TASK_RE = re.compile(r"\.(?P<name>lora_(?:web|sft|dpo))_A\.weight$")
_VIT = "vit.vision_tower.vision_model."
_HUB_ID_RE = re.compile(r"""["']([A-Za-z0-9][\w.-]*/[\w.-]*clip[\w.-]*)["']""", re.IGNORECASE)


@dataclass
class ModelSide:
    linears: dict[tuple[int, str], tuple[int, float]] = field(default_factory=dict)  # (layer, canonical) -> (r, s)
    bias: bool = False
    vision: dict[str, Any] = field(default_factory=dict)       # the vision path (empty: the model has none)
    task_loras: dict[str, int] = field(default_factory=dict)    # "lora_web" -> linears carrying it
    checkpoint_dtypes: list[str] = field(default_factory=list)  # safetensors dtypes of the linears' weights
    code_ranks: dict[str, tuple[int, float]] = field(default_factory=dict)  # canonical -> (r, s) from the code
    rank_conflicts: list[str] = field(default_factory=list)     # checkpoint rank != the code's rank
    missing: list[str] = field(default_factory=list)            # what could not be inspected, and why
    read: list[str] = field(default_factory=list)               # what was read


def _layer_class(model_cls):
    """The decoder-layer class the model class names in `_no_split_modules`, from the code's own modules."""
    names = list(getattr(model_cls, "_no_split_modules", None) or [])
    package = model_cls.__module__.rsplit(".", 1)[0]
    modules = [sys.modules[model_cls.__module__]] + [m for k, m in list(sys.modules.items())
                                                      if k.startswith(package + ".") and m is not None]
    for name in names:
        for module in modules:
            cls = getattr(module, name, None)
            if isinstance(cls, type):
                return cls
    return None


def code_linears(path: Path) -> tuple[dict[str, tuple[int, float]], bool, str | None]:
    """canonical linear -> (rank, scale) as one decoder layer of the model's code builds it; whether its q/k/v
    have a bias; or the reason it could not be built."""
    import warnings

    from transformers import AutoConfig
    from transformers.dynamic_module_utils import get_class_from_dynamic_module

    try:
        cfg = json.loads((path / "config.json").read_text())
        ref = (cfg.get("auto_map") or {}).get("AutoModelForCausalLM") or (cfg.get("auto_map") or {}).get("AutoModel")
        if not ref:
            return {}, False, "config.json has no auto_map naming the model class"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            config = AutoConfig.from_pretrained(str(path), trust_remote_code=True)
            model_cls = get_class_from_dynamic_module(ref, str(path))
    except Exception as e:
        return {}, False, f"its code could not be imported ({type(e).__name__}: {str(e)[:200]})"
    layer_cls = _layer_class(model_cls)
    if layer_cls is None:
        named = list(getattr(model_cls, "_no_split_modules", None) or [])
        return {}, False, (f"{model_cls.__name__}._no_split_modules ({named}) names no decoder-layer class defined "
                           f"in the model's code ({model_cls.__module__.rsplit('.', 1)[-1]}.py and its imports)")
    from accelerate import init_empty_weights

    layer = None
    errors = []
    for args in ((config,), (config, 0)):
        try:
            with init_empty_weights(), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                layer = layer_cls(*args)
            break
        except Exception as e:
            errors.append(f"{type(e).__name__}: {str(e)[:200]}")
    if layer is None:
        return {}, False, f"{layer_cls.__name__} could not be built from config.json ({'; '.join(errors)})"
    out: dict[str, tuple[int, float]] = {}
    qkv: list[tuple[int, float]] = []
    bias = False
    for local, m in layer.named_modules():
        if not (hasattr(m, "Plora_A") and hasattr(m, "Plora_B")):
            continue
        r = int(m.Plora_A.weight.shape[0])
        s = float(m.lora_scaling) if hasattr(m, "lora_scaling") else float(m.lora_alpha) / float(m.lora_r)
        if local in QWEN2_QKV_PART:
            qkv.append((r, s))
            bias = bias or getattr(m, "bias", None) is not None
        elif canonical_linear(local):
            out[canonical_linear(local)] = (r, s)
            if local == "attention.wqkv":
                bias = getattr(m, "bias", None) is not None
    if qkv:  # separate q/k/v: one fused wqkv of rank r_q + r_k + r_v, scales folded into B (anatomy.FusedQKV)
        out["attention.wqkv"] = (sum(r for r, _ in qkv), 1.0)
    return out, bias, None


def _hub_ids(path: Path) -> list[str]:
    ids: set[str] = set()
    for f in path.glob("*.py"):
        try:
            ids.update(_HUB_ID_RE.findall(f.read_text(errors="replace")))
        except OSError:
            pass
    return sorted(ids)


def _hub_status(hub_id: str) -> str:
    from ..reference.modelcode import provided

    local = provided().get(hub_id)
    if local is not None:
        return f"provided at {local}"
    try:
        from huggingface_hub import try_to_load_from_cache

        hit = try_to_load_from_cache(hub_id, "config.json")
    except Exception:
        hit = None
    return f"in the offline cache ({Path(hit).parent})" if isinstance(hit, str) else "MISSING from the offline cache"


def vision_path(cfg: dict[str, Any], headers: dict[str, dict[str, Any]], path: Path) -> dict[str, Any]:
    """The image path as the checkpoint and config describe it (empty when there is no ViT in the weights)."""
    pos = headers.get(_VIT + "embeddings.position_embedding.weight")
    patch = headers.get(_VIT + "embeddings.patch_embedding.weight")
    if not pos or not patch:
        return {}
    rows, width = pos["shape"][0], pos["shape"][1]
    grid = math.isqrt(rows - 1)
    p = patch["shape"][-1]
    proj_in = (headers.get("vision_proj.0.weight") or {}).get("shape")
    layers = {int(m.group(1)) for n in headers if (m := re.match(re.escape(_VIT) + r"encoder\.layers\.(\d+)\.", n))}
    out: dict[str, Any] = {
        "vit_width": width, "vit_layers": len(layers), "patch_size": p,
        "position_grid": f"{grid}x{grid}" if grid * grid + 1 == rows else f"{rows - 1} positions (not square)",
        "pixels": grid * p, "img_size": cfg.get("img_size"), "rows_per_image": grid * grid,
        # 4KHD / 2.5 (separators present): the ViT's patches are merged 2 x 2 into one row of 4 x its width
        "merge": 4 if "plora_glb_GN" in headers else 1,
        "projector": f"{proj_in[1]} -> {proj_in[0]}" if proj_in else None,
        "separators": [n for n in ("plora_glb_GN", "plora_sub_GN") if n in headers],
        "hub_ids": {h: _hub_status(h) for h in _hub_ids(path)},
    }
    return out


def read_model_side(path: Path, cfg: dict[str, Any]) -> ModelSide:
    side = ModelSide()
    headers, problems = safetensors_headers(path)
    side.missing += problems
    if headers:
        side.read.append(f"safetensors headers ({len(headers)} tensors)")
    dtypes: set[str] = set()
    ranks: dict[tuple[int, str], int] = {}
    qkv_ranks: dict[int, int] = {}
    for name, entry in headers.items():
        m = _LAYER_RE.match(name)
        if m:
            layer, local = int(m.group("layer")), m.group("local")
            canon = canonical_linear(local)
            if canon is None:
                continue
            if local in QWEN2_QKV_PART:
                qkv_ranks[layer] = qkv_ranks.get(layer, 0) + int(entry["shape"][0])
            else:
                ranks[(layer, canon)] = int(entry["shape"][0])
            base = headers.get(name.replace(".Plora_A.weight", ".weight"))
            if base:
                dtypes.add(str(base["dtype"]))
            if local in QWEN2_QKV_PART or local == "attention.wqkv":
                side.bias = side.bias or name.replace(".Plora_A.weight", ".bias") in headers
            continue
        t = _TASK_RE.search(name)
        if t:
            side.task_loras[t.group("name")] = side.task_loras.get(t.group("name"), 0) + 1
    for layer, r in qkv_ranks.items():
        ranks[(layer, "attention.wqkv")] = r
    side.checkpoint_dtypes = sorted(dtypes)

    code, code_bias, why = code_linears(path)
    if why:
        side.missing.append(f"PLoRA scales: {why}")
    else:
        side.read.append("the remote code's decoder layer (ranks and scales at its call sites)")
        side.code_ranks = code
        side.bias = side.bias or (code_bias and not headers)
    for key, r in sorted(ranks.items()):
        if key[1] in code:
            cr, s = code[key[1]]
            side.linears[key] = (r, s)
            if cr != r:
                side.rank_conflicts.append(f"layer {key[0]} {key[1]}: checkpoint rank {r}, the code builds {cr}")
    if not headers and code:  # no headers to read: the code's ranks for every layer
        for layer in range(int(cfg.get("num_hidden_layers") or 0)):
            for canon, rs in code.items():
                side.linears[(layer, canon)] = rs
    if headers and not ranks and code:
        side.missing.append("the checkpoint has no Plora_A tensors under a `layers.<i>.` name although the code "
                            "builds PLoRA linears")
    side.vision = vision_path(cfg, headers, path)
    if side.vision:
        side.read.append("the vision tower's tensors and config.json's img_size")
    return side
