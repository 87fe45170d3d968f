"""Who is to blame: a NaN that is already in the HF checkpoint is the reference's fault (named as such), not a
conversion error, while the same NaN written into the workspace alone stays a workspace fault."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from parity.api import run
from parity.deploy.convert import convert
from parity.deploy.workspace import Workspace
from parity.fixtures import FixtureSpec, write_model
from parity.fixtures.generator import TOKENIZER_SIZE

SMALL = FixtureSpec(name="attribution", layers=2, heads=2, kv_heads=1, intermediate=128, vocab=TOKENIZER_SIZE,
                    vision_layers=1, vision_hidden=16, image_size=14, patch_size=7)


@pytest.fixture(scope="module")
def nan_checkpoint(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("attribution")
    model = write_model(SMALL, root / "model-nan")
    sd = load_file(model / "model.safetensors")
    sd["model.layers.1.feed_forward.w2.weight"].reshape(-1)[7] = float("nan")
    save_file(sd, model / "model.safetensors", metadata={"format": "pt"})
    convert(model, root / "ws")  # lmdeploy copies the NaN like every other value
    return model, root / "ws"


def test_nan_in_the_hf_checkpoint_is_blamed_on_the_reference(nan_checkpoint, tmp_path):
    model, ws = nan_checkpoint
    report = run(model, trust_remote_code=True, workspace=ws, cache_dir=tmp_path / "cache")
    d = report.first_divergence
    assert report.status == "fail" and d.cause == "nonfinite" and (d.layer, d.module) == (1, "feed_forward.w2")
    assert "reference is broken, not the conversion" in d.message and "HF checkpoint" in d.message
    assert not any("differs from the HF tensor" in f.message for f in report.findings)
    row = next(r for r in report.weights_audit if r["tensor"] == "layers.1.feed_forward.w2.weight")
    assert row["status"] == "nonfinite in checkpoint"


def test_nan_only_in_the_workspace_is_still_the_conversions(nan_checkpoint, tmp_path):
    """The control: a clean checkpoint whose workspace alone has the NaN."""
    import shutil

    model, ws = nan_checkpoint
    clean = tmp_path / "model-clean"
    shutil.copytree(model, clean)
    sd = load_file(clean / "model.safetensors")
    sd["model.layers.1.feed_forward.w2.weight"] = sd["model.layers.1.feed_forward.w2.weight"].nan_to_num(0.0)
    save_file(sd, clean / "model.safetensors", metadata={"format": "pt"})
    ws2 = tmp_path / "ws"
    convert(clean, ws2)
    w = Workspace.open(ws2)
    t = w.tensor("layers.1.feed_forward.w2.weight").clone()
    t.reshape(-1)[3] = float("nan")
    w.file_path("layers.1.feed_forward.w2.weight", 0).write_bytes(t.contiguous().view(torch.uint8).numpy().tobytes())
    report = run(clean, trust_remote_code=True, workspace=ws2, cache_dir=tmp_path / "cache")
    d = report.first_divergence
    assert d.cause == "nonfinite" and (d.layer, d.module) == (1, "feed_forward.w2")
    assert "differs from the HF tensor" in d.message and "reference is broken" not in d.message
