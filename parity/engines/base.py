"""The one interface of the deployment side (like Polygraphy's runners): an engine is built from an
`EngineSetup`, then `activate()` -> `EngineSettings`, `infer(EngineRequest)` -> `EngineRun` per case,
`deactivate()` -> `EngineSummary`. The pipeline never asks which engine it drives; what differs between
engines (the precision they are judged at, whether they can be teacher-forced, follow-up runs such as the
live engine's per-layer deployments) is stated by the engine in its settings or done inside it."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch

from ..records import (EngineRanges, EngineRequest, EngineRun, EngineSettings, EngineSummary, FaultHooks,
                       RuntimeSemantics)
from ..trace import TraceMeta, TraceWriter


@dataclass
class EngineSetup:
    """What any engine may need to deploy the model: the run's options that concern the deployment."""

    model: Path
    workspace: Any                   # parity.deploy.workspace.Workspace
    semantics: RuntimeSemantics
    numeric: str = "fp32"            # "fp32" | "emulate" (what the user asked; an engine may judge otherwise)
    serve_from: str = "hf"           # "hf" | "workspace"
    options: dict[str, Any] = field(default_factory=dict)  # engine-specific (LiveTurboMind's session_len, ...)
    layers: str | None = None        # "every" | "bisect": per-layer follow-up runs, for engines that offer them
    cache_dir: Path = Path(".cache")
    thresholds: Any = None           # parity.compare.thresholds.Thresholds
    session: Any = None              # parity.reference.session.ReferenceSession
    # where an engine that can choose computes (parity.device)
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    faults: FaultHooks = field(default_factory=FaultHooks)  # the fault catalogue's injections (none: a plain run)
    teacher_forced_everywhere: bool = False  # no teacher forcing on demand (parity.compare.gate)


class Engine(Protocol):
    kind: str

    @classmethod
    def preflight(cls, layers: str | None, serve_from: str) -> None:
        """Refuse (ParityInputError / EngineUnavailable, exit 2) before any model is loaded."""

    def activate(self) -> EngineSettings: ...

    def infer(self, request: EngineRequest) -> EngineRun: ...

    def deactivate(self) -> EngineSummary: ...

    def close(self) -> None:
        """Free what the engine holds; idempotent (the pipeline calls it on every exit path)."""

    # An engine that can generate (`--decode N`) also offers
    #   decode(request, tokens, teacher) -> Iterator[DecodeStep]: prefill request.call, feed tokens[:-1] one
    #       per step (step 0 is the prefill's prediction), teacher-forced against `teacher` (a TraceRows) where
    #       the engine can be (a step without `local` values is judged end to end: the live engine);
    #   decode_info() -> dict: what the last decode did (session_len, KV storage, truncated_at, ...).


def trace_writer(request: EngineRequest, name: str, kind: str, num_layers: int, dtype: str,
                 skip: frozenset[str]) -> TraceWriter:
    """A writer for one of the request's traces; every PLoRA part is kept with `keep_all_parts`."""
    meta = TraceMeta(side=kind, case=request.case, num_layers=num_layers, dtype=dtype)
    return TraceWriter(request.trace_dir / name, meta, skip_parts=frozenset() if request.keep_all_parts else skip)


def ranges_from_info(info: dict[str, Any]) -> EngineRanges:
    """The range validation an engine's run info reports (`parity.deploy.replay.validate_ranges`' verdict)."""
    return EngineRanges(valid=bool(info["ranges_valid"]), reason=info["reason"] or info.get("warning"),
                        accepted=tuple(tuple(r) for r in info["accepted_ranges"]),
                        row_count_mismatch=bool(info["row_count_mismatch"]))
