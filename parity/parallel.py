"""Many input cases in parallel processes (`parity run --jobs N`, `parity.run(..., jobs=N)`).

The cases are split into N contiguous chunks, one per worker process (spawn context: torch and fork do not
mix). Every worker runs the ordinary `pipeline.run_parity` on its chunk against one workspace that the
parent converted beforehand, so workers never race on the conversion cache; they share nothing mutable
(each has its own reference model, temp folders and transformers remote-code cache). The parent merges the
workers' reports into the report one process would have written for all the cases (`merge_reports`): only
the timings differ.

Each worker loads its own copy of the reference model: N jobs need N times its memory.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence, TypeVar

from .errors import ParityInputError

if TYPE_CHECKING:  # keep this module cheap to import: spawned workers import it before anything else
    from .options import RunOptions
    from .records import FaultHooks, Finding, Report

T = TypeVar("T")


def available_cpus() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # pragma: no cover - not Linux
        return max(1, os.cpu_count() or 1)


def worker_threads(jobs: int, cpus: int | None = None) -> int:
    """torch intra-op threads per worker: the CPUs shared evenly, at least one."""
    return max(1, (cpus or available_cpus()) // max(1, jobs))


def split_cases(cases: Sequence[T], jobs: int) -> list[list[T]]:
    """`cases` in `min(jobs, len(cases))` contiguous chunks whose sizes differ by at most one, in order."""
    n = max(1, min(jobs, len(cases)))
    size, extra = divmod(len(cases), n)
    chunks, start = [], 0
    for i in range(n):
        end = start + size + (1 if i < extra else 0)
        chunks.append(list(cases[start:end]))
        start = end
    return chunks


def _check_jobs(jobs: object) -> int:
    if not isinstance(jobs, int) or isinstance(jobs, bool) or jobs < 1:
        raise ParityInputError(f"--jobs must be a whole number >= 1 (worker processes), got {jobs!r}.")
    return jobs


def run_parallel(opts: "RunOptions", jobs: int = 1, faults: "FaultHooks | None" = None) -> "Report":
    """`pipeline.run_parity(opts, faults)` with its cases spread over `jobs` worker processes (clamped to the
    number of cases). With one job, or one case, it is `run_parity(opts, faults)` in this process."""
    from .pipeline import run_parity

    jobs = _check_jobs(jobs)
    if jobs == 1:
        return run_parity(opts, faults)
    t0 = time.perf_counter()
    if opts.engine != "replay":
        raise ParityInputError(
            f"--jobs {jobs} needs --engine replay: a live TurboMind deployment holds the GPU, so its cases run in "
            "one process (use --jobs 1).")
    if opts.session is not None:
        raise ParityInputError("jobs > 1 cannot share a ReferenceSession across processes; pass session=None or "
                               "jobs=1.")
    from .options import run_cases, runtime_semantics

    runtime_semantics(opts)  # what run_parity refuses before loading anything, refused before spawning

    cases = run_cases(opts)  # a bad inputs file fails here, before any conversion or worker
    chunks = split_cases(cases, jobs)
    if len(chunks) == 1:
        return run_parity(replace(opts, cases=cases, inputs=None), faults)
    t = time.perf_counter()
    workspace = opts.workspace or _convert_first(opts)
    convert_s = time.perf_counter() - t
    work = [(replace(opts, cases=chunk, inputs=None, workspace=workspace), faults) for chunk in chunks]
    try:
        pickle.dumps(work[0])
    except Exception as e:  # noqa: BLE001 - lambdas in the mutate hooks, an unpicklable session, ...
        raise ParityInputError(
            f"jobs > 1 sends the run options and fault hooks to worker processes, but they cannot be pickled "
            f"({type(e).__name__}: {e}); use module-level functions in the fault hooks, or jobs=1.") from None
    reports = _run_workers(work, worker_threads(len(work)))
    return merge_reports(reports, [c.name for c in cases], _num_layers(opts, reports),
                         wall=time.perf_counter() - t0, extra={"convert": convert_s})


def _convert_first(opts: "RunOptions") -> Path | None:
    """The workspace the workers would convert (pipeline's choice), converted once here. None when the
    workers will refuse the model before converting anything (their message then names the problem)."""
    from .hfconfig import read_hf_config
    from .reference.loader import model_family

    from .options import workspace_path

    cfg = read_hf_config(opts.model)
    family = model_family(cfg)
    if family is None or (cfg.get("auto_map") and not opts.trust_remote_code):
        return None
    return workspace_path(opts, family)


def _num_layers(opts: "RunOptions", reports: Sequence["Report"]) -> int:
    """The decoder layer count the verdict orders by (the reference's; config.json says it)."""
    from .hfconfig import read_hf_config

    n = read_hf_config(opts.model).get("num_hidden_layers")
    if isinstance(n, int) and not isinstance(n, bool) and n >= 0:
        return n
    layers = [p.layer for r in reports for p in r.points if p.layer is not None]
    return max(layers) + 1 if layers else 0


# ------------------------------------------------------------------------------------------ workers


def _init_worker(threads: int, scratch: str) -> None:
    """Runs first in every spawned worker, before transformers is imported."""
    # transformers copies a model's remote code into HF_MODULES_CACHE when loading it; processes sharing
    # that folder can import a file another one is rewriting. Each worker gets its own.
    os.environ["HF_MODULES_CACHE"] = tempfile.mkdtemp(prefix="hf-modules-", dir=scratch)
    import torch

    torch.set_num_threads(threads)


def _run_chunk(item: "tuple[RunOptions, FaultHooks | None]") -> "Report":
    from .pipeline import run_parity

    return run_parity(*item)


def _run_workers(work: list[Any], threads: int, fn: Callable[[Any], Any] | None = None) -> list[Any]:
    """`fn(item)` (default: run_parity on (options, faults)) for each item of `work`, each in its own spawned process;
    results in the order of `work`. The first failure (in `work` order among those that failed) stops the
    others and is raised here."""
    import multiprocessing
    from concurrent.futures import FIRST_EXCEPTION, ProcessPoolExecutor, wait
    from concurrent.futures.process import BrokenProcessPool

    scratch = tempfile.mkdtemp(prefix="parity-jobs-")
    pool = ProcessPoolExecutor(max_workers=len(work), mp_context=multiprocessing.get_context("spawn"),
                               initializer=_init_worker, initargs=(threads, scratch))
    finished = False
    try:
        futures = [pool.submit(fn or _run_chunk, w) for w in work]
        wait(futures, return_when=FIRST_EXCEPTION)
        failed = [f for f in futures if f.done() and f.exception() is not None]
        if failed:
            e = failed[0].exception()
            if isinstance(e, BrokenProcessPool):
                raise ParityInputError(
                    f"A worker process of the {len(work)} --jobs workers died without a result (killed, most "
                    "likely for memory: every worker loads its own copy of the reference model). Run with fewer "
                    "--jobs.") from None
            raise e
        reports = [f.result() for f in futures]
        finished = True
        return reports
    finally:
        if not finished:  # a failure or an interrupt: do not wait for the other workers' cases
            for p in list((getattr(pool, "_processes", None) or {}).values()):
                if p.is_alive():
                    p.terminate()
        pool.shutdown(wait=True, cancel_futures=True)
        shutil.rmtree(scratch, ignore_errors=True)


# ------------------------------------------------------------------------------------------ merge


def _key(f: "Finding") -> str:
    return json.dumps(f.to_dict(), sort_keys=True, default=str)


def merge_reports(reports: Sequence["Report"], cases: Sequence[str], num_layers: int, *,
                  wall: float | None = None, extra: dict[str, float] | None = None) -> "Report":
    """One report from the reports of contiguous chunks of `cases` (given in chunk order).

    Per-case parts (points, case summaries, case findings, PLoRA rows) are concatenated, which keeps the
    input order of the cases; model-wide findings (case None: conversion, config, weights), identical in every
    worker, are kept once; the audits come from the first report. The verdict is decided again over all the
    findings exactly as the pipeline decides it. Timings: each stage summed over the workers (plus `extra`,
    e.g. the parent's conversion), `total` the wall time of the whole parallel run when `wall` is given.
    """
    from .verdict import decide, group_findings, sort_findings

    if not reports:
        raise ValueError("merge_reports needs at least one report")
    first = reports[0]
    names = list(cases)
    findings: list[Finding] = []
    seen: set[str] = set()
    for r in reports:
        for f in r.findings:
            if f.case is None:
                k = _key(f)
                if k in seen:
                    continue
                seen.add(k)
            findings.append(f)
    # Each report is sorted already, and equal sort keys only occur within one case (one report) or among the
    # model-wide findings (kept in the first report's order): the stable sort gives the single-process order.
    status, first_divergence = decide(findings, num_layers, names)
    findings = sort_findings(findings, num_layers, names)
    timings: dict[str, float] = {}
    for r in reports:
        for k, v in r.timings.items():
            timings[k] = timings.get(k, 0.0) + float(v)
    for k, v in (extra or {}).items():
        timings[k] = timings.get(k, 0.0) + float(v)
    if wall is not None:
        timings["total"] = wall
    return replace(
        first,
        status=status,
        findings=findings,
        groups=group_findings(findings),
        first_divergence=first_divergence,
        points=[p for r in reports for p in r.points],
        cases=[c for r in reports for c in r.cases],
        plora_table=[row for r in reports for row in r.plora_table],
        decode=[d for r in reports for d in r.decode],
        engine=_merge_engine([r.engine for r in reports], names),
        timings=timings,
    )


def _merge_engine(sections: Sequence[dict], cases: Sequence[str]) -> dict:
    """The engine section of the first report, with every per-case entry (a dict keyed by case names, e.g.
    `teacher_forced`) holding all the workers' cases in input order."""
    merged = dict(sections[0])
    for key, value in sections[0].items():
        if isinstance(value, dict) and value and set(value) <= set(cases):
            union = {c: v for s in sections for c, v in (s.get(key) or {}).items()}
            merged[key] = {c: union[c] for c in cases if c in union}
    return merged
