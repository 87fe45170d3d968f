"""What a faithful conversion of the HF model writes, one layer at a time.

The weights audit compares every workspace tensor with this. A 7B state dict transformed at once would
double the weights in memory, so tensors are produced per layer on demand and only the layer in use is
kept. The expected layout is the *correct* one (the model's real head_dim), not lmdeploy's reader with its
hard-coded 128: a mis-split is a difference to report, not a convention to reproduce.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from dataclasses import replace
from typing import Any

import torch

from ..hfconfig import head_dim_of, kv_heads_of
from .layout import hf_to_tm

_LAYER = re.compile(r"^model\.layers\.(\d+)\.")


def fingerprint(t: torch.Tensor) -> tuple:
    t = t.double()
    return (tuple(t.shape), round(float(t.sum()), 6), round(float(t.abs().sum()), 6))


class ExpectedTensors(Mapping):
    """Mapping TurboMind tensor name -> expected tensor (merged, tp=1 layout), computed layer by layer."""

    @classmethod
    def from_hf_config(cls, config: Mapping[str, Any], state: Mapping[str, torch.Tensor],
                       workspace_shape) -> "ExpectedTensors":
        """The HF weights as a faithful conversion would write them, shaped by the HF config (the truth) over
        the workspace's config.yaml model shape, so a wrong head count in config.yaml shows up as a difference
        instead of a crash."""
        c = config
        shape = replace(
            workspace_shape, head_num=int(c["num_attention_heads"]), kv_head_num=kv_heads_of(c),
            size_per_head=head_dim_of(c), hidden_units=int(c["hidden_size"]), num_layer=int(c["num_hidden_layers"]),
            vocab_size=int(c["vocab_size"]),
            inter_size=workspace_shape.inter_size if len(workspace_shape.inter_size) == int(c["num_hidden_layers"])
            else [int(c["intermediate_size"])] * int(c["num_hidden_layers"]),  # a workspace of another depth
        )
        return cls(state, shape)

    def __init__(self, state: Mapping[str, torch.Tensor], shape) -> None:
        self._state = state
        self._shape = shape
        self._groups: dict[int, list[str]] = {}
        for k in state:
            m = _LAYER.match(k)
            self._groups.setdefault(int(m.group(1)) if m else -1, []).append(k)
        self._cached: tuple[int, dict[str, torch.Tensor]] | None = None
        self._where: dict[str, int] = {}
        self._fingerprints: dict[str, tuple] | None = None
        for group in sorted(self._groups):  # names and shapes only: the transform on meta tensors costs nothing
            subset = {k: self._state[k].to("meta") for k in self._groups[group]}
            for name in hf_to_tm(subset, self._shape, reader_head_dim=None):
                self._where[name] = group

    @property
    def fingerprints(self) -> dict[str, tuple]:
        """(shape, sum, |sum|) of every expected tensor: computed once, when a mismatch needs a hint."""
        if self._fingerprints is None:
            self._fingerprints = {name: fingerprint(self[name]) for name in sorted(self._where, key=self._where.get)}
        return self._fingerprints

    def _layer(self, group: int) -> dict[str, torch.Tensor]:
        if self._cached is None or self._cached[0] != group:
            subset = {k: self._state[k] for k in self._groups.get(group, [])}
            self._cached = (group, hf_to_tm(subset, self._shape, reader_head_dim=None))
        return self._cached[1]

    def __getitem__(self, name: str) -> torch.Tensor:
        return self._layer(self._where[name])[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._where)

    def __len__(self) -> int:
        return len(self._where)

    def __contains__(self, name: object) -> bool:
        return name in self._where
