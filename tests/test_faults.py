"""The harness proves itself: every catalogued fault, injected into a real converted workspace (or into the
inputs / runtime semantics), is detected with the expected layer, module, positions and cause."""

import pytest
from conftest import catalogue_harness

from parity.faults import CATALOGUE, run_fault

KINDS = {"weights", "config", "inputs", "version", "numerics", "quant", "decode"}


@pytest.fixture(scope="module")
def harness(fixture_models):
    yield from catalogue_harness(fixture_models, sorted({f.model for f in CATALOGUE}))


def test_catalogue_covers_every_class():
    assert len(CATALOGUE) >= 20
    assert {f.kind for f in CATALOGUE} == KINDS
    assert len({f.name for f in CATALOGUE}) == len(CATALOGUE)


@pytest.mark.parametrize("fault", CATALOGUE, ids=[f.name for f in CATALOGUE])
def test_fault_is_caught_and_localised(fault, harness):
    models, workspaces, sessions, cache = harness
    result = run_fault(fault, models, workspaces, sessions, cache, numeric="fp32")
    assert result.status == "fail", f"{fault.name}: the harness found nothing"
    assert result.got == fault.expected, f"{fault.name}: expected {fault.expected}, got {result.got}"


# The deployment-dtype replay must localise the same faults (its floor is coarser; the faults are not).
EMULATE = ["plora_b_scaled", "lora_scale_one_linear", "rope_base", "ranges_shifted_by_one",
           "runtime_ignores_plora", "nonfinite_weight", "bias_rotary_order_not_applied", "bias_q_k_swapped",
           "lora_on_generated_rows", "generated_positions_off_by_one", "rope_base_past_prompt", "session_truncated"]


@pytest.mark.parametrize("name", EMULATE)
def test_fault_is_caught_in_emulate_mode(name, harness):
    models, workspaces, sessions, cache = harness
    fault = next(f for f in CATALOGUE if f.name == name)
    result = run_fault(fault, models, workspaces, sessions, cache, numeric="emulate")
    assert result.got == fault.expected, f"{fault.name}: expected {fault.expected}, got {result.got}"
