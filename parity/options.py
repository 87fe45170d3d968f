"""A run's options (`RunOptions`, what a user sets: CLI flags, `parity.run` keywords, the pytest plugin) and
what is decided from them alone, before any model loads: their checks (exit 2), the input cases, the runtime
semantics, the workspace to compare against and what the engine is set up with."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .compare.thresholds import Thresholds
from .device import Placement, resolve_device
from .deploy.layout import stored_weights_dtype
from .engines import EngineSetup, engine_class
from .errors import ParityInputError
from .inputs import default_cases, load_cases
from .places import default_cache_dir
from .records import CanonicalInput, FaultHooks, RuntimeSemantics
from .reference.session import ReferenceSession


@dataclass
class RunOptions:
    model: Path
    workspace: Path | None = None
    engine: str = "replay"
    lmdeploy_version: str | None = None
    inputs: Path | None = None
    cases: list[CanonicalInput] | None = None       # programmatic alternative to `inputs`
    numeric: str = "fp32"                            # "fp32" | "emulate" (deployment dtype)
    serve_from: str = "hf"                           # "hf" | "workspace" (the workspace-loading trap)
    trust_remote_code: bool = False
    thresholds: Thresholds = field(default_factory=Thresholds)
    cache_dir: Path = field(default_factory=default_cache_dir)  # parity.places
    keep_traces: Path | None = None
    session: ReferenceSession | None = None          # share reference captures across runs
    low_memory: bool | None = None                   # weights in the checkpoint dtype (default: when fp32 won't fit)
    layers: str | None = None                        # "every" | "bisect": per-layer values from the live engine
    live: dict[str, Any] = field(default_factory=dict)  # LiveTurboMind options (session_len, dtype, ...)
    device: str = "cpu"                              # cpu | cuda | cuda:N | auto (parity.device)
    measure_floor: bool = False                      # measure the noise floor even where no verdict needs it
    teacher_forced_everywhere: bool = False          # replay teacher-forced at every layer (parity.compare.gate)
    original: Path | None = None                     # a quantized model's original: smoothing check, cost report
    decode: int = 0                                  # generated tokens to compare after the prefill (0: none)
    resource_check: bool = True                      # refuse a run that cannot fit (parity.resources)
    quant_policy: int = 0                            # TurboMind's KV cache: 0 fp, 8 u8, 4 u4 (parity.quant.kv)


def run_cases(opts: RunOptions) -> list[CanonicalInput]:
    """The run's input cases: given programmatically, from the inputs file, or the default image's."""
    if opts.cases:
        return list(opts.cases)
    if opts.inputs:
        return load_cases(opts.inputs)
    from .fixtures import IMAGES_DIR

    images = sorted(Path(IMAGES_DIR).glob("*.png"))
    if not images:
        raise ParityInputError(f"No default test image found in {IMAGES_DIR}; pass --inputs FILE.")
    return default_cases(images[0])


def runtime_semantics(opts: RunOptions):
    """The runtime semantics the run replays, after the option checks that need no model (exit 2 early)."""
    from .deploy.compat import installed_lmdeploy_version
    from .deploy.versions import semantics_for_run

    version = opts.lmdeploy_version or installed_lmdeploy_version()
    if version is None:
        raise ParityInputError("lmdeploy is not installed and no --lmdeploy-version was given; run `make setup`.")
    semantics = semantics_for_run(version)  # 0.9.2-0.13.0 cannot deploy PLoRA: exit 2, nothing to compare
    if opts.numeric not in ("fp32", "emulate"):
        raise ParityInputError(f"--numeric must be 'fp32' or 'emulate', got {opts.numeric!r}.")
    return semantics


def workspace_path(opts: RunOptions, family: str | None) -> Path:
    """The workspace the run compares against: the given one, else the cached conversion of the model (for a
    Qwen2 PLoRA original, of its XComposer2 disguise)."""
    if opts.workspace is not None:
        return opts.workspace
    if family == "qwen2-plora":
        from .disguise import disguised_workspace

        return disguised_workspace(opts.model, opts.cache_dir, trust_remote_code=opts.trust_remote_code)[0]
    from .deploy.convert import convert_cached

    return convert_cached(opts.model, opts.cache_dir / "workspaces")


def engine_setup(opts: RunOptions, semantics: RuntimeSemantics, session: ReferenceSession, workspace,
                 faults: FaultHooks) -> EngineSetup:
    """What the engine is built from, and the reference set up to match the deployment: judged with the weights
    the workspace stores (the weights check compares them with the checkpoint), and with a quantized KV cache
    (--quant-policy) reading K and V back through the same quantization as the engine stores them in.
    `workspace`: the opened `parity.deploy.workspace.Workspace`."""
    session.hold_weights_as(stored_weights_dtype(workspace.model.weight_type))
    options = dict(opts.live)
    if opts.quant_policy:
        from .quant.kv import bits_for_policy
        from .quant.kv_reference import turbomind_kv

        session.kv_cache = turbomind_kv(bits_for_policy(opts.quant_policy), workspace.dtype)
        options.update(kv_bits=bits_for_policy(opts.quant_policy))
    return EngineSetup(
        model=opts.model, workspace=workspace, semantics=semantics, numeric=opts.numeric, serve_from=opts.serve_from,
        options=options, layers=opts.layers, cache_dir=opts.cache_dir, thresholds=opts.thresholds,
        session=session, device=session.placement.device, faults=faults,
        teacher_forced_everywhere=opts.teacher_forced_everywhere)


MAX_DECODE = 4096


def check_options(opts: RunOptions) -> tuple[RuntimeSemantics, Placement]:
    """Every check of the options that needs no model (bad input: exit 2 before any work), and what two of them
    resolve to: the runtime semantics the run replays and where the reference computes."""
    semantics = runtime_semantics(opts)
    if opts.layers not in (None, "every", "bisect"):
        raise ParityInputError(f"--layers must be 'every' or 'bisect', got {opts.layers!r}.")
    if opts.quant_policy not in (0, 4, 8):
        raise ParityInputError(f"--quant-policy must be 0, 4 or 8 (TurboMind's KV cache: fp, u4, u8), got "
                               f"{opts.quant_policy!r}.")
    if opts.quant_policy and opts.engine != "replay":
        raise ParityInputError("--quant-policy is emulated by the replay engine; passing it to a live TurboMind is not "
                               "wired in parity yet. Run it with --engine replay.")
    engine_class(opts.engine).preflight(opts.layers, opts.serve_from)  # e.g. no TurboMind here
    _check_decode(opts)
    placement = resolve_device(opts.device)  # --device cuda without CUDA
    if opts.quant_policy and opts.session is not None:
        raise ValueError("a shared ReferenceSession holds captures without the quantized KV cache; run --quant-policy "
                         "with a session of its own")
    if opts.original is not None:
        from .quant.report import check_original

        check_original(opts.model, opts.original)
    return semantics, placement


def _check_decode(opts: RunOptions) -> None:
    n = opts.decode
    if not isinstance(n, int) or isinstance(n, bool) or n < 0 or n > MAX_DECODE:
        raise ParityInputError(f"--decode must be an integer from 0 to {MAX_DECODE} (generated tokens to compare), "
                               f"got {n!r}.")
    if n and opts.quant_policy and opts.numeric == "fp32":
        raise ParityInputError(
            f"--decode with --quant-policy {opts.quant_policy} needs --numeric emulate. A decode step is judged one "
            "row at a time, and through a u8/u4 KV cache a single code that flips at a rounding boundary (the engine's "
            "float32 rotary and the reference's differ in the last bit) moves that row by more than fp32 mode's "
            "bounds on a clean deployment too; emulate mode judges at the deployment's precision. fp32 mode with "
            "--quant-policy remains available for the prompt (no --decode).")
    if n and not hasattr(engine_class(opts.engine), "decode"):
        raise ParityInputError(f"--decode needs an engine that decodes (--engine replay); --engine {opts.engine} "
                               "does not report its generated tokens' values yet.")
