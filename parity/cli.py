"""`parity` command line. Exit codes: 0 pass, 1 divergence found, 2 bad input or usage (one paragraph, no
traceback)."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path

from rich.console import Console

from . import progress
from .errors import ParityInputError, followable
from .places import CACHE_ENV, REPORTS_ROOT, default_cache_dir, default_report_dir
from .scratch import Terminated, out_lock, run_scratch, terminate_as_exception

err = Console(stderr=True, highlight=False)


def out_console() -> Console:
    """stdout for people and for CI logs: on a terminal rich wraps at its width; elsewhere (a pipe, a CI log)
    nothing is wrapped at rich's default 80 columns, so a finding or a path stays one greppable line."""
    return Console(highlight=False, soft_wrap=not sys.stdout.isatty())


class _HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Every option's help ends with its default, when it has one worth showing."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        shown = action.default not in (None, False, argparse.SUPPRESS) and not isinstance(action.default, list)
        if shown and "%(default)" not in text and "default" not in text and action.option_strings:
            text += " (default: %(default)s)"
        return text


class _Parser(argparse.ArgumentParser):
    """argparse, with its usage errors in parity's one-paragraph form (exit 2) and defaults in its help."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("formatter_class", _HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> None:  # type: ignore[override]
        err.print(f"[bold red]parity: error:[/] {message} (see `{self.prog} --help`).", soft_wrap=True)
        raise SystemExit(2)


def user_path(text: str) -> Path:
    """A path argument; one that cannot be looked up (a symlink loop) is bad input before any work."""
    return followable(text, "Path")


def _version() -> str:
    """parity's version and the lmdeploy / torch it runs with (read from package metadata: no heavy imports)."""
    from importlib.metadata import PackageNotFoundError, version

    from .version import __version__

    def installed(name: str) -> str:
        try:
            return version(name)
        except PackageNotFoundError:
            return "not installed"

    return f"parity {__version__} (lmdeploy {installed('lmdeploy')}, torch {installed('torch')}, " \
           f"transformers {installed('transformers')})"


def _hub_model(p: argparse.ArgumentParser) -> None:
    p.add_argument("--hub-model", action="append", default=[], metavar="ID=PATH",
                   help="a local folder for a hub model the model's code loads by id (XComposer2: "
                        "openai/clip-vit-large-patch14-336); default: the offline HF cache (HF_HOME)")


def _common_model(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", type=user_path, help="HF model folder (XComposer2 remote-code layout)")
    p.add_argument("--trust-remote-code", action="store_true",
                   help="allow running the model's own modeling code (required for XComposer2 checkpoints)")
    _hub_model(p)


def _cache_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--cache-dir", type=user_path, default=default_cache_dir(), metavar="DIR",
                   help=f"conversion cache (workspaces, fixtures); ${CACHE_ENV} moves it")


def _threshold_options(p: argparse.ArgumentParser) -> None:
    """One flag per numeric threshold; the default shown is Thresholds' own (pyproject.toml may change it)."""
    from .compare.thresholds import THRESHOLD_FLAGS, Thresholds

    defaults = Thresholds()
    for name, meaning in THRESHOLD_FLAGS.items():
        p.add_argument(f"--{name.replace('_', '-')}", type=float, metavar="X",
                       help=f"{meaning} (default: {getattr(defaults, name):g}, or [tool.parity] {name} in "
                            "./pyproject.toml)")


def build_parser() -> argparse.ArgumentParser:
    ap = _Parser(prog="parity", description=__doc__)
    ap.add_argument("--version", action="version", version=_version(),
                    help="print parity's version and the lmdeploy, torch and transformers it runs with")
    sub = ap.add_subparsers(dest="command", required=True, metavar="COMMAND")

    f = sub.add_parser("fixtures", help="generate the built-in tiny fixture models")
    f.add_argument("--out", type=user_path, default=default_cache_dir() / "fixtures", metavar="DIR",
                   help="folder to write the fixture models into")

    c = sub.add_parser("convert", help="convert a model with lmdeploy's own converter (on CPU)")
    c.add_argument("model", type=user_path, help="HF model folder to convert")
    c.add_argument("--out", type=user_path, required=True, metavar="WS",
                   help="workspace folder to write (replaced atomically)")
    c.add_argument("--tp", type=int, default=1, help="tensor-parallel shards to write (a power of two)")
    c.add_argument("--lmdeploy-defaults", action="store_true",
                   help="ignore a parity disguise's parity_lora_config.json and bias setting (convert as plain "
                        "`lmdeploy convert` does)")

    lm = sub.add_parser("lmdeploy", help="run lmdeploy's own CLI (serve api_server, chat, convert, ...) with parity's "
                                         "registration active, so a disguise gets its LoRA settings and biases",
                        description="parity lmdeploy -- ARGS: runs `lmdeploy ARGS` in this process after "
                                    "parity.disguise.register_lora_config() (every folder with a "
                                    "parity_lora_config.json gets its lora_config and q/k/v biases).")
    lm.add_argument("lmdeploy_args", nargs=argparse.REMAINDER, help="lmdeploy's own arguments, after --")

    d = sub.add_parser("disguise", help="rewrite a Qwen2-based PLoRA model as an XComposer2 checkpoint for lmdeploy")
    d.add_argument("src", type=user_path, help="HF folder of the Qwen2 PLoRA model")
    d.add_argument("dst", type=user_path, help="new folder for the XComposer2 disguise (must be absent or empty)")
    d.add_argument("--trust-remote-code", action="store_true",
                   help="read the PLoRA scales from the model's code when config.json has no plora_config")
    d.add_argument("--force", action="store_true", help="replace DST if it exists")

    q = sub.add_parser("quantize", help="AWQ W4A16 with lmdeploy's own lite code (on CPU), optionally keeping PLoRA")
    q.add_argument("model", type=user_path, help="HF model folder (XComposer2 remote-code layout) to quantize")
    q.add_argument("--trust-remote-code", action="store_true",
                   help="allow running the model's own modeling code (lmdeploy's calibration runs it; required)")
    _hub_model(q)
    q.add_argument("--out", type=user_path, required=True, metavar="DIR",
                   help="AWQ folder to write (pytorch_model.bin and config.json, as lmdeploy's auto_awq saves them)")
    q.add_argument("--w-bits", type=int, default=4, help="weight bits (default: 4; lmdeploy saves AWQ for 4 only)")
    q.add_argument("--group-size", type=int, default=128,
                   help="quantization group size (default: 128, the only one lmdeploy 0.7.1 converts)")
    q.add_argument("--calib", type=user_path, metavar="FILE",
                   help="UTF-8 text file to calibrate on (default: a small built-in text)")
    q.add_argument("--calib-samples", type=int, default=4, help="calibration batches (default: 4)")
    q.add_argument("--calib-seqlen", type=int, default=256, help="tokens per calibration batch (default: 256)")
    q.add_argument("--compensate-plora", action="store_true",
                   help="fold the smoothing scales into Plora_A/Plora_B (default: off, as lmdeploy leaves them)")
    q.add_argument("--force", action="store_true", help="replace DIR if it exists (default: refuse)")

    au = sub.add_parser("audit", help="what lmdeploy 0.7.1 would pick for a model folder, and whether it fits")
    _common_model(au)
    au.add_argument("--json", type=user_path, metavar="FILE", help="also write the audit as JSON")

    fl = sub.add_parser("faults", help="run the fault catalogue: every named fault must get its expected verdict")
    fl.add_argument("--numeric", choices=["fp32", "emulate"], default="fp32",
                    help="replay precision the faults are judged at")
    fl.add_argument("--only", nargs="*", metavar="NAME", help="fault names to run (default: all)")
    _cache_option(fl)
    fl.add_argument("--json", type=user_path, metavar="FILE", help="also write the table as JSON")

    r = sub.add_parser("run", help="compare the HF reference with the deployment, layer by layer")
    _common_model(r)
    r.add_argument("--workspace", type=user_path, metavar="WS",
                   help="converted workspace (default: convert into the cache)")
    r.add_argument("--engine", choices=["replay", "turbomind"], default="replay",
                   help="deployment side: TurboMind's math replayed on CPU, or the live engine (CUDA)")
    r.add_argument("--layers", choices=["every", "bisect"],
                   help="with --engine turbomind: per-layer values by deploying copies of the model truncated to k "
                        "layers (every layer, or bisection to the first divergent layer in about log2(L) "
                        "deployments), plus the engine's own PLoRA on/off effect (default: none)")
    r.add_argument("--session-len", type=int, metavar="N",
                   help="TurboMind session_len for --engine turbomind (default: the engine's)")
    r.add_argument("--lmdeploy-version", metavar="X.Y.Z",
                   help="replay this release's runtime semantics (default: the installed lmdeploy)")
    r.add_argument("--numeric", choices=["fp32", "emulate"], default="fp32",
                   help="fp32 isolates conversion/config faults; emulate rounds like the deployment dtype")
    r.add_argument("--serve-from", choices=["hf", "workspace"], default="hf",
                   help="how the deployment loads weights (a workspace-served TurboMind has no LoRA)")
    r.add_argument("--inputs", type=user_path, metavar="FILE",
                   help="YAML/JSON file of input cases (default: one built-in text-image-text case)")
    r.add_argument("--quant-policy", type=int, choices=[0, 4, 8], default=0,
                   help="TurboMind's KV cache: 8 = u8, 4 = u4, per token and head (emulated in the replay and the "
                        "reference; its cost is reported against a budget; with --decode, emulate mode only); "
                        "default: 0 (unquantized)")
    r.add_argument("--original", type=user_path, metavar="MODEL",
                   help="for an AWQ model: the floating-point model it was quantized from (checks that the AWQ "
                        "smoothing kept PLoRA and reports the cost of quantization, apart from the deployment's "
                        "faithfulness; default: none)")
    r.add_argument("--decode", type=int, default=0, metavar="N",
                   help="also generate N tokens greedily on both sides after each prompt and compare them: "
                        "free-running tokens and teacher-forced steps per layer and module (default 0: prefill "
                        "only; replay engine)")
    r.add_argument("--low-memory", action=argparse.BooleanOptionalAction, default=None,
                   help="keep reference weights in the checkpoint dtype and upcast one layer at a time "
                        "(identical results; default: automatic when float32 weights would not fit)")
    r.add_argument("--device", default="cpu", metavar="DEVICE",
                   help="where the reference, its noise floor and the replay compute: cpu (default), cuda, cuda:N "
                        "or auto (a GPU when there is one); float32 stays float32 there (TF32 off)")
    r.add_argument("--resource-check", action=argparse.BooleanOptionalAction, default=True,
                   help="refuse a prompt longer than max_position_embeddings, or a run whose memory or disk "
                        "estimate exceeds what is available (--no-resource-check: run anyway)")
    r.add_argument("--measure-floor", action="store_true",
                   help="measure the noise floor at every point even where no verdict depends on it (slower; "
                        "default: off, measured only when an error lies between the min and max thresholds)")
    r.add_argument("--teacher-forced-everywhere", action="store_true",
                   help="replay every layer teacher-forced too (slower; default: only from the first layer where "
                        "the end-to-end run is farther than min_rel from the reference)")
    r.add_argument("--jobs", "-j", type=int, default=1, metavar="N",
                   help="run the cases in N worker processes (each loads its own reference model; clamped to the "
                        "number of cases; default 1)")
    r.add_argument("--out", type=user_path, metavar="DIR",
                   help=f"report folder (default: {REPORTS_ROOT}/<model folder name>-<hash of its path>, so two "
                        "models never share one)")
    _cache_option(r)
    r.add_argument("--keep-traces", type=user_path, metavar="DIR",
                   help="copy the raw traces (safetensors) here (default: removed after the run)")
    _threshold_options(r)
    return ap


def _run(a: argparse.Namespace) -> int:
    from .compare.thresholds import THRESHOLD_FLAGS, load_thresholds
    from .parallel import run_parallel
    from .options import RunOptions
    from .report import write_reports
    from .report.terminal import print_summary

    thresholds = load_thresholds(**{name: getattr(a, name) for name in THRESHOLD_FLAGS})
    if a.out is None:
        a.out = default_report_dir(a.model)
    _check_writable(a.out)
    if a.keep_traces:
        _check_writable(a.keep_traces)  # else copying the traces fails after the whole run
    opts = RunOptions(
        model=a.model, workspace=a.workspace, engine=a.engine, lmdeploy_version=a.lmdeploy_version,
        inputs=a.inputs, numeric=a.numeric, serve_from=a.serve_from, trust_remote_code=a.trust_remote_code,
        thresholds=thresholds, cache_dir=a.cache_dir, keep_traces=a.keep_traces, layers=a.layers,
        low_memory=a.low_memory, device=a.device, resource_check=a.resource_check,
        measure_floor=a.measure_floor, teacher_forced_everywhere=a.teacher_forced_everywhere,
        original=a.original, decode=a.decode,
        quant_policy=a.quant_policy,
        live={"session_len": a.session_len} if a.session_len else {},
    )
    with out_lock(a.out):
        report = run_parallel(opts, a.jobs)  # --jobs 1: pipeline.run_parity(opts) in this process
        paths = write_reports(report, a.out)
    print_summary(report, out_console(), paths={k: str(v) for k, v in paths.items()})
    return 0 if report.status == "pass" else 1


def _faults(a: argparse.Namespace) -> int:
    from rich.table import Table

    from .faults import CATALOGUE, run_catalogue

    unknown = sorted(set(a.only or []) - {f.name for f in CATALOGUE})
    if unknown:
        raise ParityInputError(f"Unknown fault(s) {', '.join(unknown)}; `parity faults` lists the catalogue.")
    results = run_catalogue(a.cache_dir, names=a.only or None, numeric=a.numeric)

    def fmt(e) -> str:
        if e is None:
            return "pass (nothing found)"
        where = f"layer {e.layer}" if e.layer is not None else "—"
        return f"{where} · {e.module} · {e.positions} · {e.cause}"

    table = Table(title=f"Fault catalogue ({a.numeric})", show_lines=False)
    for col in ("fault", "kind", "expected", "got", ""):
        table.add_column(col)
    for r in results:
        table.add_row(r.fault.name, r.fault.kind, fmt(r.fault.expected), fmt(r.got),
                      "[green]✓[/]" if r.detected else "[red]✗[/]")
    console = out_console()
    console.print(table)
    hits = sum(r.detected for r in results)
    console.print(f"detection rate: {hits}/{len(results)} = {hits / max(len(results), 1):.0%} "
                  f"({sum(r.seconds for r in results):.1f} s)")
    if a.json:
        rows = [{"fault": r.fault.name, "kind": r.fault.kind, "expected": r.fault.expected.__dict__,
                 "got": r.got.__dict__ if r.got else None, "detected": r.detected} for r in results]
        _write_json(a.json, {"numeric": a.numeric, "detected": hits, "total": len(results), "rows": rows})
    return 0 if hits == len(results) else 1


def _write_json(path: Path, data) -> None:
    """A `--json` file, written whole or not at all; an unwritable place is bad input (exit 2), not a traceback."""
    import json

    from .report._common import atomic_write_text, ensure_dir

    ensure_dir(path.parent)
    atomic_write_text(path, json.dumps(data, indent=1, default=str))


def _check_writable(out: Path) -> None:
    """Fail before any work if the report folder cannot be written."""
    probe = out
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir() or not os.access(probe, os.W_OK):
        raise ParityInputError(f"Output folder {out} cannot be written ({probe} is not a writable folder).")


def _written(summary: str, warnings: list[str]) -> int:
    """A writing command's ending: its one summary line on stdout, its warnings on stderr, exit 0."""
    out_console().print(summary)
    for w in warnings:
        err.print(f"[yellow]warning:[/] {w}")
    return 0


def _command(args: argparse.Namespace) -> int:
    if getattr(args, "hub_model", None):
        from .reference.modelcode import parse_hub_model, provide

        for spec in args.hub_model:
            provide(*parse_hub_model(spec))
    if args.command == "fixtures":
        from .fixtures import generate

        from .fixtures import FIXTURE_NAMES, GENUINE_FIXTURE_NAMES, QWEN2_FIXTURE_NAMES

        for name, path in generate(args.out, FIXTURE_NAMES + GENUINE_FIXTURE_NAMES + QWEN2_FIXTURE_NAMES).items():
            out_console().print(f"[green]fixture[/] {name}: {path}")
        return 0
    if args.command == "convert":
        from .deploy.convert import convert

        rec = convert(args.model, args.out, tp=args.tp, lmdeploy_defaults=args.lmdeploy_defaults)
        from .deploy.workspace import Workspace

        bias = Workspace.open(rec.workspace).model.attn_bias
        return _written(f"[green]converted[/] {rec.model} -> {rec.workspace} (lmdeploy {rec.lmdeploy_version}, "
                        f"sub-type {rec.sub_type}, lora {rec.lora_config}, attn_bias {bias})", rec.warnings)
    if args.command == "disguise":
        from .disguise import disguise

        disguise(args.src, args.dst, trust_remote_code=args.trust_remote_code, overwrite=args.force)
        return 0  # disguise() prints its summary, losses included
    if args.command == "quantize":
        from .quant.quantize import quantize

        rec = quantize(args.model, args.out, w_bits=args.w_bits, group_size=args.group_size, calib=args.calib,
                       compensate_plora=args.compensate_plora, calib_samples=args.calib_samples,
                       calib_seqlen=args.calib_seqlen, trust_remote_code=args.trust_remote_code,
                       overwrite=args.force)
        return _written(
            f"[green]quantized[/] {rec.model} -> {rec.out} (lmdeploy {rec.lmdeploy_version} auto_awq, w{rec.w_bits} "
            f"g{rec.group_size}, {rec.seconds:.1f} s, PLoRA "
            f"{'compensated (' + str(len(rec.compensated)) + ' tensors)' if rec.compensate_plora else 'left as lmdeploy leaves it'})",
            rec.warnings)
    if args.command == "audit":
        from .disguise import audit_deployment

        audit = audit_deployment(args.model, trust_remote_code=args.trust_remote_code)
        print(audit.summary())
        if args.json:
            _write_json(args.json, audit.to_dict())
        return audit.exit_code
    if args.command == "faults":
        return _faults(args)
    if args.command == "lmdeploy":
        from .lmdeploy_cli import run_lmdeploy_cli

        return run_lmdeploy_cli(args.lmdeploy_args)
    return _run(args)


class _WarningLines(logging.Handler):
    """parity's own log warnings (e.g. the resource guard's time estimate) as `parity: warning:` lines."""

    def emit(self, record: logging.LogRecord) -> None:
        err.print(f"[yellow]parity: warning:[/] {record.getMessage()}", soft_wrap=True)


class _StageLines(logging.Handler):
    """parity.progress stage messages in a pipe or CI log: plain one-line messages (no per-layer lines)."""

    def __init__(self, console: Console) -> None:
        super().__init__(logging.INFO)
        self.start = time.perf_counter()
        self.console = console

    def emit(self, record: logging.LogRecord) -> None:
        self.console.print(f"parity: [{time.perf_counter() - self.start:6.1f} s] {record.getMessage()}", markup=False,
                           highlight=False, soft_wrap=True)  # one greppable line, however long


def progress_handler(console: Console) -> logging.Handler:
    """How a command shows parity.progress: bars per stage and layer on a terminal, plain stage lines elsewhere."""
    return progress.StageProgress(console) if console.is_terminal else _StageLines(console)


def main(argv: list[str] | None = None) -> int:
    log = logging.getLogger("parity")
    if not any(isinstance(h, _WarningLines) for h in log.handlers):
        log.addHandler(_WarningLines(logging.WARNING))
    stages = logging.getLogger("parity.progress")
    for h in [h for h in stages.handlers if isinstance(h, (_StageLines, progress.StageProgress))]:
        stages.removeHandler(h)  # one per command: its clock starts now
    shown = progress_handler(out_console())
    stages.addHandler(shown)
    stages.setLevel(shown.level)  # DEBUG (per-layer records) only where a terminal shows them
    stages.propagate = False
    try:
        args = build_parser().parse_args(argv)
        with terminate_as_exception(), run_scratch():
            return _command(args)
    except ParityInputError as e:
        err.print(f"[bold red]parity: error:[/] {e}", soft_wrap=True)
        return e.exit_code
    except KeyboardInterrupt:
        err.print("[red]interrupted[/] (temp folders removed)")
        return 130
    except Terminated as e:
        err.print(f"[red]terminated[/] by signal {e.signum} (temp folders removed)")
        return 128 + e.signum
    except SystemExit as e:  # argparse: --help (0) or a usage error (2, already printed)
        return e.code if isinstance(e.code, int) else 2
    finally:
        shown.close()  # a progress display ends with the command


if __name__ == "__main__":
    sys.exit(main())
