"""Exact transforms between HF XComposer2 tensors and TurboMind's layout.

HF's `wqkv` output columns are grouped per kv head: (kv, gs + 2, D) with gs = heads // kv_heads query
slots, then one k and one v slot. TurboMind's fused qkv is [q | k | v] with q and k in the adjacent-pair
rotary order (`permute_v2`). These functions act on the last dimension, so they serve both weights stored
[in, out] and activations [rows, out].
"""

from __future__ import annotations

import torch


def rotary_to_pairs(x: torch.Tensor, head_dim: int) -> torch.Tensor:
    """Rotate-half order -> adjacent-pair order, per head, on the last dim (lmdeploy's permute_v2)."""
    n = x.shape[-1] // head_dim
    lead = x.shape[:-1]
    return x.reshape(*lead, n, 2, head_dim // 2).transpose(-1, -2).reshape(*lead, n * head_dim)


def pairs_to_rotary(x: torch.Tensor, head_dim: int) -> torch.Tensor:
    """Inverse of `rotary_to_pairs`."""
    n = x.shape[-1] // head_dim
    lead = x.shape[:-1]
    return x.reshape(*lead, n, head_dim // 2, 2).transpose(-1, -2).reshape(*lead, n * head_dim)


def split_grouped_qkv(x: torch.Tensor, heads: int, kv_heads: int, head_dim: int):
    """HF grouped qkv columns -> (q, k, v) columns, heads in HF order."""
    gs = heads // kv_heads
    lead = x.shape[:-1]
    g = x.reshape(*lead, kv_heads, gs + 2, head_dim)
    q = g[..., :gs, :].reshape(*lead, heads * head_dim)
    k = g[..., gs, :].reshape(*lead, kv_heads * head_dim)
    v = g[..., gs + 1, :].reshape(*lead, kv_heads * head_dim)
    return q, k, v


def join_grouped_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, kv_heads: int, head_dim: int):
    """(q, k, v) columns -> HF grouped qkv columns."""
    gs = heads // kv_heads
    lead = q.shape[:-1]
    qg = q.reshape(*lead, kv_heads, gs, head_dim)
    kg = k.reshape(*lead, kv_heads, 1, head_dim)
    vg = v.reshape(*lead, kv_heads, 1, head_dim)
    return torch.cat([qg, kg, vg], dim=-2).reshape(*lead, (heads + 2 * kv_heads) * head_dim)


def hf_qkv_cols_to_tm(x: torch.Tensor, heads: int, kv_heads: int, head_dim: int, permute: bool = True):
    """HF grouped qkv (last dim) -> TurboMind [q | k | v] with q/k in adjacent-pair rotary order (tp=1)."""
    q, k, v = split_grouped_qkv(x, heads, kv_heads, head_dim)
    if permute:
        q, k = rotary_to_pairs(q, head_dim), rotary_to_pairs(k, head_dim)
    return torch.cat([q, k, v], dim=-1)


def tm_qkv_cols_to_hf(x: torch.Tensor, heads: int, kv_heads: int, head_dim: int, permute: bool = True):
    """Inverse of `hf_qkv_cols_to_tm`."""
    q, k, v = torch.split(x, [heads * head_dim, kv_heads * head_dim, kv_heads * head_dim], dim=-1)
    if permute:
        q, k = pairs_to_rotary(q, head_dim), pairs_to_rotary(k, head_dim)
    return join_grouped_qkv(q, k, v, heads, kv_heads, head_dim)


# =====================================================================================================
# Whole-model transforms: HF XComposer2 state dict <-> TurboMind tensors (what lmdeploy's converter writes)
# =====================================================================================================
#
# Names. "Merged" TurboMind names carry no tensor-parallel rank: `layers.0.attention.w_qkv.weight`,
# `layers.0.attention.w_qkv.lora_a.weight`, `layers.0.attention_norm.weight`, `tok_embeddings.weight`,
# `norm.weight`, `output.weight`. The converter's files insert the rank before the last suffix
# (`layers.0.attention.w_qkv.0.weight`, `tok_embeddings.0.weight`); norms carry none.
#
# What lmdeploy 0.7.1's converter does (module.py / target_model/base.py / source_model/internlm2.py), per
# tensor, with W the weight dtype (`float16`, `bfloat16`; `float32` checkpoints are stored as float16):
#   w_qkv (weight, Plora_B, bias): HF rows are grouped per kv head (gs = heads // kv q slots, then k, v).
#       The reader views them as (kv, gs + 2, 128, -1) -- head_dim HARD-CODED to 128 -- splits q/k/v,
#       transposes to [in, out], repeats kv heads when tp > kv heads (then writes kv_head_num = tp),
#       applies permute_v2 (rotate-half -> adjacent pairs) to q and k with the real head_dim, then lays out
#       [q_0|k_0|v_0|q_1|k_1|v_1...] and gives rank r its [q_r|k_r|v_r]. Plora_A is only transposed, no
#       permute, and copied to every rank.
#   wo: weight and Plora_A transposed and split on the input dim (rows); Plora_B transposed, copied.
#   w1, w3: weight and Plora_B transposed, zero-padded to the padded inter_size, split on the output dim;
#       Plora_A transposed, copied.  w2: weight and Plora_A transposed, padded on the input dim, split on
#       rows; Plora_B transposed, copied.
#   tok_embeddings: [vocab(+pad to a multiple of tp), hidden] split on dim 1 (hidden).
#   output: NOT transposed, [vocab(+pad), hidden] split on dim 0.  Norms: as is.
# With head_dim == 128 the reader's view is exact. With another head_dim the converter still runs and
# writes files of the right size, but their content is scrambled (the view splits the memory correctly,
# then the reshape to (-1, D*in/128) and the transpose do not); `reader_head_dim=128` (the default)
# reproduces that bit for bit, `reader_head_dim=shape.size_per_head` gives the correct layout.
#
# Merged tensors (`Workspace.tensor`, `hf_to_tm`) are what a tp=1 conversion writes: w_qkv is
# [q | k | v] (each the concatenation over ranks), split tensors are concatenated, copies taken once,
# and the vocab padding of tok_embeddings / output is removed. Two things do NOT merge back to tp=1:
# repeated kv heads (tp > kv heads: the merged w_qkv keeps the replicas, kv_head_num in config.yaml is tp)
# and inter_size padding (config.yaml holds the padded size; the merged tensor keeps the zero columns).

import math
import re as _re
from dataclasses import dataclass as _dataclass
from typing import TYPE_CHECKING as _TYPE_CHECKING, Mapping as _Mapping

from ..errors import ParityInputError as _ParityInputError
from ..names import CANONICAL_OF_TM, NORMS, TM_KIND_OF_HF, hf_name_of_tm, is_tm_norm, parse_tm_name

if _TYPE_CHECKING:  # pragma: no cover
    from .shapes import ModelShape

LMDEPLOY_READER_HEAD_DIM = 128

# weight_type (config.yaml) -> dtype of the files, as lmdeploy's `_weight_dtype_map` (float32 -> float16)
WEIGHT_TYPE_DTYPES: dict[str, torch.dtype] = {
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float32": torch.float16,
    "int4": torch.float16,  # AWQ W4A16: every tensor but the quantized linears' weights (parity.quant.workspace)
}
# weight types whose linear weights are stored quantized; their merged `.weight` is the exact dequantization
QUANT_WEIGHT_TYPES = ("int4",)

# split rules of merged names
RULE_QKV = "qkv"     # per rank [q_r | k_r | v_r] on the last dim
RULE_COL = "col"     # split on the last dim
RULE_ROW = "row"     # split on dim 0
RULE_COPY = "copy"   # the same tensor on every rank
RULE_EMB = "emb"     # tok_embeddings: split on dim 1 (hidden)
RULE_NONE = "none"   # one file, no rank in the name



def stored_weights_dtype(weight_type: str) -> torch.dtype | None:
    """The dtype a workspace of `weight_type` stores the model's floating-point weights in: the reference's own
    weights are rounded to it before it is judged (a float32 checkpoint is deployed as float16). None for
    quantized weights, which the replay reads exactly as the quantized reference holds them."""
    return None if weight_type in QUANT_WEIGHT_TYPES else tm_dtype(weight_type)


def tm_dtype(weight_type: str) -> torch.dtype:
    try:
        return WEIGHT_TYPE_DTYPES[weight_type]
    except KeyError:
        raise _ParityInputError(
            f"model_config.weight_type {weight_type!r} is not supported: expected one of "
            f"{', '.join(WEIGHT_TYPE_DTYPES)}."
        ) from None


def split_rule(name: str) -> str:
    layer, linear, kind = parse_tm_name(name)
    if layer is None:
        return {"tok_embeddings.weight": RULE_EMB, "output.weight": RULE_ROW, "norm.weight": RULE_NONE}[kind]
    if linear in NORMS:
        return RULE_NONE
    if linear == "attention.w_qkv":
        return RULE_COPY if kind == "lora_a.weight" else RULE_QKV
    if linear in ("attention.wo", "feed_forward.w2"):
        if kind in ("lora_b.weight", "bias"):
            return RULE_COPY
        return RULE_ROW
    # w1, w3
    if kind == "lora_a.weight":
        return RULE_COPY
    return RULE_COL


def rank_file_name(name: str, rank: int) -> str:
    """File name of rank `rank` of merged tensor `name` (`x.y.weight` -> `x.y.0.weight`); norms unchanged."""
    if split_rule(name) == RULE_NONE:
        return name
    prefix, ext = name.rsplit(".", 1)
    return f"{prefix}.{rank}.{ext}"


_FILE_RE = _re.compile(r"^(.*)\.(\d+)\.(weight|bias)$")


def merged_name_of_file(file_name: str) -> tuple[str, int | None]:
    """Inverse of `rank_file_name`: (merged name, rank or None)."""
    m = _FILE_RE.match(file_name)
    if m and not is_tm_norm(file_name) and file_name != "norm.weight":
        base = f"{m.group(1)}.{m.group(3)}"
        # `layers.0.attention.w_qkv.0.weight` -> base `layers.0.attention.w_qkv.weight`; but a layer
        # index alone (`layers.0.weight`) is not a rank file.
        if base.count(".") >= 1 and not _re.match(r"^layers\.\d+$", m.group(1)):
            return base, int(m.group(2))
    return file_name, None


@_dataclass(frozen=True)
class TensorSpec:
    name: str
    rule: str
    shard_shape: tuple[int, ...]          # one file's shape
    merged_shape: tuple[int, ...]         # Workspace.tensor's shape (vocab padding removed)
    tp: int
    qkv_widths: tuple[int, int, int] | None = None  # per-rank q, k, v widths (RULE_QKV)
    pad_rows: int = 0                     # vocab padding rows removed when merging (emb / output)

    @property
    def n_files(self) -> int:
        return 1 if self.rule == RULE_NONE else self.tp

    def numel(self) -> int:
        return math.prod(self.shard_shape)


def vocab_pad(vocab_size: int, tp: int) -> int:
    return (-vocab_size) % tp


def tensor_spec(name: str, shape: "ModelShape", lora_rank: int = 0) -> TensorSpec:
    """Shapes of a merged tensor and of its per-rank files, as config.yaml implies them.

    `lora_rank` is the rank resolved for the tensor's linear (only used for lora_a / lora_b).
    """
    tp = int(shape.tp)
    H, KV, D, hid = shape.head_num, shape.kv_head_num, shape.size_per_head, shape.hidden_units
    layer, linear, kind = parse_tm_name(name)
    rule = split_rule(name)
    if layer is None:
        vpad = vocab_pad(shape.vocab_size, tp)
        if kind == "norm.weight":
            return TensorSpec(name, rule, (hid,), (hid,), tp)
        if kind == "tok_embeddings.weight":
            rows = (getattr(shape, "embedding_size", 0) or shape.vocab_size)
            return TensorSpec(name, rule, (rows + vpad, hid // tp), (rows, hid), tp, pad_rows=vpad)
        rows = shape.vocab_size
        return TensorSpec(name, rule, ((rows + vpad) // tp, hid), (rows, hid), tp, pad_rows=vpad)
    if linear in NORMS:
        return TensorSpec(name, rule, (hid,), (hid,), tp)
    r = int(lora_rank)
    if linear == "attention.w_qkv":
        q, k = H * D, KV * D
        width = q + 2 * k
        widths = (q // tp, k // tp, k // tp)
        if kind == "weight":
            return TensorSpec(name, rule, (hid, width // tp), (hid, width), tp, widths)
        if kind == "bias":
            return TensorSpec(name, rule, (width // tp,), (width,), tp, widths)
        if kind == "lora_a.weight":
            return TensorSpec(name, rule, (hid, r), (hid, r), tp)
        return TensorSpec(name, rule, (r, width // tp), (r, width), tp, widths)
    if linear == "attention.wo":
        if kind == "weight":
            return TensorSpec(name, rule, (H * D // tp, hid), (H * D, hid), tp)
        if kind == "bias":
            return TensorSpec(name, rule, (hid,), (hid,), tp)
        if kind == "lora_a.weight":
            return TensorSpec(name, rule, (H * D // tp, r), (H * D, r), tp)
        return TensorSpec(name, rule, (r, hid), (r, hid), tp)
    inter = int(shape.inter_size[layer])
    if linear == "feed_forward.w2":
        if kind == "weight":
            return TensorSpec(name, rule, (inter // tp, hid), (inter, hid), tp)
        if kind == "bias":
            return TensorSpec(name, rule, (hid,), (hid,), tp)
        if kind == "lora_a.weight":
            return TensorSpec(name, rule, (inter // tp, r), (inter, r), tp)
        return TensorSpec(name, rule, (r, hid), (r, hid), tp)
    # w1 / w3
    if kind == "weight":
        return TensorSpec(name, rule, (hid, inter // tp), (hid, inter), tp)
    if kind == "bias":
        return TensorSpec(name, rule, (inter // tp,), (inter,), tp)
    if kind == "lora_a.weight":
        return TensorSpec(name, rule, (hid, r), (hid, r), tp)
    return TensorSpec(name, rule, (r, inter // tp), (r, inter), tp)


def _bits(t: torch.Tensor) -> torch.Tensor:
    """Bit pattern of a float tensor (so NaNs compare equal to themselves)."""
    if torch.is_floating_point(t):
        return t.contiguous().view({2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])
    return t


def merge_shards(spec: TensorSpec, shards: list[torch.Tensor], *, check_copies: bool = True) -> torch.Tensor:
    """Per-rank tensors (file shapes) -> the merged tensor (what tp=1 writes)."""
    rule = spec.rule
    if rule == RULE_NONE or len(shards) == 1:  # one file holds the whole tensor: no copy
        out = shards[0]
    elif rule == RULE_COPY:
        out = shards[0]
        if check_copies:
            for i, s in enumerate(shards[1:], 1):
                if not torch.equal(_bits(s), _bits(out)):
                    raise _ParityInputError(
                        f"{rank_file_name(spec.name, i)} should be a copy of {rank_file_name(spec.name, 0)} "
                        "(the converter copies this tensor to every tensor-parallel rank) but differs: the "
                        "workspace is corrupt or was assembled from different conversions."
                    )
    elif rule == RULE_QKV:
        qw, kw, vw = spec.qkv_widths  # type: ignore[misc]
        parts = [torch.split(s, [qw, kw, vw], dim=-1) for s in shards]
        out = torch.cat([torch.cat([p[j] for p in parts], dim=-1) for j in range(3)], dim=-1)
    elif rule == RULE_COL:
        out = torch.cat(shards, dim=-1)
    elif rule == RULE_ROW:
        out = torch.cat(shards, dim=0)
    elif rule == RULE_EMB:
        out = torch.cat(shards, dim=1)
    else:  # pragma: no cover
        raise ValueError(rule)
    if spec.pad_rows:
        out = out[: out.shape[0] - spec.pad_rows]
    return out


def split_merged(spec: TensorSpec, merged: torch.Tensor) -> list[torch.Tensor]:
    """Inverse of `merge_shards` (vocab padding is added back as zeros)."""
    tp = spec.tp
    x = merged
    if spec.pad_rows and x.shape[0] == spec.merged_shape[0]:
        x = torch.nn.functional.pad(x, (0, 0, 0, spec.pad_rows))
    rule = spec.rule
    if rule == RULE_NONE:
        return [x]
    if rule == RULE_COPY:
        return [x] * tp
    if rule == RULE_QKV:
        qw, kw, vw = spec.qkv_widths  # type: ignore[misc]
        q, k, v = torch.split(x, [qw * tp, kw * tp, vw * tp], dim=-1)
        qs, ks, vs = (torch.split(t, w, dim=-1) for t, w in ((q, qw), (k, kw), (v, vw)))
        return [torch.cat([qs[i], ks[i], vs[i]], dim=-1) for i in range(tp)]
    if rule == RULE_COL:
        return list(torch.split(x, x.shape[-1] // tp, dim=-1))
    if rule == RULE_ROW:
        return list(torch.split(x, x.shape[0] // tp, dim=0))
    if rule == RULE_EMB:
        return list(torch.split(x, x.shape[1] // tp, dim=1))
    raise ValueError(rule)  # pragma: no cover


# ----------------------------------------------------------------------------- converter emulation


def _permute_v2(x: torch.Tensor, head_dim: int) -> torch.Tensor:
    """lmdeploy's permute_v2 on the last dim (2-D: [rows, out]; 1-D bias)."""
    if x.dim() == 1:
        return rotary_to_pairs(x, head_dim)
    return rotary_to_pairs(x.reshape(-1, x.shape[-1]), head_dim).reshape(x.shape)


def _unpermute_v2(x: torch.Tensor, head_dim: int) -> torch.Tensor:
    if x.dim() == 1:
        return pairs_to_rotary(x, head_dim)
    return pairs_to_rotary(x.reshape(-1, x.shape[-1]), head_dim).reshape(x.shape)


def _reader_split_qkv(x: torch.Tensor, heads: int, kv: int, rd: int):
    """lmdeploy's internlm2 reader on HF wqkv (weight [O, in], Plora_B [O, r], bias [O]), then the
    exporter's transpose: returns q, k, v as [c, out] (2-D) or [out] (bias)."""
    gs = heads // kv
    try:
        g = x.reshape(kv, gs + 2, rd, -1)
    except RuntimeError as e:
        raise _ParityInputError(
            f"lmdeploy's reader cannot split a wqkv tensor of shape {list(x.shape)} as (kv_heads={kv}, "
            f"{gs}+2, {rd}, -1): {e}"
        ) from None
    c = g.shape[-1]
    q = g[:, :gs].reshape(-1, c)
    k = g[:, gs].reshape(-1, c)
    v = g[:, gs + 1].reshape(-1, c)
    if x.dim() == 1:  # bias: the exporter works on 1-D tensors
        return q.reshape(-1), k.reshape(-1), v.reshape(-1)
    return q.t(), k.t(), v.t()


def _reader_join_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, kv: int, rd: int,
                     hf_shape: tuple[int, ...]) -> torch.Tensor:
    gs = heads // kv
    if q.dim() == 1:
        c = q.numel() // (heads * rd)
        q2, k2, v2 = q.reshape(-1, c), k.reshape(-1, c), v.reshape(-1, c)
    else:
        q2, k2, v2 = q.t(), k.t(), v.t()
        c = q2.shape[-1]
    g = torch.cat([q2.reshape(kv, gs, rd, c), k2.reshape(kv, 1, rd, c), v2.reshape(kv, 1, rd, c)], dim=1)
    return g.reshape(hf_shape)


def _repeat_kv(x: torch.Tensor, n: int, hidden: int, head_dim: int) -> torch.Tensor:
    """lmdeploy's Attn._repeat_kv on k or v ([c, out] with rows viewed as `hidden`; 1-D bias)."""
    rows = 1 if x.dim() == 1 else hidden
    try:
        y = x.reshape(rows, -1, head_dim).repeat(1, 1, n).reshape(rows, -1)
    except RuntimeError as e:
        raise _ParityInputError(
            f"lmdeploy's converter cannot replicate kv heads of a tensor of shape {list(x.shape)} "
            f"(repeat_kv={n}, hidden={hidden}, head_dim={head_dim}): {e}"
        ) from None
    if x.dim() == 1:
        return y.reshape(-1)
    if y.shape[0] != x.shape[0]:
        raise _ParityInputError(
            f"lmdeploy's converter replicates kv heads by viewing the tensor with {hidden} (hidden_units) rows; "
            f"a tensor with {x.shape[0]} rows (a PLoRA B of rank {x.shape[0]}) cannot be merged with its q part "
            f"that way, so lmdeploy's converter fails for tp={n * (x.shape[-1] // head_dim)} > kv heads with PLoRA."
        )
    return y


def _unrepeat_kv(y: torch.Tensor, n: int, hidden: int, head_dim: int) -> torch.Tensor:
    rows = 1 if y.dim() == 1 else hidden
    x = y.reshape(rows, -1, n * head_dim)[..., :head_dim]
    return x.reshape(-1) if y.dim() == 1 else x.reshape(y.shape[0], -1)


def _rank_major(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, tp: int) -> list[torch.Tensor]:
    """merge_qkv_v2 followed by the split on the last dim: rank r gets [q_r | k_r | v_r] (converter shape)."""
    qs, ks, vs = (torch.chunk(t, tp, dim=-1) for t in (q, k, v))
    return [torch.cat([qs[i], ks[i], vs[i]], dim=-1) for i in range(tp)]


def _kv_heads_of(x: torch.Tensor, heads: int, head_dim: int) -> int:
    width = x.shape[0]
    kv2 = width // head_dim - heads
    if width % head_dim or kv2 <= 0 or kv2 % 2:
        raise _ParityInputError(
            f"wqkv has {width} output rows, which is not (heads + 2 * kv_heads) * head_dim for heads={heads}, "
            f"head_dim={head_dim}."
        )
    return kv2 // 2


def _repeat_factor(tp: int, kv_hf: int) -> int:
    return tp // kv_hf if (tp > kv_hf and tp % kv_hf == 0) else 0


def _cast(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return t.to(dtype) if torch.is_floating_point(t) else t


def _hf_layer_indices(hf_state: _Mapping[str, torch.Tensor]) -> list[int]:
    idx = set()
    for k in hf_state:
        m = _re.match(r"^model\.layers\.(\d+)\.", k)
        if m:
            idx.add(int(m.group(1)))
    return sorted(idx)


def hf_to_tm_files(hf_state: _Mapping[str, torch.Tensor], shape: "ModelShape", *,
                   reader_head_dim: int | None = LMDEPLOY_READER_HEAD_DIM,
                   tie_word_embeddings: bool = False,
                   attn_bias: bool | None = None) -> dict[str, torch.Tensor]:
    """The converter's files (name with rank -> tensor in the file's config.yaml shape and dtype).

    `shape` is the ModelShape of the target workspace (tp, weight_type, padded inter_size, ...). kv heads of
    the HF model are taken from the wqkv tensors (config.yaml's kv_head_num is tp when kv heads were
    replicated). `reader_head_dim`: 128 reproduces lmdeploy's reader (its hard-coded head_dim), None or
    `shape.size_per_head` the correct layout. `attn_bias`: export q/k/v/o biases (default: shape.attn_bias;
    lmdeploy's xcomposer2 reader never sets it, so biases are dropped).
    """
    dtype = tm_dtype(shape.weight_type)
    quantized = shape.weight_type in QUANT_WEIGHT_TYPES
    tp, H, D, hid = int(shape.tp), shape.head_num, shape.size_per_head, shape.hidden_units
    rd = reader_head_dim or D
    bias = bool(shape.attn_bias) if attn_bias is None else bool(attn_bias)
    files: dict[str, torch.Tensor] = {}

    def put(name: str, shards: list[torch.Tensor], lora_rank: int = 0):
        spec = tensor_spec(name, shape, lora_rank)
        for i, s in enumerate(shards):
            fname = rank_file_name(name, i) if spec.rule != RULE_NONE else name
            # int4: a linear's weight is compared as its exact dequantization (float32), never rounded
            _, linear, kind = parse_tm_name(name)
            keep = quantized and kind == "weight" and linear in CANONICAL_OF_TM
            s = (_cast(s, torch.float32) if keep else _cast(s, dtype)).contiguous()
            if s.numel() != spec.numel():
                raise _ParityInputError(
                    f"{name}: the converter would write {s.numel()} elements per file, config.yaml implies "
                    f"{list(spec.shard_shape)}."
                )
            files[fname] = s.reshape(spec.shard_shape)

    def split(x: torch.Tensor, dim: int) -> list[torch.Tensor]:
        if x.shape[dim] % tp:
            raise _ParityInputError(f"dimension {dim} of a tensor of shape {list(x.shape)} does not split into tp={tp}.")
        return list(torch.chunk(x, tp, dim=dim))

    def pad_out(x: torch.Tensor, n: int) -> torch.Tensor:
        return x if n == x.shape[-1] else torch.nn.functional.pad(x, (0, n - x.shape[-1]))

    def pad_in(x: torch.Tensor, n: int) -> torch.Tensor:
        return x if n == x.shape[0] else torch.nn.functional.pad(x, (0, 0, 0, n - x.shape[0]))

    def need(key: str) -> torch.Tensor:
        if key not in hf_state:
            raise _ParityInputError(
                f"HF tensor {key!r} is missing from the state dict; lmdeploy's xcomposer2 reader needs it "
                "(expected InternLM2/XComposer2 names: model.layers.N.attention.wqkv/wo, feed_forward.w1/w2/w3, "
                "attention_norm, ffn_norm, with Plora_A/Plora_B on both halves of a linear pair or neither)."
            )
        return hf_state[key]

    layers = _hf_layer_indices(hf_state)
    if len(layers) > shape.num_layer or (layers and layers[-1] >= shape.num_layer):
        raise _ParityInputError(
            f"The HF state dict has layers {layers[0]}..{layers[-1]} but the workspace shape has num_layer="
            f"{shape.num_layer}; lmdeploy 0.7.x refuses extra layers."
        )
    for i in layers:
        p = f"model.layers.{i}."
        t = f"layers.{i}."
        files[t + "attention_norm.weight"] = _cast(need(p + "attention_norm.weight"), dtype).contiguous()
        files[t + "ffn_norm.weight"] = _cast(need(p + "ffn_norm.weight"), dtype).contiguous()
        # attention
        kinds = ["Plora_A.weight", "Plora_B.weight", "weight"] + (["bias"] if bias else [])
        wqkv = need(p + "attention.wqkv.weight")
        kv_hf = _kv_heads_of(wqkv, H, D)
        rep = _repeat_factor(tp, kv_hf)
        for kind in kinds:
            qkv_hf = hf_state.get(p + f"attention.wqkv.{kind}")
            o_hf = hf_state.get(p + f"attention.wo.{kind}")
            if qkv_hf is None and o_hf is None:
                continue
            tmk = TM_KIND_OF_HF[kind]
            if qkv_hf is None or (o_hf is None and kind != "bias"):
                need(p + f"attention.wqkv.{kind}"), need(p + f"attention.wo.{kind}")
            if kind == "Plora_A.weight":
                a = qkv_hf.t()
                put(t + "attention.w_qkv.lora_a.weight", [a] * tp, a.shape[-1])
                oa = o_hf.t()
                put(t + "attention.wo.lora_a.weight", split(oa, 0), oa.shape[-1])
                continue
            if qkv_hf is not None:
                q, k, v = _reader_split_qkv(qkv_hf, H, kv_hf, rd)
                if rep:
                    k, v = (_repeat_kv(x, rep, hid, D) for x in (k, v))
                q, k = _permute_v2(q, D), _permute_v2(k, D)
                shards = _rank_major(q, k, v, tp)
                r = qkv_hf.shape[-1] if kind == "Plora_B.weight" else 0
                put(t + f"attention.w_qkv.{tmk}", shards, r)
            o = o_hf.t() if o_hf is not None else None
            if o is not None:
                if kind == "weight":
                    put(t + "attention.wo.weight", split(o, 0))
                elif kind == "bias":
                    put(t + "attention.wo.bias", [o] * tp)
                else:
                    put(t + "attention.wo.lora_b.weight", [o] * tp, o.shape[0])
        # feed forward
        inter = int(shape.inter_size[i])
        for kind in ("Plora_A.weight", "Plora_B.weight", "weight"):
            ws = [hf_state.get(p + f"feed_forward.{w}.{kind}") for w in ("w1", "w2", "w3")]
            if all(w is None for w in ws):
                continue
            for w, name in zip(ws, ("w1", "w2", "w3")):
                if w is None:
                    need(p + f"feed_forward.{name}.{kind}")
            w1, w2, w3 = (w.t() for w in ws)
            tmk = TM_KIND_OF_HF[kind]
            if kind == "Plora_A.weight":
                put(t + "feed_forward.w1.lora_a.weight", [w1] * tp, w1.shape[-1])
                put(t + "feed_forward.w3.lora_a.weight", [w3] * tp, w3.shape[-1])
                put(t + "feed_forward.w2.lora_a.weight", split(pad_in(w2, inter), 0), w2.shape[-1])
            elif kind == "Plora_B.weight":
                put(t + "feed_forward.w1.lora_b.weight", split(pad_out(w1, inter), -1), w1.shape[0])
                put(t + "feed_forward.w3.lora_b.weight", split(pad_out(w3, inter), -1), w3.shape[0])
                put(t + "feed_forward.w2.lora_b.weight", [w2] * tp, w2.shape[0])
            else:
                put(t + "feed_forward.w1.weight", split(pad_out(w1, inter), -1))
                put(t + "feed_forward.w3.weight", split(pad_out(w3, inter), -1))
                put(t + "feed_forward.w2.weight", split(pad_in(w2, inter), 0))
    emb = hf_state.get("model.tok_embeddings.weight")
    out = hf_state.get("output.weight")
    if out is None and tie_word_embeddings:
        out = emb
    vpad = vocab_pad(shape.vocab_size, tp)
    def pad_vocab(x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.pad(x, (0, 0, 0, vpad)) if vpad else x

    if emb is not None:
        put("tok_embeddings.weight", split(pad_vocab(emb), 1))
    if "model.norm.weight" in hf_state:
        files["norm.weight"] = _cast(hf_state["model.norm.weight"], dtype).contiguous()
    if out is not None:
        put("output.weight", split(pad_vocab(out), 0))
    return files


def merge_files(files: _Mapping[str, torch.Tensor], shape: "ModelShape") -> dict[str, torch.Tensor]:
    """Per-rank files -> merged tensors (the same merge `Workspace.tensor` does)."""
    groups: dict[str, dict[int, torch.Tensor]] = {}
    for fname, t in files.items():
        base, rank = merged_name_of_file(fname)
        groups.setdefault(base, {})[0 if rank is None else rank] = t
    out: dict[str, torch.Tensor] = {}
    for base, by_rank in groups.items():
        layer, linear, kind = parse_tm_name(base)
        first = by_rank[0]
        r = 0
        if kind == "lora_a.weight":
            r = first.shape[-1]
        elif kind == "lora_b.weight":
            r = first.shape[0]
        spec = tensor_spec(base, shape, r)
        out[base] = merge_shards(spec, [by_rank[i] for i in range(spec.n_files)], check_copies=False)
    return out


def hf_to_tm(hf_state: _Mapping[str, torch.Tensor], shape: "ModelShape", *,
             reader_head_dim: int | None = LMDEPLOY_READER_HEAD_DIM,
             tie_word_embeddings: bool = False, attn_bias: bool | None = None) -> dict[str, torch.Tensor]:
    """HF XComposer2 state dict -> merged TurboMind tensors, exactly as `Workspace.tensor` reads them from a
    workspace lmdeploy's converter wrote for `shape` (bit for bit: see `hf_to_tm_files`)."""
    files = hf_to_tm_files(hf_state, shape, reader_head_dim=reader_head_dim,
                           tie_word_embeddings=tie_word_embeddings, attn_bias=attn_bias)
    return merge_files(files, shape)


def tm_to_hf(tm_state: _Mapping[str, torch.Tensor], shape: "ModelShape", *,
             hf_kv_heads: int | None = None,
             hf_inter_size: int | list[int] | None = None,
             reader_head_dim: int | None = LMDEPLOY_READER_HEAD_DIM) -> dict[str, torch.Tensor]:
    """Inverse of `hf_to_tm`: merged TurboMind tensors -> HF state dict (in the workspace dtype).

    `hf_kv_heads`: the HF model's kv heads when the converter replicated them (tp > kv heads; config.yaml
    then says kv_head_num = tp); default shape.kv_head_num. `hf_inter_size`: the unpadded intermediate size
    (default: shape.inter_size, i.e. no padding was added).
    """
    tp, H, D, hid = int(shape.tp), shape.head_num, shape.size_per_head, shape.hidden_units
    KV = shape.kv_head_num
    kv_hf = int(hf_kv_heads or KV)
    rep = _repeat_factor(tp, kv_hf)
    rd = reader_head_dim or D
    if hf_inter_size is None:
        inter_hf = list(shape.inter_size)
    elif isinstance(hf_inter_size, int):
        inter_hf = [hf_inter_size] * len(shape.inter_size)
    else:
        inter_hf = list(hf_inter_size)
    out: dict[str, torch.Tensor] = {}

    def lora_rank(name: str, t: torch.Tensor) -> int:
        if name.endswith("lora_a.weight"):
            return t.shape[-1]
        if name.endswith("lora_b.weight"):
            return t.shape[0]
        return 0

    for name, t in tm_state.items():
        layer, linear, kind = parse_tm_name(name)
        key = hf_name_of_tm(name)
        if layer is None or linear in NORMS:
            out[key] = t
            continue
        if linear == "attention.w_qkv" and kind != "lora_a.weight":
            spec = tensor_spec(name, shape, lora_rank(name, t))
            shards = split_merged(spec, t)
            # back to the converter's shapes: [c, out/tp] where c = rows * D / rd (rows = in or r)
            if t.dim() == 2:
                rows = t.shape[0]
                if (rows * D) % rd:
                    raise _ParityInputError(f"{name}: cannot undo lmdeploy's reader view for head_dim {D}.")
                c = rows * D // rd
                shards = [s.reshape(c, -1) for s in shards]
            qs, ks, vs = [], [], []
            w = shards[0].shape[-1]
            qw = w * H // (H + 2 * KV)
            kw = (w - qw) // 2
            for s in shards:
                a, b, cc = torch.split(s, [qw, kw, kw], dim=-1)
                qs.append(a), ks.append(b), vs.append(cc)
            q, k, v = (torch.cat(x, dim=-1) for x in (qs, ks, vs))
            q, k = _unpermute_v2(q, D), _unpermute_v2(k, D)
            if rep:
                k, v = (_unrepeat_kv(x, rep, hid, D) for x in (k, v))
            rows_hf = (H + 2 * kv_hf) * D
            hf_shape = (rows_hf,) if t.dim() == 1 else (rows_hf, t.shape[0])
            out[key] = _reader_join_qkv(q, k, v, H, kv_hf, rd, hf_shape)
            continue
        if linear == "attention.wo" and kind == "bias":
            out[key] = t
            continue
        x = t
        if linear in ("feed_forward.w1", "feed_forward.w3") and kind in ("weight", "lora_b.weight"):
            x = x[..., : inter_hf[layer]]
        if linear == "feed_forward.w2" and kind in ("weight", "lora_a.weight"):
            x = x[: inter_hf[layer]]
        out[key] = x.t() if x.dim() == 2 else x
    return {k: v.contiguous() for k, v in out.items()}
