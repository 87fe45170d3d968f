"""parity: layer-by-layer numerical parity between an HF PLoRA model and its TurboMind deployment."""

from .version import __version__

__all__ = ["run", "assert_parity", "__version__"]


def __getattr__(name):  # keep `import parity` cheap: torch and transformers load on first use
    if name in ("run", "assert_parity"):
        from . import api

        return getattr(api, name)
    raise AttributeError(name)
