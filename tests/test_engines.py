"""The deployment side's one interface: an engine registered in parity.engines.ENGINES plugs into the pipeline
unchanged, the pipeline drives it activate -> infer per case -> deactivate -> close, and the checks judge what
its typed `EngineRun` says (not string-keyed dicts)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from parity.engines import ENGINES, engine_class
from parity.engines.replay import ReplayRunner
from parity.errors import ParityInputError
from parity.fixtures import DEFAULT_INPUTS
from parity.pipeline import RunOptions, run_parity
from parity.records import EngineRanges, EngineRun, EngineSummary, EngineWarning

REPO = Path(__file__).resolve().parents[1]
CACHE = REPO / ".cache"


class FakeRecordingEngine(ReplayRunner):
    """Test-only: the replay, recording the protocol calls and reporting one warning of its own."""

    kind = "fake-recording"
    calls: list[str] = []

    def activate(self):
        type(self).calls.append("activate")
        return super().activate()

    def infer(self, request):
        type(self).calls.append(f"infer:{request.case}")
        return super().infer(request)

    def deactivate(self) -> EngineSummary:
        type(self).calls.append("deactivate")
        summary = super().deactivate()
        summary.warnings.append(EngineWarning(cause="lora_not_applied", message="fake engine: a warning of its own"))
        summary.report["fake"] = True
        return summary

    def close(self) -> None:
        type(self).calls.append("close")
        super().close()


class FakeRangeRejectingEngine(ReplayRunner):
    """Test-only: the replay, but its EngineRun says TurboMind rejected the call's embedding ranges."""

    kind = "fake-rejecting"

    def infer(self, request) -> EngineRun:
        run = super().infer(request)
        return dataclasses.replace(run, ranges=EngineRanges(valid=False, reason="injected by the test",
                                                            accepted=(), row_count_mismatch=False))


@pytest.fixture
def register(monkeypatch):
    def add(cls) -> str:
        monkeypatch.setitem(ENGINES, cls.kind, f"{__name__}:{cls.__name__}")
        return cls.kind
    return add


def test_new_engine_plugs_in_through_the_registry(fixture_models, register):
    kind = register(FakeRecordingEngine)
    FakeRecordingEngine.calls = []
    report = run_parity(RunOptions(model=fixture_models["xcomposer2-tiny"], engine=kind, trust_remote_code=True,
                                   inputs=DEFAULT_INPUTS, cache_dir=CACHE))
    assert report.status == "pass", [f.message for f in report.errors()]
    assert FakeRecordingEngine.calls == ["activate", "infer:one-image", "infer:two-images", "infer:text-only",
                                         "deactivate", "close"]
    (w,) = [f for f in report.findings if f.severity == "warning" and "fake engine" in f.message]
    assert w.cause == "lora_not_applied" and w.check == "config"
    assert report.engine["kind"] == kind and report.engine["fake"] is True


def test_checks_judge_the_typed_engine_run(fixture_models, register):
    """An EngineRun that says the ranges were rejected is named by the inputs check, with the engine's reason."""
    kind = register(FakeRangeRejectingEngine)
    report = run_parity(RunOptions(model=fixture_models["xcomposer2-tiny"], engine=kind, trust_remote_code=True,
                                   cache_dir=CACHE))
    assert report.status == "fail"
    assert report.first_divergence.cause == "embeddings_skipped"
    (f,) = [f for f in report.errors() if f.cause == "embeddings_skipped"]
    assert f.check == "inputs" and f.module == "embeddings" and "injected by the test" in f.message


def test_engine_closed_when_a_case_fails(fixture_models, register, monkeypatch):
    kind = register(FakeRecordingEngine)
    FakeRecordingEngine.calls = []

    def boom(self, request):
        raise RuntimeError("engine crashed")
    monkeypatch.setattr(FakeRecordingEngine, "infer", boom)
    with pytest.raises(RuntimeError, match="engine crashed"):
        run_parity(RunOptions(model=fixture_models["xcomposer2-tiny"], engine=kind, trust_remote_code=True,
                              cache_dir=CACHE))
    assert FakeRecordingEngine.calls == ["activate", "close"]


def test_unknown_engine_is_refused_with_the_known_ones():
    with pytest.raises(ParityInputError, match="'replay', 'turbomind'"):
        engine_class("tensorrt")
