"""Fault-injection hooks travel beside a run's options (`records.FaultHooks`), never inside them."""

from __future__ import annotations

from dataclasses import fields

import pytest

from parity.api import run
from parity.errors import ParityInputError
from parity.pipeline import RunOptions
from parity.records import FaultHooks


def test_run_options_carry_no_fault_hook():
    assert not {f.name for f in fields(RunOptions)} & {f.name for f in fields(FaultHooks)}


@pytest.mark.parametrize("hook", [f.name for f in fields(FaultHooks)])
def test_a_hook_given_as_a_user_option_is_refused(hook, tmp_path):
    with pytest.raises(ParityInputError, match=f"unknown option '{hook}'"):
        run(tmp_path, **{hook: None})
