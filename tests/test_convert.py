"""lmdeploy's real converter run in-process on CPU (parity.deploy.convert / compat)."""

from __future__ import annotations

import json
import logging
import os
import shutil
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from parity.deploy.compat import cpu_converter_patches, installed_lmdeploy_version, stub_active
from parity.deploy.convert import LOG_NAME, cache_key, convert, convert_cached
from parity.deploy.lora_config import lora_config_for
from parity.names import TM_LINEARS
from parity.deploy.workspace import RECORD_NAME, Workspace
from parity.errors import ParityInputError
from parity.records import ConversionRecord

LORA_7B = {"lora_policy": "plora", "lora_r": 256, "lora_scale": 1.0, "lora_max_wo_r": 256,
           "lora_rank_pattern": "", "lora_scale_pattern": ""}
LORA_4KHD = {"lora_policy": "plora", "lora_r": 256, "lora_scale": 1.0, "lora_max_wo_r": 256,
             "lora_rank_pattern": "attention.w_qkv:8,attention.wo:256",
             "lora_scale_pattern": "attention.w_qkv:2.0,attention.wo:1.0"}
SUB = {"xcomposer2-tiny": ("7b", LORA_7B), "xcomposer2-4khd-tiny": ("4khd", LORA_4KHD)}


@pytest.fixture(scope="module")
def out_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("convert")


@pytest.fixture(scope="module")
def converted(fixture_models, out_root) -> dict[tuple[str, int], tuple[Path, ConversionRecord, float]]:
    """Fresh conversions of both fixtures at tp 1 and 2 (name, tp) -> (workspace, record, seconds)."""
    out = {}
    for name, path in fixture_models.items():
        for tp in (1, 2):
            ws = out_root / f"{name}-tp{tp}"
            t0 = time.perf_counter()
            rec = convert(path, ws, tp=tp)
            out[(name, tp)] = (ws, rec, time.perf_counter() - t0)
    return out


def _one_paragraph(e: BaseException) -> str:
    msg = str(e)
    assert msg and "\n" not in msg and "Traceback" not in msg
    return msg


def _no_leftovers(parent: Path):
    assert not [p.name for p in parent.iterdir() if ".converting." in p.name or ".old." in p.name]


# ----------------------------------------------------------------------------- records


@pytest.mark.parametrize("tp", [1, 2])
@pytest.mark.parametrize("name", ["xcomposer2-tiny", "xcomposer2-4khd-tiny"])
def test_record_says_what_lmdeploy_chose(converted, fixture_models, name, tp):
    ws_dir, rec, _ = converted[(name, tp)]
    sub, lora = SUB[name]
    assert rec.sub_type == sub
    assert rec.lora_config == lora
    assert rec.lmdeploy_version == installed_lmdeploy_version() == "0.7.1"
    assert rec.tp == tp and rec.warnings == []
    assert rec.model == str(fixture_models[name].resolve()) and rec.workspace == str(ws_dir.resolve())
    on_disk = json.loads((ws_dir / RECORD_NAME).read_text())
    assert ConversionRecord(**on_disk) == rec
    ws = Workspace.open(ws_dir)
    assert ws.conversion_record() == rec
    assert ws.lora.to_dict() == lora
    assert ws.model.tp == tp and ws.model.model_arch == "InternLMXComposer2ForCausalLM"
    assert ws.names() == ws.expected_names()
    log = (ws_dir / LOG_NAME).read_text()
    assert "Convert to turbomind format" in log and "create workspace" in log
    _no_leftovers(ws_dir.parent)


@pytest.mark.parametrize("name", ["xcomposer2-tiny", "xcomposer2-4khd-tiny"])
def test_tp2_merges_back_to_tp1_exactly(converted, name):
    a, b = Workspace.open(converted[(name, 1)][0]), Workspace.open(converted[(name, 2)][0])
    assert a.names() == b.names()
    assert b.model.kv_head_num == a.model.kv_head_num == 2  # no kv replication for these fixtures
    for n in a.names():
        x, y = a.tensor(n), b.tensor(n)
        assert x.dtype == y.dtype == torch.bfloat16
        assert torch.equal(x.view(torch.int16), y.view(torch.int16)), n


def test_conversion_is_quiet_and_restores_the_process(fixture_models, tmp_path, capfd):
    had_stub = "_turbomind" in sys.modules
    cuda = torch.Tensor.cuda
    bf16 = torch.cuda.is_bf16_supported
    root = logging.getLogger()
    levels = [(h, h.level) for h in root.handlers]
    capfd.readouterr()
    convert(fixture_models["xcomposer2-tiny"], tmp_path / "ws")
    out, err = capfd.readouterr()
    assert out == "" and err == ""
    assert torch.Tensor.cuda is cuda and torch.cuda.is_bf16_supported is bf16
    assert ("_turbomind" in sys.modules) == had_stub
    import lmdeploy.utils

    assert lmdeploy.utils.is_bf16_supported is not None
    assert lmdeploy.utils.is_bf16_supported.__module__ == "lmdeploy.utils"
    conv = sys.modules["lmdeploy.turbomind.deploy.converter"]
    assert conv.is_bf16_supported is lmdeploy.utils.is_bf16_supported
    assert [(h, h.level) for h in root.handlers] == levels


def test_patches_only_inside_the_context():
    cuda = torch.Tensor.cuda
    with cpu_converter_patches() as applied:
        assert applied is (not torch.cuda.is_available())
        if applied:
            t = torch.zeros(1)
            assert t.cuda() is t
            import lmdeploy.utils

            assert lmdeploy.utils.is_bf16_supported() is True
            assert stub_active()
    assert torch.Tensor.cuda is cuda


def test_conversion_time_is_small(converted):
    # the tiny fixtures convert in well under a few seconds each on CPU (first one pays lmdeploy's imports)
    times = sorted(t for _, _, t in converted.values())
    assert times[0] < 10


# ----------------------------------------------------------------------------- 4KHD trap


def test_4khd_trap_is_detected(fixture_models, tmp_path):
    src = fixture_models["xcomposer2-4khd-tiny"]
    broken = tmp_path / "broken-4khd-model"
    shutil.copytree(src, broken)
    ixc = broken / "ixc_utils.py"
    ixc.write_text("import parity_no_such_module_xyz  # noqa: F401\n" + ixc.read_text())
    rec = convert(broken, tmp_path / "ws")
    assert rec.sub_type == "7b"
    assert rec.lora_config == LORA_7B  # the 4KHD rank/scale patterns were not used
    assert len(rec.warnings) == 1
    w = rec.warnings[0]
    assert "4KHD trap" in w and "HD_transform" in w and "NOT used" in w
    assert "parity_no_such_module_xyz" in w and "Error" in w
    assert "attention.w_qkv:8" in w
    assert Workspace.open(tmp_path / "ws").conversion_record().warnings == rec.warnings


def test_7b_without_ixc_utils_has_no_trap_warning(converted):
    assert converted[("xcomposer2-tiny", 1)][1].warnings == []


# ----------------------------------------------------------------------------- lora_config override


def test_lora_override_is_written(fixture_models, tmp_path):
    override = {"lora_scale": 0.5, "lora_scale_pattern": r"attention\.wo:2.0"}
    rec = convert(fixture_models["xcomposer2-tiny"], tmp_path / "ws", lora_config=override)
    assert rec.lora_config == {**LORA_7B, **override}
    ws = Workspace.open(tmp_path / "ws")
    assert ws.lora_rank(0, "attention.wo") == (256, 2.0)
    assert ws.lora_rank(2, "feed_forward.w1") == (256, 0.5)
    cfg = yaml.safe_load((ws.weights_dir / "config.yaml").read_text())
    assert cfg["lora_config"] == rec.lora_config


def test_lora_override_from_lora_config_for(fixture_models, tmp_path):
    ranks = {(i, lin): (256, 0.25 if lin == "feed_forward.w2" else 1.0) for i in range(3) for lin in TM_LINEARS}
    rec = convert(fixture_models["xcomposer2-tiny"], tmp_path / "ws", lora_config=lora_config_for(ranks))
    ws = Workspace.open(tmp_path / "ws")
    assert {k: ws.lora_rank(*k) for k in ranks} == ranks
    assert ws.names() == ws.expected_names()
    assert rec.lora_config["lora_scale_pattern"] == r"feed_forward\.w2:0.25"


def test_lora_override_off(fixture_models, tmp_path):
    rec = convert(fixture_models["xcomposer2-tiny"], tmp_path / "ws", lora_config={"lora_policy": "", "lora_r": 0})
    ws = Workspace.open(tmp_path / "ws")
    assert rec.lora_config["lora_policy"] == ""
    assert not any("lora" in n for n in ws.expected_names())
    assert any("lora" in n for n in ws.names())  # the converter still writes the Plora tensors


@pytest.mark.parametrize("bad", [{"lora_rank": 8}, {"lora_r": "8"}, {"lora_rank_pattern": "a:b"}, ["lora_r"]])
def test_bad_lora_override(fixture_models, tmp_path, bad):
    with pytest.raises(ParityInputError) as e:
        convert(fixture_models["xcomposer2-tiny"], tmp_path / "ws", lora_config=bad)
    assert "lora" in _one_paragraph(e.value)
    assert not (tmp_path / "ws").exists()


# ----------------------------------------------------------------------------- bad inputs and atomicity


def _copy_model(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_missing_folder(tmp_path):
    with pytest.raises(ParityInputError) as e:
        convert(tmp_path / "nope", tmp_path / "ws")
    assert str(tmp_path / "nope") in _one_paragraph(e.value)
    _no_leftovers(tmp_path)


def test_no_config_json(fixture_models, tmp_path):
    md = _copy_model(fixture_models["xcomposer2-tiny"], tmp_path / "m")
    (md / "config.json").unlink()
    with pytest.raises(ParityInputError) as e:
        convert(md, tmp_path / "ws")
    assert "config.json" in _one_paragraph(e.value)
    (md / "config.json").write_text("{broken")
    with pytest.raises(ParityInputError) as e:
        convert(md, tmp_path / "ws")
    assert "not valid JSON" in _one_paragraph(e.value)
    assert not (tmp_path / "ws").exists()


def test_unsupported_architecture(fixture_models, tmp_path):
    md = _copy_model(fixture_models["xcomposer2-tiny"], tmp_path / "m")
    cfg = json.loads((md / "config.json").read_text())
    cfg["architectures"] = ["GPT2LMHeadModel"]
    cfg.pop("auto_map")
    (md / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ParityInputError) as e:
        convert(md, tmp_path / "ws")
    msg = _one_paragraph(e.value)
    assert "GPT2LMHeadModel" in msg and "InternLMXComposer2ForCausalLM" in msg


def test_model_path_is_a_file_or_has_no_weights(fixture_models, tmp_path):
    with pytest.raises(ParityInputError) as e:
        convert(fixture_models["xcomposer2-tiny"] / "config.json", tmp_path / "ws")
    assert "is a file" in _one_paragraph(e.value)
    md = _copy_model(fixture_models["xcomposer2-tiny"], tmp_path / "m")
    (md / "model.safetensors").unlink()
    with pytest.raises(ParityInputError) as e:
        convert(md, tmp_path / "ws")
    assert "no weight files" in _one_paragraph(e.value)


@pytest.mark.parametrize("tp", [3, 0, -2])
def test_tp_not_power_of_two(fixture_models, tmp_path, tp):
    with pytest.raises(ParityInputError) as e:
        convert(fixture_models["xcomposer2-tiny"], tmp_path / "ws", tp=tp)
    assert "tp=" in _one_paragraph(e.value)


def test_converter_assertion_is_an_input_error_and_keeps_the_old_workspace(converted, fixture_models, tmp_path):
    # a good workspace at the destination, then a conversion that fails inside lmdeploy (head_num 4 % tp 8)
    ws = tmp_path / "ws"
    shutil.copytree(converted[("xcomposer2-tiny", 1)][0], ws)
    before = sorted(p.name for p in (ws / "triton_models" / "weights").iterdir())
    with pytest.raises(ParityInputError) as e:
        convert(fixture_models["xcomposer2-tiny"], ws, tp=8)
    msg = _one_paragraph(e.value)
    assert "converter failed" in msg and "assertion" in msg
    assert sorted(p.name for p in (ws / "triton_models" / "weights").iterdir()) == before
    Workspace.open(ws).tensor("layers.0.attention.w_qkv.weight")
    _no_leftovers(tmp_path)


def test_missing_tensor_is_an_input_error(fixture_models, tmp_path):
    md = _copy_model(fixture_models["xcomposer2-tiny"], tmp_path / "m")
    sd = load_file(str(md / "model.safetensors"))
    del sd["model.layers.1.attention.wo.Plora_A.weight"]
    save_file(sd, str(md / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ParityInputError) as e:
        convert(md, tmp_path / "ws")
    assert "converter failed" in _one_paragraph(e.value)
    assert not (tmp_path / "ws").exists()
    _no_leftovers(tmp_path)


def test_reconversion_replaces_the_workspace(fixture_models, tmp_path):
    ws = tmp_path / "ws"
    convert(fixture_models["xcomposer2-tiny"], ws)
    (ws / "marker").write_text("old")
    rec = convert(fixture_models["xcomposer2-4khd-tiny"], ws)
    assert not (ws / "marker").exists()
    assert Workspace.open(ws).conversion_record() == rec and rec.sub_type == "4khd"
    _no_leftovers(tmp_path)


# ----------------------------------------------------------------------------- cache


def test_convert_cached(fixture_models, tmp_path):
    md = _copy_model(fixture_models["xcomposer2-tiny"], tmp_path / "m")
    cache = tmp_path / "cache"
    a = convert_cached(md, cache)
    stamp = (a / RECORD_NAME).stat().st_mtime_ns
    assert convert_cached(md, cache) == a
    assert (a / RECORD_NAME).stat().st_mtime_ns == stamp  # not converted again
    b = convert_cached(md, cache, tp=2)
    c = convert_cached(md, cache, lora_config={"lora_scale": 2.0})
    assert len({a, b, c}) == 3
    assert Workspace.open(b).model.tp == 2 and Workspace.open(c).lora.lora_scale == 2.0
    # a changed model file gives a new key; the stale entry for the same (model, tp, lora) is pruned
    key = cache_key(md)
    st = (md / "model.safetensors").stat()
    os.utime(md / "model.safetensors", ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert cache_key(md) != key
    d = convert_cached(md, cache)
    assert d != a and d.is_dir() and not a.exists() and b.exists() and c.exists()


# ----------------------------------------------------------------------------- version semantics in the record


def test_silent_release_ranges_warn(fixture_models, tmp_path, monkeypatch):
    import parity.deploy.convert as conv

    monkeypatch.setattr(conv, "installed_lmdeploy_version", lambda: "0.8.0")
    rec = convert(fixture_models["xcomposer2-tiny"], tmp_path / "ws")
    assert rec.lmdeploy_version == "0.8.0"
    assert len(rec.warnings) == 1 and "0.8.0" in rec.warnings[0] and "silently" in rec.warnings[0]


def test_release_without_xcomposer2_is_refused_before_converting(fixture_models, tmp_path, monkeypatch):
    import parity.deploy.convert as conv

    monkeypatch.setattr(conv, "installed_lmdeploy_version", lambda: "0.14.0")
    with pytest.raises(ParityInputError) as e:
        convert(fixture_models["xcomposer2-tiny"], tmp_path / "ws")
    assert "0.14.0" in _one_paragraph(e.value)
    assert not (tmp_path / "ws").exists()


def test_a_conversion_killed_outright_is_cleaned_by_the_next_one(fixture_models, tmp_path):
    """SIGKILL inside lmdeploy's converter leaves its temp folder; the next convert_cached of the entry (under
    the entry's lock) removes it and converts."""
    import signal
    import subprocess

    md, cache = fixture_models["xcomposer2-tiny"], tmp_path / "cache"
    killed = subprocess.run([sys.executable, "-c", (
        "import os, signal, sys\n"
        "import parity.deploy.convert as c\n"
        "def dies(main, model_dir, dst, *a):\n"
        "    (dst / 'triton_models').mkdir(parents=True)\n"
        "    os.kill(os.getpid(), signal.SIGKILL)\n"
        "c._call_main = dies\n"
        "c.convert_cached(sys.argv[1], sys.argv[2])\n"), str(md), str(cache)],
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
    assert killed.returncode == -signal.SIGKILL
    assert [p for p in cache.iterdir() if ".converting." in p.name]  # what the kill left
    ws = convert_cached(md, cache)
    assert Workspace.open(ws).model.num_layer > 0
    assert sorted(p.name for p in cache.iterdir()) == sorted([ws.name, f".{ws.name}.lock"])
