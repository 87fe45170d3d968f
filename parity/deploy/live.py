"""The live engine: lmdeploy 0.7.1's TurboMind on a CUDA GPU, fed the same rows as the reference.

`LiveTurboMind(model_dir)` loads a model the way a deployment does (`TurboMind.from_pretrained` on the HF
folder, which converts in memory and fills the LoRA buffers), sends an `EngineCall` (`input_ids`,
`input_embeddings`, `input_embedding_ranges`) through the engine's own async API and reads back, for every
prompt row, `last_hidden_state` (after the final RMSNorm) and `logits` (`max_new_tokens=1`,
`output_logits='all'`, `output_last_hidden_state='all'`); `decode` generates with the same instance
(free-running, and fed the reference's tokens through the session's KV cache). lmdeploy 0.7.x has no
synchronous `stream_infer` (lmdeploy issue #3084): the async generator is driven with asyncio.

Every lmdeploy call here follows lmdeploy 0.7.1's source (site-packages/lmdeploy, line numbers of 0.7.1):
  turbomind/turbomind.py:254   TurboMind.from_pretrained(path, tokenizer, engine_config=...)
                               (HF folder -> _from_hf:192 -> deploy/converter.get_tm_model; a folder with
                               `triton_models/` -> _from_workspace:225, see utils.get_model_source:17)
  turbomind/turbomind.py:290   TurboMind.close()
  turbomind/turbomind.py:297   TurboMind.create_instance()
  turbomind/turbomind.py:518   TurboMindInstance.async_stream_infer(session_id, input_ids, input_embeddings,
                               input_embedding_ranges, sequence_start, sequence_end, step, gen_config,
                               stream_output) -> async generator of EngineOutput
  turbomind/turbomind.py:437   prepare_embeddings: a flat list of [n_i, hidden] tensors is one sequence;
                               each is cast to the weight dtype
  turbomind/turbomind.py:308   _get_logits / :317 _get_last_hidden_state: output rows [:seq_len - 1] with
                               'all' (all prompt rows once one token is generated)
                               and [:seq_len - input_len] with 'generation' (offset input_len - 1; `step`
                               not subtracted: a continuation's output holds its row and stale ones)
  turbomind/turbomind.py:509   TurboMindInstance.async_end(session_id) (a decode stopped early)
  src/turbomind/models/llama/LlamaBatch.cc (C++, tag v0.7.1)  ProcessInferRequests: `step` cuts the session's
                               tokens and cache back (`seq.tokens.resize(step)`, `cache_len = min(cache_len,
                               step)`), the sequence is limited to session_len - 1; OutputLogits /
                               OutputLastHiddenState: 'generation' rows start at the last input row
  turbomind/turbomind.py:221   logger.warning('... uninitialized params ...') after the in-memory export
                               (kept as a warning: e.g. LoRA buffers allocated but never filled)
  turbomind/deploy/config.py:111/159  TurbomindModelConfig (TurboMind.config): .weight_type, .session_len,
                               .model_config.num_layer, .to_dict()['lora_config']
  turbomind/deploy/source_model/xcomposer2.py  Xcomposer2Model.model_info(): the lora_config override
                               patches it in this process (parity.deploy.convert.patched_lora_config)
  messages.py:21/107           GenerationConfig(max_new_tokens, top_k, output_logits, output_last_hidden_state)
  messages.py:155              TurbomindEngineConfig(dtype, tp, session_len, max_batch_size,
                               cache_max_entry_count, max_prefill_token_num)
  messages.py:322/369          ResponseType, EngineOutput(status, token_ids, num_token, logits, last_hidden_state)
  tokenizer.py:377             Tokenizer(model_path) (what lmdeploy's pipeline passes to from_pretrained)
  version.py                   __version__

None of this can run without CUDA: `available()` says why, and the constructor raises EngineUnavailable.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import itertools
import logging
import re
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from ..errors import EngineUnavailable, ParityInputError, one_line
from ..records import DecodeStep, EngineCall, Finding
from ..trace import Trace, TraceWriter
from .compat import STUB_MODULE_NAME, installed_lmdeploy_version, lmdeploy_lib, stub_active
from .versions import WORKSPACE_TRAP

LIVE_VERSION = "0.7.1"  # the lmdeploy release whose Python API this module follows

_session_ids = itertools.count(1)
_session_lock = threading.Lock()


def _next_session_id() -> int:
    with _session_lock:
        return next(_session_ids)


# ------------------------------------------------------------------------------------------- availability


def _probe_extension_subprocess(lib: Path, timeout: float = 60.0) -> str | None:
    """Import lmdeploy's compiled `_turbomind` in a separate interpreter (this process stays untouched).

    Returns None when it imports, else the error's last line (e.g. a missing libcublas.so.12)."""
    code = f"import sys; sys.path.append({str(lib)!r}); import {STUB_MODULE_NAME}"
    try:
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"{type(e).__name__}: {e}"
    if r.returncode == 0:
        return None
    lines = [ln for ln in (r.stderr or r.stdout).strip().splitlines() if ln.strip()]
    return lines[-1] if lines else f"exit code {r.returncode}"


def _import_extension(lib: Path) -> tuple[Any | None, str | None]:
    """Import the real `_turbomind` into this process (as lmdeploy/turbomind/turbomind.py:30-32 does)."""
    mod = sys.modules.get(STUB_MODULE_NAME)
    if mod is not None:
        if getattr(mod, "__parity_stub__", False):
            return None, "parity's CPU conversion stand-in is registered as _turbomind in this process"
        return mod, None
    if str(lib) not in sys.path:
        sys.path.append(str(lib))
    try:
        import importlib

        return importlib.import_module(STUB_MODULE_NAME), None
    except Exception as e:  # ImportError for a missing CUDA library, OSError, ...
        return None, f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"


# lmdeploy 0.7.1's own metadata: torch<=2.5.1, and the CUDA 12 runtime wheels its _turbomind finds through
# its RPATH ($ORIGIN/../../nvidia/<name>/lib): distribution -> the folder under site-packages
MAX_TORCH = (2, 5, 1)
CUDA12_WHEELS = {
    "nvidia-cuda-runtime-cu12": "nvidia/cuda_runtime/lib",
    "nvidia-cublas-cu12": "nvidia/cublas/lib",
    "nvidia-curand-cu12": "nvidia/curand/lib",
    "nvidia-nccl-cu12": "nvidia/nccl/lib",
}
INSTALL_HINT = ("`make setup-gpu` installs that set into .venv-gpu (the `turbomind` extra: "
                "pip install -e '.[turbomind,lmdeploy-cpu]' then pip install --no-deps lmdeploy==0.7.1)")


def missing_requirements(torch_version: str | None = None, torch_cuda: str | None = "",
                         lmdeploy_version: str | None = "", site: Path | None = None) -> list[str]:
    """What this environment lacks of lmdeploy 0.7.1's requirements for the live engine, each as what to
    install (empty: complete). Arguments default to this environment (tests pass others)."""
    from importlib import metadata

    tv = torch.__version__ if torch_version is None else torch_version
    cuda = torch.version.cuda if torch_cuda == "" else torch_cuda
    lv = installed_lmdeploy_version() if lmdeploy_version == "" else lmdeploy_version
    out = []
    if lv is None:
        out.append(f"lmdeploy=={LIVE_VERSION}")
    nums = tuple(int(x) for x in re.findall(r"\d+", tv.split("+")[0])[:3])
    if nums > MAX_TORCH:
        out.append(f"torch<=2.5.1 (installed: torch {tv}; lmdeploy {LIVE_VERSION} requires torch<=2.5.1)")
    if cuda is None:
        out.append(f"a CUDA 12 build of torch (installed: torch {tv}, a CPU-only build)")
    elif not cuda.startswith("12"):
        out.append(f"a CUDA 12 build of torch (installed: torch {tv}, built for CUDA {cuda})")
    if site is None:
        lib = lmdeploy_lib()
        site = lib.parent.parent if lib is not None else Path(torch.__file__).parent.parent
    for dist, folder in CUDA12_WHEELS.items():
        try:
            metadata.distribution(dist)
        except metadata.PackageNotFoundError:
            out.append(dist)
            continue
        if not (site / folder).is_dir():
            out.append(f"{dist} (installed, but {site / folder} where _turbomind's RPATH looks is missing)")
    return out


def available() -> tuple[bool, str]:
    """(True, description) when TurboMind can run in this process, else (False, why not)."""
    missing = missing_requirements()
    if missing:  # say exactly what to install, before anything that would fail on it
        why = f"missing for --engine turbomind: {'; '.join(missing)}. {INSTALL_HINT}"
        if not torch.cuda.is_available():
            why += "; and torch.cuda.is_available() is False here"
        return False, why + "."
    version = installed_lmdeploy_version() or "?"
    lib = lmdeploy_lib()
    if lib is None or not any(lib.glob(f"{STUB_MODULE_NAME}*")):
        return False, (f"lmdeploy {version} is installed without its compiled TurboMind extension "
                       f"({STUB_MODULE_NAME}*.so under {lib}).")
    if not torch.cuda.is_available():
        cuda = torch.version.cuda
        why = (f"torch.cuda.is_available() is False (torch {torch.__version__}, "
               f"{'a CPU-only build' if cuda is None else f'built for CUDA {cuda}, but no device/driver is visible'})")
        ext = _probe_extension_subprocess(lib)
        if ext is not None:
            why += f"; and lmdeploy's compiled extension {STUB_MODULE_NAME} does not import here ({ext})"
        return False, f"no CUDA GPU: {why}."
    if stub_active():
        return False, ("lmdeploy.turbomind was imported through parity's CPU conversion stand-in in this process "
                       "(a conversion ran here without CUDA); start a fresh process.")
    mod, err = _import_extension(lib)
    if mod is None:
        return False, f"lmdeploy's compiled extension {STUB_MODULE_NAME} does not import ({err})."
    if version.split("+")[0] != LIVE_VERSION:
        return True, (f"lmdeploy {version} on {_gpu_name()} (parity follows the {LIVE_VERSION} "
                      "API; other releases may differ)")
    return True, f"lmdeploy {version} on {_gpu_name()}"


def _gpu_name() -> str | None:
    with contextlib.suppress(Exception):
        return torch.cuda.get_device_name(0)
    return None


def unavailable_error(reason: str) -> EngineUnavailable:
    return EngineUnavailable(
        f"--engine turbomind runs lmdeploy's TurboMind live and cannot run on this machine: {reason} It needs a "
        f"CUDA GPU, torch<=2.5.1 built for CUDA 12, the CUDA 12 runtime wheels ({', '.join(CUDA12_WHEELS)}) and "
        f"lmdeploy=={LIVE_VERSION} (`make setup-gpu`). Use --engine replay (the default) to replay the converted "
        "workspace on CPU."
    )


# ------------------------------------------------------------------------------------------- outputs


@dataclass
class LiveOutput:
    """What the engine returned for one call: one row per prompt row, float32 on the CPU."""

    last_hidden_state: torch.Tensor  # [rows, hidden], after the final RMSNorm
    logits: torch.Tensor             # [rows, vocab]
    token_ids: list[int]
    seconds: float


class LiveEngineError(ParityInputError):
    """TurboMind failed: an error status, a C++ RuntimeError, a close that did not free the GPU. Exit 2 with
    one paragraph (nothing was compared, so it is not a divergence)."""


# GPU memory a close may leave behind (CUDA context, cuBLAS workspaces) before it counts as not freed.
CLOSE_SLACK_BYTES = 1 << 30


def _free_gpu_bytes() -> int | None:
    """Free memory on the current CUDA device, or None without CUDA."""
    if not torch.cuda.is_available():
        return None
    return int(torch.cuda.mem_get_info()[0])


@contextlib.contextmanager
def _engine_stderr(lines: list[str]):
    """Collect what the C++ engine writes to file descriptor 2 (TurboMind's own logger: e.g. "[ImageFeature]
    Skip invalid input embeddings") into `lines`, and pass it on to the real stderr afterwards."""
    import os
    import tempfile

    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as tmp:
        os.dup2(tmp.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            tmp.seek(0)
            data = tmp.read()
            if data:
                os.write(2, data)
                lines.extend(ln for ln in data.decode("utf-8", "replace").splitlines() if ln.strip())


class _LogCapture(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def _run_coroutine(coro):
    """Run a coroutine to completion, also from inside a running event loop (e.g. a notebook)."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coro)
    with ThreadPoolExecutor(max_workers=1) as ex:
        return ex.submit(asyncio.run, coro).result()


# ------------------------------------------------------------------------------------------- engine


class LiveTurboMind:
    """lmdeploy's TurboMind serving `model_dir` on this machine's GPU.

    `model_dir` is normally the HF folder (how a deployment serves XComposer2: LoRA is loaded only that
    way). A converted workspace is accepted but warned about (WORKSPACE_TRAP: its LoRA buffers stay
    uninitialised). `lora_config` overrides the lora_config lmdeploy's converter writes (the same mechanism
    as `parity.deploy.convert.convert`); by default a folder's `parity_lora_config.json` is used (the
    no-LoRA copies of parity.deploy.truncate carry one).
    """

    side = "turbomind"

    def __init__(self, model_dir: str | Path, *, dtype: str = "auto", session_len: int | None = None,
                 cache_max_entry_count: float = 0.2, max_prefill_token_num: int = 8192,
                 lora_config: dict[str, Any] | None = None):
        ok, reason = available()
        if not ok:
            raise unavailable_error(reason)
        self.model_dir = Path(model_dir).resolve()
        self.warnings: list[str] = []
        self.serve_from = "workspace" if (self.model_dir / "triton_models").exists() else "hf"
        if not self.model_dir.is_dir():
            raise ParityInputError(f"Model folder {self.model_dir} does not exist; expected the HF model folder "
                                   "the deployment serves.")
        if self.serve_from == "workspace":
            self.warnings.append(
                f"{self.model_dir} is a converted workspace: serving it live reproduces the workspace trap. "
                f"{WORKSPACE_TRAP}"
            )
        else:
            from .convert import validate_model_dir

            # the checks `parity convert` makes (config.json, architecture lmdeploy supports, weights, keys)
            self._hf_config, self._arch = validate_model_dir(self.model_dir)
        from .truncate import lora_override

        self.lora_override = lora_config if lora_config is not None else lora_override(self.model_dir)
        if self.lora_override is not None and self.serve_from == "workspace":
            raise ParityInputError(f"A lora_config override ({self.lora_override}) cannot apply to the converted "
                                   f"workspace {self.model_dir}: its config.yaml is already written.")

        if dtype not in ("auto", "float16", "bfloat16"):
            raise ParityInputError(f"dtype {dtype!r} is not one TurboMind accepts; expected 'auto', 'float16' or "
                                   "'bfloat16' (TurbomindEngineConfig.dtype).")
        from lmdeploy.messages import TurbomindEngineConfig
        from lmdeploy.tokenizer import Tokenizer
        from lmdeploy.turbomind import TurboMind

        self.engine_config = TurbomindEngineConfig(
            dtype=dtype, tp=1, session_len=session_len, max_batch_size=1,
            cache_max_entry_count=cache_max_entry_count, max_prefill_token_num=max_prefill_token_num,
        )
        self.free_before = _free_gpu_bytes()  # close() checks the engine gave it back
        t0 = time.perf_counter()
        capture = _LogCapture()
        lg = logging.getLogger("lmdeploy")
        level = lg.level
        lg.addHandler(capture)
        if lg.getEffectiveLevel() > logging.WARNING:  # the "uninitialized params" warning must reach us
            lg.setLevel(logging.WARNING)
        try:
            with self._lora_patch():
                # lmdeploy's pipeline passes Tokenizer(model_path) (serve/async_engine.py:272); TurboMind only
                # stores it (turbomind.py:103), the prompt rows come from the EngineCall.
                try:
                    self.tokenizer = Tokenizer(str(self.model_dir))
                except Exception as e:  # noqa: BLE001 - not needed for prefill
                    self.tokenizer = None
                    self.warnings.append(f"lmdeploy's Tokenizer could not load {self.model_dir} ({type(e).__name__}: "
                                         f"{e}); the engine runs without one (only token ids are sent).")
                try:
                    self.tm = TurboMind.from_pretrained(str(self.model_dir), tokenizer=self.tokenizer,
                                                        engine_config=self.engine_config)
                except (AssertionError, KeyError, ValueError) as e:  # lmdeploy's checks of the model/config
                    msg = one_line(e) or type(e).__name__
                    raise ParityInputError(
                        f"lmdeploy {installed_lmdeploy_version()}'s TurboMind could not load {self.model_dir} "
                        f"({type(e).__name__}: {msg[:600]}). Expected an XComposer2 HF folder that `parity convert` "
                        "accepts."
                    ) from e
                except RuntimeError as e:  # the C++ engine's own checks (e.g. a LoRA rank it cannot hold)
                    msg = one_line(e) or type(e).__name__
                    raise LiveEngineError(
                        f"TurboMind (lmdeploy {installed_lmdeploy_version()}) refused to load {self.model_dir}: "
                        f"{msg[:600]}. Its C++ engine checks the LoRA tensors' sizes against the lora_config "
                        "(lora_r, lora_rank_pattern) and the shapes against config.json; `parity run --engine "
                        "replay` on the same folder names the offending layer and linear."
                    ) from None
            self.instance = self.tm.create_instance()
        finally:
            lg.removeHandler(capture)
            lg.setLevel(level)
        self.load_seconds = time.perf_counter() - t0
        for msg in capture.messages:
            if "uninitialized params" in msg:
                self.warnings.append(f"lmdeploy left TurboMind parameters uninitialised when loading "
                                     f"{self.model_dir}: {msg.strip()}")
        self.config = self.tm.config  # TurbomindModelConfig
        self.weight_type = str(self.config.weight_type)
        self.num_layers = int(self.config.model_config.num_layer)
        self.hidden_units = int(self.config.model_config.hidden_units)
        self.engine_log: list[str] = []   # what the C++ engine wrote to stderr during requests

    @contextlib.contextmanager
    def _lora_patch(self):
        if self.lora_override is None or self.serve_from != "hf":
            yield
            return
        from .convert import patched_lora_config
        from .lora_config import check_lora_override

        # the same patch `parity convert --lora-config` uses: the source model's model_info() in this process
        with patched_lora_config(self._arch, check_lora_override(self.lora_override)):
            yield

    # ---------------------------------------------------------------- requests

    def _gen_config(self, logits: bool = True):
        """Logits only when asked: at 8k rows and a 92k vocabulary 'all' logits are GBs, and the per-layer
        runs need only the hidden state."""
        from lmdeploy.messages import GenerationConfig

        return GenerationConfig(max_new_tokens=1, top_k=1, output_logits="all" if logits else None,
                                output_last_hidden_state="all")

    def check_ranges(self, call: EngineCall) -> dict[str, Any]:
        """TurboMind's range check (the replay's mirror of it, `replay.validate_ranges`), made before the call:
        a rejected range list makes TurboMind drop every image embedding with only a C++ log line."""
        from .replay import WEIGHT_DTYPES, validate_ranges

        try:
            return validate_ranges(len(call.input_ids), list(call.input_embeddings),
                                   [tuple(r) for r in call.input_embedding_ranges], self.hidden_units,
                                   WEIGHT_DTYPES.get(self.weight_type, torch.float16))
        except ValueError as e:  # lmdeploy's prepare_embeddings asserts it: the request would fail
            raise LiveEngineError(f"The engine call cannot be sent to TurboMind: {e}") from None

    @staticmethod
    def _embedding_kwargs(call: EngineCall) -> dict[str, Any]:
        if not call.input_embeddings:
            return {}
        # one sequence: a flat list of [n_i, hidden] tensors (prepare_embeddings casts to the weight dtype)
        return {"input_embeddings": [e.detach().float().cpu().reshape(-1, e.shape[-1]) for e in call.input_embeddings],
                "input_embedding_ranges": [[int(b), int(e)] for b, e in call.input_embedding_ranges]}

    async def _request(self, session_id: int, ids: list[int], gen_config, *, start: bool = True, end: bool = True,
                       step: int = 0, **kwargs: Any) -> tuple[list[int], torch.Tensor | None, torch.Tensor | None]:
        """One `async_stream_infer` request: (generated token ids, last_hidden_state, logits) of its last output,
        float32 on the CPU; an error status or a C++ RuntimeError is a LiveEngineError."""
        from lmdeploy.messages import ResponseType

        hidden = out_logits = None
        token_ids: list[int] = []
        try:
            async for out in self.instance.async_stream_infer(
                    session_id, ids, sequence_start=start, sequence_end=end, step=step,
                    gen_config=gen_config, stream_output=False, **kwargs):
                if out.status not in (ResponseType.SUCCESS, ResponseType.FINISH):
                    raise LiveEngineError(f"TurboMind answered session {session_id} with {out.status} "
                                          f"({len(ids)} input rows at step {step}, session_len "
                                          f"{self.config.session_len}).")
                token_ids = list(out.token_ids or [])
                if out.last_hidden_state is not None:
                    hidden = out.last_hidden_state.detach().float().cpu().clone()
                if out.logits is not None:
                    out_logits = out.logits.detach().float().cpu().clone()
        except RuntimeError as e:  # raised by the C++ engine (CUDA out of memory, a failed kernel, ...)
            msg = one_line(e) or type(e).__name__
            raise LiveEngineError(f"TurboMind failed on a request of {len(ids)} rows at step {step} (session_len "
                                  f"{self.config.session_len}) for {self.model_dir}: {msg[:600]}.") from None
        return token_ids, hidden, out_logits

    async def _infer(self, call: EngineCall, session_id: int, logits: bool = True) -> LiveOutput:
        ids = [int(t) for t in call.input_ids]
        t0 = time.perf_counter()
        token_ids, hidden, out_logits = await self._request(session_id, ids, self._gen_config(logits),
                                                            **self._embedding_kwargs(call))
        if hidden is None or (logits and out_logits is None):
            raise LiveEngineError("TurboMind returned no last_hidden_state/logits although the request asked "
                                  "for them with 'all' (lmdeploy >= 0.7.0 is needed).")
        if hidden.shape[0] != len(ids) or (logits and out_logits.shape[0] != len(ids)):
            raise LiveEngineError(f"TurboMind returned {hidden.shape[0]} hidden rows and "
                                  f"{None if out_logits is None else out_logits.shape[0]} logit rows for a prompt "
                                  f"of {len(ids)} rows.")
        return LiveOutput(hidden, out_logits, token_ids, time.perf_counter() - t0)

    def infer(self, call: EngineCall, logits: bool = True) -> LiveOutput:
        """One prefill; the range check runs first, and the C++ engine's stderr lines are kept in
        `engine_log` (and still printed)."""
        self.last_ranges = self.check_ranges(call)
        lines: list[str] = []
        try:
            with _engine_stderr(lines):
                return _run_coroutine(self._infer(call, _next_session_id(), logits))
        finally:
            self.engine_log += lines

    def final_hidden(self, call: EngineCall) -> torch.Tensor:
        """[rows, hidden] after the final RMSNorm, float32 (no logits asked for)."""
        return self.infer(call, logits=False).last_hidden_state

    def run(self, call: EngineCall, writer: TraceWriter, teacher: Trace | None = None) -> dict[str, Any]:
        """ReplayEngine-compatible: writes the post points ("norm", "output") of an end-to-end run.

        A live TurboMind exposes nothing per layer and cannot be teacher-forced (use parity.layerwise for
        per-layer values)."""
        if teacher is not None:
            raise ValueError("The live TurboMind cannot be teacher-forced; run it end to end (teacher=None).")
        log_start = len(self.engine_log)
        out = self.infer(call)
        rc = self.last_ranges
        writer.post("norm", out.last_hidden_state)
        writer.post("output", out.logits)
        meta = writer.meta
        meta.side = self.side
        meta.num_layers = self.num_layers
        meta.dtype = self.weight_type
        meta.extras = {**dict(meta.extras or {}), **self.info(), "content_hash": call.content_hash,
                       "mode": "e2e", "warnings": list(self.warnings)}
        trace = writer.close()
        # the replay's keys for the range check (parity.checks.inputs names a rejected list)
        return {"mode": "e2e", "rows": len(call.input_ids), "seconds": out.seconds, "trace": trace,
                "lora_loaded": self.serve_from == "hf", "warnings": list(self.warnings),
                "ranges_valid": rc["valid"], "reason": rc["reason"],
                "accepted_ranges": [list(r) for r in rc["ranges"]], "row_count_mismatch": rc["row_count_mismatch"],
                "engine_stderr": self.engine_log[log_start:]}

    # ---------------------------------------------------------------- decode

    def _decode_config(self, n: int):
        """Greedy (top_k=1), exactly `n` tokens (no stop ids, EOS ignored), with the generated rows' logits and
        final hidden states ('generation': one row per generated token, the first from the last input row)."""
        from lmdeploy.messages import GenerationConfig

        return GenerationConfig(max_new_tokens=n, top_k=1, ignore_eos=True, output_logits="generation",
                                output_last_hidden_state="generation")

    def _send(self, session_id: int, ids: list[int], gen_config, **kwargs: Any):
        lines: list[str] = []
        try:
            with _engine_stderr(lines):
                return _run_coroutine(self._request(session_id, ids, gen_config, **kwargs))
        finally:
            self.engine_log += lines

    def decode(self, call: EngineCall, tokens: list[int]) -> Iterator[DecodeStep]:
        """`--decode N` on the live engine: what TurboMind 0.7.1 shows of generated tokens, its final hidden
        state and logits (`DecodeStep.e2e` (None, "norm") and (None, "output"); nothing per layer).

        * free-running: one request of `len(tokens)` greedy tokens (`output_logits='generation'`); kept in
          `decode_info["free_running"]` (the engine's own tokens, where they leave the reference's, and whether
          the steps below agree with it wherever both had the same history);
        * teacher-forced by tokens, through the same session's KV cache: the prompt (sequence_start, no
          sequence_end, one token), then one request per reference token `tokens[k - 1]` with `step = prompt
          rows + k - 1`. `step` is the KV offset: `LlamaBatch::ProcessInferRequests` cuts the session's tokens
          back to it (`seq.tokens.resize(step)`, `cache_len = min(cache_len, step)`), which drops the engine's
          own last token, whose keys and values were never computed (it is predicted, not fed), so the cache
          holds exactly the prompt and the reference's tokens before step k, and the new token is decoded at
          that position (one input row: the decode kernels, as in free-running generation). The module-level
          teacher forcing of the replay is impossible here: the engine exposes no per-layer values.

        Yields step 0 (the prompt's prediction) and one `DecodeStep` per fed token; stops where TurboMind
        would stop (`parity.deploy.decode.generated_limit`; `decode_info["truncated_at"]`)."""
        from .decode import generated_limit

        P, n = len(call.input_ids), len(tokens)
        session_len = int(self.config.session_len)
        limit = generated_limit(session_len, P)
        runs = min(n, max(limit, 0))
        self.decode_info: dict[str, Any] = {
            "session_len": session_len, "prompt_rows": P, "requested": n, "truncated_at": None,
            "kv_storage": "turbomind", "kv_expected": "turbomind", "teacher_forcing": "tokens",
            "points": ["norm", "output"]}
        if runs < n:
            self.decode_info["truncated_at"] = runs
        if runs <= 0:
            return
        self.last_ranges = self.check_ranges(call)
        free_ids, _, free_logits = self._send(_next_session_id(), [int(t) for t in call.input_ids],
                                              self._decode_config(runs), **self._embedding_kwargs(call))
        if free_logits is None or free_logits.shape[0] < len(free_ids):
            raise LiveEngineError(f"TurboMind returned {None if free_logits is None else free_logits.shape[0]} "
                                  f"logit rows for {len(free_ids)} generated tokens with output_logits='generation' "
                                  "(lmdeploy >= 0.7.0 is needed).")
        free_first = next((k for k, (a, b) in enumerate(zip(free_ids, tokens)) if int(a) != int(b)), None)
        free = {"tokens": [int(t) for t in free_ids], "first_divergent_step": free_first,
                "agrees_with_forced": True, "disagrees_at": None, "max_abs_logits_diff": 0.0, "compared_steps": 0}
        self.decode_info["free_running"] = free
        sid, ended = _next_session_id(), False
        try:
            for k in range(runs):
                last = k == runs - 1
                if k == 0:
                    ids, step, kw = [int(t) for t in call.input_ids], 0, self._embedding_kwargs(call)
                else:
                    ids, step, kw = [int(tokens[k - 1])], P + k - 1, {}
                _, hidden, logits = self._send(sid, ids, self._decode_config(1), start=k == 0, end=last, step=step,
                                               **kw)
                ended = last
                if hidden is None or logits is None or hidden.shape[0] < 1 or logits.shape[0] < 1:
                    raise LiveEngineError(f"TurboMind returned no generated row at decode step {k} (step {step}) "
                                          "although the request asked for output_logits='generation'.")
                # lmdeploy 0.7.1 slices 'generation' outputs as [:seq_len - input_len] of a (max_new_tokens + 1)-row
                # buffer: with step > 0 the slice holds stale rows after the first; row 0 is this step's
                hidden, logits = hidden[:1], logits[:1]
                if k < len(free_ids) and free_ids[:k] == [int(t) for t in tokens[:k]]:  # the same history
                    free["compared_steps"] += 1
                    d = float((free_logits[k] - logits[0]).abs().max())
                    free["max_abs_logits_diff"] = max(free["max_abs_logits_diff"], d) if d == d else float("nan")
                    if int(free_ids[k]) != int(torch.argmax(logits[0])) and free["agrees_with_forced"]:
                        free["agrees_with_forced"], free["disagrees_at"] = False, k
                yield DecodeStep(step=k, token=None if k == 0 else int(tokens[k - 1]),
                                 position=None if k == 0 else step, expected_position=None if k == 0 else P + k - 1,
                                 rope_theta=None, expected_rope_theta=None,
                                 e2e={(None, "norm"): hidden, (None, "output"): logits})
        finally:
            if not ended and self.instance is not None:  # a run stopped early: end the session on the engine
                try:
                    _run_coroutine(self.instance.async_end(sid))
                except Exception as exc:  # the run's outcome stands; an open session is said, not hidden
                    self.engine_log.append(f"parity: ending decode session {sid} failed: {one_line(exc)}")

    # ---------------------------------------------------------------- report

    def info(self) -> dict[str, Any]:
        """The report's `engine` section for a live run."""
        lora = {}
        with contextlib.suppress(Exception):
            lora = self.config.to_dict().get("lora_config", {})
        return {
            "kind": "turbomind",
            "lmdeploy_version": installed_lmdeploy_version(),
            "gpu": _gpu_name(),
            "cuda": torch.version.cuda,
            "dtype": self.weight_type,
            "serve_from": self.serve_from,
            "model_dir": str(self.model_dir),
            "session_len": int(self.config.session_len) if self.config.session_len else None,
            "lora_config": lora,
            "lora_override": self.lora_override,
            "load_seconds": round(self.load_seconds, 3),
        }

    def warning_findings(self) -> list[Finding]:
        return [Finding(check="config", severity="warning", cause="lora_not_applied", message=w)
                for w in self.warnings]

    def close(self) -> None:
        """Release the engine and check the GPU got its memory back: with `--layers every` on a 7B model the
        next build would otherwise run out of memory far from the cause."""
        tm = getattr(self, "tm", None)
        self.instance = None
        self.tm = None
        failed = None
        if tm is not None:
            try:
                tm.close()
            except Exception as e:  # noqa: BLE001 - reported below, after the references are dropped
                failed = f"{type(e).__name__}: {str(e).strip()[:300]}"
        del tm
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        if failed is not None:
            raise LiveEngineError(f"Closing TurboMind for {self.model_dir} failed ({failed}); its GPU memory may "
                                  "still be held, so no further engine is built in this process.")
        before, after = getattr(self, "free_before", None), _free_gpu_bytes()
        if before is not None and after is not None and after < before - CLOSE_SLACK_BYTES:
            gib = 1 << 30
            raise LiveEngineError(
                f"After closing TurboMind for {self.model_dir} the GPU has {after / gib:.2f} GiB free, "
                f"{(before - after) / gib:.2f} GiB less than before it was built ({before / gib:.2f} GiB): the "
                "engine's memory was not released, and the next build would run out of memory.")

    def __enter__(self) -> "LiveTurboMind":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def live_factory(**kwargs: Any) -> Callable[[Path], LiveTurboMind]:
    """An engine factory for parity.layerwise: `make_engine(model_dir) -> LiveTurboMind`."""
    ok, reason = available()
    if not ok:
        raise unavailable_error(reason)

    def make(model_dir: Path) -> LiveTurboMind:
        return LiveTurboMind(model_dir, **kwargs)

    return make
