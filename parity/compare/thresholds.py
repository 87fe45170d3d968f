"""Verdict thresholds: an error is judged against the reference's own noise floor at the engine's precision.

threshold = clamp(floor_factor * floor, min_rel, max_rel)
`floor` is the relative L2 error of the reference against itself (float64 vs float32 for the fp32 replay;
float32 vs the deployment dtype for dtype emulation and the live engine). `min_rel` keeps exactly
reproducible points (floor 0) from failing on the last bit; `max_rel` is the absolute cap that no noisy
floor may lift a threshold above, so a real fault cannot hide under the noise of an unrelated point.
Configurable in `[tool.parity]` of the project's pyproject.toml and by CLI flags.
"""

from __future__ import annotations

import sys
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

from ..errors import ParityInputError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


@dataclass(frozen=True)
class Thresholds:
    floor_factor: float = 10.0
    # per numeric mode: (min_rel, max_rel)
    fp32_min_rel: float = 1e-6
    fp32_max_rel: float = 1e-4
    lowp_min_rel: float = 2e-3
    lowp_max_rel: float = 5e-2
    # PLoRA deltas: a best-fit factor this far from 1 (with cosine above `delta_cosine`) is a scale mismatch
    scale_tolerance: float = 1e-2
    delta_cosine: float = 0.999

    def bounds(self, numeric: str) -> tuple[float, float]:
        if numeric == "fp32":
            return self.fp32_min_rel, self.fp32_max_rel
        return self.lowp_min_rel, self.lowp_max_rel

    def threshold(self, floor: float, numeric: str) -> float:
        lo, hi = self.bounds(numeric)
        return min(max(self.floor_factor * floor, lo), hi)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def updated(self, **overrides: Any) -> "Thresholds":
        names = {f.name for f in fields(self)}
        clean = {}
        for k, v in overrides.items():
            if v is None:
                continue
            if k not in names:
                raise ParityInputError(f"Unknown threshold {k!r}; known: {', '.join(sorted(names))}.")
            try:
                clean[k] = float(v)
            except (TypeError, ValueError):
                raise ParityInputError(f"Threshold {k} must be a number, got {v!r}.") from None
            if not clean[k] > 0:
                raise ParityInputError(f"Threshold {k} must be positive, got {v!r}.")
        return replace(self, **clean)


def load_thresholds(pyproject: Path | None = None, **overrides: Any) -> Thresholds:
    """Defaults, then `[tool.parity]` of pyproject.toml (current folder by default), then overrides."""
    t = Thresholds()
    path = pyproject or Path.cwd() / "pyproject.toml"
    if path.is_file():
        try:
            data = tomllib.loads(path.read_text())
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
            raise ParityInputError(f"{path} is not valid TOML ({e}).") from None
        section = data.get("tool", {}).get("parity", {})
        if not isinstance(section, dict):
            raise ParityInputError(f"{path}: [tool.parity] must be a table.")
        t = t.updated(**section)
    return t.updated(**overrides)
