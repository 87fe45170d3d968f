"""The live engine's per-layer strategy (parity/layerwise.py) judges and words its findings through compare/,
checks/ and the verdict, not with rules of its own."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings, strategies as st

from parity.compare.align import class_metrics, judge_classes, positions_of
from parity.compare.rowstats import row_stats
from parity.compare.thresholds import Thresholds
from parity.layerwise import LayerResult, PloraEffect, findings, judge

LAYERWISE = Path(__file__).resolve().parents[1] / "parity" / "layerwise.py"


def _result(layer: int, case: str = "c") -> LayerResult:
    by = {"image": {"rel_l2": 0.5, "exceeded": True}, "text": {"rel_l2": 1e-8, "exceeded": False}}
    m = {"rel_l2": 0.3, "max_abs": 1.0, "max_abs_row": 0, "max_abs_col": 0, "by_class": by}
    return LayerResult(case, layer, layer + 1, m, 1e-7, 1e-6, True, "image", "x")


def _not_applied(case: str) -> PloraEffect:
    return PloraEffect(case=case, metrics={"rel_l2": 1.0}, ref_norm=1.0, eng_norm=0.0, ratio=0.0, cosine=float("nan"),
                       floor=1e-7, threshold=1e-6, exceeded=True, cause="lora_not_applied",
                       message="The engine applies no PLoRA.")


@pytest.mark.parametrize("effect_case, cause", [("c", "lora_not_applied"), ("other", "numeric_drift"), (None, "numeric_drift")])
def test_layer_cause_is_the_verdicts_and_stays_in_its_case(effect_case, cause):
    """A case's PLoRA on/off finding explains that case's image-row divergence, and no other case's."""
    effects = [] if effect_case is None else [_not_applied(effect_case)]
    (first,) = [f for f in findings([_result(1)], effects) if f.check == "hidden"]
    assert (first.layer, first.module, first.positions, first.cause) == (1, "layer", "image", cause)
    if cause == "lora_not_applied":
        assert "The engine applies no PLoRA." in first.message


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 2**31 - 1), st.floats(1e-9, 1e-1), st.floats(1e-12, 1e-3), st.sampled_from(["fp32", "emulate"]))
def test_judge_is_the_pipelines_judgement(seed, noise, floor_noise, numeric):
    g = torch.Generator().manual_seed(seed)
    ref = torch.randn(6, 8, generator=g, dtype=torch.float64)
    eng = ref + noise * torch.randn(6, 8, generator=g, dtype=torch.float64) * torch.tensor([0, 0, 1, 1, 0, 0.])[:, None]
    floor = ref + floor_noise * torch.randn(6, 8, generator=g, dtype=torch.float64)
    classes = {"bos": torch.tensor([1, 0, 0, 0, 0, 0]).bool(), "image": torch.tensor([0, 0, 1, 1, 0, 0]).bool(),
               "text": torch.tensor([0, 1, 0, 0, 1, 1]).bool()}
    m, fl, thr, exc, pos = judge(ref, eng, floor, classes, Thresholds(), numeric)
    want, want_floor = class_metrics(row_stats(ref, eng), classes), class_metrics(row_stats(ref, floor), classes)
    assert (thr, exc) == judge_classes(want, want_floor, Thresholds(), numeric)
    assert m == want and fl == want_floor["rel_l2"]
    assert pos == (positions_of(want["by_class"]) if exc else None)


def test_layerwise_has_no_threshold_or_cause_rules_of_its_own():
    """No threshold arithmetic, finiteness rule or hidden-state cause of its own (a copy would drift)."""
    tree = ast.parse(LAYERWISE.read_text())
    own = [ast.unparse(n) for n in ast.walk(tree)
           if (isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute)
               and n.func.attr in ("threshold", "bounds", "isfinite"))
           or (isinstance(n, ast.Constant) and n.value in ("numeric_drift", "nonfinite"))]
    assert own == [], f"parity/layerwise.py judges or attributes by itself: {own}"
