"""Deployment-side engines behind one interface (see `base.Engine`). A new engine is a class with `kind`,
`preflight`, `activate`, `infer`, `deactivate` and `close`, registered in `ENGINES` by its `--engine` name."""

from __future__ import annotations

import importlib

from ..errors import ParityInputError
from .base import Engine, EngineSetup

# --engine name -> "module:class", imported on use (the live engine's module is only needed with a GPU)
ENGINES: dict[str, str] = {
    "replay": "parity.engines.replay:ReplayRunner",
    "turbomind": "parity.engines.live:LiveRunner",
}


def engine_class(kind: str) -> type[Engine]:
    if kind not in ENGINES:
        raise ParityInputError(f"Unknown engine {kind!r}; expected one of {', '.join(map(repr, ENGINES))}.")
    module, name = ENGINES[kind].split(":")
    return getattr(importlib.import_module(module), name)


__all__ = ["ENGINES", "Engine", "EngineSetup", "engine_class"]
