"""Qwen2 PLoRA fixtures, `parity disguise`, the lora_config it emits and lmdeploy's use of it, and the
deployment audit (issue 6)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from parity.deploy.convert import convert
from parity.deploy.layout import join_grouped_qkv
from parity.deploy.lora_config import f32, resolve
from parity.deploy.workspace import LoraSettings, Workspace
from parity.disguise import (
    DISGUISE_RECORD,
    LORA_CONFIG_FILE,
    audit_deployment,
    disguise,
    lora_config_registered,
    read_lora_config,
    register_lora_config,
    unregister_lora_config,
    xcomposer2_state_dict,
)
from parity.hfconfig import AttnShape
from parity.reference.qwen2 import fuse_qkv_lora, fuse_qkv_rows, split_qkv_rows
from parity.errors import ParityInputError
from parity.fixtures import (
    IMAGES_DIR,
    QWEN2_FIXTURE_NAMES,
    QWEN2_LORA,
    QWEN2_PROJECTIONS,
    QWEN2_SPECS,
    ensure,
    write_qwen2_model,
)
from parity.names import TM_LINEAR_OF
from parity.points import PLORA_LINEARS

REPO = Path(__file__).resolve().parents[1]
FIXTURE_CACHE = REPO / ".cache" / "fixtures"


@pytest.fixture(scope="module")
def qwen2_models() -> dict[str, Path]:
    return ensure(FIXTURE_CACHE, QWEN2_FIXTURE_NAMES)


@pytest.fixture(scope="module")
def disguised(qwen2_models, tmp_path_factory) -> dict[str, tuple[Path, object]]:
    root = tmp_path_factory.mktemp("disguise")
    return {name: (root / name, disguise(qwen2_models[name], root / name, quiet=True))
            for name in ("qwen2-plora-tiny", "qwen2-plora-nobias-tiny")}


def _load(path: Path):
    from transformers import AutoModelForCausalLM

    model, info = AutoModelForCausalLM.from_pretrained(str(path), trust_remote_code=True, dtype=torch.float32,
                                                       output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    return model.eval()


def _tree(path: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(path.iterdir()) if p.is_file()}


def _inputs(model, image=IMAGES_DIR / "circles.png"):
    emb = model.get_input_embeddings()
    with torch.no_grad():
        text = emb(torch.arange(3, 23).unsqueeze(0))
        img = model.encode_img(image)
    embeds = torch.cat([text[:, :6], img, text[:, 6:]], dim=1)
    mask = torch.zeros(embeds.shape[:2], dtype=torch.bool)
    mask[:, 6:6 + img.shape[1]] = True
    return embeds, mask


# ----------------------------------------------------------------------------- the Qwen2 PLoRA fixtures


@pytest.mark.parametrize("name", QWEN2_FIXTURE_NAMES)
def test_qwen2_fixture_is_byte_deterministic(name, tmp_path, qwen2_models):
    a = _tree(write_qwen2_model(QWEN2_SPECS[name], tmp_path / "a"))
    b = _tree(write_qwen2_model(QWEN2_SPECS[name], tmp_path / "b"))
    assert a == b
    assert _tree(qwen2_models[name]) == a  # what ensure() cached, possibly in another process


def test_ensure_default_still_builds_only_xcomposer2(tmp_path):
    from parity.fixtures import FIXTURE_NAMES

    assert set(ensure(tmp_path)) == set(FIXTURE_NAMES)
    with pytest.raises(KeyError, match="unknown fixture"):
        ensure(tmp_path, ("qwen2-nope",))


@pytest.mark.parametrize("name", QWEN2_FIXTURE_NAMES)
def test_qwen2_fixture_names_semantics_and_lora(name, qwen2_models):
    spec = QWEN2_SPECS[name]
    cfg = json.loads((qwen2_models[name] / "config.json").read_text())
    assert cfg["architectures"] == ["Qwen2PLoRAForCausalLM"]
    assert cfg["auto_map"]["AutoModelForCausalLM"] == "modeling_qwen2_plora.Qwen2PLoRAForCausalLM"
    assert cfg["rms_norm_eps"] == 1e-6 and cfg["rope_theta"] == 1e6
    assert cfg["num_attention_heads"] // cfg["num_key_value_heads"] >= 2 and cfg["head_dim"] == spec.head_dim
    model = _load(qwen2_models[name])
    names = set(model.state_dict())
    for n in ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight",
              "model.layers.0.input_layernorm.weight", "model.layers.0.post_attention_layernorm.weight"):
        assert n in names
    for i in range(spec.layers):
        for proj in QWEN2_PROJECTIONS:
            m = model.get_submodule(f"model.layers.{i}.{proj}")
            r, alpha = QWEN2_LORA[proj]
            assert (m.lora_r, m.lora_scaling) == (r, alpha / r)
            assert m.Plora_A.weight.shape[0] == r and m.Plora_B.weight.abs().sum() > 0
            has_bias = proj in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj") and spec.qkv_bias
            assert (m.bias is not None) == has_bias
            if has_bias:
                assert m.bias.abs().max() > 0.3  # non-trivial: dropping it must show
    # lmdeploy's hard-coded XComposer2 settings fit none of the projections
    assert all(a / r != 1.0 or r != 256 for r, a in QWEN2_LORA.values())
    assert len({a / r for p, (r, a) in QWEN2_LORA.items() if p.startswith("self_attn.") and p != "self_attn.o_proj"}) == 3
    # vision interface of XComposer2
    model.vit.load_model()
    model.vit.resize_pos()
    embeds, mask = _inputs(model)
    assert int(mask.sum()) == spec.image_tokens
    with torch.no_grad():
        out = model(inputs_embeds=embeds, im_mask=mask, output_hidden_states=True).logits
        plain = model(inputs_embeds=embeds, im_mask=None).logits
    first = int(mask[0].nonzero()[0])
    assert torch.equal(out[:, :first], plain[:, :first])   # PLoRA only from the image rows on
    assert (out[0, first:] - plain[0, first:]).abs().amax(-1).min() > 0


# ----------------------------------------------------------------------------- fusion math (property)


@st.composite
def qkv_cases(draw):
    kv = draw(st.integers(1, 3))
    gs = draw(st.integers(1, 3))
    d = draw(st.sampled_from([2, 4, 8]))
    ranks = [draw(st.integers(1, 5)) for _ in range(3)]
    scales = [draw(st.sampled_from([0.25, 0.5, 1.0, 2.0, 4.0, 3.0, 0.3])) for _ in range(3)]
    return AttnShape(kv * gs, kv, d), ranks, scales, draw(st.integers(0, 2**31))


@settings(max_examples=40, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(case=qkv_cases())
def test_fused_qkv_lora_equals_the_three_loras(case):
    shape, ranks, scales, seed = case
    g = torch.Generator().manual_seed(seed)
    hidden, rows = 6, 5
    outs = (shape.q_out, shape.kv_out, shape.kv_out)
    a = tuple(torch.randn(r, hidden, generator=g, dtype=torch.float64) for r in ranks)
    b = tuple(torch.randn(o, r, generator=g, dtype=torch.float64) for o, r in zip(outs, ranks))
    w = tuple(torch.randn(o, hidden, generator=g, dtype=torch.float64) for o in outs)
    x = torch.randn(rows, hidden, generator=g, dtype=torch.float64)
    a_f, b_f = fuse_qkv_lora(a, b, tuple(scales), shape)
    assert a_f.shape == (sum(ranks), hidden) and b_f.shape == (sum(outs), sum(ranks))
    separate = [(x @ ai.T) @ bi.T * s for ai, bi, s in zip(a, b, scales)]
    expect = join_grouped_qkv(*separate, shape.heads, shape.kv_heads, shape.head_dim)
    torch.testing.assert_close((x @ a_f.T) @ b_f.T, expect, rtol=1e-12, atol=1e-12)
    # the base weight: grouped rows reproduce the grouped outputs; split inverts fuse
    w_f = fuse_qkv_rows(*w, shape)
    torch.testing.assert_close(x @ w_f.T, join_grouped_qkv(*(x @ t.T for t in w), shape.heads, shape.kv_heads,
                                                           shape.head_dim), rtol=1e-12, atol=1e-12)
    assert all(torch.equal(p, q) for p, q in zip(split_qkv_rows(w_f, shape), w))


# ----------------------------------------------------------------------------- the disguise


def test_disguise_writes_an_xcomposer2_checkpoint(disguised, qwen2_models):
    path, rec = disguised["qwen2-plora-tiny"]
    cfg = json.loads((path / "config.json").read_text())
    assert cfg["architectures"] == ["InternLMXComposer2ForCausalLM"]
    assert "InternLMXComposer2ForCausalLM" in cfg["auto_map"]["AutoModelForCausalLM"]
    assert cfg["rms_norm_eps"] == 1e-6 and cfg["rope_theta"] == 1e6 and cfg["bias"] is True
    assert cfg["num_key_value_heads"] == 2 and cfg["hidden_size"] == 512
    r_qkv = sum(QWEN2_LORA[p][0] for p in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"))
    assert cfg["plora_config"]["attention.wqkv"] == {"r": r_qkv, "alpha": r_qkv}  # scales folded: 1.0
    assert cfg["plora_config"]["feed_forward.w2"] == {"r": 32, "alpha": 128}
    assert {f for f in rec.files} == {p.name for p in path.iterdir()}
    assert {"modeling_internlm_xcomposer2.py", "configuration_internlm_xcomposer2.py", "build_mlp.py",
            "tokenizer.json", LORA_CONFIG_FILE, DISGUISE_RECORD} <= set(rec.files)
    assert json.loads((path / DISGUISE_RECORD).read_text()) == rec.to_dict()
    assert rec.fold_exact and rec.qkv_bias and rec.head_dim == 128
    assert rec.linears["attention.wqkv"] == {"rank": r_qkv, "alpha": r_qkv, "scale": 1.0}
    # the checkpoint is exactly what xcomposer2_state_dict(original) says a faithful conversion sees
    from safetensors.torch import load_file

    written = load_file(str(path / "model.safetensors"))
    original = _load(qwen2_models["qwen2-plora-tiny"]).to(torch.bfloat16)
    expect = xcomposer2_state_dict(original)
    assert written.keys() == expect.keys()
    assert all(torch.equal(written[k], expect[k]) for k in written)
    assert torch.count_nonzero(written["model.layers.0.attention.wo.bias"]) == 0


def test_disguise_lists_losses_on_stdout_and_in_the_record(qwen2_models, tmp_path, capsys):
    rec = disguise(qwen2_models["qwen2-plora-tiny"], tmp_path / "d")
    out = capsys.readouterr().out
    # the biases are carried (exported by lmdeploy under parity's registration): a note, not a loss
    assert rec.losses == [] and "Nothing is lost" in out
    assert any("q/k/v biases" in n and "attn_bias = 1" in n for n in rec.notes) and "q/k/v biases" in out
    rec2 = disguise(qwen2_models["qwen2-plora-nobias-tiny"], tmp_path / "e")
    assert rec2.losses == [] and "Nothing is lost" in capsys.readouterr().out
    assert any("register_lora_config" in n for n in rec2.notes)


def test_disguise_refuses_head_dim_64_and_writes_nothing(qwen2_models, tmp_path):
    with pytest.raises(ParityInputError, match=r"head_dim is 64.*hard-coded head_dim of 128") as e:
        disguise(qwen2_models["qwen2-plora-hd64-tiny"], tmp_path / "hd64", quiet=True)
    assert "\n" not in str(e.value)
    assert not (tmp_path / "hd64").exists() and list(tmp_path.iterdir()) == []


def test_disguise_refuses_bad_input(qwen2_models, tmp_path):
    from parity.fixtures import FIXTURE_NAMES

    xc = ensure(FIXTURE_CACHE, FIXTURE_NAMES)["xcomposer2-tiny"]
    with pytest.raises(ParityInputError, match="already is an XComposer2 checkpoint"):
        disguise(xc, tmp_path / "x", quiet=True)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "f").write_text("x")
    with pytest.raises(ParityInputError, match="not empty"):
        disguise(qwen2_models["qwen2-plora-nobias-tiny"], tmp_path / "full", quiet=True)
    with pytest.raises(ParityInputError, match="does not exist"):
        disguise(tmp_path / "nope", tmp_path / "y", quiet=True)


@pytest.mark.parametrize("edit, match", [
    (lambda c: c.update(hidden_act="gelu"), "SiLU-gated only"),
    (lambda c: c.update(rope_scaling={"rope_type": "yarn", "factor": 4.0}), "rope_scaling .* is not representable"),
    (lambda c: c.pop("img_size"), "config.json has no img_size"),
    (lambda c: c.update(hidden_size=640), "hidden_size 640 != num_attention_heads 4 x head_dim 128"),
])
def test_disguise_refuses_what_lmdeploy_cannot_represent(edit, match, qwen2_models, tmp_path):
    src = tmp_path / "src"
    shutil.copytree(qwen2_models["qwen2-plora-nobias-tiny"], src)
    cfg = json.loads((src / "config.json").read_text())
    edit(cfg)
    (src / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ParityInputError, match=match):
        disguise(src, tmp_path / "out", quiet=True)
    assert not (tmp_path / "out").exists()


def test_disguise_refuses_tensors_it_would_drop(qwen2_models, tmp_path):
    from safetensors.torch import load_file, save_file

    src = tmp_path / "src"
    shutil.copytree(qwen2_models["qwen2-plora-nobias-tiny"], src)
    state = load_file(str(src / "model.safetensors"))
    state["model.layers.1.self_attn.extra_gate.weight"] = torch.zeros(2, 2, dtype=torch.bfloat16)
    save_file(state, str(src / "model.safetensors"))
    with pytest.raises(ParityInputError, match="extra_gate.weight that has no place"):
        disguise(src, tmp_path / "out", quiet=True)
    state.pop("model.layers.1.self_attn.extra_gate.weight")
    state.pop("model.layers.2.mlp.up_proj.Plora_A.weight")
    save_file(state, str(src / "model.safetensors"))
    with pytest.raises(ParityInputError, match="model.layers.2.mlp.up_proj has no Plora_A/Plora_B"):
        disguise(src, tmp_path / "out", quiet=True)


def test_scales_come_from_config_code_or_caller(qwen2_models, tmp_path):
    src = tmp_path / "src"
    shutil.copytree(qwen2_models["qwen2-plora-nobias-tiny"], src)
    cfg = json.loads((src / "config.json").read_text())
    plora = cfg.pop("plora_config")
    (src / "config.json").write_text(json.dumps(cfg))
    # the scales are unknowable without the code (and the code now builds r=8 everywhere: ranks refuse)
    with pytest.raises(ParityInputError, match="not in its config.json"):
        disguise(src, tmp_path / "a", quiet=True)
    with pytest.raises(ParityInputError, match="builds no PLoRA of rank"):
        disguise(src, tmp_path / "b", quiet=True, trust_remote_code=True)
    scales = {p: v["alpha"] / v["r"] for p, v in plora.items()}
    rec = disguise(src, tmp_path / "c", quiet=True, scales=scales)
    ref = read_lora_config(tmp_path / "c")
    assert rec.lora_config == ref
    # trust_remote_code reads them from the model's code (here: the original folder's)
    rec2 = disguise(qwen2_models["qwen2-plora-nobias-tiny"], tmp_path / "d", quiet=True, trust_remote_code=True)
    assert rec2.linears == rec.linears


@pytest.mark.parametrize("name", ["qwen2-plora-tiny", "qwen2-plora-nobias-tiny"])
def test_original_and_disguise_agree_in_hf_layer_by_layer(name, disguised, qwen2_models):
    """The disguise is the same function: per-layer hidden states equal to float32 precision."""
    original = _load(qwen2_models[name])
    fake = _load(disguised[name][0])
    embeds, mask = _inputs(original)
    assert torch.equal(fake.encode_img(IMAGES_DIR / "circles.png"), original.encode_img(IMAGES_DIR / "circles.png"))
    with torch.no_grad():
        a = original(inputs_embeds=embeds, im_mask=mask, output_hidden_states=True)
        b = fake(inputs_embeds=embeds, im_mask=mask, output_hidden_states=True)
        no_lora = fake(inputs_embeds=embeds, im_mask=None, output_hidden_states=True)
    eps = torch.finfo(torch.float32).eps
    for i, (ha, hb, hn) in enumerate(zip(a.hidden_states, b.hidden_states, no_lora.hidden_states)):
        rel = float((ha - hb).norm() / ha.norm())
        assert rel <= 32 * eps, (i, rel)  # summation order only (fused matmul, q*scale vs q/sqrt(d))
        if i > 0:  # and the comparison is sensitive: dropping the LoRA is ~1e5 times larger
            assert float((ha - hn).norm() / ha.norm()) > 1e4 * 32 * eps
    assert float((a.logits - b.logits).norm() / a.logits.norm()) <= 32 * eps


# ----------------------------------------------------------------------------- the lora_config


def test_emitted_lora_config_resolves_to_the_disguise_ranks_and_scales(disguised):
    for path, rec in disguised.values():
        cfg = read_lora_config(path)
        assert cfg == rec.lora_config and cfg["lora_policy"] == "plora"
        lora = LoraSettings(**cfg)
        for layer in range(rec.layers):
            for linear in PLORA_LINEARS:
                want = rec.linears[linear]
                assert resolve(lora, layer, TM_LINEAR_OF[linear]) == (want["rank"], f32(want["scale"]))
        assert cfg["lora_max_wo_r"] >= rec.linears["attention.wo"]["rank"]


@pytest.mark.parametrize("name", ["qwen2-plora-nobias-tiny", "qwen2-plora-tiny"])
def test_register_lora_config_drives_lmdeploys_conversion(disguised, tmp_path, name):
    """lmdeploy's own converter under the registration, `convert` with the override, and `convert` of the bare
    folder (which reads the folder's settings) write the same bytes: the lora_config, and attn_bias = 1 with the
    biases for the biased disguise."""
    path, rec = disguised[name]
    emitted = read_lora_config(path)
    plain = convert(path, tmp_path / "plain", lmdeploy_defaults=True)  # what plain `lmdeploy convert` writes
    assert plain.lora_config["lora_r"] == 256 and plain.lora_config["lora_rank_pattern"] == ""  # lmdeploy's own
    assert Workspace.open(plain.workspace).model.attn_bias == 0
    with lora_config_registered() as none:
        assert none is None
        from lmdeploy.turbomind.deploy.source_model.base import INPUT_MODELS

        cls = INPUT_MODELS.get("xcomposer2")
        assert cls.__name__ == "ParityXcomposer2Model" and cls.__mro__[1].__name__ == "Xcomposer2Model"
        via_registry = convert(path, tmp_path / "registry")
        both = convert(path, tmp_path / "both", lora_config=emitted)
    via_override = convert(path, tmp_path / "override", lora_config=emitted)
    via_folder = convert(path, tmp_path / "folder")
    assert INPUT_MODELS.get("xcomposer2").__name__ == "Xcomposer2Model"  # restored
    for r in (via_registry, both, via_override, via_folder):
        assert r.lora_config == emitted
        ws = Workspace.open(r.workspace)
        assert ws.lora.to_dict() == emitted
        assert ws.model.attn_bias == int(rec.qkv_bias)
        assert ws.has("layers.0.attention.w_qkv.bias") == rec.qkv_bias == ws.has("layers.0.attention.wo.bias")
    for other in ("override", "folder", "both"):
        assert not [f for f in (tmp_path / "registry" / "triton_models" / "weights").iterdir()
                    if f.read_bytes() != (tmp_path / other / "triton_models" / "weights" / f.name).read_bytes()]


def test_registered_class_leaves_other_models_alone(tmp_path):
    from parity.deploy.compat import cpu_converter_patches
    from parity.fixtures import FIXTURE_NAMES

    models = ensure(FIXTURE_CACHE, FIXTURE_NAMES)
    with cpu_converter_patches():
        from lmdeploy.turbomind.deploy.source_model.base import INPUT_MODELS

        def info(path):
            return INPUT_MODELS.get("xcomposer2")(model_path=str(path), tokenizer_path=str(path)).model_info()

        before = {n: info(p) for n, p in models.items()}
        with lora_config_registered():
            after = {n: info(p) for n, p in models.items()}
    assert before == after


def test_register_lora_config_checks_its_input(tmp_path, disguised):
    with pytest.raises(ParityInputError, match=LORA_CONFIG_FILE):
        register_lora_config(tmp_path)
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / LORA_CONFIG_FILE).write_text(json.dumps({"lora_r": 8}))
    with pytest.raises(ParityInputError, match="missing key"):
        register_lora_config(bad)
    try:
        path, rec = disguised["qwen2-plora-nobias-tiny"]
        assert register_lora_config(path) == rec.lora_config
        custom = dict(rec.lora_config, lora_scale_pattern="")
        assert register_lora_config(bad, custom) == custom  # explicit config for a folder
    finally:
        unregister_lora_config()


# ----------------------------------------------------------------------------- the deployment audit


def _causes(audit):
    return sorted({(f.cause, f.severity) for f in audit.findings})


def test_audit_raw_qwen2_plora_model(qwen2_models, tmp_path):
    src = qwen2_models["qwen2-plora-tiny"]
    with pytest.raises(ParityInputError, match="trust_remote_code"):
        audit_deployment(src)
    a = audit_deployment(src, trust_remote_code=True)
    assert a.architecture == "Qwen2PLoRAForCausalLM" and a.reader is None and a.vision_model is None
    assert not a.ok and all(f.check == "deployment" for f in a.findings)
    assert ("config_mismatch", "error") in _causes(a)
    assert a.model_linears["attention.wqkv"]["rank"] == 40 and a.model_linears["attention.wqkv"]["scale"] == 1.0
    # the #2437 case: the same model declared as Qwen2ForCausalLM is read by the 'qwen2' reader (no LoRA)
    named = tmp_path / "named-qwen2"
    shutil.copytree(src, named)
    cfg = json.loads((named / "config.json").read_text())
    cfg["architectures"] = ["Qwen2ForCausalLM"]
    (named / "config.json").write_text(json.dumps(cfg))
    b = audit_deployment(named, trust_remote_code=True)
    assert b.reader == "qwen2" and b.lora_config["lora_policy"] == ""
    conflict = [f for f in b.findings if f.cause == "lora_not_applied"]
    assert conflict and "'qwen2' reader, which has no PLoRA" in conflict[0].message
    assert any(r["item"] == "weight reader" and not r["ok"] for r in b.table)


def test_audit_of_the_disguise_with_and_without_the_lora_config(disguised):
    nobias, biased = disguised["qwen2-plora-nobias-tiny"][0], disguised["qwen2-plora-tiny"][0]
    a = audit_deployment(nobias, trust_remote_code=True)
    assert (a.architecture, a.reader, a.vision_model, a.sub_type) == (
        "InternLMXComposer2ForCausalLM", "xcomposer2", "Xcomposer2VisionModel", "7b")
    assert _causes(a) == [("lora_rank_mismatch", "error")]
    assert {f.module for f in a.findings} == set(PLORA_LINEARS)
    assert "register_lora_config" in a.findings[0].message
    lossy = audit_deployment(biased, trust_remote_code=True)  # lmdeploy alone: wrong ranks, biases dropped
    assert ("bias_dropped", "error") in _causes(lossy)
    dropped = next(f for f in lossy.findings if f.cause == "bias_dropped")
    assert dropped.layer == 0 and dropped.module == "attention.wqkv"
    with lora_config_registered():
        ok = audit_deployment(nobias, trust_remote_code=True)
        carried = audit_deployment(biased, trust_remote_code=True)
    assert ok.ok and ok.lora_registered and ok.lora_config == read_lora_config(nobias)
    assert ok.engine_linears == ok.model_linears
    # the registration exports the biases (attn_bias = 1): nothing is lost
    assert carried.ok and carried.qkv_bias and _causes(carried) == [], carried.summary()
    assert any(r["item"] == "qkv bias" and r["ok"] and "attn_bias 1" in r["lmdeploy"] for r in carried.table)


def test_audit_xcomposer2_fixtures_and_the_4khd_trap(tmp_path):
    from parity.fixtures import FIXTURE_NAMES

    models = ensure(FIXTURE_CACHE, FIXTURE_NAMES)
    for name, sub in (("xcomposer2-tiny", "7b"), ("xcomposer2-4khd-tiny", "4khd")):
        a = audit_deployment(models[name], trust_remote_code=True)
        assert a.ok and a.sub_type == sub, a.summary()
    broken = tmp_path / "4khd-broken"
    shutil.copytree(models["xcomposer2-4khd-tiny"], broken)
    ixc = broken / "ixc_utils.py"
    ixc.write_text("import parity_no_such_module  # a dependency missing on the serving machine\n" + ixc.read_text())
    t = audit_deployment(broken, trust_remote_code=True)
    assert t.sub_type == "7b" and t.sub_type_expected == "4khd"
    causes = _causes(t)
    assert ("config_mismatch", "error") in causes          # the sub-type trap itself
    assert ("lora_rank_mismatch", "error") in causes       # and its consequence: wqkv rank 256, not 8
    assert any("Sub-type trap" in f.message for f in t.findings)
