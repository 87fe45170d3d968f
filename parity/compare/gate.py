"""Teacher forcing on demand: the engine's teacher-forced run starts at the first layer where its end-to-end
run leaves what passes whatever the noise floor is.

The verdict judges local (teacher-forced) errors against clamp(factor x floor, min_rel, max_rel), in total
and per row class (image / text / bos). While every value the end-to-end run produced (the layer's points and
PLoRA deltas) is within min_rel of the reference in total and in every class, the engine reproduces the
reference through those layers end to end, and the comparison judges those layers on the end-to-end values
(`compare_case` reads the end-to-end value where the teacher-forced trace has none; the PLoRA check reads the
end-to-end deltas: in fp32 mode the statistics the end-to-end `StatsWriter` kept of them, in emulate mode the
values, written to the teacher-forced trace): each passes at min_rel, the verdict any floor gives.
From the first layer where a value leaves min_rel (a fault's first layer, or where clean rounding has grown
past it), every layer after it is run teacher-forced as before, so a fault is still localised by its own
local error. The head (final norm, logits) is judged the same way when no layer started it.
"""

from __future__ import annotations

import torch

from ..trace import Trace
from .rowstats import RowStats, row_stats
from .thresholds import Thresholds


class TeacherForcingGate:
    """`needed(layer, values)`: whether the engine's teacher-forced run must start at `layer` (None: the head),
    given the end-to-end run's `values` there. Remembers where it started (`started_at`)."""

    def __init__(self, reference: Trace, thresholds: Thresholds, numeric: str, classes: dict[str, torch.Tensor],
                 computed=None):
        """`computed`: a `StatsWriter` against `reference` that the end-to-end values went through first; its
        statistics are used instead of computing them again."""
        self.reference = reference
        self.computed = computed
        self.min_rel = thresholds.bounds(numeric)[0]
        self.classes = classes  # `align.row_classes` of the case: what the comparison judges per class
        self.started_at: int | str | None = None  # a layer index, "head", or None (never needed)

    def leaves(self, ref: torch.Tensor, value: torch.Tensor) -> bool:
        """Whether `value` is farther than min_rel (relative L2) from the reference in total or in a row class,
        or has a non-finite value on either side."""
        return self._leaves(row_stats(ref, value))

    def _leaves(self, st: RowStats) -> bool:
        if bool((st.nf_ref > 0).any() or (st.nf_other > 0).any() or st.mismatch.any()):
            return True
        judged = [st.metrics()] + list(st.by_class(self.classes).values())
        return not all(m["rel_l2"] <= self.min_rel for m in judged)

    def needed(self, layer: int | None, values: dict[str, torch.Tensor]) -> bool:
        done = self.computed.last if self.computed is not None else {}
        for key, value in values.items():
            if key in done:  # compared already, against a floating reference value of the same shape
                if self._leaves(done[key]):
                    return self._start(layer)
                continue
            ref = self.reference.get(layer, key)  # read only where no statistics were kept
            if ref is None or not value.is_floating_point() or not ref.is_floating_point():
                continue  # masks are compared by the mask check; parts the reference did not record
            # not comparable here (let the teacher-forced run and the comparison say why), or off the reference
            if ref.shape != value.shape or ref.dim() == 0 or self.leaves(ref, value):
                return self._start(layer)
        return False

    def _start(self, layer: int | None) -> bool:
        self.started_at = "head" if layer is None else layer
        return True


def describe(started_at: int | str | None, num_layers: int) -> str:
    """The report's line on where the teacher-forced run started."""
    if started_at is None:
        return "not run: every end-to-end value is within min_rel of the reference (judged end to end)"
    if started_at == "head":
        return f"from the head (layers 0-{num_layers - 1} judged end to end, within min_rel)"
    if started_at == 0:
        return "from layer 0 (every layer)"
    return f"from layer {started_at} (layers 0-{int(started_at) - 1} judged end to end, within min_rel)"

