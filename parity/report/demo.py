"""A synthetic Report (no model, no engine) for previews and the report writers' tests.

    python -m parity.report.demo reports/demo            # failing report
    python -m parity.report.demo reports/demo-ok --clean # passing report

The failing report tells the story of a PLoRA deployment whose LoRA scale is wrong: from layer 0 on, the
image rows of every PLoRA linear diverge while text rows stay at the noise floor. It also carries the
awkward values a real run can produce: NaN / inf metrics, an HTML-like model path and message.
"""

from __future__ import annotations

import math
import random
import sys
from typing import Any

from parity.points import LAYER_POINTS, PLORA_LINEARS, POST_POINTS, PRE_POINTS
from parity.records import CaseSummary, Divergence, Finding, PointResult, Report

EVIL = "<script>alert(1)</script>"


def _case(name: str, text_before: list[str], images: list[int], text_between: list[str],
          text_after: list[str], shift_engine: int = 0) -> CaseSummary:
    labels: list[str] = ["<s>"] + text_before
    spans = []
    for k, n in enumerate(images):
        b = len(labels)
        labels += [f"<img {k}>"] * n
        spans.append((b, b + n))
        if k + 1 < len(images):
            labels += text_between
    labels += text_after
    rows = len(labels)
    canon = [0] * rows
    for b, e in spans:
        for i in range(b, e):
            canon[i] = 1
    engine = list(canon)
    if shift_engine:
        b, e = spans[-1]
        engine[b] = 0
        engine[e] = 1 if e < rows else 0
    return CaseSummary(
        name=name, rows=rows, bos_policy="first", image_spans=spans, bos_rows=[0], row_labels=labels,
        hashes={"token_ids": "3f9a0c12d4e5", "embeddings": "a81b7720ce09", "engine_call": "a81b7720ce09"},
        masks={"hf": list(canon), "engine": engine, "canonical": list(canon)},
    )


def _metrics(rng: random.Random, rel: float, rows: int, img_rel: float | None = None) -> dict[str, Any]:
    txt = rel * (0.8 + 0.4 * rng.random())
    img = img_rel if img_rel is not None else rel * (0.8 + 0.4 * rng.random())
    return {
        "cosine": 1.0 - max(rel, img) ** 2 / 2,
        "rel_l2": max(rel, img * 0.9),
        "max_abs": 40 * max(rel, img) * (0.5 + rng.random()),
        "max_abs_row": rng.randrange(rows),
        "max_abs_col": rng.randrange(4096),
        "mean_abs": max(rel, img) * 0.8,
        "nonfinite_ref": 0,
        "nonfinite_eng": 0,
        "by_class": {"image": {"rel_l2": img, "max_abs": 40 * img, "cosine": 1 - img ** 2 / 2, "rows": 16},
                     "text": {"rel_l2": txt, "max_abs": 40 * txt, "cosine": 1 - txt ** 2 / 2, "rows": rows - 16},
                     "bos": {"rel_l2": txt / 2, "max_abs": 1e-3, "cosine": 1.0, "rows": 1}},
    }


def demo_report(failing: bool = True, *, layers: int = 3, seed: int = 0, evil: bool = True) -> Report:
    """A complete synthetic Report: 2 cases x (embeddings, `layers` x 9 layer points, norm, output)."""
    rng = random.Random(seed)
    words = ["▁Describe", "▁the", "▁image", "▁in", "▁detail", "."]
    cases = [
        _case("one_image", ["▁Look", "▁at", "▁this", ":"], [16], [], words + ["\n"]),
        _case("two_images", ["▁Compare", ":"], [8, 8], ["▁and"], ["▁What", "▁changed", "?"],
              shift_engine=1 if failing else 0),
    ]
    floor, factor = 2.2e-3, 10.0
    points: list[PointResult] = []
    for c in cases:
        img = [0] * c.rows
        for b, e in c.image_spans:
            for i in range(b, e):
                img[i] = 1
        order: list[tuple[int | None, str]] = [(None, p) for p in PRE_POINTS]
        order += [(i, p) for i in range(layers) for p in LAYER_POINTS]
        order += [(None, p) for p in POST_POINTS]
        for layer, mod in order:
            base = floor * (0.3 + 0.4 * rng.random())
            lora_bad = failing and layer is not None and (mod in PLORA_LINEARS or mod in ("attention", "layer"))
            local_img = 0.12 * (1 + 0.3 * rng.random()) if lora_bad else None
            local = _metrics(rng, base, c.rows, local_img)
            depth = -1 if layer is None and mod in PRE_POINTS else (layers if layer is None else layer)
            if failing and depth >= 0 and not (layer == 0 and mod == "attention_norm"):
                # image rows are wrong from layer 0's first PLoRA linear on; the error accumulates
                e2e_acc = min(0.06 * 1.5 ** depth, 0.9) * (1 + 0.1 * rng.random())
            else:
                e2e_acc = floor * 0.5 * 1.12 ** max(depth, 0) * (1 + 0.1 * rng.random())
            e2e = _metrics(rng, max(e2e_acc / 2.5 if failing else e2e_acc, base), c.rows,
                           e2e_acc if failing else None)
            if mod == "embeddings":
                local = None  # nothing to teacher-force before layer 0
            row_err = []
            if mod == "layer":
                for i in range(c.rows):
                    scale = (e2e_acc if img[i] else max(e2e_acc * 0.03, floor * 0.5)) if failing else e2e_acc
                    row_err.append(scale * (0.5 + rng.random()))
            judged = (local or e2e)["rel_l2"]
            exceeded = judged > floor * factor
            points.append(PointResult(case=c.name, layer=layer, module=mod, e2e=e2e, local=local, floor=floor,
                                      threshold=floor * factor, row_err=row_err, exceeded=exceeded))
    if failing:  # the awkward values: NaN / inf / huge
        for p in points:
            if p.case == "two_images" and p.layer == layers - 1 and p.module == "feed_forward.w2":
                p.e2e["max_abs"] = math.nan
                p.e2e["rel_l2"] = math.inf
                p.e2e["nonfinite_eng"] = 3
                p.exceeded = True
            if p.case == "two_images" and p.layer == layers - 1 and p.module == "layer":
                p.row_err[5] = math.nan
                p.row_err[6] = math.inf
                p.e2e["cosine"] = math.nan
            if p.module == "output":
                p.e2e["max_abs"] = 1.7e308

    findings: list[Finding] = []
    div = None
    if failing:
        msg = ("LoRA delta on image rows is 2.00x the reference's (engine lora scale 2.0, HF lora_alpha/r = 1.0); "
               "text rows are unchanged")
        div = Divergence(layer=0, module="attention.wqkv", positions="image", cause="lora_scale_mismatch",
                         case="one_image", message=msg)
        for c in cases:
            for lin in PLORA_LINEARS:
                findings.append(Finding(
                    check="plora_delta", severity="error", cause="lora_scale_mismatch",
                    message=msg if lin == "attention.wqkv" else f"delta/reference ratio 2.0 on image rows of {lin}",
                    layer=0, module=lin, positions="image", case=c.name,
                    metrics={"ratio": 2.0, "rel_l2": 0.13, "rows": 16}))
        findings.append(Finding(
            check="im_mask", severity="warning", cause="im_mask_mismatch",
            message="engine image-row mask is shifted by one row at the end of image 1 (row 15 vs 16)",
            module="embeddings", positions="image", case="two_images", metrics={"rows": [15, 16]}))
        findings.append(Finding(
            check="nonfinite", severity="error", cause="nonfinite",
            message="engine produced 3 non-finite values in feed_forward.w2"
                    + (f" — tensor name {EVIL}" if evil else ""),
            layer=layers - 1, module="feed_forward.w2", positions="all", case="two_images",
            metrics={"nonfinite_eng": 3, "max_abs": math.nan, "rel_l2": math.inf}))
        findings.append(Finding(check="config", severity="info", cause="config_mismatch",
                                message="rope_scaling absent on both sides (ok)", metrics={}))
    status = "fail" if failing else "pass"
    config_audit = [
        {"field": "hidden_size", "hf": 4096, "engine": 4096, "ok": True, "note": ""},
        {"field": "num_layers", "hf": layers, "engine": layers, "ok": True, "note": ""},
        {"field": "rope_theta", "hf": 1000000.0, "engine": 1000000.0, "ok": True, "note": ""},
        {"field": "lora_scale", "hf": 1.0, "engine": 2.0 if failing else 1.0, "ok": not failing,
         "note": "lora_alpha / r" if not failing else "engine uses lora_alpha without dividing by r"},
        {"field": "lora_r", "hf": 256, "engine": 256, "ok": True, "note": ""},
    ]
    weights_audit = []
    for i in range(layers):
        for t in ("attention.w_qkv.weight", "attention.wo.weight", "feed_forward.w1.weight",
                  "feed_forward.w3.weight", "feed_forward.w2.weight", "attention.w_qkv.lora_a.weight",
                  "attention.w_qkv.lora_b.weight"):
            weights_audit.append({"tensor": f"layers.{i}.{t}", "status": "ok", "shape": [4096, 4096],
                                  "max_abs_diff": 0.0})
    if failing:
        weights_audit[3]["status"] = "mismatch"
        weights_audit[3]["max_abs_diff"] = 0.0312
        weights_audit.append({"tensor": "layers.0.attention.w_qkv.lora_b.bias", "status": "missing",
                              "shape": None, "max_abs_diff": math.nan})
    plora = []
    for c in cases:
        for i in range(layers):
            for lin in PLORA_LINEARS:
                ratio = 2.0 if failing else 1.0 + 1e-3 * rng.random()
                plora.append({"case": c.name, "layer": i, "linear": lin, "rank_ref": 256, "rank_eng": 256,
                              "scale_ref": 1.0, "scale_eng": 2.0 if failing else 1.0,
                              "delta_ratio": ratio, "delta_rel_l2": 0.5 if failing else 2e-3,
                              "outside_mask_max": 0.0, "ok": not failing})
    model = f"/models/xcomposer2-tiny{EVIL}" if evil else "/models/xcomposer2-tiny"
    return Report(
        status=status,
        engine={"kind": "turbomind", "lmdeploy_version": "0.7.1", "numeric": "bf16",
                "semantics": {"version": "0.7.1", "converter_writes_lora": True, "runtime_applies_plora": True,
                              "workspace_loads_lora": False,
                              "note": "serve from the HF folder: the workspace loader skips lora_a/lora_b"},
                "tp": 1},
        model=model,
        workspace="/tmp/ws/xcomposer2-tiny-tm",
        findings=findings,
        first_divergence=div,
        points=points,
        cases=cases,
        config_audit=config_audit,
        weights_audit=weights_audit,
        plora_table=plora,
        thresholds={"floor_factor": factor, "min_threshold": 1e-4, "cosine_min": 0.999},
        timings={"reference": 1.82, "engine": 0.94, "compare": 0.12},
        parity_version="0.1.0",
    )


def main(argv: list[str] | None = None) -> int:
    from parity.report import write_reports

    argv = list(sys.argv[1:] if argv is None else argv)
    clean = "--clean" in argv
    argv = [a for a in argv if a != "--clean"]
    out = argv[0] if argv else "reports/demo"
    paths = write_reports(demo_report(failing=not clean), out)
    for k, v in paths.items():
        print(f"{k}: {v}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
