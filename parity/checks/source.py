"""Was the workspace converted from this model? A workspace of another model differs in every tensor, so without
this check its run lists a weights finding per tensor and a hidden finding per module; with it, one error names
both models and the verdict groups the rest under it (`parity.verdict`).

With a conversion record (parity-conversion.json, written by `parity convert`) the source model's fingerprint
is compared with the given model's (`parity.deploy.source`); a workspace converted by lmdeploy directly has no
record, and then the size fields lmdeploy copies from config.json into config.yaml are compared instead. The
config audit's table says which comparison was made."""

from __future__ import annotations

from ..deploy.source import fingerprint_differences, fingerprint_words, model_fingerprint
from ..records import Finding
from .base import CheckContext, CheckOutput

CAUSE = "workspace_from_other_model"
# config.yaml field -> the config.json field lmdeploy copies it from (unchanged by any conversion setting)
COPIED = (("hidden_units", "hidden_size"), ("num_layer", "num_hidden_layers"), ("vocab_size", "vocab_size"))


def _finding(message: str, metrics: dict) -> Finding:
    return Finding(check="source", severity="error", cause=CAUSE, positions="all", message=message, metrics=metrics)


def run(ctx: CheckContext) -> CheckOutput:
    out = CheckOutput()
    ws = ctx.workspace
    if ws is None or ctx.model is None:
        return out
    record = ws.conversion_record()
    if record is not None and record.source:
        current = model_fingerprint(ctx.model)
        differ = fingerprint_differences(record.source, current)
        out.table.append({"field": "source model", "hf": fingerprint_words(current),
                          "engine": fingerprint_words(record.source), "ok": not differ,
                          "note": "conversion record's fingerprint: shape and sampled tensors compared"})
        if differ:
            out.findings.append(_finding(
                f"The workspace {ws.root} was converted from another model: its conversion record names "
                f"{record.model} ({fingerprint_words(record.source)}), and the model given is {ctx.model} "
                f"({fingerprint_words(current)}); they differ: {'; '.join(differ)}. Every difference below "
                "follows from that: convert this model, or pass the workspace converted from it.",
                {"recorded_model": record.model, "model": str(ctx.model), "differences": differ}))
        return out
    cfg = ctx.hf_config
    pairs = [(tm, hf, getattr(ws.model, tm, None), cfg.get(hf)) for tm, hf in COPIED]
    differ = [f"{tm} {eng} vs {hf} {want}" for tm, hf, eng, want in pairs if want is not None and eng != want]
    compared = ", ".join(f"{tm}/{hf}" for tm, hf, _, _ in pairs)
    norms = _norms_differ(ctx)
    if norms is not None:
        compared += f", and the {norms[1]} norm weights (copied unchanged by the converter)"
        if norms[0] == norms[1]:
            differ.append(f"all {norms[1]} norm weights hold other values")
    out.table.append({"field": "source model", "hf": {hf: want for _, hf, _, want in pairs},
                      "engine": {tm: eng for tm, _, eng, _ in pairs}, "ok": not differ,
                      "note": f"no conversion record: compared config.yaml with config.json ({compared})"})
    if differ:
        out.findings.append(_finding(
            f"The workspace {ws.root} was converted from another model: it has no conversion record (converted by "
            f"lmdeploy directly), so it was compared with {ctx.model} ({compared}), and they differ: "
            f"{'; '.join(differ)}. Convert this model, or pass the workspace converted from it.",
            {"model": str(ctx.model), "differences": differ}))
    return out


def _norms_differ(ctx: CheckContext) -> tuple[int, int] | None:
    """(norm weights that differ, norm weights compared) between the workspace and the model; None when fewer
    than two can be compared. A conversion bug misplaces one; another model's workspace has none equal."""
    import torch

    ws, hf = ctx.workspace, ctx.hf_tm_tensors
    if hf is None:
        return None
    names = [n for n in ws.names() if (n == "norm.weight" or n.endswith("_norm.weight")) and n in hf]
    if len(names) < 2:
        return None
    differ = 0
    for n in names:
        got = ws.tensor(n)
        differ += int(tuple(got.shape) != tuple(hf[n].shape) or not torch.equal(got, hf[n].to(got.dtype)))
    return differ, len(names)
