"""Traces: captured values at canonical points, streamed to disk one layer at a time.

A trace is a folder:
    meta.json               side, case, num_layers, dtype, layouts, per-linear LoRA rank/scale, extras
    pre.safetensors         points before layer 0 ("embeddings")
    layer_000.safetensors   the layer's points (`LAYER_POINTS`) and PLoRA parts (`linear:part`)
    post.safetensors        "norm", "output"
Every tensor is 2-D [rows, features] (batch squeezed), except PLoRA masks (1-D uint8 [rows]).
Writers write each file atomically (temp name, then rename) so a crash never leaves a half file that a
reader would trust, and only `close()` writes meta.json, so a trace that did not finish cannot be opened.
Files are plain safetensors (8-byte little-endian header length, JSON header, raw little-endian bytes),
written straight from each tensor's memory (no serialised copy of the file). Readers memory-map
(`safe_open(...).get_tensor` returns a copy-on-write view of the file's pages, no copy), so a 7B trace
never sits in memory at once.
"""

from __future__ import annotations

import json
import sys
import weakref
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch
from safetensors import SafetensorError, safe_open

from .atomic import replaced_file, write_file
from .errors import ParityInputError


@dataclass
class TraceMeta:
    side: str                      # "reference" | "replay" | "turbomind" | "floor-…"
    case: str
    num_layers: int
    dtype: str                     # compute dtype of the run that produced it
    # Layout tag per point where it differs from the HF reference's, e.g. {"attention.wqkv": "tm_qkv"}.
    layouts: dict[str, str] = field(default_factory=dict)
    # {"0": {"attention.wqkv": {"rank": 256, "scale": 1.0}, ...}, ...}: what the side used per linear.
    plora: dict[str, dict[str, dict[str, float]]] = field(default_factory=dict)
    extras: dict[str, Any] = field(default_factory=dict)


# safetensors dtype codes (https://huggingface.co/docs/safetensors: "Format").
SAFETENSORS_CODES: dict[torch.dtype, str] = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL",
}


def write_safetensors(tensors: dict[str, torch.Tensor], path: Path | str) -> int:
    """Write `tensors` as one safetensors file, each tensor's bytes straight from its memory.

    The same format and alignment as `safetensors.torch.save_file` (data ordered by decreasing element size,
    then name; header padded to 8 bytes; any safetensors reader reads it, tested), but it accepts tensors
    that share memory (each is written in full) and `f.write` releases the GIL while the background thread
    writes. Measured
    with `make bench` (2026-11-24, 7B shapes, 2 layers): the capture took 22.2 s with safetensors 0.8's
    `save_file` on the writer thread against 19.7 s with this (forward without capture 19.2-20.0 s; the
    capture's CPU time +4.2 s against +0.7-2.4 s), i.e. capture overhead 1.11 against 1.00-1.03.
    Returns the file's size.
    """
    if sys.byteorder != "little":  # safetensors data is little-endian
        raise RuntimeError("parity writes safetensors from memory and needs a little-endian host")
    items = []
    for k, t in tensors.items():
        t = t.detach()
        if t.device.type != "cpu":
            t = t.cpu()
        items.append((k, t if t.is_contiguous() else t.contiguous()))
    items.sort(key=lambda kv: (-kv[1].element_size(), kv[0]))
    header: dict[str, Any] = {}
    offset = 0
    for k, t in items:
        if t.dtype not in SAFETENSORS_CODES:
            raise TypeError(f"Trace value {k!r} has dtype {t.dtype}, which safetensors cannot store.")
        n = t.numel() * t.element_size()
        header[k] = {"dtype": SAFETENSORS_CODES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + n]}
        offset += n
    head = json.dumps(header, separators=(",", ":")).encode("utf-8")
    head += b" " * (-len(head) % 8)
    with open(path, "wb") as f:
        f.write(len(head).to_bytes(8, "little"))
        f.write(head)
        for _, t in items:
            if t.numel():
                f.write(memoryview(t.reshape(-1).view(torch.uint8).numpy()))
    return 8 + len(head) + offset


def trace_file(root: Path, layer: int | None, point: str) -> Path:
    """The file of a trace-layout folder that holds `point` of `layer` (None: the pre/post points)."""
    if layer is not None:
        return root / f"layer_{layer:03d}.safetensors"
    return root / ("pre.safetensors" if point == "embeddings" else "post.safetensors")


def write_meta(root: Path, meta: TraceMeta) -> None:
    """Written last: its presence says the folder is complete (atomic, not fsynced: as `atomic_save`)."""
    write_file(root / "meta.json", json.dumps(meta.__dict__, indent=1, default=str), fsync=False)


def read_meta(root: Path, what: str = "Trace folder") -> TraceMeta:
    meta_path = root / "meta.json"
    if not meta_path.is_file():
        raise ParityInputError(f"{what} {root} has no meta.json; it was not written completely.")
    try:
        return TraceMeta(**json.loads(meta_path.read_text()))
    except (ValueError, TypeError) as e:
        raise ParityInputError(f"{what} {root} has an unreadable meta.json ({e}).") from e


def atomic_save(tensors: dict[str, torch.Tensor], path: Path) -> None:
    # no fsync: a trace is rebuilt by the next run, and flushing gigabytes per layer would stall the capture
    with replaced_file(path, fsync=False) as tmp:
        write_safetensors(tensors, tmp)


class TraceWriter:
    """Streams a trace to disk. Call `layer(i, values)` as each layer finishes, then `close()`.

    Ownership: the writer owns the tensors handed to `pre`, `post` and `layer` (no copy is made): callers
    hand over values they will not mutate afterwards (a capture hands its own clones, an engine the fresh
    tensors it computed). `layer` files are written on one background thread while the caller computes
    the next layer; at most one layer is in flight (the next `layer()` call waits for the previous write).
    An exception raised while writing is re-raised by the next call or by `close()`, which waits for the
    last write, writes pre/post and then meta.json, and returns the `Trace`.

    `skip_parts`: PLoRA parts (as in `parity.points.PLORA_PARTS`) not to write; keys "linear:part" whose
    part is in it are dropped.
    """

    def __init__(self, root: Path | str, meta: TraceMeta, skip_parts: frozenset[str] = frozenset()):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.meta = meta
        self.skip_parts = frozenset(skip_parts)
        self._pre: dict[str, torch.Tensor] = {}
        self._post: dict[str, torch.Tensor] = {}
        self._pool: ThreadPoolExecutor | None = None
        self._job: Future | None = None
        self._error: BaseException | None = None

    # -------------------------------------------------------------- background writes

    def _check(self, wait: bool) -> None:
        """Re-raise a failed write; with `wait`, first wait for the write in flight."""
        job = self._job
        if job is not None and (wait or job.done()):
            self._job = None
            exc = job.exception()
            if exc is not None and self._error is None:
                self._error = exc
        if self._error is not None:
            raise self._error

    def _submit(self, tensors: dict[str, torch.Tensor], path: Path) -> None:
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="parity-trace")
            weakref.finalize(self, self._pool.shutdown, wait=False)
        self._job = self._pool.submit(atomic_save, tensors, path)

    # -------------------------------------------------------------- protocol

    def pre(self, name: str, value: torch.Tensor) -> None:
        self._check(wait=False)
        self._pre[name] = stored_form(value)

    def post(self, name: str, value: torch.Tensor) -> None:
        self._check(wait=False)
        self._post[name] = stored_form(value)

    def layer(self, index: int, values: dict[str, torch.Tensor]) -> None:
        self._check(wait=True)
        kept = {k: stored_form(v) for k, v in values.items() if not is_skipped_part(k, self.skip_parts)}
        self._submit(kept, self.root / f"layer_{index:03d}.safetensors")

    def close(self) -> "Trace":
        try:
            self._check(wait=True)
        finally:
            if self._pool is not None:
                self._pool.shutdown(wait=True)
                self._pool = None
        if self._pre:
            atomic_save(self._pre, self.root / "pre.safetensors")
        if self._post:
            atomic_save(self._post, self.root / "post.safetensors")
        self._pre, self._post = {}, {}
        write_meta(self.root, self.meta)
        return Trace(self.root)


def is_skipped_part(key: str, skip_parts: frozenset[str] | tuple[str, ...]) -> bool:
    """Whether `key` is a PLoRA part ("linear:part") whose part is in `skip_parts`."""
    _, sep, part = key.rpartition(":")
    return bool(sep) and part in skip_parts


def stored_form(t: torch.Tensor) -> torch.Tensor:
    """The stored form: batch dimension dropped, bool as uint8. No copy unless the layout needs one."""
    t = t.detach()
    if t.dim() == 3 and t.shape[0] == 1:
        t = t[0]
    if t.dim() == 2 and t.shape[0] == 1 and t.dtype == torch.bool:
        t = t[0]
    if t.dtype == torch.bool:
        t = t.to(torch.uint8)
    return t if t.is_contiguous() else t.contiguous()


class TraceFolder:
    """A finished trace-layout folder (meta.json and safetensors files per layer), for its readers: the
    file each point lives in, damage-checked reads, and the meta's per-linear LoRA values."""

    def __init__(self, root: Path | str, what: str = "Trace folder"):
        self.root = Path(root)
        self.meta = read_meta(self.root, what)

    @property
    def num_layers(self) -> int:
        return self.meta.num_layers

    def _file(self, layer: int | None, point: str) -> Path:
        return trace_file(self.root, layer, point)

    def _open(self, path: Path):
        try:
            return safe_open(str(path), "pt")
        except (SafetensorError, OSError) as e:
            raise ParityInputError(f"Trace file {path} is not a readable safetensors file ({e}); "
                                   "the trace is damaged, capture it again.") from e

    def _read(self, path: Path, keys: list[str] | None):
        """{key: tensor} for `keys` (None: all) that the file holds; damaged files raise ParityInputError."""
        with self._open(path) as f:
            try:
                names = list(f.keys())
                wanted = names if keys is None else [k for k in keys if k in names]
                return {k: f.get_tensor(k) for k in wanted}
            except (SafetensorError, OSError, RuntimeError) as e:
                raise ParityInputError(f"Trace file {path} could not be read ({e}); the trace is damaged, "
                                       "capture it again.") from e

    def plora(self, layer: int, linear: str) -> dict[str, float]:
        return self.meta.plora.get(str(layer), {}).get(linear, {})


class Trace(TraceFolder):
    """Read side of a trace folder; values are loaded lazily, per file, as memory-mapped views."""

    def get(self, layer: int | None, point: str) -> torch.Tensor | None:
        path = self._file(layer, point)
        if not path.is_file():
            return None
        return self._read(path, [point]).get(point)

    def layer(self, index: int) -> dict[str, torch.Tensor]:
        path = self.root / f"layer_{index:03d}.safetensors"
        if not path.is_file():
            return {}
        return self._read(path, None)

    def keys(self, layer: int | None, point_hint: str = "") -> list[str]:
        path = self._file(layer, point_hint)
        if not path.is_file():
            return []
        with self._open(path) as f:
            return list(f.keys())

    def layers(self) -> Iterator[tuple[int, dict[str, torch.Tensor]]]:
        for i in range(self.num_layers):
            yield i, self.layer(i)


class TraceRows:
    """Row ranges of a trace's points, read without loading whole tensors (safetensors slices): a decode step
    reads one row of a reference captured over the whole sequence. Files stay open until `close()`."""

    def __init__(self, trace: Trace, start: int = 0, stop: int | None = None):
        self.trace, self.root, self.meta = trace, trace.root, trace.meta
        self.start, self.stop = start, stop
        self._handles: dict[Path, Any] = {}

    def at(self, start: int, stop: int) -> "TraceRows":
        """The same files, another row range (handles shared)."""
        view = TraceRows(self.trace, start, stop)
        view._handles = self._handles
        return view

    def get(self, layer: int | None, point: str) -> torch.Tensor | None:
        path = self.trace._file(layer, point)
        f = self._handles.get(path)
        if f is None:
            if not path.is_file():
                return None
            f = self._handles[path] = self.trace._open(path).__enter__()
        if point not in f.keys():
            return None
        sl = f.get_slice(point)
        stop = self.stop if self.stop is not None else sl.get_shape()[0]
        return sl[self.start: stop]

    def close(self) -> None:
        for f in self._handles.values():
            f.__exit__(None, None, None)
        self._handles.clear()
