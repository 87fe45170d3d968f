"""Verdict thresholds: an error is judged against the reference's own noise floor at the engine's precision.

threshold = clamp(floor_factor * floor, min_rel, max_rel)
`floor` is the relative L2 error of the reference against itself (float64 vs float32 for the fp32 replay;
float32 vs the deployment dtype for dtype emulation and the live engine). `min_rel` keeps exactly
reproducible points (floor 0) from failing on the last bit; `max_rel` is the absolute cap that no noisy
floor may lift a threshold above, so a real fault cannot hide under the noise of an unrelated point.
Configurable in `[tool.parity]` of the project's pyproject.toml and by CLI flags.
"""

from __future__ import annotations

import math
import sys
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any

from pydantic import ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic.dataclasses import dataclass

from ..errors import ParityInputError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib



@dataclass(frozen=True, config=ConfigDict(extra="forbid", strict=False))
class Thresholds:
    """The verdict's numbers; constructing one validates them (a bad value is bad input, not a quiet pass)."""

    # >= 1: a factor below 1 would put the threshold under the reference's own noise (false alarms)
    floor_factor: float = Field(10.0, ge=1, allow_inf_nan=False)
    # per numeric mode: (min_rel, max_rel); a cap of 1 or more would pass an output that is all zeros
    fp32_min_rel: float = Field(1e-6, gt=0, lt=1, allow_inf_nan=False)
    fp32_max_rel: float = Field(1e-4, gt=0, lt=1, allow_inf_nan=False)
    lowp_min_rel: float = Field(2e-3, gt=0, lt=1, allow_inf_nan=False)
    lowp_max_rel: float = Field(5e-2, gt=0, lt=1, allow_inf_nan=False)
    # PLoRA deltas: a best-fit factor this far from 1 (with cosine above `delta_cosine`) is a scale mismatch
    scale_tolerance: float = Field(1e-2, gt=0, lt=1, allow_inf_nan=False)
    delta_cosine: float = Field(0.999, gt=0, lt=1, allow_inf_nan=False)
    # lmdeploy's image features (float16 ViT) against the HF model's: largest difference per row, relative to
    # the row's largest value (float16 steps are 2^-11 relative; a ViT's depth adds a few: 2^-6 leaves margin)
    image_feature_rel: float = Field(2.0 ** -6, gt=0, lt=1, allow_inf_nan=False)

    @field_validator("*", mode="before")
    @classmethod
    def _not_bool(cls, v: Any) -> Any:
        if isinstance(v, bool):
            raise ValueError(f"expected a number, got {v}")
        return v

    @model_validator(mode="after")
    def _ordered(self) -> "Thresholds":
        for mode in ("fp32", "lowp"):
            lo, hi = getattr(self, f"{mode}_min_rel"), getattr(self, f"{mode}_max_rel")
            if lo > hi:
                raise ValueError(f"{mode}_min_rel = {lo:g} is larger than {mode}_max_rel = {hi:g}; the floor-based "
                                 "threshold is clamped to [min_rel, max_rel], so min_rel must not exceed max_rel")
        return self

    def bounds(self, numeric: str) -> tuple[float, float]:
        if numeric == "fp32":
            return self.fp32_min_rel, self.fp32_max_rel
        return self.lowp_min_rel, self.lowp_max_rel

    def threshold(self, floor: float, numeric: str) -> float:
        lo, hi = self.bounds(numeric)
        return min(max(self.floor_factor * floor, lo), hi)

    def floor_decides(self, value: float, numeric: str) -> bool:
        """Whether the noise floor can change the verdict on an error of `value`: only inside (min_rel,
        max_rel]. At or below min_rel it passes, above max_rel (or not finite) it fails, whatever the floor."""
        lo, hi = self.bounds(numeric)
        return math.isfinite(value) and lo < value <= hi

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def updated(self, source: str = "Threshold", as_flags: bool = False, **overrides: Any) -> "Thresholds":
        """A copy with `overrides` (None = keep); a bad name or value is a ParityInputError naming `source`
        (and each key as its command-line flag with `as_flags`)."""
        names = [f.name for f in fields(self)]
        unknown = sorted(k for k in overrides if k not in names)
        if unknown:
            raise ParityInputError(f"{source}: unknown threshold {unknown[0]!r}; known: {', '.join(names)}.")
        values = {**self.to_dict(), **{k: v for k, v in overrides.items() if v is not None}}
        try:
            return Thresholds(**values)
        except ValidationError as e:
            first = e.errors(include_url=False)[0]
            msg = str(first["msg"]).removeprefix("Value error, ")
            if first["loc"]:
                key = first["loc"][0]
                shown = f"--{key.replace('_', '-')} ({key})" if as_flags else key
                raise ParityInputError(f"{source}: threshold {shown} = {values.get(key)!r} is not usable: {msg} "
                                       f"({_RULES.get(key, '')}).") from None
            raise ParityInputError(f"{source}: {msg}.") from None


# the thresholds the command line sets, with what each means (for --help)
THRESHOLD_FLAGS = {
    "floor_factor": "threshold = factor x the reference's own noise floor",
    "fp32_min_rel": "lowest threshold in fp32 mode (relative L2 error)",
    "fp32_max_rel": "highest threshold in fp32 mode: no noise floor lifts it above this",
    "lowp_min_rel": "lowest threshold in emulate/low-precision mode",
    "lowp_max_rel": "highest threshold in emulate/low-precision mode",
}

# the one-line meaning of each rule, for the error message
_RULES = {
    "floor_factor": "a positive finite number, at least 1",
    **{f"{m}_{b}_rel": "a positive finite relative error below 1" for m in ("fp32", "lowp") for b in ("min", "max")},
    "scale_tolerance": "a positive finite fraction below 1",
    "delta_cosine": "a cosine strictly between 0 and 1",
}


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
        t = t.updated(f"{path} [tool.parity]", **section)
    return t.updated("Command-line option", as_flags=True, **overrides)
