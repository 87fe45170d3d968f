"""`parity quantize`: AWQ W4A16 with lmdeploy 0.7.1's own lite code (`lmdeploy.lite.apis.auto_awq.auto_awq`), on CPU.

Everything numerical is lmdeploy's: its calibration context, `smooth_layers` (smoothing scales from the
activation absmax), `quant_weights` (round-to-nearest, asymmetric, per group) and its save format. parity only
(a) feeds the calibration batches from local text instead of a hub dataset (lmdeploy's `get_calib_loaders`
is swapped for a function returning the same kind of token batches); (b) makes the vision loader build on a CPU
machine without decord/torchvision (`check_xcomposer_install` and `build_preprocessor` — preprocessing is never
used by the text-only calibration); (c) gives each call an empty observer registry (`fresh_observer_registry`);
(d) the converter patches of `parity.deploy.compat` (CUDA calls answered on
CPU). All patches live inside this process and are undone on exit. Calibration is text-only (`im_mask=None`),
exactly what lmdeploy does.

`--compensate-plora` wraps lmdeploy's `smooth_ln_fcs` / `smooth_fc_fcs` and applies the exact compensation right
after each call, with the scale the call returned:
* norm -> linears (x' = x / s, W' = W * s): each following linear's `Plora_A` input columns * s;
* linear -> linears (producer rows / s, consumers' columns * s): the producer's `Plora_B` rows / s and each
  consumer's `Plora_A` columns * s.
The output folder is written atomically (a temp sibling renamed into place).
"""

from __future__ import annotations

import contextlib
import json
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch

from ..atomic import remove_leftovers, replaced_folder
from ..errors import ParityInputError
from ..hfconfig import read_hf_config, require_trusted_code
from ..locks import entry_lock
from ..patching import patched

RECORD_NAME = "parity-quantize.json"
LOG_NAME = "parity-quantize.log"

# The built-in calibration text (written for parity; plain English prose, no dataset download).
BUILTIN_CALIB_TEXT = (
    "A small harbour town wakes before the sun. Fishing boats leave the quay one by one, their engines low and "
    "steady, while gulls circle above the nets. In the market square the baker opens his shutters and the smell "
    "of bread drifts between the stalls. Children walk to school along the sea wall, counting the ships on the "
    "horizon. By noon the tide has turned; the boats return with crates of silver fish, and the auctioneer calls "
    "prices faster than anyone can follow. Visitors photograph the red lighthouse, the narrow lanes and the "
    "painted doors. In the evening the cafe by the water fills with voices, music and the clatter of plates. "
    "A map on the wall shows the coastline, the islands to the north and the old railway that once carried "
    "coal inland. The museum keeps a diary written by a lighthouse keeper during the great storm of the last "
    "century: the wind, he wrote, sounded like a train that never arrived. Numbers matter here too: 12 boats, "
    "340 residents, 7 bridges, 1 clock tower that runs five minutes fast. Describe the picture: a blue boat, a "
    "white sail, two people on the deck, and clouds gathering over the hills."
)


@dataclass
class QuantizeRecord:
    """What `parity quantize` did (also written to parity-quantize.json in the output folder)."""

    model: str
    out: str
    lmdeploy_version: str
    w_bits: int
    group_size: int
    compensate_plora: bool
    calib: str
    calib_samples: int
    calib_seqlen: int
    seconds: float
    compensated: list[str] = field(default_factory=list)   # "layer.linear.Plora_X" names that were rescaled
    warnings: list[str] = field(default_factory=list)


def _calib_batches(tokenizer, text: str, samples: int, seqlen: int) -> list[torch.Tensor]:
    """`samples` token batches [1, seqlen] cut from `text` (repeated as needed), like lmdeploy's loaders."""
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids[0]
    if ids.numel() == 0:
        raise ParityInputError("The calibration text tokenizes to nothing; pass --calib with a file of prose.")
    need = samples * seqlen
    reps = -(-need // ids.numel())
    flat = ids.repeat(reps)[:need]
    return [flat[i * seqlen:(i + 1) * seqlen].unsqueeze(0) for i in range(samples)]


def _rows_scale(t: torch.Tensor, scales: torch.Tensor, divide: bool) -> None:
    """Rescale the last len(scales) output rows of a weight [out, in] (lmdeploy's packed-producer rule)."""
    n = scales.numel()
    rows = t[-n:] if t.shape[0] > n else t
    s = scales.to(t.dtype).view(-1, 1)
    rows.div_(s) if divide else rows.mul_(s)


@contextlib.contextmanager
def _compensation(done: list[str], names: dict[int, str]) -> Iterator[None]:
    """Wrap lmdeploy's smoothing functions so each call's scale is also folded into the PLoRA branches."""
    import lmdeploy.lite.quantization.awq as awq

    orig_ln, orig_fc = awq.smooth_ln_fcs, awq.smooth_fc_fcs

    def scale_plora_a(fcs, scales):  # their inputs now come divided by `scales`; like the base weight, Plora_A undoes it
        with torch.no_grad():
            for fc in fcs:
                if hasattr(fc, "Plora_A"):
                    fc.Plora_A.weight.mul_(scales.to(fc.Plora_A.weight.dtype).view(1, -1))
                    done.append(f"{names.get(id(fc), '?')}.Plora_A")

    def ln_fcs(ln, fcs, act_scales, group_size=-1, alpha=0.5):
        scales = orig_ln(ln, fcs, act_scales, group_size, alpha)
        scale_plora_a(fcs, scales)
        return scales

    def fc_fcs(pre_fc, fcs, act_scales, group_size=-1, alpha=0.5):
        scales = orig_fc(pre_fc, fcs, act_scales, group_size, alpha)
        if scales is None:  # lmdeploy skipped this pair (grouped-query v -> o)
            return scales
        with torch.no_grad():
            if hasattr(pre_fc, "Plora_B"):
                _rows_scale(pre_fc.Plora_B.weight, scales, divide=True)
                done.append(f"{names.get(id(pre_fc), '?')}.Plora_B")
        scale_plora_a(fcs, scales)
        return scales

    with patched(awq, "smooth_ln_fcs", ln_fcs), patched(awq, "smooth_fc_fcs", fc_fcs):
        yield


@contextlib.contextmanager
def fresh_observer_registry() -> Iterator[None]:
    """An empty registry of lmdeploy's calibration observers for one `auto_awq` call, the process's own put back
    after. lmdeploy keeps every ActivationObserver in a class-level dict (`GlobalAvailMixin._instances`) that no
    call clears, and `CalibrationContext` hooks every name found there: after a 2-layer model, calibrating a
    1-layer one in the same process died with KeyError 'model.layers.1.attention.wqkv'."""
    from lmdeploy.lite.utils.global_avail import GlobalAvailMixin

    with patched(GlobalAvailMixin, "_instances", {"default": {}}):
        yield


@contextlib.contextmanager
def _vision_loader_fixes(model: Path, applied: list[str]) -> Iterator[None]:
    """`auto_awq` builds lmdeploy's vision model to reach the language model; for an XComposer2.5 folder whose name
    is not a Python identifier (`internlm-xcomposer2d5-7b`) lmdeploy's `init_empty_vit` raises KeyError under
    transformers' sanitised module names. The same in-process fix as `parity run`'s image path, recorded."""
    from lmdeploy.vl.model.xcomposer2 import ModelType, get_xcomposer_type

    from ..deploy.image_input import init_empty_vit_contained, raw_folder_alias  # the one home of these

    if get_xcomposer_type(str(model))[0] != ModelType.XCOMPOSER2D5:
        yield
        return
    with raw_folder_alias(str(model), applied), init_empty_vit_contained(str(model)):  # its get_font too
        yield


@contextlib.contextmanager
def lite_patches(text: str, samples: int, seqlen: int) -> Iterator[None]:
    """The in-process patches lmdeploy's lite code needs on a CPU machine without hub datasets."""
    from ..deploy.compat import cpu_converter_patches
    from ..deploy.image_input import init_empty_vit_contained

    with cpu_converter_patches(), fresh_observer_registry():
        import lmdeploy.lite.apis.calibrate as calibrate
        import lmdeploy.vl.model.xcomposer2 as xc2

        def loaders(name, tokenizer, **kw):  # lmdeploy's signature; the dataset name is ignored
            return _calib_batches(tokenizer, text, samples, seqlen), None

        # lmdeploy's load_vl_model runs init_empty_vit, which leaves CLIPVisionModel changed (see there)
        with patched(calibrate, "get_calib_loaders", loaders), \
                patched(xc2, "check_xcomposer_install", lambda: None), \
                patched(xc2.Xcomposer2VisionModel, "build_preprocessor", lambda self: None), \
                init_empty_vit_contained():
            yield


def _validate(model: Path, w_bits: int, group_size: int, trust_remote_code: bool) -> dict[str, Any]:
    from ..reference.loader import is_xcomposer2

    cfg = read_hf_config(model)
    if not is_xcomposer2(cfg):
        raise ParityInputError(f"{model / 'config.json'} does not name InternLMXComposer2ForCausalLM; `parity "
                               "quantize` runs lmdeploy's AWQ on XComposer2 checkpoints (disguise a Qwen2 PLoRA "
                               "model first).")
    if cfg.get("quantization_config"):
        raise ParityInputError(f"{model / 'config.json'} already has a quantization_config; quantize the original "
                               "floating-point model.")
    require_trusted_code(model, trust_remote_code, "lmdeploy's calibration runs")
    if w_bits != 4:
        raise ParityInputError(f"--w-bits {w_bits}: lmdeploy's AWQ saves the AWQ layout for 4 bits only "
                               "(WeightOnlyQLinear asserts w_bit == 4), and TurboMind deploys W4A16.")
    dims = {"hidden_size": cfg.get("hidden_size"), "intermediate_size": cfg.get("intermediate_size")}
    for k, v in dims.items():
        if not isinstance(v, int) or group_size < 1 or v % group_size:
            raise ParityInputError(f"--group-size {group_size} does not divide config.json's {k}={v}; every "
                                   "quantized linear's input dimension must hold whole groups.")
    return cfg


def quantize(model: Path | str, out: Path | str, *, w_bits: int = 4, group_size: int = 128,
             calib: Path | str | None = None, compensate_plora: bool = False, calib_samples: int = 4,
             calib_seqlen: int = 256, trust_remote_code: bool = False, overwrite: bool = False) -> QuantizeRecord:
    """Run lmdeploy 0.7.1's `auto_awq` on `model` (CPU) and write the AWQ folder `out` atomically."""
    from ..deploy.compat import installed_lmdeploy_version
    from ..deploy.convert import captured_output  # lmdeploy's prints, logger and warnings into the log file
    from ..reference.modelcode import resolving_hub_models

    model, out = Path(model).resolve(), Path(out).resolve()
    _validate(model, w_bits, group_size, trust_remote_code)
    if calib_samples < 1 or calib_seqlen < 1:
        raise ParityInputError("--calib-samples and --calib-seqlen must be positive.")
    if calib is not None:
        calib = Path(calib)
        try:
            text = calib.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise ParityInputError(f"Calibration file {calib} cannot be read as UTF-8 text ({e}); expected plain "
                                   "text (lmdeploy calibrates on text only).") from None
        if not text.strip():
            raise ParityInputError(f"Calibration file {calib} is empty; expected plain text.")
    else:
        text = BUILTIN_CALIB_TEXT
    occupied = (out.is_dir() and any(out.iterdir())) or (out.exists() and not out.is_dir())
    if occupied and not overwrite:
        raise ParityInputError(f"Output folder {out} exists and is not empty; pass --force to replace it.")
    version = installed_lmdeploy_version() or "?"
    warnings: list[str] = []
    if group_size != 128:
        warnings.append(f"group size {group_size}: lmdeploy 0.7.1's TurboMind converter accepts group size 128 "
                        "only, so this folder can be compared in HF but not converted.")
    out.parent.mkdir(parents=True, exist_ok=True)
    log: list[str] = []
    done: list[str] = []
    applied: list[str] = []
    t0 = time.perf_counter()
    with replaced_folder(out, "quantizing") as tmp:
        with lite_patches(text, calib_samples, calib_seqlen):
            from lmdeploy.lite.apis.auto_awq import auto_awq

            comp = _compensation_for(done) if compensate_plora else contextlib.nullcontext()
            try:
                # a hub id the model's code loads (the genuine CLIP) resolves like `parity run`'s (--hub-model)
                with comp, resolving_hub_models(model), _vision_loader_fixes(model, applied), \
                        captured_output(log, warnings):
                    auto_awq(str(model), str(tmp), calib_dataset="ptb", calib_samples=calib_samples,
                             calib_seqlen=calib_seqlen, w_bits=w_bits, w_group_size=group_size, device="cpu")
            except ParityInputError:
                raise
            except (Exception, SystemExit) as e:  # noqa: BLE001 - lmdeploy's failures become input errors
                last = log[-1:] or [""]
                raise ParityInputError(
                    f"lmdeploy {version}'s auto_awq failed on {model} ({type(e).__name__}: {e}). Expected an "
                    f"XComposer2 checkpoint lmdeploy can calibrate. Last output: {last[0]}") from None
        record = QuantizeRecord(model=str(model), out=str(out), lmdeploy_version=version, w_bits=w_bits,
                                group_size=group_size, compensate_plora=compensate_plora,
                                calib=str(calib) if calib else "built-in text", calib_samples=calib_samples,
                                calib_seqlen=calib_seqlen, seconds=round(time.perf_counter() - t0, 2),
                                compensated=done, warnings=warnings + [f"applied: {a}" for a in applied])
        _carry_disguise_files(model, tmp)
        (tmp / RECORD_NAME).write_text(json.dumps(asdict(record), indent=1) + "\n")
        (tmp / LOG_NAME).write_text("\n".join(log) + "\n")
        return record


def _carry_disguise_files(model: Path, out: Path) -> None:
    """A parity disguise (a Qwen2 PLoRA model as XComposer2) is converted with its parity_lora_config.json (its
    ranks, scales and q/k/v biases); lmdeploy's save does not copy it, so the AWQ folder was converted with
    lmdeploy's hard-coded rank 256 and without biases. AWQ changes neither, so the files are carried over."""
    from ..deploy.folder_config import LORA_CONFIG_FILE
    from ..disguise.writer import DISGUISE_RECORD

    for name in (LORA_CONFIG_FILE, DISGUISE_RECORD):
        if (model / name).is_file():
            shutil.copy2(model / name, out / name)


@contextlib.contextmanager
def _compensation_for(done: list[str]) -> Iterator[None]:
    """`_compensation` with module names: lmdeploy's smooth_layers hands modules, the names come from the model
    it calibrates, so the name map is built lazily from every module seen by `collect_target_modules`."""
    import lmdeploy.lite.apis.auto_awq as api

    names: dict[int, str] = {}
    orig = api.collect_target_modules

    def collect(model, *args, **kwargs):
        found = orig(model, *args, **kwargs)
        for n, m in found.items():
            names.setdefault(id(m), n)
        return found

    with patched(api, "collect_target_modules", collect), _compensation(done, names):
        yield


def read_record(folder: Path | str) -> QuantizeRecord | None:
    path = Path(folder) / RECORD_NAME
    try:
        data = json.loads(path.read_text())
        return QuantizeRecord(**data)
    except (OSError, ValueError, TypeError):
        return None


# Quantized fixtures: name -> (source fixture, --compensate-plora). "-awq" is what lmdeploy's auto_awq makes by
# default (PLoRA not compensated); "-awq-kept" keeps PLoRA.
QUANT_FIXTURES: dict[str, tuple[str, bool]] = {
    "xcomposer2-tiny-awq": ("xcomposer2-tiny", False),
    "xcomposer2-tiny-awq-kept": ("xcomposer2-tiny", True),
    "xcomposer2-4khd-tiny-awq-kept": ("xcomposer2-4khd-tiny", True),
    "xcomposer2d5-tiny-awq-kept": ("xcomposer2d5-tiny", True),
}


def quantized_cached(model: Path | str, cache_root: Path | str, compensate_plora: bool) -> Path:
    """`parity quantize` of `model` under `cache_root`, run only when absent (keyed like convert_cached)."""
    from ..deploy.convert import cache_key

    model = Path(model).resolve()
    root = Path(cache_root).resolve()
    dest = root / f"{model.name}-awq{'-kept' if compensate_plora else ''}-{cache_key(model)}"
    if (dest / RECORD_NAME).is_file():
        return dest
    root.mkdir(parents=True, exist_ok=True)
    with entry_lock(root / f".{dest.name}.lock"):
        if not (dest / RECORD_NAME).is_file():
            remove_leftovers(dest, "quantizing")  # of a run killed outright (we hold the entry's lock)
            quantize(model, dest, compensate_plora=compensate_plora, trust_remote_code=True, overwrite=True)
    return dest


def ensure_quantized(cache: Path | str, names: tuple[str, ...] = tuple(QUANT_FIXTURES)) -> dict[str, Path]:
    """The quantized fixtures (QUANT_FIXTURES) under `cache`/quantized, built from the fixtures in `cache`/fixtures."""
    from ..fixtures import ensure

    cache = Path(cache)
    sources = ensure(cache / "fixtures", tuple(sorted({QUANT_FIXTURES[n][0] for n in names})))
    return {n: quantized_cached(sources[QUANT_FIXTURES[n][0]], cache / "quantized", QUANT_FIXTURES[n][1])
            for n in names}
