#!/usr/bin/env python
"""Decode cost at real 7B layer shapes (`make bench` runs it after bench.py; `--help`).

Measures, for the replay decoder (`parity.deploy.decode.ReplayDecoder`, emulate mode, one torch thread):

  decode step / prefill row   mean wall time of one decode step (one generated token through every layer and the
                              LM head, reading the KV cache) / the replay prefill's wall time per prompt row
  memory 2N / N               peak RSS of a child decoding 2N tokens / of a child decoding N tokens

The model is the benchmark's 7B-shaped one (`benchmarks/models.py`: hidden 4096, 32/8 heads, intermediate
14336, rank-256 PLoRA on every linear) with --layers decoder layers, converted with lmdeploy's converter. The
prompt is built directly as an engine call (no reference model): --rows rows, of which 1,225 are one image's
(random features). A decode step runs one row per linear, so it costs what a skinny matrix-vector product over
the layer's weights costs, while a prefill row shares each weight pass with every other row: the ratio is
how many prompt rows one generated token costs.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


def _setup(args):
    import torch

    from benchmarks.models import bench_spec, ensure_model
    from parity.deploy.convert import convert_cached
    from parity.deploy.replay import ReplayEngine
    from parity.deploy.versions import semantics_for_run
    from parity.deploy.workspace import Workspace
    from parity.records import EngineCall

    torch.set_num_threads(args.threads)
    root = Path(args.root)
    spec = bench_spec(args.layers, vocab=args.vocab, quick=args.quick)
    model = ensure_model(spec, root)
    ws = Workspace.open(convert_cached(model, root / "workspaces"))
    eng = ReplayEngine(ws, semantics_for_run("0.7.1"), numeric="emulate")
    g = torch.Generator().manual_seed(0)
    image = min(1225, args.rows - 2)
    ids = torch.randint(0, ws.model.vocab_size, (args.rows,), generator=g).tolist()
    feats = torch.randn(image, ws.model.hidden_units, generator=g) * 0.02
    call = EngineCall(ids, [feats], [(1, 1 + image)], "bench")
    return eng, call


def child(args) -> dict:
    from benchmarks.bench import NullWriter
    from parity.deploy.decode import ReplayDecoder

    eng, call = _setup(args)
    out: dict = {"rows": args.rows, "steps": args.steps}
    if args.prefill:
        eng.run(call, NullWriter(Path("/nonexistent")))  # warm-up: page in the workspace
        t = time.perf_counter()
        eng.run(call, NullWriter(Path("/nonexistent")))
        out["prefill_s"] = time.perf_counter() - t
    dec = ReplayDecoder(eng)
    tokens = [int(i) for i in call.input_ids[-args.steps - 1:]][: args.steps + 1]
    times = []
    t = time.perf_counter()
    for step in dec.run(call, tokens, teacher=None):
        now = time.perf_counter()
        times.append(now - t)
        t = now
    out["decoder_prefill_s"] = times[0]
    out["step_s"] = times[1:]
    out["cache_bytes"] = dec.info.get("cache_bytes")
    out["peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return out


def spawn(args, steps: int, prefill: bool) -> dict:
    cmd = [sys.executable, __file__, "--child", "--steps", str(steps), "--rows", str(args.rows), "--layers",
           str(args.layers), "--vocab", str(args.vocab), "--threads", str(args.threads), "--root", args.root]
    if prefill:
        cmd.append("--prefill")
    if args.quick:
        cmd.append("--quick")
    res = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if res.returncode != 0:
        raise SystemExit(f"decode bench child failed:\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=1, help="decoder layers of the 7B-shaped model (default 1)")
    ap.add_argument("--rows", type=int, default=1300, help="prompt rows (default 1300, 1,225 of them image rows)")
    ap.add_argument("--steps", type=int, default=32, help="generated tokens N (memory also at 2N; default 32)")
    ap.add_argument("--vocab", type=int, default=8192, help="vocabulary of the model (default 8192)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1: clean ratios on a shared CPU)")
    ap.add_argument("--quick", action="store_true", help="tiny shapes (smoke test), not 7B")
    ap.add_argument("--root", default=str(REPO / ".cache" / "bench"), help="model/workspace cache (default .cache/bench)")
    ap.add_argument("--out", default=str(REPO / "reports" / "bench-decode.json"), help="JSON results")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--prefill", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps(child(args)))
        return 0
    n = spawn(args, args.steps, prefill=True)
    n2 = spawn(args, 2 * args.steps, prefill=True)  # the same work but the steps: peaks comparable
    steps = n["step_s"][1:] or n["step_s"]  # the first decode step also faults in the decoder's buffers
    step = sum(steps) / len(steps)
    row = n["prefill_s"] / args.rows
    summary = {
        "decode_step_vs_prefill_row": step / row,
        "memory_2N_vs_N": n2["peak_rss_bytes"] / n["peak_rss_bytes"],
        "numbers": {"step_s": step, "prefill_row_s": row, "prefill_s": n["prefill_s"], "rows": args.rows,
                    "N": args.steps, "layers": args.layers, "vocab": args.vocab, "threads": args.threads,
                    "peak_rss_N": n["peak_rss_bytes"], "peak_rss_2N": n2["peak_rss_bytes"],
                    "cache_bytes_N": n["cache_bytes"], "cache_bytes_2N": n2["cache_bytes"]},
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(summary, indent=1))
    print(f"decode step / prefill row : {summary['decode_step_vs_prefill_row']:.1f}  "
          f"(step {step * 1e3:.1f} ms, prefill row {row * 1e3:.2f} ms; {args.layers} layer(s), emulate)")
    print(f"memory 2N / N             : {summary['memory_2N_vs_N']:.3f}  "
          f"(peak RSS {n['peak_rss_bytes'] / 2**30:.2f} / {n2['peak_rss_bytes'] / 2**30:.2f} GiB at N={args.steps} / "
          f"{2 * args.steps}; KV cache {n['cache_bytes']} / {n2['cache_bytes']} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
