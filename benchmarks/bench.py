#!/usr/bin/env python
"""parity performance benchmark at real 7B shapes: `make bench` (or `python benchmarks/bench.py --help`).

Builds InternLM-XComposer2-7b-shaped models with few layers (hidden 4096 = 32 x 128, 8 kv heads,
intermediate 14336, rank-256 PLoRA on every linear, vocab 8192 by default, one 490 px image = 1,225 image rows)
with parity's fixture generator, converts them with lmdeploy's converter (`convert_cached`), and
measures in one run:

  capture overhead      reference forward streaming every capture point to disk / the same forward, no hooks
  replay / reference    ReplayEngine fp32 forward / reference fp32 forward (both without writing a trace)
  compare / memcpy      bytes of activations compare_case reads per second / memory-copy bandwidth
  run / forwards        run_parity wall time / the two forwards a comparison cannot avoid (fp32 reference
                        and the replay end to end), each timed alone
  memory 2L / L         (peak RSS - resident fp32 weights) of run_parity at 2L layers / at L layers

Each measurement runs in a child process (a fresh peak RSS; a guard stops a child that would exhaust the
machine's memory or disk, see memwatch.py). Models and workspaces are cached under --root
(.cache/bench, git-ignored). Prints one table and writes everything to --out (JSON).
"""

from __future__ import annotations

import argparse
import cProfile
import json
import math
import os
import platform
import pstats
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks import memwatch  # noqa: E402
from benchmarks.memwatch import GIB, Clock, Watch  # noqa: E402

TARGETS = {
    "capture_overhead": ("<=", 1.10),
    "replay_vs_reference": ("<=", 1.0),
    "compare_vs_memcpy": (">=", 0.25),
    "run_vs_forwards": ("<=", 1.5),
    "memory_2L_vs_L": ("<=", 1.1),
}
ABORT_EXIT = 75


# ============================================================================================ helpers


def _json_default(o):
    if isinstance(o, Path):
        return str(o)
    if hasattr(o, "item"):
        return o.item()
    return str(o)


def write_json(path: Path, data: dict) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1, default=_json_default))
    os.replace(tmp, path)


def dir_bytes(path: Path) -> int:
    total = 0
    for p in Path(path).rglob("*"):
        if p.is_file():
            total += p.stat().st_size
    return total


def memcpy_bandwidth(nbytes: int = 256 * 1024**2, reps: int = 7) -> dict:
    """Plain memory copy (torch `copy_`, all intra-op threads), best of `reps`: bytes copied per second."""
    import torch

    src = torch.ones(nbytes // 4, dtype=torch.float32)
    dst = torch.empty_like(src)
    dst.copy_(src)
    best = math.inf
    for _ in range(reps):
        t = time.perf_counter()
        dst.copy_(src)
        best = min(best, time.perf_counter() - t)
    return {"bytes": nbytes, "best_s": best, "bytes_per_s": nbytes / best}


def param_bytes(model) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters()) + \
        sum(b.numel() * b.element_size() for b in model.buffers())


def case_for_rows(model_dir: Path, rows: int | None, image_rows: int):
    """The benchmark case, lengthened with filler text to `rows` rows (counted with the model's tokenizer)."""
    from tokenizers import Tokenizer

    from benchmarks.models import bench_case, default_image

    image = default_image()
    base = bench_case(image, 0)
    if not rows:
        return base
    tok = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    n = 1 + image_rows + sum(len(tok.encode(s.text, add_special_tokens=False).ids)
                             for s in base.segments if s.kind == "text")
    return bench_case(image, max(0, rows - n))


def _prepare(ref, case):
    from parity.inputs import engine_call, hf_call, prepare

    p = prepare(case, ref.tokenize, ref.embed_tokens, ref.encode_image, ref.bos_id, ref.decode)
    return p, hf_call(p), engine_call(p)


def _top_profile(prof: cProfile.Profile, n: int = 18) -> list[dict]:
    st = pstats.Stats(prof)
    rows = []
    for (file, line, func), (cc, nc, tt, ct, _callers) in st.stats.items():
        rows.append({"function": f"{Path(file).name}:{line}({func})", "calls": nc, "tottime_s": round(tt, 3),
                     "cumtime_s": round(ct, 3)})
    rows.sort(key=lambda r: r["tottime_s"], reverse=True)
    return rows[:n]


def child_convert(args) -> dict:
    from parity.deploy.convert import convert_cached

    with Clock() as c:
        ws = convert_cached(Path(args.model), Path(args.root) / "workspaces")
    return {"workspace": str(ws), "time": c.result(), "workspace_bytes": dir_bytes(ws)}


class NullWriter:
    """A trace writer (TraceWriter's protocol) that drops every value: the forward's own cost, no trace I/O."""

    def __init__(self, root: Path):
        from parity.trace import TraceMeta

        self.root = Path(root)
        self.meta = TraceMeta(side="replay", case="bench", num_layers=0, dtype="float32")

    def pre(self, name, value):
        pass

    def post(self, name, value):
        pass

    def layer(self, index, values):
        pass

    def close(self):
        return None


def child_forwards(args, watch: Watch) -> dict:
    """Each forward pass alone (fp32 reference, replay end to end, teacher-forced and both in one pass), and
    the reference capture as `run_parity` does it."""
    import torch

    from parity.deploy.compat import installed_lmdeploy_version
    from parity.deploy.replay import ReplayEngine
    from parity.deploy.versions import semantics_for
    from parity.deploy.workspace import Workspace
    from parity.points import PLORA_PARTS
    from parity.reference.capture import capture_reference
    from parity.reference.loader import load_reference
    from parity.reference.precision import compute_dtype
    from parity.trace import TraceMeta, TraceWriter

    out: dict = {"samples": {}, "profile": {}}
    tmp = Path(args.root) / "tmp" / f"forwards-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    watch.cleanup.add(tmp)
    samples = out["samples"]

    def timed(name, fn):
        with watch.stage(name), Clock() as c:
            r = fn()
        samples.setdefault(name, []).append(c.result())
        return r

    def profiled(name, fn):
        prof = cProfile.Profile()
        prof.enable()
        try:
            return fn()
        finally:
            prof.disable()
            out["profile"][name] = _top_profile(prof)

    try:
        with watch.stage("load_reference"), Clock() as c:
            ref = load_reference(Path(args.model), True, torch.float32)
        out["load_reference"] = c.result()
        out["resident_weight_bytes"] = param_bytes(ref.model)
        case = case_for_rows(Path(args.model), args.rows, int(args.image_rows))
        prepared, hcall, ecall = _prepare(ref, case)
        out["rows"] = len(prepared.token_ids)
        out["image_rows"] = int(prepared.image_rows.sum())
        ws = Workspace.open(Path(args.workspace))
        engine = ReplayEngine(ws, semantics_for(installed_lmdeploy_version()), numeric="fp32")
        out["storage_dtype"] = str(next(ref.model.parameters()).dtype)

        @torch.no_grad()
        def plain(dtype):
            with compute_dtype(ref.model, ref.anatomy.layers, dtype):
                ref.model(inputs_embeds=hcall.inputs_embeds.to(dtype), im_mask=hcall.im_mask, use_cache=False)

        ref_trace = None
        for r in range(args.repeat):
            timed("reference_fp32", lambda: plain(torch.float32))
            d = tmp / f"capture{r}"
            trace = timed("capture_fp32", lambda: capture_reference(ref, hcall, d, "bench"))
            if ref_trace is not None:
                shutil.rmtree(ref_trace.root, ignore_errors=True)
            ref_trace = trace
            out["trace_bytes_fp32"] = dir_bytes(d)
        # what --keep-traces records: also every PLoRA linear's input and base output, which no check reads
        d = tmp / "capture-all-parts"
        timed("capture_fp32_all_parts", lambda: capture_reference(ref, hcall, d, "bench", parts=PLORA_PARTS))
        out["trace_bytes_fp32_all_parts"] = dir_bytes(d)
        shutil.rmtree(d, ignore_errors=True)
        if args.profile:
            d = tmp / "capture-prof"
            profiled("capture_fp32", lambda: capture_reference(ref, hcall, d, "bench"))
            shutil.rmtree(d, ignore_errors=True)

        for r in range(args.repeat):
            timed("replay_fp32", lambda: engine.run(ecall, NullWriter(tmp / "null")))
        timed("replay_local_fp32", lambda: engine.run(ecall, NullWriter(tmp / "null"), teacher=ref_trace))
        timed("replay_pair_fp32", lambda: engine.run_pair(ecall, NullWriter(tmp / "null"), NullWriter(tmp / "null"),
                                                          ref_trace))
        d = tmp / "engine"

        def replay_traced():
            w = TraceWriter(d, TraceMeta(side="replay", case="bench", num_layers=ws.model.num_layer, dtype="float32"))
            engine.run(ecall, w)

        if args.profile:
            profiled("replay_fp32_traced", lambda: timed("replay_fp32_traced", replay_traced))
        else:
            timed("replay_fp32_traced", replay_traced)
        out["trace_bytes_engine"] = dir_bytes(d)
        shutil.rmtree(d, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def child_parity(args, watch: Watch) -> dict:
    """One whole `run_parity`, instrumented per stage (time, peak RSS)."""
    import parity.pipeline as pipeline
    from parity.compare.thresholds import Thresholds
    from parity.deploy import convert as convert_mod
    from parity.deploy.replay import ReplayEngine
    from parity.reference import session as session_mod
    from parity.trace import Trace

    out: dict = {"stages": {}}
    stages = out["stages"]
    held: dict = {}

    def account(name, c: Clock):
        s = stages.setdefault(name, {"calls": 0, "wall_s": 0.0, "cpu_s": 0.0})
        s["calls"] += 1
        s["wall_s"] += c.wall
        s["cpu_s"] += c.cpu

    def wrap(obj, attr, name_fn):
        real = getattr(obj, attr)

        def wrapper(*a, **k):
            name = name_fn(*a, **k)
            with watch.stage(name), Clock() as c:
                r = real(*a, **k)
            account(name, c)
            return r

        setattr(obj, attr, wrapper)
        return real

    out["memcpy"] = memcpy_bandwidth()
    Session = session_mod.ReferenceSession
    real_init = Session.__init__

    def session_init(self, *a, **k):
        with watch.stage("load_reference"), Clock() as c:
            real_init(self, *a, **k)
        account("load_reference", c)
        held["session"] = self
        watch.cleanup.add(Path(self.root))
        out["resident_weight_bytes"] = param_bytes(self.ref.model)
        out["storage_dtype"] = str(next(self.ref.model.parameters()).dtype)

    Session.__init__ = session_init
    # floor_local asks for the (cached) reference first: the reference is captured before it is timed
    wrap(Session, "reference", lambda *a, **k: "capture:reference")
    wrap(Session, "floor_local", lambda *a, **k: "capture:floor-local")
    wrap(Session, "floor_e2e", lambda *a, **k: "capture:floor")
    wrap(convert_mod, "convert_cached", lambda *a, **k: "convert_cached")
    real_pair = ReplayEngine.run_pair

    def engine_pair(self, call, writer, writer_local, teacher, **kw):
        watch.cleanup.add(Path(writer.root).parent.parent)  # run_parity's parity-engine-* folder
        return _staged(watch, account, "engine:pair", real_pair, self, call, writer, writer_local, teacher, **kw)

    ReplayEngine.run_pair = engine_pair
    from parity.deploy.expected import ExpectedTensors

    wrap(ExpectedTensors, "from_hf_config", lambda *a, **k: "hf_tm_tensors")
    from parity.checks import hidden, registry

    def timed_check(name, fn):
        def run(*a, **k):
            with watch.stage(f"check:{name}"), Clock() as c:
                r = fn(*a, **k)
            account(f"check:{name}", c)
            return r
        return run

    registry.CHECKS = tuple((name, timed_check(name, fn)) for name, fn in registry.CHECKS)  # held by value
    wrap(hidden, "run", lambda *a, **k: "check:hidden")

    import parity.judge as judge  # where run_parity's comparison runs

    real_compare = judge.compare_case
    compare_info = out.setdefault("compare", {"bytes": 0, "wall_s": 0.0, "cpu_s": 0.0, "points": 0})
    excluded = {"wall_s": 0.0, "cpu_s": 0.0}

    def compare_case(ct, thresholds, numeric):
        roots = {Path(t.root).parent for t in (ct.reference, ct.floor_e2e, ct.floor_local, ct.engine, ct.engine_local)
                 if t is not None and getattr(t, "measured", True)}  # an unmeasured FloorOnDemand has no folder
        compare_info["trace_bytes_on_disk"] = sum(dir_bytes(r) for r in roots)
        counted = {"n": 0, "s": 0.0}
        real_get = Trace.get

        def get(self, layer, point):  # the activation bytes compare_case reads
            t0 = time.perf_counter()
            v = real_get(self, layer, point)
            counted["s"] += time.perf_counter() - t0
            if v is not None:
                counted["n"] += v.numel() * v.element_size()
            return v

        Trace.get = get
        try:
            with watch.stage("compare_case"), Clock() as c:
                res = real_compare(ct, thresholds, numeric)
        finally:
            Trace.get = real_get
        account("compare_case", c)
        compare_info["bytes"] += counted["n"]
        compare_info["read_s"] = compare_info.get("read_s", 0.0) + counted["s"]
        compare_info["wall_s"] += c.wall
        compare_info["cpu_s"] += c.cpu
        compare_info["points"] += len(res)
        # timed again like every forward here (min of --repeat); the repeats' time is taken out of the run's
        for _ in range(args.repeat - 1):
            with Clock() as again:
                real_compare(ct, thresholds, numeric)
            compare_info.setdefault("repeats", []).append({"wall_s": again.wall, "cpu_s": again.cpu})
            excluded["wall_s"] += again.wall
            excluded["cpu_s"] += again.cpu
        return res

    judge.compare_case = compare_case

    case = case_for_rows(Path(args.model), args.rows, int(args.image_rows))
    opts = pipeline.RunOptions(model=Path(args.model), trust_remote_code=True, cache_dir=Path(args.root),
                               cases=[case], thresholds=Thresholds(), low_memory=True if args.low_memory else None)
    watch.context["model"] = args.model
    memwatch.reset_peak()
    with Clock() as c:
        report = pipeline.run_parity(opts)
    out["run"] = c.result()
    out["run"]["wall_s"] -= excluded["wall_s"]
    out["run"]["cpu_s"] -= excluded["cpu_s"]
    out["run"]["excluded_compare_repeats"] = excluded
    out["status"] = report.status
    out["first_divergence"] = str(report.first_divergence) if report.first_divergence else None
    out["findings"] = [f"{f.severity}:{f.cause}:{f.check}" for f in report.findings][:20]
    out["report_timings"] = report.timings
    out["teacher_forced"] = (report.engine or {}).get("teacher_forced")
    out["floor_measured"] = any(p.floor is not None for p in report.points)
    out["rows"] = report.cases[0].rows if report.cases else None
    return out


def _staged(watch, account, name, fn, *a, **kw):
    with watch.stage(name), Clock() as c:
        r = fn(*a, **kw)
    account(name, c)
    return r


def run_child(args) -> int:
    result = Path(args.result)
    watch = Watch(disk_path=Path(args.root), abort_path=result,
                  min_available=int(args.min_available_gib * GIB), min_disk_free=int(args.min_disk_gib * GIB)).start()
    import torch

    torch.set_num_threads(max(1, int(args.threads)))
    fn = {"convert": lambda: child_convert(args), "forwards": lambda: child_forwards(args, watch),
          "parity": lambda: child_parity(args, watch)}[args.child]
    data = fn()
    watch.stop()
    data["memory"] = watch.report()
    data["threads"] = torch.get_num_threads()
    write_json(result, data)
    return 0


# ============================================================================================ driver


def spawn(args, child: str, model: Path, workspace: Path | None, tag: str, extra: list[str] = ()) -> dict:
    result = Path(args.root) / "results" / f"{tag}.json"
    result.parent.mkdir(parents=True, exist_ok=True)
    if args.reuse and result.is_file():
        data = json.loads(result.read_text())
        if not (data.get("failed") or data.get("aborted")):
            log(f"[bench] {tag}: reusing {result}")
            return data
    result.unlink(missing_ok=True)
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", child, "--model", str(model),
           "--result", str(result), "--root", str(args.root), "--repeat", str(args.repeat),
           "--image-rows", str(args.image_rows_for_model), "--min-available-gib", str(args.min_available_gib),
           "--min-disk-gib", str(args.min_disk_gib), "--threads", str(args.threads), *extra]
    if args.rows:
        cmd += ["--rows", str(args.rows)]
    if args.low_memory:
        cmd += ["--low-memory"]
    if workspace:
        cmd += ["--workspace", str(workspace)]
    if args.profile:
        cmd += ["--profile"]
    t = time.perf_counter()
    log(f"[bench] {tag}: {child} on {model.name} ...")
    proc = subprocess.run(cmd, cwd=str(REPO))
    wall = time.perf_counter() - t
    if result.is_file():
        data = json.loads(result.read_text())
    else:
        data = {"failed": True, "returncode": proc.returncode}
    if proc.returncode not in (0, ABORT_EXIT) and not data.get("failed"):
        data = {"failed": True, "returncode": proc.returncode}
    data["child_wall_s"] = wall
    log(f"[bench] {tag}: done in {wall:.0f} s" + (f" (ABORTED: {data.get('reason')})" if data.get("aborted") else "")
        + (f" (FAILED rc={proc.returncode})" if data.get("failed") else ""))
    return data


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _min(samples: dict, name: str, key: str = "wall_s") -> float | None:
    xs = [s[key] for s in samples.get(name, [])]
    return min(xs) if xs else None


def _ratio(a, b):
    return (a / b) if (a is not None and b) else None


def _ok(name: str, value) -> bool | None:
    if value is None:
        return None
    op, target = TARGETS[name]
    return value <= target if op == "<=" else value >= target


def _stage(d: dict, name: str, key: str = "wall_s") -> float:
    return float(d.get("stages", {}).get(name, {}).get(key, 0.0))


def compute(results: dict, layers: int) -> dict:
    fw, pL, p2L = results.get("forwards", {}), results.get("parity_L", {}), results.get("parity_2L", {})
    s = fw.get("samples", {})
    ratios: dict = {}

    plain, cap = _min(s, "reference_fp32"), _min(s, "capture_fp32")
    ratios["capture_overhead"] = {
        "value": _ratio(cap, plain), "cpu_value": _ratio(_min(s, "capture_fp32", "cpu_s"), _min(s, "reference_fp32", "cpu_s")),
        "numbers": {"capture_fp32_s": cap, "reference_fp32_s": plain, "trace_bytes_fp32": fw.get("trace_bytes_fp32"),
                    "capture_all_parts_s": _min(s, "capture_fp32_all_parts"),
                    "all_parts_ratio": _ratio(_min(s, "capture_fp32_all_parts"), plain),
                    "trace_bytes_all_parts": fw.get("trace_bytes_fp32_all_parts")}}

    rep, loc, pair = _min(s, "replay_fp32"), _min(s, "replay_local_fp32"), _min(s, "replay_pair_fp32")
    ratios["replay_vs_reference"] = {
        "value": _ratio(rep, plain), "cpu_value": _ratio(_min(s, "replay_fp32", "cpu_s"), _min(s, "reference_fp32", "cpu_s")),
        "numbers": {"replay_fp32_s": rep, "reference_fp32_s": plain, "replay_local_fp32_s": loc,
                    "replay_pair_fp32_s": pair, "pair_vs_two_runs": _ratio(pair, (rep or 0) + (loc or 0)),
                    "replay_traced_s": _min(s, "replay_fp32_traced"), "capture_fp32_s": cap,
                    "traced_replay_vs_capture": _ratio(_min(s, "replay_fp32_traced"), cap),
                    "trace_bytes_engine": fw.get("trace_bytes_engine")}}

    cmp = pL.get("compare", {})
    bw = pL.get("memcpy", {}).get("bytes_per_s")
    # min over the call in the run (its traces just written, pages still being flushed) and the repeats
    tries = [{"wall_s": cmp.get("wall_s"), "cpu_s": cmp.get("cpu_s")}] + list(cmp.get("repeats", []))
    c_wall = min((t["wall_s"] for t in tries if t["wall_s"]), default=None)
    c_cpu = min((t["cpu_s"] for t in tries if t["cpu_s"]), default=None)
    thr = (cmp.get("bytes", 0) / c_wall) if c_wall else None
    thr_cpu = (cmp.get("bytes", 0) / c_cpu) if c_cpu else None
    ratios["compare_vs_memcpy"] = {
        "value": _ratio(thr, bw), "cpu_value": _ratio(thr_cpu, bw),
        "numbers": {"compare_bytes": cmp.get("bytes"), "compare_s": c_wall, "compare_first_s": cmp.get("wall_s"),
                    "compare_bytes_per_s": thr,
                    "read_s": cmp.get("read_s"), "memcpy_bytes_per_s": bw, "points": cmp.get("points"),
                    "trace_bytes_on_disk": cmp.get("trace_bytes_on_disk")}}

    # the two forwards no comparison can avoid: the fp32 reference and the replay end to end (the float64
    # floor and the teacher-forced replay are measured only where a judgement needs them)
    needed = plain + rep if None not in (plain, rep) else None
    needed_cpu = None
    if needed is not None:
        needed_cpu = sum(_min(s, n, "cpu_s") for n in ("reference_fp32", "replay_fp32"))
    run_wall, run_cpu = pL.get("run", {}).get("wall_s"), pL.get("run", {}).get("cpu_s")
    ratios["run_vs_forwards"] = {
        "value": _ratio(run_wall, needed), "cpu_value": _ratio(run_cpu, needed_cpu),
        "numbers": {"run_parity_s": run_wall, "forwards_needed_s": needed,
                    "reference_fp32_s": plain, "replay_e2e_s": rep, "replay_local_s": loc,
                    "stages": {k: round(v["wall_s"], 2) for k, v in pL.get("stages", {}).items()},
                    "status": pL.get("status")}}

    def extra(p):
        if not p or p.get("aborted") or p.get("failed") or "resident_weight_bytes" not in p:
            return None
        return p["memory"]["peak_rss_bytes"] - p["resident_weight_bytes"]

    eL, e2L = extra(pL), extra(p2L)
    ratios["memory_2L_vs_L"] = {
        "value": _ratio(e2L, eL),
        "numbers": {"layers": [layers, 2 * layers],
                    "peak_rss_bytes": [pL.get("memory", {}).get("peak_rss_bytes"),
                                       p2L.get("memory", {}).get("peak_rss_bytes") if p2L else None],
                    "resident_weight_bytes": [pL.get("resident_weight_bytes"), p2L.get("resident_weight_bytes")],
                    "extra_bytes": [eL, e2L],
                    "stage_peaks_L": pL.get("memory", {}).get("stage_peaks_bytes"),
                    "stage_peaks_2L": (p2L or {}).get("memory", {}).get("stage_peaks_bytes"),
                    "aborted_2L": (p2L or {}).get("reason") if (p2L or {}).get("aborted") else None}}
    for k, v in ratios.items():
        v["target"] = f"{TARGETS[k][0]} {TARGETS[k][1]}"
        v["ok"] = _ok(k, v["value"])
        v.setdefault("cpu_value", v["value"])  # memory: no time involved
        v["ok_cpu"] = _ok(k, v["cpu_value"])
    return ratios


def projection(results: dict, layers: int, full_layers: int = 32) -> dict | None:
    """Linear fit (fixed + per-layer) of run_parity's stage times, peak RSS and trace bytes from the L and
    2L runs, evaluated at `full_layers`."""
    pL, p2L = results.get("parity_L"), results.get("parity_2L")
    if not pL or not p2L or p2L.get("aborted") or p2L.get("failed") or pL.get("failed"):
        return None
    L1, L2 = layers, 2 * layers
    out = {"layers": full_layers, "fit_from": [L1, L2], "stages": {}}

    def fit(a, b):
        per = (b - a) / (L2 - L1)
        fixed = a - per * L1
        return {"fixed": fixed, "per_layer": per, "at_full": fixed + per * full_layers}

    names = sorted(set(pL["stages"]) | set(p2L["stages"]))
    for n in names:
        out["stages"][n] = fit(_stage(pL, n), _stage(p2L, n))
    out["run_parity_s"] = fit(pL["run"]["wall_s"], p2L["run"]["wall_s"])
    out["peak_rss_bytes"] = fit(pL["memory"]["peak_rss_bytes"], p2L["memory"]["peak_rss_bytes"])
    out["resident_weight_bytes"] = fit(pL["resident_weight_bytes"], p2L["resident_weight_bytes"])
    # a 32-layer 7B model's float32 weights do not fit 24 GiB: the loader then keeps the checkpoint's bf16 and
    # upcasts one layer at a time (low-memory mode); its peak is the bf16 weights plus the measured extra
    extra = max(p["memory"]["peak_rss_bytes"] - p["resident_weight_bytes"] for p in (pL, p2L))
    storage = 2 if p2L.get("storage_dtype", "torch.float32") == "torch.float32" else 1
    out["peak_rss_low_memory_bytes"] = out["resident_weight_bytes"]["at_full"] / storage + extra
    tb = [p.get("compare", {}).get("trace_bytes_on_disk") for p in (pL, p2L)]
    if None not in tb:
        out["trace_bytes_on_disk"] = fit(*tb)
    return out


def render(summary: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    con = Console(width=int(os.environ.get("BENCH_WIDTH", "170")))
    r = summary["ratios"]
    t = Table(title=f"parity bench - {summary['config']['describe']}", show_lines=False)
    for col in ("measure", "wall ratio", "cpu ratio", "target", "ok (wall/cpu)", "numbers behind it"):
        t.add_column(col, overflow="fold")

    def f(x, nd=3):
        return "-" if x is None else (f"{x:.{nd}f}" if isinstance(x, float) else str(x))

    def gb(x):
        return "-" if x is None else f"{x / GIB:.2f} GiB"

    def s_(x):
        return "-" if x is None else f"{x:.1f} s"

    rows = []
    c = r["capture_overhead"]["numbers"]
    rows.append(("capture overhead", r["capture_overhead"],
                 f"capture {s_(c['capture_fp32_s'])} / forward {s_(c['reference_fp32_s'])}; trace "
                 f"{gb(c['trace_bytes_fp32'])}; with every PLoRA part (--keep-traces) "
                 f"{s_(c.get('capture_all_parts_s'))} = {f(c.get('all_parts_ratio'))}, {gb(c.get('trace_bytes_all_parts'))}"))
    c = r["replay_vs_reference"]["numbers"]
    rows.append(("replay / reference (fp32)", r["replay_vs_reference"],
                 f"replay {s_(c['replay_fp32_s'])} / reference {s_(c['reference_fp32_s'])}; e2e + local in one pass "
                 f"{s_(c['replay_pair_fp32_s'])} = {f(c['pair_vs_two_runs'])} x two runs"))
    c = r["compare_vs_memcpy"]["numbers"]
    rows.append(("compare / memcpy", r["compare_vs_memcpy"],
                 f"{gb(c['compare_bytes'])} in {s_(c['compare_s'])} (first call {s_(c.get('compare_first_s'))}) = "
                 f"{(c['compare_bytes_per_s'] or 0) / GIB:.2f} GiB/s vs memcpy "
                 f"{(c['memcpy_bytes_per_s'] or 0) / GIB:.2f} GiB/s"))
    c = r["run_vs_forwards"]["numbers"]
    rows.append(("run_parity / forwards", r["run_vs_forwards"],
                 f"run {s_(c['run_parity_s'])} / forwards {s_(c['forwards_needed_s'])} (fp32 {s_(c['reference_fp32_s'])}"
                 f" + replay {s_(c['replay_e2e_s'])}); teacher-forced replay alone {s_(c['replay_local_s'])}"))
    c = r["memory_2L_vs_L"]["numbers"]
    ex = c["extra_bytes"]
    rows.append((f"memory {c['layers'][1]}L / {c['layers'][0]}L", r["memory_2L_vs_L"],
                 f"peak {gb(c['peak_rss_bytes'][0])} / {gb(c['peak_rss_bytes'][1])}, resident fp32 weights "
                 f"{gb(c['resident_weight_bytes'][0])} / {gb(c['resident_weight_bytes'][1])}, extra "
                 f"{gb(ex[0])} / {gb(ex[1])}" + (f"; 2L ABORTED: {c['aborted_2L']}" if c.get("aborted_2L") else "")))
    def yn(x):
        return "-" if x is None else ("yes" if x else "NO")

    for name, d, nums in rows:
        t.add_row(name, f(d.get("value")), f(d.get("cpu_value")), d["target"], f"{yn(d.get('ok'))}/{yn(d.get('ok_cpu'))}",
                  nums)
    con.print(t)
    p = summary.get("projection")
    if p:
        con.print(f"Projection to {p['layers']} layers (linear fit of the {p['fit_from']}-layer runs): run_parity "
                  f"{p['run_parity_s']['at_full'] / 60:.0f} min, peak RSS {p['peak_rss_bytes']['at_full'] / GIB:.1f} GiB "
                  f"with float32 weights, {p['peak_rss_low_memory_bytes'] / GIB:.1f} GiB in low-memory mode (bf16 "
                  "weights, upcast per layer), "
                  f"traces on disk {p.get('trace_bytes_on_disk', {}).get('at_full', 0) / GIB:.0f} GiB")
    con.print(f"machine: {summary['machine']['describe']}")


def machine_info() -> dict:
    import torch

    cpu = ""
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {"cpu": cpu, "cores": os.cpu_count(), "mem_total_bytes": memwatch.mem_total(),
            "mem_available_bytes": memwatch.mem_available(), "loadavg": os.getloadavg(),
            "torch": torch.__version__, "python": platform.python_version()}
    info["describe"] = (f"{cpu or platform.processor()} x{info['cores']}, {info['mem_total_bytes'] / GIB:.0f} GiB RAM, "
                        f"torch {torch.__version__}, load avg {info['loadavg'][0]:.1f} at start")
    return info


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=2, help="decoder layers L of the model (memory also at 2L)")
    ap.add_argument("--rows", type=int, default=None, help="prompt rows (default 1300; --quick: the default case)")
    ap.add_argument("--vocab", type=int, default=8192,
                    help="vocabulary (default 8192; XComposer2-7b's is 92544, see README)")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                    help="torch intra-op threads in the children (1 gives clean CPU-time ratios on a loaded machine)")
    ap.add_argument("--repeat", type=int, default=2, help="timed repeats of the key forwards (min is used)")
    ap.add_argument("--quick", action="store_true", help="tiny shapes (smoke test), not 7B")
    ap.add_argument("--no-memory", action="store_true", help="skip the 2L run (memory ratio, projection)")
    ap.add_argument("--memory-only", action="store_true",
                    help="only run_parity at --layers (peak RSS; e.g. --layers 8 for the 8-layer claim)")
    ap.add_argument("--low-memory", action="store_true",
                    help="run_parity keeps the reference weights in the checkpoint dtype and upcasts one layer at a "
                         "time (what a 32-layer 7B model gets automatically on a 24 GiB machine)")
    ap.add_argument("--profile", action="store_true", help="cProfile one capture and one traced replay")
    ap.add_argument("--image-size", type=int, default=490,
                    help="the image's side in pixels, 14-px patches (default 490: 35 x 35 = 1,225 image rows)")
    ap.add_argument("--full", action="store_true",
                    help="the full-size run: one run_parity of a 32-layer (or --layers) 7B-shaped model at the real vocabulary "
                         "(92,544), low-memory mode, every core; wall time and peak memory into --out; the model "
                         "and workspace (~31 GiB) are removed afterwards (--keep-model keeps them)")
    ap.add_argument("--keep-model", action="store_true", help="with --full: keep the model and workspace")
    ap.add_argument("--reuse-stale-model", action="store_true",
                    help="use a complete cached model even if parity's fixture code changed since it was built "
                         "(recorded in the JSON)")
    ap.add_argument("--prepare-only", action="store_true",
                    help="build and convert the models, then stop (so the measured run starts from a cached model)")
    ap.add_argument("--reuse", action="store_true",
                    help="reuse child results already under ROOT/results (delete one to re-measure it)")
    ap.add_argument("--root", default=str(REPO / ".cache" / "bench"), help="cache of models/workspaces/results")
    ap.add_argument("--out", default=str(REPO / "reports" / "bench.json"))
    ap.add_argument("--min-available-gib", type=float, default=1.5,
                    help="a child stops itself when the machine's MemAvailable drops below this")
    ap.add_argument("--min-disk-gib", type=float, default=12.0,
                    help="a child stops itself when free disk under --root drops below this")
    # child protocol (internal)
    ap.add_argument("--child", choices=("convert", "forwards", "parity"), help=argparse.SUPPRESS)
    ap.add_argument("--model", help=argparse.SUPPRESS)
    ap.add_argument("--workspace", help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    ap.add_argument("--image-rows", default="0", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        return run_child(args)

    from benchmarks.models import REAL_VOCAB, bench_spec, ensure_model, spec_dict, weight_bytes

    if args.full:  # an explicit --layers / --threads still wins (a dry run with fewer layers)
        given = {a.split("=")[0] for a in (argv if argv is not None else sys.argv[1:])}
        args.vocab, args.low_memory, args.memory_only = REAL_VOCAB, True, True
        if "--layers" not in given:
            args.layers = 32
        if "--threads" not in given:
            args.threads = os.cpu_count() or 1
        if args.out == ap.get_default("out"):
            args.out = str(REPO / "reports" / "bench-full.json")
    if args.layers < 1 or args.repeat < 1:
        ap.error("--layers and --repeat must be >= 1")
    vocab = args.vocab
    if args.rows is None and not args.quick:
        args.rows = 1300
    root = Path(args.root)
    root.mkdir(parents=True, exist_ok=True)
    L = args.layers
    depths = [L] if (args.no_memory or args.memory_only) else [L, 2 * L]
    specs = {n: bench_spec(n, vocab, args.quick, image_size=args.image_size) for n in depths}
    args.image_rows_for_model = specs[L].image_tokens
    describe = (f"{'quick (tiny shapes)' if args.quick else '7B shapes'}: hidden {specs[L].hidden}, inter "
                f"{specs[L].intermediate}, heads {specs[L].heads}/{specs[L].kv_heads}, head_dim {specs[L].head_dim}, "
                f"PLoRA rank {specs[L].lora_layout()['attention.wqkv'][0]}, vocab {specs[L].vocab}, "
                f"L={L}, rows {args.rows or 'default'} ({specs[L].image_tokens} image), {args.threads} thread(s)")
    summary: dict = {"config": {"describe": describe, "layers": L, "rows": args.rows, "repeat": args.repeat,
                                "threads": args.threads, "vocab": vocab, "low_memory": args.low_memory,
                                "quick": args.quick, "spec": spec_dict(specs[L]), "weights": weight_bytes(specs[L])},
                     "machine": machine_info(), "results": {}, "timing": {}}
    log(f"[bench] {describe}")
    models, workspaces = {}, {}
    for n, spec in specs.items():
        with Clock() as c:
            models[n] = ensure_model(spec, root, reuse_stale=args.reuse_stale_model)
        if args.reuse_stale_model:
            summary["model_stamp"] = json.loads((models[n].parent / f".{models[n].name}.stamp.json").read_text())
        summary["timing"][f"model_L{n}"] = c.result()
        conv = spawn(args, "convert", models[n], None, f"convert-L{n}")
        summary["results"][f"convert_L{n}"] = conv
        if conv.get("failed") or conv.get("aborted"):
            log(f"[bench] conversion of {models[n]} failed: {conv}")
            write_json(Path(args.out), summary)
            return 1
        workspaces[n] = Path(conv["workspace"])

    res = summary["results"]
    if args.prepare_only:
        write_json(Path(args.out).with_name(Path(args.out).stem + "-prepare.json"), summary)
        log(f"[bench] prepared: {', '.join(str(m) for m in models.values())}")
        return 0
    if args.memory_only:
        res["parity_L"] = spawn(args, "parity", models[L], workspaces[L], f"parity-L{L}")
        summary["machine"]["loadavg_end"] = os.getloadavg()
        summary["machine"]["mem_available_end_bytes"] = memwatch.mem_available()
        if args.full and not args.keep_model:  # ~31 GiB of checkpoint and workspace
            for n in depths:
                shutil.rmtree(models[n], ignore_errors=True)
                (models[n].parent / f".{models[n].name}.stamp.json").unlink(missing_ok=True)
                shutil.rmtree(workspaces[n], ignore_errors=True)
            summary["removed"] = [str(models[n]) for n in depths] + [str(workspaces[n]) for n in depths]
        summary["memory_only"] = {k: {"peak_rss_bytes": v.get("memory", {}).get("peak_rss_bytes", v.get("peak_rss_bytes")),
                                      "aborted": v.get("aborted", False), "reason": v.get("reason"),
                                      "stage": v.get("stage"), "run": v.get("run"),
                                      "stage_peaks_bytes": v.get("memory", {}).get("stage_peaks_bytes",
                                                                                   v.get("stage_peaks_bytes"))}
                                  for k, v in res.items() if k.startswith("parity")}
        write_json(Path(args.out), summary)
        print(json.dumps(summary["memory_only"], indent=1, default=_json_default))
        return 0

    res["forwards"] = spawn(args, "forwards", models[L], workspaces[L], f"forwards-L{L}")
    res["parity_L"] = spawn(args, "parity", models[L], workspaces[L], f"parity-L{L}")
    if 2 * L in models:
        res["parity_2L"] = spawn(args, "parity", models[2 * L], workspaces[2 * L], f"parity-L{2 * L}")
    summary["ratios"] = compute(res, L)
    summary["projection"] = projection(res, L)
    summary["machine"]["loadavg_end"] = os.getloadavg()
    write_json(Path(args.out), summary)
    render(summary)
    failed = [k for k, v in res.items() if v.get("failed")]
    if failed:
        log(f"[bench] children failed: {failed}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
