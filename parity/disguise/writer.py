"""`disguise(src, dst)`: write a Qwen2 PLoRA checkpoint as the InternLM-XComposer2 checkpoint lmdeploy deploys.

The output folder is an exact XComposer2 equivalent of the source (same function in HF, float rounding
aside): InternLM2 tensor names, grouped `wqkv`, one fused LoRA for q/k/v with the per-projection scales
folded into `Plora_B` (scale 1.0), `wo`/`w1`/`w3`/`w2` and the norms mapped, the vision tower and projector
carried over unchanged, a config.json lmdeploy reads as XComposer2 (`architectures`, `auto_map`, InternLM2
field names, `plora_config` with the real ranks/alphas), remote code that runs it in HF (parity's
XComposer2 fixture code: PLoRA, the `vit` / `vision_proj` / `encode_img` interface lmdeploy's vision loader
expects), the tokenizer files, and:

* `parity_lora_config.json`: the lora_config that makes TurboMind resolve the disguise's ranks/scales
  (see `parity.disguise.lora`);
* `parity_disguise.json`: the `DisguiseRecord` (what was mapped, what lmdeploy will lose).

Refused (ParityInputError, nothing written): what the disguise cannot represent for lmdeploy 0.7.1 -- a
head_dim other than 128 (the reader splits wqkv with a hard-coded 128), hidden_size != heads * head_dim,
a projection without PLoRA, ranks/scales that vary between layers, an activation other than SiLU, tensors
with no XComposer2 counterpart. Listed as losses (written anyway, kept in the HF disguise so the chain check
shows them): sliding-window attention, inexact scale folding. q/k/v (and o) biases are kept and exported by
lmdeploy when parity's registration is active (attn_bias = 1, see `parity.disguise.lora`).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Mapping

import torch

from ..atomic import replaced_folder
from ..checkpoint import load_state, safetensors_files
from ..errors import ParityInputError
from ..hfconfig import AttnShape, hub_offline, read_hf_config
from ..points import PLORA_LINEARS
from .lora import LORA_CONFIG_FILE, lora_config_for_disguise
from ..names import QWEN2_LINEAR_OF, QWEN2_PROJECTIONS, QWEN2_QKV_PROJECTIONS
from ..reference.qwen2 import (
    XCOMPOSER2_ARCH,
    fold_is_exact,
    is_qwen2_plora,
    layer_indices,
    to_xcomposer2,
)

DISGUISE_RECORD = "parity_disguise.json"
LMDEPLOY_READER_HEAD_DIM = 128
_VIT_FIELDS = ("img_size", "vit_hidden_size", "vit_intermediate_size", "vit_num_layers", "vit_num_heads",
               "vit_patch_size")
# Files of the source folder that are not carried over (the disguise has its own code, config and weights).
_SKIP_SUFFIXES = (".py", ".safetensors", ".bin", ".pt", ".pth")
_SKIP_NAMES = ("config.json", "model.safetensors.index.json", "pytorch_model.bin.index.json", LORA_CONFIG_FILE,
               DISGUISE_RECORD)


@dataclass
class DisguiseRecord:
    """What `disguise` wrote and what lmdeploy will lose (also saved as parity_disguise.json in the folder)."""

    source: str
    destination: str
    source_architecture: str
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    dtype: str
    # projection -> {"rank", "alpha", "scale"} in the source (the same in every layer)
    source_lora: dict[str, dict[str, float]]
    # canonical XComposer2 linear -> {"rank", "alpha", "scale"} in the disguise
    linears: dict[str, dict[str, float]]
    lora_config: dict[str, Any]            # also in parity_lora_config.json
    qkv_bias: bool
    fold_exact: bool                       # scale folding into the fused Plora_B was exact in the checkpoint dtype
    losses: list[str] = field(default_factory=list)   # what lmdeploy 0.7.1 will not reproduce
    notes: list[str] = field(default_factory=list)    # what the user must know (not losses)
    files: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def summary(self) -> str:
        """Plain-text lines for the terminal: where, ranks, the lora_config, the losses."""
        lines = [f"Disguised {self.source} ({self.source_architecture}) as {XCOMPOSER2_ARCH} in {self.destination}."]
        lines.append("LoRA per linear (rank, scale): " + ", ".join(
            f"{k} ({int(v['rank'])}, {v['scale']:g})" for k, v in self.linears.items()))
        lines.append(f"lora_config for lmdeploy (written to {LORA_CONFIG_FILE}): {self.lora_config}")
        if self.losses:
            lines.append(f"Will be LOST when lmdeploy 0.7.1 converts this folder ({len(self.losses)}):")
            lines += [f"  - {x}" for x in self.losses]
        else:
            lines.append("Nothing is lost: lmdeploy 0.7.1 can reproduce this model exactly.")
        lines += [f"Note: {x}" for x in self.notes]
        return "\n".join(lines)


# ------------------------------------------------------------------------------------------ reading the source


def _load_tensors(src: Path) -> dict[str, torch.Tensor]:
    files = safetensors_files(src)
    if not files:
        raise ParityInputError(
            f"{src} has no *.safetensors weights; `parity disguise` reads safetensors checkpoints (convert "
            "pytorch_model*.bin with `save_pretrained(..., safe_serialization=True)` first)."
        )
    return load_state(src, files)


def _scales_from_code(src: Path) -> dict[tuple[int, str], tuple[int, float]]:
    """(layer, projection) -> (rank, scale) read from the model's own code, built on the meta device."""
    hub_offline()
    from transformers import AutoConfig, AutoModelForCausalLM

    from ..reference.qwen2 import module_scales

    try:
        config = AutoConfig.from_pretrained(str(src), trust_remote_code=True)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, trust_remote_code=True)
    except Exception as e:
        raise ParityInputError(
            f"Could not build {src}'s model from its code to read the PLoRA scales ({type(e).__name__}: "
            f"{str(e).splitlines()[0] if str(e) else ''})."
        ) from None
    scales = module_scales(model)
    ranks = {}
    for name, mod in model.named_modules():
        if hasattr(mod, "Plora_A"):
            for proj in QWEN2_PROJECTIONS:
                layer = name[: -len(proj) - 1].rsplit(".", 1)[-1] if name.endswith("." + proj) else ""
                if layer.isdigit():
                    ranks[(int(layer), proj)] = int(mod.Plora_A.weight.shape[0])
    return {k: (ranks[k], s) for k, s in scales.items()}


def _lora_settings(src: Path, cfg: dict, tensors: Mapping[str, torch.Tensor], layers: list[int],
                   scales: Mapping[str, float] | None, trust_remote_code: bool, problems: list[str]
                   ) -> dict[str, tuple[int, float]]:
    """projection -> (rank, alpha); ranks from the tensors, scales from `scales`, config.plora_config or the code."""
    ranks: dict[tuple[int, str], int] = {}
    for i in layers:
        for proj in QWEN2_PROJECTIONS:
            a = tensors.get(f"model.layers.{i}.{proj}.Plora_A.weight")
            b = tensors.get(f"model.layers.{i}.{proj}.Plora_B.weight")
            if a is None or b is None:
                problems.append(
                    f"model.layers.{i}.{proj} has no Plora_A/Plora_B: XComposer2's remote code and lmdeploy's reader "
                    "put a PLoRA on every linear (q/k/v, o, gate, up and down all need one)"
                )
                continue
            ranks[(i, proj)] = int(a.shape[0])
    if problems:
        return {}
    source = None
    per_layer: dict[tuple[int, str], float] = {}
    if scales is not None:
        source = "the scales given to disguise()"
        for proj in QWEN2_PROJECTIONS:
            if proj not in scales:
                raise ParityInputError(f"disguise(scales=...) has no entry for {proj}; expected all of {', '.join(QWEN2_PROJECTIONS)}.")
        per_layer = {(i, p): float(scales[p]) for (i, p) in ranks}
    elif isinstance(cfg.get("plora_config"), dict) and all(p in cfg["plora_config"] for p in QWEN2_PROJECTIONS):
        source = f"{src / 'config.json'} plora_config"
        for (i, p), r in ranks.items():
            entry = cfg["plora_config"][p]
            try:
                r_cfg, alpha = int(entry["r"]), float(entry["alpha"])
            except (KeyError, TypeError, ValueError):
                raise ParityInputError(f"{src / 'config.json'}: plora_config.{p} must be {{\"r\": int, \"alpha\": number}}.") from None
            if r_cfg != r:
                raise ParityInputError(
                    f"{src / 'config.json'}: plora_config.{p}.r = {r_cfg}, but model.layers.{i}.{p}.Plora_A has rank {r}."
                )
            per_layer[(i, p)] = alpha / r
    elif trust_remote_code:
        source = f"{src}'s model code"
        code = _scales_from_code(src)
        for key, r in ranks.items():
            if key not in code or code[key][0] != r:
                raise ParityInputError(f"{src}: the model code builds no PLoRA of rank {r} for layers.{key[0]}.{key[1]}.")
            per_layer[key] = code[key][1]
    else:
        raise ParityInputError(
            f"The PLoRA scales (lora_alpha / lora_r) of {src} are not in its config.json (no plora_config with all "
            f"of {', '.join(QWEN2_PROJECTIONS)}); they usually live in the model's code. Pass trust_remote_code=True "
            "(--trust-remote-code) to read them from the code, or give them explicitly (scales={projection: scale})."
        )
    out: dict[str, tuple[int, float]] = {}
    for proj in QWEN2_PROJECTIONS:
        vals = {(ranks[(i, proj)], per_layer[(i, proj)]) for i in layers}
        if len(vals) > 1:
            problems.append(
                f"{proj} has different LoRA ranks/scales across layers {sorted(vals)} (from {source}); the disguise's "
                "XComposer2 remote code has one setting per linear"
            )
            continue
        r, s = vals.pop()
        out[proj] = (r, s * r)
    return out


# ------------------------------------------------------------------------------------------ the disguise


def _disguise_config(cfg: dict, shape, has_bias: bool, linears: dict[str, tuple[int, float]], dtype: str) -> dict:
    hidden = int(cfg["hidden_size"])
    out = {
        "architectures": [XCOMPOSER2_ARCH],
        "auto_map": {
            "AutoConfig": "configuration_internlm_xcomposer2.InternLMXcomposer2Config",
            "AutoModel": "modeling_internlm_xcomposer2.InternLMXComposer2ForCausalLM",
            "AutoModelForCausalLM": "modeling_internlm_xcomposer2.InternLMXComposer2ForCausalLM",
        },
        "model_type": "internlmxcomposer2",
        "vocab_size": int(cfg["vocab_size"]),
        "hidden_size": hidden,
        "intermediate_size": int(cfg["intermediate_size"]),
        "num_hidden_layers": int(cfg["num_hidden_layers"]),
        "num_attention_heads": shape.heads,
        "num_key_value_heads": shape.kv_heads,
        "hidden_act": "silu",
        "rms_norm_eps": float(cfg.get("rms_norm_eps", 1e-6)),
        "rope_theta": float(cfg.get("rope_theta", 10000.0)),
        "rope_scaling": _rope_scaling(cfg.get("rope_scaling")),
        "max_position_embeddings": int(cfg.get("max_position_embeddings", 32768)),
        "max_length": int(cfg.get("max_position_embeddings", 32768)),
        "initializer_range": cfg.get("initializer_range", 0.02),
        "bias": bool(has_bias),
        "torch_dtype": dtype,
        "bos_token_id": cfg.get("bos_token_id", 1),
        "eos_token_id": cfg.get("eos_token_id", 2),
        "pad_token_id": cfg.get("pad_token_id", 0),
        "tie_word_embeddings": False,
        "use_cache": False,
        "attn_implementation": "eager",
        "plora_config": {lin: {"r": r, "alpha": a} for lin, (r, a) in linears.items()},
        "parity_disguise": {"source_architecture": (cfg.get("architectures") or ["?"])[0]},
    }
    for k in _VIT_FIELDS:
        out[k] = cfg[k]
    return out


def _rope_scaling(rs: Any) -> dict | None:
    """Qwen2's rope_scaling ({"type"|"rope_type", "factor", ...}) in XComposer2's form {"type", "factor"}."""
    if rs is None:
        return None
    return {"type": rs.get("type", rs.get("rope_type")), "factor": rs["factor"]}


def _plain(x: float) -> float | int:
    return int(x) if float(x).is_integer() else float(x)


def disguise(src: str | Path, dst: str | Path, *, trust_remote_code: bool = False,
             scales: Mapping[str, float] | None = None, overwrite: bool = False, quiet: bool = False) -> DisguiseRecord:
    """Write the XComposer2 disguise of the Qwen2 PLoRA model in `src` to `dst` (see the module docstring).

    `scales` (projection -> lora_alpha / lora_r) overrides where the scales come from; otherwise they are
    read from config.json `plora_config`, else (with `trust_remote_code`) from the model's code. `dst` must
    be absent or empty unless `overwrite`. Prints the summary (with the losses) unless `quiet`.
    """
    src, dst = Path(src).resolve(), Path(dst).resolve()
    cfg = read_hf_config(src, "a Hugging Face Qwen2 PLoRA model folder")
    if not is_qwen2_plora(cfg):
        archs = cfg.get("architectures")
        extra = (" It already is an XComposer2 checkpoint: convert it directly." if archs and archs[0] == XCOMPOSER2_ARCH
                 else "")
        raise ParityInputError(
            f"{src / 'config.json'}: architectures={archs} is not a Qwen2 PLoRA model (expected "
            f"Qwen2PLoRAForCausalLM, or Qwen2ForCausalLM with its own remote code in auto_map).{extra}"
        )
    if dst == src:
        raise ParityInputError(f"The disguise must go to a new folder, not the source folder {src}.")
    if dst.exists() and (not dst.is_dir() or any(dst.iterdir())) and not overwrite:
        raise ParityInputError(f"{dst} exists and is not empty; choose a new folder (or pass overwrite=True / --force).")
    shape = AttnShape.from_config(cfg, str(src / "config.json"))
    problems: list[str] = []
    losses: list[str] = []
    notes: list[str] = []
    hidden = int(cfg.get("hidden_size", 0))
    if shape.head_dim != LMDEPLOY_READER_HEAD_DIM:
        problems.append(
            f"head_dim is {shape.head_dim}, but lmdeploy 0.7.1's xcomposer2/internlm2 reader splits wqkv with a "
            f"hard-coded head_dim of 128 (`qkv.view(kv_heads, gs + 2, 128, -1)` in InternLM2Reader._attn), so the "
            f"converted q/k/v heads would be scrambled without any error"
        )
    if hidden != shape.heads * shape.head_dim:
        problems.append(
            f"hidden_size {hidden} != num_attention_heads {shape.heads} x head_dim {shape.head_dim}; InternLM2/"
            "XComposer2 derive head_dim as hidden_size / num_attention_heads"
        )
    if cfg.get("hidden_act", "silu") != "silu":
        problems.append(f"hidden_act is {cfg.get('hidden_act')!r}; TurboMind's FFN is SiLU-gated only")
    rs = cfg.get("rope_scaling")
    if rs is not None and (not isinstance(rs, dict) or rs.get("type", rs.get("rope_type")) not in ("dynamic", "linear")
                           or not isinstance(rs.get("factor"), (int, float))):
        problems.append(f"rope_scaling {rs!r} is not representable (XComposer2 supports none, dynamic or linear)")
    missing_vit = [k for k in _VIT_FIELDS if k not in cfg]
    if missing_vit:
        problems.append(
            f"config.json has no {', '.join(missing_vit)}: the disguise's vision tower (the XComposer2 interface "
            "lmdeploy's vision loader builds: vit with load_model()/resize_pos(), vision_proj) is built from them"
        )
    if problems:
        _refuse(src, problems)

    tensors = _load_tensors(src)
    layers = layer_indices(tensors)
    if len(layers) != int(cfg.get("num_hidden_layers", -1)) or layers != list(range(len(layers))):
        raise ParityInputError(
            f"{src}: the weights hold layers {layers[:3]}...{layers[-3:] if layers else ''} but config.json says "
            f"num_hidden_layers = {cfg.get('num_hidden_layers')}."
        )
    if not any(n.startswith("vit.") for n in tensors) or not any(n.startswith("vision_proj.") for n in tensors):
        problems.append(
            "the weights have no vit.* / vision_proj.* tensors: lmdeploy's XComposer2 vision loader needs `vit` and "
            "`vision_proj` modules"
        )
    lora = _lora_settings(src, cfg, tensors, layers, scales, trust_remote_code, problems)
    if problems:
        _refuse(src, problems)

    src_dtype = tensors[f"model.layers.{layers[0]}.self_attn.q_proj.weight"].dtype
    dtype_name = str(src_dtype).replace("torch.", "")
    proj_scales = {p: a / r for p, (r, a) in lora.items()}
    try:
        state = to_xcomposer2(tensors, shape, proj_scales, where=str(src))
    except ParityInputError as e:
        raise ParityInputError(f"Cannot disguise {src}: {e}") from None

    # losses
    has_bias = any(n.endswith("attention.wqkv.bias") for n in state)
    if has_bias:
        mx = max(float(tensors[f"model.layers.{i}.{q}.bias"].abs().max()) for i in layers for q in QWEN2_QKV_PROJECTIONS)
        notes.append(
            f"q/k/v biases (max |bias| {mx:.3g}) are kept (config bias = true, wqkv.bias; wo.bias as zeros since "
            "XComposer2 has one `bias` flag). lmdeploy 0.7.1's xcomposer2 reader exports them only with attn_bias = 1, "
            f"which parity's registration sets for this folder: convert and serve with `parity convert`, `parity run` "
            "or `parity lmdeploy -- ...` (or register_lora_config() in your own process); plain `lmdeploy convert` "
            "drops them (`parity run` then names it bias_dropped)."
        )
    o_bias = [i for i in layers if f"model.layers.{i}.self_attn.o_proj.bias" in tensors
              and bool(tensors[f"model.layers.{i}.self_attn.o_proj.bias"].abs().max() > 0)]
    if o_bias:
        notes.append(f"o_proj biases (layers {o_bias[:5]}) are written as wo.bias and exported with the q/k/v biases "
                     "(attn_bias = 1); TurboMind adds wo.bias in its residual + RMSNorm kernel.")
    if cfg.get("use_sliding_window"):
        losses.append(
            f"sliding-window attention (sliding_window {cfg.get('sliding_window')}, from layer "
            f"{cfg.get('max_window_layers')}): neither XComposer2 nor TurboMind's xcomposer2 path has it; results match "
            "only for sequences shorter than the window."
        )
    fold_exact = True
    for i in layers:
        for q in QWEN2_QKV_PROJECTIONS:
            b = tensors[f"model.layers.{i}.{q}.Plora_B.weight"]
            fold_exact &= fold_is_exact(b, proj_scales[q], b.dtype)
    if not fold_exact:
        losses.append(
            f"folding the q/k/v LoRA scales {[proj_scales[q] for q in QWEN2_QKV_PROJECTIONS]} into the fused Plora_B rounds "
            f"it to {dtype_name} (a scale that is not a power of two, or a power of two below 1 applied to {dtype_name} "
            f"subnormals): a last-bit change of the LoRA on image rows."
        )
    if rs is not None:
        notes.append(
            f"rope_scaling {rs!r} is carried over as XComposer2's {_rope_scaling(rs)!r}; XComposer2 and TurboMind "
            "apply it only beyond max_position_embeddings: compare long inputs with `parity run` to confirm."
        )
    if cfg.get("tie_word_embeddings") and "lm_head.weight" not in tensors:
        notes.append("tied embeddings: output.weight is written as a copy of the token embeddings.")

    # canonical linears of the disguise
    r_qkv = sum(lora[q][0] for q in QWEN2_QKV_PROJECTIONS)
    linears = {"attention.wqkv": (r_qkv, r_qkv)}
    for proj, lin in QWEN2_LINEAR_OF.items():
        linears[lin] = lora[proj]
    linears = {lin: linears[lin] for lin in PLORA_LINEARS}
    lora_cfg = lora_config_for_disguise({(i, lin): (r, a / r) for i in layers for lin, (r, a) in linears.items()})
    default = {"lora_r": 256, "lora_scale": 1.0}
    if any((r, a / r) != (default["lora_r"], default["lora_scale"]) for r, a in linears.values()):
        notes.append(
            f"the LoRA ranks/scales differ from what lmdeploy 0.7.1 hard-codes for XComposer2-7b (rank 256, scale 1.0 "
            f"everywhere): converting or serving without {LORA_CONFIG_FILE} fails at load (rank) or silently scales the "
            "LoRA wrongly. Call parity.disguise.register_lora_config() in the converting/serving process "
            "(docs/qwen2-plora.md)."
        )

    out_cfg = _disguise_config(cfg, shape, has_bias, {k: (r, _plain(a)) for k, (r, a) in linears.items()}, dtype_name)
    record = DisguiseRecord(
        source=str(src), destination=str(dst), source_architecture=(cfg.get("architectures") or ["?"])[0],
        layers=len(layers), heads=shape.heads, kv_heads=shape.kv_heads, head_dim=shape.head_dim, dtype=dtype_name,
        source_lora={p: {"rank": r, "alpha": _plain(a), "scale": a / r} for p, (r, a) in lora.items()},
        linears={k: {"rank": r, "alpha": _plain(a), "scale": a / r} for k, (r, a) in linears.items()},
        lora_config=lora_cfg, qkv_bias=has_bias, fold_exact=fold_exact, losses=losses, notes=notes,
    )
    _write(src, dst, out_cfg, state, record, overwrite)
    if not quiet:
        print(record.summary())
    return record


def _refuse(src: Path, problems: list[str]) -> None:
    raise ParityInputError(
        f"Cannot disguise {src} as XComposer2 for lmdeploy 0.7.1: " + "; ".join(problems) + ". Nothing was written."
    )


def _dump(obj: Any) -> bytes:
    return (json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False) + "\n").encode("utf-8")


def _write(src: Path, dst: Path, cfg: dict, state: dict[str, torch.Tensor], record: DisguiseRecord,
           overwrite: bool) -> None:
    from ..fixtures.generator import remote_code_files, safetensors_bytes

    files: dict[str, bytes] = {"config.json": _dump(cfg)}
    files.update(remote_code_files("7b"))
    for p in sorted(src.iterdir()):
        if p.is_file() and p.name not in _SKIP_NAMES and not p.name.endswith(_SKIP_SUFFIXES) and not p.name.startswith("."):
            files[p.name] = p.read_bytes()  # tokenizer, generation_config, chat template ...
    files["model.safetensors"] = safetensors_bytes(state)
    files[LORA_CONFIG_FILE] = _dump(record.lora_config)
    record.files = sorted(files) + [DISGUISE_RECORD]
    files[DISGUISE_RECORD] = _dump(record.to_dict())
    dst.parent.mkdir(parents=True, exist_ok=True)
    with replaced_folder(dst, "disguise") as tmp:
        tmp.mkdir()
        for name, data in files.items():
            (tmp / name).write_bytes(data)
