"""Reference capture: complete (every layer, point and PLoRA linear), cloned, and faithful to PLoRA."""

import pytest
import torch

from parity.errors import ParityInputError
from parity.inputs import hf_call, prepare
from parity.points import LAYER_POINTS, PLORA_LINEARS, PLORA_PARTS, plora_key
from parity.records import CanonicalInput, Segment
from parity.reference.capture import capture_reference
from parity.reference.loader import load_reference


def test_capture_is_complete_and_plora_is_partial(ref, prepared, tmp_path):
    call = hf_call(prepared)
    trace = capture_reference(ref, call, tmp_path / "ref", "t", parts=PLORA_PARTS)
    assert trace.num_layers == ref.anatomy.num_layers >= 3
    image = prepared.image_rows
    assert image.any() and (~image).any()
    for i in range(trace.num_layers):
        vals = trace.layer(i)
        for p in LAYER_POINTS:
            assert p in vals, (i, p)
            assert vals[p].shape[0] == image.numel()
        for lin in PLORA_LINEARS:
            for part in PLORA_PARTS:
                assert plora_key(lin, part) in vals, (i, lin, part)
            delta = vals[plora_key(lin, "delta")]
            mask = vals[plora_key(lin, "mask")].bool()
            assert torch.equal(mask, image)                      # the mask HF received is the image rows
            assert torch.count_nonzero(delta[~image]) == 0       # exactly zero on text rows
            assert delta[image].abs().sum() > 0                  # non-trivial on image rows
            # output == base + delta, and delta == B(A(x)) * scale on image rows
            lin_mod = ref.anatomy.linears[i][lin]
            x = vals[plora_key(lin, "input")][image]
            expect = lin_mod.module.Plora_B(lin_mod.module.Plora_A(x)) * lin_mod.scale
            assert torch.allclose(delta[image], expect, rtol=1e-5, atol=1e-6)
            assert torch.allclose(vals[lin], vals[plora_key(lin, "base")] + delta, rtol=1e-5, atol=1e-5)
            # the base output is the model's own x @ W.T (+ b), taken from its F.linear call, bit for bit
            m = lin_mod.module
            assert torch.equal(vals[plora_key(lin, "base")],
                               torch.nn.functional.linear(vals[plora_key(lin, "input")], m.weight, m.bias))
            meta = trace.plora(i, lin)
            assert meta["rank"] == lin_mod.rank and meta["scale"] == lin_mod.scale
    assert trace.get(None, "embeddings").shape == (image.numel(), ref.hidden_size)
    assert trace.get(None, "output").shape[0] == image.numel()
    # the captured logits equal a plain forward's (hooks change nothing)
    with torch.no_grad():
        plain = ref.model(inputs_embeds=call.inputs_embeds, im_mask=call.im_mask, use_cache=False).logits[0]
    assert torch.equal(plain, trace.get(None, "output"))


def test_trace_streams_one_file_per_layer(ref, prepared, tmp_path):
    trace = capture_reference(ref, hf_call(prepared), tmp_path / "ref", "t")
    files = sorted(p.name for p in (tmp_path / "ref").iterdir())
    assert files == ["meta.json", "post.safetensors", "pre.safetensors"] + [
        f"layer_{i:03d}.safetensors" for i in range(trace.num_layers)] or set(files) >= {"meta.json"}
    assert not any(f.endswith(".tmp") for f in files)


def test_teacher_forced_reference_equals_free_run(ref, prepared, tmp_path):
    """Feeding the reference its own inputs layer by layer changes nothing (same dtype)."""
    call = hf_call(prepared)
    free = capture_reference(ref, call, tmp_path / "a", "t")
    forced = capture_reference(ref, call, tmp_path / "b", "t", teacher=free)
    for i in range(free.num_layers):
        assert torch.equal(free.get(i, "layer"), forced.get(i, "layer"))


def test_trust_remote_code_is_asked_for(fixture_models):
    with pytest.raises(ParityInputError, match="trust-remote-code"):
        load_reference(fixture_models["xcomposer2-tiny"], trust_remote_code=False)


def test_non_xcomposer2_architecture_is_refused(tmp_path, fixture_models):
    import json, shutil

    src = fixture_models["xcomposer2-tiny"]
    dst = tmp_path / "noplora"
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "config.json").read_text())
    cfg["architectures"] = ["LlamaForCausalLM"]
    cfg.pop("auto_map")
    (dst / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ParityInputError, match="InternLMXComposer2ForCausalLM"):
        load_reference(dst, trust_remote_code=True)


def test_model_without_plora_linears_is_refused():
    from torch import nn
    from parity.reference.anatomy import discover

    class Layer(nn.Module):  # test double: an InternLM2-shaped layer with plain linears
        def __init__(self):
            super().__init__()
            self.attention_norm, self.ffn_norm = nn.LayerNorm(4), nn.LayerNorm(4)
            self.wqkv = nn.Linear(4, 4)

    model = nn.Module()
    model.layers = nn.ModuleList([Layer(), Layer()])
    with pytest.raises(ParityInputError, match="no PLoRA linears"):
        discover(model, "plain-model")


def test_floor_precision_without_a_model_copy(ref, prepared, tmp_path):
    """Computing in float64 one layer at a time equals a float64 copy of the model, and leaves the model as it
    was (dtype and bits), so the noise floor costs no second model in memory."""
    import copy

    call = hf_call(prepared)
    before = {k: v.clone() for k, v in ref.model.state_dict().items()}
    streamed = capture_reference(ref.with_dtype(torch.float64), call, tmp_path / "a", "t")
    assert all(torch.equal(before[k], v) and v.dtype == before[k].dtype for k, v in ref.model.state_dict().items())
    from dataclasses import replace
    from parity.reference.anatomy import discover

    model64 = copy.deepcopy(ref.model).to(torch.float64)
    copied = capture_reference(replace(ref, model=model64, anatomy=discover(model64), dtype=torch.float64), call,
                               tmp_path / "b", "t")
    for i in range(streamed.num_layers):
        for point in ("attention.wqkv", "attention", "layer"):
            assert torch.equal(streamed.get(i, point), copied.get(i, point)), (i, point)
    assert torch.equal(streamed.get(None, "output"), copied.get(None, "output"))


def test_low_memory_loading_is_bit_identical(fixture_models, ref, prepared, tmp_path):
    """bf16 storage with float32 construction and per-layer upcast equals a float32 load, bit for bit."""
    from parity.reference.loader import load_reference

    low = load_reference(fixture_models["xcomposer2-tiny"], trust_remote_code=True, low_memory=True)
    assert next(low.model.parameters()).dtype == torch.bfloat16       # stored as in the checkpoint
    from parity.fixtures import IMAGES_DIR

    image = sorted(IMAGES_DIR.glob("*.png"))[0]
    assert torch.equal(low.encode_image(image), ref.encode_image(image))
    call = hf_call(prepared)
    a = capture_reference(ref, call, tmp_path / "a", "t")
    b = capture_reference(low, call, tmp_path / "b", "t")
    for i in range(a.num_layers):
        for key, value in a.layer(i).items():
            assert torch.equal(value, b.get(i, key)), (i, key)
    assert torch.equal(a.get(None, "output"), b.get(None, "output"))
    assert next(low.model.parameters()).dtype == torch.bfloat16       # and still stored so afterwards


def test_default_parts_record_delta_and_mask_only_bit_identical_to_all_parts(ref, prepared, tmp_path):
    """The pipeline reads no reference `:input`/`:base`; by default they are neither copied nor written, and
    what is recorded is bit for bit what a capture of every part records."""
    from parity.reference.capture import DEFAULT_PARTS

    assert DEFAULT_PARTS == ("delta", "mask")
    call = hf_call(prepared)
    full = capture_reference(ref, call, tmp_path / "full", "t", parts=PLORA_PARTS)
    default = capture_reference(ref, call, tmp_path / "default", "t")
    for i in range(full.num_layers):
        a, b = full.layer(i), default.layer(i)
        assert set(b) == set(LAYER_POINTS) | {plora_key(lin, p) for lin in PLORA_LINEARS for p in DEFAULT_PARTS}
        for k, v in b.items():
            assert v.dtype == a[k].dtype and torch.equal(v, a[k]), (i, k)
        assert torch.equal(a["attention"], a[plora_key("attention.wo", "input")])
    for point in ("embeddings", "norm", "output"):
        assert torch.equal(full.get(None, point), default.get(None, point))
    only_mask = capture_reference(ref, call, tmp_path / "mask", "t", parts=("mask",))
    assert set(only_mask.layer(0)) == set(LAYER_POINTS) | {plora_key(lin, "mask") for lin in PLORA_LINEARS}
    with pytest.raises(ValueError, match="Unknown PLoRA part"):
        capture_reference(ref, call, tmp_path / "x", "t", parts=("delta", "weights"))


def test_capture_into_a_given_writer(ref, prepared, tmp_path):
    """Any object with the TraceWriter protocol receives the values; its close() result is returned."""
    from parity.trace import TraceMeta

    class Recording:
        def __init__(self):
            self.meta = TraceMeta(side="stats", case="t", num_layers=ref.anatomy.num_layers, dtype="float32")
            self.pre_points, self.post_points, self.layers = {}, {}, {}

        def pre(self, name, value):
            self.pre_points[name] = value

        def post(self, name, value):
            self.post_points[name] = value

        def layer(self, index, values):
            self.layers[index] = values

        def close(self):
            return "closed"

    call = hf_call(prepared)
    w = Recording()
    assert capture_reference(ref, call, None, "t", writer=w) == "closed"
    assert sorted(w.layers) == list(range(ref.anatomy.num_layers))
    assert set(w.pre_points) == {"embeddings"} and set(w.post_points) == {"norm", "output"}
    assert w.meta.side == "stats" and w.meta.extras["content_hash"] == call.content_hash
    assert w.meta.plora["0"]["attention.wqkv"]["rank"] == ref.anatomy.linears[0]["attention.wqkv"].rank
    plain = capture_reference(ref, call, tmp_path / "p", "t")
    for k, v in w.layers[0].items():
        assert torch.equal(v, plain.get(0, k)), k


def test_two_images_delta_is_zero_between_them(ref, tmp_path):
    """Mask rows in two runs (the general, indexed path of the delta)."""
    from parity.fixtures import IMAGES_DIR

    img = sorted(IMAGES_DIR.glob("*.png"))[0]
    case = CanonicalInput("t2", (Segment("text", text="A"), Segment("image", image=img), Segment("text", text="and"),
                                 Segment("image", image=img), Segment("text", text="?")))
    p = prepare(case, ref.tokenize, ref.embed_tokens, ref.encode_image, ref.bos_id, ref.decode)
    image = p.image_rows
    trace = capture_reference(ref, hf_call(p), tmp_path / "two", "t2", parts=PLORA_PARTS)
    for lin in PLORA_LINEARS:
        vals = trace.layer(0)
        delta, x = vals[plora_key(lin, "delta")], vals[plora_key(lin, "input")]
        assert torch.equal(vals[plora_key(lin, "mask")].bool(), image)
        assert torch.count_nonzero(delta[~image]) == 0 and delta[image].abs().sum() > 0
        m = ref.anatomy.linears[0][lin]
        expect = m.module.Plora_B(m.module.Plora_A(x[image])) * m.scale
        assert torch.allclose(delta[image], expect, rtol=1e-5, atol=1e-6)
