"""REPLAY engine: TurboMind's (lmdeploy 0.7.1) prefill math, executed on CPU from a converted workspace.

No GPU is needed. Every number comes from the workspace tensors (never from the HF checkpoint), so a
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
* attention (`unified_attention_layer.cc`, `attention_universal.h`, `kv_cache_utils_v2.cu`): qkv bias added
  in T, rotary in T with fp32 `cos/sin` rounded to T (`FastRoPE::apply`), adjacent-pair layout,
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
from dataclasses import asdict
from typing import Any, Callable

import torch
import torch.nn.functional as F

from ..errors import EngineRefused, ParityInputError

from ..points import LAYER_POINTS, PLORA_LINEARS, TM_LINEAR_NAMES, plora_key
from ..records import EngineCall, RuntimeSemantics
from ..trace import Trace, TraceWriter
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

_WEIGHT_DTYPES = {
    "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
    "fp16": torch.float16, "float16": torch.float16, "half": torch.float16,
    "fp32": torch.float32, "float32": torch.float32, "float": torch.float32,
}

_LINEAR_TENSORS = {
    "attention.wqkv": "attention.w_qkv",
    "attention.wo": "attention.wo",
    "feed_forward.w1": "feed_forward.w1",
    "feed_forward.w3": "feed_forward.w3",
    "feed_forward.w2": "feed_forward.w2",
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


# ------------------------------------------------------------------------------------------------ engine


class ReplayEngine:
    """TurboMind prefill, replayed on CPU from a converted workspace (see module docstring)."""

    side = "replay"

    def __init__(
        self,
        workspace,
        semantics: RuntimeSemantics,
        numeric: str = "fp32",
        serve_from: str = "hf",
        resolve: Callable[[Any, int, str], tuple[int, float]] | None = None,
    ):
        if numeric not in NUMERIC_MODES:
            raise ValueError(f"numeric must be one of {NUMERIC_MODES}, got {numeric!r}")
        if serve_from not in SERVE_FROM:
            raise ValueError(f"serve_from must be one of {SERVE_FROM}, got {serve_from!r}")
        self.ws = workspace
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
        if wt and wt not in _WEIGHT_DTYPES:
            raise ParityInputError(
                f"config.yaml model_config.weight_type is {wt!r}; the replay engine handles float16, bfloat16 and "
                "float32 workspaces (a quantized workspace cannot be replayed weight by weight)."
            )
        self.weight_dtype = getattr(workspace, "dtype", None) or _WEIGHT_DTYPES.get(wt, torch.float16)
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
        return self.ws.tensor(name).detach().float()

    def _rmsnorm(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        inv = torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        if not self.emulating:
            return x * inv * w
        return self.rnd(self.rnd(x * inv) * w)

    def _linear(self, x: torch.Tensor, lin: dict[str, Any], mask: torch.Tensor) -> dict[str, torch.Tensor]:
        acc = x @ lin["W"]
        rows = x.shape[0]
        if lin["apply"] and self.numeric == "fp32":
            # fp32 mode judges conversions, not summation order: a low-rank product's rounding can exceed a
            # tiny delta's own floor, so the LoRA branch (cheap) is computed in float64
            t = x.double() @ lin["A"].double()
            l = (lin["scale"] * (t @ lin["B"].double())).float()
        elif lin["apply"]:
            t = self.rnd(x @ lin["A"])
            l = self.rnd(lin["scale"] * (t @ lin["B"]))
        if lin["apply"]:
            l = torch.where(mask.bool()[:, None], l, torch.zeros((), dtype=l.dtype))
            y = self.rnd(acc + l)
            used_mask = mask.to(torch.uint8)
        else:
            l = torch.zeros(rows, acc.shape[1])
            y = self.rnd(acc)
            used_mask = torch.zeros(rows, dtype=torch.uint8)
        base = self.rnd(acc)
        if lin.get("b") is not None:
            y = self.rnd(y + lin["b"])
            base = self.rnd(base + lin["b"])
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

    def _attention(self, qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """qkv: [rows, (H+2KV)*D] TurboMind layout (bias already added). Returns [rows, H*D]."""
        H, KV, D = self.H, self.KV, self.D
        L = qkv.shape[0]
        q, k, v = torch.split(qkv, [H * D, KV * D, KV * D], dim=-1)
        q = self._rope(q.reshape(L, H, D), cos, sin)
        k = self._rope(k.reshape(L, KV, D), cos, sin)
        v = v.reshape(L, KV, D)
        gs = H // KV
        k = k.repeat_interleave(gs, dim=1)
        v = v.repeat_interleave(gs, dim=1)
        q, k, v = (t.transpose(0, 1) for t in (q, k, v))  # [H, L, D]
        s = (q @ k.transpose(1, 2)) * self.qk_scale
        causal = torch.ones(L, L, dtype=torch.bool).tril()
        s = s.masked_fill(~causal, float("-inf"))
        m = s.amax(-1, keepdim=True)
        p = torch.exp(s - m)
        denom = p.sum(-1, keepdim=True)
        if self.emulating:
            o = self.rnd((self.rnd(p) @ v) / denom)
        else:
            o = (p @ v) / denom
        return o.transpose(0, 1).reshape(L, H * D)

    # ---------------------------------------------------------------- weights

    def _lora_for(self, layer: int, point: str) -> tuple[int, float, bool]:
        tm = TM_LINEAR_NAMES[point]
        rank, scale = self._resolve(self.lora, layer, tm)
        rank = int(rank) if self.plora_policy else 0
        return rank, float(scale), self.lora_active and rank > 0

    def _load_linear(self, layer: int, point: str, notes: list[str]) -> dict[str, Any]:
        prefix = f"layers.{layer}.{_LINEAR_TENSORS[point]}"
        lin: dict[str, Any] = {"W": self._w(f"{prefix}.weight"), "b": None}
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
            tm = TM_LINEAR_NAMES[point]
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
            A, B = self._w(f"{prefix}.lora_a.weight"), self._w(f"{prefix}.lora_b.weight")
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
            notes.append(f"{TM_LINEAR_NAMES[point]}: LoRA tensors present but the config resolves rank 0 (unused)")
        return lin

    # ---------------------------------------------------------------- run

    @torch.no_grad()
    def run(self, call: EngineCall, writer: TraceWriter, teacher: Trace | None = None) -> dict[str, Any]:
        H, KV, D = self.H, self.KV, self.D
        ids = [int(t) for t in call.input_ids]
        L = len(ids)
        if L == 0:
            raise ValueError("EngineCall has no input_ids.")
        table = self.ws.tensor("tok_embeddings.weight")
        if max(ids) >= table.shape[0] or min(ids) < 0:
            raise ValueError(f"input_ids contain ids outside the embedding table (0..{table.shape[0] - 1}).")
        x = table[torch.tensor(ids)].float()
        del table
        x = self.rnd(x)

        rc = validate_ranges(L, list(call.input_embeddings), [tuple(r) for r in call.input_embedding_ranges],
                             self.hidden, self.T)
        mask = torch.zeros(L, dtype=torch.uint8)
        warning = None
        if rc["valid"]:
            for (b, e), rows in zip(rc["ranges"], rc["rows"]):
                x[b:e] = rows.float()
                if self.plora_policy:
                    mask[b:e] = 1
        else:
            warning = f"{WARNING_TEXT}: {rc['reason']}"
        image_rows = torch.zeros(L, dtype=torch.uint8)
        for b, e in rc["ranges"]:
            image_rows[b:e] = 1
        writer.pre("embeddings", x.clone())

        rope_theta = self._rope_theta(L)
        cos, sin = self._cos_sin(L, rope_theta)
        notes: list[str] = []
        plora_meta: dict[str, dict[str, dict[str, Any]]] = {}

        def tget(layer: int | None, point: str) -> torch.Tensor:
            v = teacher.get(layer, point)
            if v is None:
                raise ValueError(f"Teacher trace {teacher.root} lacks point {point!r} (layer {layer}).")
            v = v.float()
            if v.dim() != 2 or v.shape[0] != L:
                raise ValueError(f"Teacher point {point!r} (layer {layer}) has shape {tuple(v.shape)}; the engine "
                                 f"call has {L} rows. Teacher and engine must run the same input.")
            return self.rnd(v)

        for i in range(self.num_layers):
            vals: dict[str, torch.Tensor] = {}
            lins = {p: self._load_linear(i, p, notes) for p in PLORA_LINEARS}
            plora_meta[str(i)] = {p: {"rank": lins[p]["rank"], "scale": lins[p]["scale"], "applied": lins[p]["apply"]}
                                  for p in PLORA_LINEARS}
            attn_norm_w = self._w(f"layers.{i}.attention_norm.weight")
            ffn_norm_w = self._w(f"layers.{i}.ffn_norm.weight")

            def put_linear(point: str, inp: torch.Tensor, r: dict[str, torch.Tensor], hf_cols: bool = False):
                y, base, delta = r["y"], r["base"], r["delta"]
                if hf_cols:
                    y, base, delta = (tm_qkv_cols_to_hf(t, H, KV, D) for t in (y, base, delta))
                vals[point] = y
                vals[plora_key(point, "input")] = inp
                vals[plora_key(point, "base")] = base
                vals[plora_key(point, "delta")] = delta
                vals[plora_key(point, "mask")] = r["mask"]

            if teacher is not None:
                layer_in = tget(None, "embeddings") if i == 0 else tget(i - 1, "layer")
            else:
                layer_in = x

            # attention block
            a_in = self._rmsnorm(layer_in, attn_norm_w)
            vals["attention_norm"] = a_in
            q_in = tget(i, "attention_norm") if teacher is not None else a_in
            r_qkv = self._linear(q_in, lins["attention.wqkv"], mask)
            put_linear("attention.wqkv", q_in, r_qkv, hf_cols=True)
            qkv_tm = hf_qkv_cols_to_tm(tget(i, "attention.wqkv"), H, KV, D) if teacher is not None else r_qkv["y"]
            attn = self._attention(qkv_tm, cos, sin)
            vals["attention"] = attn
            wo_in = tget(i, "attention") if teacher is not None else attn
            r_wo = self._linear(wo_in, lins["attention.wo"], mask)
            put_linear("attention.wo", wo_in, r_wo)
            if teacher is not None:
                h = self.rnd(layer_in + tget(i, "attention.wo"))
            else:
                h = self.rnd(layer_in + r_wo["y"])

            # FFN block
            f_in = self._rmsnorm(h, ffn_norm_w)
            vals["ffn_norm"] = f_in
            g_in = tget(i, "ffn_norm") if teacher is not None else f_in
            r_w1 = self._linear(g_in, lins["feed_forward.w1"], mask)
            put_linear("feed_forward.w1", g_in, r_w1)
            r_w3 = self._linear(g_in, lins["feed_forward.w3"], mask)
            put_linear("feed_forward.w3", g_in, r_w3)
            if teacher is not None:
                w1v, w3v = tget(i, "feed_forward.w1"), tget(i, "feed_forward.w3")
            else:
                w1v, w3v = r_w1["y"], r_w3["y"]
            act = self.rnd(self.rnd(F.silu(w1v)) * w3v)
            r_w2 = self._linear(act, lins["feed_forward.w2"], mask)
            put_linear("feed_forward.w2", act, r_w2)
            ffn_out = tget(i, "feed_forward.w2") if teacher is not None else r_w2["y"]
            out = self.rnd(h + ffn_out)
            vals["layer"] = out

            missing = [p for p in LAYER_POINTS if p not in vals]
            assert not missing, missing
            writer.layer(i, {k: (v if v.dtype == torch.uint8 else v.float()) for k, v in vals.items()})
            x = out
            del vals, lins, r_qkv, r_wo, r_w1, r_w3, r_w2, attn, act, a_in, f_in, h, qkv_tm

        norm_in = tget(self.num_layers - 1, "layer") if teacher is not None else x
        norm = self._rmsnorm(norm_in, self._w("norm.weight"))
        writer.post("norm", norm)
        head_in = tget(None, "norm") if teacher is not None else norm
        out_w = self.ws.tensor("output.weight")
        if out_w.shape[-1] != self.hidden:
            raise ValueError(f"output.weight has shape {tuple(out_w.shape)}; expected [vocab, {self.hidden}] "
                             "(the converter writes the LM head as HF stores it, not transposed).")
        # fp32 output from T inputs, as postDecodeEmbedding; in vocab chunks so a 7B head is never upcast whole
        chunk = 8192
        logits = torch.cat([head_in @ out_w[j: min(j + chunk, self.vocab)].float().T
                            for j in range(0, self.vocab, chunk)], dim=-1)
        del out_w
        writer.post("output", logits)

        info: dict[str, Any] = {
            "ranges_valid": rc["valid"],
            "warning": warning,
            "reason": rc["reason"],
            "mask": [int(v) for v in mask],
            "image_rows": [int(v) for v in image_rows],
            "accepted_ranges": [list(r) for r in rc["ranges"]],
            "row_count_mismatch": rc["row_count_mismatch"],
            "ranges_ignored_after": rc["ignored_after"],
            "lora_applied": self.lora_active and bool(mask.any()),
            "lora_loaded": self.lora_loaded,
            "rope_theta": rope_theta,
            "rows": L,
            "mode": "local" if teacher is not None else "e2e",
        }
        meta = writer.meta
        meta.side = self.side
        meta.num_layers = self.num_layers
        meta.dtype = "float32" if not self.emulating else str(self.T).replace("torch.", "")
        meta.layouts = {}  # attention.wqkv (+ base/delta) converted back to the HF grouped layout
        meta.plora = plora_meta
        extras = dict(meta.extras or {})
        extras.update({
            "engine": "replay",
            "numeric": self.numeric,
            "weight_dtype": str(self.weight_dtype).replace("torch.", ""),
            "serve_from": self.serve_from,
            "semantics": self.semantics.version,
            "semantics_detail": asdict(self.semantics),
            "ranges_valid": rc["valid"],
            "range_warning": warning,
            "range_reason": rc["reason"],
            "row_count_mismatch": rc["row_count_mismatch"],
            "image_mask": info["image_rows"],
            "lora_mask": info["mask"],
            "lora_policy": getattr(self.lora, "lora_policy", ""),
            "lora_applied": info["lora_applied"],
            "lora_buffers": ("loaded" if self.lora_loaded else
                             "uninitialised: the C++ workspace loader never reads lora_a/lora_b "
                             "(replayed as LoRA absent)"),
            "rope_theta": rope_theta,
            "mode": info["mode"],
            "teacher": str(teacher.root) if teacher is not None else None,
            "content_hash": call.content_hash,
            "notes": notes,
            "unemulated": list(UNEMULATED) if self.emulating else [],
        })
        meta.extras = extras
        info["trace"] = writer.close()
        return info
