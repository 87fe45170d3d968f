"""Reading an int4 (AWQ, `weight_type: int4`) TurboMind workspace.

lmdeploy 0.7.1's converter (`model_format='awq'`) writes, per linear and tensor-parallel rank,
`<linear>.<rank>.qweight` (u4 packed eight to an int32 in natural nibble order, `pack_u4_row`, shape
[in, out/8]), `<linear>.<rank>.scales` and `<linear>.<rank>.zeros` (fp16 [in/g, out], zeros unpacked) beside the
floating-point `lora_a`/`lora_b`, norms and embeddings (fp16). `group_size` is in config.yaml.

`QuantizedWorkspace` is a `Workspace` whose linear `.weight` tensors are dequantized from those files, so every
consumer (weights audit, replay) reads an int4 workspace like any other:
* `tensor(name)`: the exact dequantization (q - z) * s, float32 — what the AWQ checkpoint means; the weights audit
  compares it with the checkpoint's own dequantization, bit for bit;
* `deployed_tensor(name)`: the fp16 weights TurboMind's int4 GEMM multiplies with (`pack.dequantize_turbomind`);
  the replay uses them when it emulates the deployment dtype;
* `quant_parts(name)`: (q, zeros, scales) merged over ranks, for checks that look at the codes themselves.
Dequantization is per rank (a group never spans two ranks: the converter pads inter_size to whole groups per
rank), then the ranks are merged like a floating-point weight.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from ..errors import ParityInputError
from ..deploy import layout
from ..deploy.workspace import Workspace
from ..names import CANONICAL_OF_TM, parse_tm_name
from .pack import dequantize_exact, dequantize_turbomind, unpack_rows

QUANT_FILE_PARTS = ("qweight", "scales", "zeros")
_QFILE_RE = re.compile(r"^(layers\.\d+\.(?:attention|feed_forward)\.(?:w_qkv|wo|w1|w2|w3))\.(\d+)\.(qweight|scales|zeros)$")


@dataclass
class QuantizedWorkspace(Workspace):
    _cache: dict = field(default_factory=dict, repr=False)

    @classmethod
    def open(cls, path) -> "QuantizedWorkspace":
        ws = super().open(path)
        if ws.model.weight_type not in layout.QUANT_WEIGHT_TYPES:
            raise ParityInputError(f"{ws.weights_dir / 'config.yaml'}: model_config.weight_type is "
                                   f"{ws.model.weight_type!r}; expected an int4 workspace.")
        return ws

    @classmethod
    def _file_entry(cls, file_name: str) -> tuple[str, int | None]:
        m = _QFILE_RE.match(file_name)
        if m:  # the three files of a quantized linear stand for its `.weight`
            return f"{m.group(1)}.weight", int(m.group(2))
        return super()._file_entry(file_name)

    @property
    def group_size(self) -> int:
        return int(self.model.group_size)

    def is_quantized(self, name: str) -> bool:
        _, linear, kind = parse_tm_name(name)
        return kind == "weight" and linear in CANONICAL_OF_TM

    # -------------------------------------------------------------- files

    def _part_path(self, name: str, rank: int, part: str) -> Path:
        return self.weights_dir / f"{name[: -len('.weight')]}.{rank}.{part}"

    def _part_shapes(self, name: str) -> dict[str, tuple[int, int]]:
        rows, cols = self.spec(name).shard_shape
        g = self.group_size
        if rows % g:
            raise ParityInputError(
                f"{self.weights_dir / 'config.yaml'}: model_config.group_size={g} does not divide the {rows} input "
                f"rows of {name} (per rank); the converter writes whole groups.")
        if cols % 8:
            raise ParityInputError(f"{name}: {cols} output columns per rank cannot be packed eight to an int32.")
        return {"qweight": (rows, cols // 8), "scales": (rows // g, cols), "zeros": (rows // g, cols)}

    def _read_part(self, name: str, rank: int, part: str, shape: tuple[int, int]) -> torch.Tensor:
        path = self._part_path(name, rank, part)
        dtype = torch.int32 if part == "qweight" else torch.float16
        expected = shape[0] * shape[1] * torch.empty((), dtype=dtype).element_size()
        if not path.is_file():
            raise ParityInputError(
                f"Weight file {path} is missing: an int4 workspace holds qweight, scales and zeros for {name} "
                f"({part}: {list(shape)} of {str(dtype).replace('torch.', '')}). Re-convert the AWQ model.")
        actual = path.stat().st_size
        if actual != expected:
            hint = ""
            per_group = shape[1] * 2  # one fp16 row per group
            if part != "qweight" and actual % per_group == 0 and actual:
                groups = actual // per_group
                rows = shape[0] * self.group_size
                if rows % groups == 0:
                    hint = (f" Its size fits a group size of {rows // groups} rows, not config.yaml's "
                            f"model_config.group_size={self.group_size}.")
            raise ParityInputError(
                f"Weight file {path} holds {actual} bytes but config.yaml implies {part} of {name} with shape "
                f"{list(shape)} = {expected} bytes.{hint}")
        return torch.from_file(str(path), shared=False, size=shape[0] * shape[1], dtype=dtype).reshape(shape)

    def quant_shards(self, name: str) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """Per rank (q uint8 [in, out], zeros, scales fp16 [in/g, out]) of a quantized linear."""
        shapes = self._part_shapes(name)
        out = []
        for r in range(self.spec(name).n_files):
            parts = {p: self._read_part(name, r, p, shapes[p]) for p in QUANT_FILE_PARTS}
            out.append((unpack_rows(parts["qweight"]), parts["zeros"], parts["scales"]))
        return out

    # -------------------------------------------------------------- tensors

    def _dequantized(self, name: str, how: str) -> torch.Tensor:
        key = (name, how)
        if key not in self._cache:
            fn = dequantize_exact if how == "exact" else dequantize_turbomind
            shards = [fn(q, z, s, self.group_size) for q, z, s in self.quant_shards(name)]
            self._cache.clear()  # one linear at a time (the replay reads a layer's linears once each)
            self._cache[key] = layout.merge_shards(self.spec(name), shards)
        return self._cache[key]

    def shards(self, name: str, rank: int | None = None) -> list[torch.Tensor]:
        if self.is_quantized(name):
            return layout.split_merged(self.spec(name), self.tensor(name))
        return super().shards(name, rank)

    def tensor(self, name: str, rank: int | None = None) -> torch.Tensor:
        """Merged `name`; a quantized linear's weight as its exact dequantization (float32)."""
        if self.is_quantized(name):
            return self._dequantized(name, "exact")
        return super().tensor(name, rank)

    def deployed_tensor(self, name: str) -> torch.Tensor:
        """What TurboMind computes with: a quantized linear's weight as its int4 GEMM dequantizes it (fp16)."""
        if self.is_quantized(name):
            return self._dequantized(name, "turbomind")
        return super().tensor(name)

    def quant_parts(self, name: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(q, zeros, scales) of a quantized linear merged over ranks like its weight."""
        shards = self.quant_shards(name)
        spec = self.spec(name)
        q = layout.merge_shards(spec, [s[0] for s in shards])
        g = self.group_size
        gspec = replace(spec, shard_shape=(spec.shard_shape[0] // g, spec.shard_shape[1]),
                        merged_shape=(spec.merged_shape[0] // g, spec.merged_shape[1]))
        return q, layout.merge_shards(gspec, [s[1] for s in shards]), layout.merge_shards(gspec, [s[2] for s in shards])
