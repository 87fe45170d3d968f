"""Deployment audit: what lmdeploy 0.7.1 would pick for a model folder, asked of lmdeploy itself, and whether
it fits the model.

One architecture string drives lmdeploy's weight reader and its vision loader (turbomind-plora.md §3):
`lmdeploy.archs.get_model_arch` (architectures[0], forced to InternLMXComposer2ForCausalLM by any auto_map
value naming it) -> `lmdeploy.turbomind.supported_models.SUPPORTED_ARCHS` (the reader; only 'xcomposer2'
reads PLoRA) and the vision registry (`VISION_MODELS`, the first `match(config)` wins, as in
`load_vl_model`). For 'xcomposer2', `get_xcomposer_type` picks the sub-type and with it the hard-coded LoRA
settings, which the source model's `model_info()` returns (parity's registered class, if
`register_lora_config()` ran in this process, returns parity_lora_config.json's).

The model side is read without building the model (`modelside`: safetensors headers, one decoder layer of
its code built alone, config.json), because a genuine XComposer2 downloads its ViT in `__init__` (a Qwen2
model's q/k/v count as one fused wqkv of rank r_q + r_k + r_v and scale 1.0, what a faithful conversion must
resolve). The verdict has three values: OK; PROBLEMS (an error finding: what lmdeploy would do diverges
from the model; exit 1 in the CLI, like any divergence); INCOMPLETE (no error found, but part of the model
side could not be read, listed in `incomplete`; exit 2: the folder could not be audited, never OK).
"""

from __future__ import annotations

import contextlib
import io
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..names import TM_LINEAR_OF
from ..points import PLORA_LINEARS
from ..records import Finding
from .lora import LORA_CONFIG_FILE, is_registered
from .modelside import TASK_LORAS
from ..reference.qwen2 import XCOMPOSER2_ARCH
from ..hfconfig import head_dim_of, hub_offline, read_hf_config, require_trusted_code

_SUB_TYPES = {"XCOMPOSER2": "7b", "XCOMPOSER2_4KHD": "4khd", "XCOMPOSER2D5": "2.5"}
LMDEPLOY_READER_HEAD_DIM = 128


@dataclass
class DeploymentAudit:
    model: str
    architecture: str | None                 # lmdeploy.archs.get_model_arch
    reader: str | None                       # SUPPORTED_ARCHS[architecture]: TurboMind's weight reader
    vision_model: str | None                 # the first VISION_MODELS entry whose match() accepts the config
    sub_type: str | None                     # get_xcomposer_type: "7b" | "4khd" | "2.5" (xcomposer2 reader only)
    sub_type_expected: str | None            # what the checkpoint's ixc_utils.py defines
    lora_config: dict[str, Any] | None       # what the converter would write to config.yaml
    lora_registered: bool                    # parity's register_lora_config() active in this process
    model_family: str | None                 # "xcomposer2" | "qwen2-plora" | None
    model_linears: dict[str, dict[str, Any]] = field(default_factory=dict)   # canonical -> {rank, scale, layers}
    engine_linears: dict[str, dict[str, Any]] = field(default_factory=dict)  # canonical -> {rank, scale, layers}
    qkv_bias: bool = False
    head_dim: int | None = None
    findings: list[Finding] = field(default_factory=list)
    table: list[dict[str, Any]] = field(default_factory=list)  # {item, lmdeploy, model, ok, note}
    vision_path: dict[str, Any] = field(default_factory=dict)  # the model's image path (modelside.vision_path)
    task_loras: dict[str, int] = field(default_factory=dict)   # XComposer2.5 task LoRA -> linears carrying it
    model_read: list[str] = field(default_factory=list)        # what the model side was read from
    incomplete: list[str] = field(default_factory=list)        # what could not be inspected, and why

    @property
    def status(self) -> str:
        """"PROBLEMS" (an error finding), "INCOMPLETE" (none, but not everything could be read) or "OK"."""
        if any(f.severity == "error" for f in self.findings):
            return "PROBLEMS"
        return "INCOMPLETE" if self.incomplete else "OK"

    @property
    def ok(self) -> bool:
        return self.status == "OK"

    @property
    def exit_code(self) -> int:
        """The CLI's: 0 OK, 1 PROBLEMS (a divergence), 2 INCOMPLETE (the folder could not be audited)."""
        return {"OK": 0, "PROBLEMS": 1, "INCOMPLETE": 2}[self.status]

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["ok"] = self.ok
        d["status"] = self.status
        return d

    def summary(self) -> str:
        lines = [f"Deployment audit of {self.model} with lmdeploy 0.7.1: {self.status}"]
        for row in self.table:
            mark = "ok " if row["ok"] else "BAD"
            note = f"  ({row['note']})" if row.get("note") else ""
            lines.append(f"  [{mark}] {row['item']}: lmdeploy {row['lmdeploy']!s} | model {row['model']!s}{note}")
        for f in self.findings:
            lines.append(f"  {f.severity}: {f.cause}: {f.message}")
        if self.incomplete:
            lines.append("  INCOMPLETE: the model side could not be fully inspected, so this audit cannot say OK: "
                         + "; ".join(self.incomplete) + ".")
        return "\n".join(lines)


# ------------------------------------------------------------------------------------------ lmdeploy's side


def _quiet():
    stack = contextlib.ExitStack()
    stack.enter_context(contextlib.redirect_stdout(io.StringIO()))
    stack.enter_context(contextlib.redirect_stderr(io.StringIO()))
    lg = logging.getLogger("lmdeploy")
    level = lg.level
    lg.setLevel(logging.ERROR)
    stack.callback(lg.setLevel, level)
    return stack


def _lmdeploy_view(path: str) -> dict[str, Any]:
    """Ask lmdeploy: arch, reader, vision model, sub-type, lora_config (or the error it raised)."""
    from ..deploy.compat import cpu_converter_patches

    out: dict[str, Any] = {"errors": []}
    with cpu_converter_patches(), _quiet():
        from lmdeploy.archs import get_model_arch
        from lmdeploy.turbomind.deploy.config import LoraConfig, config_from_dict, config_to_dict
        from lmdeploy.turbomind.deploy.source_model.base import INPUT_MODELS
        from lmdeploy.turbomind.supported_models import SUPPORTED_ARCHS

        arch, hf_config = get_model_arch(path)
        out["arch"] = arch
        out["reader"] = SUPPORTED_ARCHS.get(arch)
        try:
            import lmdeploy.vl.model.builder  # noqa: F401 - registers every vision model, in lmdeploy's order
            from lmdeploy.vl.model.base import VISION_MODELS

            out["vision"] = None
            for name, module in VISION_MODELS.module_dict.items():
                try:
                    if module.match(hf_config):
                        out["vision"] = name
                        break
                except Exception as e:  # a match() that cannot read this config: lmdeploy would raise too
                    out["errors"].append(f"vision model {name}.match raised {type(e).__name__}: {e}")
                    break
        except Exception as e:  # pragma: no cover - vision stack not importable
            out["vision"] = None
            out["errors"].append(f"lmdeploy's vision registry could not be imported ({type(e).__name__}: {e})")
        out["sub_type"] = None
        if out["reader"] == "xcomposer2":
            from lmdeploy.vl.model.xcomposer2 import get_xcomposer_type

            mt = get_xcomposer_type(path)[0]
            out["sub_type"] = _SUB_TYPES.get(mt.name, mt.name.lower())
        out["lora_config"] = None
        if out["reader"] is not None:
            try:
                source = INPUT_MODELS.get(out["reader"])(model_path=path, tokenizer_path=path, input_policy=None)
                info = source.model_info()
                base = config_to_dict(LoraConfig())
                base.update({k: v for k, v in info.items() if k in base})
                out["lora_config"] = config_to_dict(config_from_dict(LoraConfig, base))
                out["attn_bias"] = int(info.get("attn_bias", 0) or 0)  # what Attn.apply exports biases by
            except Exception as e:
                out["errors"].append(f"lmdeploy's '{out['reader']}' source model failed on this folder "
                                     f"({type(e).__name__}: {e})")
    return out


# ------------------------------------------------------------------------------------------ the model's side


def _model_view(path: str, cfg: dict) -> dict[str, Any]:
    """Per canonical linear and layer: (rank, scale); the qkv bias; the vision path; task LoRAs; gaps."""
    from .modelside import read_model_side

    with _quiet():
        side = read_model_side(Path(path), cfg)
    return {"linears": side.linears, "bias": side.bias, "vision": bool(side.vision), "side": side,
            "error": "; ".join(side.missing) or None}


def _expected_sub_type(path: Path) -> str | None:
    from ..deploy.convert import ixc_expected

    return ixc_expected(path)[0]


def _group(values: dict[tuple[int, str], tuple[int, float]]) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for linear in PLORA_LINEARS:
        per = {layer: v for (layer, lin), v in values.items() if lin == linear}
        if not per:
            continue
        distinct = sorted(set(per.values()))
        out[linear] = {"rank": distinct[0][0] if len(distinct) == 1 else [d[0] for d in distinct],
                       "scale": distinct[0][1] if len(distinct) == 1 else [d[1] for d in distinct],
                       "layers": len(per)}
    return out


def audit_deployment(model_dir: str | Path, *, trust_remote_code: bool = False) -> DeploymentAudit:
    """What lmdeploy 0.7.1 would do with `model_dir` (its own resolution functions) and whether it fits.

    lmdeploy runs the folder's remote code (config and, for XComposer2, ixc_utils.py and the model class for
    the vision part); so does this audit, on the meta device: pass `trust_remote_code=True` when the
    config has an auto_map.
    """
    path = Path(model_dir).resolve()
    cfg = read_hf_config(path, "a Hugging Face model folder to audit")
    if cfg.get("auto_map"):
        require_trusted_code(path, trust_remote_code, "lmdeploy runs when it resolves the architecture and the "
                             "vision model (auto_map in config.json), and so does this audit")
    hub_offline()
    from ..reference.loader import model_family

    lm = _lmdeploy_view(str(path))
    mv = _model_view(str(path), cfg)
    try:
        head_dim = head_dim_of(cfg)
    except (KeyError, TypeError, ValueError, ZeroDivisionError):  # the audit reports what it can read
        head_dim = 0
    audit = DeploymentAudit(
        model=str(path), architecture=lm["arch"], reader=lm["reader"], vision_model=lm.get("vision"),
        sub_type=lm["sub_type"], sub_type_expected=_expected_sub_type(path), lora_config=lm["lora_config"],
        lora_registered=is_registered(), model_family=model_family(cfg),
        model_linears=_group(mv["linears"]), qkv_bias=mv["bias"], head_dim=head_dim,
        vision_path=mv["side"].vision, task_loras=mv["side"].task_loras, model_read=mv["side"].read,
        incomplete=list(mv["side"].missing),
    )
    _judge(audit, cfg, lm, mv, path)
    return audit


def _finding(audit: DeploymentAudit, severity: str, cause: str, message: str, **kw: Any) -> None:
    audit.findings.append(Finding(check="deployment", severity=severity, cause=cause, message=message, **kw))


def _judge(audit: DeploymentAudit, cfg: dict, lm: dict, mv: dict, path: Path) -> None:
    from ..deploy.lora_config import resolve
    from ..deploy.workspace import LoraSettings

    declared = (cfg.get("architectures") or [None])[0]
    has_plora = bool(mv["linears"])
    row = audit.table.append
    for err in lm["errors"]:
        _finding(audit, "error", "config_mismatch", f"{err}.")
    _judge_model_side(audit, mv["side"], cfg)

    # architecture and reader
    ok_reader = audit.reader == "xcomposer2" or not has_plora
    row({"item": "architecture", "lmdeploy": audit.architecture, "model": declared,
         "ok": audit.reader is not None, "note": "get_model_arch (auto_map naming XComposer2 forces it)"})
    row({"item": "weight reader", "lmdeploy": audit.reader, "model": "PLoRA" if has_plora else "no PLoRA",
         "ok": audit.reader is not None and ok_reader, "note": "only 'xcomposer2' reads Plora_A/Plora_B"})
    if audit.reader is None:
        _finding(audit, "error", "config_mismatch",
                 f"lmdeploy resolves the architecture to {audit.architecture!r}, which is not in TurboMind's "
                 "SUPPORTED_ARCHS: `lmdeploy convert` and the TurboMind backend refuse this folder. "
                 + ("For a Qwen2-based PLoRA model, disguise it as XComposer2 (parity disguise)." if
                    audit.model_family == "qwen2-plora" else ""))
    elif has_plora and audit.reader != "xcomposer2":
        _finding(audit, "error", "lora_not_applied", layer=0, module="attention.wqkv", positions="image",
                 message=(f"Architecture conflict: lmdeploy maps {audit.architecture!r} to its '{audit.reader}' "
                          "reader, which has no PLoRA: the Plora_A/Plora_B tensors are ignored and the conversion "
                          "succeeds silently, so image rows run without their LoRA. Only "
                          f"{XCOMPOSER2_ARCH} gets PLoRA (and the XComposer2 vision loader)"
                          + ("; disguise the model (parity disguise)." if audit.model_family == "qwen2-plora" else ".")))

    # vision
    wants_vision = mv["vision"]
    ok_vision = (audit.vision_model == "Xcomposer2VisionModel") if wants_vision else True
    row({"item": "vision model", "lmdeploy": audit.vision_model, "model": "vit + vision_proj" if wants_vision else "-",
         "ok": ok_vision, "note": "first VISION_MODELS match()"})
    if wants_vision and not ok_vision:
        _finding(audit, "error", "config_mismatch",
                 f"lmdeploy's vision loader picks {audit.vision_model or 'no vision model'} for this config, but the "
                 "model's image path is XComposer2's (vit + vision_proj): lmdeploy would not compute its image "
                 "features (Xcomposer2VisionModel.match needs the XComposer2 architecture or auto_map).")

    # sub-type (the 4KHD trap)
    if audit.reader == "xcomposer2":
        ok_sub = audit.sub_type_expected is None or audit.sub_type == audit.sub_type_expected
        row({"item": "xcomposer2 sub-type", "lmdeploy": audit.sub_type, "model": audit.sub_type_expected or "7b",
             "ok": ok_sub, "note": "get_xcomposer_type imports ixc_utils.py and swallows failures"})
        if not ok_sub:
            _finding(audit, "error", "config_mismatch", layer=0, module="attention.wqkv", positions="image",
                     message=(f"Sub-type trap: {path / 'ixc_utils.py'} defines the XComposer2-{audit.sub_type_expected} "
                              f"entry point, but lmdeploy's get_xcomposer_type could not import it and answers "
                              f"{audit.sub_type}: it writes that sub-type's LoRA settings and vision preprocessing. "
                              "Fix the import (e.g. a torchvision matching torch) before converting."))

    # LoRA settings
    registered_note = ""
    if (path / LORA_CONFIG_FILE).is_file() and not audit.lora_registered:
        registered_note = (f" The folder has {LORA_CONFIG_FILE}, but parity.disguise.register_lora_config() is not "
                           "active in this process, so lmdeploy uses its hard-coded settings: call it in the "
                           "converting/serving process.")
    if audit.lora_config is not None:
        row({"item": "lora_config written", "lmdeploy": audit.lora_config,
             "model": "per linear below" if has_plora else "-",
             "ok": not has_plora or audit.lora_config.get("lora_policy") == "plora",
             "note": "parity's registered class" if audit.lora_registered and audit.reader == "xcomposer2" else
             "lmdeploy's own model_info()"})
    if audit.reader == "xcomposer2" and audit.lora_config is not None and has_plora:
        lora = LoraSettings(**audit.lora_config)
        if lora.lora_policy != "plora":
            _finding(audit, "error", "lora_not_applied", layer=0, module="attention.wqkv", positions="image",
                     message=f"lora_policy would be {lora.lora_policy!r}, not 'plora': no partial LoRA at all.")
        engine = {k: resolve(lora, k[0], TM_LINEAR_OF[k[1]]) for k in mv["linears"]}
        audit.engine_linears = _group(engine)
        for linear in PLORA_LINEARS:
            keys = sorted(k for k in mv["linears"] if k[1] == linear)
            if not keys:
                continue
            bad_r = [k[0] for k in keys if engine[k][0] != mv["linears"][k][0]]
            bad_s = [k[0] for k in keys if k[0] not in bad_r and
                     abs(engine[k][1] - mv["linears"][k][1]) > 1e-6 * max(1.0, abs(mv["linears"][k][1]))]
            k0 = keys[0]
            row({"item": f"lora {linear}", "lmdeploy": engine[k0], "model": mv["linears"][k0],
                 "ok": not bad_r and not bad_s, "note": f"layers {len(keys)}"})
            for bad, i, what, effect in (
                    (bad_r, 0, "rank", "TurboMind fails at load (byte-size check)."),
                    (bad_s, 1, "scale", "accepted silently, the image rows' LoRA is scaled wrongly.")):
                if bad:
                    k = (bad[0], linear)
                    got, want = engine[k][i], mv["linears"][k][i]
                    _finding(audit, "error", f"lora_{what}_mismatch", layer=bad[0], module=linear, positions="image",
                             metrics={"layers": bad, "model": want, "engine": got},
                             message=(f"TurboMind would resolve LoRA {what} {got:g} for {TM_LINEAR_OF[linear]}, but "
                                      f"the model's is {want:g} (layers {bad}): {effect}" + registered_note))

    # what the xcomposer2 reader cannot carry
    if audit.reader in ("xcomposer2", "internlm2"):
        exported = bool(lm.get("attn_bias"))
        row({"item": "qkv bias", "lmdeploy": "exported (attn_bias 1)" if exported else "dropped (attn_bias 0)",
             "model": audit.qkv_bias, "ok": exported or not audit.qkv_bias,
             "note": "exported only with attn_bias = 1 (parity's registration sets it for a disguise with biases)"})
        if audit.qkv_bias and not exported:
            _finding(audit, "error", "bias_dropped", layer=0, module="attention.wqkv", positions="all",
                     message=("The model's wqkv (q/k/v) has a bias, but lmdeploy's xcomposer2 reader leaves attn_bias = 0 "
                              "and never exports it: TurboMind computes q/k/v without them. Convert and serve a parity "
                              "disguise with parity's registration active (parity convert / parity lmdeploy -- ...)."))
        row({"item": "head_dim", "lmdeploy": LMDEPLOY_READER_HEAD_DIM, "model": audit.head_dim,
             "ok": audit.head_dim == LMDEPLOY_READER_HEAD_DIM, "note": "wqkv split hard-codes 128"})
        if audit.head_dim != LMDEPLOY_READER_HEAD_DIM:
            _finding(audit, "error", "shape_mismatch", layer=0, module="attention.wqkv", positions="all",
                     message=(f"head_dim is {audit.head_dim}, but lmdeploy's reader splits wqkv with a hard-coded 128 "
                              "(view(kv_heads, gs + 2, 128, -1)): q/k/v are scrambled without an error."))


def _judge_model_side(audit: DeploymentAudit, side, cfg: dict) -> None:
    """Rows and findings from the model's own description: every PLoRA linear, the vision path, task LoRAs."""
    row = audit.table.append
    for linear, g in audit.model_linears.items():
        row({"item": f"model {linear}", "lmdeploy": "-", "model": f"rank {g['rank']}, scale {g['scale']}",
             "ok": True, "note": f"{g['layers']} layers; rank from the checkpoint, scale from the code"})
    for conflict in side.rank_conflicts:
        layer = int(conflict.split()[1])
        linear = conflict.split()[2].rstrip(":")
        _finding(audit, "error", "lora_rank_mismatch", layer=layer, module=linear, positions="image",
                 message=(f"The checkpoint and the model's code disagree on a PLoRA rank ({conflict}): transformers "
                          "refuses to load it (size mismatch), and a converted workspace carries the checkpoint's."))
    v = side.vision
    if v:
        hubs = ", ".join(f"{h} {st}" for h, st in v["hub_ids"].items()) or "built from config.json"
        row({"item": "vision path", "lmdeploy": "-",
             "model": (f"CLIP ViT ({v['vit_layers']} layers, width {v['vit_width']}, patch {v['patch_size']}, "
                       f"positions {v['position_grid']} = {v['pixels']} px) -> vision_proj {v['projector']}; "
                       + (f"{v['rows_per_image']} rows per {v['pixels']}-px image" if v["merge"] == 1 else
                          f"{v['rows_per_image'] // 4} rows per {v['pixels']}-px tile (2x2-merged patches)")
                       + (f"; separators {', '.join(v['separators'])}" if v["separators"] else "")),
             "ok": v["img_size"] in (None, v["pixels"]) or bool(v["separators"]),
             "note": f"img_size {v['img_size']}; vision tower: {hubs}"})
        if v["img_size"] is not None and v["img_size"] != v["pixels"] and not v["separators"]:
            _finding(audit, "error", "config_mismatch", positions="image",
                     message=(f"config.json's img_size is {v['img_size']}, but the checkpoint's ViT position table is "
                              f"{v['position_grid']} patches of {v['patch_size']} px = {v['pixels']} px: images resized "
                              f"to {v['img_size']} px cannot go through it (lmdeploy resizes to img_size)."))
        width_in = int(str(v["projector"]).split(" -> ")[0]) if v["projector"] else None
        if width_in is not None and width_in != v["merge"] * v["vit_width"]:
            merged = f" ({v['merge']} x that after the 2x2 patch merge)" if v["merge"] != 1 else ""
            _finding(audit, "error", "shape_mismatch", positions="image",
                     message=(f"vision_proj takes {width_in} features, but the checkpoint's ViT is {v['vit_width']} "
                              f"wide{merged}: image features cannot be projected."))
        for hub_id, st in v["hub_ids"].items():
            if st.startswith("MISSING"):
                _finding(audit, "warning", "config_mismatch", positions="image",
                         message=(f"The model's code loads {hub_id} by hub id when it is built, and it is not in this "
                                  "machine's offline Hugging Face cache: `parity run` stops with MissingHubModel and "
                                  "lmdeploy's vision loader (CLIPVisionConfig.from_pretrained) fails too. Set HF_HOME "
                                  "to a cache holding it, or pass --hub-model ID=PATH to parity."))
    if side.task_loras:
        kinds = ", ".join(f"{k} ({n} linears)" for k, n in sorted(side.task_loras.items()))
        tasks = sorted({TASK_LORAS[k] for k in side.task_loras})
        row({"item": "XComposer2.5 task LoRAs", "lmdeploy": "ignored", "model": kinds, "ok": False,
             "note": "merge per task before converting"})
        _finding(audit, "warning", "lora_not_applied", positions="image",
                 message=(f"The checkpoint carries XComposer2.5 task LoRAs that were not merged: {kinds}. lmdeploy's "
                          "converter ignores them, so TurboMind serves the base chat model only. For the "
                          f"{'/'.join(tasks)} task, merge them first with lmdeploy's "
                          "lmdeploy/vl/tools/merge_xcomposer2d5_task.py SRC DST --task "
                          f"{'|'.join(tasks)} (it writes fp16) and convert and compare the merged folder."))
