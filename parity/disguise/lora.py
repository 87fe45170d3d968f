"""The lora_config that reproduces a disguised model's per-linear LoRA ranks/scales, and making lmdeploy use it.

lmdeploy 0.7.1's `Xcomposer2Model.model_info()` hard-codes the LoRA settings per XComposer2 sub-type
(7b: every linear rank 256, scale 1.0). A disguised Qwen2 PLoRA model has other ranks (a wrong rank fails
at TurboMind load) and other scales (a wrong scale is accepted silently). `parity disguise` therefore
writes `parity_lora_config.json` next to the checkpoint, and `register_lora_config()` registers, in
lmdeploy's own `INPUT_MODELS` registry under 'xcomposer2', a subclass of lmdeploy's `Xcomposer2Model` whose
`model_info()` returns that lora_config for folders that carry the file. Call it in every process that
converts or serves the disguise (before `lmdeploy.pipeline(...)` / `lmdeploy convert` in Python); it is
process-local and changes nothing for other models.

The same registration carries the disguise's q/k/v biases: lmdeploy's xcomposer2 reader leaves `attn_bias`
at 0, so its exporter (`turbomind/deploy/module.py`, `Attn.apply`) never asks the reader for
`attention.wqkv.bias`; for a disguise whose config.json says `bias: true` the registered `model_info()` also
returns `attn_bias = 1`, and lmdeploy's own exporter then writes the biases in TurboMind's layout (grouped,
rotary-permuted, tp-split, a zero `wo.bias`), which TurboMind adds to q/k/v before the rotary embedding.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any, Iterator, Mapping

from ..deploy.folder_config import LORA_CONFIG_FILE, disguise_model_info, read_lora_config, validated_lora_config
from ..errors import ParityInputError


_REGISTRY_NAME = "xcomposer2"
_state: dict[str, Any] = {"original": None, "ours": None}
_explicit: dict[str, dict[str, Any]] = {}  # resolved model path -> lora_config given to register_lora_config


def lora_config_for_disguise(linears: Mapping[tuple[int, str], tuple[int, float]]) -> dict[str, Any]:
    """The lora_config (six TurboMind keys) under which TurboMind resolves exactly these (rank, scale).

    `linears`: (layer, canonical linear e.g. "attention.wqkv") -> (rank, scale). Built with
    `parity.deploy.lora_config.lora_config_for` and checked with `resolve` for every given linear.
    """
    from ..deploy.lora_config import f32, lora_config_for, resolve
    from ..deploy.workspace import LoraSettings
    from ..names import TM_LINEAR_OF

    tm = {(layer, TM_LINEAR_OF[lin]): (int(r), float(s)) for (layer, lin), (r, s) in linears.items()}
    cfg = lora_config_for(tm)
    settings = LoraSettings(**cfg)
    for (layer, name), (r, s) in tm.items():
        got = resolve(settings, layer, name)
        if got != (r, f32(s)):
            raise AssertionError(f"lora_config_for does not round-trip layers.{layer}.{name}: {got} != {(r, s)}")
    return cfg


def _key(path: str | Path) -> str:
    return str(Path(path).resolve())


def _lora_for(model_path: str) -> dict[str, Any] | None:
    cfg = _explicit.get(_key(model_path))
    if cfg is not None:
        return dict(cfg)
    return read_lora_config(model_path)


def _registry():
    from ..deploy.compat import cpu_converter_patches

    with cpu_converter_patches():  # importing lmdeploy.turbomind needs the stand-in on a CPU-only machine
        from lmdeploy.turbomind.deploy.source_model.base import INPUT_MODELS
        from lmdeploy.turbomind.deploy.source_model.xcomposer2 import Xcomposer2Model  # noqa: F401 - registers it
    return INPUT_MODELS


def _make_class(base: type) -> type:
    class ParityXcomposer2Model(base):  # type: ignore[misc, valid-type]
        """lmdeploy's Xcomposer2Model; `model_info()` takes the LoRA settings from parity_lora_config.json and
        exports the disguise's q/k/v biases (`disguise_model_info`)."""

        parity_lora = True

        def model_info(self):
            info = super().model_info()
            cfg = _lora_for(self.model_path)
            if cfg is not None:
                info.update(disguise_model_info(self.model_path, cfg))
            return info

    ParityXcomposer2Model.__qualname__ = ParityXcomposer2Model.__name__
    return ParityXcomposer2Model


def register_lora_config(model_path: str | Path | None = None, lora_config: Mapping[str, Any] | None = None) -> dict | None:
    """Make lmdeploy's xcomposer2 conversion/serving in this process use parity's lora_config.

    Registers (once; `force=True` in lmdeploy's `INPUT_MODELS` under 'xcomposer2') a subclass of the
    registered `Xcomposer2Model` whose `model_info()` returns, for a model folder, `lora_config` if one was
    registered for that folder here, else the folder's `parity_lora_config.json`, else lmdeploy's own
    settings; with a parity lora_config it also sets `attn_bias` from the folder's `bias` flag. With `model_path` (and no `lora_config`) the folder must carry the file; returns the
    lora_config that will be used for `model_path` (None without one).
    """
    if lora_config is not None and model_path is None:
        raise ParityInputError("register_lora_config: a lora_config needs the model_path it applies to.")
    cfg = None
    if model_path is not None:
        if not Path(model_path).is_dir():
            raise ParityInputError(f"register_lora_config: model folder {model_path} does not exist.")
        if lora_config is not None:
            cfg = validated_lora_config(dict(lora_config), "register_lora_config(lora_config=...)")
        else:
            cfg = read_lora_config(model_path)
            if cfg is None:
                raise ParityInputError(
                    f"{Path(model_path) / LORA_CONFIG_FILE} does not exist; expected the folder written by "
                    "`parity disguise` (or pass lora_config=... explicitly)."
                )
    registry = _registry()
    current = registry.get(_REGISTRY_NAME)
    if current is not _state["ours"] or _state["ours"] is None:
        _state["original"] = current
        _state["ours"] = _make_class(current)
        registry.register_module(name=_REGISTRY_NAME, force=True, module=_state["ours"])
    if model_path is not None and lora_config is not None:
        _explicit[_key(model_path)] = cfg
    return cfg


def unregister_lora_config() -> None:
    """Put lmdeploy's own class back under 'xcomposer2' and forget explicit registrations."""
    _explicit.clear()
    if _state["ours"] is None:
        return
    registry = _registry()
    if registry.get(_REGISTRY_NAME) is _state["ours"]:
        registry.register_module(name=_REGISTRY_NAME, force=True, module=_state["original"])
    _state["ours"] = _state["original"] = None


def is_registered() -> bool:
    """Whether lmdeploy's registry currently holds parity's class under 'xcomposer2'."""
    try:
        return bool(getattr(_registry().get(_REGISTRY_NAME), "parity_lora", False))
    except Exception:  # lmdeploy missing
        return False


@contextlib.contextmanager
def lora_config_registered(model_path: str | Path | None = None,
                           lora_config: Mapping[str, Any] | None = None) -> Iterator[dict | None]:
    """`register_lora_config` for the duration of a block (the previous registration state is restored)."""
    was = is_registered()
    before = dict(_explicit)
    try:
        yield register_lora_config(model_path, lora_config)
    finally:
        if not was:
            unregister_lora_config()
        else:
            _explicit.clear()
            _explicit.update(before)
