"""Trace files: safetensors written straight from tensor memory on a background thread, read memory-mapped."""

import threading
import time

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from parity import trace as tr
from parity.errors import ParityInputError
from parity.trace import Trace, TraceMeta, TraceWriter, write_safetensors


def _meta(n=2):
    return TraceMeta(side="replay", case="t", num_layers=n, dtype="float32")


def _values(seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, 7, 5, generator=g)                       # batch 1: squeezed
    return {
        "layer": x,
        "attention.wqkv": torch.randn(7, 12, generator=g, dtype=torch.float64),
        "attention.wqkv:input": x[0],                             # shares memory with "layer"
        "attention.wqkv:base": torch.randn(12, 7, generator=g).T,  # not contiguous
        "attention.wqkv:delta": torch.randn(7, 3, generator=g).to(torch.bfloat16),
        "attention.wqkv:mask": torch.tensor([[True, False, True, True, False, False, True]]),
        "half": torch.randn(7, 2, generator=g).half(),
        "ids": torch.arange(7, dtype=torch.int64),
        "empty": torch.zeros(7, 0),
    }


def _expected(v: torch.Tensor) -> torch.Tensor:
    v = v[0] if v.dim() == 3 else v
    if v.dtype == torch.bool:
        v = (v[0] if v.dim() == 2 and v.shape[0] == 1 else v).to(torch.uint8)
    return v


def test_round_trip_every_dtype_alias_and_layout(tmp_path):
    vals = _values()
    w = TraceWriter(tmp_path / "t", _meta(1))
    w.pre("embeddings", vals["layer"])
    w.layer(0, vals)
    w.post("norm", vals["attention.wqkv"])
    t = w.close()
    got = t.layer(0)
    assert got.keys() == vals.keys()
    for k, v in vals.items():
        e = _expected(v)
        assert got[k].dtype == e.dtype and got[k].shape == e.shape and torch.equal(got[k], e), k
        assert torch.equal(t.get(0, k), e)
    assert torch.equal(t.get(None, "embeddings"), vals["layer"][0])
    assert torch.equal(t.get(None, "norm"), vals["attention.wqkv"])
    assert t.get(0, "absent") is None and t.get(5, "layer") is None and t.layer(5) == {}
    # the files are plain safetensors: the library's own readers agree
    assert torch.equal(load_file(str(tmp_path / "t" / "layer_000.safetensors"))["half"], vals["half"])
    with safe_open(str(tmp_path / "t" / "layer_000.safetensors"), "pt") as f:
        assert sorted(f.keys()) == sorted(vals)
    assert sorted(p.name for p in (tmp_path / "t").iterdir()) == [
        "layer_000.safetensors", "meta.json", "post.safetensors", "pre.safetensors"]


def test_writer_makes_no_copy():
    v = torch.randn(1, 4, 3)
    assert tr.stored_form(v).data_ptr() == v.data_ptr()
    m = torch.randn(4, 3)
    assert tr.stored_form(m).data_ptr() == m.data_ptr()


def test_tensors_start_aligned_to_their_element_size(tmp_path):
    import json

    p = tmp_path / "a.safetensors"
    write_safetensors({"b": torch.zeros(3, dtype=torch.uint8), "d": torch.zeros(3, dtype=torch.float64),
                       "f": torch.zeros(3, dtype=torch.float32)}, p)
    raw = p.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    assert n % 8 == 0
    header = json.loads(raw[8:8 + n])
    for k, size in (("b", 1), ("d", 8), ("f", 4)):
        assert header[k]["data_offsets"][0] % size == 0


def test_skip_parts_drops_only_those_plora_parts(tmp_path):
    vals = _values()
    w = TraceWriter(tmp_path / "t", _meta(1), skip_parts=frozenset({"input", "base"}))
    w.layer(0, vals)
    keys = set(w.close().layer(0))
    assert keys == set(vals) - {"attention.wqkv:input", "attention.wqkv:base"}


def test_layer_writes_run_in_the_background_one_at_a_time(tmp_path, monkeypatch):
    release = threading.Event()
    started = []
    real = tr.atomic_save

    def slow(tensors, path):
        started.append(path.name)
        if path.name == "layer_000.safetensors":
            release.wait(10)
        real(tensors, path)

    monkeypatch.setattr(tr, "atomic_save", slow)
    w = TraceWriter(tmp_path / "t", _meta(2))
    w.layer(0, {"layer": torch.ones(3, 2)})          # returns while layer 0 is still being written
    assert not (tmp_path / "t" / "layer_000.safetensors").exists()
    done = threading.Event()
    th = threading.Thread(target=lambda: (w.layer(1, {"layer": torch.zeros(3, 2)}), done.set()))
    th.start()
    time.sleep(0.3)
    assert not done.is_set()                           # the next layer waits: one layer in flight at most
    assert started == ["layer_000.safetensors"]
    release.set()
    th.join(10)
    assert done.is_set()
    t = w.close()
    assert torch.equal(t.get(0, "layer"), torch.ones(3, 2)) and torch.equal(t.get(1, "layer"), torch.zeros(3, 2))
    assert not list((tmp_path / "t").glob("*.tmp"))


@pytest.mark.parametrize("where", ["layer", "pre", "close"])
def test_a_failed_write_is_raised_by_the_next_call_or_close(tmp_path, monkeypatch, where):
    def boom(tensors, path):
        raise OSError("disk full")

    monkeypatch.setattr(tr, "atomic_save", boom)
    w = TraceWriter(tmp_path / "t", _meta(2))
    w.layer(0, {"layer": torch.ones(3, 2)})
    if where == "layer":
        with pytest.raises(OSError, match="disk full"):
            w.layer(1, {"layer": torch.ones(3, 2)})
    elif where == "pre":
        w._job.exception()  # let the failed write finish first
        with pytest.raises(OSError, match="disk full"):
            w.pre("embeddings", torch.ones(3, 2))
    with pytest.raises(OSError, match="disk full"):
        w.close()
    assert not (tmp_path / "t" / "meta.json").exists()  # an unfinished trace cannot be opened
    with pytest.raises(ParityInputError, match="meta.json"):
        Trace(tmp_path / "t")


def test_a_failed_write_leaves_no_temp_file(tmp_path, monkeypatch):
    w = TraceWriter(tmp_path / "t", _meta(1))
    w.layer(0, {"x": torch.ones(2, 2, dtype=torch.complex64)})  # safetensors has no complex dtype here
    with pytest.raises(TypeError, match="complex64"):
        w.close()
    assert list((tmp_path / "t").iterdir()) == []


def test_reads_are_copy_on_write_views_of_the_file(tmp_path):
    w = TraceWriter(tmp_path / "t", _meta(1))
    w.layer(0, {"layer": torch.zeros(1000, 64)})
    t = w.close()
    v = t.get(0, "layer")
    v.add_(1)                                           # private to this tensor: the file is unchanged
    assert not t.get(0, "layer").any()
    assert not load_file(str(tmp_path / "t" / "layer_000.safetensors"))["layer"].any()


@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_damaged_files_raise_parity_input_error(tmp_path, damage):
    w = TraceWriter(tmp_path / "t", _meta(1))
    w.layer(0, {"layer": torch.ones(100, 8)})
    w.post("norm", torch.ones(100, 8))
    t = w.close()
    p = tmp_path / "t" / "layer_000.safetensors"
    raw = p.read_bytes()
    p.write_bytes(raw[: len(raw) // 2] if damage == "truncated" else b"\x07" * 64)
    for read in (lambda: t.get(0, "layer"), lambda: t.layer(0), lambda: t.keys(0)):
        with pytest.raises(ParityInputError, match="layer_000.safetensors"):
            read()
    assert torch.equal(t.get(None, "norm"), torch.ones(100, 8))  # the other files still read
