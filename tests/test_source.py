"""A workspace converted from another model: one error finding that names both models
(`workspace_from_other_model`, parity.checks.source) with every consequent difference grouped under it, from
the source fingerprint `parity convert` records, or without a record from config.yaml's sizes and the norm
weights the converter copies unchanged."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import pytest

from parity.deploy.convert import convert
from parity.deploy.workspace import RECORD_NAME, load_record
from parity.fixtures import BUILTIN_SPECS, write_model
from parity.pipeline import RunOptions, run_parity
from parity.reference.session import ReferenceSession
from parity.report import render_failure_message

CAUSE = "workspace_from_other_model"


@pytest.fixture(scope="module")
def folders(tmp_path_factory, fixture_models):
    """Model A (the tiny fixture), its own workspace, and workspaces of two other models: B has A's shape and
    other weights (another fine-tune), C one layer fewer."""
    root = tmp_path_factory.mktemp("source")
    out = {"A": fixture_models["xcomposer2-tiny"]}
    convert(out["A"], root / "ws-A")
    for name, kw in (("B", dict(seed=7)), ("C", dict(seed=7, layers=2))):
        model = write_model(replace(BUILTIN_SPECS["xcomposer2-tiny"], name=f"other-{name}", **kw), root / f"m-{name}")
        convert(model, root / f"ws-{name}")
        bare = root / f"ws-{name}-bare"   # as `lmdeploy convert` leaves it: no parity-conversion.json
        shutil.copytree(root / f"ws-{name}", bare)
        (bare / RECORD_NAME).unlink()
    return out, root


@pytest.fixture(scope="module")
def session(folders):
    s = ReferenceSession(folders[0]["A"], trust_remote_code=True)
    yield s
    s.close()


def _run(folders, session, ws: str):
    models, root = folders
    return run_parity(RunOptions(model=models["A"], workspace=root / ws, trust_remote_code=True, session=session))


def _one_root(report):
    source = [f for f in report.errors() if f.check == "source"]
    assert len(source) == 1 and source[0].cause == CAUSE
    assert len(report.groups) == 1 and report.findings[report.groups[0].root] is source[0]
    assert report.first_divergence.cause == CAUSE
    assert len(report.errors()) > 50          # every tensor and module differs, all under the one root
    return source[0]


def test_the_record_holds_the_source_fingerprint(folders):
    _, root = folders
    doc = json.loads((root / "ws-A" / RECORD_NAME).read_text())
    assert doc["source"]["shape"]["num_hidden_layers"] == 3 and doc["source"]["shape"]["hidden_size"] == 512
    assert "model.norm.weight" in doc["source"]["tensors"]
    del doc["source"]   # a record written before the fingerprint was kept still loads
    old = root / "old-record.json"
    old.write_text(json.dumps(doc))
    assert load_record(old).source == {}


def test_own_workspace_is_recognised(folders, session):
    report = _run(folders, session, "ws-A")
    assert report.status == "pass" and not report.errors()
    row = report.config_audit[0]
    assert row["field"] == "source model" and row["ok"] and "fingerprint" in row["note"]


def test_other_fine_tune_is_one_finding_naming_both(folders, session):
    models, root = folders
    report = _run(folders, session, "ws-B")
    f = _one_root(report)
    assert str(root / "m-B") in f.message and str(models["A"]) in f.message
    assert "sampled tensors hold other values" in f.message
    msg = render_failure_message(report)
    assert f"[{CAUSE}]" in msg and sum(line.startswith("  - ") for line in msg.splitlines()) == 1


def test_without_a_record_the_norm_weights_tell(folders, session):
    report = _run(folders, session, "ws-B-bare")
    f = _one_root(report)
    assert "no conversion record" in f.message and "norm weights hold other values" in f.message
    assert "no conversion record" in report.config_audit[0]["note"]


@pytest.mark.parametrize("ws", ["ws-C", "ws-C-bare"])
def test_other_depth_is_named(folders, session, ws):
    report = _run(folders, session, ws)
    f = _one_root(report)
    assert ("num_hidden_layers 2 vs 3" in f.message) if ws == "ws-C" else ("num_layer 2 vs num_hidden_layers 3"
                                                                           in f.message)
