"""Reading a model folder's tensors as stored: safetensors, or `pytorch_model*.bin` (an AWQ folder) with
`weights_only=True` -- parity never unpickles arbitrary objects. One reader for the deployment's image path and
the quantized reference alike."""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

import torch

from .errors import ParityInputError


def indexed_shards(index: Path) -> list[Path] | None:
    """The shard files a `*.index.json` names, in order (None when there is no index): the one parser of
    transformers' shard indexes, for both weight formats."""
    if not index.is_file():
        return None
    try:
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise ParityInputError(f"{index} is not a valid shard index ({e}); expected a 'weight_map' of tensor "
                               "name -> shard file.") from None
    return [index.parent / n for n in names]


def safetensors_files(folder: Path) -> list[Path]:
    """The folder's safetensors weights: the shards its index names, else every *.safetensors (maybe none)."""
    shards = indexed_shards(folder / "model.safetensors.index.json")
    return shards if shards is not None else sorted(folder.glob("*.safetensors"))


def weight_files(folder: Path) -> list[Path]:
    """The folder's weights in either format: pytorch_model*.bin (an AWQ folder), else safetensors."""
    shards = indexed_shards(folder / "pytorch_model.bin.index.json")
    if shards is not None:
        return shards
    files = sorted(folder.glob("pytorch_model*.bin")) or safetensors_files(folder)
    if not files:
        raise ParityInputError(f"Model folder {folder} has no pytorch_model*.bin or *.safetensors weights; expected "
                               "what `lmdeploy lite auto_awq` saves (pytorch_model.bin).")
    return files


def load_weight_file(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise ParityInputError(f"Weight file {path} named by the shard index is missing.")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except Exception as e:  # noqa: BLE001 - any reader failure is a bad file
            raise ParityInputError(f"{path} is not a readable safetensors file ({type(e).__name__}: {e}).") from None
    try:
        sd = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # noqa: BLE001 - UnpicklingError for non-tensor objects, zip errors for corrupt files
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ParityInputError(
            f"{path} could not be read as tensors only (torch.load weights_only=True: {type(e).__name__}: {first}). "
            "parity never unpickles arbitrary objects; expected a state dict of tensors as auto_awq saves it.") from None
    if not isinstance(sd, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in sd.items()):
        raise ParityInputError(f"{path} does not hold a state dict (name -> tensor); expected what auto_awq saves.")
    return sd


def load_state(folder: Path | str, files: list[Path] | None = None) -> dict[str, torch.Tensor]:
    """Every tensor of a model folder as stored (an AWQ folder: packed qweight/qzeros, fp16 scales), from
    `files` when given (default: `weight_files`)."""
    state: dict[str, torch.Tensor] = {}
    for f in weight_files(Path(folder)) if files is None else files:
        state.update(load_weight_file(f))
    return state


def safetensors_headers(path: Path) -> tuple[dict[str, dict[str, Any]], list[str]]:
    """name -> {"dtype", "shape"} from the headers of the folder's safetensors files (no tensor is read), and
    what could not be read."""
    problems: list[str] = []
    try:
        files = safetensors_files(path)
    except ParityInputError as e:
        return {}, [str(e)]
    out: dict[str, dict[str, Any]] = {}
    for f in files:
        try:
            with open(f, "rb") as fh:
                (n,) = struct.unpack("<Q", fh.read(8))
                if n > 100 * 2**20:
                    raise ValueError(f"header length {n}")
                header = json.loads(fh.read(n))
        except (OSError, ValueError, struct.error) as e:
            problems.append(f"{f} has no readable safetensors header ({type(e).__name__}: {e})")
            continue
        for name, entry in header.items():
            if name != "__metadata__" and isinstance(entry, dict):
                out[name] = {"dtype": entry.get("dtype"), "shape": list(entry.get("shape") or [])}
    if not files:
        problems.append(f"{path} has no *.safetensors weights (a pytorch_model*.bin is not unpickled by parity)")
    return out, problems
