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
from parity.records import FaultHooks

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
                     if not torch.cuda.is_available() else "cpu", faults=FaultHooks(mutate_engine_call=spy), out=tmp_path / "out")
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


# ------------------------------------------------------------------------------------------- scripts/device_check.py


def _device_check():
    import importlib.util

    spec = importlib.util.spec_from_file_location("device_check", REPO / "scripts" / "device_check.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def cpu_report(fixture_models, tmp_path_factory):
    out = tmp_path_factory.mktemp("devreport")
    run(fixture_models["xcomposer2-tiny"], trust_remote_code=True, cache_dir=CACHE, out=out, measure_floor=True)
    return json.loads((out / "report.json").read_text())


def test_device_check_comparison_agrees_and_names_each_disagreement(cpu_report):
    import copy

    dc = _device_check()
    same = dc.compare_reports(cpu_report, copy.deepcopy(cpu_report))
    assert same["agree"] and same["worst_vs_floor"] == 0.0

    moved = copy.deepcopy(cpu_report)  # one point's error moved by twice the floor
    p = next(p for p in moved["layers"] if p["local"] and p["floor"] > 0)
    p["local"]["rel_l2"] += 2 * p["floor"]
    r = dc.compare_reports(cpu_report, moved)
    assert not r["agree"] and r["worst_vs_floor"] == pytest.approx(2.0, rel=1e-6)
    assert f"{p['case']}/{p['layer']}/{p['module']}/local" in r["problems"][0]

    within = copy.deepcopy(cpu_report)
    next(q for q in within["layers"] if q["local"] and q["floor"] > 0)["local"]["rel_l2"] += 0.5 * p["floor"]
    assert dc.compare_reports(cpu_report, within)["agree"]

    unmeasured = copy.deepcopy(cpu_report)  # floors not measured: judged within the threshold instead
    for q in unmeasured["layers"]:
        q["floor"] = None
    q = next(q for q in unmeasured["layers"] if q["local"])
    q["local"]["rel_l2"] += 0.5 * q["threshold"]
    assert dc.compare_reports(unmeasured, unmeasured)["agree"]
    assert dc.compare_reports(cpu_report, unmeasured)["agree"]
    q["local"]["rel_l2"] += q["threshold"]
    assert not dc.compare_reports(cpu_report, unmeasured)["agree"]

    failed = copy.deepcopy(cpu_report)
    failed["status"] = "fail"
    failed["first_divergence"] = {"layer": 1, "module": "feed_forward.w2", "positions": "image",
                                  "cause": "weight_mismatch", "case": "default"}
    failed["findings"].append({"severity": "error", "check": "weights", "cause": "weight_mismatch", "layer": 1,
                               "module": "feed_forward.w2", "case": "default"})
    problems = " | ".join(dc.compare_reports(cpu_report, failed)["problems"])
    assert "status cpu=pass gpu=fail" in problems and "first divergence" in problems
    assert "only on gpu" in problems and "weight_mismatch" in problems


def test_device_check_pack_and_foreign_binaries(tmp_path):
    import tarfile

    dc = _device_check()
    info = dc.pack(tmp_path / "pack", names=("shortuuid", "no-such-distribution"))
    assert info["missing"] == ["no-such-distribution"] and info["packed"]["shortuuid"]["files"] > 0
    with tarfile.open(tmp_path / "pack" / "deps.tar.gz") as tar:
        names = tar.getnames()
    assert "shortuuid/__init__.py" in names and any(n.endswith(".dist-info/METADATA") for n in names)
    assert not any("__pycache__" in n for n in names)
    with pytest.raises(SystemExit, match="over the"):
        dc.pack(tmp_path / "small", names=("shortuuid",), limit=100)
    assert not (tmp_path / "small" / "deps.tar.gz").exists()

    site = tmp_path / "site"
    for pkg, so in (("native311", "_x.cpython-311-x86_64-linux-gnu.so"), ("abi3pkg", "_y.abi3.so"),
                    ("pure", None)):
        (site / pkg).mkdir(parents=True)
        (site / pkg / "__init__.py").write_text("")
        if so:
            (site / pkg / so).write_bytes(b"")
        (site / f"{pkg}-1.0.dist-info").mkdir()
        (site / f"{pkg}-1.0.dist-info" / "RECORD").write_text(f"{pkg}/__init__.py,,\n")
    assert dc.drop_foreign_binaries(site, ".cpython-311-x86_64-linux-gnu.so") == []
    assert dc.drop_foreign_binaries(site, ".cpython-312-x86_64-linux-gnu.so") == ["native311"]
    assert sorted(p.name for p in site.iterdir()) == ["abi3pkg", "abi3pkg-1.0.dist-info", "pure",
                                                      "pure-1.0.dist-info"]


@needs_no_cuda
def test_device_check_without_cuda_is_exit_2(tmp_path, capsys):
    dc = _device_check()
    code = dc.main(["run", "--pack", str(tmp_path / "none"), "--out", str(tmp_path / "out")])
    assert code == 2 and "--device cuda" in capsys.readouterr().err


def test_converter_imports_on_a_cuda_machine_without_the_compiled_engine():
    """The device check brings lmdeploy's Python part only: on a CUDA machine (simulated in a child
    process) without lib/_turbomind*.so, the converter imports through the stand-in, which is removed
    afterwards."""
    import subprocess
    import sys

    code = (
        "import sys, torch\n"
        "torch.cuda.is_available = lambda: True\n"
        "from parity.deploy import compat\n"
        "compat._extension_installed = lambda: False\n"
        "with compat.cpu_converter_patches() as patched:\n"
        "    import lmdeploy.turbomind.deploy.converter as c\n"
        "    assert patched and sys.modules['_turbomind'].__parity_stub__\n"
        "    assert torch.Tensor.cuda.__name__ == 'cuda'  # only the stand-in: the GPU's own .cuda() stays\n"
        "assert '_turbomind' not in sys.modules\n"
        "print('ok', c.get_tm_model.__name__)\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "ok get_tm_model" in r.stdout, r.stderr[-2000:]
