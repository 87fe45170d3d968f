"""Reference-side work shared by several runs on one model (the fault catalogue, repeated cases).

The reference never depends on the deployment, so its captures are keyed only by what it received (the
HF call's content hash) and the precision; every run against another workspace or runtime reuses them.

Three captures exist, and a run asks only for those it uses:
- `reference`: the fp32 forward, every point streamed to disk (the engine is compared with it);
- `floor_local`: the reference re-run at the engine's precision, each layer fed the reference's input. Only
  its *error against the reference* is ever used (the noise floor of local errors), so it is compared as it
  runs and stored as per-row statistics (`parity.compare.stream.StatsTrace`), never as values;
- `floor_e2e`: the same precision end to end, stored as values; only the live engine's path (whose values are
  end to end) and the layer-wise runs need it.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import torch

from ..checkpoint import safetensors_headers
from ..device import Placement, place_reference, resolve_device
from ..points import PLORA_PARTS
from ..records import EngineSettings, HFCall, ReferenceCapture, ReferenceInfo
from ..trace import SAFETENSORS_CODES, Trace, TraceMeta
from .capture import capture_reference
from .loader import ReferenceModel, load_reference


class ReferenceSession:
    def __init__(self, model: Path, trust_remote_code: bool, root: Path | None = None,
                 low_memory: bool | None = None, all_parts: bool = False, placement: Placement | None = None,
                 kv_cache=None):
        """`all_parts`: record every PLoRA part (also the linears' inputs and base outputs, which no check
        reads) for someone who keeps the traces to debug with. `placement`: the device the reference computes
        on (default CPU; `parity.device`). `kv_cache`: a K/V quantizer every attention reads through (a quantized
        KV cache, `parity.quant.kv_reference`; default none)."""
        self.kv_cache = kv_cache
        self.model = Path(model)
        self._parts = {"parts": PLORA_PARTS} if all_parts else {}
        self.placement = placement or resolve_device("cpu")
        self.loaded: ReferenceModel = load_reference(self.model, trust_remote_code, torch.float32, low_memory)
        self.loaded.model = place_reference(self.loaded.model, self.loaded.anatomy.layers, self.placement)
        # set per run (hold_weights_as): the dtype the deployment stores the weights in where the reference's
        # are rounded to it (a float32 checkpoint is deployed as float16: lmdeploy 0.7.1 has no float32 weights)
        self.weights_dtype: torch.dtype | None = None
        self._variants: dict[tuple[torch.dtype, torch.dtype | None], ReferenceModel] = {}
        self._stored: set[str] | None = None  # the checkpoint's safetensors dtype codes
        self._own_root = root is None
        self.root = Path(root) if root else Path(tempfile.mkdtemp(prefix="parity-ref-"))
        self._traces: dict[tuple[str, str, str], object] = {}

    def hold_weights_as(self, deployed: torch.dtype | None) -> None:
        """The next runs judge the reference with its weights as a deployment storing them in `deployed` holds
        them. Nothing is rounded where the checkpoint's safetensors hold every floating tensor in that dtype
        already (the usual case, which then costs nothing); None: as loaded."""
        if deployed is not None:
            if self._stored is None:
                headers, problems = safetensors_headers(self.model)
                self._stored = set() if problems else {h["dtype"] for h in headers.values()}
            floats = {SAFETENSORS_CODES[d] for d in (torch.float64, torch.float32, torch.float16, torch.bfloat16)}
            stored = self._stored & floats
            if stored == {SAFETENSORS_CODES[deployed]}:
                deployed = None
        self.weights_dtype = deployed

    @property
    def ref(self) -> ReferenceModel:
        """The fp32 reference with its weights as the current deployment stores them (`weights_dtype`)."""
        return self.floor_model(torch.float32)

    def floor_model(self, dtype: torch.dtype) -> ReferenceModel:
        key = (dtype, self.weights_dtype)
        if key not in self._variants:
            self._variants[key] = self.loaded.with_dtype(dtype).with_weights(self.weights_dtype)
        return self._variants[key]

    def _weights(self) -> str:
        return "" if self.weights_dtype is None else "-weights-" + str(self.weights_dtype).replace("torch.", "")

    def _dir(self, call: HFCall, case: str) -> Path:
        return self.root / f"{case}-{call.content_hash}{self._weights()}"

    def reference(self, call: HFCall, case: str) -> Trace:
        """The fp32 reference trace for this exact input."""
        return self._get((call.content_hash, "reference", self._weights()), lambda: capture_reference(
            self.ref, call, self._dir(call, case) / "reference", case, **self._parts))

    def floor_local(self, call: HFCall, case: str, dtype: torch.dtype):
        """Per-row error statistics of the teacher-forced reference at `dtype` against the fp32 reference, as a
        `FloorOnDemand`: captured the first time a judgement needs them."""
        from ..compare.stream import FloorOnDemand, StatsWriter

        ref = self.reference(call, case)
        fname = str(dtype).replace("torch.", "")
        root = self._dir(call, case) / f"floor-local-{fname}"
        model = self.floor_model(dtype)  # now: a later run may set another weights_dtype before this resolves

        def make():
            meta = TraceMeta(side="floor-local", case=case, num_layers=model.anatomy.num_layers, dtype=fname)
            return capture_reference(model, call, root, case, side="floor-local", teacher=ref,
                                     writer=StatsWriter(root, meta, against=ref))
        return self._get((call.content_hash, "floor-local", fname + self._weights()), lambda: FloorOnDemand(make))

    def floor_e2e(self, call: HFCall, case: str, dtype: torch.dtype) -> Trace:
        """The reference at `dtype`, end to end, as values."""
        fname = str(dtype).replace("torch.", "")
        return self._get((call.content_hash, "floor", fname + self._weights()), lambda: capture_reference(
            self.floor_model(dtype), call, self._dir(call, case) / f"floor-{fname}", case, side="floor",
            **self._parts))

    def floors(self, call: HFCall, case: str, dtype: torch.dtype, teacher_forced: bool):
        """(floor_e2e, floor_local) for an engine at `dtype`: a teacher-forced engine needs only the local
        floor's error statistics; an engine judged end to end gets the end-to-end floor (as values) as both."""
        if teacher_forced:
            return None, self.floor_local(call, case, dtype)
        e2e = self.floor_e2e(call, case, dtype)
        return e2e, e2e

    def capture(self, call: HFCall, case: str, settings: EngineSettings, measure_floor: bool = False
                ) -> ReferenceCapture:
        """One case's reference side for an engine judged as `settings` say: the fp32 trace and its noise floors.
        The local floor is measured on demand, only where a verdict needs it, unless `measure_floor`."""
        from ..compare.stream import FloorOnDemand

        reference = self.reference(call, case)
        floor_e2e, floor_local = self.floors(call, case, settings.floor_dtype, settings.teacher_forced)
        if measure_floor and isinstance(floor_local, FloorOnDemand):
            floor_local.resolve()
        return ReferenceCapture(reference, floor_e2e, floor_local)

    def describe(self, deployed_weight_type: str) -> ReferenceInfo:
        """The reference as the report shows it, beside a deployment computing in `deployed_weight_type`."""
        ref = self.ref
        return ReferenceInfo(storage=str(next(ref.model.parameters()).dtype).replace("torch.", ""),
                             weights=ref.weights_note(deployed_weight_type), device=self.placement.describe(),
                             applied=ref.applied)

    def _get(self, key, make):
        if key not in self._traces:
            if self.kv_cache is None:
                self._traces[key] = make()
            else:
                from ..quant.kv_reference import quantized_kv_cache

                with quantized_kv_cache(self.ref.model, self.kv_cache):
                    self._traces[key] = make()
        return self._traces[key]

    def close(self) -> None:
        if self._own_root:
            shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> "ReferenceSession":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
