"""Decode comparison, step by step as the engine produces them (nothing of a step is kept but numbers).

Two views, as vLLM's model tests and the lmdeploy threads on HF-vs-engine answers suggest:

* **free-running**: each side's greedy token at every step. While the engine's tokens equal the reference's,
  the engine fed the reference's tokens *is* the free-running engine, so the first step whose tokens differ
  is the free-running divergence; the matched prefix ends there. That step's two tokens are reported with
  their log-probabilities on both sides and whether each is in the other's top-k; the flip is a near tie (a
  warning) when the reference's own log-probability gap between the two tokens is within the noise of the
  reference against itself at the engine's precision (`logprob_noise`, times `floor_factor`), else a clear
  flip (an error). Later steps show the engine's choice given the reference's history.
* **teacher-forced**: every step stays comparable because both sides ran on the reference's tokens. Each step,
  layer and module is judged like a prefill point: the teacher-forced (local) error of the row against
  `Thresholds.threshold(floor)`, the floor being the reference against itself at the engine's precision on the
  same generated rows. A LoRA delta on a generated row must be exactly zero (no PLoRA on generated tokens).
  A step that brings no teacher-forced values (the live engine: fed the reference's tokens, but only its final
  hidden state and logits can be read) is judged end to end against the end-to-end floor, at the points it has.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import torch

from ..points import LAYER_POINTS, PLORA_LINEARS, plora_key
from ..records import DecodeSection, DecodeStep
from ..tokens import choice, in_topk, logprob, public, text
from ..trace import Trace, TraceRows
from .rowstats import row_stats_multi
from .thresholds import Thresholds


def step_points(num_layers: int):
    """(layer, point) of one decode step, in execution order."""
    yield None, "embeddings"
    for i in range(num_layers):
        for p in LAYER_POINTS:
            yield i, p
    yield None, "norm"
    yield None, "output"


def _row_rel(sd2: float, sr2: float) -> float:
    if sd2 == 0.0:
        return 0.0
    return math.sqrt(sd2) / math.sqrt(sr2) if sr2 > 0.0 else math.inf


def _row_or_all(got, i: int) -> float:
    """A decode floor: max(row i's, the floor over every generated row); 0 where none was measured."""
    if got is None:
        return 0.0
    st, agg = got
    return max(_row_rel(float(st.sd2[i]), float(st.sr2[i])), agg) if 0 <= i < st.rows else agg


class DecodeComparator:
    def __init__(self, case: str, tokens: list[int], prompt_rows: int, reference: Trace, floor_local,
                 floor_e2e: Trace | None, thresholds: Thresholds, numeric: str, decode: Callable[[int], str]):
        self.case, self.ref_tokens, self.P = case, list(tokens), prompt_rows
        self.rows = TraceRows(reference)
        self.floor_local, self.thresholds, self.numeric, self.decode = floor_local, thresholds, numeric, decode
        self.floor_rows = TraceRows(floor_e2e) if floor_e2e is not None else None
        self.num_layers = reference.num_layers
        self._floors: dict[tuple[int | None, str], Any] = {}
        n_rows = prompt_rows + len(tokens) - 1
        self._decode_rows = torch.zeros(n_rows, dtype=torch.bool)
        self._decode_rows[prompt_rows:] = True
        self.tokens: list[dict[str, Any]] = []
        self.points: list[dict[str, Any]] = []
        self.noise = 0.0

    # ---------------------------------------------------------------- floors

    def _floor(self, layer: int | None, point: str, row: int) -> float:
        """max(this row's floor, the floor over every generated row) of one point."""
        key = (layer, point)
        if key not in self._floors:
            st = self.floor_local.stats(layer, point) if self.floor_local is not None else None
            if st is None or st.rows != self._decode_rows.numel():
                self._floors[key] = None
            else:
                agg = st.metrics(self._decode_rows)["rel_l2"] if bool(self._decode_rows.any()) else 0.0
                self._floors[key] = (st, agg)
        return _row_or_all(self._floors[key], row)

    def _floor_e2e(self, layer: int | None, point: str, row: int) -> float:
        """The same rule for a step judged end to end: max(this row's, every generated row's) error of the
        reference at the engine's precision, end to end, against the reference."""
        key = ("e2e", layer, point)
        if key not in self._floors:
            self._floors[key] = None
            n = self._decode_rows.numel()
            if self.floor_rows is not None and n > self.P:
                ref = self.rows.at(self.P, n).get(layer, point)
                fl = self.floor_rows.at(self.P, n).get(layer, point)
                if ref is not None and fl is not None:
                    (st,) = row_stats_multi(ref.float(), [fl.float().reshape(ref.shape)])
                    self._floors[key] = (st, st.metrics()["rel_l2"])
        return _row_or_all(self._floors[key], row - self.P)

    # ---------------------------------------------------------------- steps

    def add(self, step: DecodeStep) -> None:
        row = self.P - 1 + step.step  # the reference row whose values this step computes
        view = self.rows.at(row, row + 1)
        ref_logits = view.get(None, "output")
        eng_logits = step.e2e[(None, "output")]
        self._token(step, row, ref_logits, eng_logits)
        if step.step == 0:  # the prompt's last row: judged with the prefill
            return
        # a step without teacher-forced values (the live engine: only its final hidden state and logits, fed the
        # reference's tokens) is judged end to end, against the end-to-end floor, like the live prefill
        forced = bool(step.local)
        judged = step.local if forced else step.e2e
        for layer, point in step_points(self.num_layers):
            ref = view.get(layer, point)
            loc, e2e = judged.get((layer, point)), step.e2e.get((layer, point))
            if ref is None or loc is None or e2e is None:
                continue
            s_e2e, s_loc = row_stats_multi(ref.float(), [e2e.float().reshape(ref.shape), loc.float().reshape(ref.shape)])
            m_e2e, m_loc = s_e2e.metrics(), s_loc.metrics()
            floor = self._floor(layer, point, row) if forced else self._floor_e2e(layer, point, row)
            threshold = self.thresholds.threshold(floor, self.numeric)
            local = m_loc["rel_l2"]
            exceeded = not math.isfinite(local) or local > threshold
            self.points.append({
                "step": step.step, "layer": layer, "module": point, "local": local, "e2e": m_e2e["rel_l2"],
                "floor": floor, "threshold": threshold, "exceeded": bool(exceeded), "max_abs": m_loc["max_abs"],
                "nonfinite_eng": m_loc["nonfinite_eng"], "nonfinite_ref": m_loc["nonfinite_ref"],
                "judged": "local" if forced else "e2e",
            })
            if layer is not None and point in PLORA_LINEARS:
                delta = step.local.get((layer, plora_key(point, "delta")))
                if delta is not None:
                    worst = float(delta.float().abs().max())
                    if worst != 0.0 or not math.isfinite(worst):
                        self.points.append({"step": step.step, "layer": layer, "module": plora_key(point, "delta"),
                                            "local": math.inf, "e2e": math.inf, "floor": 0.0, "threshold": 0.0,
                                            "exceeded": True, "max_abs": worst, "nonfinite_eng": 0,
                                            "nonfinite_ref": 0})

    def _token(self, step: DecodeStep, row: int, ref_logits: torch.Tensor, eng_logits: torch.Tensor) -> None:
        ref_tok = self.ref_tokens[step.step]
        rc, ec = choice(ref_logits, self.decode), choice(eng_logits, self.decode)
        if self.floor_rows is not None:
            fl = self.floor_rows.at(row, row + 1).get(None, "output")
            if fl is not None:
                d = (fl.double() - ref_logits.double()).abs().max()
                # a gap between two tokens' log-probabilities moves by at most twice the largest logit change
                self.noise = max(self.noise, 2.0 * float(d)) if math.isfinite(float(d)) else self.noise
        self.tokens.append({
            "step": step.step, "position": step.position, "expected_position": step.expected_position,
            "rope_theta": step.rope_theta, "expected_rope_theta": step.expected_rope_theta,
            "fed": step.token,
            "ref": {**public(rc), "id": ref_tok, "text": text(self.decode, ref_tok), "logprob": logprob(rc, ref_tok)},
            "eng": public(ec),
            "ref_logprob_of_eng": logprob(rc, ec["id"]),
            "eng_logprob_of_ref": logprob(ec, ref_tok),
            "eng_in_ref_topk": in_topk(rc, ec["id"]),
            "ref_in_eng_topk": in_topk(ec, ref_tok),
            "match": ec["id"] == ref_tok,
        })

    # ---------------------------------------------------------------- result

    def finish(self, engine_info: dict[str, Any]) -> DecodeSection:
        self.rows.close()
        if self.floor_rows is not None:
            self.floor_rows.close()
        first = next((t["step"] for t in self.tokens if not t["match"]), None)
        tie = self.thresholds.floor_factor * self.noise
        for t in self.tokens:
            gap = t["ref"]["logprob"] - t["ref_logprob_of_eng"]
            t["ref_gap"] = gap
            t["near_tie"] = (not t["match"]) and math.isfinite(gap) and gap <= tie
        return DecodeSection(
            case=self.case, requested=len(self.ref_tokens), prompt_rows=self.P, steps_run=len(self.tokens),
            matched_prefix=first if first is not None else len(self.tokens), first_divergent_step=first,
            tokens=self.tokens, points=self.points, engine=dict(engine_info), logprob_noise=self.noise,
        )
