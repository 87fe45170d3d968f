"""The resource guard: before the captures start, what the run will need, from the model's shape and the rows.

A prompt longer than the model's `max_position_embeddings` is refused (the reference would run past what it
was trained for, and TurboMind's session would not hold it). Memory, disk and time are estimated from the HF
config and each case's row count with per-row costs measured on 7B shapes (benchmarks/README.md: 1,304 rows,
hidden 4096) plus the attention scores, which grow with rows² (the reference is the model's own code: eager
attention keeps a heads x rows x rows score matrix, and the float64 noise floor doubles it). A run whose memory
or disk estimate exceeds what is available is refused with the numbers (exit 2) instead of being OOM-killed an
hour later; a long one is only warned about.
"""

from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

from .errors import ParityInputError
from .hfconfig import head_dim_of, kv_heads_of

log = logging.getLogger("parity")

GIB = 1024 ** 3
# measured (benchmarks/README.md, 2-layer 7B-shaped bench, 2026-12-06): the reference trace is 0.54 GiB per layer
# at 1,304 rows x hidden 4096; the teacher-forced engine trace holds the same points and parts when it runs at
# every layer; the end-to-end run and the floor are kept as statistics -> bytes per (row x hidden) per layer, at
# most (the teacher-forced run from layer 0)
TRACE_BYTES_PER_ROW_HIDDEN_LAYER = 2 * 0.537 * GIB / (1304 * 4096)
# measured (same run, 1 CPU thread): ~57 s per layer for ~0.66 TFLOP of one forward at 1,304 rows (the run makes
# a reference, a float64 floor and the replay's paired passes) -> seconds per GFLOP of one forward
SECONDS_PER_FORWARD_GFLOP = 57.0 / 662.0
WARN_SECONDS = 30 * 60


def available_memory() -> int | None:
    """MemAvailable from /proc/meminfo in bytes (None where there is no such file)."""
    try:
        with open("/proc/meminfo") as f:
            return int(next(ln for ln in f if ln.startswith("MemAvailable")).split()[1]) * 1024
    except (OSError, StopIteration, ValueError):
        return None


@dataclass(frozen=True)
class ResourceEstimate:
    """What one case needs beyond the weights already loaded; the numbers the guard judges and reports."""

    rows: int
    memory_bytes: int       # peak activations + one decoder layer at the floor's precision
    disk_bytes: int         # traces of the case
    seconds: float          # on one CPU thread

    def describe(self) -> str:
        return (f"{self.rows} rows: about {self.memory_bytes / GIB:.1f} GiB of memory beyond the loaded weights, "
                f"{self.disk_bytes / GIB:.1f} GiB of traces on disk and {self.seconds / 60:.0f} min on one CPU "
                "thread")


def estimate(config: Mapping[str, Any], rows: int, floor_bytes: int = 8) -> ResourceEstimate:
    """Costs of one case of `rows` rows for the model described by the HF `config` (float64 floor by default)."""
    hidden = int(config["hidden_size"])
    layers = int(config["num_hidden_layers"])
    heads, kv_heads, head_dim = int(config["num_attention_heads"]), kv_heads_of(config), head_dim_of(config)
    inter = int(config.get("intermediate_size") or 4 * hidden)
    layer_params = hidden * (heads + 2 * kv_heads) * head_dim + hidden * hidden + 3 * hidden * inter
    scores = heads * rows * rows * (floor_bytes + 4)   # eager scores at the floor's precision + fp32 softmax
    activations = rows * (12 * hidden + 3 * inter) * floor_bytes
    memory = scores + activations + layer_params * floor_bytes
    disk = TRACE_BYTES_PER_ROW_HIDDEN_LAYER * rows * hidden * layers
    gflop = layers * (2 * layer_params * rows + 4 * rows * rows * hidden) / 1e9
    return ResourceEstimate(rows=rows, memory_bytes=int(memory), disk_bytes=int(disk),
                            seconds=gflop * SECONDS_PER_FORWARD_GFLOP)


def check_resources(config: Mapping[str, Any], cases: Sequence[tuple[str, int]], *, scratch: Path | str,
                    floor_bytes: int = 8, memory: int | None = None, disk: int | None = None,
                    model: str = "the model") -> list[ResourceEstimate]:
    """Refuse (ParityInputError) a case longer than max_position_embeddings, or one whose memory or disk estimate
    exceeds what is available (`memory`, `disk`: default MemAvailable and the free space under `scratch`);
    warn (logger "parity") when the run would take over 30 minutes on one thread."""
    limit = config.get("max_position_embeddings")
    for name, rows in cases:
        if isinstance(limit, int) and rows > limit:
            raise ParityInputError(
                f"Case {name!r} has {rows} rows, more than {model}'s max_position_embeddings = {limit} "
                "(config.json): the model was not built for such a prompt and TurboMind's session would not "
                "hold it. Shorten the prompt or use fewer/smaller images.")
    memory = available_memory() if memory is None else memory
    disk = shutil.disk_usage(scratch).free if disk is None else disk
    estimates = [estimate(config, rows, floor_bytes) for _, rows in cases]
    worst = max(estimates, key=lambda e: e.memory_bytes)
    if memory is not None and worst.memory_bytes > memory:
        raise ParityInputError(
            f"Not enough memory for this run: case {cases[estimates.index(worst)][0]!r} needs {worst.describe()}, "
            f"but only {memory / GIB:.1f} GiB is available. Shorten the prompt (the attention scores grow with "
            "rows²), or run on a machine with more memory.")
    total_disk = sum(e.disk_bytes for e in estimates)
    if total_disk > disk:
        raise ParityInputError(
            f"Not enough disk for this run's traces: about {total_disk / GIB:.1f} GiB are needed under {scratch} "
            f"and {disk / GIB:.1f} GiB are free. Point TMPDIR at a larger disk, or shorten the prompts.")
    seconds = sum(e.seconds for e in estimates)
    if seconds > WARN_SECONDS:
        log.warning("this run will take a while: about %.0f min on one CPU thread (%s); it shows its progress.",
                    seconds / 60, "; ".join(f"{n}: {e.describe()}" for (n, _), e in zip(cases, estimates)))
    return estimates
