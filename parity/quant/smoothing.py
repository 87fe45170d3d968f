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


def check_smoothing(original: Path | str, quantized: Path | str) -> list[TensorVerdict]:
    """Every PLoRA tensor of every smoothed pair of `quantized` (an AWQ folder, or a smoothed fp folder) against
    `original`."""
    original, quantized = Path(original), Path(quantized)
    orig = load_state(original)
    quant = load_state(quantized)
    lins = quant_linears(quant, awq_config(quantized), quantized) if is_awq_folder(quantized) else {}

    def get(state: dict[str, torch.Tensor], key: str, where: Path) -> torch.Tensor:
        if key not in state:
            raise ParityInputError(f"{where} has no tensor {key}; the smoothing check compares the original model "
                                   "with its quantized version, tensor by tensor (same architecture and layers).")
        return state[key].double()

    def weight(prefix: str) -> torch.Tensor:
        if prefix in lins:
            return lins[prefix].weight().double()
        return get(quant, f"{prefix}.weight", quantized)

    layers = sorted({int(k.split(".")[2]) for k in orig if k.startswith("model.layers.")})
    norm_pairs, fc_pairs = smoothing_pairs()
    out: list[TensorVerdict] = []
    for i in layers:
        p = f"model.layers.{i}."
        for norm, fcs in norm_pairs.items():
            n_o, n_q = get(orig, p + norm + ".weight", original), get(quant, p + norm + ".weight", quantized)
            ok = (n_o != 0) & (n_q != 0)
            s = torch.where(ok, n_o / torch.where(ok, n_q, torch.ones_like(n_q)), torch.ones_like(n_o))
            for fc in fcs:
                a_key = p + fc + ".Plora_A.weight"
                if a_key not in orig:
                    continue
                a_o, a_q = get(orig, a_key, original), get(quant, a_key, quantized)
                r = _ratio(a_q, a_o, dim=0)  # per input column
                change = _rel(a_q / s.view(1, -1), a_o)  # the LoRA sees x / s: effective A = A' diag(1/s)
                out.append(_verdict(i, f"{norm} -> {fc}", f"{fc}.Plora_A", fc, s, r, 1, change))
        for pre, fcs in fc_pairs.items():
            w_o, w_q = get(orig, p + pre + ".weight", original), weight(p + pre)
            s = 1.0 / _ratio(w_q, w_o, dim=1)  # producer rows were divided by s
            b_key = p + pre + ".Plora_B.weight"
            if b_key in orig:
                b_o, b_q = get(orig, b_key, original), get(quant, b_key, quantized)
                r = _ratio(b_q, b_o, dim=1)
                change = _rel(b_q * s.view(-1, 1), b_o)  # the consumers multiply the producer's output by s
                out.append(_verdict(i, f"{pre} -> {', '.join(fcs)}", f"{pre}.Plora_B", pre, s, r, -1, change))
            for fc in fcs:
                a_key = p + fc + ".Plora_A.weight"
                if a_key not in orig:
                    continue
                a_o, a_q = get(orig, a_key, original), get(quant, a_key, quantized)
                r = _ratio(a_q, a_o, dim=0)
                change = _rel(a_q / s.view(1, -1), a_o)
                out.append(_verdict(i, f"{pre} -> {', '.join(fcs)}", f"{fc}.Plora_A", fc, s, r, 1, change))
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
