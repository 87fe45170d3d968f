"""Weights audit: every workspace tensor against the HF tensor transformed to TurboMind's layout, exactly."""

from __future__ import annotations

import re

import torch

from ..errors import ParityInputError
from ..deploy.expected import fingerprint
from ..records import Finding
from ..names import tm_name_location
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


def run(ctx: CheckContext) -> CheckOutput:
    out = CheckOutput()
    ws, hf = ctx.workspace, ctx.hf_tm_tensors
    if ws is None or hf is None:
        return out
    present = set(ws.names())
    ok = 0
    for name in sorted(set(hf) | present, key=_order):
        layer, module = tm_name_location(name)
        want = hf.get(name)
        if want is None:
            out.table.append({"tensor": name, "status": "unexpected", "shape": None, "max_abs_diff": None})
            out.findings.append(Finding(
                check="weights", severity="warning", cause="weight_mismatch", layer=layer, module=module,
                positions="all", message=f"Workspace tensor {name} has no counterpart in the HF model."))
            continue
        if name not in present:
            lora = ".lora_" in name
            out.table.append({"tensor": name, "status": "missing", "shape": list(want.shape), "max_abs_diff": None})
            out.findings.append(Finding(
                check="weights", severity="error", cause="missing_tensor", layer=layer, module=module,
                positions="image" if lora else "all",
                message=f"Workspace has no {name} (expected shape {list(want.shape)} from the HF model)."))
            continue
        try:
            got = ws.tensor(name)
        except ParityInputError as e:  # the file's size does not fit what config.yaml implies for it
            out.table.append({"tensor": name, "status": "shape", "shape": None, "max_abs_diff": None,
                              "expected": list(want.shape)})
            out.findings.append(Finding(
                check="weights", severity="error", cause="shape_mismatch", layer=layer, module=module,
                positions="image" if ".lora_" in name else "all", message=str(e)))
            continue
        want = want.to(got.dtype)
        if tuple(got.shape) != tuple(want.shape):
            out.table.append({"tensor": name, "status": "shape", "shape": list(got.shape), "max_abs_diff": None,
                              "expected": list(want.shape)})
            out.findings.append(Finding(
                check="weights", severity="error", cause="shape_mismatch", layer=layer, module=module,
                positions="all", message=f"{name} has shape {list(got.shape)}, expected {list(want.shape)}."))
            continue
        if torch.equal(got, want):
            ok += 1
            out.table.append({"tensor": name, "status": "ok", "shape": list(got.shape), "max_abs_diff": 0.0})
            continue
        if _faithful_copy(got, want):  # unequal only through NaN != NaN: the checkpoint itself is broken
            bad = int((~torch.isfinite(want)).sum())
            out.table.append({"tensor": name, "status": "nonfinite in checkpoint", "shape": list(got.shape),
                              "max_abs_diff": 0.0})
            out.findings.append(Finding(
                check="weights", severity="error", cause="nonfinite", layer=layer, module=module,
                positions="image" if ".lora_" in name else "all",
                message=(f"The reference is broken, not the conversion: the HF checkpoint's tensor for {name} holds "
                         f"{bad} non-finite value(s), which the workspace copies faithfully. Fix or re-export the "
                         "checkpoint; no comparison against it can pass."),
                metrics={"nonfinite_reference": bad, "tensor": name}))
            continue
        diff = (got.double() - want.double()).abs()
        nonfinite = int((~torch.isfinite(got)).sum())
        mad = float(diff[torch.isfinite(diff)].max()) if bool(torch.isfinite(diff).any()) else float("inf")
        lora = ".lora_" in name
        hint = _hint(name, got, hf)
        out.table.append({"tensor": name, "status": "mismatch", "shape": list(got.shape), "max_abs_diff": mad,
                          "note": hint})
        out.findings.append(Finding(
            check="weights", severity="error", cause="nonfinite" if nonfinite else "weight_mismatch",
            layer=layer, module=module, positions="image" if lora else "all",
            message=(f"{name} differs from the HF tensor after the layout transform (max |diff| {mad:.3g}"
                     f"{f', {nonfinite} non-finite' if nonfinite else ''}); {hint}."),
            metrics={"max_abs_diff": mad, "nonfinite": nonfinite, "tensor": name}))
    return out


def _order(name: str) -> tuple:
    m = re.match(r"layers\.(\d+)\.(.*)", name)
    return (int(m.group(1)), m.group(2)) if m else (-1 if name.startswith("tok") else 10**9, name)
