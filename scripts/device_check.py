#!/usr/bin/env python
"""The prepared GPU check (issue 20): the same parity runs on the GPU and on the CPU, compared.

On a development machine (this project's venv):

    python scripts/device_check.py pack                # -> .device-pack/deps.tar.gz (at most 64 MiB)

On a machine with a CUDA GPU, from a copy of the repository with .device-pack/ beside it:

    python scripts/device_check.py run [--layers 2] [--out DIR]

`pack` bundles the Python packages the GPU machines we can reach lack or hold in another major version
(they have their own torch 2.11 / CUDA 13 and transformers 5.x and no package registry): transformers 4.x,
lmdeploy 0.7.1's Python part (its converter; the compiled TurboMind, 488 MB and built for CUDA 12, stays
behind), and parity's other pure-Python needs. `run` unpacks them in front of the machine's own packages
(compiled ones built for another Python are dropped, so the machine's own copies are used) and then:

1. runs every built-in fixture (fp32 and emulate) and a broken workspace (layer 1's feed_forward.w2 lora_b
   zeroed) with `--device cuda` and with `--device cpu`;
2. runs a 7B-shaped model (hidden 4096, 32 heads, 8 kv heads, intermediate 14336, rank-256 PLoRA, a 490 px
   image; `--layers` decoder layers, 8,192-token vocabulary) the same two ways, timed;
3. compares each GPU report with its CPU twin: the same verdict, first divergence and error findings, and
   every point's error within the noise floor of the CPU's (|gpu - cpu| <= max(floors); where no verdict
   needed the floor, so it was not measured, within the threshold); prints a short table
   and writes everything to OUT/device_check.json. Exit 0 when every pair agrees, 1 when one does not, 2 when
   the machine cannot run the check (no CUDA; a missing package, named).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
PACK = REPO / ".device-pack"
PACK_LIMIT = 64 << 20
CHILD_ENV = "PARITY_DEVICE_CHECK_SITE"
# distributions bundled by `pack` (lmdeploy without lib/, its compiled engine)
PACKED = (
    "transformers", "tokenizers", "huggingface-hub", "safetensors", "accelerate", "lmdeploy", "mmengine-lite",
    "addict", "termcolor", "yapf", "platformdirs", "tomli", "rich", "markdown-it-py", "mdurl", "pygments",
    "jinja2", "markupsafe", "plotly", "narwhals", "pyyaml", "fire", "shortuuid", "partial-json-parser",
    "sentencepiece", "pydantic", "pydantic-core", "annotated-types", "typing-inspection", "tqdm", "regex",
    "filelock", "fsspec", "packaging", "psutil",
)
SKIP_FILES = re.compile(r"(^lmdeploy/lib/|__pycache__/|\.pyc$)")


# ============================================================================================ pack


def pack(out: Path, names=PACKED, limit: int = PACK_LIMIT) -> dict[str, Any]:
    """Write out/deps.tar.gz with the installed files of `names` (dist-info included, so version checks by
    importlib.metadata see them). Refuses (exit 2) past `limit` bytes."""
    from importlib import metadata

    out.mkdir(parents=True, exist_ok=True)
    target = out / "deps.tar.gz"
    tmp = out / ".deps.tar.gz.tmp"
    packed, missing = {}, []
    with tarfile.open(tmp, "w:gz") as tar:
        for name in names:
            try:
                dist = metadata.distribution(name)
            except metadata.PackageNotFoundError:
                missing.append(name)
                continue
            root = Path(dist.locate_file(""))
            count = 0
            for f in dist.files or []:
                rel = str(f).replace("\\", "/")
                if rel.startswith("..") or SKIP_FILES.search(rel):
                    continue
                path = root / rel
                if path.is_file():
                    tar.add(path, arcname=rel, recursive=False)
                    count += 1
            packed[name] = {"version": dist.version, "files": count}
    size = tmp.stat().st_size
    if size > limit:
        tmp.unlink()
        raise SystemExit(f"device_check pack: {size / 2**20:.1f} MiB is over the {limit / 2**20:.0f} MiB a transfer "
                         "may carry; drop packages from PACKED.")
    os.replace(tmp, target)
    info = {"size_bytes": size, "packed": packed, "missing": missing,
            "python": sysconfig.get_config_var("SOABI")}
    (out / "pack.json").write_text(json.dumps(info, indent=1) + "\n")
    return info


def unpack(pack_dir: Path, site: Path) -> list[str]:
    """Extract the pack into `site` and drop compiled packages built for another Python (their pure-Python
    siblings stay). Returns the top-level names dropped."""
    if site.exists():
        shutil.rmtree(site)
    site.mkdir(parents=True)
    with tarfile.open(pack_dir / "deps.tar.gz") as tar:
        tar.extractall(site, filter="data")
    return drop_foreign_binaries(site, sysconfig.get_config_var("EXT_SUFFIX") or ".so")


def drop_foreign_binaries(site: Path, ext_suffix: str) -> list[str]:
    """Remove every top-level package (and its dist-info) holding an extension module tagged for another
    CPython (`.cpython-311-x86_64-linux-gnu.so` on a 3.12 machine); abi3 and untagged modules stay."""
    tag = re.compile(r"\.cpython-\d+[a-z]*-[^.]+\.so$")
    dropped = []
    for top in sorted(p for p in site.iterdir() if p.is_dir() and not p.name.endswith(".dist-info")):
        if any(tag.search(f.name) and not f.name.endswith(ext_suffix) for f in top.rglob("*.so")):
            shutil.rmtree(top)
            dropped.append(top.name)
    for info in site.glob("*.dist-info"):
        record = info / "RECORD"
        tops = {line.split("/", 1)[0] for line in record.read_text().splitlines()} if record.is_file() else set()
        if tops & set(dropped):
            shutil.rmtree(info)
    return dropped


# ============================================================================================ comparison


def _key(f: dict) -> tuple:
    return (f.get("case"), f.get("check"), f.get("cause"), f.get("layer"), f.get("module"))


def compare_reports(cpu: dict, gpu: dict) -> dict[str, Any]:
    """How a GPU report (report.json dict) differs from its CPU twin: verdict, first divergence, error
    findings, and per point the end-to-end and local relative errors against max(floors)."""
    problems: list[str] = []
    if cpu["status"] != gpu["status"]:
        problems.append(f"status cpu={cpu['status']} gpu={gpu['status']}")
    fd = ("layer", "module", "positions", "cause", "case")
    a, b = cpu.get("first_divergence"), gpu.get("first_divergence")
    if (a is None) != (b is None) or (a and any(a.get(k) != b.get(k) for k in fd)):
        problems.append(f"first divergence cpu={a and {k: a.get(k) for k in fd}} gpu={b and {k: b.get(k) for k in fd}}")
    ea = {_key(f) for f in cpu["findings"] if f["severity"] == "error"}
    eb = {_key(f) for f in gpu["findings"] if f["severity"] == "error"}
    if ea != eb:
        problems.append(f"error findings only on cpu {sorted(ea - eb, key=str)[:3]}, only on gpu "
                        f"{sorted(eb - ea, key=str)[:3]}")
    pts = {(p["case"], p["layer"], p["module"]): p for p in cpu["layers"]}
    worst, worst_at, beyond = 0.0, None, 0
    for p in gpu["layers"]:
        q = pts.get((p["case"], p["layer"], p["module"]))
        if q is None:
            problems.append(f"point {p['case']}/{p['layer']}/{p['module']} only on gpu")
            continue
        # the noise floor; where it was not measured (no verdict needed it), the threshold the point was judged by
        floors = [x["floor"] for x in (p, q)]
        floor = max(*(float(x) for x in floors if x is not None), 1e-30) if None not in floors else \
            max(float(p["threshold"]), float(q["threshold"]))
        for side in ("e2e", "local"):
            x, y = (q.get(side) or {}).get("rel_l2"), (p.get(side) or {}).get("rel_l2")
            if x is None or y is None:
                continue
            ratio = abs(float(y) - float(x)) / floor
            if ratio > worst:
                worst, worst_at = ratio, f"{p['case']}/{p['layer']}/{p['module']}/{side}"
            beyond += ratio > 1.0
    if len(pts) != len(gpu["layers"]):
        problems.append(f"{len(pts)} points on cpu, {len(gpu['layers'])} on gpu")
    if beyond:
        problems.append(f"{beyond} point error(s) differ by more than the noise floor (worst {worst:.2f}x at "
                        f"{worst_at})")
    return {"agree": not problems, "problems": problems, "worst_vs_floor": worst, "worst_at": worst_at,
            "status": (cpu["status"], gpu["status"])}


# ============================================================================================ runs


def _run_pair(name: str, model: Path, out: Path, device: str, **options) -> dict[str, Any]:
    """The same run on `device` and on the CPU, compared (`compare_reports`)."""
    from parity.api import run

    row: dict[str, Any] = {"name": name}
    reports = {}
    for label, dev in (("device", device), ("cpu", "cpu")):
        t = time.perf_counter()
        report = run(model, trust_remote_code=True, device=dev, out=out / name / label, **options)
        row[f"{label}_s"] = round(time.perf_counter() - t, 2)
        reports[label] = report.to_dict()
    row.update(compare_reports(reports["cpu"], reports["device"]))
    return row


def _broken_workspace(model: Path, cache: Path, dest: Path) -> Path:
    from parity.deploy.convert import convert_cached
    from parity.deploy.workspace import Workspace

    src = convert_cached(model, cache / "workspaces")
    if dest.exists():
        shutil.rmtree(dest)
    shutil.copytree(src, dest, symlinks=True)
    path = Workspace.open(dest).file_path("layers.1.feed_forward.w2.lora_b.weight", 0)
    path.unlink()
    path.write_bytes(bytes(Workspace.open(src).file_path("layers.1.feed_forward.w2.lora_b.weight", 0).stat().st_size))
    return dest


def check(args) -> int:
    import torch

    from parity.device import resolve_device
    from parity.errors import ParityInputError

    try:
        placement = resolve_device(args.device)
    except ParityInputError as e:
        print(f"device_check: {e}", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cache = Path(args.cache)
    env = {"python": sys.version.split()[0], "torch": torch.__version__, "cuda": torch.version.cuda,
           "device": placement.describe()}
    import transformers

    env["transformers"] = transformers.__version__
    print(json.dumps(env), flush=True)

    from parity.fixtures import FIXTURE_NAMES, ensure

    models = ensure(cache / "fixtures")
    rows = []
    names = [n for n in FIXTURE_NAMES if not args.only or n in args.only]
    for name in names:
        for numeric in ("fp32", "emulate"):
            rows.append(_run_pair(f"{name}/{numeric}", models[name], out, args.device, numeric=numeric,
                                  cache_dir=cache))
            print(rows[-1], flush=True)
    first = models[names[0]]
    ws = _broken_workspace(first, cache, out / "broken-ws")
    rows.append(_run_pair(f"{names[0]}/broken-w2-lora_b", first, out, args.device, workspace=ws, cache_dir=cache))
    print(rows[-1], flush=True)
    if args.layers:
        sys.path.insert(0, str(REPO))
        from benchmarks.models import bench_case, bench_spec, default_image, ensure_model

        model = ensure_model(bench_spec(args.layers, vocab=args.vocab), cache / "bench")
        rows.append(_run_pair(f"7b-shaped-L{args.layers}", model, out, args.device, cache_dir=cache,
                              cases=[bench_case(default_image())]))
        print(rows[-1], flush=True)
    render(rows, args.device)
    (out / "device_check.json").write_text(json.dumps({"env": env, "rows": rows}, indent=1, default=str) + "\n")
    return 0 if all(r["agree"] for r in rows) else 1


def render(rows: list[dict], device: str) -> None:
    print(f"\n{'run':40} {'verdict':11} {device + ' s':>9} {'cpu s':>9} {'worst/floor':>11}  agree")
    for r in rows:
        verdict = f"{r['status'][1]}/{r['status'][0]}"
        print(f"{r['name']:40} {verdict:11} {r['device_s']:9.2f} {r['cpu_s']:9.2f} {r['worst_vs_floor']:11.3f}  "
              f"{'yes' if r['agree'] else 'NO: ' + '; '.join(r['problems'])}")


# ============================================================================================ main


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("pack", help="bundle the packages the GPU machine lacks (on the dev machine)")
    p.add_argument("--out", type=Path, default=PACK)
    r = sub.add_parser("run", help="GPU vs CPU parity runs (on the GPU machine)")
    r.add_argument("--pack", type=Path, default=PACK)
    r.add_argument("--device", default="cuda", help="the device compared with cpu (default cuda)")
    r.add_argument("--layers", type=int, default=2, help="decoder layers of the 7B-shaped model (0: skip it)")
    r.add_argument("--vocab", type=int, default=8192)
    r.add_argument("--only", nargs="*", help="fixture names to run (default: all)")
    r.add_argument("--out", default=os.environ.get("OUT") or "reports/device-check")
    r.add_argument("--cache", default=str(REPO / ".cache"))
    args = ap.parse_args(argv)
    if args.cmd == "pack":
        info = pack(args.out)
        print(f"packed {len(info['packed'])} distributions, {info['size_bytes'] / 2**20:.1f} MiB -> "
              f"{args.out / 'deps.tar.gz'} (not installed here: {info['missing'] or 'none'})")
        return 0
    if os.environ.get(CHILD_ENV) is None and (args.pack / "deps.tar.gz").is_file():
        site = Path(tempfile.mkdtemp(prefix="parity-device-site-"))
        dropped = unpack(args.pack, site)
        if dropped:
            print(f"device_check: using this machine's own {', '.join(dropped)} (the packed ones are built for "
                  "another Python)", file=sys.stderr)
        env = dict(os.environ, **{CHILD_ENV: str(site)})
        env["PYTHONPATH"] = os.pathsep.join([str(site), str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
        try:
            return subprocess.call([sys.executable, __file__, *(argv if argv is not None else sys.argv[1:])], env=env)
        finally:
            shutil.rmtree(site, ignore_errors=True)
    sys.path.insert(0, str(REPO))
    return check(args)


if __name__ == "__main__":
    sys.exit(main())
