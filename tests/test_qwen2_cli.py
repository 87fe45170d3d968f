"""The Qwen2 user's deployment through the command line alone (issue 19): `parity disguise` -> `parity convert`
(or lmdeploy's own CLI via `parity lmdeploy --`) -> `parity run`, with the q/k/v biases carried by lmdeploy's
real converter; fp32 and emulate, tp 1 and 2."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from parity.cli import main
from parity.deploy.workspace import Workspace
from parity.disguise import read_lora_config
from parity.fixtures import QWEN2_FIXTURE_NAMES, ensure

REPO = Path(__file__).resolve().parents[1]
FIXTURE_CACHE = REPO / ".cache" / "fixtures"


@pytest.fixture(scope="module")
def original() -> Path:
    return ensure(FIXTURE_CACHE, QWEN2_FIXTURE_NAMES)["qwen2-plora-tiny"]


@pytest.fixture(scope="module")
def disguise_dir(original, tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("cli") / "xc2"
    assert main(["disguise", str(original), str(d)]) == 0
    return d


def _parity(*argv: str) -> subprocess.CompletedProcess:
    """The `parity` command in its own process (lmdeploy's logger binds the process's streams)."""
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.run([sys.executable, "-m", "parity.cli", *argv], capture_output=True, text=True, env=env,
                          timeout=600)


def _report(out: Path) -> dict:
    return json.loads((out / "report.json").read_text())


def _errors(report: dict) -> list:
    return [f for f in report["findings"] if f["severity"] == "error"]


@pytest.mark.parametrize("tp", [1, 2])
@pytest.mark.parametrize("numeric", ["fp32", "emulate"])
def test_disguise_convert_run_passes(original, disguise_dir, tmp_path, tp, numeric, capsys):
    ws = tmp_path / "ws"
    assert main(["convert", str(disguise_dir), "--out", str(ws), "--tp", str(tp)]) == 0
    assert "attn_bias 1" in capsys.readouterr().out
    w = Workspace.open(ws)
    assert w.model.attn_bias == 1 and w.lora.to_dict() == read_lora_config(disguise_dir)
    out = tmp_path / "report"
    rc = main(["run", str(original), "--trust-remote-code", "--workspace", str(ws), "--numeric", numeric,
               "--out", str(out), "--cache-dir", str(tmp_path / "cache")])
    report = _report(out)
    assert rc == 0 and report["status"] == "pass", [f["message"] for f in _errors(report)]
    assert _errors(report) == []
    assert {r["tensor"]: r["status"] for r in report["weights_audit"]}["layers.1.attention.w_qkv.bias"] == "ok"


def test_decode_with_biases_passes(original, disguise_dir, tmp_path):
    """Generated steps too: the replay decoder adds the q/k/v biases to each new row before the rotary, as
    TurboMind's decode kernel does (emulate: bf16 KV cache)."""
    ws = tmp_path / "ws"
    assert main(["convert", str(disguise_dir), "--out", str(ws)]) == 0
    out = tmp_path / "report"
    rc = main(["run", str(original), "--trust-remote-code", "--workspace", str(ws), "--decode", "3",
               "--numeric", "emulate", "--out", str(out), "--cache-dir", str(tmp_path / "cache")])
    report = _report(out)
    assert rc == 0 and _errors(report) == [], [f["message"] for f in _errors(report)]
    assert report["decode"] and all(d["steps_run"] == 3 and d["first_divergent_step"] is None for d in report["decode"])


def test_parity_lmdeploy_runs_lmdeploys_own_convert_with_the_registration(original, disguise_dir, tmp_path):
    """The real `parity` entry point, lmdeploy's own `convert` subcommand: the same bytes as `parity convert`,
    and the run passes on it."""
    ws = tmp_path / "ws-lmdeploy"
    proc = _parity("lmdeploy", "--", "convert", "internlm-xcomposer2", str(disguise_dir), "--dst-path", str(ws),
                   "--tp", "2")
    assert proc.returncode == 0, proc.stderr[-2000:]
    ours = tmp_path / "ws-parity"
    assert main(["convert", str(disguise_dir), "--out", str(ours), "--tp", "2"]) == 0
    theirs = ws / "triton_models" / "weights"
    names = sorted(p.name for p in theirs.iterdir() if p.name != "config.yaml")
    assert "layers.0.attention.w_qkv.1.bias" in names
    assert names == sorted(p.name for p in (ours / "triton_models" / "weights").iterdir()
                           if p.name not in ("config.yaml",))
    assert all((theirs / n).read_bytes() == (ours / "triton_models" / "weights" / n).read_bytes() for n in names)
    a, b = Workspace.open(ws), Workspace.open(ours)
    assert a.lora.to_dict() == b.lora.to_dict() and a.model.attn_bias == b.model.attn_bias == 1
    out = tmp_path / "report"
    assert main(["run", str(original), "--trust-remote-code", "--workspace", str(ws), "--out", str(out),
                 "--cache-dir", str(tmp_path / "cache")]) == 0


def test_plain_lmdeploy_settings_are_named(original, disguise_dir, tmp_path):
    """`parity convert --lmdeploy-defaults` writes what lmdeploy does alone: exit 1, the biases named as dropped."""
    ws = tmp_path / "ws"
    assert main(["convert", str(disguise_dir), "--out", str(ws), "--lmdeploy-defaults"]) == 0
    assert Workspace.open(ws).model.attn_bias == 0
    out = tmp_path / "report"
    rc = main(["run", str(original), "--trust-remote-code", "--workspace", str(ws), "--out", str(out),
               "--cache-dir", str(tmp_path / "cache")])
    causes = {f["cause"] for f in _errors(_report(out))}
    assert rc == 1 and {"bias_dropped", "lora_rank_mismatch"} <= causes


def test_run_converts_the_original_itself(original, tmp_path):
    """`parity run ORIGINAL` without --workspace: disguise and conversion (with biases) in the cache."""
    out = tmp_path / "report"
    assert main(["run", str(original), "--trust-remote-code", "--out", str(out),
                 "--cache-dir", str(tmp_path / "cache")]) == 0
    assert _errors(_report(out)) == []


def test_parity_lmdeploy_dispatches_to_lmdeploys_subcommands():
    proc = _parity("lmdeploy", "--", "serve", "api_server", "--help")
    assert proc.returncode == 0 and "usage: lmdeploy serve api_server" in proc.stdout


def test_parity_lmdeploy_bad_input(disguise_dir, tmp_path, capsys):
    assert main(["lmdeploy"]) == 2
    assert "after --" in capsys.readouterr().err
    broken = tmp_path / "broken"
    broken.mkdir()
    for p in disguise_dir.iterdir():
        (broken / p.name).write_bytes(p.read_bytes())
    (broken / "parity_lora_config.json").write_text("{not json")
    proc = _parity("lmdeploy", "--", "convert", "internlm-xcomposer2", str(broken), "--dst-path", str(tmp_path / "ws"))
    assert proc.returncode == 2 and "parity_lora_config.json" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "ws" / "triton_models" / "weights" / "config.yaml").exists()


def test_convert_refuses_kv_replication_with_plora(disguise_dir, tmp_path, capsys):
    """tp > kv heads: lmdeploy 0.7.1's kv replication cannot reshape a PLoRA B; refused with the reason."""
    ws = tmp_path / "ws"
    assert main(["convert", str(disguise_dir), "--out", str(ws), "--tp", "4"]) == 2
    err = capsys.readouterr().err
    assert "tp=4 is more than the 2 kv head(s)" in err and "_repeat_kv" in err and not ws.exists()


def test_serving_path_gets_the_verified_settings(disguise_dir):
    """What `lmdeploy serve` / `pipeline()` build TurboMind from (`TurboMind._from_hf` -> `get_tm_model`, the
    settings handed to the C++ engine): with the registration that `parity lmdeploy --` activates, the disguise's
    lora_config and attn_bias = 1; without it, lmdeploy's own (rank 256, biases dropped)."""
    from lmdeploy.messages import TurbomindEngineConfig

    from parity.deploy.compat import cpu_converter_patches
    from parity.deploy.lora_config import LORA_KEYS
    from parity.disguise import lora_config_registered

    with cpu_converter_patches():
        from lmdeploy.turbomind.deploy.converter import get_tm_model

        def settings() -> tuple[int, dict]:
            cfg = get_tm_model(str(disguise_dir), "m", "internlm-xcomposer2", TurbomindEngineConfig(tp=2)).tm_config
            return int(cfg.model_config.attn_bias), {k: getattr(cfg.lora_config, k) for k in LORA_KEYS}

        plain = settings()
        with lora_config_registered():
            served = settings()
    assert plain[0] == 0 and plain[1]["lora_r"] == 256
    assert served == (1, read_lora_config(disguise_dir))
