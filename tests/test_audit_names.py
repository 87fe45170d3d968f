"""The weights audit names each tensor as both sides spell it: the workspace file a user finds in
triton_models/weights (with its tensor-parallel rank) and the HF checkpoint's tensor, in report.json, the HTML
page, the terminal summary and the finding's message."""

from __future__ import annotations

import io
import json

import pytest
from conftest import catalogue_harness
from rich.console import Console

from parity.checks.weights import tensor_names
from parity.deploy.workspace import Workspace
from parity.faults import CATALOGUE, run_fault
from parity.names import hf_name_of_tm
from parity.report.html_report import render_html
from parity.report.json_report import report_to_json
from parity.report.terminal import print_summary

FILE = "layers.2.feed_forward.w1.lora_b.0.weight"
HF = "model.layers.2.feed_forward.w1.Plora_B.weight"


@pytest.fixture(scope="module")
def harness(fixture_models):
    yield from catalogue_harness(fixture_models, ["xcomposer2-tiny", "qwen2-plora-tiny"])


def test_every_workspace_tensor_has_its_file_and_checkpoint_name(harness):
    models, workspaces, sessions, _ = harness
    ws = Workspace.open(workspaces["xcomposer2-tiny"])
    on_disk = {p.name for p in ws.weights_dir.iterdir()}
    checkpoint = set(sessions["xcomposer2-tiny"].ref.xcomposer2_state_dict())
    for name in ws.names():
        names = tensor_names(name, ws.model.tp)
        assert set(names["file"].split(", ")) <= on_disk, name
        assert hf_name_of_tm(name) == names["hf_tensor"] in checkpoint, name


def test_file_names_carry_every_rank():
    assert tensor_names("layers.0.attention.w_qkv.weight", 2)["file"] == \
        "layers.0.attention.w_qkv.0.weight, layers.0.attention.w_qkv.1.weight"
    assert tensor_names("layers.1.ffn_norm.weight", 2)["file"] == "layers.1.ffn_norm.weight"
    assert tensor_names("tok_embeddings.weight", 1) == {"tensor": "tok_embeddings.weight", "file": "tok_embeddings.0.weight",
                                                   "hf_tensor": "model.tok_embeddings.weight"}


def test_a_mismatch_is_named_both_ways_in_every_output(harness):
    models, workspaces, sessions, cache = harness
    fault = next(f for f in CATALOGUE if f.name == "plora_b_scaled")
    report = run_fault(fault, models, workspaces, sessions, cache).report
    row = next(r for r in report.weights_audit if r["status"] == "mismatch")
    assert (row["file"], row["hf_tensor"]) == (FILE, HF)
    finding = next(f for f in report.errors() if f.check == "weights")
    assert FILE in finding.message and HF in finding.message
    assert (finding.metrics["file"], finding.metrics["hf_tensor"]) == (FILE, HF)
    doc = json.loads(report_to_json(report))
    assert {"file": FILE, "hf_tensor": HF}.items() <= next(
        r for r in doc["weights_audit"] if r["status"] == "mismatch").items()
    weights = render_html(report, inline_plotlyjs=False).split('id="weights"')[1]
    assert FILE in weights and HF in weights
    con = Console(record=True, width=400, file=io.StringIO())
    print_summary(report, con)
    out = con.export_text()
    assert FILE in out and HF in out


def test_qwen2_audit_names_the_originals_tensors(harness):
    """A Qwen2 PLoRA model is converted through its disguise; the audit names the original's tensors."""
    from parity.checkpoint import load_state

    models, workspaces, _, _ = harness
    ws = Workspace.open(workspaces["qwen2-plora-tiny"])
    original = set(load_state(models["qwen2-plora-tiny"]))
    for name in ws.names():
        hf = tensor_names(name, ws.model.tp, qwen2=True)["hf_tensor"]
        parts = [hf.replace("{q,k,v}", x) for x in "qkv"] if "{q,k,v}" in hf else [hf]
        if hf.endswith("o_proj.bias"):  # Qwen2 has none: the disguise writes zeros TurboMind adds (disguise.writer)
            continue
        assert set(parts) <= original, (name, hf)
