"""Capture the HF reference at canonical points with forward hooks, streaming one layer at a time.

Values are cloned at capture time (an in-place op later in the forward must not change what was
recorded). For each PLoRA linear the hook records its input, the base output `x @ W.T (+ b)`, the LoRA
delta exactly as the model added it (taken from `Plora_B`'s output times the scaling, placed on the rows
of the mask it received) and that mask.

Separate q/k/v projections (Qwen2 PLoRA models; the anatomy's `FusedQKV`) are hooked one by one; when the
third has run, their outputs, bases and deltas are joined into XComposer2's grouped `attention.wqkv`
columns (`parity.deploy.layout.join_grouped_qkv`) and recorded as that one canonical point. Its `meta.plora`
is the fused linear's: rank r_q + r_k + r_v, scale 1.0 (the scales live in the fused B, as a faithful
conversion writes them).
"""

from __future__ import annotations

from contextlib import ExitStack
from typing import Any

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from ..deploy.layout import join_grouped_qkv
from ..points import plora_key
from ..records import HFCall
from ..trace import Trace, TraceMeta, TraceWriter
from .loader import ReferenceModel
from .precision import compute_dtype


def _first(x: Any) -> torch.Tensor:
    return x[0] if isinstance(x, (tuple, list)) else x


def _rows(t: torch.Tensor) -> torch.Tensor:
    return t.detach().reshape(-1, t.shape[-1]).clone()


class _BaseTap(TorchFunctionMode):
    """Keeps what each PLoRA linear's own `F.linear` call returned (its base output `x @ W.T (+ b)`), so the
    capture need not compute it a second time. Cloned at once: PLoRA then adds the LoRA term in place."""

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

    def __init__(self, ref: ReferenceModel, writer: TraceWriter, store_dtype: torch.dtype, teacher: Trace | None):
        self.ref = ref
        self.writer = writer
        self.store = store_dtype
        self.teacher = teacher
        self.tap: _BaseTap | None = None
        self.current: dict[str, torch.Tensor] = {}
        self.b_out: dict[tuple[int, str], torch.Tensor] = {}
        self.plora: dict[str, dict[str, dict[str, float]]] = {}
        self.pending: dict[tuple[int, str], dict[str, tuple]] = {}  # fused linears: part -> recorded values

    def put(self, key: str, value: torch.Tensor) -> None:
        self.current[key] = _rows(value).to(self.store)

    def install(self, stack: ExitStack) -> None:
        a = self.ref.anatomy
        hooks = []
        for i, layer in enumerate(a.layers):
            hooks.append(layer.register_forward_hook(self._layer_done(i)))
            if self.teacher is not None:
                hooks.append(layer.register_forward_pre_hook(self._teacher_input(i), with_kwargs=True))
            for name, norm in a.norms[i].items():
                hooks.append(norm.register_forward_hook(self._plain(name)))
            for point, lin in a.linears.get(i, {}).items():
                if getattr(lin, "fused", False):
                    for part, mod in lin.module.parts.items():
                        key = f"{point}/{part}"
                        hooks.append(mod.Plora_B.register_forward_hook(self._b_output(i, key)))
                        hooks.append(mod.register_forward_hook(self._part(i, point, part, lin), with_kwargs=True))
                else:
                    hooks.append(lin.module.Plora_B.register_forward_hook(self._b_output(i, point)))
                    hooks.append(lin.module.register_forward_hook(self._linear(i, point, lin), with_kwargs=True))
                self.plora.setdefault(str(i), {})[point] = {"rank": lin.rank, "scale": lin.scale}
        hooks.append(a.final_norm.register_forward_hook(lambda m, i, o: self.writer.post("norm", _rows(o).to(self.store))))
        hooks.append(a.lm_head.register_forward_hook(lambda m, i, o: self.writer.post("output", _rows(o).to(self.store))))
        for h in hooks:
            stack.callback(h.remove)

    def _plain(self, point: str):
        def hook(module, args, output):
            self.put(point, _first(output))
        return hook

    def _b_output(self, layer: int, point: str):
        def hook(module, args, output):
            self.b_out[(layer, point)] = output.detach().reshape(-1, output.shape[-1]).clone()
        return hook

    def _values(self, module, args, kwargs, output, b_key, scale):
        """(input rows, output rows, base rows, delta rows, flat mask) of one PLoRA call."""
        x = args[0]
        mask = args[1] if len(args) > 1 else kwargs.get("im_mask")
        rows = _rows(x)
        tapped = self.tap.pop(module.weight) if self.tap is not None else None
        base = _rows(tapped if tapped is not None else F.linear(x, module.weight, module.bias))
        out = _rows(output)
        delta = torch.zeros_like(out)
        flat_mask = torch.zeros(rows.shape[0], dtype=torch.bool)
        b = self.b_out.pop(b_key, None)
        if mask is not None:
            flat_mask = mask.reshape(-1).bool().cpu()
            if b is not None:
                if flat_mask.any():
                    delta[flat_mask] = b * scale
                else:  # upstream's all-False branch: one row of B(A(x)) * 0 added to row 0
                    delta[0] = b[0] * 0
        return rows, out, base, delta, flat_mask

    def _record(self, point: str, rows, out, base, delta, flat_mask) -> None:
        self.put(point, out)
        self.put(plora_key(point, "input"), rows)
        self.put(plora_key(point, "base"), base)
        self.put(plora_key(point, "delta"), delta)
        self.current[plora_key(point, "mask")] = flat_mask.to(torch.uint8)

    def _linear(self, layer: int, point: str, lin):
        def hook(module, args, kwargs, output):
            rows, out, base, delta, flat_mask = self._values(module, args, kwargs, output, (layer, point), lin.scale)
            if point == "attention.wo":
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
                return join_grouped_qkv(q[j], k[j], v[j], shape.heads, shape.kv_heads, shape.head_dim)

            self._record(point, q[0], join(1), join(2), join(3), q[4])
        return hook

    def _teacher_input(self, layer: int):
        """Layer-level teacher forcing: feed layer k the teacher's input for layer k."""
        def hook(module, args, kwargs):
            src = self.teacher.get(None, "embeddings") if layer == 0 else self.teacher.get(layer - 1, "layer")
            if args:
                h = args[0]
                new = src.to(h.dtype).reshape(h.shape)
                return (new, *args[1:]), kwargs
            h = kwargs["hidden_states"]
            kwargs["hidden_states"] = src.to(h.dtype).reshape(h.shape)
            return args, kwargs
        return hook

    def _layer_done(self, index: int):
        def hook(module, args, output):
            self.put("layer", _first(output))
            self.writer.layer(index, self.current)
            self.current = {}
        return hook


@torch.no_grad()
def capture_reference(
    ref: ReferenceModel,
    call: HFCall,
    writer_root,
    case: str,
    side: str = "reference",
    teacher: Trace | None = None,
    store_dtype: torch.dtype | None = None,
) -> Trace:
    """Run the reference once on `call` and stream its trace to `writer_root`.

    With `teacher`, every decoder layer is fed the teacher's input for that layer (layer-level local run),
    which is how the noise floor of local errors is measured.
    """
    store = store_dtype or (torch.float64 if ref.dtype == torch.float64 else torch.float32)
    meta = TraceMeta(side=side, case=case, num_layers=ref.anatomy.num_layers, dtype=str(ref.dtype).replace("torch.", ""))
    writer = TraceWriter(writer_root, meta)
    embeds = call.inputs_embeds.to(ref.dtype)
    writer.pre("embeddings", embeds.to(store))
    rec = _Recorder(ref, writer, store, teacher)
    with ExitStack() as stack:
        rec.install(stack)
        stack.enter_context(compute_dtype(ref.model, ref.anatomy.layers, ref.dtype))
        rec.tap = stack.enter_context(_BaseTap(m.weight for m in ref.model.modules() if hasattr(m, "Plora_A")))
        ref.model(inputs_embeds=embeds, im_mask=call.im_mask, use_cache=False)
    meta.plora = rec.plora
    meta.extras = {"content_hash": call.content_hash, "teacher": str(teacher.root) if teacher else None}
    return writer.close()
