"""A catalogue of named conversion faults, each with the verdict the harness must give.

Every fault mutates a private copy of a *real* converted workspace (a tensor file or config.yaml), the
inputs one side receives, or the runtime semantics, then runs the ordinary pipeline. `run_catalogue`
returns expected-vs-got rows; `make faults` prints them with the detection rate, and the test suite
asserts every row.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

import torch
import yaml

from .deploy.layout import hf_qkv_cols_to_tm, pairs_to_rotary, rotary_to_pairs, split_merged, tm_qkv_cols_to_hf
from .deploy.workspace import Workspace
from .quant import faults as qf
from .records import CanonicalInput, Chat, EngineCall, FaultHooks, Segment


@dataclass(frozen=True)
class Expected:
    layer: int | None
    module: str | None
    positions: str | None
    cause: str
    step: int | None = None  # decode faults: the generated token whose step first diverges


@dataclass
class FaultSetup:
    """What a fault may change: its own workspace copy, run options, and the hooks injected between stages
    (`records.FaultHooks` fields, plus `hf_bos`: the HF side laid out with another BOS policy)."""

    workspace: Path
    options: dict[str, Any] = field(default_factory=dict)
    hooks: dict[str, Any] = field(default_factory=dict)

    def ws(self) -> Workspace:
        return Workspace.open(self.workspace)

    # -- tensors
    def read(self, name: str) -> torch.Tensor:
        return self.ws().tensor(name).clone()

    def write(self, name: str, merged: torch.Tensor) -> None:
        ws = self.ws()
        spec = ws.spec(name)
        for rank, shard in enumerate(split_merged(spec, merged.to(ws.dtype).contiguous())):
            bits = shard.contiguous().view(torch.int16) if shard.element_size() == 2 else shard.contiguous()
            bits.numpy().tofile(ws.file_path(name, rank))

    def edit(self, name: str, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        self.write(name, fn(self.read(name)))

    # -- config.yaml
    def config(self, fn: Callable[[dict], None]) -> None:
        path = self.ws().weights_dir / "config.yaml"
        cfg = yaml.safe_load(path.read_text())
        fn(cfg)
        path.write_text(yaml.safe_dump(cfg))


@dataclass(frozen=True)
class Fault:
    name: str
    kind: str            # weights | config | inputs | version | numerics | decode
    description: str
    expected: Expected
    apply: Callable[[FaultSetup], None]
    model: str = "xcomposer2-tiny"
    cases: Callable[[Path], list[CanonicalInput]] | None = None  # built in a scratch folder; default: catalogue_cases


def _w(layer: int, linear: str, kind: str = "weight") -> str:
    return f"layers.{layer}.{linear}.{kind}"


def _shape(s: FaultSetup):
    return s.ws().model


def _qkv_widths(m) -> list[int]:
    """The q, k and v widths of a fused w_qkv (TurboMind's [q | k | v] order)."""
    return [m.head_num * m.size_per_head] + [m.kv_head_num * m.size_per_head] * 2


def _qkv_rotary(s: FaultSetup, layer: int, fn) -> None:
    """Re-apply or undo the rotary permutation on the q/k columns of a fused w_qkv weight."""
    m = _shape(s)

    def edit(w):
        wq, wk, wv = torch.split(w, _qkv_widths(m), dim=-1)
        return torch.cat([fn(wq, m.size_per_head), fn(wk, m.size_per_head), wv], dim=-1)

    s.edit(_w(layer, "attention.w_qkv"), edit)


def _qkv_bias(s: FaultSetup, layer: int, fn) -> None:
    """Edit the q, k and v parts of a fused w_qkv bias (TurboMind's [q | k | v] order): fn(q, k, v, D)."""
    m = _shape(s)

    def edit(b):
        return torch.cat(fn(*torch.split(b, _qkv_widths(m), dim=-1), m.size_per_head), dim=-1)

    s.edit(_w(layer, "attention.w_qkv", "bias"), edit)


def _swap_qk_bias(bq, bk, bv, D):
    """The k bias where the first kv-width of the q bias belongs, and back."""
    n = bk.shape[-1]
    return torch.cat([bk, bq[n:]]), bq[:n].clone(), bv


def _bias_not_exported(s: FaultSetup) -> None:
    """What lmdeploy writes without parity's registration: attn_bias 0 and no bias files."""
    ws = s.ws()
    for f in ws.weights_dir.iterdir():
        if ".attention." in f.name and f.name.endswith(".bias"):
            f.unlink()
    s.config(lambda c: c["model_config"].__setitem__("attn_bias", 0))


def _wrong_head_dim(s: FaultSetup) -> None:
    """Re-pack layer 0's w_qkv as a converter with head_dim 64 would (it hard-codes 128 upstream)."""
    m = _shape(s)
    H, KV, D = m.head_num, m.kv_head_num, m.size_per_head

    def edit(w):
        hf = tm_qkv_cols_to_hf(w, H, KV, D)
        return hf_qkv_cols_to_tm(hf, H * 2, KV * 2, D // 2)

    s.edit(_w(0, "attention.w_qkv"), edit)


def _swap(s: FaultSetup, a: str, b: str) -> None:
    ta, tb = s.read(a), s.read(b)
    s.write(a, tb)
    s.write(b, ta)


def _copy(s: FaultSetup, src: str, dst: str) -> None:
    s.write(dst, s.read(src))


def _nan_at(s: FaultSetup, name: str) -> None:
    def edit(w):
        w = w.clone()
        w.reshape(-1)[7] = float("nan")
        return w
    s.edit(name, edit)


def _set(section: str, key: str, value) -> Callable[[FaultSetup], None]:
    def apply(s: FaultSetup) -> None:
        s.config(lambda c: c[section].__setitem__(key, value))
    return apply


def _heads(s: FaultSetup) -> None:
    """Head count and head size mis-derived, with every file size unchanged (2 x 256 instead of 4 x 128)."""
    def edit(c):
        m = c["model_config"]
        m["head_num"], m["kv_head_num"], m["size_per_head"] = m["head_num"] // 2, m["kv_head_num"] // 2, m["size_per_head"] * 2
    s.config(edit)


def _options(options: dict[str, Any] | None = None, **hooks) -> Callable[[FaultSetup], None]:
    """Set run options (`options`) and fault hooks (keywords: `records.FaultHooks` fields, or `hf_bos`)."""
    def apply(s: FaultSetup) -> None:
        s.options.update(options or {})
        s.hooks.update(hooks)
    return apply


def _engine_call(fn: Callable[[EngineCall], EngineCall]) -> Callable[[FaultSetup], None]:
    return _options(mutate_engine_call=lambda case, call: fn(call))


def _ranges(fn) -> Callable[[FaultSetup], None]:
    return _engine_call(lambda c: replace(c, **fn(list(c.input_embedding_ranges), list(c.input_embeddings))))


# Decode faults generate this many tokens after the catalogue's prompt (two images: 74 rows on the fixtures).
DECODE_STEPS = 8
CATALOGUE_PROMPT_ROWS = 74


def _decode(**deviations) -> Callable[[FaultSetup], None]:
    from .deploy.decode import DecodeDeviations

    return _options({"decode": DECODE_STEPS}, decode_deviations=DecodeDeviations(**deviations) if deviations else None)


def _vision(**kw) -> Callable[[FaultSetup], None]:
    from .deploy.image_input import VisionFault

    return _options(lmdeploy_vision_fault=VisionFault(**kw))


def one_image_cases() -> list[CanonicalInput]:
    """One repo image in a chat: what a 4KHD model needs (it tiles every image ~25 times: 3,817 rows here)."""
    from .fixtures import IMAGES_DIR

    image = sorted(Path(IMAGES_DIR).glob("*.png"))[0]
    return [CanonicalInput("one-image", (), chat=Chat("Describe it.", (image,), "You are a helpful assistant."))]


def hd_cases(folder: Path) -> list[CanonicalInput]:
    """One image of 1000 x 500 px asked about in a chat: XComposer2.5 tiles it 1 x 2 (1,241 rows) and places it
    before the chat template."""
    from .fixtures.generator import make_hd_image

    path = Path(folder) / "wide.png"
    make_hd_image(1000, 500).save(path)
    return [CanonicalInput("hd-chat", (), chat=Chat("What is in the image?", (path,), "You are a helpful assistant."))]


def _noisy_features(call: EngineCall) -> EngineCall:
    g = torch.Generator().manual_seed(0)
    embs = [e + 0.05 * e.std() * torch.randn(e.shape, generator=g) for e in call.input_embeddings]
    return replace(call, input_embeddings=embs)


CATALOGUE: tuple[Fault, ...] = (
    # --- weights
    Fault("linear_from_wrong_layer", "weights", "layer 1's w3 holds layer 0's w3",
          Expected(1, "feed_forward.w3", "all", "weight_mismatch"),
          lambda s: _copy(s, _w(0, "feed_forward.w3"), _w(1, "feed_forward.w3"))),
    Fault("linears_swapped", "weights", "layer 2's w1 and w3 swapped",
          Expected(2, "feed_forward.w1", "all", "weight_mismatch"),
          lambda s: _swap(s, _w(2, "feed_forward.w1"), _w(2, "feed_forward.w3"))),
    Fault("transpose_forgotten", "weights", "layer 1's wo stored [out, in] (square, so sizes still match)",
          Expected(1, "attention.wo", "all", "weight_mismatch"),
          lambda s: s.edit(_w(1, "attention.wo"), lambda w: w.t().contiguous())),
    Fault("rotary_order_not_applied", "weights", "layer 0's q/k columns left in rotate-half order",
          Expected(0, "attention.wqkv", "all", "weight_mismatch"),
          lambda s: _qkv_rotary(s, 0, pairs_to_rotary)),
    Fault("rotary_order_applied_twice", "weights", "layer 2's q/k columns permuted twice",
          Expected(2, "attention.wqkv", "all", "weight_mismatch"),
          lambda s: _qkv_rotary(s, 2, rotary_to_pairs)),
    Fault("wqkv_split_wrong_head_dim", "weights", "layer 0's grouped wqkv split with head_dim 64",
          Expected(0, "attention.wqkv", "all", "weight_mismatch"), _wrong_head_dim),
    Fault("plora_a_zeroed", "weights", "layer 1's wo lora_a all zeros",
          Expected(1, "attention.wo", "image", "weight_mismatch"),
          lambda s: s.edit(_w(1, "attention.wo", "lora_a.weight"), torch.zeros_like)),
    Fault("plora_b_zeroed", "weights", "layer 0's w2 lora_b all zeros",
          Expected(0, "feed_forward.w2", "image", "weight_mismatch"),
          lambda s: s.edit(_w(0, "feed_forward.w2", "lora_b.weight"), torch.zeros_like)),
    Fault("plora_b_scaled", "weights", "layer 2's w1 lora_b scaled by 2",
          Expected(2, "feed_forward.w1", "image", "weight_mismatch"),
          lambda s: s.edit(_w(2, "feed_forward.w1", "lora_b.weight"), lambda w: w * 2)),
    Fault("plora_b_from_other_linear", "weights", "layer 0's w1 lora_b taken from w3",
          Expected(0, "feed_forward.w1", "image", "weight_mismatch"),
          lambda s: _copy(s, _w(0, "feed_forward.w3", "lora_b.weight"), _w(0, "feed_forward.w1", "lora_b.weight"))),
    Fault("norm_from_wrong_place", "weights", "layer 1's ffn_norm holds its attention_norm",
          Expected(1, "ffn_norm", "all", "weight_mismatch"),
          lambda s: _copy(s, "layers.1.attention_norm.weight", "layers.1.ffn_norm.weight")),
    Fault("token_embeddings_shifted", "weights", "tok_embeddings rows shifted by one id",
          Expected(None, "embeddings", "text", "weight_mismatch"),
          lambda s: s.edit("tok_embeddings.weight", lambda w: torch.roll(w, 1, dims=0))),
    # --- configuration
    Fault("lora_scale_all", "config", "lora_scale 2.0 for every linear (model: 1.0)",
          Expected(0, "attention.wqkv", "image", "lora_scale_mismatch"), _set("lora_config", "lora_scale", 2.0)),
    Fault("lora_scale_one_linear", "config", "scale pattern halves layer 1's w2",
          Expected(1, "feed_forward.w2", "image", "lora_scale_mismatch"),
          _set("lora_config", "lora_scale_pattern", r"layers\.1\.feed_forward\.w2:0.5")),
    Fault("lora_rank_one_linear", "config", "rank pattern gives w3 rank 128 (files hold 256)",
          Expected(0, "feed_forward.w3", "image", "lora_rank_mismatch"),
          _set("lora_config", "lora_rank_pattern", "feed_forward.w3:128")),
    Fault("lora_rank_all", "config", "lora_r 128 for every linear (files hold 256)",
          Expected(0, "attention.wqkv", "image", "lora_rank_mismatch"), _set("lora_config", "lora_r", 128)),
    Fault("lora_pattern_does_not_match", "config",
          "4KHD patterns spelled 'attention.wqkv' instead of TurboMind's 'attention.w_qkv': wqkv falls back to r=256",
          Expected(0, "attention.wqkv", "image", "lora_rank_mismatch"),
          lambda s: s.config(lambda c: c["lora_config"].update(
              lora_rank_pattern="attention.wqkv:8,attention.wo:256",
              lora_scale_pattern="attention.wqkv:2.0,attention.wo:1.0")),
          model="xcomposer2-4khd-tiny", cases=lambda folder: one_image_cases()),
    Fault("lora_policy_missing", "config", "lora_policy empty: no PLoRA at all",
          Expected(0, "attention.wqkv", "image", "lora_not_applied"), _set("lora_config", "lora_policy", "")),
    Fault("norm_eps", "config", "norm_eps 1e-2 (model: 1e-5)",
          Expected(0, "attention_norm", "all", "config_mismatch"), _set("model_config", "norm_eps", 1e-2)),
    Fault("rope_base", "config", "rope_theta 10000 (model: 1e6)",
          Expected(0, "attention", "all", "config_mismatch"), _set("attention_config", "rope_theta", 10000.0)),
    Fault("head_counts", "config", "2 heads of 256 instead of 4 of 128 (same bytes): the fused qkv is read wrongly",
          Expected(0, "attention.wqkv", "all", "config_mismatch"), _heads),
    # --- mask and inputs
    Fault("ranges_shifted_by_one", "inputs", "every embedding range one row later",
          Expected(None, "embeddings", "all", "im_mask_mismatch"),
          _ranges(lambda r, e: {"input_embedding_ranges": [(b + 1, x + 1) for b, x in r]})),
    Fault("ranges_overlapping", "inputs", "the second image's range starts inside the first",
          Expected(None, "embeddings", "image", "embeddings_skipped"),
          _ranges(lambda r, e: {"input_embedding_ranges": [r[0], (r[0][1] - 2, r[0][1] - 2 + r[1][1] - r[1][0])]})),
    Fault("ranges_unsorted", "inputs", "the two images' ranges given in reverse order",
          Expected(None, "embeddings", "image", "embeddings_skipped"),
          _ranges(lambda r, e: {"input_embedding_ranges": r[::-1], "input_embeddings": e[::-1]})),
    Fault("ranges_past_end", "inputs", "the last range runs past the prompt",
          Expected(None, "embeddings", "image", "embeddings_skipped"),
          _ranges(lambda r, e: {"input_embedding_ranges": r[:-1] + [(r[-1][0] + 100, r[-1][1] + 100)]})),
    Fault("bos_policy_mismatch", "inputs", "HF side: BOS on every text part; engine: BOS first only",
          Expected(None, "embeddings", "text", "input_mismatch"),
          _options(hf_bos="every_text")),
    Fault("image_features_differ", "inputs", "the engine receives slightly different image features",
          Expected(None, "embeddings", "image", "input_mismatch"), _engine_call(_noisy_features)),
    # --- the high-resolution image path (lmdeploy's own preprocessing and vision forward against HF's)
    Fault("hd_separators_swapped", "inputs", "2.5: lmdeploy's vision model has plora_glb_GN and plora_sub_GN exchanged",
          Expected(None, "embeddings", "image", "input_mismatch"), _vision(swap_separators=True),
          model="xcomposer2d5-tiny", cases=hd_cases),
    Fault("hd_image_placement", "inputs", "2.5: the image token placed as 7b does (after the user header), not "
          "before the chat template", Expected(None, "embeddings", "all", "im_mask_mismatch"),
          _vision(placement_sub_type="7b"), model="xcomposer2d5-tiny", cases=hd_cases),
    Fault("hd_tiles_out_of_order", "inputs", "2.5: the first two 560-px tiles exchanged before lmdeploy's ViT",
          Expected(None, "embeddings", "image", "input_mismatch"), _vision(swap_tiles=True),
          model="xcomposer2d5-tiny", cases=hd_cases),
    Fault("hd_num_differs", "inputs", "2.5: lmdeploy preprocesses with hd_num 1 (HF: 24): one tile instead of 1 x 2",
          Expected(None, "embeddings", "image", "input_mismatch"), _vision(hd_num=1),
          model="xcomposer2d5-tiny", cases=hd_cases),
    # --- version semantics
    Fault("runtime_ignores_plora", "version", "lmdeploy 0.8.0 runtime (drops LoRA weights silently)",
          Expected(0, "attention.wqkv", "image", "lora_not_applied"), _options({"lmdeploy_version": "0.8.0"})),
    Fault("runtime_skips_plora_073", "version", "lmdeploy 0.7.3 runtime (mask buffer never allocated)",
          Expected(0, "attention.wqkv", "image", "lora_not_applied"), _options({"lmdeploy_version": "0.7.3"})),
    Fault("workspace_served_without_lora", "version", "served from the workspace: LoRA never loaded",
          Expected(0, "attention.wqkv", "image", "lora_not_applied"), _options({"serve_from": "workspace"})),
    # --- quantized deployments (int4 workspaces converted from `parity quantize` fixtures)
    Fault("awq_group_size_wrong", "quant", "config.yaml group_size 64 for a g128 int4 workspace",
          Expected(0, "attention.wqkv", "all", "shape_mismatch"), qf.group_size(64), model="xcomposer2-tiny-awq-kept"),
    Fault("awq_scales_zeros_swapped", "quant", "layer 1's w1 scales and zeros files swapped",
          Expected(1, "feed_forward.w1", "all", "weight_mismatch"), qf.swap_scales_and_zeros(1, "feed_forward.w1"),
          model="xcomposer2-tiny-awq-kept"),
    Fault("awq_qweight_from_other_layer", "quant", "layer 2's wo qweight holds layer 0's",
          Expected(2, "attention.wo", "all", "weight_mismatch"), qf.qweight_from(0, 2, "attention.wo"),
          model="xcomposer2-tiny-awq-kept"),
    Fault("awq_zero_point_off_by_one", "quant", "layer 0's w2 zero points one too high",
          Expected(0, "feed_forward.w2", "all", "weight_mismatch"), qf.zero_point_off_by_one(0, "feed_forward.w2"),
          model="xcomposer2-tiny-awq-kept"),
    Fault("awq_nibble_order", "quant", "layer 1's w3 qweight left in AWQ nibble order",
          Expected(1, "feed_forward.w3", "all", "weight_mismatch"), qf.nibbles_in_awq_order(1, "feed_forward.w3"),
          model="xcomposer2-tiny-awq-kept"),
    Fault("plora_smoothing_not_compensated", "quant",
          "lmdeploy's default auto_awq: smoothing scaled the base weights, not Plora_A/Plora_B (--original given)",
          Expected(0, "attention.wqkv", "image", "lora_smoothing_mismatch"),
          _options({"original_fixture": "xcomposer2-tiny"}), model="xcomposer2-tiny-awq"),
    Fault("kv_int4_wrong_scale", "quant", "u4 KV cache (quant_policy 4) read back with scales 1.3x too large",
          Expected(0, "attention", "all", "numeric_drift"), _options({"quant_policy": 4}, kv_scale_factor=1.3)),
    # --- q/k/v biases of a Qwen2 disguise (exported with attn_bias 1 by parity's registration)
    Fault("bias_not_exported", "weights", "Qwen2 disguise converted without the registration: no q/k/v biases",
          Expected(0, "attention.wqkv", "all", "bias_dropped"), _bias_not_exported, model="qwen2-plora-tiny"),
    Fault("bias_rotary_order_not_applied", "weights", "layer 0's q/k bias left in rotate-half order",
          Expected(0, "attention.wqkv", "all", "weight_mismatch"),
          lambda s: _qkv_bias(s, 0, lambda q, k, v, D: (pairs_to_rotary(q, D), pairs_to_rotary(k, D), v)),
          model="qwen2-plora-tiny"),
    Fault("bias_q_k_swapped", "weights", "layer 1's k bias where its q bias belongs and back",
          Expected(1, "attention.wqkv", "all", "weight_mismatch"),
          lambda s: _qkv_bias(s, 1, _swap_qk_bias), model="qwen2-plora-tiny"),
    # --- numerics
    Fault("nonfinite_weight", "numerics", "one NaN in layer 1's w2 weight",
          Expected(1, "feed_forward.w2", "all", "nonfinite"), lambda s: _nan_at(s, _w(1, "feed_forward.w2"))),
    # --- decode (--decode N): only generated rows differ, so the prefill passes
    Fault("lora_on_generated_rows", "decode", "the runtime applies PLoRA on generated rows (LoRA mask 1)",
          Expected(0, "attention.wqkv", "generated", "lora_outside_mask", step=1),
          _decode(lora_on_generated=True)),
    Fault("generated_positions_off_by_one", "decode", "generated tokens placed one position late",
          Expected(0, "attention", "generated", "position_mismatch", step=1), _decode(position_offset=1)),
    Fault("kv_cache_lower_precision", "decode", "KV cache stored one precision step below the workspace's",
          Expected(0, "attention", "generated", "kv_cache_precision", step=1), _decode(kv_lower_precision=True)),
    Fault("rope_base_past_prompt", "decode", "rotary base 1e4 on generated rows only (model: 1e6)",
          Expected(0, "attention", "generated", "rope_mismatch", step=1), _decode(rope_base_past_prompt=1e4)),
    Fault("session_truncated", "decode",
          f"config.yaml session_len {CATALOGUE_PROMPT_ROWS + 6}: room for 5 of the {DECODE_STEPS} tokens asked for",
          Expected(None, None, None, "session_truncated", step=5),
          lambda s: (s.config(lambda c: c["model_config"].update(session_len=CATALOGUE_PROMPT_ROWS + 6)),
                     _decode()(s))),
)


def catalogue_cases(images: Path) -> list[CanonicalInput]:
    """Two images with text around them: enough rows of every class for every fault."""
    imgs = sorted(Path(images).glob("*.png"))[:2]
    return [CanonicalInput("two-images", (
        Segment("text", text="[UNUSED_TOKEN_146]user\nCompare "),
        Segment("image", image=imgs[0]),
        Segment("text", text=" with "),
        Segment("image", image=imgs[1]),
        Segment("text", text=" please.[UNUSED_TOKEN_145]\n[UNUSED_TOKEN_146]assistant\n"),
    ))]


@dataclass
class FaultResult:
    fault: Fault
    got: Expected | None
    status: str
    seconds: float
    error_findings: int
    report: Any = None  # the run's Report

    @property
    def detected(self) -> bool:
        return self.got == self.fault.expected


def run_fault(fault: Fault, models: dict[str, Path], workspaces: dict[str, Path], sessions: dict, cache: Path,
              numeric: str = "fp32") -> FaultResult:
    from .fixtures import IMAGES_DIR
    from .options import RunOptions
    from .pipeline import run_parity

    t = time.perf_counter()
    tmp = Path(tempfile.mkdtemp(prefix=f"parity-fault-{fault.name}-"))
    try:
        ws = tmp / "ws"
        shutil.copytree(workspaces[fault.model], ws, symlinks=True)
        setup = FaultSetup(ws)
        fault.apply(setup)
        opts = dict(setup.options)
        hooks = dict(setup.hooks)
        bos = hooks.pop("hf_bos", None)
        if "original_fixture" in opts:  # the smoothing check compares with the original fixture model
            opts["original"] = models[opts.pop("original_fixture")]
        cases = fault.cases(tmp) if fault.cases else catalogue_cases(IMAGES_DIR)
        # a quantized KV cache changes the reference too: such a fault gets a session of its own
        session = None if opts.get("quant_policy") else sessions[fault.model]
        run_opts = RunOptions(model=models[fault.model], workspace=ws, trust_remote_code=True, cases=cases,
                              numeric=numeric, cache_dir=cache, session=session, **opts)
        if bos:
            from .inputs import prepare

            ref = sessions[fault.model].ref
            hooks["mutate_hf_prepared"] = lambda p: prepare(
                replace(cases[0], bos_policy=bos), ref.tokenize, ref.embed_tokens, ref.encode_image, ref.bos_id,
                ref.decode)
        report = run_parity(run_opts, FaultHooks(**hooks))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    d = report.first_divergence
    got = Expected(d.layer, d.module, d.positions, d.cause, d.step) if d else None
    return FaultResult(fault, got, report.status, time.perf_counter() - t, len(report.errors()), report)


def catalogue_models(cache: Path, names: list[str]) -> dict[str, Path]:
    """Model folders for the catalogue's faults: the fixtures, and the Qwen2 originals and the quantized fixtures
    the quant faults use."""
    from .fixtures import QWEN2_FIXTURE_NAMES, ensure
    from .quant.quantize import QUANT_FIXTURES, ensure_quantized

    models = dict(ensure(cache / "fixtures"))
    qwen2 = tuple(n for n in names if n in QWEN2_FIXTURE_NAMES)
    if qwen2:
        models.update(ensure(cache / "fixtures", qwen2))
    quant = tuple(n for n in names if n in QUANT_FIXTURES)
    if quant:
        models.update(ensure_quantized(cache, quant))
    return models


def fault_workspace(model: Path, cache: Path) -> Path:
    """The clean workspace a fault starts from: the cached conversion (for a Qwen2 PLoRA original, of its
    disguise, with its lora_config and biases), as `parity run` makes it."""
    from .hfconfig import read_hf_config
    from .reference.loader import model_family
    from .options import RunOptions, workspace_path

    family = model_family(read_hf_config(model, "a fixture model folder"))
    return workspace_path(RunOptions(model=model, cache_dir=cache), family)


def run_catalogue(cache: Path | None = None, names: list[str] | None = None,
                  numeric: str = "fp32") -> list[FaultResult]:
    from .places import default_cache_dir
    from .reference.session import ReferenceSession

    cache = Path(cache) if cache is not None else default_cache_dir()
    faults = [f for f in CATALOGUE if names is None or f.name in names]
    wanted = sorted({f.model for f in faults})
    models = catalogue_models(cache, wanted)
    workspaces = {m: fault_workspace(models[m], cache) for m in wanted}
    sessions = {m: ReferenceSession(models[m], trust_remote_code=True) for m in wanted}
    try:
        return [run_fault(f, models, workspaces, sessions, cache, numeric) for f in faults]
    finally:
        for s in sessions.values():
            s.close()
