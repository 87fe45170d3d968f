"""`--device` (parity/device.py): parsing, exit 2 without CUDA, TF32 off for the judged run, and the same code
path on CPU through the CLI, the API and the pytest plugin. The CUDA side runs in scripts/device_check.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from parity.api import run
from parity.cli import main
from parity.device import fp32_settings, judged_precision, resolve_device, supports_float64
from parity.errors import ParityInputError

REPO = Path(__file__).resolve().parents[1]
CACHE = REPO / ".cache"
needs_no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA GPU")


@pytest.mark.parametrize("spec", ["cpu", "CPU", " cpu ", None])
def test_cpu_specs(spec):
    p = resolve_device(spec)
    assert p.device == torch.device("cpu") and p.is_cpu and p.describe()["device"] == "cpu"


@pytest.mark.parametrize("spec", ["gpu", "cuda:", "cuda:x", "cpu:0", "auto:1", "", "cuda:0:1"])
def test_unknown_device_is_exit_2(spec):
    with pytest.raises(ParityInputError) as e:
        resolve_device(spec)
    msg = str(e.value)
    assert e.value.exit_code == 2 and "\n" not in msg and "cpu, cuda, cuda:N or auto" in msg


@needs_no_cuda
def test_auto_is_cpu_without_cuda():
    assert resolve_device("auto").device == torch.device("cpu")


@needs_no_cuda
@pytest.mark.parametrize("spec", ["cuda", "cuda:0", "cuda:3"])
def test_cuda_without_cuda_is_exit_2(spec):
    with pytest.raises(ParityInputError) as e:
        resolve_device(spec)
    msg = str(e.value)
    assert f"--device {spec}" in msg and "torch.cuda.is_available() is False" in msg and "--device cpu" in msg
    assert "\n" not in msg


@needs_no_cuda
def test_cli_device_cuda_exit_2_before_any_work(fixture_models, tmp_path, capsys):
    out = tmp_path / "out"
    code = main(["run", str(fixture_models["xcomposer2-tiny"]), "--trust-remote-code", "--device", "cuda",
                 "--out", str(out), "--cache-dir", str(tmp_path / "cache")])
    err = capsys.readouterr().err
    assert code == 2 and "--device cuda" in err and "Traceback" not in err
    assert not out.exists() and not (tmp_path / "cache").exists()  # nothing converted, nothing written


def test_float64_support():
    assert supports_float64(torch.device("cpu"))
    assert supports_float64(torch.device("cuda", 0))  # decided by device type; no GPU needed to ask
    assert not supports_float64(torch.device("mps"))


def test_judged_precision_turns_tf32_off_and_restores():
    torch.set_float32_matmul_precision("high")  # what a user may have set: TF32 on CUDA, reduced oneDNN matmul
    before = fp32_settings()
    assert "tf32" in before.values()
    try:
        with judged_precision():
            assert set(fp32_settings().values()) == {"ieee"}
        assert fp32_settings() == before
        with pytest.raises(RuntimeError), judged_precision():
            raise RuntimeError("restored on errors too")
        assert fp32_settings() == before
    finally:
        torch.set_float32_matmul_precision("highest")


def test_run_is_judged_in_full_float32_and_reports_its_device(fixture_models, tmp_path):
    """A user's TF32 setting does not leak into the judged run (checked mid-run, from a stage hook), comes
    back afterwards, and report.json says where the run computed."""
    seen = []

    def spy(name, call):
        seen.append(fp32_settings())
        return call

    torch.set_float32_matmul_precision("high")
    before = fp32_settings()
    try:
        report = run(fixture_models["xcomposer2-tiny"], trust_remote_code=True, cache_dir=CACHE, device="auto"
                     if not torch.cuda.is_available() else "cpu", mutate_engine_call=spy, out=tmp_path / "out")
        assert fp32_settings() == before
    finally:
        torch.set_float32_matmul_precision("highest")
    assert seen and all(set(s.values()) == {"ieee"} for s in seen)
    assert report.status == "pass" and report.errors() == []
    dev = json.loads((tmp_path / "out" / "report.json").read_text())["engine"]["device"]
    assert dev["device"] == "cpu" and dev["float64"] is True and dev["tf32"] is False


@needs_no_cuda
def test_pytest_plugin_device_option(pytester, fixture_models):
    """--parity-device reaches parity_run (here: a CUDA request on a machine without one is the exit-2
    error, raised before any model is loaded); an explicit device= wins over the option."""
    model = str(fixture_models["xcomposer2-tiny"])
    pytester.makepyfile(f"""
        import pytest
        from parity.errors import ParityInputError

        def test_option_reaches_run(parity_run):
            with pytest.raises(ParityInputError, match="--device cuda"):
                parity_run({model!r}, trust_remote_code=True)

        def test_explicit_device_wins(parity_run):
            with pytest.raises(ParityInputError, match="not a device parity runs on"):
                parity_run({model!r}, trust_remote_code=True, device="tpu")
    """)
    pytester.runpytest_subprocess("--parity-device", "cuda").assert_outcomes(passed=2)
