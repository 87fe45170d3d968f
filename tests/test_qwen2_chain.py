"""The whole chain for a Qwen2 PLoRA model: original (HF reference) -> disguise -> lmdeploy 0.7.1's real
converter -> replay of the workspace, compared by `parity run` (issue 6)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from parity.deploy.convert import convert
from parity.disguise import disguise, disguised_workspace, lmdeploy_vision_features, lora_config_registered, read_lora_config
from parity.fixtures import IMAGES_DIR, QWEN2_FIXTURE_NAMES, ensure
from parity.inputs import default_cases, hf_call, prepare
from parity.points import LAYER_POINTS, PLORA_LINEARS, PLORA_PARTS, plora_key
from parity.reference.capture import capture_reference
from parity.reference.loader import load_reference
from parity.reference.session import ReferenceSession

REPO = Path(__file__).resolve().parents[1]
FIXTURE_CACHE = REPO / ".cache" / "fixtures"
F32_EPS = torch.finfo(torch.float32).eps


@pytest.fixture(scope="module")
def qwen2_models() -> dict[str, Path]:
    return ensure(FIXTURE_CACHE, QWEN2_FIXTURE_NAMES)


@pytest.fixture(scope="module")
def chain(qwen2_models, tmp_path_factory) -> dict[str, dict[str, Path]]:
    """Per model: the disguise and its workspace, converted by lmdeploy with the emitted lora_config and biases (the
    biased one through the registry, as a serving process would; the other through `convert`, which reads the
    folder's settings itself)."""
    root = tmp_path_factory.mktemp("chain")
    out = {}
    for name in ("qwen2-plora-tiny", "qwen2-plora-nobias-tiny"):
        d = root / f"{name}-disguise"
        disguise(qwen2_models[name], d, quiet=True)
        ws = root / f"{name}-ws"
        if name == "qwen2-plora-tiny":
            with lora_config_registered(d):
                convert(d, ws)
        else:
            convert(d, ws)
        out[name] = {"disguise": d, "workspace": ws}
    return out


@pytest.fixture(scope="module")
def sessions(qwen2_models):
    s = {name: ReferenceSession(qwen2_models[name], trust_remote_code=True)
         for name in ("qwen2-plora-tiny", "qwen2-plora-nobias-tiny")}
    yield s
    for x in s.values():
        x.close()


@pytest.fixture
def pipeline():
    import parity.pipeline as pl

    return pl


def _run(pl, sessions, name, workspace):
    return pl.run_parity(pl.RunOptions(model=sessions[name].model, workspace=workspace, trust_remote_code=True,
                                       session=sessions[name]))


# ----------------------------------------------------------------------------- reference capture


def test_qwen2_capture_aligns_to_the_canonical_points(sessions, chain, tmp_path):
    """Captured from the original Qwen2 model, every canonical point equals the disguised XComposer2 model's."""
    ref = sessions["qwen2-plora-tiny"].ref
    assert ref.family == "qwen2-plora"
    fake = load_reference(chain["qwen2-plora-tiny"]["disguise"], trust_remote_code=True)
    assert fake.family == "xcomposer2"
    case = default_cases(sorted(IMAGES_DIR.glob("*.png"))[0])[0]
    p = prepare(case, ref.tokenize, ref.embed_tokens, ref.encode_image, ref.bos_id, ref.decode)
    call = hf_call(p)
    a = capture_reference(ref, call, tmp_path / "qwen2", "c", parts=PLORA_PARTS)  # input and base too
    b = capture_reference(fake, call, tmp_path / "xc2", "c", parts=PLORA_PARTS)
    image = p.image_rows
    for i in range(a.num_layers):
        va, vb = a.layer(i), b.layer(i)
        for point in LAYER_POINTS:
            rel = float((va[point] - vb[point]).norm() / va[point].norm())
            assert rel <= 32 * F32_EPS, (i, point, rel)
        for lin in PLORA_LINEARS:
            assert a.plora(i, lin) == b.plora(i, lin)
            for part in PLORA_PARTS:
                x, y = va[plora_key(lin, part)], vb[plora_key(lin, part)]
                assert x.shape == y.shape
                if part == "mask":
                    assert torch.equal(x, y) and torch.equal(x.bool(), image)
                else:
                    assert float((x - y).norm()) <= 32 * F32_EPS * float(x.norm()), (i, lin, part)
            delta = va[plora_key(lin, "delta")]
            assert torch.count_nonzero(delta[~image]) == 0 and delta[image].abs().sum() > 0
            torch.testing.assert_close(va[lin], va[plora_key(lin, "base")] + delta, rtol=1e-5, atol=1e-5)
        # the fused wqkv: what the engine resolves for it
        lin = ref.anatomy.linears[i]["attention.wqkv"]
        assert a.plora(i, "attention.wqkv") == {"rank": 16 + 16 + 8, "scale": 1.0}
        x = va[plora_key("attention.wqkv", "input")][image]
        torch.testing.assert_close(va[plora_key("attention.wqkv", "delta")][image],
                                   lin.module.Plora_B(lin.module.Plora_A(x)), rtol=1e-5, atol=1e-6)
    for point in ("norm", "output"):
        x, y = a.get(None, point), b.get(None, point)
        assert float((x - y).norm() / x.norm()) <= 32 * F32_EPS
    # weights under XComposer2 names: the disguised model's own state dict
    sd_a, sd_b = ref.xcomposer2_state_dict(), fake.model.state_dict()
    assert sd_a.keys() == sd_b.keys() and all(torch.equal(sd_a[k], sd_b[k]) for k in sd_a)


def test_other_architectures_are_still_refused(tmp_path, qwen2_models):
    import json
    import shutil

    from parity.errors import ParityInputError

    dst = tmp_path / "plain-qwen2"
    shutil.copytree(qwen2_models["qwen2-plora-nobias-tiny"], dst)
    cfg = json.loads((dst / "config.json").read_text())
    cfg["architectures"] = ["Qwen2ForCausalLM"]
    cfg.pop("auto_map")  # transformers' own Qwen2: no PLoRA
    (dst / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ParityInputError, match="InternLMXComposer2ForCausalLM"):
        load_reference(dst, trust_remote_code=True)


# ----------------------------------------------------------------------------- the chain verdicts


def test_chain_with_qkv_biases_passes(pipeline, sessions, chain):
    """The registration exports the q/k/v biases (attn_bias = 1): TurboMind's layout, checked bit for bit, and
    the replay adds them before the rotary embedding as TurboMind does."""
    report = _run(pipeline, sessions, "qwen2-plora-tiny", chain["qwen2-plora-tiny"]["workspace"])
    assert report.status == "pass", [f.message for f in report.errors()]
    assert report.errors() == [] and report.first_divergence is None
    audited = {r["tensor"]: r["status"] for r in report.weights_audit}
    assert audited["layers.0.attention.w_qkv.bias"] == "ok" and audited["layers.2.attention.wo.bias"] == "ok"
    assert all(s == "ok" for s in audited.values())
    assert all(r["ok"] for r in report.config_audit)
    worst = max(p.local["rel_l2"] for p in report.points if p.local)
    assert worst < 1e-5


def test_chain_with_qkv_biases_without_the_registration_fails_with_bias_dropped(pipeline, sessions, chain, tmp_path):
    """Converted as plain lmdeploy does (attn_bias 0) with the right LoRA settings: the biases alone are lost."""
    d = chain["qwen2-plora-tiny"]["disguise"]
    ws = tmp_path / "ws-nobias"
    rec = convert(d, ws, lora_config=read_lora_config(d), lmdeploy_defaults=True)
    assert rec.lora_config == read_lora_config(d)
    report = _run(pipeline, sessions, "qwen2-plora-tiny", ws)
    assert report.status == "fail"
    first = report.first_divergence
    assert (first.layer, first.module, first.cause) == (0, "attention.wqkv", "bias_dropped")
    errors = report.errors()
    assert {f.cause for f in errors} == {"bias_dropped"}
    hidden = [f for f in errors if f.check == "hidden"]
    measured = hidden[0].metrics["local_rel_l2"]
    assert hidden[0].layer == 0 and 0.05 < measured < 1.0          # the biases are ~0.3 on O(1) outputs
    assert f"local error {measured:.3g}" in first.message            # the report states the measured error
    assert {f.module for f in hidden} == {"attention.wqkv"}         # nothing else diverges (teacher-forced)
    assert any("parity convert" in f.message for f in errors if f.check == "config")  # and says what to do
    assert all(r["status"] == "ok" for r in report.weights_audit)
    assert [r["field"] for r in report.config_audit if not r["ok"]] == ["attn_bias"]
    rows = [r for r in report.plora_table if r["linear"] == "attention.wqkv"]
    assert rows and all((r["rank_ref"], r["scale_ref"]) == (40, 1.0) == (r["rank_eng"], r["scale_eng"]) for r in rows)


def test_chain_without_biases_passes_with_the_lora_config(pipeline, sessions, chain):
    report = _run(pipeline, sessions, "qwen2-plora-nobias-tiny", chain["qwen2-plora-nobias-tiny"]["workspace"])
    assert report.status == "pass", [f.message for f in report.errors()]
    assert report.errors() == [] and report.first_divergence is None
    assert all(r["status"] == "ok" for r in report.weights_audit)
    assert all(r["ok"] for r in report.config_audit)
    assert {(r["linear"], r["rank_ref"], r["scale_ref"]) for r in report.plora_table} == {
        ("attention.wqkv", 40, 1.0), ("attention.wo", 32, 1.0), ("feed_forward.w1", 64, 2.0),
        ("feed_forward.w3", 64, 2.0), ("feed_forward.w2", 32, 4.0)}
    worst = max(p.local["rel_l2"] for p in report.points if p.local)
    assert worst < 1e-5 and all(not p.exceeded for p in report.points)


def test_chain_without_the_lora_config_fails(pipeline, sessions, chain, tmp_path):
    """lmdeploy's hard-coded XComposer2-7b settings (rank 256; plain `lmdeploy convert`): TurboMind would refuse
    the workspace at load."""
    ws = tmp_path / "ws-default"
    rec = convert(chain["qwen2-plora-nobias-tiny"]["disguise"], ws, lmdeploy_defaults=True)
    assert rec.lora_config["lora_r"] == 256
    report = _run(pipeline, sessions, "qwen2-plora-nobias-tiny", ws)
    assert report.status == "fail"
    causes = {f.cause for f in report.errors()}
    assert "lora_rank_mismatch" in causes


def test_disguised_workspace_helper_is_cached(qwen2_models, tmp_path):
    ws, d, rec = disguised_workspace(qwen2_models["qwen2-plora-nobias-tiny"], tmp_path)
    from parity.deploy.workspace import Workspace

    assert Workspace.open(ws).lora.to_dict() == read_lora_config(d) == rec.lora_config
    mtime = (d / "model.safetensors").stat().st_mtime_ns
    ws2, d2, rec2 = disguised_workspace(qwen2_models["qwen2-plora-nobias-tiny"], tmp_path)
    assert (ws2, d2, rec2) == (ws, d, rec) and (d / "model.safetensors").stat().st_mtime_ns == mtime


# ----------------------------------------------------------------------------- vision


def test_lmdeploy_vision_path_matches_hf_encode_img(qwen2_models, chain):
    """lmdeploy's XComposer2 vision forward (float16, on the disguise) against the original model's encode_img."""
    from transformers import AutoModelForCausalLM

    images = sorted(IMAGES_DIR.glob("*.png"))
    feats = lmdeploy_vision_features(chain["qwen2-plora-tiny"]["disguise"], images, trust_remote_code=True)
    original = AutoModelForCausalLM.from_pretrained(str(qwen2_models["qwen2-plora-tiny"]), trust_remote_code=True,
                                                    dtype=torch.float32).eval()
    fake16 = AutoModelForCausalLM.from_pretrained(str(chain["qwen2-plora-tiny"]["disguise"]), trust_remote_code=True,
                                                  dtype=torch.float16).eval()
    hf = []
    with torch.no_grad():
        for image, f in zip(images, feats):
            h = original.encode_img(str(image))[0]
            hf.append(h)
            assert f.dtype == torch.float16 and f.shape == h.shape
            rel = float((f.float() - h).norm() / h.norm())
            assert rel < 4 * 2.0**-10, rel  # float16 (lmdeploy casts the vision part to half) vs float32
            # the same computation as the disguise's own code in float16, bit for bit
            assert torch.equal(f, fake16.encode_img(str(image))[0])
    # and the comparison can tell images apart
    assert float((feats[0].float() - hf[1]).norm() / hf[1].norm()) > 0.1
    assert math.isfinite(float(feats[0].float().sum()))
