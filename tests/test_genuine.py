"""Checkpoints shaped like the real ones: `xcomposer2-vl-tiny` (hub-id CLIP resized 24x24 -> 35x35, SentencePiece
tokenizer, sharded weights, einops) and what parity does with them: the offline hub cache or a local folder
for the CLIP, MissingHubModel (exit 2), lmdeploy's CLIP geometry fix applied in-process and reported, and
the model's own exceptions as one paragraph (exit 2)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from parity.errors import ParityInputError
from parity.fixtures import CLIP_HUB_ID, GENUINE_FIXTURE_NAMES, IMAGES_DIR, ensure, hf_home, hub_snapshot
from parity.fixtures.generator import BUILTIN_SPECS

REPO = Path(__file__).resolve().parents[1]
FIXTURE_CACHE = REPO / ".cache" / "fixtures"
VL = "xcomposer2-vl-tiny"
IMAGE = IMAGES_DIR / "gradient.png"


@pytest.fixture(scope="module")
def vl() -> Path:
    return ensure(FIXTURE_CACHE, GENUINE_FIXTURE_NAMES)[VL]


@pytest.fixture(scope="module")
def clip_folder(vl) -> Path:
    snap = hub_snapshot(BUILTIN_SPECS[VL], hf_home(FIXTURE_CACHE))
    assert snap is not None
    return snap


@pytest.fixture
def provided(clip_folder, monkeypatch):
    """The hub CLIP served from its local folder (what --hub-model ID=PATH does), this test only."""
    from parity.reference import modelcode

    monkeypatch.setenv(modelcode.PROVIDED_ENV, "{}")  # recorded, so the mapping provide() writes is undone
    modelcode.provide(CLIP_HUB_ID, clip_folder)
    return clip_folder


@pytest.fixture(scope="module")
def vl_ref(vl, clip_folder):
    from parity.reference import modelcode
    from parity.reference.loader import load_reference

    old = os.environ.get(modelcode.PROVIDED_ENV)
    modelcode.provide(CLIP_HUB_ID, clip_folder)
    try:
        return load_reference(vl, trust_remote_code=True)
    finally:
        if old is None:
            os.environ.pop(modelcode.PROVIDED_ENV, None)
        else:
            os.environ[modelcode.PROVIDED_ENV] = old


def _cli(args, env_extra, cwd):
    env = {k: v for k, v in os.environ.items() if k != "PARITY_HUB_MODELS"}
    env.update(env_extra)
    env["PYTHONPATH"] = str(REPO)
    return subprocess.run([sys.executable, "-m", "parity.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=900, cwd=cwd, env=env)


# ----------------------------------------------------------------------------------------- the fixture


def test_vl_fixture_is_shaped_like_a_real_vl7b_folder(vl):
    names = {p.name for p in vl.iterdir()}
    assert {"model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors",
            "model.safetensors.index.json", "tokenizer.model", "tokenization_internlm_xcomposer2.py"} <= names
    assert "model.safetensors" not in names and "tokenizer.json" not in names
    cfg = json.loads((vl / "config.json").read_text())
    assert cfg["img_size"] == 490 and not any(k.startswith("vit_") for k in cfg)
    assert f'VISION_TOWER = "{CLIP_HUB_ID}"' in (vl / "build_mlp.py").read_text()
    modeling = (vl / "modeling_internlm_xcomposer2.py").read_text()
    assert "from einops import rearrange" in modeling
    for method in ("def encode_img", "def img2emb", "def interleav_wrap_chat", "self.vit =", "self.vision_proj ="):
        assert method in modeling
    index = json.loads((vl / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == {"model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"}
    # the checkpoint's ViT position table is the resized one: 35 x 35 + 1
    from safetensors import safe_open

    key = "vit.vision_tower.vision_model.embeddings.position_embedding.weight"
    with safe_open(vl / index["weight_map"][key], "pt") as f:
        assert f.get_slice(key).get_shape()[0] == 35 * 35 + 1
    # the hub model in the offline cache: HF_HOME layout, 24 x 24 grid at 336 px
    repo = hf_home(FIXTURE_CACHE) / "hub" / "models--openai--clip-vit-large-patch14-336"
    rev = (repo / "refs" / "main").read_text().strip()
    hub_cfg = json.loads((repo / "snapshots" / rev / "config.json").read_text())
    assert hub_cfg["vision_config"]["image_size"] == 336 and hub_cfg["vision_config"]["patch_size"] == 14


def test_sentencepiece_tokenizer_is_the_models_own_class(vl_ref):
    tok = vl_ref.tokenizer
    assert type(tok).__name__ == "InternLMXComposer2Tokenizer"
    ids = tok("[UNUSED_TOKEN_146]user\nHi\t![UNUSED_TOKEN_145]\n")["input_ids"]
    assert ids[0] == 1 and ids[1] == tok.convert_tokens_to_ids("[UNUSED_TOKEN_146]")
    assert tok.unk_token_id not in ids
    assert tok.decode(ids[1:]) == "[UNUSED_TOKEN_146]user\nHi\t![UNUSED_TOKEN_145]\n"
    assert vl_ref.tokenize("ab") == tok("ab", add_special_tokens=False)["input_ids"]


# ----------------------------------------------------------------------------------------- the hub CLIP


def test_missing_hub_model_is_bad_input_naming_the_id_and_both_remedies(vl, tmp_path):
    proc = _cli(["run", vl, "--trust-remote-code", "--out", tmp_path / "r"],
                {"HF_HOME": str(tmp_path / "empty-home")}, tmp_path)
    assert proc.returncode == 2, proc.stderr[-2000:]
    msg = " ".join(proc.stderr.split())
    assert "Traceback" not in proc.stderr
    for part in (CLIP_HUB_ID, "build_mlp.py (load_model", "HF_HOME=", "--hub-model", "never downloads"):
        assert part in msg, (part, msg)
    assert not (tmp_path / "r").exists()


def test_hub_model_given_as_a_local_folder(vl, provided):
    from parity.reference.loader import load_reference

    ref = load_reference(vl, trust_remote_code=True)
    assert ref.encode_image(IMAGE).shape == (35 * 35, ref.hidden_size)


def test_hub_model_argument_must_name_a_model_folder(tmp_path):
    from parity.cli import main

    assert main(["audit", str(tmp_path), "--hub-model", f"{CLIP_HUB_ID}={tmp_path / 'nope'}"]) == 2
    assert main(["audit", str(tmp_path), "--hub-model", "no-equals-sign"]) == 2


# ----------------------------------------------------------------------------------------- geometry fix


def test_clip_geometry_fix_is_applied_and_reported(vl_ref):
    assert len(vl_ref.applied) == 1
    note = vl_ref.applied[0]
    assert note.startswith("applied: ") and "image_size 336 -> 490" in note and "lmdeploy" in note
    emb = vl_ref.model.vit.vision_tower.vision_model.embeddings
    assert emb.image_size == 490 and emb.position_embedding.weight.shape[0] == 35 * 35 + 1
    feats = vl_ref.encode_image(IMAGE)
    assert feats.shape == (1225, vl_ref.hidden_size) and torch.isfinite(feats).all()


def test_without_the_geometry_fix_the_models_own_error_is_one_paragraph(vl_ref):
    """Fault: the fix undone (what the model's code leaves). parity names the model file and function."""
    emb = vl_ref.model.vit.vision_tower.vision_model.embeddings
    emb.image_size = 336
    try:
        with pytest.raises(ParityInputError) as e:
            vl_ref.encode_image(IMAGE)
    finally:
        emb.image_size = 490
    msg = str(e.value)
    assert "build_mlp.py (forward" in msg and "encode_img" in msg
    assert "Input image size (490*490) doesn't match model (336*336)" in msg
    assert e.value.exit_code == 2


def test_an_exception_in_the_models_init_names_file_and_function(vl, provided, tmp_path):
    """Fault: the model's resize_pos raises while the model is built."""
    from parity.reference.loader import load_reference

    broken = tmp_path / "vl-broken-resize"
    shutil.copytree(vl, broken)
    code = (broken / "build_mlp.py").read_text()
    marker = '        """Bicubic interpolation'
    assert marker in code
    code = code.replace(marker, '        raise RuntimeError("position table cannot be resized")\n' + marker, 1)
    (broken / "build_mlp.py").write_text(code)
    with pytest.raises(ParityInputError) as e:
        load_reference(broken, trust_remote_code=True)
    msg = str(e.value)
    assert "build_mlp.py (resize_pos" in msg and "position table cannot be resized" in msg
    assert "building the model" in msg


# ----------------------------------------------------------------------------------------- end to end


@pytest.mark.slow
def test_parity_run_on_the_vl_fixture_from_the_offline_cache(vl, tmp_path):
    """The whole pipeline on the vl-7b-shaped folder, the CLIP resolved through HF_HOME: clean, and the
    in-process fix is in the report."""
    out = tmp_path / "report"
    proc = _cli(["run", vl, "--trust-remote-code", "--out", out, "--cache-dir", tmp_path / "cache"],
                {"HF_HOME": str(hf_home(FIXTURE_CACHE))}, REPO)
    assert proc.returncode == 0, (proc.stdout[-3000:], proc.stderr[-3000:])
    report = json.loads((out / "report.json").read_text())
    assert report["status"] == "pass"
    assert not [f for f in report["findings"] if f["severity"] == "error"]
    applied = report["engine"]["reference_applied"]
    assert len(applied) == 1 and "image_size 336 -> 490" in applied[0]


# ----------------------------------------------------------------------------------------- the audit


def _audit(path):
    from parity.disguise import audit_deployment

    return audit_deployment(path, trust_remote_code=True)


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_audit_reads_every_plora_linear_and_the_vision_path_without_building_the_model(vl, monkeypatch):
    """The hub CLIP is not in the cache, so the model cannot be built: the audit still reads everything."""
    from parity.reference import modelcode

    monkeypatch.setenv(modelcode.PROVIDED_ENV, "{}")
    a = _audit(vl)
    assert a.status == "OK" and a.exit_code == 0 and not a.incomplete, a.summary()
    assert set(a.model_linears) == {"attention.wqkv", "attention.wo", "feed_forward.w1", "feed_forward.w3",
                                    "feed_forward.w2"}
    assert all(g == {"rank": 256, "scale": 1.0, "layers": 3} for g in a.model_linears.values())
    v = a.vision_path
    assert (v["position_grid"], v["pixels"], v["img_size"], v["rows_per_image"]) == ("35x35", 490, 490, 1225)
    assert v["projector"] == "64 -> 512" and v["hub_ids"][CLIP_HUB_ID].startswith("MISSING")
    assert [f.cause for f in a.findings if CLIP_HUB_ID in f.message] == ["config_mismatch"]
    assert any(r["item"] == "vision path" for r in a.table)
    assert any("safetensors headers" in r for r in a.model_read)


def test_audit_of_the_vl_fixture_with_its_cache(vl, provided):
    a = _audit(vl)
    assert a.status == "OK" and not a.findings, a.summary()
    assert a.vision_path["hub_ids"][CLIP_HUB_ID].startswith("provided at")


def test_audit_reports_4khd_scales_from_the_code(fixture_models):
    a = _audit(fixture_models["xcomposer2-4khd-tiny"])
    assert a.ok, a.summary()
    assert a.model_linears["attention.wqkv"] == {"rank": 8, "scale": 2.0, "layers": 3}
    assert a.model_linears["attention.wo"] == {"rank": 256, "scale": 1.0, "layers": 3}
    # 4KHD merges 2x2 patches per row: the projector takes 4x the ViT width, a 336-px tile gives 144 rows
    assert a.vision_path["merge"] == 4 and a.vision_path["rows_per_image"] // a.vision_path["merge"] == 144


def test_an_audit_that_cannot_read_the_code_is_incomplete_never_ok(vl, tmp_path, capsys):
    """Fault: the model class names a decoder-layer class its code does not define."""
    from parity.cli import main

    broken = _copy(vl, tmp_path / "vl-no-layer-class")
    code = (broken / "modeling_internlm_xcomposer2.py").read_text()
    assert code.count('_no_split_modules = ["InternLM2DecoderLayer"]') == 1
    (broken / "modeling_internlm_xcomposer2.py").write_text(
        code.replace('_no_split_modules = ["InternLM2DecoderLayer"]', '_no_split_modules = ["NoSuchLayer"]'))
    a = _audit(broken)
    assert a.status == "INCOMPLETE" and not a.ok and a.exit_code == 2
    assert any("NoSuchLayer" in why for why in a.incomplete)
    capsys.readouterr()
    assert main(["audit", str(broken), "--trust-remote-code"]) == 2
    out = capsys.readouterr().out
    assert ": INCOMPLETE" in out and "cannot say OK" in out and ": OK" not in out


def test_an_audit_without_readable_weights_is_incomplete(vl, tmp_path):
    """Fault: a shard's header is garbage."""
    broken = _copy(vl, tmp_path / "vl-bad-shard")
    (broken / "model-00002-of-00002.safetensors").write_bytes(b"\xff" * 64)
    a = _audit(broken)
    assert a.status == "INCOMPLETE" and any("model-00002-of-00002.safetensors" in w for w in a.incomplete)


def test_audit_finds_a_rank_the_code_and_checkpoint_disagree_on(vl, tmp_path):
    """Fault: the code builds feed_forward.w3 with rank 128 while the checkpoint holds 256."""
    broken = _copy(vl, tmp_path / "vl-rank")
    cfg = json.loads((broken / "config.json").read_text())
    cfg["plora_config"] = {"feed_forward.w3": {"r": 128, "alpha": 128}}
    (broken / "config.json").write_text(json.dumps(cfg))
    a = _audit(broken)
    assert a.status == "PROBLEMS" and a.exit_code == 1
    bad = [f for f in a.findings if f.cause == "lora_rank_mismatch" and "disagree" in f.message]
    assert bad and (bad[0].layer, bad[0].module, bad[0].positions) == (0, "feed_forward.w3", "image")


def test_audit_finds_img_size_against_the_position_table(vl, tmp_path):
    """Fault: config.json's img_size does not fit the resized position table."""
    broken = _copy(vl, tmp_path / "vl-img-size")
    cfg = json.loads((broken / "config.json").read_text())
    cfg["img_size"] = 448
    (broken / "config.json").write_text(json.dumps(cfg))
    a = _audit(broken)
    assert a.status == "PROBLEMS"
    assert any(f.cause == "config_mismatch" and "448" in f.message and "490 px" in f.message for f in a.findings)


def test_unmerged_task_loras_are_a_finding(fixture_models, tmp_path):
    """XComposer2.5 task LoRAs (lora_web / lora_sft / lora_dpo) left in the checkpoint: the engine ignores them."""
    from safetensors.torch import load_file, save_file

    folder = _copy(fixture_models["xcomposer2-tiny"], tmp_path / "with-task-loras")
    tensors = load_file(folder / "model.safetensors")
    for name in [n for n in tensors if n.endswith(".Plora_A.weight")]:
        stem = name[: -len(".Plora_A.weight")]
        for task in ("lora_web", "lora_sft"):
            tensors[f"{stem}.{task}_A.weight"] = torch.zeros(4, tensors[name].shape[1], dtype=torch.bfloat16)
            tensors[f"{stem}.{task}_B.weight"] = torch.zeros(tensors[f"{stem}.Plora_B.weight"].shape[0], 4,
                                                             dtype=torch.bfloat16)
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    a = _audit(folder)
    assert a.task_loras == {"lora_web": 15, "lora_sft": 15}
    f = [f for f in a.findings if f.cause == "lora_not_applied"]
    assert len(f) == 1 and f[0].severity == "warning"
    assert "merge_xcomposer2d5_task.py" in f[0].message and "web" in f[0].message and "write" in f[0].message


def test_low_memory_loading_runs_the_hub_tower_too(vl, vl_ref, provided):
    """The low-memory loader builds the model with parameters on meta: the nested hub download and resize_pos
    still work, and the features are the same."""
    from parity.reference.loader import load_reference

    low = load_reference(vl, trust_remote_code=True, low_memory=True)
    assert low.applied == vl_ref.applied
    assert torch.equal(low.encode_image(IMAGE), vl_ref.encode_image(IMAGE))


def test_parity_builds_the_rows_the_models_own_chat_builds(vl_ref):
    """bos_policy every_text is what the 7b / vl-7b chat does: the embeddings and image mask parity prepares
    equal the model's own `interleav_wrap_chat` for the same prompt and image."""
    from parity.inputs import prepare
    from parity.records import CanonicalInput, Segment

    meta = "You are a helpful assistant."
    query = "<ImageHere>Describe the image."
    feats = vl_ref.encode_image(IMAGE)
    with torch.no_grad():
        inputs, im_mask = vl_ref.model.interleav_wrap_chat(vl_ref.tokenizer, query, feats[None], [], meta)
    before = f"[UNUSED_TOKEN_146]system\n{meta}[UNUSED_TOKEN_145]\n[UNUSED_TOKEN_146]user\n"
    after = "Describe the image.[UNUSED_TOKEN_145]\n[UNUSED_TOKEN_146]assistant\n"
    case = CanonicalInput("chat", (Segment("text", text=before), Segment("image", image=IMAGE),
                                   Segment("text", text=after)), bos_policy="every_text")
    p = prepare(case, vl_ref.tokenize, vl_ref.embed_tokens, vl_ref.encode_image, vl_ref.bos_id, vl_ref.decode)
    assert torch.equal(p.image_rows, im_mask[0].cpu())
    assert torch.equal(p.embeddings, inputs["inputs_embeds"][0].float().cpu())
    assert int(p.bos_rows.sum()) == 2  # a BOS before each text part, also the one after the image


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(sizes=st.lists(st.integers(1, 40), min_size=1, max_size=12), shards=st.integers(1, 5))
def test_sharded_weights_hold_every_tensor_once(sizes, shards):
    """Property: the shards and their index cover every tensor exactly once, in name order, none empty."""
    from safetensors.torch import load

    from parity.fixtures.generator import weight_files

    tensors = {f"t{i:02d}": torch.arange(n, dtype=torch.float32) + i for i, n in enumerate(sizes)}
    if shards > len(tensors):
        with pytest.raises(ValueError, match="at least one"):
            weight_files(tensors, shards)
        return
    files = weight_files(tensors, shards)
    if shards == 1:
        assert set(files) == {"model.safetensors"}
        assert load(files["model.safetensors"]).keys() == tensors.keys()
        return
    index = json.loads(files.pop("model.safetensors.index.json"))
    assert set(index["weight_map"]) == set(tensors)
    assert index["metadata"]["total_size"] == sum(t.numel() * 4 for t in tensors.values())
    seen = {}
    for fname, data in files.items():
        part = load(data)
        assert part, f"{fname} is empty"
        for name, t in part.items():
            assert name not in seen and index["weight_map"][name] == fname
            seen[name] = t
    assert set(seen) == set(tensors) and all(torch.equal(seen[k], tensors[k]) for k in tensors)
    order = [n for f in sorted(files) for n in sorted(load(files[f]))]
    assert order == sorted(tensors)
