"""Reference capture: complete (every layer, point and PLoRA linear), cloned, and faithful to PLoRA."""

import pytest
import torch

from parity.errors import ParityInputError
from parity.inputs import hf_call, prepare
from parity.points import LAYER_POINTS, PLORA_LINEARS, PLORA_PARTS, plora_key
from parity.records import CanonicalInput, Segment
from parity.reference.capture import capture_reference
from parity.reference.loader import load_reference


@pytest.fixture(scope="module")
def ref(fixture_models):
    return load_reference(fixture_models["xcomposer2-tiny"], trust_remote_code=True)


@pytest.fixture(scope="module")
def prepared(ref):
    from parity.fixtures import IMAGES_DIR

    img = sorted(IMAGES_DIR.glob("*.png"))[0]
    case = CanonicalInput("t", (Segment("text", text="Hello there."), Segment("image", image=img),
                                Segment("text", text="What is it?")))
    return prepare(case, ref.tokenize, ref.embed_tokens, ref.encode_image, ref.bos_id, ref.decode)


def test_capture_is_complete_and_plora_is_partial(ref, prepared, tmp_path):
    call = hf_call(prepared)
    trace = capture_reference(ref, call, tmp_path / "ref", "t")
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
