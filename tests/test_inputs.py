"""One canonical input builds both sides' calls; they must agree row for row (property-tested)."""

import os
import shutil
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from parity.errors import ParityInputError
from parity.fixtures import IMAGES_DIR
from parity.inputs import PLACEHOLDER_ID, engine_call, hf_call, load_cases, prepare
from parity.records import CanonicalInput, Segment

HIDDEN = 8
TABLE = torch.randn(64, HIDDEN, generator=torch.Generator().manual_seed(0))


def fake_tokenize(text):  # test double: one id per character
    return [3 + (ord(c) % 60) for c in text]


def fake_embed(ids):
    return TABLE[ids]


def fake_image_encoder(rows_by_name):
    def enc(path):
        n = rows_by_name[Path(path).name]
        return torch.arange(n * HIDDEN, dtype=torch.float32).reshape(1, n, HIDDEN) / 100 + 1
    return enc


segments = st.lists(
    st.one_of(st.text(alphabet="abc xyz", min_size=1, max_size=6).map(lambda t: ("text", t)),
              st.integers(1, 5).map(lambda n: ("image", n))),
    min_size=1, max_size=6)


def build(segs, policy):
    rows_by_name, out = {}, []
    for k, (kind, v) in enumerate(segs):
        if kind == "text":
            out.append(Segment("text", text=v))
        else:
            rows_by_name[f"im{k}.png"] = v
            out.append(Segment("image", image=Path(f"im{k}.png")))
    case = CanonicalInput("c", tuple(out), policy)
    return prepare(case, fake_tokenize, fake_embed, fake_image_encoder(rows_by_name), bos_id=1)


def replay_engine_rows(call):
    """What a TurboMind-style engine makes of its call: token lookup, then ranges overwrite rows."""
    x = TABLE[torch.tensor(call.input_ids)].clone()
    mask = torch.zeros(len(call.input_ids), dtype=torch.bool)
    for (b, e), emb in zip(call.input_embedding_ranges, call.input_embeddings):
        x[b:e] = emb
        mask[b:e] = True
    return x, mask


@given(segments, st.sampled_from(["first", "every_text"]))
@settings(max_examples=150, deadline=None)
def test_both_calls_see_the_same_rows(segs, policy):
    p = build(segs, policy)
    h, e = hf_call(p), engine_call(p)
    rows, mask = replay_engine_rows(e)
    assert torch.equal(rows, h.inputs_embeds[0])
    assert torch.equal(mask, h.im_mask[0])
    assert all(p.token_ids[i] == PLACEHOLDER_ID for i in range(len(mask)) if mask[i])
    # ranges are sorted, non-overlapping, inside the prompt: TurboMind would accept them
    ends = [0] + [x for r in p.ranges for x in r] + [len(p.token_ids)]
    assert ends == sorted(ends)
    assert p.bos_rows[0]  # lmdeploy always starts with BOS


@given(segments)
@settings(max_examples=80, deadline=None)
def test_bos_policy_is_explicit(segs):
    first, every = build(segs, "first"), build(segs, "every_text")
    texts = sum(1 for k, _ in segs if k == "text")
    assert int(first.bos_rows.sum()) == 1
    assert int(every.bos_rows.sum()) == max(texts, 1) if segs[0][0] == "text" else int(every.bos_rows.sum()) == texts + 1
    assert hf_call(first).content_hash != hf_call(every).content_hash or texts <= 1


def test_load_cases_errors(tmp_path):
    f = tmp_path / "in.yaml"
    f.write_text("cases: [ {name: a, segments: [ {text: hi} ] ")
    with pytest.raises(ParityInputError, match="does not parse"):
        load_cases(f)
    f.write_text("cases:\n  - name: a\n    segments:\n      - image: missing.png\n")
    with pytest.raises(ParityInputError, match="missing.png"):
        load_cases(f)
    f.write_text("cases:\n  - name: a\n    bos_policy: sometimes\n    segments: [{text: hi}]\n")
    with pytest.raises(ParityInputError, match="bos_policy"):
        load_cases(f)
    with pytest.raises(ParityInputError, match="does not exist"):
        load_cases(tmp_path / "nope.yaml")
    shutil.copy(sorted(Path(IMAGES_DIR).glob("*.png"))[0], tmp_path / "x.png")
    f.write_text("cases:\n  - {name: a, segments: [{text: hi}, {image: x.png}]}\n  - {name: b, segments: [{text: q}]}\n")
    cases = load_cases(f)
    assert [c.name for c in cases] == ["a", "b"] and cases[0].segments[1].image == (tmp_path / "x.png").resolve()


@pytest.mark.parametrize("doc, key, where, allowed", [
    ("cases:\n  - {name: a, bos_polcy: first, segments: [{text: hi}]}\n", "bos_polcy", "cases[0]",
     "name, bos_policy, segments, chat"),
    ("case: {name: a}\ncases:\n  - {segments: [{text: hi}]}\n", "case", "the top level", "cases"),
    ("cases:\n  - {segments: [{text: hi}]}\n  - {segments: [{image: x.png, caption: c}]}\n", "caption",
     "cases[1].segments[0]", "text, image"),
])
def test_unknown_keys_are_rejected_with_their_place_and_the_allowed_keys(tmp_path, doc, key, where, allowed):
    """A misspelt key used to be ignored silently (the case ran with the default bos_policy)."""
    shutil.copy(sorted(Path(IMAGES_DIR).glob("*.png"))[0], tmp_path / "x.png")
    f = tmp_path / "in.yaml"
    f.write_text(doc)
    with pytest.raises(ParityInputError) as e:
        load_cases(f)
    msg = str(e.value)
    assert str(f) in msg and f"unknown key {key!r} at {where}" in msg and f"allowed keys there: {allowed}." in msg


@pytest.mark.parametrize("make", ["truncated", "text", "empty", "loop", "folder"])
def test_images_are_decoded_when_the_inputs_file_is_read(tmp_path, make):
    """A corrupt or non-image file is bad input named with its case and segment, before any model is loaded."""
    good = sorted(Path(IMAGES_DIR).glob("*.png"))[0]
    img = tmp_path / "pic.png"
    if make == "truncated":
        img.write_bytes(good.read_bytes()[:120])
    elif make == "text":
        img.write_text("not a picture")
    elif make == "empty":
        img.write_bytes(b"")
    elif make == "loop":
        os.symlink("pic2.png", img)
        os.symlink("pic.png", tmp_path / "pic2.png")
    else:
        img.mkdir()
    f = tmp_path / "in.yaml"
    f.write_text("cases:\n  - {name: a, segments: [{text: hi}, {image: pic.png}]}\n")
    with pytest.raises(ParityInputError, match=r"cases\[0\]\.segments\[1\]: image") as e:
        load_cases(f)
    assert "pic.png" in str(e.value)
