"""The resource guard (parity.resources): a run that cannot fit is refused before the captures start, with the
numbers; a clean fixture run is not. The CLI-level refusals (exit 2, nothing left behind) are in
tests/test_bad_inputs.py (prompt_longer_than_max_positions, not_enough_disk_for_the_traces)."""

from __future__ import annotations

import logging

import pytest
from hypothesis import given
from hypothesis import strategies as st

from parity.cli import main
from parity.errors import ParityInputError
from parity.resources import GIB, check_resources, estimate

SEVEN_B = {"hidden_size": 4096, "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
           "intermediate_size": 14336, "max_position_embeddings": 32768}


def test_32k_row_prompt_on_a_7b_model_is_refused_on_a_24_gib_machine(tmp_path):
    """The run that used to be OOM-killed at 24 GiB after an hour, leaving temp folders behind."""
    with pytest.raises(ParityInputError) as e:
        check_resources(SEVEN_B, [("long", 32000)], scratch=tmp_path, memory=24 * GIB, disk=10_000 * GIB)
    msg = str(e.value)
    assert "Not enough memory" in msg and "'long'" in msg and "32000 rows" in msg and "24.0 GiB" in msg


def test_a_1300_row_7b_case_fits_the_measured_budget(tmp_path):
    """benchmarks/README.md: 4.0 GiB extra, and a reference trace of 0.537 GiB per layer at 1,304 rows (the
    teacher-forced engine trace at most as much again; the end-to-end run and the floor kept as statistics)."""
    (est,) = check_resources(SEVEN_B, [("one-image", 1304)], scratch=tmp_path, memory=24 * GIB, disk=100 * GIB)
    assert 2 * GIB < est.memory_bytes < 6 * GIB
    assert est.disk_bytes == pytest.approx(32 * 2 * 0.537 * GIB, rel=0.01)


def test_longer_than_max_position_embeddings_is_refused(tmp_path):
    cfg = {**SEVEN_B, "max_position_embeddings": 4096}
    with pytest.raises(ParityInputError, match=r"'c' has 4097 rows, more than .* max_position_embeddings = 4096"):
        check_resources(cfg, [("ok", 4096), ("c", 4097)], scratch=tmp_path, memory=10_000 * GIB, disk=10_000 * GIB)


def test_disk_is_summed_over_the_cases(tmp_path):
    one = estimate(SEVEN_B, 1304).disk_bytes
    check_resources(SEVEN_B, [("a", 1304)], scratch=tmp_path, memory=100 * GIB, disk=one + 1)
    with pytest.raises(ParityInputError, match="Not enough disk"):
        check_resources(SEVEN_B, [("a", 1304), ("b", 1304)], scratch=tmp_path, memory=100 * GIB, disk=one + 1)


def test_a_long_run_is_warned_about_not_refused(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="parity"):
        check_resources(SEVEN_B, [("c", 4000)], scratch=tmp_path, memory=100 * GIB, disk=1000 * GIB)
    assert any("min on one CPU thread" in r.getMessage() for r in caplog.records)


@given(st.integers(1, 50_000), st.integers(1, 50_000), st.sampled_from([4, 8]))
def test_estimates_grow_with_rows(a, b, floor_bytes):
    lo, hi = sorted((a, b))
    e_lo, e_hi = estimate(SEVEN_B, lo, floor_bytes), estimate(SEVEN_B, hi, floor_bytes)
    assert e_lo.memory_bytes <= e_hi.memory_bytes and e_lo.disk_bytes <= e_hi.disk_bytes
    assert e_lo.seconds <= e_hi.seconds


def test_not_enough_memory_through_the_cli(fixture_models, tmp_path, monkeypatch, capsys):
    """The guard is wired into the pipeline: with (reportedly) 1 MiB available the run is refused, exit 2."""
    import parity.resources

    monkeypatch.setattr(parity.resources, "available_memory", lambda: 1024 * 1024)
    rc = main(["run", str(fixture_models["xcomposer2-tiny"]), "--trust-remote-code", "--out", str(tmp_path / "r")])
    err = " ".join(capsys.readouterr().err.split())
    assert rc == 2 and "Not enough memory" in err and "rows" in err, err
    assert not (tmp_path / "r").exists()
    monkeypatch.setattr(parity.resources, "available_memory", lambda: 1024 * 1024)
    assert main(["run", str(fixture_models["xcomposer2-tiny"]), "--trust-remote-code", "--out", str(tmp_path / "r"),
                 "--no-resource-check"]) == 0
