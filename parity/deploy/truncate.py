"""Truncated and LoRA-free copies of an HF XComposer2 model folder, for per-layer values from a live engine.

TurboMind exposes only the final hidden state (after the final RMSNorm) and the logits. To read "layer k"
out of a live deployment we deploy a copy of the model that *ends* after k decoder layers: its
`last_hidden_state` is then `norm(hidden_k)` (turbomind-plora.md, section 6). A copy keeps:

* `config.json` with `num_hidden_layers = k` (everything else unchanged);
* the weights without the tensors of decoder layers >= k (`model.layers.{i}.` with i >= k; lmdeploy 0.7.x
  raises on extra layers). Weight shards with nothing to drop are symlinked, the others rewritten; a
  sharded checkpoint gets a rewritten index that lists only the kept tensors (lmdeploy's loader counts
  per-layer tensors from it);
* every other file (remote code, tokenizer, generation config): small files copied, big ones symlinked.

The `"nolora"` variant keeps every tensor but writes each `Plora_B` as zeros: the deployment is then the same
engine on the same kernel path (`lora_policy: 'plora'`, separate w1/w3 GEMMs, LoRA branch computed) whose
LoRA adds exactly nothing. Turning LoRA off through the config instead (`lora_policy: ''`) would make
TurboMind fuse w1/w3 into one GEMM: another kernel, so a PLoRA on/off difference would mix the LoRA's effect
with the kernel change. (A folder may still carry `parity_lora_config.json`, a lora_config override that
`parity.deploy.convert.convert(..., lora_config=...)` and the live engine apply; see `lora_override`.)

Copies are cached under a folder, keyed by the source's fingerprint (file names, sizes, mtimes), k and
the variant, written atomically (temp folder + rename). `TruncatedModels` is a context manager; its
`cleanup()` removes the copies it handed out (unless `keep=True`).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Literal

import torch

from ..atomic import remove_leftovers, replaced_folder
from ..errors import ParityInputError
from ..hfconfig import read_hf_config
from .folder_config import LORA_CONFIG_FILE, read_lora_file

Variant = Literal["lora", "nolora"]
VARIANTS: tuple[str, ...] = ("lora", "nolora")

MARKER_NAME = "parity_truncation.json"
NOLORA_OVERRIDE: dict[str, Any] = {"lora_policy": ""}
# Bump when what a copy contains changes: part of the cache key.
TRUNCATE_PROCEDURE_VERSION = "2"  # 2: "nolora" zeroes Plora_B instead of dropping LoRA via lora_policy ''.

# XComposer2's language-model layers (the HF names lmdeploy's xcomposer2 reader expects).
LAYER_KEY_RE = re.compile(r"^model\.layers\.(\d+)\.")
# lmdeploy's own per-layer pattern (InternLM2Reader.attn_layer_patten), searched anywhere in a key.
LMDEPLOY_LAYER_RE = re.compile(r"model.layers.([0-9]+).")
PLORA_B_RE = re.compile(r"\.Plora_B\.")
SMALL_FILE = 1 << 20  # files at most this big are copied, bigger ones symlinked

SAFE_INDEX = "model.safetensors.index.json"
BIN_INDEX = "pytorch_model.bin.index.json"


# ------------------------------------------------------------------------------------------- helpers


def lora_override(model_dir: str | Path) -> dict[str, Any] | None:
    """The lora_config override a folder asks for (`parity_lora_config.json`, possibly partial such as
    NOLORA_OVERRIDE), or None."""
    data = read_lora_file(model_dir)
    if data is not None and not isinstance(data, dict):
        raise ParityInputError(f"{Path(model_dir) / LORA_CONFIG_FILE} must hold a JSON object (a lora_config "
                               f"mapping such as {json.dumps(NOLORA_OVERRIDE)}), got {type(data).__name__}.")
    return data


def fingerprint(model_dir: str | Path) -> str:
    """Hash of the folder's file names, sizes and mtimes (symlinks followed)."""
    model_dir = Path(model_dir)
    h = hashlib.sha256()
    for p in sorted(model_dir.rglob("*")):
        if "__pycache__" in p.parts or not p.is_file():
            continue
        st = p.stat()
        h.update(f"{p.relative_to(model_dir)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    h.update(TRUNCATE_PROCEDURE_VERSION.encode())
    return h.hexdigest()[:16]


def num_layers(model_dir: str | Path) -> int:
    return int(read_hf_config(Path(model_dir))["num_hidden_layers"])


@dataclass
class _Weights:
    kind: Literal["safetensors", "bin"]
    shards: list[Path]
    index: Path | None


def _weights(model_dir: Path) -> _Weights:
    """The weight files the way lmdeploy's `create_loader` and transformers find them."""
    if (model_dir / SAFE_INDEX).is_file():
        return _Weights("safetensors", _index_shards(model_dir, SAFE_INDEX), model_dir / SAFE_INDEX)
    st = sorted(model_dir.glob("*.safetensors"))
    if st:
        return _Weights("safetensors", st, None)
    if (model_dir / BIN_INDEX).is_file():
        return _Weights("bin", _index_shards(model_dir, BIN_INDEX), model_dir / BIN_INDEX)
    bins = sorted(model_dir.glob("pytorch_model*.bin")) or sorted(model_dir.glob("*.bin")) + sorted(model_dir.glob("*.pt"))
    if bins:
        return _Weights("bin", bins, None)
    raise ParityInputError(
        f"Model folder {model_dir} has no weight files; expected model*.safetensors (optionally with "
        f"{SAFE_INDEX}) or pytorch_model*.bin."
    )


def _index_shards(model_dir: Path, name: str) -> list[Path]:
    path = model_dir / name
    try:
        wm = json.loads(path.read_text())["weight_map"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ParityInputError(f"{path} is not a valid weight index ({type(e).__name__}: {e}); expected "
                               "{'weight_map': {tensor: shard file}}.") from None
    shards = sorted({model_dir / f for f in wm.values()})
    missing = [s.name for s in shards if not s.is_file()]
    if missing:
        raise ParityInputError(f"{path} names shard files that do not exist: {', '.join(missing)}.")
    return shards


def _shard_keys(path: Path, kind: str) -> list[str]:
    if kind == "safetensors":
        from safetensors import safe_open

        with safe_open(str(path), "pt") as f:
            return list(f.keys())
    return list(_load_bin(path).keys())


def _load_bin(path: Path) -> dict[str, torch.Tensor]:
    try:
        return torch.load(str(path), map_location="cpu", mmap=True, weights_only=True)
    except Exception:  # legacy (non-zip) files cannot be memory-mapped
        return torch.load(str(path), map_location="cpu", weights_only=True)


def drop_key(key: str, keep_layers: int) -> bool:
    """Whether a tensor is left out of a copy that keeps `keep_layers` decoder layers."""
    m = LAYER_KEY_RE.match(key)
    return bool(m and int(m.group(1)) >= keep_layers)


def zero_key(key: str, variant: str) -> bool:
    """Whether a kept tensor is written as zeros (the "nolora" variant's Plora_B)."""
    return variant == "nolora" and bool(PLORA_B_RE.search(key))


def _link_or_copy(src: Path, dst: Path) -> None:
    real = src.resolve()
    if real.is_dir():
        os.symlink(real, dst, target_is_directory=True)
    elif real.stat().st_size <= SMALL_FILE:
        shutil.copy2(real, dst)
    else:
        os.symlink(real, dst)


# ------------------------------------------------------------------------------------------- writing


def write_truncated(source: str | Path, dest: str | Path, keep_layers: int, variant: str = "lora") -> dict[str, Any]:
    """Write a copy of `source` into `dest` (which must not exist) keeping `keep_layers` decoder layers.

    Returns the marker written to `dest/parity_truncation.json`.
    """
    source, dest = Path(source).resolve(), Path(dest)
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
    cfg = read_hf_config(source)
    total = int(cfg["num_hidden_layers"])
    if not isinstance(keep_layers, int) or isinstance(keep_layers, bool) or not 1 <= keep_layers <= total:
        raise ParityInputError(
            f"Cannot keep {keep_layers!r} layers of {source}: its config.json has num_hidden_layers={total}; "
            f"expected 1 <= k <= {total}."
        )
    w = _weights(source)
    dest.mkdir(parents=True)
    weight_names = {s.name for s in w.shards} | ({w.index.name} if w.index else set())
    for p in sorted(source.iterdir()):
        if p.name in weight_names or p.name in ("config.json", LORA_CONFIG_FILE, MARKER_NAME, "__pycache__"):
            continue
        if p.name.startswith(("pytorch_model", "model")) and p.name.endswith((".bin", ".safetensors", ".index.json")):
            continue  # the language model's weights in another format: they would hold the dropped layers
        _link_or_copy(p, dest / p.name)

    new_cfg = dict(cfg)
    new_cfg["num_hidden_layers"] = keep_layers
    (dest / "config.json").write_text(json.dumps(new_cfg, indent=2, sort_keys=True) + "\n")

    weight_map: dict[str, str] = {}
    dropped = kept = zeroed = 0
    layers_seen: set[int] = set()
    for shard in w.shards:
        keys = _shard_keys(shard, w.kind)
        keep = [k for k in keys if not drop_key(k, keep_layers)]
        zero = {k for k in keep if zero_key(k, variant)}
        for k in keys:
            m = LAYER_KEY_RE.match(k)
            if m:
                layers_seen.add(int(m.group(1)))
        dropped += len(keys) - len(keep)
        kept += len(keep)
        for k in keep:
            loose = LMDEPLOY_LAYER_RE.findall(k)
            if loose and int(loose[0]) >= keep_layers:
                raise ParityInputError(
                    f"{shard}: tensor {k!r} looks like decoder layer {loose[0]} to lmdeploy's loader (pattern "
                    f"'model.layers.N.') but is not an XComposer2 language-model layer ('model.layers.N.' at the "
                    "start of the name); parity cannot truncate this checkpoint safely."
                )
        if not keep:
            continue
        for k in keep:
            weight_map[k] = shard.name
        zeroed += len(zero)
        if len(keep) == len(keys) and not zero:
            os.symlink(shard.resolve(), dest / shard.name)
        elif w.kind == "safetensors":
            _write_safetensors_subset(shard, dest / shard.name, keep, zero)
        else:
            _write_bin_subset(shard, dest / shard.name, keep, zero)
    if layers_seen and max(layers_seen) + 1 != total:
        raise ParityInputError(
            f"{source}: config.json has num_hidden_layers={total} but the weights hold decoder layers "
            f"0..{max(layers_seen)}; fix the config before truncating."
        )
    if w.index is not None:
        meta = json.loads(w.index.read_text()).get("metadata", {})
        (dest / w.index.name).write_text(json.dumps({"metadata": dict(meta), "weight_map": dict(sorted(weight_map.items()))},
                                                    indent=2) + "\n")
    if variant == "nolora" and not zeroed:
        raise ParityInputError(f"{source}: no Plora_B tensor found; a LoRA-free copy needs the PLoRA weights "
                               "(model.layers.N.*.Plora_B.weight) to zero.")
    marker = {"source": str(source), "keep_layers": keep_layers, "source_layers": total, "variant": variant,
              "tensors_kept": kept, "tensors_dropped": dropped, "tensors_zeroed": zeroed,
              "procedure": TRUNCATE_PROCEDURE_VERSION}
    (dest / MARKER_NAME).write_text(json.dumps(marker, indent=1, sort_keys=True) + "\n")
    return marker


def _write_safetensors_subset(src: Path, dst: Path, keys: Iterable[str], zero: frozenset[str] | set[str] = frozenset()) -> None:
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(src), "pt") as f:
        meta = f.metadata() or {"format": "pt"}
        tensors = {k: torch.zeros_like(f.get_tensor(k)) if k in zero else f.get_tensor(k) for k in keys}
    save_file(tensors, str(dst), metadata=meta)


def _write_bin_subset(src: Path, dst: Path, keys: Iterable[str], zero: frozenset[str] | set[str] = frozenset()) -> None:
    sd = _load_bin(src)
    out = {}
    for k in keys:
        t = torch.zeros_like(sd[k]) if k in zero else sd[k]
        # a view into a bigger storage would save the whole storage: keep only what is needed
        out[k] = t.clone() if t.untyped_storage().nbytes() != t.numel() * t.element_size() else t
    torch.save(out, str(dst))


# ------------------------------------------------------------------------------------------- cache


class TruncatedModels:
    """Cached truncated / LoRA-free copies of one source model folder.

    `get(k, variant)` returns a folder whose model ends after k decoder layers (k = None: all layers). The
    full model with LoRA is the source folder itself (no copy). Copies live under `cache_root` named
    `<source name>-<fingerprint>-k<k>-<variant>`; a changed source gets new names. `cleanup()` (also on
    leaving the `with` block) removes the copies this object handed out, unless `keep=True`.
    """

    def __init__(self, source: str | Path, cache_root: str | Path, keep: bool = False):
        self.source = Path(source).resolve()
        self.layers = num_layers(self.source)
        self.cache_root = Path(cache_root).resolve()
        self.keep = keep
        self.fingerprint = fingerprint(self.source)
        self.created: list[Path] = []  # written by this object
        self.used: list[Path] = []     # handed out (written or found in the cache)

    def path_for(self, k: int, variant: str = "lora") -> Path:
        return self.cache_root / f"{self.source.name}-{self.fingerprint}-k{k:03d}-{variant}"

    def get(self, k: int | None = None, variant: str = "lora") -> Path:
        if variant not in VARIANTS:
            raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
        k = self.layers if k is None else k
        if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= self.layers:
            raise ParityInputError(
                f"Cannot keep {k!r} layers of {self.source}: it has {self.layers} decoder layers; expected "
                f"1 <= k <= {self.layers}."
            )
        if k == self.layers and variant == "lora":
            return self.source
        dest = self.path_for(k, variant)
        if not (dest / MARKER_NAME).is_file():
            self.cache_root.mkdir(parents=True, exist_ok=True)
            remove_leftovers(dest, dead_writers_only=True)  # of a build killed outright (writers take no lock)
            # a concurrent writer that finished first wins (a reader may already use its folder); a half
            # folder without the marker is replaced
            with replaced_folder(dest, keep=lambda d: (d / MARKER_NAME).is_file()) as tmp:
                write_truncated(self.source, tmp, k, variant)
            self.created.append(dest)
        if dest not in self.used:
            self.used.append(dest)
        return dest

    def prune_stale(self) -> list[Path]:
        """Remove cached copies of this source made from other versions of it (another fingerprint)."""
        removed = []
        if not self.cache_root.is_dir():
            return removed
        pat = re.compile(rf"^{re.escape(self.source.name)}-([0-9a-f]{{16}})-k\d+-(?:{'|'.join(VARIANTS)})$")
        for p in self.cache_root.iterdir():
            m = pat.match(p.name)
            if m and m.group(1) != self.fingerprint and (p / MARKER_NAME).is_file():
                if json.loads((p / MARKER_NAME).read_text()).get("source") == str(self.source):
                    shutil.rmtree(p, ignore_errors=True)
                    removed.append(p)
        return removed

    def release(self, path: Path) -> None:
        """Remove one handed-out copy now (a 7B copy is many GB; keeps one on disk at a time). No-op with
        `keep=True` or for the source folder itself; a later `get` writes it again."""
        path = Path(path)
        if self.keep or path == self.source or path not in self.used:
            return
        shutil.rmtree(path, ignore_errors=True)
        self.used.remove(path)
        if path in self.created:
            self.created.remove(path)

    def cleanup(self) -> None:
        if self.keep:
            return
        for p in self.used:
            shutil.rmtree(p, ignore_errors=True)
        self.used.clear()
        self.created.clear()

    def __enter__(self) -> "TruncatedModels":
        return self

    def __exit__(self, *exc) -> None:
        self.cleanup()
