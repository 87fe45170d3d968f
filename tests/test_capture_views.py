"""The reference capture records the model's own tensors (no copy) and proves by their version counters that
nothing changed them before their file was written; a model that changes one in place gets a capture that
copies every value, with the values it had when recorded."""

from __future__ import annotations

import torch

import parity.reference.capture as capture
from parity.inputs import hf_call
from parity.points import PLORA_PARTS
from parity.reference.capture import capture_reference


def _values(trace) -> dict[tuple, torch.Tensor]:
    out = {("pre", k): trace.get(None, k) for k in trace.keys(None, "embeddings")}
    out.update({("post", k): trace.get(None, k) for k in trace.keys(None, "output")})
    for i in range(trace.num_layers):
        out.update({(i, k): v for k, v in trace.layer(i).items()})
    return out


def _same(a, b) -> bool:
    va, vb = _values(a), _values(b)
    return va.keys() == vb.keys() and all(torch.equal(va[k], vb[k]) for k in va)


def _copied(ref, call, root, parts=capture.DEFAULT_PARTS):
    return capture._capture(ref, call, root, "t", "reference", None, None, tuple(parts), views=False)


def test_views_record_what_copies_record(ref, prepared, tmp_path, monkeypatch):
    call = hf_call(prepared)
    taken = []
    real = capture._take
    monkeypatch.setattr(capture, "_take", lambda t, dtype=None: taken.append(1) or real(t, dtype))
    for parts in (capture.DEFAULT_PARTS, PLORA_PARTS):
        taken.clear()
        viewed = capture_reference(ref, call, tmp_path / f"views-{len(parts)}", "t", parts=parts)
        assert len(taken) <= 1  # the embeddings only: every model tensor recorded as itself
        assert _same(viewed, _copied(ref, call, tmp_path / f"copies-{len(parts)}", parts))


def test_a_tensor_changed_in_place_is_caught_and_recorded_as_it_was(ref, prepared, tmp_path, monkeypatch):
    """Layer 0's wqkv doubles its input (the attention norm's output, recorded as "attention_norm") in place:
    the capture must record the norm's output as it was when the norm returned, as a copying capture does."""
    call = hf_call(prepared)
    wqkv = ref.anatomy.linears[0]["attention.wqkv"].module
    handle = wqkv.register_forward_pre_hook(lambda module, args: args[0].mul_(2))
    try:
        expected = _copied(ref, call, tmp_path / "copies")
        runs = []
        real = capture._capture
        monkeypatch.setattr(capture, "_capture", lambda *a, **k: runs.append(k["views"]) or real(*a, **k))
        got = capture_reference(ref, call, tmp_path / "views", "t")
        assert runs == [True, False]  # the change was seen, the capture repeated with copies
        assert _same(got, expected)
        # without the proof the view would have recorded the doubled value: the test can fail
        monkeypatch.setattr(capture._Recorder, "verify", lambda self, watched: None)
        runs.clear()
        unproven = capture_reference(ref, call, tmp_path / "unproven", "t")
        assert runs == [True] and not _same(unproven, expected)
        assert torch.equal(unproven.get(0, "attention_norm"), 2 * expected.get(0, "attention_norm"))
    finally:
        handle.remove()
