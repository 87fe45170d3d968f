"""Parallel runs: `parity run --jobs N` / `parity.run(..., jobs=N)` give the single-process report, the
conversion cache is safe for concurrent processes, and the pytest plugin works under pytest-xdist."""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import pytest
import yaml

import parity.parallel as parallel
from parity.cli import main
from parity.fixtures import IMAGES_DIR
from parity.records import CaseSummary, FaultHooks, Finding, PointResult, Report

REPO = Path(__file__).resolve().parents[1]


def _images() -> list[Path]:
    return sorted(Path(IMAGES_DIR).glob("*.png"))


def _write_cases(path: Path, n: int) -> Path:
    imgs = _images()
    cases = [
        {"name": "one-image", "segments": [{"text": "Hello "}, {"image": str(imgs[0])}, {"text": " what is it?"}]},
        {"name": "text-only", "segments": [{"text": "Just text, one sentence about parity checks."}]},
        {"name": "two-images", "bos_policy": "every_text",
         "segments": [{"text": "One "}, {"image": str(imgs[1 % len(imgs)])}, {"text": " two "},
                      {"image": str(imgs[2 % len(imgs)])}, {"text": " what differs?"}]},
        {"name": "image-first", "segments": [{"image": str(imgs[0])}, {"text": " describe it"}]},
    ][:n]
    path.write_text(yaml.safe_dump({"cases": cases}))
    return path


def _without_timings(report: Report) -> dict:
    d = report.to_dict()
    d.pop("timings")
    return json.loads(json.dumps(d, default=str))


# ------------------------------------------------------------------------------------------ units


def test_split_cases_contiguous_balanced_and_clamped():
    assert parallel.split_cases(list("abcde"), 2) == [list("abc"), list("de")]
    assert parallel.split_cases(list("abc"), 8) == [["a"], ["b"], ["c"]]  # clamped to the cases
    assert parallel.split_cases(list("abcd"), 1) == [list("abcd")]
    chunks = parallel.split_cases(list(range(11)), 3)
    assert [len(c) for c in chunks] == [4, 4, 3] and sum(chunks, []) == list(range(11))


def test_worker_threads_share_the_cpus():
    assert parallel.worker_threads(2, cpus=16) == 8
    assert parallel.worker_threads(3, cpus=16) == 5
    assert parallel.worker_threads(4, cpus=2) == 1  # never zero


def _report(cases: list[str], findings: list[Finding], layers: int = 2) -> Report:
    points = [PointResult(case=c, layer=layer, module="layer", e2e={}, local={}, floor=0.0, threshold=1.0)
              for c in cases for layer in range(layers)]
    summaries = [CaseSummary(name=c, rows=1, bos_policy="first", image_spans=[], bos_rows=[0], row_labels=["x"],
                             hashes={}) for c in cases]
    return Report(status="pass", engine={"kind": "replay"}, model="m", workspace="w", findings=findings,
                  first_divergence=None, points=points, cases=summaries,
                  config_audit=[{"field": "head_num", "ok": True}], weights_audit=[{"tensor": "t"}],
                  plora_table=[{"case": c, "layer": 0} for c in cases],
                  timings={"reference": 1.0, "engine": 2.0, "total": 4.0})


def test_merge_reports_dedups_model_wide_findings_and_decides_again():
    warn = Finding(check="config", severity="warning", cause="config_mismatch", message="conversion warning")
    weights = Finding(check="weights", severity="error", cause="weight_mismatch", message="w", layer=1,
                      module="attention.wqkv", positions="all")
    late = Finding(check="hidden", severity="error", cause="numeric_drift", message="late", layer=1,
                   module="layer", positions="all", case="b")
    early = Finding(check="hidden", severity="error", cause="numeric_drift", message="early", layer=0,
                    module="layer", positions="all", case="c")
    a = _report(["a", "b"], [late, warn, weights])
    b = _report(["c"], [early, warn, weights])
    merged = parallel.merge_reports([a, b], ["a", "b", "c"], num_layers=2, wall=3.0, extra={"convert": 0.5})
    assert [f.message for f in merged.findings] == ["early", "w", "late", "conversion warning"]
    assert merged.status == "fail"
    assert merged.first_divergence.case == "c" and merged.first_divergence.layer == 0
    assert [p.case for p in merged.points] == ["a", "a", "b", "b", "c", "c"]
    assert [c.name for c in merged.cases] == ["a", "b", "c"]
    assert [r["case"] for r in merged.plora_table] == ["a", "b", "c"]
    assert merged.config_audit == a.config_audit and merged.weights_audit == a.weights_audit
    assert merged.timings == {"reference": 2.0, "engine": 4.0, "total": 3.0, "convert": 0.5}


def _sleep_or_fail(item):  # runs in a spawned worker (imported from this module by name)
    from parity.errors import ParityInputError

    if item == "fail":
        time.sleep(1.0)
        raise ParityInputError("worker says: bad input")
    time.sleep(float(item))
    return item


def test_a_failing_worker_stops_the_others():
    t = time.perf_counter()
    with pytest.raises(parallel.ParityInputError, match="worker says: bad input"):
        parallel._run_workers(["120", "fail"], threads=1, fn=_sleep_or_fail)
    assert time.perf_counter() - t < 60  # did not wait for the 120 s worker
    assert parallel._run_workers(["0", "0.1"], threads=1, fn=_sleep_or_fail) == ["0", "0.1"]


# ------------------------------------------------------------------------------------------ runs


@pytest.mark.slow
def test_jobs2_report_equals_jobs1(fixture_models, tmp_path, monkeypatch):
    """3 cases in 2 workers (2 + 1): the merged report is the one-process report, timings apart; the
    workers leave no temp folder behind."""
    from parity import run

    model = fixture_models["xcomposer2-tiny"]
    inputs = _write_cases(tmp_path / "cases.yaml", 3)
    cache = tmp_path / "cache"
    one = run(model, trust_remote_code=True, inputs=inputs, cache_dir=cache)

    tmp = tmp_path / "tmp"
    tmp.mkdir()
    monkeypatch.setenv("TMPDIR", str(tmp))  # the spawned workers' temp folders
    monkeypatch.setattr(tempfile, "tempdir", str(tmp))
    chunks = []
    real = parallel._run_workers

    def spy(work, threads):
        chunks.append([[c.name for c in w.cases] for w, _faults in work])
        assert all(w.workspace == work[0][0].workspace is not None for w, _faults in work)  # converted once, by the parent
        return real(work, threads)

    monkeypatch.setattr(parallel, "_run_workers", spy)
    t = time.perf_counter()
    two = run(model, trust_remote_code=True, inputs=inputs, cache_dir=cache, jobs=2, out=tmp_path / "r2")
    wall = time.perf_counter() - t
    assert chunks == [[["one-image", "text-only"], ["two-images"]]]
    assert _without_timings(two) == _without_timings(one)
    assert two.status == "pass" and len({p.case for p in two.points}) == 3
    assert two.timings["total"] <= wall and two.timings["reference"] > 0
    assert (tmp_path / "r2" / "report.json").is_file()
    assert list(tmp.iterdir()) == []


@pytest.mark.slow
def test_jobs_clamped_to_one_case_runs_in_process(fixture_models, tmp_path, monkeypatch, capsys):
    def no_workers(work, threads):
        raise AssertionError("one case must not spawn workers")

    monkeypatch.setattr(parallel, "_run_workers", no_workers)
    inputs = _write_cases(tmp_path / "one.yaml", 1)
    rc = main(["run", str(fixture_models["xcomposer2-tiny"]), "--trust-remote-code", "--inputs", str(inputs),
               "--jobs", "4", "--out", str(tmp_path / "r"), "--cache-dir", str(tmp_path / "cache")])
    assert rc == 0, capsys.readouterr().err
    assert json.loads((tmp_path / "r" / "report.json").read_text())["status"] == "pass"


def test_bad_inputs_exit_2_before_any_worker_or_conversion(fixture_models, tmp_path, monkeypatch, capsys):
    def forbidden(*a, **k):
        raise AssertionError("must fail before converting or starting workers")

    monkeypatch.setattr(parallel, "_run_workers", forbidden)
    monkeypatch.setattr(parallel, "_convert_first", forbidden)
    bad = tmp_path / "bad.yaml"
    bad.write_text("cases: [{name: x, segments: [{image: missing.png}]}, {name: y, segments: [{text: hi}]}]\n")
    capsys.readouterr()
    rc = main(["run", str(fixture_models["xcomposer2-tiny"]), "--trust-remote-code", "--inputs", str(bad),
               "--jobs", "2", "--out", str(tmp_path / "r"), "--cache-dir", str(tmp_path / "cache")])
    err = capsys.readouterr().err
    assert rc == 2 and "missing.png" in err and "Traceback" not in err
    assert not (tmp_path / "r").exists() and not (tmp_path / "cache").exists()


@pytest.mark.parametrize("jobs", ["0", "-3"])
def test_jobs_below_one_is_exit_2(fixture_models, tmp_path, capsys, jobs):
    capsys.readouterr()
    rc = main(["run", str(fixture_models["xcomposer2-tiny"]), "--trust-remote-code", "--jobs", jobs,
               "--out", str(tmp_path / "r"), "--cache-dir", str(tmp_path / "cache")])
    err = capsys.readouterr().err
    assert rc == 2 and "--jobs" in err and "Traceback" not in err


def test_live_engine_refuses_jobs(fixture_models, tmp_path, capsys):
    capsys.readouterr()
    rc = main(["run", str(fixture_models["xcomposer2-tiny"]), "--trust-remote-code", "--engine", "turbomind",
               "--jobs", "2", "--out", str(tmp_path / "r"), "--cache-dir", str(tmp_path / "cache")])
    err = capsys.readouterr().err
    assert rc == 2 and "--engine replay" in err and "Traceback" not in err


@pytest.mark.slow
def test_worker_input_error_is_exit_2_one_paragraph(fixture_models, tmp_path):
    """The model ships remote code and --trust-remote-code is missing: the workers refuse it when loading the
    reference; the real executable prints that one paragraph and exits 2, without a traceback."""
    inputs = _write_cases(tmp_path / "cases.yaml", 2)
    proc = subprocess.run(
        [str(REPO / ".venv" / "bin" / "parity") if (REPO / ".venv" / "bin" / "parity").exists() else "parity",
         "run", str(fixture_models["xcomposer2-tiny"]), "--inputs", str(inputs), "--jobs", "2",
         "--out", str(tmp_path / "r"), "--cache-dir", str(tmp_path / "cache")],
        capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr
    assert "--trust-remote-code" in proc.stderr and "Traceback" not in proc.stderr
    assert proc.stderr.count("parity: error:") == 1
    assert not (tmp_path / "r").exists()
    assert not (tmp_path / "cache").exists()  # the parent did not convert a model the workers refuse


def test_unpicklable_hooks_refused_with_jobs(fixture_models, tmp_path):
    from parity import run
    from parity.errors import ParityInputError

    inputs = _write_cases(tmp_path / "cases.yaml", 2)
    ws = tmp_path / "ws"
    ws.mkdir()  # never opened: the options are refused before any worker starts
    with pytest.raises(ParityInputError, match="pickled"):
        run(fixture_models["xcomposer2-tiny"], trust_remote_code=True, inputs=inputs, workspace=ws, jobs=2,
            faults=FaultHooks(mutate_engine_call=lambda name, call: call))


# ------------------------------------------------------------------------------------------ conversion cache

_CONVERT_SCRIPT = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    import parity.deploy.convert as c

    model, cache, go = sys.argv[1:4]
    calls = []
    real = c.convert
    def counting(*a, **k):
        calls.append(1)
        return real(*a, **k)
    c.convert = counting
    while not Path(go).exists():
        time.sleep(0.01)
    ws = c.convert_cached(model, cache)
    print(f"RESULT {ws} {len(calls)}")
""")


@pytest.mark.slow
def test_convert_cached_two_processes_convert_once(fixture_models, tmp_path):
    """Two processes ask for the same missing cache entry at the same moment: one converts, the other waits
    for the lock and uses its workspace; no temp folder is left."""
    cache, go = tmp_path / "cache", tmp_path / "go"
    script = tmp_path / "convert_one.py"
    script.write_text(_CONVERT_SCRIPT)
    procs = [subprocess.Popen([sys.executable, str(script), str(fixture_models["xcomposer2-tiny"]), str(cache),
                               str(go)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    time.sleep(2.0)  # both have imported parity and wait at the barrier
    go.touch()
    results = []
    for p in procs:
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0, err
        line = [ln for ln in out.splitlines() if ln.startswith("RESULT ")][-1]
        results.append(line.split()[1:])
    assert results[0][0] == results[1][0]
    assert sorted(int(r[1]) for r in results) == [0, 1]  # exactly one conversion
    ws = Path(results[0][0])
    from parity.deploy.workspace import Workspace

    assert Workspace.open(ws).model.num_layer > 0
    entries = sorted(p.name for p in cache.iterdir())
    assert entries == sorted([ws.name, f".{ws.name}.lock"]), entries


def test_convert_cached_reuses_a_complete_entry_without_locking(fixture_models, tmp_path, monkeypatch):
    import parity.deploy.convert as c

    calls = []
    monkeypatch.setattr(c, "convert", lambda *a, **k: calls.append(Path(a[1])))
    model = fixture_models["xcomposer2-tiny"]
    dest = c.convert_cached(model, tmp_path)  # under the lock, converts (here: records the call only)
    assert calls == [dest] and (tmp_path / f".{dest.name}.lock").is_file()
    (dest / "triton_models" / "weights").mkdir(parents=True)
    (dest / "triton_models" / "weights" / "config.yaml").write_text("{}")
    (dest / "parity-conversion.json").write_text("{}")

    def no_lock(path):
        raise AssertionError("a complete entry needs no lock")

    monkeypatch.setattr(c, "entry_lock", no_lock)
    assert c.convert_cached(model, tmp_path) == dest
    assert calls == [dest]


# ------------------------------------------------------------------------------------------ pytest-xdist


@pytest.mark.slow
def test_plugin_fixtures_under_xdist(pytester, fixture_models, tmp_path, monkeypatch):
    """A user's suite using the plugin's fixtures under `pytest -n 2`: both workers run parity on the same
    model at the same time into one fresh conversion cache; all pass, one conversion."""
    pytest.importorskip("xdist")
    model = fixture_models["xcomposer2-tiny"]
    cache = tmp_path / "shared-cache"
    pytester.makepyfile(test_user=f"""
        import os
        import pytest

        MODEL = {str(model)!r}
        CACHE = {str(cache)!r}

        @pytest.mark.parametrize("n", range(2))
        def test_release(parity_run, parity_assert, tmp_path, n):
            report = parity_run(MODEL, trust_remote_code=True, cache_dir=CACHE)
            parity_assert(report)
            assert (tmp_path / "parity-report" / "report.json").is_file()
            # each xdist worker has its own transformers remote-code cache
            assert "parity-hf-modules-" + os.environ["PYTEST_XDIST_WORKER"] in os.environ["HF_MODULES_CACHE"]
            with open(os.path.join(CACHE, "workers.txt"), "a") as f:
                f.write(os.environ["PYTEST_XDIST_WORKER"] + "\\n")
    """)
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    monkeypatch.setenv("TMPDIR", str(tmp))
    result = pytester.runpytest_subprocess("-n", "2", "-p", "no:cacheprovider", timeout=600)
    result.assert_outcomes(passed=2)
    workers = (cache / "workers.txt").read_text().split()
    assert sorted(workers) == ["gw0", "gw1"]  # xdist sends one test to each worker
    assert not list(tmp.glob("parity-hf-modules-*"))  # removed when each worker ends
    entries = [p for p in (cache / "workspaces").iterdir() if not p.name.startswith(".")]
    assert len(entries) == 1  # one conversion, shared
