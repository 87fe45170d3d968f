"""What every check receives and returns. Checks read captured traces and audits; they never run models."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..compare.align import CaseTraces
from ..compare.thresholds import Thresholds
from ..records import Finding, PointResult, RuntimeSemantics


@dataclass
class CheckContext:
    hf_config: dict[str, Any]
    # per layer, per canonical linear: {"rank", "scale", "has_bias"} as present in the HF model
    hf_plora: dict[int, dict[str, dict[str, Any]]]
    hf_tm_tensors: dict[str, Any] | None      # HF weights transformed to TurboMind names/layout (lazy mapping)
    workspace: Any | None                     # parity.deploy.workspace.Workspace
    semantics: RuntimeSemantics
    serve_from: str
    cases: list[CaseTraces]
    points: list[PointResult]
    thresholds: Thresholds
    numeric: str
    model: Path | None = None                 # the HF model folder (the source check reads its fingerprint)


@dataclass
class CheckOutput:
    findings: list[Finding] = field(default_factory=list)
    table: list[dict[str, Any]] = field(default_factory=list)


def hf_plora_of(linears: dict[int, dict[str, Any]]) -> dict[int, dict[str, dict[str, Any]]]:
    """`CheckContext.hf_plora` from the reference anatomy's PLoRA linears (layer -> canonical linear -> linear)."""
    return {
        i: {p: {"rank": lin.rank, "scale": lin.scale, "has_bias": lin.module.bias is not None}
            for p, lin in lins.items()}
        for i, lins in linears.items()
    }
