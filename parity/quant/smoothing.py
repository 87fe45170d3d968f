"""Did the AWQ smoothing keep PLoRA? A structural check on the weights (never on error ratios: the int4 rounding
moves every row by more than the smoothing damage, real-deployments.md §3).

lmdeploy's smoothing (`lite/quantization/awq.py`, pairs from its own NORM_FCS_MAP / FC_FCS_MAP) rescales by a
per-channel `s`:
* norm -> linears: norm weight / s, each linear's base weight columns * s. Recovered exactly from the weights:
  s = original norm / smoothed norm. Kept PLoRA: `Plora_A` columns * s.
* linear -> linears (InternLM2: w3 -> w2): the producer's rows / s, the consumers' columns * s. Recovered from the
  producer's rows: s_j = <w_j, w_j> / <w_j, w'_j> (w' the checkpoint's dequantized row; a least-squares fit that
  averages the int4 rounding out). Kept PLoRA: the producer's `Plora_B` rows / s, the consumers' `Plora_A`
  columns * s.
Each PLoRA tensor's own per-channel ratio (checkpoint / original, least squares) is compared with the scale it
should carry. Where it misses by more than half the typical scale (|log r - log s| against |log s|, medians over
channels), the finding `lora_smoothing_mismatch` names the layer, the linear, the scale range and how much the
LoRA branch changes on image rows (the effective projection's relative change, from the weights alone).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..errors import ParityInputError
from ..records import Finding
from .awq_folder import awq_config, is_awq_folder, load_state, quant_linears

# below this median |log s| the smoothing did (almost) nothing: there is nothing to compensate
MIN_SMOOTHING = 0.01
# a PLoRA tensor carries its scale when it misses it by less than this fraction of the typical scale
MISS_FRACTION = 0.5
XCOMPOSER2_LAYER = "InternLMXComposer2ForCausalLM"


def smoothing_pairs() -> tuple[dict[str, list[str]], dict[str, list[str]]]:
    """(norm -> linears, linear -> linears) as lmdeploy's own AWQ tables give them for XComposer2."""
    from lmdeploy.lite.apis.calibrate import LAYER_TYPE_MAP
    from lmdeploy.lite.quantization.awq import FC_FCS_MAP, NORM_FCS_MAP

    layer = LAYER_TYPE_MAP[XCOMPOSER2_LAYER]
    return dict(NORM_FCS_MAP[layer]), dict(FC_FCS_MAP[layer])


@dataclass
class TensorVerdict:
    layer: int
    pair: str            # "attention_norm -> attention.wqkv"
    tensor: str          # "attention.wqkv.Plora_A"
    module: str          # the linear whose image rows change
    scale_min: float
    scale_max: float
    scale_log: float     # median |log s|
    miss_log: float      # median |log r - log s_expected|
    lora_change: float   # relative Frobenius change of the effective LoRA projection
    status: str          # "kept" | "not compensated" | "no smoothing"

    def row(self) -> dict[str, Any]:
        return dict(self.__dict__)


def _ratio(new: torch.Tensor, old: torch.Tensor, dim: int) -> torch.Tensor:
    """Least-squares per-channel ratio new ≈ r * old along `dim` (NaN where old is all zeros)."""
    num = (new * old).sum(dim=dim)
    den = (old * old).sum(dim=dim)
    return torch.where(den > 0, num / den.clamp(min=1e-300), torch.full_like(den, float("nan")))


def _median_abs_log(x: torch.Tensor) -> float:
    v = x[torch.isfinite(x) & (x > 0)]
    return float(v.log().abs().median()) if v.numel() else 0.0


def _verdict(layer: int, pair: str, tensor: str, module: str, s: torch.Tensor, r: torch.Tensor,
             expected_power: int, change: float) -> TensorVerdict:
    want = s.pow(expected_power)
    size = _median_abs_log(s)
    miss = _median_abs_log(r / want)
    if size < MIN_SMOOTHING:
        status = "no smoothing"
    else:
        status = "kept" if miss <= MISS_FRACTION * size else "not compensated"
    fin = s[torch.isfinite(s)]
    return TensorVerdict(layer, pair, tensor, module, float(fin.min()) if fin.numel() else 1.0,
                         float(fin.max()) if fin.numel() else 1.0, size, miss, change, status)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    d = float(torch.linalg.norm(b))
    return float(torch.linalg.norm(a - b)) / d if d else 0.0


class SmoothingStates:
    """The original's and the quantized model's tensors (an AWQ folder's linears dequantized on demand)."""

    def __init__(self, original: Path | str, quantized: Path | str):
        self.original, self.quantized = Path(original), Path(quantized)
        self.orig = load_state(self.original)
        self.quant = load_state(self.quantized)
        self.lins = (quant_linears(self.quant, awq_config(self.quantized), self.quantized)
                     if is_awq_folder(self.quantized) else {})
        self.layers = sorted({int(k.split(".")[2]) for k in self.orig if k.startswith("model.layers.")})

    def get(self, which: str, key: str) -> torch.Tensor:
        state, where = (self.orig, self.original) if which == "orig" else (self.quant, self.quantized)
        if key not in state:
            raise ParityInputError(f"{where} has no tensor {key}; the smoothing check compares the original model "
                                   "with its quantized version, tensor by tensor (same architecture and layers).")
        return state[key].double()

    def weight(self, prefix: str) -> torch.Tensor:
        """A linear's weight [out, in] in the quantized model (dequantized exactly)."""
        if prefix in self.lins:
            return self.lins[prefix].weight().double()
        return self.get("quant", f"{prefix}.weight")


def recovered_scales(st: SmoothingStates) -> dict[tuple[int, str], torch.Tensor]:
    """(layer, norm or producing linear) -> the smoothing scale s recovered from the weights (see module doc)."""
    norm_pairs, fc_pairs = smoothing_pairs()
    out: dict[tuple[int, str], torch.Tensor] = {}
    for i in st.layers:
        p = f"model.layers.{i}."
        for norm in norm_pairs:
            n_o, n_q = st.get("orig", p + norm + ".weight"), st.get("quant", p + norm + ".weight")
            ok = (n_o != 0) & (n_q != 0)
            out[(i, norm)] = torch.where(ok, n_o / torch.where(ok, n_q, torch.ones_like(n_q)), torch.ones_like(n_o))
        for pre in fc_pairs:
            r = _ratio(st.weight(p + pre), st.get("orig", p + pre + ".weight"), dim=1)
            out[(i, pre)] = torch.where(torch.isfinite(r) & (r != 0), 1.0 / r, torch.ones_like(r))
    return out


def check_smoothing(original: Path | str, quantized: Path | str) -> list[TensorVerdict]:
    """Every PLoRA tensor of every smoothed pair of `quantized` (an AWQ folder, or a smoothed fp folder) against
    `original`."""
    st = SmoothingStates(original, quantized)
    scales = recovered_scales(st)
    norm_pairs, fc_pairs = smoothing_pairs()
    out: list[TensorVerdict] = []

    def plora_a(i: int, pair: str, fc: str, s: torch.Tensor) -> None:
        key = f"model.layers.{i}.{fc}.Plora_A.weight"
        if key not in st.orig:
            return
        a_o, a_q = st.get("orig", key), st.get("quant", key)
        change = _rel(a_q / s.view(1, -1), a_o)  # the LoRA sees x / s: effective A = A' diag(1/s)
        out.append(_verdict(i, pair, f"{fc}.Plora_A", fc, s, _ratio(a_q, a_o, dim=0), 1, change))

    for i in st.layers:
        for norm, fcs in norm_pairs.items():
            for fc in fcs:
                plora_a(i, f"{norm} -> {fc}", fc, scales[(i, norm)])
        for pre, fcs in fc_pairs.items():
            s, pair = scales[(i, pre)], f"{pre} -> {', '.join(fcs)}"
            b_key = f"model.layers.{i}.{pre}.Plora_B.weight"
            if b_key in st.orig:
                b_o, b_q = st.get("orig", b_key), st.get("quant", b_key)
                change = _rel(b_q * s.view(-1, 1), b_o)  # the consumers multiply the producer's output by s
                out.append(_verdict(i, pair, f"{pre}.Plora_B", pre, s, _ratio(b_q, b_o, dim=1), -1, change))
            for fc in fcs:
                plora_a(i, pair, fc, s)
    return out


def smoothing_findings(verdicts: list[TensorVerdict]) -> list[Finding]:
    """One `lora_smoothing_mismatch` finding per (layer, linear) with a PLoRA tensor that lacks its scale."""
    groups: dict[tuple[int, str], list[TensorVerdict]] = {}
    for v in verdicts:
        if v.status == "not compensated":
            groups.setdefault((v.layer, v.module), []).append(v)
    out = []
    for (layer, module), vs in sorted(groups.items()):
        tensors = ", ".join(v.tensor for v in vs)
        lo, hi = min(v.scale_min for v in vs), max(v.scale_max for v in vs)
        change = max(v.lora_change for v in vs)
        out.append(Finding(
            check="quant", severity="error", cause="lora_smoothing_mismatch", layer=layer, module=module,
            positions="image",
            message=(f"AWQ smoothing ({vs[0].pair}) rescaled the base weights by s in [{lo:.3g}, {hi:.3g}] but not "
                     f"{tensors}: image rows get the LoRA of x/s instead of x, which changes the effective LoRA "
                     f"projection by {change:.3g} (relative). Text rows are unaffected. Quantize with `parity "
                     f"quantize --compensate-plora` to fold the scales into Plora_A/Plora_B."),
            metrics={"scale_min": lo, "scale_max": hi, "lora_change": change, "tensors": tensors}))
    return out
