#!/usr/bin/env python
"""int4 (W4A16) replay / fp replay at real 7B layer shapes (issue 17; goal <= 1.5): `make bench` runs it.

The 7B-shaped benchmark model (benchmarks/models.py, few layers) is converted with lmdeploy's converter; its int4
twin is written in TurboMind's int4 workspace layout (the one `parity.quant.workspace` reads and tests against
lmdeploy's own `model_format='awq'` conversion) by round-to-nearest of every linear's weight at group size 128
(`parity.quant.pack.quantize_rtn`; lmdeploy's AWQ on a 7B-shaped model would take far longer on CPU and gives the
same layout). Both are replayed on the same input (ReplayEngine.run, no trace written), fp32 and emulate mode,
min over --repeat; the ratio is int4 / fp. Writes --out (JSON) and prints one line per mode.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

GOAL = 1.5
GROUP = 128


def int4_twin(fp_ws: Path, dest: Path) -> Path:
    """`dest`: fp_ws with every linear weight as int4 files (qweight/scales/zeros), the rest as fp16."""
    import torch
    import yaml

    from parity.deploy import layout
    from parity.deploy.workspace import Workspace, write_workspace
    from parity.quant.pack import pack_rows, quantize_rtn

    stamp = dest / "int4-twin.json"
    if stamp.is_file() and json.loads(stamp.read_text()).get("source") == str(fp_ws):
        return dest
    shutil.rmtree(dest, ignore_errors=True)
    ws = Workspace.open(fp_ws)
    if ws.model.tp != 1:
        raise SystemExit("the int4 twin is written for tp=1 workspaces")
    cfg = yaml.safe_load((ws.weights_dir / "config.yaml").read_text())
    cfg["model_config"].update(weight_type="int4", group_size=GROUP, model_format="awq")
    write_workspace(dest, cfg, {})
    weights = dest / "triton_models" / "weights"
    for name in ws.names():
        t = ws.tensor(name)
        _, linear, kind = layout.parse_name(name)
        spec = ws.spec(name)
        if kind == "weight" and linear in layout.HF_LINEAR_OF_TM:
            q, z, s = quantize_rtn(t.float(), 4, GROUP)
            stem = name[: -len(".weight")]
            pack_rows(q).numpy().tofile(weights / f"{stem}.0.qweight")
            s.view(torch.int16).numpy().tofile(weights / f"{stem}.0.scales")
            z.view(torch.int16).numpy().tofile(weights / f"{stem}.0.zeros")
            continue
        fname = name if spec.rule == layout.RULE_NONE else layout.rank_file_name(name, 0)
        t.to(torch.float16).contiguous().view(torch.int16).numpy().tofile(weights / fname)
    stamp.write_text(json.dumps({"source": str(fp_ws)}))
    return dest


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=1, help="decoder layers of the 7B-shaped model (default: 1)")
    ap.add_argument("--vocab", type=int, default=8192, help="vocabulary (default: 8192)")
    ap.add_argument("--rows", type=int, default=0, help="prompt rows (default: the image case, 1,225 image rows)")
    ap.add_argument("--repeat", type=int, default=2, help="timings per mode; the minimum counts (default: 2)")
    ap.add_argument("--quick", action="store_true", help="the small quick spec (smoke test; default: 7B shapes)")
    ap.add_argument("--root", type=Path, default=REPO / ".cache" / "bench", help="cache (default: .cache/bench)")
    ap.add_argument("--out", type=Path, default=REPO / "reports" / "bench-int4.json",
                    help="JSON results (default: reports/bench-int4.json)")
    args = ap.parse_args(argv)

    import torch

    from benchmarks.bench import NullWriter, _prepare, case_for_rows
    from benchmarks.models import bench_spec, ensure_model
    from parity.deploy.compat import installed_lmdeploy_version
    from parity.deploy.convert import convert_cached
    from parity.deploy.replay import ReplayEngine
    from parity.deploy.versions import semantics_for
    from parity.deploy.workspace import Workspace
    from parity.reference.loader import load_reference

    torch.set_num_threads(max(1, torch.get_num_threads()))
    spec = bench_spec(args.layers, args.vocab, args.quick)
    model = ensure_model(spec, args.root / "models")
    fp_ws = convert_cached(model, args.root / "workspaces")
    q_ws = int4_twin(fp_ws, args.root / "int4" / fp_ws.name)
    ref = load_reference(model, True, torch.float32)
    _, _, ecall = _prepare(ref, case_for_rows(model, args.rows or None, spec.image_tokens))
    del ref
    semantics = semantics_for(installed_lmdeploy_version())
    null = args.root / "tmp" / "null"
    out: dict = {"spec": {"layers": args.layers, "hidden": spec.hidden, "intermediate": spec.intermediate,
                          "rows": len(ecall.input_ids), "group_size": GROUP}, "goal": f"<= {GOAL}", "modes": {}}
    for numeric in ("fp32", "emulate"):
        times = {}
        for side, path in (("fp", fp_ws), ("int4", q_ws)):
            ws = Workspace.open(path)
            best = float("inf")
            for _ in range(args.repeat):
                engine = ReplayEngine(ws, semantics, numeric=numeric)
                t = time.perf_counter()
                engine.run(ecall, NullWriter(null))
                best = min(best, time.perf_counter() - t)
            times[side] = best
        ratio = times["int4"] / times["fp"]
        out["modes"][numeric] = {"fp_s": times["fp"], "int4_s": times["int4"], "ratio": ratio, "ok": ratio <= GOAL}
        print(f"int4 replay / fp replay ({numeric}, {args.layers} layer(s) of hidden {spec.hidden}, "
              f"{len(ecall.input_ids)} rows): "
              f"{times['int4']:.2f} s / {times['fp']:.2f} s = {ratio:.2f} (goal <= {GOAL}) "
              f"{'ok' if ratio <= GOAL else 'OVER'}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
