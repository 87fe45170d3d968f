"""Which model a workspace was converted from: a fingerprint of the source folder, recorded by `parity convert`
in parity-conversion.json and compared at run time with the model the run is given.

The fingerprint is the model's shape (config.json's size fields) and a digest of a few small language-model
tensors read from the folder's files (every `model.*norm.weight` and layer 0's PLoRA B matrices, as float32
values, so the storage dtype does not matter). Two fine-tunes of one base share the shape but not their norms
or LoRA; only tensors present in both folders are compared, so a `parity disguise` of a Qwen2 model (renamed
layers, the same final norm) matches its original."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

from ..checkpoint import load_weight_file, weight_files
from ..hfconfig import read_hf_config

# config.json fields that fix the shape of every tensor the converter writes
SHAPE_FIELDS = ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim",
                "intermediate_size", "vocab_size")


def _sampled(name: str) -> bool:
    return name.startswith("model.") and (name.endswith("norm.weight")
                                          or (name.startswith("model.layers.0.") and ".Plora_B." in name))


def _digest(t) -> str:
    return hashlib.sha256(t.detach().float().contiguous().numpy().tobytes()).hexdigest()[:16]


def model_fingerprint(model_dir: str | Path) -> dict[str, Any]:
    """{"shape": {config.json size fields}, "tensors": {name: digest}} of an HF model folder."""
    folder = Path(model_dir)
    cfg = read_hf_config(folder)
    shape = {k: cfg[k] for k in SHAPE_FIELDS if k in cfg}
    tensors: dict[str, str] = {}
    for path in weight_files(folder):
        if path.suffix == ".safetensors":
            from safetensors import safe_open

            try:
                with safe_open(str(path), framework="pt") as fh:
                    for name in fh.keys():
                        if _sampled(name):
                            tensors[name] = _digest(fh.get_tensor(name))
                continue
            except Exception:  # noqa: BLE001 - a bad file is named by the reader below
                pass
        tensors.update({n: _digest(t) for n, t in load_weight_file(path).items() if _sampled(n)})
    return {"shape": shape, "tensors": dict(sorted(tensors.items()))}


def fingerprint_differences(recorded: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """What differs between two fingerprints, in words (empty: the same source model as far as compared)."""
    out = []
    a, b = recorded.get("shape") or {}, current.get("shape") or {}
    for k in SHAPE_FIELDS:
        if k in a and k in b and a[k] != b[k]:
            out.append(f"{k} {a[k]} vs {b[k]}")
    ta, tb = recorded.get("tensors") or {}, current.get("tensors") or {}
    differ = [n for n in ta if n in tb and ta[n] != tb[n]]
    if differ:
        out.append(f"{len(differ)} of {sum(1 for n in ta if n in tb)} sampled tensors hold other values "
                   f"(first {differ[0]})")
    return out


def fingerprint_words(fp: dict[str, Any]) -> str:
    s = fp.get("shape") or {}
    return (f"hidden {s.get('hidden_size')}, {s.get('num_hidden_layers')} layers, {s.get('num_attention_heads')} "
            f"heads, vocab {s.get('vocab_size')}, {len(fp.get('tensors') or {})} sampled tensors")
