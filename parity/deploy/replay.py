"""REPLAY engine: TurboMind's (lmdeploy 0.7.1) prefill math, executed on CPU from a converted workspace.

No GPU is needed (`device` may name one: the memory-mapped weights are copied to it a layer at a time). Every number comes from the workspace tensors (never from the HF checkpoint), so a
conversion fault (wrong split, wrong LoRA config, dropped bias, ...) shows up exactly as it would in a
live TurboMind. What is replayed, with the C++ it mirrors (tag v0.7.1):

* embeddings (`LlamaV2::forwardUnified`, `LlamaBatch::ProcessInferRequests`, `LlamaV2::updateEmbedding`):
  token lookup, then the range check that TurboMind really does — ranges processed in order, a negative
  begin/end ends the list, each must satisfy `begin < end`, `end <= input_len`, `begin >= previous end`, and
  the *concatenated* embedding buffer (cast to the weight dtype, as lmdeploy's `prepare_embeddings` does)
  must hold enough elements. On failure TurboMind logs "[ImageFeature] Skip invalid input embeddings" and
  runs with no embeddings and no LoRA mask at all. On success rows are taken *sequentially* from the
  concatenated buffer (TurboMind never checks one embedding's row count against its own range: a
  mismatch that is not a shortfall is accepted and shifts rows; it is reported under
  `info["row_count_mismatch"]`). The LoRA mask is 1 exactly on the copied rows, and exists only with
  `lora_policy == "plora"`.
* linears (`LlamaLinear::forward`): `t = rnd(x @ A)`, `l = rnd(scale * (t @ B))`, rows with mask 0 set to
  0, `y = rnd(x @ W + l)` (one rounding), FP32 accumulation.
* RMSNorm (`rms_norm.cu`): fp32 sum of squares, `rnd(rnd(x * rsqrt(mean + eps)) * w)`; residual adds in T
  (`BiasResidualRMSNorm`).
* attention (`unified_attention_layer.cc`, `attention_universal.h`, `kv_cache_utils_v2.cu`): qkv bias (only
  with attn_bias = 1) added in T to the linear's output, after its LoRA delta and before the rotary; rotary
  in T with fp32 `cos/sin` rounded to T (`FastRoPE::apply`), adjacent-pair layout,
  `inv_freq = exp2(idx * -log2(base) / rot_dim)`, dynamic NTK base only when the context exceeds
  `max_position_embeddings` (`LlamaBatch`), causal GQA with fp32 scores and softmax, unnormalised P rounded
  to T for P@V, fp32 row sum, output rounded to T.
* FFN (`LlamaFfnLayer.cc`, `activation_kernels.cu`): w1 and w3 separate, `rnd(rnd(silu(w1)) * w3)`, w2.
* final RMSNorm, logits in fp32 from T inputs (`postDecodeEmbedding`, `output.weight` is `[vocab, hidden]`).

`numeric="fp32"` runs the same graph with every rounding removed (weights upcast), which isolates
conversion/config faults from precision. `numeric="emulate"` rounds to the workspace dtype where
TurboMind does. Not emulated (fast-math intrinsics, tile order): see `UNEMULATED` below.
"""

from __future__ import annotations

import math
import mmap
from dataclasses import asdict, dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F

from .. import progress
from ..errors import EngineRefused, ParityInputError

from ..names import TM_LINEAR_OF, tm_linear_prefix
from ..points import LAYER_POINTS, PLORA_LINEARS, PLORA_PARTS, plora_key
from ..records import EngineCall, RuntimeSemantics
from ..trace import Trace, TraceWriter, is_skipped_part
from .layout import hf_qkv_cols_to_tm, tm_qkv_cols_to_hf

WARNING_TEXT = "[ImageFeature] Skip invalid input embeddings"

NUMERIC_MODES = ("fp32", "emulate")
SERVE_FROM = ("hf", "workspace")

# What the CPU replay knowingly does not reproduce bit for bit (recorded in meta.extras).
UNEMULATED = (
    "TurboMind is built with --use_fast_math: sincosf/exp2f/powf/rsqrtf/expf are hardware approximations; "
    "the replay uses accurate fp32 (cos/sin from an fp32 angle evaluated in float64).",
    "flash-attention tiling (online-softmax rescaling per KV tile) and cuBLAS split-K summation order.",
)

# config.yaml weight_type (and its aliases) -> the dtype the deployment computes in
WEIGHT_DTYPES = {
    "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
    "fp16": torch.float16, "float16": torch.float16, "half": torch.float16,
    "fp32": torch.float32, "float32": torch.float32, "float": torch.float32,
}



def _default_resolve(lora, layer: int, tm_linear: str) -> tuple[int, float]:
    from .lora_config import resolve  # written by another module; imported lazily

    return resolve(lora, layer, tm_linear)


# ------------------------------------------------------------------------------------------------ ranges


def validate_ranges(
    input_len: int,
    embeddings: list[torch.Tensor],
    ranges: list[tuple[int, int]],
    hidden: int,
    dtype: torch.dtype,
) -> dict[str, Any]:
    """TurboMind's range check and row selection for one sequence.

    Returns {"valid", "reason", "ranges" (the accepted ones), "rows" (one [end-begin, hidden] tensor per
    accepted range, in `dtype`), "row_count_mismatch" (list of strings), "ignored_after" (index of a
    negative range that ended the list, or None)}.
    """
    out: dict[str, Any] = {"valid": True, "reason": None, "ranges": [], "rows": [], "row_count_mismatch": [],
                           "ignored_after": None}
    if not ranges and not embeddings:
        return out
    if len(embeddings) != len(ranges):
        # lmdeploy's `prepare_embeddings` asserts this before anything reaches C++: the request fails.
        raise ValueError(
            f"EngineCall has {len(embeddings)} input_embeddings but {len(ranges)} input_embedding_ranges; "
            "lmdeploy's prepare_embeddings asserts they are the same length (the request would fail)."
        )
    flat = torch.cat([e.detach().to(dtype).reshape(-1) for e in embeddings]) if embeddings else torch.zeros(0, dtype=dtype)
    total = flat.numel()
    emb_len = 0
    pre_end = -1
    n_valid = 0
    for i, (b, e) in enumerate(ranges):
        b, e = int(b), int(e)
        emb_len += e - b
        if b < 0 or e < 0:
            out["ignored_after"] = i
            break
        reason = None
        if b >= e:
            reason = f"range {i} [{b}, {e}) is empty or reversed (begin >= end)"
        elif e > input_len:
            reason = f"range {i} [{b}, {e}) ends past the input (input_len = {input_len})"
        elif b < pre_end:
            reason = f"range {i} [{b}, {e}) starts before the previous range ends ({pre_end}): unsorted or overlapping"
        elif emb_len * hidden > total:
            reason = (f"ranges 0..{i} need {emb_len} embedding rows ({emb_len * hidden} elements) but the "
                      f"embeddings hold {total} elements ({total / hidden:g} rows of {hidden})")
        if reason is not None:
            out.update(valid=False, reason=reason, ranges=[], rows=[], row_count_mismatch=[])
            return out
        pre_end = e
        n_valid = i + 1
    off = 0
    for i in range(n_valid):
        b, e = int(ranges[i][0]), int(ranges[i][1])
        n = (e - b) * hidden
        out["rows"].append(flat[off: off + n].reshape(e - b, hidden))
        out["ranges"].append((b, e))
        given = embeddings[i].numel() / hidden
        if given != e - b:
            out["row_count_mismatch"].append(
                f"embedding {i} has {given:g} rows for range [{b}, {e}) of {e - b} rows; TurboMind does not check "
                "this and takes rows sequentially from the concatenated embeddings"
            )
        off += n
    return out


# ------------------------------------------------------------------------------------------------ run state


class BufferPool:
    """Scratch buffers reused within one run.

    A fresh multi-megabyte tensor costs more in first-touch page faults than the copy into it (bf16 -> fp32 of
    a 7B `w1`: 0.18 s into a new tensor, 0.02 s into a touched one), so each linear's upcast weights and the
    float64 LoRA temporaries reuse memory the previous linear or layer gave back. Only the engine's own
    scratch goes through the pool, never a value handed to a writer.
    """

    def __init__(self, device: torch.device = torch.device("cpu")):
        self._free: list[torch.Tensor] = []
        self.device = device

    def take(self, shape, dtype: torch.dtype) -> torch.Tensor:
        n = math.prod(shape)
        fits = [b for b in self._free if b.dtype == dtype and b.numel() >= n]
        if fits:
            buf = min(fits, key=lambda b: b.numel())
            self._free = [b for b in self._free if b is not buf]
        else:
            buf = _empty_huge(n, dtype) if self.device.type == "cpu" else torch.empty(n, dtype=dtype, device=self.device)
        return buf[:n].view(*shape)

    def give(self, t: torch.Tensor) -> None:
        self._free.append(t._base if t._base is not None else t)


def _empty_huge(n: int, dtype: torch.dtype) -> torch.Tensor:
    """torch.empty(n), on transparent huge pages where the kernel offers them (Linux, THP "madvise" or
    "always"): first-touch faults then come per 2 MiB instead of per 4 KiB (bf16 -> fp32 of a 7B `w1` into a
    new buffer: 0.30 s -> 0.07 s measured). Small buffers, and systems without madvise, get torch.empty."""
    nbytes = n * torch.empty((), dtype=dtype).element_size()
    if nbytes < (8 << 20) or not hasattr(mmap, "MADV_HUGEPAGE"):
        return torch.empty(n, dtype=dtype)
    try:
        mem = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        mem.madvise(mmap.MADV_HUGEPAGE)
    except (OSError, ValueError, AttributeError):
        return torch.empty(n, dtype=dtype)
    return torch.frombuffer(mem, dtype=dtype)  # the tensor keeps `mem` alive; unmapped with it


@dataclass
class MaskedRows:
    """The LoRA mask (uint8 [rows]) and its runs of 1s: the rows a PLoRA branch is computed on."""

    mask: torch.Tensor
    runs: list[tuple[int, int]]
    gaps: list[tuple[int, int]]  # the runs of 0s
    count: int

    @classmethod
    def of(cls, mask: torch.Tensor) -> "MaskedRows":
        runs: list[tuple[int, int]] = []
        gaps: list[tuple[int, int]] = []
        start, prev = 0, None
        for j, v in enumerate(mask.tolist() + [None]):
            if v != prev and j > 0:
                (runs if prev else gaps).append((start, j))
                start = j
            prev = v
        return cls(mask, runs, gaps, sum(e - b for b, e in runs))

    def gather(self, x: torch.Tensor) -> torch.Tensor:
        """x's masked rows, in order ([count, ...]; a view when they are one run)."""
        if len(self.runs) == 1:
            return x[self.runs[0][0]: self.runs[0][1]]
        return torch.cat([x[b:e] for b, e in self.runs])

    def scatter(self, src: torch.Tensor, dst: torch.Tensor, scale: float | None = None) -> None:
        """dst[masked rows] = src (or scale * src, computed in src's dtype and rounded into dst's): the
        inverse of `gather`."""
        off = 0
        for b, e in self.runs:
            if scale is None:
                dst[b:e].copy_(src[off: off + e - b])
            else:
                torch.mul(src[off: off + e - b], scale, out=dst[b:e])
            off += e - b


@dataclass
class PreparedCall:
    """What one engine call gives every stream of a run: embeddings, masks, rotary tables."""

    L: int
    x: torch.Tensor
    rows: MaskedRows
    rc: dict[str, Any]
    warning: str | None
    image_rows: torch.Tensor
    rope_theta: float
    cos: torch.Tensor
    sin: torch.Tensor


@dataclass
class TraceStream:
    """One pass through the layers: end to end (teacher None) or teacher-forced, with its own writer."""

    writer: TraceWriter
    teacher: Trace | None
    x: torch.Tensor | None = None  # the hidden state the stream's next layer starts from (end to end)
    # teacher-forced on demand: called with (layer or None for the head, the end-to-end run's values there)
    # until it says the stream is needed; until then the stream computes nothing and writes only the PLoRA parts
    # of the end-to-end run (what its checks read), its points left to the end-to-end trace
    start_when: Callable[[int | None, dict[str, torch.Tensor]], bool] | None = None
    started_at: int | str | None = 0  # the layer it started at ("head"; None: never needed)
    # which of the end-to-end run's PLoRA parts it writes while it waits (`parity.points.PLORA_PARTS` names)
    waiting_parts: tuple[str, ...] = PLORA_PARTS

    def __post_init__(self):
        if self.start_when is not None:
            self.started_at = None


class LayerWeights:
    """One layer's weights, read once from the workspace; each linear is upcast on first use (into pooled
    buffers) and handed back to the pool when every stream of the run has used it: a single run holds one
    upcast linear at a time, `run_pair` shares each layer's upcast weights between its two streams."""

    def __init__(self, engine: "ReplayEngine", layer: int, notes: list[str], pool: BufferPool, users: int):
        self.engine, self.pool, self.users = engine, pool, users
        self.raw = {p: engine._load_linear(layer, p, notes) for p in PLORA_LINEARS}
        self.meta = {p: {"rank": r["rank"], "scale": r["scale"], "applied": r["apply"]} for p, r in self.raw.items()}
        self.attention_norm = engine._w(f"layers.{layer}.attention_norm.weight")
        self.ffn_norm = engine._w(f"layers.{layer}.ffn_norm.weight")
        self._ready: dict[str, dict[str, Any]] = {}
        self._owned: dict[str, list[torch.Tensor]] = {}
        self._uses: dict[str, int] = {}

    def _up(self, point: str, t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        if t.dtype == dtype and t.device == self.pool.device:
            return t
        buf = self.pool.take(t.shape, dtype)
        buf.copy_(t)  # exact: a 16-bit float widens without rounding (and lands on the run's device)
        self._owned[point].append(buf)
        return buf

    def get(self, point: str) -> dict[str, Any]:
        lin = self._ready.get(point)
        if lin is None:
            lin = dict(self.raw[point])
            self._owned[point] = []
            lin["W"] = self._up(point, lin["W"], torch.float32)
            if lin["apply"]:
                # fp32 mode computes the LoRA branch in float64 (see ReplayEngine._linear)
                dt = torch.float64 if self.engine.numeric == "fp32" else torch.float32
                lin["A"], lin["B"] = self._up(point, lin["A"], dt), self._up(point, lin["B"], dt)
            self._ready[point] = lin
        return lin

    def release(self) -> None:
        """Every stream is done with the layer (a stream that did not run it included)."""
        for point in list(self._owned):
            self._uses[point] = self.users
            self.done(point)

    def done(self, point: str) -> None:
        self._uses[point] = self._uses.get(point, 0) + 1
        if self._uses[point] >= self.users:
            self._ready.pop(point, None)
            self.raw.pop(point, None)
            for buf in self._owned.pop(point, []):
                self.pool.give(buf)


# ------------------------------------------------------------------------------------------------ engine


class ReplayEngine:
    """TurboMind prefill, replayed from a converted workspace on `device` (CPU by default; module docstring)."""

    side = "replay"

    def __init__(
        self,
        workspace,
        semantics: RuntimeSemantics,
        numeric: str = "fp32",
        serve_from: str = "hf",
        resolve: Callable[[Any, int, str], tuple[int, float]] | None = None,
        device: torch.device | str = "cpu",
        kv_bits: int = 0,
        kv_scale_factor: float = 1.0,
    ):
        """`kv_bits` 8 or 4: TurboMind's quantized KV cache (`--quant-policy`, parity.quant.kv); `kv_scale_factor`
        only for the fault catalogue (a cache read back with a wrong scale)."""
        if numeric not in NUMERIC_MODES:
            raise ValueError(f"numeric must be one of {NUMERIC_MODES}, got {numeric!r}")
        if serve_from not in SERVE_FROM:
            raise ValueError(f"serve_from must be one of {SERVE_FROM}, got {serve_from!r}")
        self.ws = workspace
        # the compute device: weights stay memory-mapped on the host and are copied over one layer at a time
        self.device = torch.device(device)
        self.semantics = semantics
        self.numeric = numeric
        self.serve_from = serve_from
        self._resolve = resolve or _default_resolve
        m = workspace.model
        self.H, self.KV, self.D = int(m.head_num), int(m.kv_head_num), int(m.size_per_head)
        self.hidden = int(m.hidden_units)
        self.num_layers = int(m.num_layer)
        self.eps = float(m.norm_eps)
        self.vocab = int(m.vocab_size)
        wt = str(getattr(m, "weight_type", "") or "").lower()
        self.kv_bits, self.kv_scale_factor = int(kv_bits), float(kv_scale_factor)
        self.quantized = callable(getattr(workspace, "deployed_tensor", None))  # int4: parity.quant.workspace
        if wt and wt not in WEIGHT_DTYPES and not self.quantized:
            raise ParityInputError(
                f"config.yaml model_config.weight_type is {wt!r}; the replay engine handles float16, bfloat16 and "
                "float32 workspaces (a quantized workspace cannot be replayed weight by weight)."
            )
        self.weight_dtype = getattr(workspace, "dtype", None) or WEIGHT_DTYPES.get(wt, torch.float16)
        self.T = self.weight_dtype if numeric == "emulate" else torch.float32
        self.emulating = self.T != torch.float32
        att = dict(getattr(workspace, "attention", {}) or {})
        self.att = att
        self.rot_dim = int(att.get("rotary_embedding", self.D) or self.D)
        self.rope_base = float(att.get("rope_theta", 10000.0))
        self.max_pos = int(att.get("max_position_embeddings", 0) or 0)
        self.scaling_type = str(att.get("rope_scaling_type", "") or "")
        self.scaling_factor = float(att.get("rope_scaling_factor", 0.0) or 0.0)
        self.dynamic_ntk = bool(att.get("use_dynamic_ntk", 0))
        if self.scaling_type in ("llama3", "yarn"):
            raise ParityInputError(
                f"config.yaml attention_config.rope_scaling_type is {self.scaling_type!r}; the replay engine "
                "reproduces '' and 'dynamic' (what XComposer2 uses), not llama3 or yarn scaling.")
        if att.get("use_logn_attn"):
            raise ParityInputError(
                "config.yaml attention_config.use_logn_attn is set; the replay engine reproduces use_logn_attn 0 "
                "(XComposer2 does not use log-n attention).")
        softmax_scale = float(att.get("softmax_scale", 0) or 0)
        self.qk_scale = softmax_scale if softmax_scale else 1.0 / math.sqrt(self.D)
        self.lora = workspace.lora
        self.plora_policy = str(getattr(self.lora, "lora_policy", "") or "") == "plora"
        # LoRA weights reach the C++ linears only when served from the HF folder (the workspace loader never
        # reads lora_a/lora_b) -- or if a release's semantics says its workspace loader does.
        self.lora_loaded = serve_from == "hf" or bool(getattr(semantics, "workspace_loads_lora", False))
        self.lora_active = bool(semantics.runtime_applies_plora) and self.plora_policy and self.lora_loaded

    # ---------------------------------------------------------------- numerics

    def rnd(self, x: torch.Tensor) -> torch.Tensor:
        """Round an fp32 tensor to the emulated dtype (identity in fp32 mode); result kept as fp32."""
        if not self.emulating:
            return x
        return x.to(self.T).float()

    def _w(self, name: str) -> torch.Tensor:
        return self.ws.tensor(name).detach().float().to(self.device)

    def _rmsnorm(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        inv = torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        if not self.emulating:
            return x * inv * w
        return self.rnd(self.rnd(x * inv) * w)

    def _linear(self, x: torch.Tensor, lin: dict[str, Any], rows: MaskedRows, pool: BufferPool) -> dict[str, torch.Tensor]:
        """One linear with its PLoRA branch. The branch is computed on the masked rows only (`rows.runs`) and
        scattered into a zero delta: the values TurboMind adds on masked rows, exact zeros elsewhere."""
        acc = x @ lin["W"]
        y = None
        if lin["apply"]:
            l = torch.empty_like(acc)  # every row written once: zeros on the gaps, the branch on the runs
            for b, e in rows.gaps:
                l[b:e].zero_()
            if rows.count:
                xm = rows.gather(x)
                if self.numeric == "fp32":
                    # fp32 mode judges conversions, not summation order: a low-rank product's rounding can exceed a
                    # tiny delta's own floor, so the LoRA branch (cheap) is computed in float64
                    x64 = pool.take(xm.shape, torch.float64)
                    x64.copy_(xm)
                    t = x64 @ lin["A"]
                    pool.give(x64)
                    u = torch.mm(t, lin["B"], out=pool.take((t.shape[0], acc.shape[1]), torch.float64))
                    rows.scatter(u, l, lin["scale"])  # scale * u in float64, rounded to fp32 as it is stored
                    pool.give(u)
                else:
                    t = self.rnd(xm @ lin["A"])
                    rows.scatter(self.rnd(lin["scale"] * (t @ lin["B"])), l)
            y = self.rnd(acc + l)
            used_mask = rows.mask.clone()
        else:
            l = torch.zeros_like(acc)
            used_mask = torch.zeros(acc.shape[0], dtype=torch.uint8)
        base = self.rnd(acc)
        if lin.get("b") is not None:
            base = self.rnd(base + lin["b"])
            if y is not None:
                y = self.rnd(y + lin["b"])
        if y is None:  # no LoRA: the output is the base (the same tensor; `_fresh` parts them for a writer)
            y = base
        return {"y": y, "base": base, "delta": l, "mask": used_mask}

    def _rope_theta(self, context_len: int) -> float:
        base = self.rope_base
        if self.dynamic_ntk:
            factor = self.scaling_factor
            if factor >= 1.0 and self.max_pos > 0 and context_len > self.max_pos:
                factor = factor * context_len / self.max_pos - (factor - 1)
                base *= factor ** (self.rot_dim / (self.rot_dim - 2.0))
        return base

    def _cos_sin(self, rows: int, base: float) -> tuple[torch.Tensor, torch.Tensor]:
        """[rows, rot_dim/2] cos and sin as TurboMind's FastRoPE computes them (fp32 angle)."""
        idx = torch.arange(0, self.rot_dim, 2, dtype=torch.float32)
        scale_factor = -torch.log2(torch.tensor(base, dtype=torch.float32)) / self.rot_dim
        inv_freq = torch.exp2(idx * scale_factor)
        ti_scale = 1.0 / self.scaling_factor if self.scaling_type == "linear" and self.scaling_factor else 1.0
        inv_freq = torch.tensor(ti_scale, dtype=torch.float32) * inv_freq
        t = torch.arange(rows, dtype=torch.float32)
        ang = (t[:, None] * inv_freq[None, :]).double()
        return torch.cos(ang).float(), torch.sin(ang).float()

    def _rope(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """x: [rows, heads, D] in adjacent-pair layout; rotates the first rot_dim dims of each head."""
        r = self.rot_dim
        xr = x[..., :r].reshape(*x.shape[:-1], r // 2, 2)
        x0, x1 = xr[..., 0], xr[..., 1]
        c, s = cos[:, None, :], sin[:, None, :]
        if self.emulating:
            c, s = self.rnd(c), self.rnd(s)
            y0 = self.rnd(self.rnd(c * x0) - self.rnd(s * x1))
            y1 = self.rnd(self.rnd(c * x1) + self.rnd(s * x0))
        else:
            y0 = c * x0 - s * x1
            y1 = c * x1 + s * x0
        rot = torch.stack([y0, y1], dim=-1).reshape(*x.shape[:-1], r)
        return torch.cat([rot, x[..., r:]], dim=-1) if r < x.shape[-1] else rot

    def _attention(self, qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, pool: BufferPool) -> torch.Tensor:
        """qkv: [rows, (H+2KV)*D] TurboMind layout (bias already added). Returns [rows, H*D].

        Each kv head serves its H/KV query heads without copies. fp32 mode: torch's fused causal attention
        (fp32 scores, softmax and P@V; no L x L mask or score matrix). emulate mode: the explicit graph, since
        TurboMind rounds the unnormalised P to T before P@V.
        """
        H, KV, D = self.H, self.KV, self.D
        L = qkv.shape[0]
        q, k, v = torch.split(qkv, [H * D, KV * D, KV * D], dim=-1)
        q = self._rope(q.reshape(L, H, D), cos, sin)
        k = self._rope(k.reshape(L, KV, D), cos, sin)
        v = v.reshape(L, KV, D)
        if self.kv_bits:  # the prefill attention reads K (rotated) and V back from the quantized cache
            from ..quant.kv import kv_roundtrip

            k = kv_roundtrip(k.cpu(), self.kv_bits, self.weight_dtype, self.kv_scale_factor).to(k.device, k.dtype)
            v = kv_roundtrip(v.cpu(), self.kv_bits, self.weight_dtype, self.kv_scale_factor).to(v.device, v.dtype)
        if not self.emulating:
            o = F.scaled_dot_product_attention(q.transpose(0, 1)[None], k.transpose(0, 1)[None],
                                               v.transpose(0, 1)[None], is_causal=True, scale=self.qk_scale,
                                               enable_gqa=True)
            return o[0].transpose(0, 1).reshape(L, H * D)
        gs = H // KV
        qg = q.reshape(L, KV, gs, D).permute(1, 2, 0, 3).reshape(KV, gs * L, D)  # head h = kv * gs + g
        s = torch.bmm(qg, k.permute(1, 2, 0), out=pool.take((KV, gs * L, L), torch.float32))
        s.mul_(self.qk_scale)
        p = s.view(KV, gs, L, L)
        p.masked_fill_(torch.ones(L, L, dtype=torch.bool, device=p.device).triu_(1), float("-inf"))
        m = p.amax(-1, keepdim=True)
        p.sub_(m).exp_()
        denom = p.sum(-1, keepdim=True)
        p.copy_(p.to(self.T))  # unnormalised P rounded to T for P@V; the row sum above is of the fp32 P
        o = torch.bmm(s, v.transpose(0, 1)).view(KV, gs, L, D)
        pool.give(s)
        o = self.rnd(o / denom)
        return o.permute(2, 0, 1, 3).reshape(L, H * D)

    def _qkv_index(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Column permutations of the fused qkv: TurboMind [q|k|v] (pair order) -> HF grouped, and back."""
        if getattr(self, "_qkv_idx", None) is None:
            H, KV, D = self.H, self.KV, self.D
            cols = torch.arange((H + 2 * KV) * D)
            self._qkv_idx = (tm_qkv_cols_to_hf(cols, H, KV, D).to(self.device),
                             hf_qkv_cols_to_tm(cols, H, KV, D).to(self.device))
        return self._qkv_idx

    # ---------------------------------------------------------------- weights

    def _lora_for(self, layer: int, point: str) -> tuple[int, float, bool]:
        tm = TM_LINEAR_OF[point]
        rank, scale = self._resolve(self.lora, layer, tm)
        rank = int(rank) if self.plora_policy else 0
        return rank, float(scale), self.lora_active and rank > 0

    def _load_linear(self, layer: int, point: str, notes: list[str]) -> dict[str, Any]:
        """A linear's tensors in the workspace dtype (W [in, out], A, B when applied; bias in fp32), checked as
        TurboMind checks them at load time. `LayerWeights.get` upcasts them."""
        prefix = tm_linear_prefix(layer, point)
        # int4 (W4A16): the exact dequantization in fp32 mode, TurboMind's fp16 dequantization when emulating
        read = self.ws.deployed_tensor if (self.quantized and self.emulating) else self.ws.tensor
        try:
            lin: dict[str, Any] = {"W": read(f"{prefix}.weight").detach(), "b": None}
        except ParityInputError as e:
            if not self.quantized:
                raise
            # TurboMind checks every int4 file's size against config.yaml at load and refuses the workspace
            raise EngineRefused(str(e)) from None
        if point == "attention.wqkv" and int(getattr(self.ws.model, "attn_bias", 0) or 0):
            if self.ws.has(f"{prefix}.bias"):
                lin["b"] = self._w(f"{prefix}.bias")
        elif point != "attention.wqkv" and self.ws.has(f"{prefix}.bias"):
            lin["b"] = self._w(f"{prefix}.bias")
        rank, scale, apply = self._lora_for(layer, point)
        lin.update(rank=rank, scale=scale, apply=apply)
        has_a, has_b = self.ws.has(f"{prefix}.lora_a.weight"), self.ws.has(f"{prefix}.lora_b.weight")
        # TurboMind checks the byte size of each LoRA tensor it is given against the configured rank when it
        # loads them (served from the HF folder); a mismatch fails loudly.
        if self.plora_policy and rank > 0 and self.lora_loaded and self.semantics.runtime_applies_plora:
            tm = TM_LINEAR_OF[point]
            if not (has_a and has_b):
                raise EngineRefused(
                    f"LoRA config gives layers.{layer}.{tm} rank {rank}, but the workspace has no "
                    f"{prefix}.lora_a/lora_b tensors: TurboMind would run with uninitialised LoRA buffers."
                )
            in_dim, out_dim = lin["W"].shape
            on_disk = getattr(self.ws, "lora_rank_on_disk", None)  # a real Workspace sizes files by config
            disk_rank = on_disk(layer, tm) if callable(on_disk) else None
            if disk_rank is not None and disk_rank != rank:
                raise EngineRefused(
                    f"LoRA rank mismatch at layers.{layer}.{tm}: the LoRA config resolves rank {rank} "
                    f"(lora_r={getattr(self.lora, 'lora_r', None)}, "
                    f"lora_rank_pattern={getattr(self.lora, 'lora_rank_pattern', '')!r}) but the workspace's "
                    f"{prefix}.lora_a file holds rank {disk_rank}; TurboMind fails at load on this byte-size "
                    "mismatch."
                )
            A = self.ws.tensor(f"{prefix}.lora_a.weight").detach()
            B = self.ws.tensor(f"{prefix}.lora_b.weight").detach()
            if A.shape != (in_dim, rank) or B.shape != (rank, out_dim):
                raise EngineRefused(
                    f"LoRA rank mismatch at layers.{layer}.{tm}: the LoRA config resolves rank {rank} "
                    f"(lora_r={getattr(self.lora, 'lora_r', None)}, "
                    f"lora_rank_pattern={getattr(self.lora, 'lora_rank_pattern', '')!r}) but the tensors are "
                    f"lora_a {tuple(A.shape)} and lora_b {tuple(B.shape)} (expected ({in_dim}, {rank}) and "
                    f"({rank}, {out_dim})); TurboMind fails at load on this byte-size mismatch."
                )
            if apply:
                lin["A"], lin["B"] = A, B
        elif (has_a or has_b) and self.plora_policy and rank == 0 and layer == 0:
            notes.append(f"{TM_LINEAR_OF[point]}: LoRA tensors present but the config resolves rank 0 (unused)")
        return lin

    # ---------------------------------------------------------------- run

    @torch.no_grad()
    def run(self, call: EngineCall, writer: TraceWriter, teacher: Trace | None = None) -> dict[str, Any]:
        """One prefill of `call`: end to end, or teacher-forced (every module fed `teacher`'s own input).
        Streams the trace to `writer`; returns the run's info (ranges, masks, rope, ...; "trace": the Trace)."""
        return self._run(call, [TraceStream(writer, teacher)])[0]

    @torch.no_grad()
    def run_pair(self, call: EngineCall, writer_e2e: TraceWriter, writer_local: TraceWriter,
                 teacher: Trace, start_local=None,
                 waiting_parts: tuple[str, ...] = PLORA_PARTS) -> tuple[dict[str, Any], dict[str, Any]]:
        """`run(call, writer_e2e)` and `run(call, writer_local, teacher=teacher)` in one layer-major pass: each
        layer's weights are read and upcast once and both states advance through the layer. The traces are
        bit-identical to the two separate runs'. Returns (info_e2e, info_local).

        `start_local(layer, values)`: teacher forcing on demand (`parity.compare.gate`): the teacher-forced run
        starts at the first layer (or the head, layer None) where it returns True for the end-to-end values;
        until then its writer gets the end-to-end run's PLoRA parts named in `waiting_parts`."""
        if teacher is None:
            raise ValueError("run_pair needs the teacher trace for its teacher-forced run.")
        e2e, local = self._run(call, [TraceStream(writer_e2e, None),
                                      TraceStream(writer_local, teacher, start_when=start_local,
                                                  waiting_parts=tuple(waiting_parts))])
        return e2e, local

    def _prepare(self, call: EngineCall) -> PreparedCall:
        ids = [int(t) for t in call.input_ids]
        L = len(ids)
        if L == 0:
            raise ValueError("EngineCall has no input_ids.")
        table = self.ws.tensor("tok_embeddings.weight")
        if max(ids) >= table.shape[0] or min(ids) < 0:
            raise ValueError(f"input_ids contain ids outside the embedding table (0..{table.shape[0] - 1}).")
        x = table[torch.tensor(ids)].float().to(self.device)
        del table
        x = self.rnd(x)

        rc = validate_ranges(L, list(call.input_embeddings), [tuple(r) for r in call.input_embedding_ranges],
                             self.hidden, self.T)
        mask = torch.zeros(L, dtype=torch.uint8)
        warning = None
        if rc["valid"]:
            for (b, e), rows in zip(rc["ranges"], rc["rows"]):
                x[b:e] = rows.float().to(self.device)
                if self.plora_policy:
                    mask[b:e] = 1
        else:
            warning = f"{WARNING_TEXT}: {rc['reason']}"
        image_rows = torch.zeros(L, dtype=torch.uint8)
        for b, e in rc["ranges"]:
            image_rows[b:e] = 1
        rope_theta = self._rope_theta(L)
        cos, sin = (t.to(self.device) for t in self._cos_sin(L, rope_theta))
        return PreparedCall(L, x, MaskedRows.of(mask), rc, warning, image_rows, rope_theta, cos, sin)

    def _tget(self, teacher: Trace, layer: int | None, point: str, L: int) -> torch.Tensor:
        v = teacher.get(layer, point)
        if v is None:
            raise ValueError(f"Teacher trace {teacher.root} lacks point {point!r} (layer {layer}).")
        v = v.float().to(self.device)
        if v.dim() != 2 or v.shape[0] != L:
            raise ValueError(f"Teacher point {point!r} (layer {layer}) has shape {tuple(v.shape)}; the engine "
                             f"call has {L} rows. Teacher and engine must run the same input.")
        return self.rnd(v)

    def _run(self, call: EngineCall, streams: list[TraceStream]) -> list[dict[str, Any]]:
        prep = self._prepare(call)
        for s in streams:
            s.writer.pre("embeddings", prep.x)  # never modified afterwards
            s.x = prep.x
        notes: list[str] = []
        plora_meta: dict[str, dict[str, dict[str, Any]]] = {}
        pool = BufferPool(self.device)
        for i in range(self.num_layers):
            lw = LayerWeights(self, i, notes, pool, users=len(streams))
            plora_meta[str(i)] = lw.meta
            e2e_vals = None  # the end-to-end values of this layer, for a stream that starts on demand
            for s in streams:
                if s.start_when is not None:  # not started yet (the end-to-end stream comes first)
                    if not s.start_when(i, e2e_vals):
                        parts = {k: v for k, v in e2e_vals.items() if is_skipped_part(k, s.waiting_parts)}
                        s.writer.layer(i, _fresh(parts, s.writer))
                        continue
                    s.start_when = None
                    s.started_at = i
                vals = self._layer(i, lw, prep, pool, s)
                missing = [p for p in LAYER_POINTS if p not in vals]
                assert not missing, missing
                s.x = vals["layer"]
                s.writer.layer(i, _fresh(vals, s.writer))
                if s.teacher is None:
                    e2e_vals = vals
                del vals
            lw.release()
            del lw, e2e_vals
            progress.layer_done(i + 1, self.num_layers)
        heads = self._head([s for s in streams if s.start_when is None], prep, pool)
        waiting = [s for s in streams if s.start_when is not None]
        if waiting and heads and waiting[0].start_when(None, heads[0]):
            waiting[0].start_when = None
            waiting[0].started_at = "head"
            self._head(waiting, prep, pool)
        del pool
        return [self._finish(call, s, prep, notes, plora_meta) for s in streams]

    def _layer(self, i: int, lw: LayerWeights, prep: PreparedCall, pool: BufferPool, s: TraceStream,
               attend: Callable[[torch.Tensor], torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """Decoder layer `i` for one stream: its points, in execution order. Teacher-forced, every module's
        input is the teacher's value of the point before it (the module's own output is still recorded).
        `attend` replaces the prefill attention (the decoder's attention reads and writes a KV cache)."""
        teacher, L = s.teacher, prep.L
        forced = teacher is not None
        vals: dict[str, torch.Tensor] = {}

        def tget(layer: int | None, point: str) -> torch.Tensor:
            return self._tget(teacher, layer, point, L)

        def linear(point: str, inp: torch.Tensor) -> torch.Tensor:
            r = self._linear(inp, lw.get(point), prep.rows, pool)
            lw.done(point)
            y, base, delta = r["y"], r["base"], r["delta"]
            if point == "attention.wqkv":  # recorded in the HF grouped layout; y stays TurboMind's for attention
                to_hf = self._qkv_index()[0]
                vals[point] = y.index_select(-1, to_hf)
                base, delta = base.index_select(-1, to_hf), delta.index_select(-1, to_hf)
            else:
                vals[point] = y
            vals[plora_key(point, "input")] = inp
            vals[plora_key(point, "base")] = base
            vals[plora_key(point, "delta")] = delta
            vals[plora_key(point, "mask")] = r["mask"]
            return y

        layer_in = ((tget(None, "embeddings") if i == 0 else tget(i - 1, "layer")) if forced else s.x)

        # attention block
        a_in = self._rmsnorm(layer_in, lw.attention_norm)
        vals["attention_norm"] = a_in
        qkv = linear("attention.wqkv", tget(i, "attention_norm") if forced else a_in)
        if forced:
            qkv = tget(i, "attention.wqkv").index_select(-1, self._qkv_index()[1])
        attn = attend(qkv) if attend is not None else self._attention(qkv, prep.cos, prep.sin, pool)
        vals["attention"] = attn
        wo = linear("attention.wo", tget(i, "attention") if forced else attn)
        h = self.rnd(layer_in + (tget(i, "attention.wo") if forced else wo))

        # FFN block
        f_in = self._rmsnorm(h, lw.ffn_norm)
        vals["ffn_norm"] = f_in
        g_in = tget(i, "ffn_norm") if forced else f_in
        w1 = linear("feed_forward.w1", g_in)
        w3 = linear("feed_forward.w3", g_in)
        if forced:
            w1, w3 = tget(i, "feed_forward.w1"), tget(i, "feed_forward.w3")
        act = self.rnd(self.rnd(F.silu(w1)).mul_(w3))  # silu's output is fresh: multiplied in place
        w2 = linear("feed_forward.w2", act)
        vals["layer"] = self.rnd(h + (tget(i, "feed_forward.w2") if forced else w2))
        return vals

    def _head(self, streams: list[TraceStream], prep: PreparedCall, pool: BufferPool) -> list[dict[str, torch.Tensor]]:
        """Final RMSNorm and logits for every stream (the LM head upcast once, chunk by chunk); returns each
        stream's {"norm", "output"}."""
        if not streams:
            return []
        last = self.num_layers - 1
        norm_w = self._w("norm.weight")
        heads, norms = [], []
        for s in streams:
            norm_in = self._tget(s.teacher, last, "layer", prep.L) if s.teacher is not None else s.x
            norm = self._rmsnorm(norm_in, norm_w)
            s.writer.post("norm", norm)
            norms.append(norm)
            heads.append(self._tget(s.teacher, None, "norm", prep.L) if s.teacher is not None else norm)
        out_w = self.ws.tensor("output.weight")
        if out_w.shape[-1] != self.hidden:
            raise ValueError(f"output.weight has shape {tuple(out_w.shape)}; expected [vocab, {self.hidden}] "
                             "(the converter writes the LM head as HF stores it, not transposed).")
        # fp32 output from T inputs, as postDecodeEmbedding; in vocab chunks so a 7B head is never upcast whole
        chunk = 8192
        parts: list[list[torch.Tensor]] = [[] for _ in streams]
        for j in range(0, self.vocab, chunk):
            w = out_w[j: min(j + chunk, self.vocab)]
            w32 = w if w.dtype == torch.float32 and w.device == self.device else \
                pool.take(w.shape, torch.float32).copy_(w)
            for h, p in zip(heads, parts):
                p.append(h @ w32.T)
            if w32 is not w:
                pool.give(w32)
        del out_w
        out = []
        for s, p, n in zip(streams, parts, norms):
            logits = p[0] if len(p) == 1 else torch.cat(p, dim=-1)
            s.writer.post("output", logits)
            out.append({"norm": n, "output": logits})
        return out

    def _finish(self, call: EngineCall, s: TraceStream, prep: PreparedCall, notes: list[str],
                plora_meta: dict[str, dict[str, dict[str, Any]]]) -> dict[str, Any]:
        rc, teacher, writer = prep.rc, s.teacher, s.writer
        mask = prep.rows.mask
        info: dict[str, Any] = {
            "ranges_valid": rc["valid"],
            "warning": prep.warning,
            "reason": rc["reason"],
            "mask": [int(v) for v in mask],
            "image_rows": [int(v) for v in prep.image_rows],
            "accepted_ranges": [list(r) for r in rc["ranges"]],
            "row_count_mismatch": rc["row_count_mismatch"],
            "ranges_ignored_after": rc["ignored_after"],
            "lora_applied": self.lora_active and bool(mask.any()),
            "lora_loaded": self.lora_loaded,
            "rope_theta": prep.rope_theta,
            "rows": prep.L,
            "mode": "local" if teacher is not None else "e2e",
        }
        if teacher is not None:  # where the teacher-forced run started (0: every layer; None: not needed)
            info["teacher_forced_from"] = s.started_at
        meta = writer.meta
        meta.side = self.side
        meta.num_layers = self.num_layers
        meta.dtype = "float32" if not self.emulating else str(self.T).replace("torch.", "")
        meta.layouts = {}  # attention.wqkv (+ base/delta) converted back to the HF grouped layout
        meta.plora = {k: {p: dict(v) for p, v in d.items()} for k, d in plora_meta.items()}
        extras = dict(meta.extras or {})
        extras.update({
            "engine": "replay",
            "numeric": self.numeric,
            "weight_dtype": str(self.weight_dtype).replace("torch.", ""),
            "serve_from": self.serve_from,
            "semantics": self.semantics.version,
            "semantics_detail": asdict(self.semantics),
            "ranges_valid": rc["valid"],
            "range_warning": prep.warning,
            "range_reason": rc["reason"],
            "row_count_mismatch": rc["row_count_mismatch"],
            "image_mask": info["image_rows"],
            "lora_mask": info["mask"],
            "lora_policy": getattr(self.lora, "lora_policy", ""),
            "lora_applied": info["lora_applied"],
            "lora_buffers": ("loaded" if self.lora_loaded else
                             "uninitialised: the C++ workspace loader never reads lora_a/lora_b "
                             "(replayed as LoRA absent)"),
            "rope_theta": prep.rope_theta,
            "mode": info["mode"],
            "teacher": str(teacher.root) if teacher is not None else None,
            "teacher_forced_from": info.get("teacher_forced_from"),
            "content_hash": call.content_hash,
            "notes": list(notes),
            "unemulated": list(UNEMULATED) if self.emulating else [],
        })
        meta.extras = extras
        info["trace"] = writer.close()
        return info


def _fresh(vals: dict[str, torch.Tensor], writer: TraceWriter) -> dict[str, torch.Tensor]:
    """The layer's values for `writer.layer()`: no two share memory (a writer keeps what it is given, and may
    hand it to safetensors' `save_file`, which refuses shared memory). A value that is an earlier one (a
    linear's input is the norm's output, w1 and w3 share theirs, a linear without LoRA returns its base) is
    cloned, unless the writer drops that part."""
    skip = getattr(writer, "skip_parts", None) or frozenset()
    seen: set[int] = set()
    out: dict[str, torch.Tensor] = {}
    for k, v in vals.items():
        ptr = v.untyped_storage().data_ptr()
        if ptr and ptr in seen and not is_skipped_part(k, skip):
            v = v.clone()
            ptr = v.untyped_storage().data_ptr()
        seen.add(ptr)
        out[k] = v
    return out
