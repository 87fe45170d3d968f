"""Config audit: every field lmdeploy derived, and the LoRA rank/scale per linear as the engine resolves it."""

from __future__ import annotations

import math
from typing import Any

from ..hfconfig import head_dim_of, kv_heads_of
from ..names import TM_LINEAR_OF
from ..points import PLORA_LINEARS
from ..records import Finding
from .base import CheckContext, CheckOutput

# workspace field -> (where it lives, how HF says it, module it shapes first)
_FIELDS = (
    ("head_num", "model", lambda c: c.get("num_attention_heads"), "attention"),
    ("kv_head_num", "model", kv_heads_of, "attention"),
    ("size_per_head", "model", head_dim_of, "attention"),
    ("hidden_units", "model", lambda c: c.get("hidden_size"), "attention_norm"),
    ("num_layer", "model", lambda c: c.get("num_hidden_layers"), None),
    ("norm_eps", "model", lambda c: c.get("rms_norm_eps"), "attention_norm"),
    ("vocab_size", "model", lambda c: c.get("vocab_size"), "output"),
    ("rope_theta", "attention", lambda c: float(c.get("rope_theta", 10000.0)), "attention"),
    ("rotary_embedding", "attention", head_dim_of, "attention"),
    ("max_position_embeddings", "attention", lambda c: c.get("max_position_embeddings"), "attention"),
)


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, float) or isinstance(b, float):
        try:
            return math.isclose(float(a), float(b), rel_tol=1e-9, abs_tol=0.0)
        except (TypeError, ValueError):
            return False
    return a == b


def _ws_value(ws, where: str, key: str) -> Any:
    if where == "model":
        return getattr(ws.model, key, None)
    return ws.attention.get(key)


def run(ctx: CheckContext) -> CheckOutput:
    out = CheckOutput()
    ws, cfg = ctx.workspace, ctx.hf_config
    sem = ctx.semantics
    if not sem.runtime_applies_plora:
        out.findings.append(Finding(
            check="config", severity="error", cause="unsupported_version", layer=None, module=None,
            positions="image",
            message=(f"lmdeploy {sem.version}: {sem.note or 'this runtime does not apply PLoRA'} The model's "
                     "image rows will run without their LoRA; deploy with lmdeploy 0.7.1."),
            metrics={"version": sem.version},
        ))
    if ctx.serve_from == "workspace" and not sem.workspace_loads_lora:
        out.findings.append(Finding(
            check="config", severity="error", cause="lora_not_applied", layer=None, module=None, positions="image",
            message=("Served from a converted workspace: TurboMind's workspace loader never reads lora_a/lora_b, so "
                     "the LoRA buffers are uninitialised. Serve from the HF folder instead."),
        ))
    if ws is None:
        return out
    inter = cfg.get("intermediate_size")
    for key, where, hf_get, module in _FIELDS:
        try:
            hf = hf_get(cfg)
        except (KeyError, TypeError, ValueError, ZeroDivisionError):
            hf = None
        eng = _ws_value(ws, where, key)
        if key == "kv_head_num" and ws.model.tp > (hf or 0) and eng == ws.model.tp:
            ok = True  # lmdeploy replicates kv heads when tp exceeds them
        else:
            ok = hf is None or _same(hf, eng)
        out.table.append({"field": key, "hf": hf, "engine": eng, "ok": ok, "note": ""})
        if not ok:
            out.findings.append(Finding(
                check="config", severity="error", cause="config_mismatch", layer=0 if module else None,
                module=module, positions="all",
                message=f"config.yaml {where}_config.{key} = {eng!r}, but the HF model says {hf!r}.",
                metrics={"field": key, "hf": hf, "engine": eng},
            ))
    if inter is not None:
        sizes = list(ws.model.inter_size)
        bad = [i for i, s in enumerate(sizes) if s < inter or s - inter >= max(64, ws.model.tp) * ws.model.tp]
        out.table.append({"field": "inter_size", "hf": inter, "engine": sizes[:4] + (["…"] if len(sizes) > 4 else []),
                          "ok": not bad, "note": "padded to divide by tp" if any(s != inter for s in sizes) else ""})
        if bad:
            out.findings.append(Finding(
                check="config", severity="error", cause="config_mismatch", layer=bad[0], module="feed_forward.w1",
                positions="all", message=f"inter_size of layer {bad[0]} is {sizes[bad[0]]}, HF intermediate_size is {inter}.",
                metrics={"field": "inter_size", "layers": bad},
            ))
    has_bias = any(v.get("has_bias") for lay in ctx.hf_plora.values() for p, v in lay.items() if p == "attention.wqkv")
    out.table.append({"field": "attn_bias", "hf": int(has_bias), "engine": ws.model.attn_bias,
                      "ok": bool(ws.model.attn_bias) == has_bias, "note": ""})
    if has_bias and not ws.model.attn_bias:
        out.findings.append(Finding(
            check="config", severity="error", cause="bias_dropped", layer=0, module="attention.wqkv", positions="all",
            message=("The HF model's qkv projection has a bias, but the workspace has attn_bias = 0: the converter dropped it "
                     "(lmdeploy's xcomposer2 reader exports attention biases only with attn_bias = 1; for a parity disguise "
                     "`parity convert` and `parity lmdeploy -- ...` set it)."),
        ))
    out.findings += _lora(ctx, out.table)
    return out


def _lora(ctx: CheckContext, table: list) -> list[Finding]:
    from ..deploy.lora_config import resolve

    ws = ctx.workspace
    findings: list[Finding] = []
    policy = ws.lora.lora_policy
    if policy != "plora":
        findings.append(Finding(
            check="config", severity="error", cause="lora_not_applied", layer=0, module="attention.wqkv",
            positions="image",
            message=f"lora_config.lora_policy is {policy!r}, not 'plora': the engine applies no partial LoRA at all.",
        ))
        return findings
    wrong: dict[tuple[str, str], list[tuple[int, Any, Any]]] = {}
    for layer in sorted(ctx.hf_plora):
        for linear in PLORA_LINEARS:
            hf = ctx.hf_plora[layer].get(linear)
            rank, scale = resolve(ws.lora, layer, TM_LINEAR_OF[linear])
            hf_rank = hf["rank"] if hf else 0
            hf_scale = hf["scale"] if hf else 0.0
            if rank != hf_rank:
                wrong.setdefault(("lora_rank_mismatch", linear), []).append((layer, hf_rank, rank))
            elif rank and not math.isclose(scale, hf_scale, rel_tol=1e-6):
                wrong.setdefault(("lora_scale_mismatch", linear), []).append((layer, hf_scale, scale))
    for (cause, linear), rows in sorted(wrong.items(), key=lambda kv: (kv[1][0][0], kv[0][1])):
        layers = [r[0] for r in rows]
        what = "rank" if cause == "lora_rank_mismatch" else "scale"
        findings.append(Finding(
            check="config", severity="error", cause=cause, layer=layers[0], module=linear, positions="image",
            message=(f"The engine resolves LoRA {what} {rows[0][2]!r} for {TM_LINEAR_OF[linear]} "
                     f"(lora_config: r={ws.lora.lora_r}, scale={ws.lora.lora_scale}, "
                     f"rank_pattern={ws.lora.lora_rank_pattern!r}, scale_pattern={ws.lora.lora_scale_pattern!r}), "
                     f"but the HF model's PLoRA has {what} {rows[0][1]!r}; layers {_span(layers)}."
                     + (" A wrong scale is accepted silently by TurboMind." if what == "scale" else "")),
            metrics={"layers": layers, "hf": rows[0][1], "engine": rows[0][2]},
        ))
        table.append({"field": f"lora {what} {linear}", "hf": rows[0][1], "engine": rows[0][2], "ok": False,
                      "note": f"layers {_span(layers)}"})
    if not wrong:
        table.append({"field": "lora rank/scale per linear", "hf": "as model", "engine": "as model", "ok": True,
                      "note": f"{len(ctx.hf_plora) * len(PLORA_LINEARS)} linears"})
    return findings


def _span(layers: list[int]) -> str:
    if len(layers) > 1 and layers == list(range(layers[0], layers[-1] + 1)):
        return f"{layers[0]}–{layers[-1]}"
    return ", ".join(map(str, layers))
