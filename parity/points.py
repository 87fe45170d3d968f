"""Canonical capture points, named after XComposer2's modules.

Both sides (the HF reference and any deployment engine) record values under these names, so the
comparator never has to know which side used which module names. Order matters: it is execution order,
which is how `first_divergence` is defined.
"""

from __future__ import annotations

from typing import Iterator

# Per decoder layer, in execution order. "attention" is the core attention output (the input of `wo`);
# "layer" is the decoder layer's output hidden state.
LAYER_POINTS: tuple[str, ...] = (
    "attention_norm",
    "attention.wqkv",
    "attention",
    "attention.wo",
    "ffn_norm",
    "feed_forward.w1",
    "feed_forward.w3",
    "feed_forward.w2",
    "layer",
)

# The linears that carry a PLoRA branch in XComposer2 (and in TurboMind's plora policy).
PLORA_LINEARS: tuple[str, ...] = (
    "attention.wqkv",
    "attention.wo",
    "feed_forward.w1",
    "feed_forward.w3",
    "feed_forward.w2",
)

# What is recorded for every PLoRA linear, stored under f"{linear}:{part}".
#   input: the linear's input rows; base: x @ W.T (+ b); delta: the LoRA term actually added (zero rows
#   where it was not added); mask: the bool row mask the linear used (1-D, stored as uint8).
PLORA_PARTS: tuple[str, ...] = ("input", "base", "delta", "mask")
# The parts the checks read (the delta actually added and the mask used); the others are recorded only for
# someone who keeps the traces to debug with (`--keep-traces`).
CHECKED_PARTS: tuple[str, ...] = ("delta", "mask")
UNCHECKED_PARTS: tuple[str, ...] = tuple(p for p in PLORA_PARTS if p not in CHECKED_PARTS)

# Points outside the layers. "embeddings" are the input rows of layer 0 (token embeddings with image
# features spliced in); "norm" is the final RMSNorm output; "output" the logits.
PRE_POINTS: tuple[str, ...] = ("embeddings",)
POST_POINTS: tuple[str, ...] = ("norm", "output")


def plora_key(linear: str, part: str) -> str:
    return f"{linear}:{part}"


def execution_order(num_layers: int) -> Iterator[tuple[int | None, str]]:
    """(layer, point) pairs in the order a forward pass produces them."""
    for p in PRE_POINTS:
        yield None, p
    for i in range(num_layers):
        for p in LAYER_POINTS:
            yield i, p
    for p in POST_POINTS:
        yield None, p
