"""AWQ checkpoint folders: what `lmdeploy lite auto_awq` (and `parity quantize`) write, read without unpickling.

Format (lmdeploy 0.7.1, real-deployments.md §3): `config.json` carries `quantization_config = {quant_method: awq,
version: gemm, bits: 4, group_size, zero_point: true}`; weights are `pytorch_model.bin` (or shards with
`pytorch_model.bin.index.json`; safetensors also accepted) holding, per quantized linear, `qweight` int32
[in, out/8] and `qzeros` int32 [in/g, out/8] in AWQ nibble order and `scales` fp16 [in/g, out]; everything else
(norms, embeddings, `Plora_A`/`Plora_B`, the vision tower) as floating-point tensors.

`.bin` files are read with `torch.load(weights_only=True)`: tensors only, never a full unpickle.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..checkpoint import load_state
from ..errors import ParityInputError
from ..hfconfig import read_hf_config
from .pack import dequantize_exact, unpack_awq

QUANT_PARTS = ("qweight", "qzeros", "scales")


@dataclass(frozen=True)
class AwqConfig:
    bits: int
    group_size: int
    zero_point: bool
    version: str


def quantization_config(cfg: dict[str, Any]) -> dict[str, Any] | None:
    q = cfg.get("quantization_config")
    if q is None and isinstance(cfg.get("text_config"), dict):  # nested configs (lmdeploy searches them too)
        q = cfg["text_config"].get("quantization_config")
    return q if isinstance(q, dict) else None


def is_awq_folder(folder: Path | str) -> bool:
    """Whether config.json says the folder holds an AWQ checkpoint (no validation; `awq_config` validates)."""
    path = Path(folder) / "config.json"
    try:
        cfg = json.loads(path.read_text())
    except (OSError, ValueError):
        return False
    q = quantization_config(cfg) if isinstance(cfg, dict) else None
    return bool(q) and str(q.get("quant_method", "")).lower() == "awq"


def awq_config(folder: Path | str) -> AwqConfig:
    """The validated quantization_config of an AWQ folder (ParityInputError naming the field otherwise)."""
    folder = Path(folder)
    cfg = read_hf_config(folder, "an AWQ model folder")
    q = quantization_config(cfg)
    where = folder / "config.json"
    if q is None or str(q.get("quant_method", "")).lower() != "awq":
        raise ParityInputError(f"{where}: 'quantization_config.quant_method' is not 'awq'; expected the config "
                               "`lmdeploy lite auto_awq` or `parity quantize` writes.")
    bits, gs, zp, ver = q.get("bits"), q.get("group_size"), q.get("zero_point", True), q.get("version", "gemm")
    if bits != 4 or isinstance(bits, bool):
        raise ParityInputError(f"{where}: 'quantization_config.bits' is {bits!r}; TurboMind's AWQ path (W4A16) "
                               "needs 4.")
    if not isinstance(gs, int) or isinstance(gs, bool) or gs < 1:
        raise ParityInputError(f"{where}: 'quantization_config.group_size' is {gs!r}; expected a positive integer "
                               "(lmdeploy 0.7.1 converts group size 128 only).")
    if zp is not True:
        raise ParityInputError(f"{where}: 'quantization_config.zero_point' is {zp!r}; lmdeploy's AWQ format is "
                               "asymmetric (zero_point: true, qzeros present), the only one TurboMind converts.")
    if ver != "gemm":
        raise ParityInputError(f"{where}: 'quantization_config.version' is {ver!r}; lmdeploy converts 'gemm' only.")
    return AwqConfig(bits=4, group_size=gs, zero_point=True, version=ver)


@dataclass
class QuantLinear:
    """One quantized linear of an AWQ checkpoint, unpacked: q [in, out] u4, zeros/scales [in/g, out]."""

    q: torch.Tensor
    zeros: torch.Tensor
    scales: torch.Tensor
    group_size: int

    def weight(self) -> torch.Tensor:
        """The HF weight [out, in] in float32, exact."""
        return dequantize_exact(self.q, self.zeros, self.scales, self.group_size).t().contiguous()


def quant_linears(state: dict[str, torch.Tensor], cfg: AwqConfig, where: Path) -> dict[str, QuantLinear]:
    """prefix -> QuantLinear for every `prefix.qweight` in `state`, shapes checked against the group size."""
    out: dict[str, QuantLinear] = {}
    for key in state:
        if not key.endswith(".qweight"):
            continue
        prefix = key[: -len(".qweight")]
        parts = {p: state.get(f"{prefix}.{p}") for p in QUANT_PARTS}
        missing = [p for p, t in parts.items() if t is None]
        if missing:
            raise ParityInputError(f"{where}: {prefix} has qweight but no {', '.join(missing)}; expected qweight, "
                                   "qzeros and scales for every quantized linear.")
        qw, qz, sc = parts["qweight"], parts["qzeros"], parts["scales"]
        if qw.dtype != torch.int32 or qz.dtype != torch.int32:
            raise ParityInputError(f"{where}: {prefix}.qweight/qzeros are {qw.dtype}/{qz.dtype}; expected int32 "
                                   "(eight 4-bit values per element).")
        rows, cols = qw.shape[0], qw.shape[1] * 8
        g = cfg.group_size
        if rows % g or tuple(qz.shape) != (rows // g, cols // 8) or tuple(sc.shape) != (rows // g, cols):
            raise ParityInputError(
                f"{where}: {prefix} has qweight {list(qw.shape)}, qzeros {list(qz.shape)}, scales {list(sc.shape)}; "
                f"with quantization_config.group_size={g} expected qzeros [{rows // g if rows % g == 0 else '?'}, "
                f"{cols // 8}] and scales [{rows // g if rows % g == 0 else '?'}, {cols}] (in/g rows).")
        out[prefix] = QuantLinear(unpack_awq(qw), unpack_awq(qz), sc.to(torch.float16), g)
    return out


def dequantized_state(folder: Path | str, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """The AWQ model as a plain HF state dict: each quantized linear's `weight` dequantized exactly
    ((q - z) * s), every other tensor as stored, cast to `dtype`."""
    folder = Path(folder)
    cfg = awq_config(folder)
    state = load_state(folder)
    lins = quant_linears(state, cfg, folder)
    out: dict[str, torch.Tensor] = {}
    for k, v in state.items():
        prefix, _, part = k.rpartition(".")
        if prefix in lins and part in QUANT_PARTS:
            continue
        out[k] = v.to(dtype) if v.is_floating_point() else v
    for prefix, lin in lins.items():
        out[f"{prefix}.weight"] = lin.weight().to(dtype)
    return out


def load_awq_model(folder: Path | str, trust_remote_code: bool, dtype: torch.dtype = torch.float32):
    """The AWQ model as an HF model computing with its dequantized weights (the reference a quantized deployment
    is judged against). transformers' own AWQ loading needs the autoawq kernels (GPU); instead the model is built
    from its config without `quantization_config` and given `dequantized_state`."""
    from transformers import AutoConfig, AutoModelForCausalLM

    folder = Path(folder)
    state = dequantized_state(folder, dtype)
    config = AutoConfig.from_pretrained(str(folder), trust_remote_code=trust_remote_code)
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code, dtype=dtype,
                                             attn_implementation="eager")
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing:
        raise ParityInputError(
            f"The AWQ checkpoint in {folder} lacks {len(missing)} tensor(s) the model defines, e.g. "
            f"{', '.join(sorted(missing)[:3])}; expected every tensor (quantized linears as qweight/qzeros/scales).")
    if unexpected:
        raise ParityInputError(
            f"The AWQ checkpoint in {folder} holds {len(unexpected)} tensor(s) the model does not define, e.g. "
            f"{', '.join(sorted(unexpected)[:3])}; it does not belong to this config.json.")
    return model
