"""Run lmdeploy's real TurboMind converter in-process and record what it decided.

`convert(model_dir, out_dir)` calls `lmdeploy.turbomind.deploy.converter.main` (the code behind
`lmdeploy convert`; same API from 0.6.x to 0.9.1) under `compat.cpu_converter_patches()`, so it also runs on a
machine without CUDA. It:

* validates the model folder first (folder, config.json, architecture) and turns every converter failure
  into a `ParityInputError` (one paragraph naming the path/field);
* records the lmdeploy version, the XComposer2 sub-type lmdeploy chose (`get_xcomposer_type`, observed
  while the converter runs), the `lora_config` it wrote (read back from config.yaml) and the source model's
  fingerprint (`parity.deploy.source`), so a run can tell a workspace converted from another model;
* detects the 4KHD trap: the checkpoint's `ixc_utils.py` defines `HD_transform`/`Image_transform` but
  lmdeploy's import of it failed, so the 7b LoRA settings were used silently;
* optionally overrides the `lora_config` (the source model's `model_info()` is patched inside this
  process only); a `parity disguise` folder brings its own (`parity_lora_config.json`, and `attn_bias = 1`
  when its q/k/v carry biases: `parity.disguise.lora.disguise_model_info`), so converting a disguise with
  parity gives what lmdeploy writes with `register_lora_config()` active;
* captures everything lmdeploy prints (stdout, stderr/tqdm, its logger, Python warnings) into
  `parity-conversion.log` in the workspace root instead of the terminal;
* is atomic: it converts into a hidden temp sibling and renames it into place (a crash never leaves a half
  workspace at `out_dir`); `parity-conversion.json` (the ConversionRecord) is written before the rename.

`convert_cached(model_dir, cache_root)` converts into `cache_root/<key>` only when that folder is absent; the
key hashes the model folder's file names, sizes and mtimes, tp, lora_config and the lmdeploy version. Several
processes may ask for the same entry at once (pytest-xdist workers, `parity run --jobs` workers, two users of
one cache): an exclusive lock on `cache_root/.<entry>.lock` (`parity.locks.entry_lock`: released by the kernel
when its holder exits, even by a crash) lets one of them convert while the others wait and then use its result.
"""

from __future__ import annotations

import contextlib
import hashlib
import inspect
import io
import json
import logging
import os
import re
import shutil
import time
import warnings
from dataclasses import asdict
from pathlib import Path
from typing import Any, Iterator

import yaml

from ..atomic import remove_leftovers, replaced_folder
from ..errors import ParityInputError, followable, one_line
from ..hfconfig import kv_heads_of, read_hf_config
from ..locks import entry_lock
from ..patching import patched
from ..records import ConversionRecord
from .compat import cpu_converter_patches, installed_lmdeploy_version
from .folder_config import LORA_CONFIG_FILE, disguise_model_info
from .lora_config import check_lora_override
from .source import model_fingerprint
from .workspace import CONFIG_NAME, RECORD_NAME, load_record

LOG_NAME = "parity-conversion.log"

# lmdeploy's ModelType names -> the sub-type recorded
SUB_TYPES = {"XCOMPOSER2": "7b", "XCOMPOSER2_4KHD": "4khd", "XCOMPOSER2D5": "2.5"}
# what each ixc_utils entry point means to lmdeploy (it tries Image_transform first)
_IXC_MARKERS = (("Image_transform", "2.5"), ("HD_transform", "4khd"))
# Bump when the conversion procedure (patches, override mechanics) changes: part of the cache key.
# 2: disguise folders bring their lora_config and attn_bias;
# 3: the conversion record keeps the source model's fingerprint (`ConversionRecord.source`, parity.deploy.source).
#    A workspace cached before it has a record without one, and the source check (parity.checks.source) then
#    falls back to config.yaml's sizes and the norm weights, a weaker test than the fingerprint's sampled
#    tensors: a new cache key re-converts it, and the new record has one.
CONVERT_PROCEDURE_VERSION = "3"


# ------------------------------------------------------------------------------------------ validation


def _arch_from_config(cfg: dict, cfg_path: Path) -> str:
    """The architecture lmdeploy will pick (`lmdeploy.archs.get_model_arch`'s rule, without loading code)."""
    archs = cfg.get("architectures")
    auto_map = cfg.get("auto_map") if isinstance(cfg.get("auto_map"), dict) else {}
    if archs:
        if not isinstance(archs, list) or not all(isinstance(a, str) for a in archs):
            raise ParityInputError(f"{cfg_path}: 'architectures' must be a list of class names, got {archs!r}.")
        arch = archs[0]
        if any(isinstance(v, str) and "InternLMXComposer2ForCausalLM" in v for v in auto_map.values()):
            arch = "InternLMXComposer2ForCausalLM"
        return arch
    if isinstance(auto_map.get("AutoModelForCausalLM"), str):
        return auto_map["AutoModelForCausalLM"].split(".")[-1]
    raise ParityInputError(
        f"{cfg_path} names no architecture: expected 'architectures': ['InternLMXComposer2ForCausalLM'] (or an "
        "auto_map entry pointing at InternLMXComposer2ForCausalLM), which is how lmdeploy picks its reader."
    )


def validate_model_dir(model_dir: Path) -> tuple[dict, str]:
    if not model_dir.exists():
        raise ParityInputError(f"Model folder {model_dir} does not exist; expected a local Hugging Face model folder.")
    if not model_dir.is_dir():
        raise ParityInputError(f"Model path {model_dir} is a file; expected the Hugging Face model folder containing config.json.")
    cfg = read_hf_config(model_dir, "a Hugging Face model folder")
    arch = _arch_from_config(cfg, model_dir / "config.json")
    from lmdeploy.turbomind.supported_models import SUPPORTED_ARCHS

    if arch not in SUPPORTED_ARCHS:
        raise ParityInputError(
            f"{model_dir / 'config.json'}: architecture {arch!r} is not supported by lmdeploy's TurboMind "
            f"converter (lmdeploy {installed_lmdeploy_version()}); expected InternLMXComposer2ForCausalLM (set "
            "'architectures' or an auto_map entry naming it, which also selects the XComposer2 vision loader)."
        )
    weights = [p for p in model_dir.iterdir() if p.suffix in (".safetensors", ".bin", ".pt")]
    if not weights:
        raise ParityInputError(
            f"Model folder {model_dir} has no weight files; expected model*.safetensors (or pytorch_model*.bin)."
        )
    for key in ("num_hidden_layers", "num_attention_heads", "hidden_size", "intermediate_size", "vocab_size",
                "rms_norm_eps"):
        if key not in cfg:
            raise ParityInputError(
                f"{model_dir / 'config.json'}: key '{key}' is missing; lmdeploy's reader needs it to build the "
                "TurboMind config."
            )
    return cfg, arch


def _kv_replication_note(cfg: dict, arch: str, tp: int) -> str:
    """lmdeploy 0.7.1 replicates kv heads when tp > kv heads (`Attn._repeat_kv`), reshaping every exported
    w_qkv tensor with `hidden_units` rows -- which a PLoRA `Plora_B` of any other rank does not have: the
    converter then fails with a bare reshape error. This names the reason beside lmdeploy's own message (a
    wqkv rank equal to the hidden size converts, so nothing is refused up front)."""
    if arch != "InternLMXComposer2ForCausalLM":
        return ""
    heads = int(cfg.get("num_attention_heads") or 0)
    kv = kv_heads_of(cfg)
    if not (kv and tp > kv and heads % tp == 0):  # (heads % tp != 0: lmdeploy's own assertion says so)
        return ""
    return (f"tp={tp} is more than the {kv} kv head(s) in config.json (num_key_value_heads): lmdeploy 0.7.1 then "
            f"replicates the kv heads (Attn._repeat_kv in turbomind/deploy/module.py), which reshapes the w_qkv "
            f"LoRA B with hidden_size rows and fails for a PLoRA model whose wqkv rank is not the hidden size. "
            f"Use tp <= {kv}.")


# ------------------------------------------------------------------------------------------ capture


class _ListHandler(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@contextlib.contextmanager
def captured_output(log: list[str], warn_out: list[str]) -> Iterator[None]:
    """Swallow lmdeploy's prints / tqdm / logger / warnings into `log` (and warnings+ into `warn_out`)."""
    from lmdeploy.utils import get_logger

    get_logger("lmdeploy")  # initialise it *outside* the redirection (its handler binds sys.stdout)
    loggers = [logging.getLogger(n) for n in ("lmdeploy", "transformers", "transformers_modules")]
    saved = [(lg, list(lg.handlers), lg.propagate) for lg in loggers]
    handler = _ListHandler()
    out, err = io.StringIO(), io.StringIO()
    caught: list[warnings.WarningMessage] = []
    try:
        for lg in loggers:
            lg.handlers = [handler]
            lg.propagate = False
        with warnings.catch_warnings(record=True) as rec_list, \
                contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            warnings.simplefilter("always")
            try:
                yield
            finally:
                caught.extend(rec_list or [])
    finally:
        for lg, handlers, prop in saved:
            lg.handlers = handlers
            lg.propagate = prop
        for rec in handler.records:
            line = f"[{rec.name} {rec.levelname}] {rec.getMessage()}"
            log.append(line)
            if rec.levelno >= logging.WARNING and rec.name.startswith("lmdeploy"):
                warn_out.append(f"lmdeploy logged: {rec.getMessage()}")
        for w in caught:
            log.append(f"[warning {w.category.__name__}] {w.message}")
        text = out.getvalue() + err.getvalue()
        # tqdm redraws with \r; keep the final state of each line
        for raw in text.splitlines():
            line = raw.split("\r")[-1].rstrip()
            if line:
                log.append(line)


# ------------------------------------------------------------------------------------------ sub-type


def ixc_expected(model_dir: Path) -> tuple[str | None, str | None]:
    """(sub-type the checkpoint's ixc_utils.py text implies, the entry point name) or (None, None)."""
    path = model_dir / "ixc_utils.py"
    if not path.is_file():
        return None, None
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return None, None
    for name, sub in _IXC_MARKERS:
        if re.search(rf"^\s*(?:async\s+)?(?:def|class)\s+{name}\b|^\s*{name}\s*=", text, re.MULTILINE):
            return sub, name
    return None, None


def _import_failure(model_dir: Path, entry: str) -> str:
    """Reproduce lmdeploy's `get_class_from_dynamic_module('ixc_utils.<entry>', model_dir)` and describe its
    exception (the one lmdeploy swallowed)."""
    from transformers.dynamic_module_utils import get_class_from_dynamic_module

    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            get_class_from_dynamic_module(f"ixc_utils.{entry}", str(model_dir))
    except Exception as e:  # noqa: BLE001 - we report whatever lmdeploy swallowed
        return f"{type(e).__name__}: {one_line(e)}"
    return "the import succeeds now (it failed while the converter ran)"


@contextlib.contextmanager
def _observe_xcomposer_type(seen: list[Any]) -> Iterator[None]:
    """Record what lmdeploy's `get_xcomposer_type` returns while the converter runs."""
    try:
        mod = __import__("lmdeploy.vl.model.xcomposer2", fromlist=["get_xcomposer_type"])
    except Exception:  # pragma: no cover - module missing in this lmdeploy
        yield
        return
    orig = mod.get_xcomposer_type

    def wrapped(*args, **kwargs):
        res = orig(*args, **kwargs)
        seen.append(res[0])
        return res

    with patched(mod, "get_xcomposer_type", wrapped):
        yield


def _sub_type_name(model_type: Any) -> str:
    name = getattr(model_type, "name", str(model_type))
    return SUB_TYPES.get(name, name.lower())


@contextlib.contextmanager
def patched_lora_config(arch: str, override: dict | None) -> Iterator[None]:
    """Patch the source model class's `model_info()` so the written lora_config (and attn_bias) is `override`
    merged over what lmdeploy chose (this process only)."""
    if not override:
        yield
        return
    from lmdeploy.turbomind.deploy.source_model.base import INPUT_MODELS
    from lmdeploy.turbomind.supported_models import SUPPORTED_ARCHS

    cls = INPUT_MODELS.get(SUPPORTED_ARCHS[arch])
    orig = cls.model_info

    def model_info(self):
        info = orig(self)
        info.update(override)
        return info

    with patched(cls, "model_info", model_info):
        yield


# ------------------------------------------------------------------------------------------ convert


def _call_main(main, model_dir: Path, dst: Path, tp: int, model_name: str, chat_template: str | None) -> None:
    from ..quant.awq_folder import is_awq_folder

    params = inspect.signature(main).parameters
    # an AWQ folder (`lmdeploy lite auto_awq`, `parity quantize`) converts with model_format='awq' (int4 workspace)
    fmt = "awq" if is_awq_folder(model_dir) else "hf"
    kwargs: dict[str, Any] = dict(model_format=fmt, dst_path=str(dst), tp=tp)
    if chat_template is not None:
        kwargs["chat_template"] = chat_template
    if "dtype" in params:
        kwargs["dtype"] = "auto"
    main(model_name, str(model_dir), **{k: v for k, v in kwargs.items() if k in params or _has_var_kw(params)})


def _has_var_kw(params) -> bool:
    return any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())


def _chat_template(model_dir: Path) -> str:
    from lmdeploy.model import MODELS, best_match_model

    lg = logging.getLogger("lmdeploy")
    level = lg.level
    lg.setLevel(logging.ERROR)  # "Did not find a chat template matching ...": irrelevant, we fall back below
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            name = best_match_model(str(model_dir))
    finally:
        lg.setLevel(level)
    if name in (None, "base") and "internlm-xcomposer2" in MODELS.module_dict:
        name = "internlm-xcomposer2"
    return name or "base"


def _failing_line(e: BaseException) -> str:
    """`statement` (file:line) of the innermost frame that raised, for messageless assertions."""
    import traceback

    frames = traceback.extract_tb(e.__traceback__)
    if not frames:
        return type(e).__name__
    f = frames[-1]
    where = "/".join(Path(f.filename).parts[-3:])
    return f"`{(f.line or '').strip()}` failed at {where}:{f.lineno}"


def _converter_error(model_dir: Path, e: BaseException, log: list[str]) -> ParityInputError:
    msg = one_line(e) or _failing_line(e)
    if len(msg) > 600:
        msg = msg[:600] + " ..."
    tail = ""
    if log:
        tail = " Last converter output: " + " | ".join(log[-3:])
    kind = "assertion" if isinstance(e, AssertionError) else type(e).__name__
    return ParityInputError(
        f"lmdeploy {installed_lmdeploy_version()}'s TurboMind converter failed on {model_dir} ({kind}: {msg}). "
        f"Expected a Hugging Face XComposer2 checkpoint whose tensors and config.json match what lmdeploy's "
        f"xcomposer2 reader needs (InternLM2 names, grouped wqkv with head_dim 128, Plora_A/Plora_B on "
        f"wqkv/wo/w1/w2/w3).{tail}"
    )


def convert(model_dir: str | Path, out_dir: str | Path, tp: int = 1, lora_config: dict | None = None, *,
            lmdeploy_defaults: bool = False) -> ConversionRecord:
    """Convert `model_dir` with lmdeploy's converter into workspace `out_dir` (replaced atomically).

    A `parity disguise` folder is converted with its parity_lora_config.json (unless `lora_config` is given)
    and its q/k/v biases exported (attn_bias = 1). `lmdeploy_defaults`: ignore the folder's parity files and
    convert as plain `lmdeploy convert` does without parity's registration (the LoRA settings lmdeploy
    hard-codes, biases dropped) -- to see what a deployment without the registration loses.
    """
    model_dir = followable(model_dir, "Model folder").resolve()
    out_dir = followable(out_dir, "Workspace folder").resolve()
    if not isinstance(tp, int) or isinstance(tp, bool) or tp < 1 or tp & (tp - 1):
        raise ParityInputError(f"tp={tp!r} is not a power of two >= 1; lmdeploy's converter needs tp = 2^n.")
    version = installed_lmdeploy_version()
    if version is None:
        raise ParityInputError(
            "lmdeploy is not installed in this environment; install the pinned converter with "
            "`pip install --no-deps lmdeploy==0.7.1` plus its pure-Python needs (pyproject extra 'lmdeploy-cpu')."
        )
    override = check_lora_override(lora_config)
    extra: dict[str, Any] = {}
    if model_dir.is_dir() and not lmdeploy_defaults:
        # a disguise folder: what the registration would give lmdeploy (the given lora_config wins)
        info = disguise_model_info(model_dir, override) if (model_dir / LORA_CONFIG_FILE).is_file() else None
        if info is not None:
            extra["attn_bias"] = info.pop("attn_bias")
            override = info
    from .versions import row_for, semantics_for

    semantics = semantics_for(version)  # ParityInputError for releases without XComposer2 in TurboMind

    log: list[str] = []
    warn: list[str] = []
    seen: list[Any] = []
    _make_parent(out_dir)
    t0 = time.perf_counter()
    with replaced_folder(out_dir, "converting") as tmp:
        with cpu_converter_patches():
            cfg, arch = validate_model_dir(model_dir)
            from lmdeploy.turbomind.deploy.converter import main

            try:
                with captured_output(log, warn), _observe_xcomposer_type(seen), \
                        patched_lora_config(arch, {**(override or {}), **extra} or None):
                    chat_template = _chat_template(model_dir)
                    t1 = time.perf_counter()
                    _call_main(main, model_dir, tmp, tp, model_dir.name, chat_template)
                    elapsed = time.perf_counter() - t1
            except ParityInputError:
                raise
            except (Exception, SystemExit) as e:  # noqa: BLE001 - converter failures become input errors
                err = _converter_error(model_dir, e, _untemp(log, tmp, out_dir))
                note = _kv_replication_note(cfg, arch, tp)
                if note:
                    err = ParityInputError(f"{err} {note}")
                if not semantics.converter_writes_lora:
                    err = ParityInputError(f"{err} Note: lmdeploy {version} cannot convert PLoRA checkpoints at all "
                                           f"({row_for(version).summary}); use lmdeploy 0.7.1.")
                raise err from e
            if arch == "InternLMXComposer2ForCausalLM" and not seen:
                # the reader did not ask (another lmdeploy code path): ask lmdeploy ourselves
                from lmdeploy.vl.model.xcomposer2 import get_xcomposer_type

                with captured_output(log, warn):
                    seen.append(get_xcomposer_type(str(model_dir))[0])
        log = _untemp(log, tmp, out_dir)

        cfg_path = tmp / "triton_models" / "weights" / CONFIG_NAME
        if not cfg_path.is_file():
            raise ParityInputError(
                f"lmdeploy's converter finished without writing {CONFIG_NAME} for {model_dir}; expected "
                "triton_models/weights/config.yaml in the workspace."
            )
        written = yaml.safe_load(cfg_path.read_text()) or {}
        lora_written = dict(written.get("lora_config") or {})

        sub_type = _sub_type_name(seen[-1]) if seen else ""
        if arch != "InternLMXComposer2ForCausalLM":
            warn.append(
                f"architecture {arch} is not InternLMXComposer2ForCausalLM: lmdeploy used its "
                f"'{_registered(arch)}' reader, which has no PLoRA, and will not load the XComposer2 vision model."
            )
        if semantics.converter_writes_lora and not semantics.runtime_applies_plora:
            warn.append(f"lmdeploy {version}: {row_for(version).summary} Deploy with lmdeploy 0.7.1 for PLoRA.")
        expected_sub, entry = ixc_expected(model_dir)
        if expected_sub is not None and sub_type != expected_sub:
            with captured_output(log, []):
                reason = _import_failure(model_dir, entry)  # type: ignore[arg-type]
            if expected_sub == "4khd" and override is not None:
                consequence = (
                    "so lmdeploy chose the 7b LoRA settings; the lora_config override given to parity replaced them "
                    f"and the workspace has {lora_written}"
                )
            elif expected_sub == "4khd":
                consequence = (
                    f"so the 4KHD LoRA settings were NOT used: the workspace has lora_config {lora_written} "
                    "(4KHD needs lora_rank_pattern 'attention.w_qkv:8,attention.wo:256' and lora_scale_pattern "
                    "'attention.w_qkv:2.0,attention.wo:1.0'; the rank mismatch fails at load, the scale would not)"
                )
            else:
                consequence = (
                    "lmdeploy gives 2.5 the same LoRA settings as 7b, but its vision preprocessing will treat the "
                    "model as 7b (fixed-size images instead of Image_transform's dynamic crops)"
                )
            warn.append(
                f"{'4KHD' if expected_sub == '4khd' else 'XComposer2.5'} trap: {model_dir / 'ixc_utils.py'} defines "
                f"{entry} (an XComposer2-{expected_sub} checkpoint), but lmdeploy's get_xcomposer_type could not "
                f"import it and fell back to XComposer2-{sub_type or '7b'}, {consequence}. lmdeploy swallowed the "
                f"import error, which was: {reason}. Fix that import (e.g. install a torchvision matching the "
                f"installed torch) and convert again."
            )
        if override is not None:
            mismatch = {k: (v, lora_written.get(k)) for k, v in override.items() if lora_written.get(k) != v}
            if "attn_bias" in extra and int((written.get("model_config") or {}).get("attn_bias", -1)) != extra["attn_bias"]:
                mismatch["attn_bias"] = (extra["attn_bias"], (written.get("model_config") or {}).get("attn_bias"))
            if mismatch:
                raise ParityInputError(
                    f"The lora_config override was not written as given (key: (given, written)) {mismatch}; "
                    f"this lmdeploy ({version}) builds lora_config differently."
                )
        record = ConversionRecord(
            model=str(model_dir),
            workspace=str(out_dir),
            lmdeploy_version=version,
            sub_type=sub_type,
            lora_config=lora_written,
            tp=tp,
            warnings=warn,
            source=model_fingerprint(model_dir),
        )
        (tmp / RECORD_NAME).write_text(json.dumps(asdict(record), indent=1, sort_keys=True) + "\n")
        header = [f"# lmdeploy {version} converter: {elapsed:.2f} s (conversion only; {time.perf_counter() - t0:.2f} s "
                  f"with imports and checks), tp={tp}, model {model_dir}"]
        (tmp / LOG_NAME).write_text("\n".join(header + log) + "\n")
        return record


def _make_parent(out_dir: Path) -> None:
    """Create the folder the workspace goes into; a path through a file or a read-only folder is bad input."""
    try:
        out_dir.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ParityInputError(
            f"Cannot create the workspace folder {out_dir}: {out_dir.parent} cannot be made a folder "
            f"({e.strerror or e}); expected a writable folder path (for `parity run`, --cache-dir)."
        ) from None
    if not os.access(out_dir.parent, os.W_OK | os.X_OK):
        raise ParityInputError(f"Cannot write the workspace folder {out_dir}: {out_dir.parent} is not writable.")


def _untemp(log: list[str], tmp: Path, out_dir: Path) -> list[str]:
    """Show the final workspace path instead of the temp folder the converter really wrote to."""
    return [line.replace(str(tmp), str(out_dir)) for line in log]


def _registered(arch: str) -> str:
    from lmdeploy.turbomind.supported_models import SUPPORTED_ARCHS

    return SUPPORTED_ARCHS.get(arch, "?")


# ------------------------------------------------------------------------------------------ cache


def cache_key(model_dir: str | Path, tp: int = 1, lora_config: dict | None = None) -> str:
    """Hash of the model folder's file names, sizes and mtimes, tp, lora_config and lmdeploy's version."""
    model_dir = Path(model_dir).resolve()
    if not model_dir.is_dir():
        raise ParityInputError(f"Model folder {model_dir} does not exist; expected a local Hugging Face model folder.")
    h = hashlib.sha256()
    for p in sorted(model_dir.rglob("*")):
        if p.is_file() and "__pycache__" not in p.parts:
            st = p.stat()
            h.update(f"{p.relative_to(model_dir)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    h.update(json.dumps({"tp": tp, "lora_config": lora_config, "lmdeploy": installed_lmdeploy_version(),
                         "procedure": CONVERT_PROCEDURE_VERSION}, sort_keys=True, default=str).encode())
    return h.hexdigest()[:20]


def _short_hash(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:8]


def convert_cached(model_dir: str | Path, cache_root: str | Path, tp: int = 1, lora_config: dict | None = None,
                   *, prune: bool = True) -> Path:
    """Workspace folder for (model_dir, tp, lora_config) under `cache_root`, converting only when absent.

    The folder is `cache_root/<model name>-<path hash>-tp<tp>-<lora hash>-<cache_key>`. With `prune`, older
    entries for the same model path, tp and lora_config (the model files changed since) are removed after a
    successful conversion, so a cache of 7B workspaces does not grow without bound.
    """
    model_dir = followable(model_dir, "Model folder").resolve()
    key = cache_key(model_dir, tp, lora_config)
    prefix = f"{model_dir.name}-{_short_hash(str(model_dir))}-tp{tp}-{_short_hash(lora_config)}-"
    root = Path(cache_root).resolve()
    dest = root / f"{prefix}{key}"
    if _cached(dest):
        return dest
    _make_parent(dest)
    # One converter per entry: the others wait here, then find the winner's workspace. convert() itself
    # builds in a temp sibling and renames, so a reader that skips the lock (the check above) never sees
    # a half workspace.
    with entry_lock(root / f".{dest.name}.lock"):
        if _cached(dest):
            return dest
        remove_leftovers(dest, "converting")  # of a conversion killed outright (we hold the entry's lock)
        convert(model_dir, dest, tp=tp, lora_config=lora_config)
        if prune:
            for old in root.glob(f"{glob_escape(prefix)}*"):
                if old != dest and old.is_dir() and (old / RECORD_NAME).is_file():
                    shutil.rmtree(old, ignore_errors=True)
                    (root / f".{old.name}.lock").unlink(missing_ok=True)
    return dest


def _cached(dest: Path) -> bool:
    return (dest / RECORD_NAME).is_file() and (dest / "triton_models" / "weights" / CONFIG_NAME).is_file()


def glob_escape(text: str) -> str:
    return re.sub(r"([\[\]*?])", r"[\1]", text)


def read_record(workspace: str | Path) -> ConversionRecord | None:
    """The ConversionRecord a conversion left in `workspace` (None when absent; ParityInputError when damaged)."""
    return load_record(Path(workspace) / RECORD_NAME)
