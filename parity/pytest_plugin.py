"""pytest plugin (entry point `parity`): a parity run as a fixture, and the assertion helper.

    def test_release(parity_run, parity_assert):
        report = parity_run("models/my-xcomposer2", trust_remote_code=True)
        parity_assert(report)

Safe under pytest-xdist (`pytest -n N`): the plugin keeps no module state; each test's reports go to its own
tmp folder; the conversion cache (`cache_dir`, default `parity.places.default_cache_dir()`) is shared by the
workers and safe for concurrent use (`parity.deploy.convert.convert_cached` locks each entry, one worker
converts, the others reuse it); and each xdist worker gets its own transformers remote-code cache
(HF_MODULES_CACHE, unless you set it), since transformers rewrites a model's code there while loading it.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile

import pytest

from .api import assert_parity, run

_MODULES_ENV = "HF_MODULES_CACHE"
_modules_key = pytest.StashKey[str]()


@pytest.hookimpl(tryfirst=True)
def pytest_load_initial_conftests(early_config, parser, args):
    """On an xdist worker, before any conftest can import transformers: a private remote-code cache."""
    worker = os.environ.get("PYTEST_XDIST_WORKER")
    if not worker or _MODULES_ENV in os.environ or "transformers" in sys.modules:
        return
    path = tempfile.mkdtemp(prefix=f"parity-hf-modules-{worker}-")
    os.environ[_MODULES_ENV] = path
    early_config.stash[_modules_key] = path


def _remove_modules_cache(config):
    path = config.stash.get(_modules_key, None)
    if path is not None:
        shutil.rmtree(path, ignore_errors=True)
        if os.environ.get(_MODULES_ENV) == path:
            del os.environ[_MODULES_ENV]


def pytest_sessionfinish(session):
    """xdist workers (3.8) end without `pytest_unconfigure`: the session's end is their last hook."""
    _remove_modules_cache(session.config)


def pytest_unconfigure(config):
    _remove_modules_cache(config)


def pytest_addoption(parser):
    parser.getgroup("parity").addoption(
        "--parity-device", default=None, metavar="DEVICE",
        help="device for parity_run: cpu (default), cuda, cuda:N or auto (parity.device)")


@pytest.fixture
def parity_run(tmp_path, request):
    """`parity_run(model, **options)` -> Report; the reports land in the test's tmp folder. Options are
    `parity.run`'s (RunOptions fields, `out`, `jobs`); `device` defaults to `--parity-device`."""
    device = request.config.getoption("--parity-device")

    def _run(model, **options):
        options.setdefault("out", tmp_path / "parity-report")
        if device is not None:
            options.setdefault("device", device)
        return run(model, **options)

    return _run


@pytest.fixture
def parity_assert():
    return assert_parity
