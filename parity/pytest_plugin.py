"""pytest plugin (entry point `parity`): a parity run as a fixture, and the assertion helper.

    def test_release(parity_run, parity_assert):
        report = parity_run("models/my-xcomposer2", trust_remote_code=True)
        parity_assert(report)
"""

from __future__ import annotations

import pytest

from .api import assert_parity, run


@pytest.fixture
def parity_run(tmp_path):
    """`parity_run(model, **options)` -> Report; the reports land in the test's tmp folder."""

    def _run(model, **options):
        options.setdefault("out", tmp_path / "parity-report")
        return run(model, **options)

    return _run


@pytest.fixture
def parity_assert():
    return assert_parity
