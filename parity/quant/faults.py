"""Faults of quantized deployments, for the catalogue (`parity.faults.CATALOGUE`): each edits the packed files of
a real int4 workspace (converted from a `parity quantize` fixture) or names the original model for the
smoothing check."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch

from .pack import pack_awq, unpack_rows


def _part_file(ws_dir: Path, layer: int, linear: str, part: str, rank: int = 0) -> Path:
    return ws_dir / f"layers.{layer}.{linear}.{rank}.{part}"


def _read(path: Path, dtype: torch.dtype) -> torch.Tensor:
    return torch.from_file(str(path), shared=False, size=path.stat().st_size // torch.empty((), dtype=dtype)
                           .element_size(), dtype=dtype).clone()


def _write(path: Path, t: torch.Tensor) -> None:
    t = t.contiguous()
    (t.view(torch.int16) if t.dtype == torch.float16 else t).numpy().tofile(path)


def swap_scales_and_zeros(layer: int, linear: str) -> Callable:
    def apply(s) -> None:
        d = s.ws().weights_dir
        a, b = _part_file(d, layer, linear, "scales"), _part_file(d, layer, linear, "zeros")
        ta, tb = a.read_bytes(), b.read_bytes()
        a.write_bytes(tb)
        b.write_bytes(ta)
    return apply


def qweight_from(src_layer: int, dst_layer: int, linear: str) -> Callable:
    def apply(s) -> None:
        d = s.ws().weights_dir
        _part_file(d, dst_layer, linear, "qweight").write_bytes(_part_file(d, src_layer, linear, "qweight").read_bytes())
    return apply


def zero_point_off_by_one(layer: int, linear: str) -> Callable:
    """Every zero point one higher (clamped to 15), as an off-by-one unpacking (e.g. GPTQ's +1) would give."""
    def apply(s) -> None:
        path = _part_file(s.ws().weights_dir, layer, linear, "zeros")
        z = _read(path, torch.float16)
        _write(path, (z.float() + 1).clamp(max=15).to(torch.float16))
    return apply


def nibbles_in_awq_order(layer: int, linear: str) -> Callable:
    """The qweight left in AWQ's interleaved nibble order (the converter's unpack skipped)."""
    def apply(s) -> None:
        ws = s.ws()
        path = _part_file(ws.weights_dir, layer, linear, "qweight")
        shape = ws._part_shapes(f"layers.{layer}.{linear}.weight")["qweight"]
        q = unpack_rows(_read(path, torch.int32).reshape(shape))
        _write(path, pack_awq(q))
    return apply


def group_size(value: int) -> Callable:
    def apply(s) -> None:
        s.config(lambda c: c["model_config"].__setitem__("group_size", value))
    return apply

