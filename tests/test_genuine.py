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

    monkeypatch.delenv(modelcode.PROVIDED_ENV, raising=False)
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
