"""Compare a capture with a trace as it runs, and keep only the per-row statistics.

`StatsWriter` speaks the `parity.trace.TraceWriter` protocol (`meta`, `pre`, `post`, `layer`, `close`), but
instead of storing each value it computes `row_stats(against's value, value)` for every key that the `against`
trace also has with the same shape (canonical points and PLoRA parts; masks are skipped) and stores only
those `RowStats` - a few float64 [rows] vectors per point - one safetensors file per layer, written atomically
like a trace. The noise-floor capture (the reference re-run in float64, teacher-forced) uses it, so its
float64 values never reach the disk. `StatsTrace` reads such a folder.

Folder layout (same file names as a trace):
    meta.json               the `TraceMeta` of the capture
    stats.json              {"format": "rowstats-1", "against": <root of the compared trace>}
    pre.safetensors         RowStats of "embeddings", stored under "<point>/<field>"
    layer_000.safetensors   RowStats of the layer's points and PLoRA parts
    post.safetensors        "norm", "output"
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Collection

import torch

from ..atomic import write_file
from ..errors import ParityInputError
from ..trace import Trace, TraceFolder, TraceMeta, atomic_save, is_skipped_part, stored_form, write_meta
from .rowstats import RowStats, row_stats

FORMAT = "rowstats-1"


class StatsWriter:
    """A `TraceWriter` that stores `row_stats(against, value)` per key instead of the value.

    `skip_parts`: PLoRA parts ("input", "base", ...) not to compare; by default every part the reference has
    (masks are never compared)."""

    def __init__(self, root: Path | str, meta: TraceMeta, against: Trace,
                 skip_parts: Collection[str] = frozenset()):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.meta = meta
        self.against = against
        self.skip_parts = frozenset(skip_parts)
        self._pre: dict[str, torch.Tensor] = {}
        self._post: dict[str, torch.Tensor] = {}
        self.last: dict[str, RowStats] = {}  # the statistics of the last layer (and of pre/post) written

    def _stats(self, layer: int | None, key: str, value: torch.Tensor) -> dict[str, torch.Tensor]:
        if is_skipped_part(key, self.skip_parts):
            return {}
        value = stored_form(value)  # the shape the `against` trace stored it in
        if value.dtype in (torch.uint8, torch.bool) or not value.is_floating_point():
            return {}
        ref = self.against.get(layer, key)
        if ref is None or tuple(ref.shape) != tuple(value.shape) or ref.dim() == 0:
            return {}
        # on the device the value was computed on (the trace on disk is host memory)
        st = row_stats(ref.to(value.device), value)
        self.last[key] = st
        return st.to_tensors(key)

    def pre(self, name: str, value: torch.Tensor) -> None:
        self._pre.update(self._stats(None, name, value))

    def post(self, name: str, value: torch.Tensor) -> None:
        self._post.update(self._stats(None, name, value))

    def layer(self, index: int, values: dict[str, torch.Tensor]) -> None:
        self.last = {}
        out: dict[str, torch.Tensor] = {}
        for key, value in values.items():
            out.update(self._stats(index, key, value))
        atomic_save(out, self.root / f"layer_{index:03d}.safetensors")

    def close(self) -> "StatsTrace":
        if self._pre:
            atomic_save(self._pre, self.root / "pre.safetensors")
        if self._post:
            atomic_save(self._post, self.root / "post.safetensors")
        write_file(self.root / "stats.json", json.dumps({"format": FORMAT, "against": str(self.against.root)}),
                   fsync=False)  # a trace file: rebuilt by the next run, as `trace.atomic_save`
        write_meta(self.root, self.meta)
        return StatsTrace(self.root)


class StatsTrace(TraceFolder):
    """Read side of a `StatsWriter` folder: per (layer, point) the `RowStats` against the `against` trace."""

    def __init__(self, root: Path | str):
        super().__init__(root, "Statistics folder")
        info_path = self.root / "stats.json"
        if not info_path.is_file():
            raise ParityInputError(f"Statistics folder {self.root} has no stats.json; it was not written "
                                   "completely.")
        info = json.loads(info_path.read_text())
        if info.get("format") != FORMAT:
            raise ParityInputError(f"Statistics folder {self.root} has format {info.get('format')!r}, "
                                   f"expected {FORMAT!r}.")
        self.against_root = info.get("against")
        self._cache: tuple[Path, dict[str, torch.Tensor]] | None = None

    def _load(self, path: Path) -> dict[str, torch.Tensor]:
        if self._cache is None or self._cache[0] != path:  # one file at a time: a layer's stats are small
            self._cache = (path, self._read(path, None))
        return self._cache[1]

    def stats(self, layer: int | None, point: str) -> RowStats | None:
        path = self._file(layer, point)
        if not path.is_file():
            return None
        d = self._load(path)
        if f"{point}/cols" not in d:
            return None
        return RowStats.from_tensors(d, point)

    def points(self, layer: int | None, point_hint: str = "") -> list[str]:
        """The keys with statistics in the file of `layer` (or the pre/post file `point_hint` lives in)."""
        path = self._file(layer, point_hint)
        return RowStats.prefixes(self._load(path)) if path.is_file() else []

class FloorOnDemand:
    """A noise floor measured only when a judgement needs it (`Thresholds.floor_decides`).

    threshold = clamp(factor x floor, min_rel, max_rel): an error at or below min_rel passes and one above
    max_rel fails whatever the floor, so the floor capture (in fp32 mode the reference re-run in float64, a
    third of a run's time) changes a verdict only for an error inside that band. `resolve()` runs the capture
    the first time it is called and returns its trace; `measured` says whether it has run."""

    def __init__(self, make):
        self._make = make
        self._trace = None

    @property
    def measured(self) -> bool:
        return self._trace is not None

    def resolve(self):
        if self._trace is None:
            self._trace = self._make()
        return self._trace

    def __getattr__(self, name: str):
        """Any other use (`stats`, `root`, ...) is a use of the floor: measured, then delegated."""
        if name.startswith("_"):
            raise AttributeError(name)
        return getattr(self.resolve(), name)
