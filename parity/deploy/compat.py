"""Running lmdeploy's TurboMind converter on a machine without CUDA.

lmdeploy's converter is pure Python, but three things in its import/call path assume a GPU
(turbomind-plora.md, section 2):

(a) ``import lmdeploy.turbomind`` runs ``lmdeploy/turbomind/turbomind.py``, which appends
    ``lmdeploy/lib`` to ``sys.path`` and does ``import _turbomind as _tm`` -- the compiled CUDA extension,
    which needs libcublas.so.12. We register a stand-in module under the top-level name ``_turbomind``.
(b) the input policy moves every tensor with ``tensor.cuda()``; we make ``torch.Tensor.cuda`` return self.
(c) ``is_bf16_supported()`` calls ``torch.cuda.current_device()``; we make it answer True, both in
    ``lmdeploy.utils`` and in every already-imported ``lmdeploy.*`` module that bound the name with
    ``from ...utils import is_bf16_supported`` (the converter does), and ``torch.cuda.is_bf16_supported``.

All patches are applied only when ``torch.cuda.is_available()`` is False, only inside the context manager,
and are undone on exit (on a CUDA machine whose lmdeploy lacks its compiled extension, only (a) is). They never leave the harness process (nothing is written to disk).

Side effect we also undo: lmdeploy's ``get_logger`` lowers every plain ``StreamHandler`` of the root logger
to ERROR the first time it runs; the levels are restored on exit.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import sys
import types
from typing import Any, Iterator

import torch

from ..patching import patched

STUB_MODULE_NAME = "_turbomind"


def installed_lmdeploy_version() -> str | None:
    """Version string of the installed lmdeploy, or None when it is not installed.

    Read from package metadata first (does not import lmdeploy), then from ``lmdeploy.version``.
    """
    try:
        from importlib.metadata import PackageNotFoundError, version

        try:
            return version("lmdeploy")
        except PackageNotFoundError:
            pass
    except Exception:  # pragma: no cover - very old Pythons
        pass
    try:
        mod = importlib.import_module("lmdeploy.version")
        return str(getattr(mod, "__version__"))
    except Exception:
        return None


def _unavailable(what: str) -> Exception:
    from ..errors import EngineUnavailable

    return EngineUnavailable(
        f"lmdeploy's TurboMind engine ({what}) is not available in this process: _turbomind was imported "
        "through parity's CPU conversion stand-in because no CUDA device is present. Only the converter can "
        "run here; running TurboMind needs a CUDA 12 GPU machine with lmdeploy's wheel."
    )


class _PlaceholderMeta(type):
    """Any attribute of a placeholder is another placeholder, so module-level uses such as type annotations
    (`_tm.TensorMap`) or enum look-ups succeed at import time; calling one raises EngineUnavailable."""

    def __getattr__(cls, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        return _placeholder(f"{cls.__qualname__}.{name}")

    def __call__(cls, *args: Any, **kwargs: Any) -> Any:
        raise _unavailable(f"{cls.__qualname__}()")


def _placeholder(qualname: str) -> type:
    t = _PlaceholderMeta(qualname.rsplit(".", 1)[-1], (), {})
    t.__qualname__ = qualname
    return t


def _make_stub() -> types.ModuleType:
    mod = types.ModuleType(STUB_MODULE_NAME)
    mod.__doc__ = "parity stand-in for lmdeploy's compiled _turbomind extension (CPU conversion only)."
    mod.__parity_stub__ = True  # type: ignore[attr-defined]

    def __getattr__(name: str) -> Any:  # module-level __getattr__ (PEP 562)
        if name.startswith("__"):
            raise AttributeError(name)
        return _placeholder(f"_turbomind.{name}")

    mod.__getattr__ = __getattr__  # type: ignore[attr-defined]
    return mod


def _cuda_noop(self: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    return self


def _bf16_true(*args: Any, **kwargs: Any) -> bool:
    return True


def lmdeploy_lib():
    """lmdeploy's `lib` folder (where its compiled `_turbomind*.so` lives), or None without lmdeploy."""
    import importlib.util
    from pathlib import Path

    try:
        spec = importlib.util.find_spec("lmdeploy")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.origin:
        return None
    return Path(spec.origin).parent / "lib"


def _extension_installed() -> bool:
    """Whether lmdeploy's compiled extension is on disk, without importing it."""
    lib = lmdeploy_lib()
    return lib is not None and any(lib.glob(f"{STUB_MODULE_NAME}*"))


@contextlib.contextmanager
def cpu_converter_patches() -> Iterator[bool]:
    """Patch the process so lmdeploy's converter can be imported and run on CPU.

    Yields True when patches were applied (no CUDA), False when CUDA is present (nothing patched).
    """
    if torch.cuda.is_available():
        if _extension_installed() or STUB_MODULE_NAME in sys.modules:
            yield False
            return
        # a CUDA machine with lmdeploy's Python part only (scripts/device_check.py's pack): the converter
        # needs just the stand-in for the compiled extension
        sys.modules[STUB_MODULE_NAME] = _make_stub()
        try:
            yield True
        finally:
            sys.modules.pop(STUB_MODULE_NAME, None)
        return

    undo: list[Any] = []  # callables run in reverse order on exit
    patches = contextlib.ExitStack()  # attribute patches, each left as found (parity/patching.py)
    root_levels = [(h, h.level) for h in logging.getLogger().handlers]
    try:
        # (a) stand-in for the compiled extension
        if STUB_MODULE_NAME not in sys.modules:
            sys.modules[STUB_MODULE_NAME] = _make_stub()
            undo.append(lambda: sys.modules.pop(STUB_MODULE_NAME, None))

        # (b) Tensor.cuda -> self (inherited from TensorBase: left_as_found deletes the copy again)
        patches.enter_context(patched(torch.Tensor, "cuda", _cuda_noop))

        # (c) is_bf16_supported -> True, in torch and in lmdeploy (by name, wherever it is bound)
        patches.enter_context(patched(torch.cuda, "is_bf16_supported", _bf16_true))

        try:
            lm_utils = importlib.import_module("lmdeploy.utils")
        except Exception:
            lm_utils = None
        if lm_utils is not None and hasattr(lm_utils, "is_bf16_supported"):
            orig_bf16 = lm_utils.is_bf16_supported
            # Import the converter now so that its `from ...utils import is_bf16_supported` is resolved and
            # can be rebound below (importing it under the patch would bind the patched one anyway).
            with contextlib.suppress(Exception):
                importlib.import_module("lmdeploy.turbomind.deploy.converter")
            for name, mod in list(sys.modules.items()):
                if mod is None or not (name == "lmdeploy" or name.startswith("lmdeploy.")):
                    continue
                if getattr(mod, "is_bf16_supported", None) is orig_bf16:
                    patches.enter_context(patched(mod, "is_bf16_supported", _bf16_true))
        yield True
    finally:
        patches.close()
        for fn in reversed(undo):
            with contextlib.suppress(Exception):
                fn()
        for handler, level in root_levels:
            handler.setLevel(level)


def stub_active() -> bool:
    """True when ``_turbomind`` in this process is parity's stand-in (or was bound to it by an import)."""
    mod = sys.modules.get(STUB_MODULE_NAME)
    if mod is not None and getattr(mod, "__parity_stub__", False):
        return True
    tm = sys.modules.get("lmdeploy.turbomind.turbomind")
    return bool(tm is not None and getattr(getattr(tm, "_tm", None), "__parity_stub__", False))
