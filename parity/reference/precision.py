"""Run the reference at another precision without a second copy of the model.

The noise floor needs the reference in float64 (or the deployment dtype). A cast copy of a 7B model would
cost 56 GB; instead each decoder layer's parameters and buffers are cast just before the layer runs and the
originals put back right after, so only one layer at a time exists in the compute dtype. Outside the
decoder layers, `outside` chooses:

* "run": a module is cast only while its own forward runs (forward pre-hook swaps, forward hook restores,
  also when the forward raises). A forward from `inputs_embeds` then casts the final norm and the LM head
  and never the token embedding (3 GB in float64 at a 92,544 vocabulary) or the vision tower. A module
  whose subtree holds a decoder layer (the model, its decoder stack) casts only its own direct tensors.
* "all" (default): every module is cast once for the whole block. Entry points other than `forward` need
  it: XComposer2's `encode_img` reads the model's dtype from its first parameter (the token embedding)
  before any hooked module runs.

Restoring swaps the original tensors back, so a down-cast (float32 storage, bfloat16 compute) loses nothing,
and the model is left exactly as it was (the same tensors, not re-cast copies).

`via` rounds each parameter to the dtype the deployment stores it in before the cast (buffers are not
deployed weights): lmdeploy 0.7.1 has no float32 weight type, so a float32 checkpoint's workspace holds float16
weights, and a reference judged against it must hold the same ones (`ReferenceModel.weights_dtype`).

Casting the weights is not all of it: remote code pins some computations to float32 by name (`.float()`,
`dtype=torch.float32`): XComposer2's rotary angles and cos/sin, its softmax, its RMSNorm. A "float64" run
that kept those pins would share their float32 rounding with the float32 reference and so never measure it
(at position 3,800 a float32 rotary angle is off by ~2e-4 rad). `widened_float32` lifts every such pin to
float64 for the float64 runs, so the float64 reference is float64 throughout. Tables a decoder layer's code
builds once at construction (upstream XComposer2's rotary `cos_cached`/`sin_cached` and `inv_freq`) are
rebuilt the same way: a float64 run builds a fresh layer of the same class (weights on meta, widened) and
uses its non-persistent buffers instead of casting the float32 ones.
"""

from __future__ import annotations

import functools
from contextlib import ExitStack, contextmanager
from typing import Callable, Iterator

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

_Saved = list[tuple[object, str, torch.Tensor]]


def _rounds(p: torch.Tensor, dtype: torch.dtype, via: torch.dtype | None) -> bool:
    """Whether parameter `p` changes when computed at `dtype` from its deployed (`via`) value."""
    return p.is_floating_point() and (p.dtype != dtype or (via is not None and p.dtype != via))


def _swap(module: nn.Module, dtype: torch.dtype, recurse: bool = True, via: torch.dtype | None = None,
          derived: dict[tuple[str, str], torch.Tensor] | None = None) -> _Saved:
    """Cast `module` to `dtype`; a buffer named in `derived` ((module path, buffer name) -> tensor) is replaced
    by that tensor instead of cast."""
    saved = []
    for p in module.parameters(recurse=recurse):
        if _rounds(p, dtype, via):
            saved.append((p, "data", p.data))
            p.data = (p.data.to(via) if via is not None else p.data).to(dtype)
    mods = module.named_modules() if recurse else [("", module)]
    for path, m in mods:
        for name, b in list(m._buffers.items()):
            if b is not None and b.is_floating_point() and b.dtype != dtype:
                saved.append((m, name, b))
                m._buffers[name] = derived[(path, name)] if derived and (path, name) in derived else b.to(dtype)
    return saved


def _derived_buffers(layer: nn.Module, index: int, config) -> dict[tuple[str, str], torch.Tensor]:
    """Decoder layer `index`'s non-persistent floating buffers (tables its code derives at construction, such as
    a rotary cos/sin cache) as that code builds them in a float64 run: a fresh layer of the same class from
    `config`, weights on the meta device, default dtype float64 and every float32 widened. {} when the layer
    has none, or its class cannot be built from the config (the buffers are then only cast)."""
    wanted = {(path, name): b for path, m in layer.named_modules() for name, b in m._buffers.items()
              if b is not None and b.is_floating_point() and name in m._non_persistent_buffers_set}
    if not wanted or config is None:
        return {}
    from accelerate import init_empty_weights

    fresh = None
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        with init_empty_weights(), widened_float32(torch.float64):
            for args in ((config,), (config, index)):
                try:
                    fresh = type(layer)(*args)
                    break
                except Exception:  # noqa: BLE001 - the model's code: another signature, or not buildable alone
                    continue
    finally:
        torch.set_default_dtype(previous)
    if fresh is None:
        return {}
    built = {(path, name): b for path, m in fresh.named_modules() for name, b in m._buffers.items() if b is not None}
    return {key: built[key].to(old.device) for key, old in wanted.items()
            if key in built and built[key].dtype == torch.float64 and built[key].shape == old.shape}


def _restore(saved: _Saved) -> None:
    for owner, name, t in reversed(saved):
        if name == "data":
            owner.data = t
        else:
            owner._buffers[name] = t


def _needs(module: nn.Module, dtype: torch.dtype, recurse: bool, via: torch.dtype | None = None) -> bool:
    if any(_rounds(p, dtype, via) for p in module.parameters(recurse=recurse)):
        return True
    return any(t is not None and t.is_floating_point() and t.dtype != dtype for t in module.buffers(recurse=recurse))


def _outside_modules(model: nn.Module, layers: list[nn.Module]) -> tuple[list[nn.Module], list[nn.Module]]:
    """(containers, others): the modules outside the decoder layers, split by whether their subtree holds a
    decoder layer."""
    layer_ids = {id(layer) for layer in layers}
    inside = {id(m) for layer in layers for m in layer.modules()}
    containers: list[nn.Module] = []
    others: list[nn.Module] = []
    seen: set[int] = set()

    def walk(m: nn.Module) -> bool:
        if id(m) in layer_ids:
            return True
        if id(m) in inside or id(m) in seen:
            return False
        seen.add(id(m))
        holds = False
        for child in m.children():
            holds = walk(child) or holds
        (containers if holds else others).append(m)
        return holds

    walk(model)
    return containers, others


@contextmanager
def compute_dtype(model: nn.Module, layers: list[nn.Module], dtype: torch.dtype,
                  outside: str = "all", via: torch.dtype | None = None) -> Iterator[None]:
    """Within the block, `model` computes in `dtype`, one decoder layer at a time; `outside` ("all" or
    "run") says how the modules outside the decoder layers are cast (see the module docstring); `via`, the
    dtype each parameter is rounded to first (the deployment's, or None)."""
    if outside not in ("all", "run"):
        raise ValueError(f"outside must be 'all' or 'run', not {outside!r}")
    storage = next(model.parameters()).dtype
    if storage == dtype and not (via is not None and any(_rounds(p, dtype, via) for p in model.parameters())):
        yield
        return
    rest: _Saved = []
    pending: dict[int, list[_Saved]] = {}

    config = getattr(model, "config", None)

    def before(key, module: nn.Module, recurse: bool):
        def hook(mod, args, kwargs):
            # a float64 run rebuilds a layer's construction-time tables in float64 (`widened_float32`)
            derived = _derived_buffers(module, key, config) if dtype == torch.float64 and isinstance(key, int) else None
            pending.setdefault(key, []).append(_swap(module, dtype, recurse, via, derived))
        return hook

    def after(key):
        def hook(mod, args, output):
            stack = pending.get(key)
            if stack:
                _restore(stack.pop())
        return hook

    with ExitStack() as stack:
        try:
            if outside == "all":
                layer_ids = {id(m) for layer in layers for m in layer.modules()}
                for m in model.modules():  # everything outside the decoder layers, once
                    if id(m) not in layer_ids:
                        rest += _swap(m, dtype, recurse=False, via=via)
            else:
                containers, others = _outside_modules(model, layers)
                hooked = [(m, False) for m in containers if _needs(m, dtype, recurse=False, via=via)]
                hooked += [(m, True) for m in others if _needs(m, dtype, recurse=True, via=via)]
                for m, recurse in hooked:
                    key = ("outside", id(m))
                    stack.callback(m.register_forward_pre_hook(before(key, m, recurse), with_kwargs=True).remove)
                    stack.callback(m.register_forward_hook(after(key), always_call=True).remove)
            for i, layer in enumerate(layers):
                stack.callback(layer.register_forward_pre_hook(before(i, layer, True), with_kwargs=True).remove)
                # registered after the capture's hooks: it must restore once they have read the layer's output
                stack.callback(layer.register_forward_hook(after(i), prepend=False).remove)
            yield
        finally:
            for saved in pending.values():
                while saved:
                    _restore(saved.pop())
            _restore(rest)


class _WidenFloat32(TorchFunctionMode):
    def __init__(self):
        super().__init__()
        self.paused = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if not self.paused:
            if func is torch.Tensor.float:
                func = torch.Tensor.double
            else:
                if kwargs.get("dtype") is torch.float32:
                    kwargs = {**kwargs, "dtype": torch.float64}
                if any(a is torch.float32 for a in args):
                    args = tuple(torch.float64 if a is torch.float32 else a for a in args)
        return func(*args, **kwargs)


_WIDENING: list[_WidenFloat32] = []


@contextmanager
def widened_float32(dtype: torch.dtype) -> Iterator[None]:
    """When `dtype` is float64: within the block, every float32 that the model's code asks for by name
    (`.float()`, `dtype=torch.float32`, `.to(torch.float32)`) is float64 (see the module docstring); parity's
    own code running inside the forward (hooks, emulated deployment parts) opts out with `unwidened`.
    Otherwise nothing."""
    if dtype != torch.float64:
        yield
        return
    mode = _WidenFloat32()
    _WIDENING.append(mode)
    try:
        with mode:
            yield
    finally:
        _WIDENING.remove(mode)


def unwidened(fn: Callable) -> Callable:
    """`fn` (a hook, a deployment part run inside the model's forward) as parity's code: it gets the float32 it
    asks for (reading a float32 trace file, emulating TurboMind's float32 arithmetic) also in a float64 run."""
    @functools.wraps(fn)
    def run(*args, **kwargs):
        modes = list(_WIDENING)
        for m in modes:
            m.paused += 1
        try:
            return fn(*args, **kwargs)
        finally:
            for m in modes:
                m.paused -= 1
    return run
