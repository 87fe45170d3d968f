"""Where parity writes when the user does not say: one rule for the CLI, the Python API and the Makefile.

The conversion cache (multi-GB workspaces for real models) goes where caches go, not into whatever folder the
command happens to run in: `$PARITY_CACHE_DIR`, else `$XDG_CACHE_HOME/parity`, else `~/.cache/parity`.
Reports are the run's output, so they land under `./reports/`, one folder per model *path*
(`<folder name>-<hash of its absolute path>`): two models whose folders share a name never overwrite each
other's report.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from .errors import followable

CACHE_ENV = "PARITY_CACHE_DIR"
REPORTS_ROOT = Path("reports")


def default_cache_dir() -> Path:
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "parity"


def default_report_dir(model: Path | str) -> Path:
    """reports/<model folder name>-<8 hex digits of its absolute path>, relative to the current folder."""
    real = followable(model, "Model folder").resolve()
    return REPORTS_ROOT / f"{real.name}-{hashlib.sha256(str(real).encode()).hexdigest()[:8]}"
