"""The inputs stage of a run: every case laid out for both sides before any capture starts, so the resource
guard judges all their row counts first (parity.resources), then each side's call built from its own rows.
The image path (parity.deploy.image_input) gives each side its image rows and judges the difference."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .compare.thresholds import Thresholds
from .deploy.image_input import ImagePath
from .inputs import engine_call, hf_call
from .records import CanonicalInput, CaseInput, FaultHooks, Finding
from .resources import check_resources


@dataclass
class LaidOutCases:
    """The run's cases as both sides receive them, what the image path found, and its report section."""

    cases: list[CaseInput]
    findings: list[Finding] = field(default_factory=list)
    image_input: dict[str, Any] = field(default_factory=dict)   # the report's engine.image_input; {}: none


def lay_out_cases(cases: list[CanonicalInput], model: Path, ref, workspace, thresholds: Thresholds,
                  faults: FaultHooks, *, guard: bool, decode: int, scratch: Path,
                  floor_dtype: torch.dtype) -> LaidOutCases:
    """`ref`: the reference model (`reference.loader.ReferenceModel`), `workspace` the deployment's. With `guard`,
    a case longer than the model allows, or one that cannot fit in memory or on disk under `scratch` with its
    `decode` generated rows and a noise floor at `floor_dtype`, is refused here (exit 2)."""
    images = ImagePath(model, ref, workspace, thresholds.image_feature_rel, faults.lmdeploy_vision_fault)
    laid_out = [images.prepare(case) for case in cases]
    if guard:
        rows = [(p.name, len(p.token_ids) + decode) for p, _, _ in laid_out]  # prompt + generated
        check_resources(ref.config, rows, scratch=scratch, model=str(model),
                        floor_bytes=torch.empty((), dtype=floor_dtype).element_size())
    out = []
    for case, (prepared, eng_prepared, _) in zip(cases, laid_out):
        hf_p = faults.mutate_hf_prepared(prepared) if faults.mutate_hf_prepared else prepared
        eng_p = faults.mutate_engine_prepared(eng_prepared) if faults.mutate_engine_prepared else eng_prepared
        ecall = engine_call(eng_p)
        if faults.mutate_engine_call:
            ecall = faults.mutate_engine_call(case.name, ecall)
        out.append(CaseInput(case.name, hf_p, hf_call(hf_p), ecall))
    return LaidOutCases(out, [f for _, _, found in laid_out for f in found], images.section)
