"""The quantization section of a parity report (`parity run AWQ --original MODEL`): did the smoothing keep PLoRA
(structural, `parity.quant.smoothing`), kept apart from the faithfulness verdict of the deployment."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..errors import ParityInputError
from ..hfconfig import read_hf_config
from ..records import Finding, PreparedInput
from .awq_folder import awq_config, is_awq_folder


def check_original(model: Path, original: Path) -> None:
    """--original makes sense only for a quantized model and an unquantized original (exit 2 otherwise)."""
    if not is_awq_folder(model):
        raise ParityInputError(f"--original {original} was given, but {model / 'config.json'} has no AWQ "
                               "quantization_config; --original compares a quantized model with the model it was "
                               "quantized from.")
    awq_config(model)
    cfg = read_hf_config(original, "the original (unquantized) model folder")
    from ..reference.qwen2 import is_qwen2_plora

    if is_qwen2_plora(cfg):
        raise ParityInputError(f"--original {original} is a Qwen2 PLoRA model; lmdeploy quantizes its XComposer2 "
                               "disguise, so pass the disguise that was quantized (`parity disguise` output) as "
                               "--original.")
    if is_awq_folder(original):
        raise ParityInputError(f"--original {original} is itself an AWQ folder; pass the floating-point model that "
                               "was quantized.")
    qcfg = read_hf_config(model)
    for key in ("num_hidden_layers", "hidden_size", "intermediate_size"):
        if cfg.get(key) != qcfg.get(key):
            raise ParityInputError(f"--original {original}: config.json {key}={cfg.get(key)!r} but the quantized "
                                   f"model has {qcfg.get(key)!r}; they are not the same model.")


def quantization_section(model: Path, original: Path, prepared: list[PreparedInput],
                         trust_remote_code: bool) -> tuple[list[Finding], dict[str, Any]]:
    """Findings (`lora_smoothing_mismatch`) and the report's "quantization" section: the smoothing check and the
    cost of quantization per layer and position class (`parity.quant.cost`)."""
    from .cost import quantization_cost
    from .smoothing import check_smoothing, smoothing_findings

    verdicts = check_smoothing(original, model)
    findings = smoothing_findings(verdicts)
    cost = quantization_cost(model, original, prepared, trust_remote_code)
    return findings, {"original": str(original), "smoothing": [v.row() for v in verdicts],
                      "smoothing_kept": not findings, "cost": cost}


def kv_cache_section(ref, prepared: list[PreparedInput], quant_policy: int,
                     dtype) -> tuple[list[Finding], dict[str, Any]]:
    """The KV cache's cost per layer and position class (`parity.quant.cost.kv_cache_cost`) and a `kv_quant_drift`
    finding at the first layer where it exceeds its budget."""
    from .cost import kv_cache_cost
    from .kv import bits_for_policy

    cost = kv_cache_cost(ref, prepared, bits_for_policy(quant_policy), dtype)
    over = [r for r in cost["rows"] if r["over_budget"]]
    findings = []
    if over:
        first = min(over, key=lambda r: r["layer"])
        where = sorted({r["class"] for r in over if r["layer"] == first["layer"]})
        findings.append(Finding(
            check="quant", severity="error", cause="kv_quant_drift", layer=first["layer"], module="attention",
            positions=where[0] if len(where) == 1 and where[0] in ("image", "text") else "all", case=first["case"],
            message=(f"The u{cost['bits']} KV cache (quant_policy {quant_policy}) moves layer {first['layer']}'s output by "
                     f"{first['drift']:.3g} on {first['class']} rows, more than {cost['over_budget_factor']:g}x its "
                     f"budget {first['budget']:.3g} (the same storage format with exact arithmetic); {len(over)} (layer, class) "
                     "points are over budget."),
            metrics={"drift": first["drift"], "budget": first["budget"], "over": len(over)}))
    return findings, cost
