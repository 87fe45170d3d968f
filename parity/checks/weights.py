"""Weights audit: every workspace tensor against the HF tensor transformed to TurboMind's layout, exactly. Each
row and finding names the tensor as both sides spell it: the workspace's files (with their tensor-parallel rank,
what `ls triton_models/weights` shows) and the HF checkpoint's tensor."""

from __future__ import annotations

import re

import torch

from ..errors import ParityInputError
from ..deploy.expected import fingerprint
from ..deploy.layout import rank_file_name
from ..records import Finding
from ..names import hf_name_of_tm, qwen2_names_of_tm, tm_name_location
from ..reference.loader import model_family
from .base import CheckContext, CheckOutput


def _hint(name: str, got: torch.Tensor, hf) -> str:
    """Say where a mismatching tensor seems to come from. Fingerprints (shape, sum, |sum|) only shortlist
    candidates — sums ignore order — and every claim is confirmed by an exact comparison."""
    fp = fingerprint(got)
    stem = re.sub(r"^layers\.\d+\.", "", name)
    prints = getattr(hf, "fingerprints", None) or {k: fingerprint(v) for k, v in hf.items()}
    for other, ofp in prints.items():
        if other != name and ofp == fp and torch.equal(hf[other].to(got.dtype), got):
            return f"its values equal the reference's {other}"
    if got.dim() == 2:
        t = got.t().contiguous()
        for other, ofp in prints.items():
            if ofp == fingerprint(t) and torch.equal(hf[other].to(got.dtype), t):
                return ("the transpose was forgotten" if other == name
                        else f"its values equal the transpose of the reference's {other}")
    if prints.get(name, (None,))[1:] == fp[1:]:
        return "it holds the expected values in another order (a layout error: packing, permutation or split)"
    return f"no other {stem} matches"


def _faithful_copy(got: torch.Tensor, want: torch.Tensor) -> bool:
    """Equal where both are numbers and non-finite at the same places with the same values (NaN == NaN)."""
    nan = torch.isnan(want)
    return bool(nan.any()) and torch.equal(torch.isnan(got), nan) and torch.equal(got[~nan], want[~nan])


def tensor_names(name: str, tp: int, qwen2: bool = False) -> dict[str, str]:
    """The row's names: the merged TurboMind name, its workspace file(s) and the HF checkpoint's tensor (for a
    Qwen2 PLoRA model, the original's tensors its disguise fused)."""
    files = dict.fromkeys(rank_file_name(name, r) for r in range(max(1, tp)))
    hf = qwen2_names_of_tm(name) if qwen2 else hf_name_of_tm(name)
    return {"tensor": name, "file": ", ".join(files), "hf_tensor": hf}


def _says(names: dict[str, str]) -> str:
    """'workspace file layers.0.attention.w_qkv.0.weight (HF model.layers.0.attention.wqkv.weight)'."""
    many = "," in names["file"]
    return f"workspace file{'s' if many else ''} {names['file']} (HF {names['hf_tensor']})"


def run(ctx: CheckContext) -> CheckOutput:
    out = CheckOutput()
    ws, hf = ctx.workspace, ctx.hf_tm_tensors
    if ws is None or hf is None:
        return out
    present = set(ws.names())
    tp = int(ws.model.tp)
    qwen2 = model_family(ctx.hf_config) == "qwen2-plora"
    for name in sorted(set(hf) | present, key=_order):
        layer, module = tm_name_location(name)
        names = tensor_names(name, tp, qwen2)
        want = hf.get(name)
        if want is None:
            out.table.append({**names, "hf_tensor": None, "status": "unexpected", "shape": None, "max_abs_diff": None})
            out.findings.append(Finding(
                check="weights", severity="warning", cause="weight_mismatch", layer=layer, module=module,
                positions="all", message=f"Workspace file(s) {names['file']} have no counterpart in the HF model.",
                metrics={"tensor": name, "file": names["file"]}))
            continue
        if name not in present:
            lora = ".lora_" in name
            out.table.append({**names, "status": "missing", "shape": list(want.shape), "max_abs_diff": None})
            out.findings.append(Finding(
                check="weights", severity="error", cause="missing_tensor", layer=layer, module=module,
                positions="image" if lora else "all",
                message=(f"The workspace has no {names['file']} (expected from HF {names['hf_tensor']}, shape "
                         f"{list(want.shape)})."), metrics={**names}))
            continue
        try:
            got = ws.tensor(name)
        except ParityInputError as e:  # the file's size does not fit what config.yaml implies for it
            out.table.append({**names, "status": "shape", "shape": None, "max_abs_diff": None,
                              "expected": list(want.shape)})
            out.findings.append(Finding(
                check="weights", severity="error", cause="shape_mismatch", layer=layer, module=module,
                positions="image" if ".lora_" in name else "all", message=f"{e} (HF {names['hf_tensor']})",
                metrics={**names}))
            continue
        want = want.to(got.dtype)
        if tuple(got.shape) != tuple(want.shape):
            out.table.append({**names, "status": "shape", "shape": list(got.shape), "max_abs_diff": None,
                              "expected": list(want.shape)})
            out.findings.append(Finding(
                check="weights", severity="error", cause="shape_mismatch", layer=layer, module=module,
                positions="all", message=f"{_says(names)} has shape {list(got.shape)}, expected {list(want.shape)}.",
                metrics={**names}))
            continue
        if torch.equal(got, want):
            out.table.append({**names, "status": "ok", "shape": list(got.shape), "max_abs_diff": 0.0})
            continue
        if _faithful_copy(got, want):  # unequal only through NaN != NaN: the checkpoint itself is broken
            bad = int((~torch.isfinite(want)).sum())
            out.table.append({**names, "status": "nonfinite in checkpoint", "shape": list(got.shape),
                              "max_abs_diff": 0.0})
            out.findings.append(Finding(
                check="weights", severity="error", cause="nonfinite", layer=layer, module=module,
                positions="image" if ".lora_" in name else "all",
                message=(f"The reference is broken, not the conversion: the HF checkpoint's {names['hf_tensor']} holds "
                         f"{bad} non-finite value(s), which the workspace's {names['file']} copies faithfully. Fix or "
                         "re-export the checkpoint; no comparison against it can pass."),
                metrics={"nonfinite_reference": bad, **names}))
            continue
        diff = (got.double() - want.double()).abs()
        nonfinite = int((~torch.isfinite(got)).sum())
        mad = float(diff[torch.isfinite(diff)].max()) if bool(torch.isfinite(diff).any()) else float("inf")
        lora = ".lora_" in name
        hint = _hint(name, got, hf)
        out.table.append({**names, "status": "mismatch", "shape": list(got.shape), "max_abs_diff": mad,
                          "note": hint})
        out.findings.append(Finding(
            check="weights", severity="error", cause="nonfinite" if nonfinite else "weight_mismatch",
            layer=layer, module=module, positions="image" if lora else "all",
            message=(f"{_says(names)} differs from the HF tensor after the layout transform (max |diff| {mad:.3g}"
                     f"{f', {nonfinite} non-finite' if nonfinite else ''}); {hint}."),
            metrics={"max_abs_diff": mad, "nonfinite": nonfinite, **names}))
    return out


def _order(name: str) -> tuple:
    m = re.match(r"layers\.(\d+)\.(.*)", name)
    return (int(m.group(1)), m.group(2)) if m else (-1 if name.startswith("tok") else 10**9, name)
