"""Traces: captured values at canonical points, streamed to disk one layer at a time.

A trace is a folder:
    meta.json               side, case, num_layers, dtype, layouts, per-linear LoRA rank/scale, extras
    pre.safetensors         points before layer 0 ("embeddings")
    layer_000.safetensors   the layer's points (`LAYER_POINTS`) and PLoRA parts (`linear:part`)
    post.safetensors        "norm", "output"
Every tensor is 2-D [rows, features] (batch squeezed), except PLoRA masks (1-D uint8 [rows]).
Writers write each file atomically (temp name, then rename) so a crash never leaves a half file that a
reader would trust. Readers memory-map, so a 7B trace never sits in memory at once.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .errors import ParityInputError


@dataclass
class TraceMeta:
    side: str                      # "reference" | "replay" | "turbomind" | "floor-…"
    case: str
    num_layers: int
    dtype: str                     # compute dtype of the run that produced it
    # Layout tag per point where it differs from the HF reference's, e.g. {"attention.wqkv": "tm_qkv"}.
    layouts: dict[str, str] = field(default_factory=dict)
    # {"0": {"attention.wqkv": {"rank": 256, "scale": 1.0}, ...}, ...}: what the side used per linear.
    plora: dict[str, dict[str, dict[str, float]]] = field(default_factory=dict)
    extras: dict[str, Any] = field(default_factory=dict)


def _atomic_save(tensors: dict[str, torch.Tensor], path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    save_file({k: v.detach().contiguous() for k, v in tensors.items()}, str(tmp))
    os.replace(tmp, path)


class TraceWriter:
    """Streams a trace to disk. Call `layer(i, values)` as each layer finishes, then `close()`."""

    def __init__(self, root: Path | str, meta: TraceMeta):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.meta = meta
        self._pre: dict[str, torch.Tensor] = {}
        self._post: dict[str, torch.Tensor] = {}

    def pre(self, name: str, value: torch.Tensor) -> None:
        self._pre[name] = _squeeze(value)

    def post(self, name: str, value: torch.Tensor) -> None:
        self._post[name] = _squeeze(value)

    def layer(self, index: int, values: dict[str, torch.Tensor]) -> None:
        _atomic_save({k: _squeeze(v) for k, v in values.items()}, self.root / f"layer_{index:03d}.safetensors")

    def close(self) -> "Trace":
        if self._pre:
            _atomic_save(self._pre, self.root / "pre.safetensors")
        if self._post:
            _atomic_save(self._post, self.root / "post.safetensors")
        tmp = self.root / "meta.json.tmp"
        tmp.write_text(json.dumps(self.meta.__dict__, indent=1, default=str))
        os.replace(tmp, self.root / "meta.json")
        return Trace(self.root)


def _squeeze(t: torch.Tensor) -> torch.Tensor:
    t = t.detach()
    if t.dim() == 3 and t.shape[0] == 1:
        t = t[0]
    if t.dim() == 2 and t.shape[0] == 1 and t.dtype == torch.bool:
        t = t[0]
    if t.dtype == torch.bool:
        t = t.to(torch.uint8)
    return t.clone()


class Trace:
    """Read side of a trace folder; values are loaded lazily, per file."""

    def __init__(self, root: Path | str):
        self.root = Path(root)
        meta_path = self.root / "meta.json"
        if not meta_path.is_file():
            raise ParityInputError(f"Trace folder {self.root} has no meta.json; it was not written completely.")
        self.meta = TraceMeta(**json.loads(meta_path.read_text()))

    @property
    def num_layers(self) -> int:
        return self.meta.num_layers

    def _file(self, layer: int | None, point: str) -> Path:
        if layer is not None:
            return self.root / f"layer_{layer:03d}.safetensors"
        return self.root / ("pre.safetensors" if point == "embeddings" else "post.safetensors")

    def get(self, layer: int | None, point: str) -> torch.Tensor | None:
        path = self._file(layer, point)
        if not path.is_file():
            return None
        with safe_open(str(path), "pt") as f:
            if point not in f.keys():
                return None
            return f.get_tensor(point)

    def layer(self, index: int) -> dict[str, torch.Tensor]:
        path = self.root / f"layer_{index:03d}.safetensors"
        if not path.is_file():
            return {}
        with safe_open(str(path), "pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}

    def keys(self, layer: int | None, point_hint: str = "") -> list[str]:
        path = self._file(layer, point_hint)
        if not path.is_file():
            return []
        with safe_open(str(path), "pt") as f:
            return list(f.keys())

    def layers(self) -> Iterator[tuple[int, dict[str, torch.Tensor]]]:
        for i in range(self.num_layers):
            yield i, self.layer(i)

    def plora(self, layer: int, linear: str) -> dict[str, float]:
        return self.meta.plora.get(str(layer), {}).get(linear, {})
