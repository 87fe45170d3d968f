"""The replay engine behind the `Engine` interface: TurboMind's prefill replayed on CPU from the converted
workspace (parity.deploy.replay), judged at the precision the user asked for, teacher-forced when the
reference saw the same rows."""

from __future__ import annotations

from typing import Any, Iterator

import torch

from ..compare.align import row_classes
from ..compare.gate import TeacherForcingGate, describe
from ..compare.stream import StatsWriter
from ..compare.thresholds import Thresholds
from ..deploy.replay import ReplayEngine
from ..errors import ParityInputError
from ..points import PLORA_PARTS, UNCHECKED_PARTS
from ..records import DecodeStep, EngineRequest, EngineRun, EngineSettings, EngineSummary
from ..trace import TraceMeta
from .base import EngineSetup, ranges_from_info, trace_writer


class ReplayRunner:
    kind = "replay"

    @classmethod
    def preflight(cls, layers: str | None, serve_from: str) -> None:
        if layers:
            raise ParityInputError("--layers needs --engine turbomind: the replay engine records every layer already.")

    def __init__(self, setup: EngineSetup):
        self.setup = setup
        self.engine: ReplayEngine | None = None
        self.settings: EngineSettings | None = None
        self.teacher_forced_from: dict[str, str] = {}  # per case, where the teacher-forced run started

    def activate(self) -> EngineSettings:
        s = self.setup
        # options: kv_bits for a quantized KV cache (--quant-policy, parity.quant.kv)
        self.engine = ReplayEngine(s.workspace, s.semantics, numeric=s.numeric, serve_from=s.serve_from,
                                   device=s.device, kv_bits=int(s.options.get("kv_bits", 0)),
                                   kv_scale_factor=float(s.faults.kv_scale_factor))
        self.settings = EngineSettings(
            kind=self.kind, numeric=s.numeric,
            floor_dtype=torch.float64 if s.numeric == "fp32" else s.workspace.dtype,
            teacher_forced=True, serve_from=s.serve_from, weight_type=str(s.workspace.model.weight_type))
        return self.settings

    def infer(self, request: EngineRequest) -> EngineRun:
        ws = self.setup.workspace

        def writer(name: str, skip) -> object:
            return trace_writer(request, name, self.kind, ws.model.num_layer, str(ws.dtype), frozenset(skip))

        # Only the PLoRA parts a check reads are written: the checks read the teacher-forced run's parts
        # (the end-to-end run's only where there is no other), and emulate mode judges the engine's LoRA
        # delta on the engine's own input, so its teacher-forced run keeps ":input" too.
        if request.same_rows:  # both runs in one layer-major pass over the weights
            local_skip = {"base"} if self.settings.numeric == "emulate" else UNCHECKED_PARTS
            if request.keep_all_parts:  # every value kept for someone to debug with
                e2e = writer("engine", PLORA_PARTS)
            else:  # only the comparison reads the end-to-end run: kept as its statistics against the reference
                meta = TraceMeta(side=self.kind, case=request.case, num_layers=ws.model.num_layer, dtype=str(ws.dtype))
                e2e = StatsWriter(request.trace_dir / "engine", meta, against=request.reference,
                                  skip_parts=UNCHECKED_PARTS)
            # the teacher-forced run only from where the end-to-end run leaves min_rel (parity.compare.gate),
            # everywhere when asked or when every part is kept
            gate = None
            if not (self.setup.teacher_forced_everywhere or request.keep_all_parts):
                gate = TeacherForcingGate(request.reference, self.setup.thresholds or Thresholds(),
                                          self.settings.numeric, row_classes(request.prepared), computed=e2e).needed
            # until it starts, the teacher-forced trace holds the end-to-end run's masks, and in emulate mode its
            # deltas and inputs too (the PLoRA check judges them against a faithful low-precision delta); in fp32
            # mode the check reads the deltas' statistics against the reference from `e2e` (no second copy on disk)
            waiting = PLORA_PARTS if self.settings.numeric == "emulate" else ("mask",)
            info, local_info = self.engine.run_pair(request.call, e2e, writer("engine_local", local_skip),
                                                    request.reference, start_local=gate, waiting_parts=waiting)
            self.teacher_forced_from[request.case] = describe(local_info["teacher_forced_from"], ws.model.num_layer)
        else:  # different rows (a BOS policy or range mismatch): only the engine's own run exists
            info = local_info = self.engine.run(request.call, writer("engine", UNCHECKED_PARTS))
        return EngineRun(
            trace=info["trace"], local=local_info["trace"], settings=self.settings,
            ranges=ranges_from_info(info),
            image_rows=torch.tensor(info["image_rows"], dtype=torch.uint8),
            lora_rows=torch.tensor(info["mask"], dtype=torch.uint8),
        )

    def decode(self, request: EngineRequest, tokens: list[int], teacher) -> Iterator[DecodeStep]:
        """Greedy decode with a KV cache mirroring TurboMind's (parity.deploy.decode)."""
        from ..deploy.decode import ReplayDecoder

        storage = None
        if self.engine.kv_bits:  # --quant-policy: the cache holds TurboMind's u8/u4 codes (parity.quant.kv)
            from ..quant.kv import QuantizedStorage

            storage = QuantizedStorage(self.engine.kv_bits, self.engine.weight_dtype, self.engine.device,
                                       self.engine.kv_scale_factor)
        self._decoder = ReplayDecoder(self.engine, storage=storage, deviations=self.setup.faults.decode_deviations)
        return self._decoder.run(request.call, tokens, teacher)

    def decode_info(self) -> dict[str, Any]:
        return dict(self._decoder.info) if getattr(self, "_decoder", None) is not None else {}

    def deactivate(self) -> EngineSummary:
        return EngineSummary(report={"teacher_forced": dict(self.teacher_forced_from)} if self.teacher_forced_from
                             else {})

    def close(self) -> None:
        self.engine = None
