"""Capture the HF reference at canonical points with forward hooks, streaming one layer at a time.

A recorded value must be the value at that point, whatever the forward does afterwards. Into its own trace
writer the capture hands the model's own output tensors (a view, no copy) and proves afterwards that nothing
changed them: each tensor's version counter (bumped by every in-place op) is read when recorded and again once
its file is written; a change means the file may hold a later value, and the capture is run again copying
every value when recorded (as it always does for a writer it is given). Tensors without a version counter
(inference mode) are copied. For each PLoRA
linear the hook records its output and, as `parts` asks (`parity.points.PLORA_PARTS`): its input, the base
output `x @ W.T (+ b)` (taken from the linear's own `F.linear` call), the LoRA delta exactly as the model
added it (`Plora_B`'s output times the scaling, placed on the rows of the mask it received) and that mask.
Parts that are not recorded cost nothing: no copy, and no hook or torch-function mode that only they need.

Separate q/k/v projections (Qwen2 PLoRA models; the anatomy's `FusedQKV`) are hooked one by one; when the
third has run, their outputs, bases and deltas are joined into XComposer2's grouped `attention.wqkv`
columns (`parity.deploy.layout.join_grouped_qkv`) and recorded as that one canonical point. Its `meta.plora`
is the fused linear's: rank r_q + r_k + r_v, scale 1.0 (the scales live in the fused B, as a faithful
conversion writes them).
"""

from __future__ import annotations

import shutil
from contextlib import ExitStack
from typing import Any, Iterable

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from .. import progress
from ..deploy.layout import join_grouped_qkv
from ..points import CHECKED_PARTS, PLORA_PARTS, plora_key
from ..records import HFCall
from ..trace import Trace, TraceMeta, TraceWriter
from .loader import ReferenceModel
from .precision import compute_dtype, unwidened, widened_float32

# What the pipeline reads of the reference's PLoRA linears; ask for every part with parts=PLORA_PARTS.
DEFAULT_PARTS: tuple[str, ...] = CHECKED_PARTS


def _first(x: Any) -> torch.Tensor:
    return x[0] if isinstance(x, (tuple, list)) else x


def _take(t: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """`t` as [rows, features] in `dtype` (default: its own), in memory nothing else references: one copy."""
    t = t.detach()
    r = t.reshape(-1, t.shape[-1])
    if dtype is not None and r.dtype != dtype:
        return r.to(dtype)
    if r.untyped_storage().data_ptr() != t.untyped_storage().data_ptr():
        return r  # reshape already copied
    return r.clone()


def _version(t: torch.Tensor) -> int | None:
    try:
        return t._version
    except RuntimeError:  # inference tensors keep no version counter
        return None


def _mask_run(flat_mask: torch.Tensor, n: int) -> int | None:
    """Start of the mask's rows when they are exactly one contiguous run of `n` rows (one image), else None."""
    if n == 0 or int(flat_mask.sum()) != n:
        return None
    start = int(flat_mask.to(torch.uint8).argmax())
    return start if bool(flat_mask[start:start + n].all()) else None


class _BaseTap(TorchFunctionMode):
    """Keeps what each PLoRA linear's own `F.linear` call returned (its base output `x @ W.T (+ b)`), so the
    capture need not compute it a second time. Cloned at once: PLoRA then adds the LoRA term in place.
    Installed only when the base is recorded."""

    def __init__(self, weights):
        super().__init__()
        self._ids = {id(w) for w in weights}
        self._seen: dict[int, torch.Tensor] = {}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func is F.linear and len(args) > 1 and id(args[1]) in self._ids:
            self._seen[id(args[1])] = out.detach().clone()
        return out

    def pop(self, weight) -> torch.Tensor | None:
        return self._seen.pop(id(weight), None)


class _Recorder:
    """Holds the current layer's values until the layer finishes, then hands them to the writer."""

    def __init__(self, ref: ReferenceModel, writer, store_dtype: torch.dtype, teacher: Trace | None,
                 parts: Iterable[str] = DEFAULT_PARTS, views: bool = False):
        self.ref = ref
        self.views = views  # record the model's tensors themselves, checked by version (module docstring)
        self.watched: list[tuple[torch.Tensor, int]] = []   # values of the layer being recorded
        self.in_flight: list[tuple[torch.Tensor, int]] = []  # values of the layer being written
        self.writer = writer
        self.store = store_dtype
        self.teacher = teacher
        self.parts = frozenset(parts)
        self.tap: _BaseTap | None = None
        self.current: dict[str, torch.Tensor] = {}
        self.b_out: dict[tuple[int, str], tuple[torch.Tensor, int | None]] = {}
        self.plora: dict[str, dict[str, dict[str, float]]] = {}
        self.pending: dict[tuple[int, str], dict[str, tuple]] = {}  # fused linears: part -> recorded values

    def take(self, t: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
        """`_take`, but with `views` the model's own tensor (as [rows, features]) when no copy is needed,
        watched by its version counter."""
        t = t.detach()
        r = t.reshape(-1, t.shape[-1])
        if not self.views or (dtype is not None and r.dtype != dtype) or \
                r.untyped_storage().data_ptr() != t.untyped_storage().data_ptr():
            return _take(t, dtype)
        version = _version(t)
        if version is None:
            return _take(t, dtype)
        self.watched.append((t, version))
        return r

    def verify(self, watched: list[tuple[torch.Tensor, int]]) -> None:
        """Raise `_ChangedInPlace` if a recorded tensor was modified after it was recorded."""
        if any(_version(t) != v for t, v in watched):
            raise _ChangedInPlace()

    def put(self, key: str, value: torch.Tensor) -> None:
        """Record a value the model still owns (a watched view, or a copy)."""
        self.current[key] = self.take(value, self.store)

    def own(self, key: str, value: torch.Tensor) -> None:
        """Record a value this recorder made (no copy unless the stored dtype differs)."""
        self.current[key] = value if value.dtype == self.store or value.dtype == torch.uint8 else value.to(self.store)

    def install(self, stack: ExitStack) -> None:
        a = self.ref.anatomy
        want_b = "delta" in self.parts

        def after(module, fn, **kw):  # parity's own code: float32 where it asks for it, also in a float64 run
            stack.callback(module.register_forward_hook(unwidened(fn), **kw).remove)

        for i, layer in enumerate(a.layers):
            after(layer, self._layer_done(i))
            if self.teacher is not None:
                stack.callback(layer.register_forward_pre_hook(unwidened(self._teacher_input(i)),
                                                               with_kwargs=True).remove)
            for name, norm in a.norms[i].items():
                after(norm, self._plain(name))
            for point, lin in a.linears.get(i, {}).items():
                if getattr(lin, "fused", False):
                    for part, mod in lin.module.parts.items():
                        key = f"{point}/{part}"
                        if want_b:
                            after(mod.Plora_B, self._b_output(i, key))
                        after(mod, self._part(i, point, part, lin), with_kwargs=True)
                else:
                    if want_b:
                        after(lin.module.Plora_B, self._b_output(i, point))
                    after(lin.module, self._linear(i, point, lin), with_kwargs=True)
                self.plora.setdefault(str(i), {})[point] = {"rank": lin.rank, "scale": lin.scale}
        after(a.final_norm, lambda m, i, o: self.writer.post("norm", self.take(o, self.store)))
        after(a.lm_head, lambda m, i, o: self.writer.post("output", self.take(o, self.store)))

    def _plain(self, point: str):
        def hook(module, args, output):
            self.put(point, _first(output))
        return hook

    def _b_output(self, layer: int, point: str):
        # Not copied: PLoRA multiplies B's output by its scaling into a new tensor and never touches it
        # again; the version counter proves it when the linear's hook reads it.
        def hook(module, args, output):
            out = output.detach()
            self.b_out[(layer, point)] = (out.reshape(-1, out.shape[-1]), _version(out))
        return hook

    def _delta(self, b_entry, scale, mask, out: torch.Tensor) -> torch.Tensor:
        """The LoRA term the model added, [rows, cols] in `out`'s dtype, zero where it added nothing."""
        rows, cols = out.shape
        if mask is None or b_entry is None:
            return torch.zeros(rows, cols, dtype=out.dtype, device=out.device)
        b, version = b_entry
        if version is not None and _version(b) != version:
            raise RuntimeError("A PLoRA linear modified its Plora_B output in place; parity cannot recover the "
                               "LoRA delta it added.")
        n = b.shape[0]
        start = _mask_run(mask, n)
        if start is not None:
            delta = torch.empty(rows, cols, dtype=out.dtype, device=out.device)
            delta[:start].zero_()
            delta[start + n:].zero_()
            torch.mul(b, scale, out=delta[start:start + n])  # the model's own `B(A(x)) * scaling`
            return delta
        delta = torch.zeros(rows, cols, dtype=out.dtype, device=out.device)
        if n and bool(mask.any()):
            delta[mask] = b * scale
        elif n:  # upstream's all-False branch: one row of B(A(x)) * 0 added to row 0
            delta[0] = b[0] * 0
        return delta

    def _values(self, module, args, kwargs, output, b_key, scale):
        """(input rows, output rows, base rows, delta rows, flat mask) of one PLoRA call; parts that are
        not recorded are None. Every tensor returned is the recorder's own, in the compute dtype."""
        x = args[0]
        mask = args[1] if len(args) > 1 else kwargs.get("im_mask")
        out = self.take(output)
        rows = self.take(x) if "input" in self.parts else None
        base = None
        if "base" in self.parts:
            tapped = self.tap.pop(module.weight) if self.tap is not None else None
            base = tapped.reshape(-1, tapped.shape[-1]) if tapped is not None else \
                _take(F.linear(x, module.weight, module.bias))
        flat_mask = mask.reshape(-1).bool().cpu() if mask is not None else None
        b = self.b_out.pop(b_key, None)
        delta = self._delta(b, scale, flat_mask, out) if "delta" in self.parts else None
        if flat_mask is None:
            flat_mask = torch.zeros(out.shape[0], dtype=torch.bool)
        return rows, out, base, delta, flat_mask

    def _record(self, point: str, rows, out, base, delta, flat_mask) -> None:
        self.own(point, out)
        if rows is not None:
            self.own(plora_key(point, "input"), rows)
        if base is not None:
            self.own(plora_key(point, "base"), base)
        if delta is not None:
            self.own(plora_key(point, "delta"), delta)
        if "mask" in self.parts:
            self.current[plora_key(point, "mask")] = flat_mask.to(torch.uint8)

    def _linear(self, layer: int, point: str, lin):
        def hook(module, args, kwargs, output):
            rows, out, base, delta, flat_mask = self._values(module, args, kwargs, output, (layer, point), lin.scale)
            if point == "attention.wo":
                if rows is not None:  # the same values: one copy, stored under both names
                    self.own("attention", rows)
                else:
                    self.put("attention", args[0])
            self._record(point, rows, out, base, delta, flat_mask)
        return hook

    def _part(self, layer: int, point: str, part: str, lin):
        """One of q/k/v of a FusedQKV: stash its values; after the third, record the joined canonical point."""
        def hook(module, args, kwargs, output):
            scale = lin.module.part_scales()["qkv".index(part)]
            vals = self._values(module, args, kwargs, output, (layer, f"{point}/{part}"), scale)
            got = self.pending.setdefault((layer, point), {})
            got[part] = vals
            if len(got) < 3:
                return
            del self.pending[(layer, point)]
            q, k, v = got["q"], got["k"], got["v"]
            shape = lin.module.shape

            def join(j):
                if q[j] is None:
                    return None
                return join_grouped_qkv(q[j], k[j], v[j], shape.heads, shape.kv_heads, shape.head_dim)

            self._record(point, q[0], join(1), join(2), join(3), q[4])
        return hook

    def _teacher_input(self, layer: int):
        """Layer-level teacher forcing: feed layer k the teacher's input for layer k."""
        def hook(module, args, kwargs):
            src = self.teacher.get(None, "embeddings") if layer == 0 else self.teacher.get(layer - 1, "layer")
            if args:
                h = args[0]
                new = src.to(h.device, h.dtype).reshape(h.shape)
                return (new, *args[1:]), kwargs
            h = kwargs["hidden_states"]
            kwargs["hidden_states"] = src.to(h.device, h.dtype).reshape(h.shape)
            return args, kwargs
        return hook

    def _layer_done(self, index: int):
        def hook(module, args, output):
            self.put("layer", _first(output))
            values, self.current = self.current, {}
            self.writer.layer(index, values)  # returns once the previous layer's file is written
            self.verify(self.in_flight)
            self.in_flight, self.watched = self.watched, []
            progress.layer_done(index + 1, len(self.ref.anatomy.layers))
        return hook


class _ChangedInPlace(Exception):
    """A recorded tensor changed after it was recorded: record again with copies."""


@torch.no_grad()
def capture_reference(
    ref: ReferenceModel,
    call: HFCall,
    writer_root,
    case: str,
    side: str = "reference",
    teacher: Trace | None = None,
    store_dtype: torch.dtype | None = None,
    writer=None,
    parts: Iterable[str] = DEFAULT_PARTS,
):
    """Run the reference once on `call` and stream its trace to `writer_root`; returns the `Trace`.

    With `teacher`, every decoder layer is fed the teacher's input for that layer (layer-level local run),
    which is how the noise floor of local errors is measured.

    `writer`: anything with TraceWriter's protocol (`meta`, `pre`, `post`, `layer`, `close`) to use instead
    of a TraceWriter at `writer_root` (which may then be None); its `meta.plora` and `meta.extras` are set
    here and what its `close()` returns is returned. It owns every tensor handed to it (the recorder's own
    copies). `parts`: which of `PLORA_PARTS` are recorded for every PLoRA linear (the output always is).
    """
    parts = tuple(parts)
    unknown = [p for p in parts if p not in PLORA_PARTS]
    if unknown:
        raise ValueError(f"Unknown PLoRA part(s) {unknown}; choose from {PLORA_PARTS}.")
    if writer is not None:
        return _capture(ref, call, writer, case, side, teacher, store_dtype, parts, views=False)
    try:  # its own writer: the model's tensors, proven unchanged (module docstring)
        return _capture(ref, call, writer_root, case, side, teacher, store_dtype, parts, views=True)
    except _ChangedInPlace:
        shutil.rmtree(writer_root, ignore_errors=True)
        return _capture(ref, call, writer_root, case, side, teacher, store_dtype, parts, views=False)


def _capture(ref: ReferenceModel, call: HFCall, writer, case: str, side: str, teacher: Trace | None,
             store_dtype: torch.dtype | None, parts: tuple[str, ...], views: bool):
    """One capture; `writer` is a writer, or the root of a TraceWriter made here."""
    store = store_dtype or (torch.float64 if ref.dtype == torch.float64 else torch.float32)
    if not hasattr(writer, "layer"):
        meta = TraceMeta(side=side, case=case, num_layers=ref.anatomy.num_layers,
                         dtype=str(ref.dtype).replace("torch.", ""))
        writer = TraceWriter(writer, meta)
    meta = writer.meta
    device = ref.device  # the reference's placement (parity.device); the writers copy to host memory
    embeds = call.inputs_embeds.to(device, ref.dtype)
    im_mask = call.im_mask.to(device) if isinstance(call.im_mask, torch.Tensor) else call.im_mask
    writer.pre("embeddings", _take(embeds, store))
    rec = _Recorder(ref, writer, store, teacher, parts, views=views)
    try:
        with ExitStack() as stack:
            rec.install(stack)
            stack.enter_context(compute_dtype(ref.model, ref.anatomy.layers, ref.dtype, outside="run",
                                              via=ref.weights_dtype))
            stack.enter_context(widened_float32(ref.dtype))  # the float64 floor keeps nothing at float32
            if "base" in rec.parts:
                rec.tap = stack.enter_context(_BaseTap(m.weight for m in ref.model.modules() if hasattr(m, "Plora_A")))
            ref.model(inputs_embeds=embeds, im_mask=im_mask, use_cache=False)
    except _ChangedInPlace:
        writer.close()  # no write may still be in flight when the folder is removed
        raise
    meta.plora = rec.plora
    meta.extras = {"content_hash": call.content_hash, "teacher": str(teacher.root) if teacher else None}
    trace = writer.close()  # waits for the last layer's file, then writes the head's values
    rec.verify(rec.in_flight + rec.watched)
    return trace
