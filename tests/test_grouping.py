"""One fault, one group: the findings every check raises about one injected fault are linked to one root cause
(`parity.verdict.group_findings`), shown root first in report.json, the HTML page, the terminal summary and the
pytest message; the verdict does not change."""

from __future__ import annotations

import io
import json

import pytest
from conftest import catalogue_harness
from hypothesis import given, settings
from hypothesis import strategies as st
from rich.console import Console

from parity.faults import CATALOGUE, Expected, run_fault
from parity.points import LAYER_POINTS
from parity.records import CAUSES, Finding
from parity.report import render_failure_message
from parity.report.html_report import render_html
from parity.report.json_report import report_to_json
from parity.report.terminal import print_summary
from parity.verdict import decide, group_findings

# faults whose one cause shows as several error findings (weights + PLoRA + hidden, several linears or layers,
# the files a wrong rank or group size mis-sizes and the engine's refusal, a decode step and the token it
# changes, the smoothing AWQ applied in every layer)
MANY = ["plora_b_scaled", "linears_swapped", "lora_scale_all", "lora_rank_one_linear", "nonfinite_weight",
        "ranges_shifted_by_one", "lora_policy_missing", "kv_int4_wrong_scale", "rope_base_past_prompt",
        "awq_group_size_wrong", "plora_smoothing_not_compensated", "lora_pattern_does_not_match", "hd_image_placement"]


@pytest.fixture(scope="module")
def harness(fixture_models):
    yield from catalogue_harness(fixture_models, sorted({f.model for f in CATALOGUE if f.name in MANY}))


def _run(name, harness):
    models, workspaces, sessions, cache = harness
    fault = next(f for f in CATALOGUE if f.name == name)
    return fault, run_fault(fault, models, workspaces, sessions, cache)


@pytest.mark.parametrize("name", MANY)
def test_one_fault_is_one_group_rooted_at_its_cause(name, harness):
    fault, result = _run(name, harness)
    report = result.report
    errors = report.errors()
    assert result.got == fault.expected                      # the verdict is unchanged
    assert len(errors) > 1, f"{name}: a single finding needs no grouping"
    assert len(report.groups) == 1, [(report.findings[g.root].check, report.findings[g.root].cause)
                                     for g in report.groups]
    group = report.groups[0]
    assert sorted((group.root, *group.related)) == [i for i, f in enumerate(report.findings) if f.severity == "error"]
    root = report.findings[group.root]
    assert Expected(root.layer, root.module, root.positions, root.cause, root.step) == fault.expected
    doc = json.loads(report_to_json(report))
    assert doc["groups"] == [{"root": group.root, "related": list(group.related)}]


def test_every_output_shows_the_root_with_what_it_explains(harness):
    _, result = _run("lora_scale_all", harness)
    report = result.report
    n = len(report.errors())
    assert n == 35  # config for 5 linears, PLoRA delta and hidden state for 15 (3 layers)
    msg = render_failure_message(report).splitlines()
    assert f"{n} error(s)" in msg[0] and "1 root cause(s)" in msg[0]
    roots = [line for line in msg if line.startswith("  - ")]
    assert len(roots) == 1 and "[lora_scale_mismatch]" in roots[0] and "layer 0, attention.wqkv" in roots[0]
    assert "+34 related: 15 plora, 15 hidden, 4 config; layers 0–2" in roots[0]
    for width in (200, 80):
        con = Console(record=True, width=width, file=io.StringIO())
        print_summary(report, con)
        out = con.export_text()
        assert "1 root cause(s)" in out and "34 related" in out
        assert out.count("lora_scale_mismatch") == 2   # the first-divergence sentence and the one root
    page = render_html(report, inline_plotlyjs=False)
    table = page.split('id="findings-table"')[1].split("</table>\n</div>")[0]
    assert table.count('<span class="sev error">') == 1       # one root row ...
    assert table.count('<details class="related">') == 1 and "explains 34 related" in table  # ... the rest under it
    assert table.count("<tr>") - 1 == 34 + 1                  # the collapsed rows (and their header) are all there
    assert "from <b>1</b> root cause" in page


# ---------------------------------------------------------------- properties over any finding list

CHECKS = ["inputs", "config", "weights", "mask", "plora", "nonfinite", "hidden", "decode", "decode-tokens", "engine"]
findings_st = st.lists(st.builds(
    Finding, check=st.sampled_from(CHECKS), severity=st.sampled_from(["error", "error", "warning", "info"]),
    cause=st.sampled_from(CAUSES), message=st.just("m"), layer=st.one_of(st.none(), st.integers(0, 3)),
    module=st.one_of(st.none(), st.sampled_from(LAYER_POINTS + ("embeddings",))),
    positions=st.sampled_from([None, "image", "text", "all", "generated"]),
    case=st.sampled_from([None, "a", "b"]), step=st.one_of(st.none(), st.integers(0, 3))), max_size=40)


@settings(max_examples=300, deadline=None)
@given(findings_st)
def test_groups_partition_the_errors(findings):
    groups = group_findings(findings)
    members = [i for g in groups for i in (g.root, *g.related)]
    assert sorted(members) == [i for i, f in enumerate(findings) if f.severity == "error"]   # each error once
    assert [min((g.root, *g.related)) for g in groups] == sorted(min((g.root, *g.related)) for g in groups)
    assert group_findings(findings) == groups                                              # deterministic
    before = decide(findings, 4, ["a", "b"])
    group_findings(findings)
    assert decide(findings, 4, ["a", "b"]) == before                                       # verdict unchanged


def test_independent_faults_stay_apart():
    """Two faults in different layers and modules of the weights audit are two groups, each with its symptom."""
    f = [Finding("weights", "error", "weight_mismatch", "w", layer=0, module="attention.wo", positions="all"),
         Finding("hidden", "error", "weight_mismatch", "h", layer=0, module="attention.wo", positions="all", case="a"),
         Finding("weights", "error", "weight_mismatch", "w", layer=2, module="feed_forward.w1", positions="all"),
         Finding("hidden", "error", "weight_mismatch", "h", layer=2, module="feed_forward.w1", positions="all",
                 case="a"),
         Finding("config", "warning", "config_mismatch", "c")]
    assert [(g.root, g.related) for g in group_findings(f)] == [(0, (1,)), (2, (3,))]
