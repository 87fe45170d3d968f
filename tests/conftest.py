"""Shared pytest fixtures. `fixture_models` builds the tiny XComposer2 models once (cached in .cache/)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hypothesis import settings

# Every property test is deterministic in CI (a failure found once is found every time, and a clean run stays
# clean); HYPOTHESIS_PROFILE=explore draws fresh examples for a local hunt.
settings.register_profile("parity", derandomize=True, database=None, deadline=None)
settings.register_profile("explore", deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "parity"))

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
# the suite's conversions stay in the repository's .cache, not the user's cache (parity.places)
os.environ.setdefault("PARITY_CACHE_DIR", str(REPO / ".cache"))


@pytest.fixture(scope="session", autouse=True)
def _library_loggers_on_the_session_stream():
    """transformers binds its log handler to whatever sys.stderr is when it first logs; if that is a test's
    `capsys` stream, every later warning is a "--- Logging error ---" traceback on a closed file. Bind it now,
    to the session's stream."""
    from transformers.utils import logging as hf_logging

    hf_logging.get_logger("transformers")


@pytest.fixture(scope="session")
def fixture_models() -> dict[str, Path]:
    """name -> model folder for parity.fixtures.FIXTURE_NAMES (regenerated only when stale)."""
    from parity.fixtures import ensure

    return ensure(FIXTURE_CACHE)


@pytest.fixture(scope="module")
def ref(fixture_models):
    """The tiny XComposer2 reference (float32), loaded once per module."""
    from parity.reference.loader import load_reference

    return load_reference(fixture_models["xcomposer2-tiny"], trust_remote_code=True)


@pytest.fixture(scope="module")
def prepared(ref):
    """A text-image-text case prepared for `ref`."""
    from parity.fixtures import IMAGES_DIR
    from parity.inputs import prepare
    from parity.records import CanonicalInput, Segment

    img = sorted(IMAGES_DIR.glob("*.png"))[0]
    case = CanonicalInput("t", (Segment("text", text="Hello there."), Segment("image", image=img),
                                Segment("text", text="What is it?")))
    return prepare(case, ref.tokenize, ref.embed_tokens, ref.encode_image, ref.bos_id, ref.decode)


def catalogue_harness(fixture_models: dict[str, Path], names: list[str]):
    """(models, workspaces, sessions, cache) for running the fault catalogue's faults of the models `names`;
    a generator for a module-scoped fixture (`yield from`), closing the reference sessions at its end."""
    from parity.faults import catalogue_models, fault_workspace
    from parity.reference.session import ReferenceSession

    cache = REPO / ".cache"
    models = {**fixture_models, **catalogue_models(cache, names)}
    workspaces = {m: fault_workspace(models[m], cache) for m in names}
    sessions = {m: ReferenceSession(models[m], trust_remote_code=True) for m in names}
    try:
        yield models, workspaces, sessions, cache
    finally:
        for s in sessions.values():
            s.close()


def diagnosis_key(report):
    """What two runs must agree on to give the same diagnosis: findings (check, severity, cause, layer, module,
    positions, case), the first divergence, which points exceeded, the status."""
    d = report.first_divergence
    return ([(f.check, f.severity, f.cause, f.layer, f.module, f.positions, f.case) for f in report.findings],
            (d.layer, d.module, d.positions, d.cause, d.case) if d else None,
            [(p.case, p.layer, p.module, p.exceeded) for p in report.points], report.status)


@pytest.fixture(scope="session")
def broken_w2_ws(fixture_models, tmp_path_factory):
    """Layer 1's feed_forward.w2 lora_b zeroed in a copy of the real converted workspace of xcomposer2-tiny."""
    import shutil

    from parity.deploy.convert import convert_cached
    from parity.deploy.workspace import Workspace

    src = convert_cached(fixture_models["xcomposer2-tiny"], REPO / ".cache" / "workspaces")
    dst = tmp_path_factory.mktemp("broken") / "ws"
    shutil.copytree(src, dst, symlinks=True)
    path = Workspace.open(dst).file_path("layers.1.feed_forward.w2.lora_b.weight", 0)
    size = path.stat().st_size
    path.unlink()
    path.write_bytes(bytes(size))
    return dst


@pytest.fixture(scope="session")
def default_xc2_run(fixture_models, broken_w2_ws):
    """`default_xc2_run(numeric, broken)`: the plain `parity.run` of xcomposer2-tiny (on `broken_w2_ws` when
    broken), run once per session. The baseline the "same diagnosis as <option>" tests compare an option with."""
    from parity.api import run

    runs: dict[tuple[str, bool], object] = {}

    def get(numeric: str, broken: bool):
        if (numeric, broken) not in runs:
            runs[numeric, broken] = run(fixture_models["xcomposer2-tiny"], trust_remote_code=True, numeric=numeric,
                                        cache_dir=REPO / ".cache", workspace=broken_w2_ws if broken else None)
        return runs[numeric, broken]

    return get
