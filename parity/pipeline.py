"""The straight line: inputs -> reference capture -> deployment (an Engine) -> align -> checks -> verdict -> report.
`run_parity` is the one entry point of the CLI, the pytest plugin and the fault catalogue; it only orders the
stages, each taking and returning records, and never asks which engine it drives (docs/architecture.md)."""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path

from .cases import lay_out_cases
from .deploy.workspace import Workspace
from .device import check_floor_device, judged_precision
from .engines import engine_class
from .errors import EngineRefused
from .generation import decode_case
from .judge import judge
from .options import RunOptions, check_options, engine_setup, run_cases, workspace_path
from .progress import stage, timed
from .records import CanonicalInput, DeployedCase, FaultHooks, Report, RuntimeSemantics, engine_section
from .reference.session import ReferenceSession
from .version import __version__


def run_parity(opts: RunOptions, faults: FaultHooks | None = None) -> Report:
    """One parity run. With `opts.session`, reference captures are reused across runs; `faults` are the fault
    catalogue's injections (none in a user's run)."""
    t0 = time.perf_counter()
    semantics, placement = check_options(opts)  # exit 2 before any model loads
    cases = run_cases(opts)  # a bad inputs file fails before any model is loaded
    with stage("load reference", str(opts.model)):
        session = opts.session or ReferenceSession(opts.model, opts.trust_remote_code, low_memory=opts.low_memory,
                                                   all_parts=opts.keep_traces is not None, placement=placement)
    work = Path(tempfile.mkdtemp(prefix="parity-engine-"))
    try:
        with judged_precision():  # judged float32 is float32 on a GPU too (TF32 off; parity.device)
            return _run_stages(opts, faults or FaultHooks(), session, semantics, cases, work, t0)
    finally:
        shutil.rmtree(work, ignore_errors=True)
        if opts.session is None:
            session.close()


def _run_stages(opts: RunOptions, faults: FaultHooks, session: ReferenceSession, semantics: RuntimeSemantics,
                cases: list[CanonicalInput], work: Path, t0: float) -> Report:
    timings = {"load_reference": time.perf_counter() - t0}
    with timed(timings, "convert"):
        ws = Workspace.open(workspace_path(opts, session.loaded.family))
    engine = engine_class(opts.engine)(engine_setup(opts, semantics, session, ws, faults))
    deployed: list[DeployedCase] = []
    try:
        settings = engine.activate()
        check_floor_device(session.placement, settings.floor_dtype)
        laid = lay_out_cases(cases, opts.model, session.ref, ws, opts.thresholds, faults, guard=opts.resource_check,
                             decode=opts.decode, scratch=work, floor_dtype=settings.floor_dtype)
        for case in laid.cases:
            with timed(timings, "reference", case.name):
                captured = session.capture(case.hf_call, case.name, settings, measure_floor=opts.measure_floor)
            request = case.request(captured, work / case.name, keep_all_parts=opts.keep_traces is not None)
            try:
                with timed(timings, "engine", case.name):
                    deployed.append(DeployedCase(case, captured, engine.infer(request)))
            except EngineRefused as e:  # TurboMind refuses such a workspace at load time (LoRA byte sizes)
                deployed.append(DeployedCase(case, captured, None, refused=e))
            if opts.decode and case.same_rows and deployed[-1].run is not None:  # generated tokens, compared step by step
                with timed(timings, "decode", case.name):
                    deployed[-1].decode = decode_case(session, engine, request, opts.decode, opts.thresholds, settings)
        summary = engine.deactivate()  # a follow-up strategy (live per-layer runs) runs here
    finally:
        engine.close()
    timings.update(summary.timings)
    with timed(timings, "compare"):
        judged = judge(opts, session.ref, ws, semantics, settings.numeric, deployed, summary, laid.findings)
    if opts.keep_traces:
        shutil.copytree(work, opts.keep_traces / "engine", dirs_exist_ok=True)
        shutil.copytree(session.root, opts.keep_traces / "reference", dirs_exist_ok=True)
    timings["total"] = time.perf_counter() - t0
    engine_info = engine_section(opts.engine, semantics, settings, opts.serve_from, ws.model.weight_type,
                                 ws.conversion_record(), session.describe(ws.model.weight_type), summary,
                                 laid.image_input)
    return Report(engine=engine_info, model=str(opts.model), workspace=str(ws.root), timings=timings,
                  thresholds=opts.thresholds.to_dict(), parity_version=__version__, **vars(judged))
