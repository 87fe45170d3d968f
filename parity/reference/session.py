"""Reference-side work shared by several runs on one model (the fault catalogue, repeated cases).

The reference never depends on the deployment, so its captures are keyed only by what it received (the
HF call's content hash) and the precision; every run against another workspace or runtime reuses them.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import torch

from ..records import HFCall
from ..trace import Trace
from .capture import capture_reference
from .loader import ReferenceModel, load_reference


class ReferenceSession:
    def __init__(self, model: Path, trust_remote_code: bool, root: Path | None = None,
                 low_memory: bool | None = None):
        self.model = Path(model)
        self.ref: ReferenceModel = load_reference(self.model, trust_remote_code, torch.float32, low_memory)
        self._floors: dict[torch.dtype, ReferenceModel] = {}
        self._own_root = root is None
        self.root = Path(root) if root else Path(tempfile.mkdtemp(prefix="parity-ref-"))
        self._traces: dict[tuple[str, str, str], Trace] = {}

    def floor_model(self, dtype: torch.dtype) -> ReferenceModel:
        if dtype not in self._floors:
            self._floors[dtype] = self.ref.with_dtype(dtype)
        return self._floors[dtype]

    def traces(self, call: HFCall, case: str, floor_dtype: torch.dtype) -> tuple[Trace, Trace, Trace]:
        """(reference fp32, floor end-to-end, floor layer-local) for this exact input."""
        key = call.content_hash
        fname = str(floor_dtype).replace("torch.", "")
        d = self.root / f"{case}-{key}"
        ref = self._get((key, "reference", ""), lambda: capture_reference(self.ref, call, d / "reference", case))
        model = self.floor_model(floor_dtype)
        e2e = self._get((key, "floor", fname), lambda: capture_reference(
            model, call, d / f"floor-{fname}", case, side="floor"))
        local = self._get((key, "floor-local", fname), lambda: capture_reference(
            model, call, d / f"floor-local-{fname}", case, side="floor-local", teacher=ref))
        return ref, e2e, local

    def _get(self, key, make):
        if key not in self._traces:
            self._traces[key] = make()
        return self._traces[key]

    def close(self) -> None:
        if self._own_root:
            shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> "ReferenceSession":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
