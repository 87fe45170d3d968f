"""What did quantization cost, and where? (`parity run AWQ --original MODEL`; kept apart from the faithfulness
verdict.)

Four HF models run on the same prepared rows (the run's own input embeddings, so the inputs are identical for
all): the original; `smoothing` — the original with only the smoothing applied (recovered scales,
the quantized model's own norms and PLoRA tensors, no rounding); the quantized model (its dequantized weights);
and `budget` — the original with round-to-nearest int4 of its base weights at the same group size and no
smoothing (what plain rounding of these very weights costs). Each decoder layer's output is compared with the
original's, per position class (image / text / BOS rows): relative L2 over the class's rows. The quantized
model's drift splits into the smoothing's share and the rounding's; `over_budget` marks a (layer, class) whose
quantized drift exceeds twice the budget's.
Models are loaded one after another and only the layer outputs are kept.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ..records import PreparedInput
from .pack import dequantize_exact, quantize_rtn

OVER_BUDGET_FACTOR = 2.0
VARIANTS = ("smoothing", "quantized", "budget")


def _layer_outputs(ref, prepared: PreparedInput) -> list[torch.Tensor]:
    outs: list[torch.Tensor] = []
    hooks = [layer.register_forward_hook(lambda m, a, o: outs.append((o[0] if isinstance(o, tuple) else o)[0]
                                                                      .detach().double().clone()))
             for layer in ref.anatomy.layers]
    try:
        with torch.no_grad():
            ref.model(inputs_embeds=prepared.embeddings.unsqueeze(0).to(ref.dtype),
                      im_mask=prepared.image_rows.unsqueeze(0), use_cache=False)
    finally:
        for h in hooks:
            h.remove()
    return outs


def _classes(prepared: PreparedInput) -> dict[str, torch.Tensor]:
    img = prepared.image_rows.bool()
    bos = prepared.bos_rows.bool()
    return {"image": img, "text": ~img & ~bos, "bos": bos}


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    d = float(torch.linalg.norm(b))
    return float(torch.linalg.norm(a - b)) / d if d else 0.0


def _smoothing_only(ref, st, scales) -> None:
    """Turn the loaded original into the smoothing-only model, in place."""
    from .smoothing import smoothing_pairs

    norm_pairs, fc_pairs = smoothing_pairs()
    params = dict(ref.model.named_parameters())
    new: dict[str, torch.Tensor] = {}

    def cur(key: str) -> torch.Tensor:  # the weight with the scales applied so far (w3: norm's, then w3 -> w2's)
        return new[key] if key in new else st.get("orig", key)

    for i in st.layers:
        p = f"model.layers.{i}."
        for norm, fcs in norm_pairs.items():
            s = scales[(i, norm)]
            new[p + norm + ".weight"] = st.get("quant", p + norm + ".weight")
            for fc in fcs:
                new[p + fc + ".weight"] = cur(p + fc + ".weight") * s.view(1, -1)
        for pre, fcs in fc_pairs.items():
            s = scales[(i, pre)]
            new[p + pre + ".weight"] = cur(p + pre + ".weight") / s.view(-1, 1)
            for fc in fcs:
                new[p + fc + ".weight"] = cur(p + fc + ".weight") * s.view(1, -1)
        for key in params:  # the PLoRA tensors exactly as the quantized model has them
            if key.startswith(p) and (".Plora_A." in key or ".Plora_B." in key):
                new[key] = st.get("quant", key)
    for key, value in new.items():
        params[key].data.copy_(value.to(params[key].dtype))


def _rounded(ref, group_size: int) -> None:
    """Round-to-nearest int4 of every PLoRA linear's base weight, in place (the budget model)."""
    for lins in ref.anatomy.linears.values():
        for lin in lins.values():
            w = lin.module.weight
            q, z, s = quantize_rtn(w.detach().t().float(), 4, group_size)
            w.data.copy_(dequantize_exact(q, z, s, group_size).t().to(w.dtype))


def quantization_cost(model: Path, original: Path, prepared_cases: list[PreparedInput],
                      trust_remote_code: bool) -> dict[str, Any]:
    """Per layer and position class: the drift of each variant against the original (see module doc)."""
    from ..reference.loader import load_reference
    from .awq_folder import awq_config
    from .smoothing import SmoothingStates, recovered_scales

    st = SmoothingStates(original, model)
    scales = recovered_scales(st)
    group = awq_config(model).group_size
    outputs: dict[str, list[list[torch.Tensor]]] = {}
    from transformers.utils import logging as hf_logging

    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # four more loads of sharded checkpoints: no progress bars on the terminal
    try:
        for variant in ("original",) + VARIANTS:
            ref = load_reference(model if variant == "quantized" else original, trust_remote_code)
            if variant == "smoothing":
                _smoothing_only(ref, st, scales)
            elif variant == "budget":
                _rounded(ref, group)
            outputs[variant] = [_layer_outputs(ref, p) for p in prepared_cases]
            del ref
    finally:
        if bars:
            hf_logging.enable_progress_bar()
    rows: list[dict[str, Any]] = []
    for c, prepared in enumerate(prepared_cases):
        classes = _classes(prepared)
        for layer, base in enumerate(outputs["original"][c]):
            for cls, mask in classes.items():
                if not bool(mask.any()):
                    continue
                row: dict[str, Any] = {"case": prepared.name, "layer": layer, "class": cls, "rows": int(mask.sum())}
                for v in VARIANTS:
                    row[v] = _rel(outputs[v][c][layer][mask], base[mask])
                row["over_budget"] = row["quantized"] > OVER_BUDGET_FACTOR * row["budget"]
                rows.append(row)
    return {"variants": {"smoothing": "original with the recovered smoothing only (no rounding)",
                         "quantized": "the AWQ model (dequantized weights)",
                         "budget": f"original with round-to-nearest int4 (g{group}) of its base weights, no smoothing"},
            "over_budget_factor": OVER_BUDGET_FACTOR, "rows": rows}


def kv_cache_cost(ref, prepared_cases: list[PreparedInput], bits: int, dtype: torch.dtype) -> dict[str, Any]:
    """Per layer and position class: how far TurboMind's quantized KV cache moves each decoder layer's output
    (relative L2 against the same model with an unquantized cache), and the budget: the same storage format with
    exact arithmetic in between (`kv_reference.ideal_kv`). `over_budget`: more than OVER_BUDGET_FACTOR times
    the budget (and above float32 noise)."""
    from .kv_reference import ideal_kv, quantized_kv_cache, turbomind_kv

    runs: dict[str, list[list[torch.Tensor]]] = {}
    for name, quantizer in (("plain", None), ("turbomind", turbomind_kv(bits, dtype)), ("budget", ideal_kv(bits, dtype))):
        with quantized_kv_cache(ref.model, quantizer):
            runs[name] = [_layer_outputs(ref, p) for p in prepared_cases]
    rows: list[dict[str, Any]] = []
    for c, prepared in enumerate(prepared_cases):
        for layer, base in enumerate(runs["plain"][c]):
            for cls, mask in _classes(prepared).items():
                if not bool(mask.any()):
                    continue
                tm = _rel(runs["turbomind"][c][layer][mask], base[mask])
                budget = _rel(runs["budget"][c][layer][mask], base[mask])
                rows.append({"case": prepared.name, "layer": layer, "class": cls, "rows": int(mask.sum()),
                             "drift": tm, "budget": budget,
                             "over_budget": tm > OVER_BUDGET_FACTOR * budget and tm > 1e-5})
    return {"bits": bits, "dtype": str(dtype).replace("torch.", ""), "over_budget_factor": OVER_BUDGET_FACTOR,
            "rows": rows}
