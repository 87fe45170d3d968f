"""The live TurboMind behind the `Engine` interface. It computes in its weight dtype, so it is judged at that
precision (the floor is the reference in that dtype, end to end); it cannot be teacher-forced module by
module. It decodes (`--decode N`) free-running and fed the reference's tokens through its own KV cache,
showing each step's final hidden state and logits. With `layers`, after the cases it deploys truncated copies
of the model (parity.layerwise) for per-layer values."""

from __future__ import annotations

import time
from typing import Any, Iterator

import torch

from ..deploy import live
from ..errors import ParityInputError
from ..points import UNCHECKED_PARTS
from ..records import DecodeStep, EngineRequest, EngineRun, EngineSettings, EngineSummary, EngineWarning
from .base import EngineSetup, ranges_from_info, trace_writer

_FLOOR_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16}


class LiveRunner:
    kind = "turbomind"

    @classmethod
    def preflight(cls, layers: str | None, serve_from: str) -> None:
        if layers and serve_from == "workspace":
            # the truncated copies are deployed from the HF folder (with LoRA), the full model from the workspace
            # (without): per-layer values would mix two deployments and bisect to the wrong layer
            raise ParityInputError(
                "--layers cannot be combined with --serve-from workspace: the per-layer values come from truncated "
                "copies of the HF folder (served with their LoRA), while a workspace-served TurboMind runs without "
                "LoRA, so the layers would compare two different deployments. Run --layers with --serve-from hf, or "
                "--serve-from workspace without --layers.")
        ok, reason = live.available()  # EngineUnavailable: exit 2, one paragraph
        if not ok:
            raise live.unavailable_error(reason)

    def __init__(self, setup: EngineSetup):
        self.setup = setup
        self.engine: live.LiveTurboMind | None = None
        self.settings: EngineSettings | None = None
        self._layer_cases: list = []

    def activate(self) -> EngineSettings:
        s = self.setup
        self.engine = live.LiveTurboMind(s.workspace.root if s.serve_from == "workspace" else s.model, **s.options)
        self.settings = EngineSettings(
            kind=self.kind, numeric="emulate",
            floor_dtype=_FLOOR_DTYPES.get(self.engine.weight_type, s.workspace.dtype),
            teacher_forced=False, serve_from=s.serve_from, weight_type=self.engine.weight_type)
        return self.settings

    def infer(self, request: EngineRequest) -> EngineRun:
        ws = self.setup.workspace
        writer = trace_writer(request, "engine", self.kind, ws.model.num_layer, str(ws.dtype), UNCHECKED_PARTS)
        info = self.engine.run(request.call, writer)
        trace = info["trace"]
        if self.setup.layers and request.same_rows:
            from ..layerwise import PipelineCase

            self._layer_cases.append(PipelineCase(request.prepared, request.hf_call, request.call, request.reference,
                                                  request.floor_e2e, trace.get(None, "norm")))
        return EngineRun(trace=trace, local=trace, settings=self.settings, ranges=ranges_from_info(info))

    def decode(self, request: EngineRequest, tokens: list[int], teacher) -> Iterator[DecodeStep]:
        """Greedy decode on TurboMind (`LiveTurboMind.decode`): each step's final hidden state and logits, fed the
        reference's tokens through the session's KV cache. `teacher` is unused: nothing per layer to force."""
        return self.engine.decode(request.call, tokens)

    def decode_info(self) -> dict[str, Any]:
        return dict(getattr(self.engine, "decode_info", None) or {}) if self.engine is not None else {}

    def deactivate(self) -> EngineSummary:
        s = self.setup
        summary = EngineSummary(report=self.engine.info(),  # lmdeploy version, GPU, dtype, lora_config as loaded
                                warnings=[EngineWarning(cause="lora_not_applied", message=w)
                                          for w in self.engine.warnings])
        self.close()  # free the GPU before deploying truncated copies
        if s.layers and self._layer_cases:
            from ..layerwise import run_layers

            t = time.perf_counter()
            summary.findings, summary.report["layerwise"] = run_layers(
                s.layers, s.model, s.cache_dir, s.session, self._layer_cases, self.settings.numeric,
                self.settings.floor_dtype, s.thresholds, live.live_factory(**s.options))
            summary.timings["layers"] = time.perf_counter() - t
        return summary

    def close(self) -> None:
        if self.engine is not None:
            self.engine.close()
            self.engine = None
