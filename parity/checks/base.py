"""What every check receives and returns. Checks read captured traces and audits; they never run models."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from ..compare.align import CaseTraces
from ..compare.thresholds import Thresholds
from ..points import TM_LINEAR_NAMES
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


@dataclass
class CheckOutput:
    findings: list[Finding] = field(default_factory=list)
    table: list[dict[str, Any]] = field(default_factory=list)


_TM_TO_CANON = {v: k for k, v in TM_LINEAR_NAMES.items()}
_NAME_RE = re.compile(r"^layers\.(\d+)\.(attention\.w_qkv|attention\.wo|feed_forward\.w[123]|attention_norm|ffn_norm)\.")


def tm_name_location(name: str) -> tuple[int | None, str | None]:
    """`layers.3.attention.w_qkv.lora_b.weight` -> (3, "attention.wqkv"); globals map to their points."""
    m = _NAME_RE.match(name)
    if m:
        part = m.group(2)
        return int(m.group(1)), _TM_TO_CANON.get(part, part)
    if name.startswith("tok_embeddings"):
        return None, "embeddings"
    if name.startswith("norm"):
        return None, "norm"
    if name.startswith("output"):
        return None, "output"
    return None, None
