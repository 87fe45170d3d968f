"""The tiny XComposer2 fixture models: loadable, faithful to upstream's PLoRA semantics, byte-deterministic."""

from __future__ import annotations

import json
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from safetensors import safe_open

from parity.fixtures import (
    DEFAULT_INPUTS,
    FAMILY_LORA,
    FIXTURE_NAMES,
    IMAGES_DIR,
    TOKENIZER_SIZE,
    FixtureSpec,
    ensure,
    write_model,
)
from parity.fixtures.generator import BUILTIN_SPECS, make_images
from parity.points import PLORA_LINEARS

VARIANT = {"xcomposer2-tiny": "7b", "xcomposer2-4khd-tiny": "4khd", "xcomposer2d5-tiny": "2d5"}
# Rows of one square image (gradient.png, circles.png): 7b 56/14 = 4 x 4 patches; 4KHD hd_num 25 -> 5 x 5 tiles of
# 336 px, (25 + 1) * 144 + 1 + 6 * 12; 2.5 -> one 560-px tile (no up-scaling), (1 + 1) * 400 + 1 + 2 * 20.
SQUARE_ROWS = {"7b": 16, "4khd": 3817, "2d5": 841}
SYSTEM = "[UNUSED_TOKEN_146]system\nYou are a helpful assistant.[UNUSED_TOKEN_145]\n[UNUSED_TOKEN_146]user\n"
QUERY = "Describe the image.[UNUSED_TOKEN_145]\n[UNUSED_TOKEN_146]assistant\n"


def load(path: Path):
    from transformers import AutoModelForCausalLM

    model, info = AutoModelForCausalLM.from_pretrained(
        path, trust_remote_code=True, dtype=torch.bfloat16, output_loading_info=True
    )
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs")), info
    return model.eval()


@pytest.fixture(scope="module")
def models(fixture_models):
    return {name: load(path) for name, path in fixture_models.items()}


@pytest.fixture(scope="module")
def tokenizers(fixture_models):
    from transformers import AutoTokenizer

    return {name: AutoTokenizer.from_pretrained(path, trust_remote_code=True) for name, path in fixture_models.items()}


def build_inputs(model, tok, image=IMAGES_DIR / "gradient.png"):
    """[SYSTEM (with BOS)] [image rows] [QUERY (no BOS)] -> (inputs_embeds [1, L, H], im_mask [1, L])."""
    with torch.no_grad():
        pre = model.model.tok_embeddings(torch.tensor([tok(SYSTEM).input_ids]))
        post = model.model.tok_embeddings(torch.tensor([tok(QUERY, add_special_tokens=False).input_ids]))
        img = model.encode_img(image)
    embeds = torch.cat([pre, img, post], dim=1)
    mask = torch.zeros(embeds.shape[:2], dtype=torch.bool)
    mask[:, pre.shape[1] : pre.shape[1] + img.shape[1]] = True
    return embeds, mask


def plora_modules(model):
    for i, layer in enumerate(model.model.layers):
        for linear in PLORA_LINEARS:
            yield i, linear, layer.get_submodule(linear)


# ---------------------------------------------------------------- loading and forward


@pytest.mark.parametrize("name", FIXTURE_NAMES)
def test_load_and_forward_with_image_mask(name, models, tokenizers):
    model, tok = models[name], tokenizers[name]
    embeds, mask = build_inputs(model, tok)
    assert embeds.dtype == torch.bfloat16 and int(mask.sum()) == SQUARE_ROWS[VARIANT[name]]
    first_img = int(mask[0].nonzero()[0])
    with torch.no_grad():
        out = model(inputs_embeds=embeds, im_mask=mask, output_hidden_states=True, use_cache=False)
        plain = model(inputs_embeds=embeds, im_mask=None)
    assert out.logits.dtype == torch.float32 and out.logits.shape == (1, embeds.shape[1], model.config.vocab_size)
    assert torch.isfinite(out.logits).all()
    assert len(out.hidden_states) == model.config.num_hidden_layers + 1
    for h in out.hidden_states:  # activations stay O(1) through the layers
        rms = h.float().pow(2).mean().sqrt().item()
        assert 0.3 < rms < 5.0, rms
    # Causal model: rows before the first image never see PLoRA; every row from the first image on does.
    assert torch.equal(out.logits[:, :first_img], plain.logits[:, :first_img])
    assert (out.logits[0, first_img:] - plain.logits[0, first_img:]).abs().amax(-1).min() > 0


@pytest.mark.parametrize("name", FIXTURE_NAMES)
def test_lora_term_is_clearly_visible(name, models, tokenizers):
    """On image rows the LoRA term is 5-50% of the base output of every PLoRA linear in every layer."""
    model = models[name]
    embeds, mask = build_inputs(model, tokenizers[name])
    seen = {}

    def hook(key):
        def fn(mod, args, kwargs):
            seen[key] = args[0][mask].detach()
        return fn

    handles = [m.register_forward_pre_hook(hook((i, n)), with_kwargs=True) for i, n, m in plora_modules(model)]
    try:
        with torch.no_grad():
            model(inputs_embeds=embeds, im_mask=mask)
    finally:
        for h in handles:
            h.remove()
    assert len(seen) == 5 * model.config.num_hidden_layers
    for i, linear, m in plora_modules(model):
        x = seen[(i, linear)].float()
        base = x @ m.weight.float().T
        delta = (x @ m.Plora_A.weight.float().T) @ m.Plora_B.weight.float().T * m.lora_scaling
        ratio = (delta.norm() / base.norm()).item()
        assert 0.05 < ratio < 0.5, (i, linear, ratio)


@pytest.mark.parametrize("name", FIXTURE_NAMES)
def test_token_ids_path_uses_all_false_mask(name, models, tokenizers):
    model, tok = models[name], tokenizers[name]
    ids = torch.tensor([tok(SYSTEM + QUERY).input_ids])
    with torch.no_grad():
        by_ids = model(input_ids=ids).logits
        embeds = model.model.tok_embeddings(ids)
        all_false = model(inputs_embeds=embeds, im_mask=torch.zeros(ids.shape, dtype=torch.bool)).logits
        no_mask = model(inputs_embeds=embeds).logits
    assert torch.equal(by_ids, all_false) and torch.equal(all_false, no_mask)  # the `* 0` term adds exactly 0


@pytest.mark.parametrize("name", FIXTURE_NAMES)
def test_dropout_only_in_train_mode(name, models, tokenizers):
    model = models[name]
    embeds, mask = build_inputs(model, tokenizers[name])
    first_img = int(mask[0].nonzero()[0])
    assert all(m.lora_dropout.p == 0.05 for _, _, m in plora_modules(model))
    with torch.no_grad():
        ref = model(inputs_embeds=embeds, im_mask=mask).logits
        assert torch.equal(ref, model(inputs_embeds=embeds, im_mask=mask).logits)  # eval is deterministic
        model.train()
        try:
            torch.manual_seed(0)
            trained = model(inputs_embeds=embeds, im_mask=mask).logits
        finally:
            model.eval()
    assert torch.equal(trained[:, :first_img], ref[:, :first_img])
    assert not torch.equal(trained[:, first_img:], ref[:, first_img:])


# ---------------------------------------------------------------- PLoRA unit semantics


@pytest.fixture(scope="module")
def PLoRA(models):
    return type(models["xcomposer2-tiny"].model.layers[0].attention.wqkv)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_plora_delta_exact_on_image_rows_only(PLoRA, dtype):
    torch.manual_seed(1)
    m = PLoRA(16, 24, bias=True, lora_r=4, lora_alpha=8, dtype=dtype).eval()
    assert (m.lora_r, m.lora_alpha, m.lora_scaling) == (4, 8, 2.0)
    assert isinstance(m.lora_dropout, torch.nn.Dropout) and m.lora_dropout.p == 0.05
    assert m.Plora_A.weight.shape == (4, 16) and m.Plora_B.weight.shape == (24, 4)
    assert m.Plora_A.bias is None and m.Plora_B.bias is None
    x = torch.randn(1, 6, 16, dtype=dtype)
    mask = torch.tensor([[False, True, False, True, True, False]])
    with torch.no_grad():
        res = m(x, mask)
        base = torch.nn.functional.linear(x, m.weight, m.bias)
        expect = base.clone()
        expect[mask] += m.Plora_B(m.Plora_A(x[mask])) * m.lora_scaling
    assert res.dtype == dtype
    assert torch.equal(res[~mask], base[~mask])  # text rows: exactly the base linear
    assert torch.equal(res[mask], expect[mask])  # image rows: base + B(A(x)) * scale, same rounding
    assert not torch.equal(res[mask], base[mask])


def test_plora_dropout_in_train_mode(PLoRA):
    torch.manual_seed(2)
    m = PLoRA(32, 32, bias=False, lora_r=8, lora_alpha=16, lora_dropout=0.5)
    x = torch.randn(1, 6, 32)
    mask = torch.tensor([[True, True, True, False, False, False]])
    with torch.no_grad():
        m.eval()
        ev = m(x, mask)
        m.train()
        tr = m(x, mask)
    assert torch.equal(tr[~mask], ev[~mask])
    assert not torch.equal(tr[mask], ev[mask])


def test_plora_all_false_mask_adds_nothing(PLoRA):
    torch.manual_seed(3)
    m = PLoRA(16, 8, bias=False, lora_r=4, lora_alpha=8).eval()
    x = torch.randn(2, 5, 16)
    with torch.no_grad():
        base = torch.nn.functional.linear(x, m.weight)
        assert torch.equal(m(x, torch.zeros(2, 5, dtype=torch.bool)), base)
        assert torch.equal(m(x, None), base)


def test_plora_all_false_mask_upstream_nan_on_row_0(PLoRA):
    """Upstream's all-False branch adds `B(A(x[:, :1])) * 0` to row 0: a non-finite LoRA term makes that
    row NaN (inf * 0 = NaN) even though the mask selects nothing. Reproduced faithfully; TurboMind has no
    such term, so a checkpoint with overflowing LoRA weights diverges on row 0 of text-only inputs."""
    torch.manual_seed(4)
    m = PLoRA(16, 8, bias=False, lora_r=4, lora_alpha=8).eval()
    with torch.no_grad():
        m.Plora_A.weight.fill_(3e38)  # A(x) overflows to inf; the base linear stays finite
        x = torch.ones(1, 5, 16)
        base = torch.nn.functional.linear(x, m.weight)
        res = m(x, torch.zeros(1, 5, dtype=torch.bool))
        assert torch.isfinite(base).all()
        assert torch.isnan(res[:, 0]).all()
        assert torch.equal(res[:, 1:], base[:, 1:])
        assert torch.equal(m(x, None), base)  # no mask at all: no LoRA term, no NaN
        x_inf = torch.randn(1, 5, 16)
        x_inf[0, 0, 0] = float("inf")
        m.Plora_A.weight.normal_()
        res = m(x_inf, torch.zeros(1, 5, dtype=torch.bool))
        assert torch.isnan(res[:, 0]).all()  # inf in row 0 reaches the `* 0` term: NaN, not just inf
        assert torch.equal(res[:, 1:], torch.nn.functional.linear(x_inf, m.weight)[:, 1:])


# ---------------------------------------------------------------- layout per family


@pytest.mark.parametrize("name", FIXTURE_NAMES)
def test_family_layout(name, fixture_models, models):
    path, model, variant = fixture_models[name], models[name], VARIANT[name]
    cfg = json.loads((path / "config.json").read_text())
    assert "plora_config" not in cfg and not any("lora" in k for k in cfg)  # ranks live in code, like upstream
    assert cfg["hidden_size"] == 512 and cfg["hidden_size"] // cfg["num_attention_heads"] == 128
    assert (cfg["num_hidden_layers"], cfg["num_attention_heads"], cfg["num_key_value_heads"]) == (3, 4, 2)
    assert cfg["architectures"] == (["InternLM2ForCausalLM"] if variant == "4khd" else ["InternLMXComposer2ForCausalLM"])
    assert cfg["auto_map"]["AutoModelForCausalLM"] == "modeling_internlm_xcomposer2.InternLMXComposer2ForCausalLM"
    assert cfg["torch_dtype"] == "bfloat16" and cfg["bias"] is False and cfg["rope_theta"] == 1e6
    expected = {"7b": dict.fromkeys(PLORA_LINEARS, (256, 1.0)), "2d5": dict.fromkeys(PLORA_LINEARS, (256, 1.0)),
                "4khd": {**dict.fromkeys(PLORA_LINEARS, (256, 1.0)), "attention.wqkv": (8, 2.0)}}[variant]
    assert {k: (r, a / r) for k, (r, a) in FAMILY_LORA[variant].items()} == expected
    with safe_open(str(path / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
        for i in range(3):
            for linear, (r, _) in expected.items():
                assert f.get_slice(f"model.layers.{i}.{linear}.Plora_A.weight").get_shape()[0] == r
                assert f.get_slice(f"model.layers.{i}.{linear}.Plora_B.weight").get_shape()[1] == r
            assert f.get_slice(f"model.layers.{i}.attention.wqkv.weight").get_shape() == [(4 + 2 * 2) * 128, 512]
        assert all(f.get_slice(k).get_dtype() == "BF16" for k in keys)
    for _, linear, m in plora_modules(model):
        assert (m.lora_r, m.lora_scaling) == expected[linear]
        assert torch.count_nonzero(m.Plora_B.weight) > 0
    assert ("plora_glb_GN" in keys) == ("plora_sub_GN" in keys) == (variant != "7b")
    assert {"model.tok_embeddings.weight", "model.norm.weight", "output.weight", "vision_proj.0.weight",
            "vision_proj.2.weight", "model.layers.0.attention_norm.weight", "model.layers.0.ffn_norm.weight"} <= keys
    assert any(k.startswith("vit.vision_tower.vision_model.encoder.layers.1.") for k in keys)
    assert (path / "ixc_utils.py").exists() == (variant != "7b")
    norms = model.model.layers[0].attention_norm.weight.float()
    assert 0.79 <= norms.min() and norms.max() <= 1.21 and norms.std() > 0.05  # U(0.8, 1.2) in bf16


def test_lmdeploy_recognises_sub_types(fixture_models):
    from lmdeploy.archs import get_model_arch
    from lmdeploy.vl.model.xcomposer2 import ModelType, get_xcomposer_type

    assert get_xcomposer_type(str(fixture_models["xcomposer2-tiny"]))[0] == ModelType.XCOMPOSER2
    assert get_xcomposer_type(str(fixture_models["xcomposer2-4khd-tiny"]))[0] == ModelType.XCOMPOSER2_4KHD
    assert get_xcomposer_type(str(fixture_models["xcomposer2d5-tiny"]))[0] == ModelType.XCOMPOSER2D5
    for path in fixture_models.values():  # auto_map forces the xcomposer2 reader, 4KHD's architectures too
        assert get_model_arch(str(path))[0] == "InternLMXComposer2ForCausalLM"


def test_plora_config_override_is_honoured(tmp_path):
    lora = {"attention.wqkv": (16, 8), "feed_forward.w2": (4, 12.0)}
    path = write_model(FixtureSpec(name="override", layers=1, lora=lora), tmp_path / "override-fixture")
    cfg = json.loads((path / "config.json").read_text())
    assert cfg["plora_config"]["attention.wqkv"] == {"r": 16, "alpha": 8}
    assert cfg["plora_config"]["attention.wo"] == {"r": 256, "alpha": 256}  # unspecified: family default
    model = load(path)
    attn, ffn = model.model.layers[0].attention, model.model.layers[0].feed_forward
    assert (attn.wqkv.lora_r, attn.wqkv.lora_scaling) == (16, 0.5)
    assert (ffn.w2.lora_r, ffn.w2.lora_scaling) == (4, 3.0)
    assert (attn.wo.lora_r, attn.wo.lora_scaling) == (256, 1.0)


# ---------------------------------------------------------------- tokenizer, inputs


@pytest.mark.parametrize("name", FIXTURE_NAMES)
def test_tokenizer(name, tokenizers, models):
    tok = tokenizers[name]
    assert len(tok) == TOKENIZER_SIZE <= models[name].config.vocab_size
    assert (tok.unk_token_id, tok.bos_token_id, tok.eos_token_id) == (0, 1, 2)
    printable = "".join(chr(c) for c in range(0x20, 0x7F)) + "\n\t"
    ids = tok(printable).input_ids
    assert ids[0] == 1 and ids.count(1) == 1 and 0 not in ids and len(ids) == len(printable) + 1
    assert tok(printable, add_special_tokens=False).input_ids == ids[1:]
    assert tok.decode(ids[1:]) == printable
    for chat in ("[UNUSED_TOKEN_146]", "[UNUSED_TOKEN_145]"):
        assert len(tok(chat, add_special_tokens=False).input_ids) == 1
    ids = tok(SYSTEM).input_ids
    assert tok.decode(ids) == "<s>" + SYSTEM


def test_images_and_prompts():
    expected = make_images()
    sizes = set()
    for name, image in expected.items():
        on_disk = Image.open(IMAGES_DIR / name)
        assert on_disk.mode == "RGB"
        assert np.array_equal(np.asarray(on_disk), np.asarray(image)), name
        sizes.add(on_disk.size)
    assert len(sizes) == 3
    cases = yaml.safe_load(DEFAULT_INPUTS.read_text())["cases"]
    assert [c["name"] for c in cases] == ["one-image", "two-images", "text-only"]
    n_images = []
    for case in cases:
        assert case["bos_policy"] in ("first", "every_text")
        for seg in case["segments"]:
            assert set(seg) <= {"text", "image"} and len(seg) == 1
            if "image" in seg:
                assert (DEFAULT_INPUTS.parent / seg["image"]).is_file()
        n_images.append(sum("image" in s for s in case["segments"]))
    assert n_images == [1, 2, 0]


# ---------------------------------------------------------------- determinism and caching


def _tree(path: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(path.iterdir())}


@pytest.mark.parametrize("name", FIXTURE_NAMES)
def test_generation_is_byte_deterministic(name, tmp_path, fixture_models):
    a = _tree(write_model(BUILTIN_SPECS[name], tmp_path / "a" / name))
    b = _tree(write_model(BUILTIN_SPECS[name], tmp_path / "b" / name))
    assert a.keys() == b.keys() and all(a[k] == b[k] for k in a)
    cached = _tree(fixture_models[name])  # generated by ensure(), possibly in an earlier process
    assert cached.keys() == a.keys() and all(cached[k] == a[k] for k in a)


def test_ensure_is_cheap_when_up_to_date(fixture_models):
    root = next(iter(fixture_models.values())).parent
    before = {n: (p / "model.safetensors").stat().st_mtime_ns for n, p in fixture_models.items()}
    t0 = time.perf_counter()
    again = ensure(root)
    assert time.perf_counter() - t0 < 0.5
    assert again == fixture_models
    assert before == {n: (p / "model.safetensors").stat().st_mtime_ns for n, p in again.items()}


def test_ensure_concurrent_and_regenerates_stale(tmp_path):
    results, errors = [], []

    def call():
        try:
            results.append(ensure(tmp_path))
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=call) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(results) == 2 and results[0] == results[1]
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_dir()) == sorted(FIXTURE_NAMES)
    weights = tmp_path / FIXTURE_NAMES[0] / "model.safetensors"
    inode = weights.stat().st_ino
    stamp = tmp_path / f".{FIXTURE_NAMES[0]}.stamp.json"
    stamp.write_text(stamp.read_text().replace('"generator_version"', '"generator_version_old"'))
    ensure(tmp_path)
    assert weights.stat().st_ino != inode  # the stale one was rebuilt (and swapped in by rename)
    assert (tmp_path / FIXTURE_NAMES[1] / "model.safetensors").exists()


# ---------------------------------------------------------------- random specs


@st.composite
def fixture_specs(draw):
    heads, kv_heads = draw(st.sampled_from([(2, 1), (4, 1), (4, 2)]))
    lora_entry = st.tuples(st.integers(1, 64), st.sampled_from([1, 2, 8, 16, 0.5, 24.0]))
    lora = draw(st.none() | st.fixed_dictionaries({}, optional={k: lora_entry for k in PLORA_LINEARS}))
    variant = draw(st.sampled_from(["7b", "4khd", "2d5"]))
    return FixtureSpec(
        name="random",
        variant=variant,
        layers=draw(st.integers(1, 3)),
        heads=heads,
        kv_heads=kv_heads,
        head_dim=draw(st.sampled_from([32, 64, 128])),
        intermediate=draw(st.sampled_from([64, 160, 256])),
        lora=lora,
        seed=draw(st.integers(0, 2**31)),
        image_size=draw(st.sampled_from([28, 56])) if variant == "7b" else {"4khd": 336, "2d5": 560}[variant],
        vision_layers=draw(st.integers(1, 2)),
    )


@settings(max_examples=6, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(spec=fixture_specs())
def test_random_specs_load_and_run(spec):
    with tempfile.TemporaryDirectory() as tmp:
        path = write_model(spec, Path(tmp) / "random-fixture")
        cfg = json.loads((path / "config.json").read_text())
        assert ("plora_config" in cfg) == (spec.lora is not None)
        model = load(path)
        for _, linear, m in plora_modules(model):
            r, alpha = spec.lora_layout()[linear]
            assert (m.lora_r, m.lora_scaling) == (r, alpha / r)
        image = model.encode_img(IMAGES_DIR / "circles.png")
        rows = spec.image_tokens if spec.variant == "7b" else SQUARE_ROWS[spec.variant]
        assert image.shape == (1, rows, spec.hidden)
        text = model.model.tok_embeddings(torch.arange(3, 13).unsqueeze(0))
        embeds = torch.cat([text[:, :4], image, text[:, 4:]], dim=1)
        mask = torch.zeros(embeds.shape[:2], dtype=torch.bool)
        mask[:, 4 : 4 + rows] = True
        with torch.no_grad():
            logits = model(inputs_embeds=embeds, im_mask=mask).logits
        assert logits.shape == (1, embeds.shape[1], spec.vocab)
        assert torch.isfinite(logits).all()
