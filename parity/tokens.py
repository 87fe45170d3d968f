"""Tokens from logits: greedy choice, log-probabilities and top-k, for the decode comparison."""

from __future__ import annotations

from typing import Callable

import torch

TOP_K = 5


def choice(logits: torch.Tensor, decode: Callable[[int], str], k: int = TOP_K) -> dict:
    """The greedy token of one logits row with its log-probability and the row's top-k
    (`[{"id", "text", "logprob"}]`). Non-finite logits give non-finite log-probabilities, never a crash."""
    lp = torch.log_softmax(logits.double().reshape(-1), dim=-1)
    top = torch.topk(lp, min(k, lp.numel()))
    ids = [int(i) for i in top.indices]
    return {
        "id": ids[0],
        "text": text(decode, ids[0]),
        "logprob": float(lp[ids[0]]),
        "topk": [{"id": i, "text": text(decode, i), "logprob": float(lp[i])} for i in ids],
        "_lp": lp,
    }


def text(decode: Callable[[int], str], token: int) -> str:
    """A token's text, or `<id N>` where the tokenizer has none (a model's vocabulary is often padded past its
    tokenizer's: a SentencePiece tokenizer raises on such ids)."""
    try:
        t = decode(int(token))
    except (IndexError, KeyError, ValueError, TypeError, RuntimeError):
        t = None
    return t if isinstance(t, str) and t else f"<id {int(token)}>"


def logprob(c: dict, token: int) -> float:
    return float(c["_lp"][int(token)])


def in_topk(c: dict, token: int) -> bool:
    return any(t["id"] == int(token) for t in c["topk"])


def public(c: dict) -> dict:
    """`choice` without its full log-probability vector (what a report keeps)."""
    return {k: v for k, v in c.items() if not k.startswith("_")}
