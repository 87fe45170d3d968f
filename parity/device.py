"""Where a run computes: `--device cpu|cuda|cuda:N|auto` for the reference capture, the noise floor and the replay.

One `Placement` per run, resolved before any work (a bad or unusable device is exit 2, one paragraph):

* the reference model is placed with accelerate's big-model inference: moved whole onto the device when it
  fits (with room for the run), else spread layer by layer over every visible GPU (`infer_auto_device_map` +
  `dispatch_model`, decoder layers never split). Offloading to CPU RAM is not used: its hooks swap weights in
  and out, which the per-layer precision casts (parity.reference.precision) must not race with; a model that
  does not fit the GPUs is exit 2, with `--device cpu` as the way out;
* the replay reads each layer's weights from the memory-mapped workspace and copies them onto the device one
  layer at a time (parity.deploy.replay), so the GPU holds one layer's upcast weights, never the model;
* traces still stream to disk (the writers copy to host memory); the floor's row statistics are computed on
  the device.

Judged float32 stays float32 on a GPU: TF32 is switched off for the whole run (`judged_precision`), since a
TF32 matmul rounds its inputs to 10 mantissa bits and would move the replay's error by ~1e-4 to 1e-3, far
above the fp32 floor it is judged against. Float64 (the fp32 mode's noise floor) runs where the device
supports it; CPU and CUDA both do (`supports_float64`).
"""

from __future__ import annotations

import contextlib
import re
from dataclasses import dataclass, field
from typing import Any, Iterator

import torch
from torch import nn

from .errors import ParityInputError

DEVICE_CHOICES = "cpu, cuda, cuda:N or auto"
_SPEC = re.compile(r"^(cpu|auto|cuda)(?::(\d+))?$")
# the share of a GPU's free memory the reference's weights may take; the rest is for activations, the floor's
# per-layer float64 casts and the replay's scratch
WEIGHT_SHARE = 0.6


@dataclass
class Placement:
    """The run's compute device, and how the reference model was put there."""

    spec: str
    device: torch.device
    reference_map: dict[str, Any] = field(default_factory=dict)  # accelerate's device map when spread

    @property
    def is_cpu(self) -> bool:
        return self.device.type == "cpu"

    def to(self, t: torch.Tensor) -> torch.Tensor:
        """`t` on the compute device (no copy on CPU)."""
        return t if t.device == self.device else t.to(self.device, non_blocking=False)

    def describe(self) -> dict[str, Any]:
        """The report's `device` entry: what ran where."""
        out: dict[str, Any] = {"requested": self.spec, "device": str(self.device),
                               "float64": supports_float64(self.device), "tf32": False}
        if self.device.type == "cuda":
            out["name"] = torch.cuda.get_device_name(self.device)
            out["torch_cuda"] = torch.version.cuda
        if self.reference_map:
            out["reference_device_map"] = sorted({str(v) for v in self.reference_map.values()})
        return out


def resolve_device(spec: str | torch.device | None) -> Placement:
    """The Placement for `--device SPEC` (None: "cpu"). Exit 2 when SPEC is not a choice or cannot run here."""
    text = "cpu" if spec is None else str(spec).strip().lower()
    m = _SPEC.match(text)
    if m is None or (m.group(1) != "cuda" and m.group(2) is not None):
        raise ParityInputError(f"--device {spec!r} is not a device parity runs on; expected {DEVICE_CHOICES} "
                               "(auto: the first CUDA GPU when there is one, else cpu).")
    kind, index = m.group(1), m.group(2)
    if kind == "cpu" or (kind == "auto" and not torch.cuda.is_available()):
        return Placement(text, torch.device("cpu"))
    if kind == "auto":
        return Placement(text, torch.device("cuda", 0))
    if not torch.cuda.is_available():
        build = ("a CPU-only build" if torch.version.cuda is None else
                 f"built for CUDA {torch.version.cuda}, but no GPU or driver is visible")
        raise ParityInputError(
            f"--device {text} asks for a CUDA GPU, but torch.cuda.is_available() is False here (torch "
            f"{torch.__version__}, {build}). Run with --device cpu (the default), or --device auto to use a GPU "
            "only where there is one; on a GPU machine install a CUDA build of torch.")
    count = torch.cuda.device_count()
    n = int(index) if index is not None else 0
    if n >= count:
        raise ParityInputError(f"--device {text}: this machine has {count} CUDA device(s), numbered 0 to "
                               f"{count - 1}.")
    return Placement(text, torch.device("cuda", n))


def supports_float64(device: torch.device) -> bool:
    """Whether the noise floor can run in float64 on `device` (CPU and CUDA do; e.g. Apple's MPS does not)."""
    return torch.device(device).type in ("cpu", "cuda")


# torch's per-backend float32 precision knobs (torch >= 2.9; "ieee" is full float32, "tf32"/"bf16" are not).
# Reading the legacy flags (allow_tf32, get_float32_matmul_precision) after a user set these raises, so only
# the new API is used where it exists.
_FP32_KNOBS = ("cuda.matmul", "cudnn.conv", "cudnn.rnn", "mkldnn.matmul", "mkldnn.conv", "mkldnn.rnn")


def _knobs() -> list[Any]:
    out = []
    for name in _FP32_KNOBS:
        obj: Any = torch.backends
        for part in name.split("."):
            obj = getattr(obj, part, None)
        if obj is not None and hasattr(obj, "fp32_precision"):
            out.append(obj)
    return out


@contextlib.contextmanager
def judged_precision() -> Iterator[None]:
    """Within the block, float32 matmuls, convolutions and RNNs are full float32 (no TF32, no bfloat16
    shortcuts) on CUDA and on CPU (oneDNN); the previous settings come back afterwards."""
    knobs = _knobs()
    if knobs:
        saved = [(k, k.fp32_precision) for k in knobs]
        for k in knobs:
            k.fp32_precision = "ieee"
        try:
            yield
        finally:
            for k, value in saved:
                k.fp32_precision = value
        return
    matmul = torch.backends.cuda.matmul.allow_tf32  # torch < 2.9: the legacy flags
    cudnn = torch.backends.cudnn.allow_tf32
    precision = torch.get_float32_matmul_precision()
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.set_float32_matmul_precision("highest")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(precision)
        torch.backends.cuda.matmul.allow_tf32 = matmul
        torch.backends.cudnn.allow_tf32 = cudnn


def fp32_settings() -> dict[str, str]:
    """The float32 precision of each backend now (what `judged_precision` sets), for tests and the report."""
    return {name: k.fp32_precision for name, k in zip(_FP32_KNOBS, _knobs())} or {
        "cuda.matmul": "tf32" if torch.backends.cuda.matmul.allow_tf32 else "ieee",
        "cudnn.conv": "tf32" if torch.backends.cudnn.allow_tf32 else "ieee"}


def place_reference(model: nn.Module, layers: list[nn.Module], placement: Placement) -> nn.Module:
    """Put the reference model on the run's device (see the module docstring); returns the placed model."""
    if placement.is_cpu:
        return model
    from accelerate import dispatch_model, infer_auto_device_map
    from accelerate.utils import compute_module_sizes

    size = compute_module_sizes(model)[""]
    free = {i: int(torch.cuda.mem_get_info(i)[0] * WEIGHT_SHARE) for i in range(torch.cuda.device_count())}
    main = placement.device.index or 0
    if size <= free[main]:
        return model.to(placement.device)
    if size > sum(free.values()):
        gib = 1 << 30
        raise ParityInputError(
            f"The reference model's weights ({size / gib:.1f} GiB) do not fit the {len(free)} visible GPU(s) "
            f"({sum(free.values()) / gib:.1f} GiB usable: {WEIGHT_SHARE:.0%} of the free memory). Run with "
            "--device cpu (add --low-memory to keep the weights in the checkpoint dtype).")
    no_split = sorted({type(layer).__name__ for layer in layers})
    device_map = infer_auto_device_map(model, max_memory=free, no_split_module_classes=no_split)
    placement.reference_map = dict(device_map)
    return dispatch_model(model, device_map=device_map, main_device=main)


def module_device(module: nn.Module) -> torch.device:
    """The device of a module's first parameter (where its inputs must be)."""
    for p in module.parameters():
        return p.device
    return torch.device("cpu")


def check_floor_device(placement: Placement, floor_dtype: torch.dtype) -> None:
    """The fp32 mode's noise floor runs in float64; a device without it cannot judge float32 (exit 2)."""
    if floor_dtype == torch.float64 and not supports_float64(placement.device):
        raise ParityInputError(f"--device {placement.spec}: {placement.device.type} has no float64, which the "
                               "fp32 mode's noise floor needs; use --device cpu or a CUDA GPU.")
