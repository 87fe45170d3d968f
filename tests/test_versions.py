"""lmdeploy release ranges and their PLoRA semantics (parity.deploy.versions)."""

from __future__ import annotations

import pytest
from hypothesis import given, strategies as st

from parity.deploy.compat import installed_lmdeploy_version
from parity.deploy.versions import (
    KNOWN_GOOD_VERSION,
    VERSION_TABLE,
    is_known_good,
    parse_version,
    row_for,
    semantics_for,
    table_rows,
)
from parity.errors import ParityInputError
from parity.records import RuntimeSemantics


@pytest.mark.parametrize(
    "version, writes, applies",
    [
        ("0.4.0", True, True),
        ("0.5.3", True, True),
        ("0.6.5", True, True),
        ("0.7.0", True, True),
        ("0.7.1", True, True),
        ("0.7.2", True, False),
        ("0.7.3", True, False),
        ("0.8.0", True, False),
        ("0.9.1", True, False),
        ("0.9.2", False, False),
        ("0.10.0", False, False),
        ("0.13.0", False, False),
    ],
)
def test_semantics_per_range(version, writes, applies):
    sem = semantics_for(version)
    assert isinstance(sem, RuntimeSemantics)
    assert sem.version == version
    assert sem.converter_writes_lora is writes
    assert sem.runtime_applies_plora is applies
    # the C++ workspace loader never reads lora_a / lora_b, in any release
    assert sem.workspace_loads_lora is False
    if writes:
        assert "workspace" in sem.note.lower() and "lora_a" in sem.note


def test_silent_ranges_say_silent():
    assert "silently" in semantics_for("0.7.2").note
    assert "silently" in semantics_for("0.8.1").note
    assert "assert" in semantics_for("0.10.1").note


@pytest.mark.parametrize("version", ["0.7.2rc1", "v0.7.1", "0.7.1+cu118", "0.7.1.post1", "0.7", "0.8.0.dev0"])
def test_tags_are_ignored_for_the_range(version):
    rel = parse_version(version)
    assert row_for(version) is row_for(".".join(map(str, rel)))


@pytest.mark.parametrize("version", ["0.14.0", "0.15.1", "1.0.0", "0.3.9", "0.1.0"])
def test_unsupported_versions_raise_naming_version_and_ranges(version):
    with pytest.raises(ParityInputError) as e:
        semantics_for(version)
    msg = str(e.value)
    assert version in msg
    assert "0.4.0" in msg and "0.7.1" in msg and "0.14.0" in msg
    assert "\n" not in msg


@pytest.mark.parametrize("version", ["", "garbage", "seven", "0.x.1", "1.2.3.4", None, 7])
def test_unparseable_versions_raise(version):
    with pytest.raises(ParityInputError) as e:
        semantics_for(version)  # type: ignore[arg-type]
    assert repr(version) in str(e.value)
    assert KNOWN_GOOD_VERSION in str(e.value)


def test_table_is_contiguous_and_ordered():
    rels = [parse_version(r.first) for r in VERSION_TABLE]
    assert rels == sorted(rels)
    for a, b in zip(VERSION_TABLE, VERSION_TABLE[1:]):
        assert a.last is not None and parse_version(a.last) < parse_version(b.first)
    assert VERSION_TABLE[-1].last is None and not VERSION_TABLE[-1].supported
    rows = table_rows()
    assert [r["first"] for r in rows] == ["0.4.0", "0.7.2", "0.8.0", "0.9.2", "0.14.0"]
    assert all(r["workspace_loads_lora"] is False for r in rows)


def test_known_good():
    assert is_known_good(KNOWN_GOOD_VERSION)
    assert is_known_good("0.6.0")
    assert not is_known_good("0.7.2")
    assert not is_known_good("0.14.0")
    assert not is_known_good("nonsense")


def test_installed_version_is_the_pin():
    v = installed_lmdeploy_version()
    assert v == KNOWN_GOOD_VERSION
    assert semantics_for(v).runtime_applies_plora


@given(st.integers(0, 2), st.integers(0, 30), st.integers(0, 12))
def test_every_release_maps_to_exactly_one_row_or_raises(major, minor, patch):
    v = f"{major}.{minor}.{patch}"
    try:
        row = row_for(v)
    except ParityInputError:
        assert (major, minor, patch) < (0, 4, 0)
        return
    matches = [r for r in VERSION_TABLE if parse_version(r.first) <= (major, minor, patch)]
    assert row is matches[-1]
