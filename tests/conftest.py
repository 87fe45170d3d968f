"""Shared pytest fixtures. `fixture_models` builds the tiny XComposer2 models once (cached in .cache/)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

pytest_plugins = ["pytester"]  # the parity plugin is tested like a user's suite uses it

# Nothing in the test suite may reach the network: fixture models are local folders.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

# The fixture models are tiny: one intra-op thread is as fast, and far faster when the CPU is shared
# (OpenMP threads spin-wait under oversubscription: 5x slower test runs were seen). OMP_NUM_THREADS wins.
if "OMP_NUM_THREADS" not in os.environ:
    import torch

    torch.set_num_threads(1)

REPO = Path(__file__).resolve().parents[1]
FIXTURE_CACHE = REPO / ".cache" / "fixtures"


@pytest.fixture(scope="session")
def fixture_models() -> dict[str, Path]:
    """name -> model folder for parity.fixtures.FIXTURE_NAMES (regenerated only when stale)."""
    from parity.fixtures import ensure

    return ensure(FIXTURE_CACHE)
