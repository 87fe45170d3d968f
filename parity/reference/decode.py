"""The reference's greedy generation, and its capture over the generated tokens.

The reference chooses its tokens with the model's own KV cache, as its `generate` does: one forward over the
prompt, then one row per token (`past_key_values`, the model code's own cache), so choosing N tokens costs
one prefill plus N rows instead of N forwards over the whole sequence. Generated rows get the token's own
embedding and an all-zero `im_mask`, as in the HF code, where only the prefill passes an image mask. A model
whose code returns no cache (`past_key_values` None) recomputes the whole sequence for every token instead.

The values that are judged never come from the cached steps: because attention is causal, one forward over
the prompt plus the fed tokens holds, row by row, every decode step's values; it is captured once with the
ordinary hooks and no cache (`ReferenceSession.reference`), with its noise floors, and a decode step reads
its row. The cache only picks the tokens that forward is fed.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

import torch

from ..records import HFCall
from .loader import ReferenceModel
from .precision import compute_dtype


@dataclass
class ReferenceDecode:
    tokens: list[int]     # generated tokens, greedy: tokens[k] is step k's (tokens[0] from the prefill)
    call: HFCall          # prompt + tokens[:-1]: the rows the decode steps run on
    prompt_rows: int
    cached: bool = False  # whether the tokens were chosen with the model's KV cache


@torch.no_grad()
def _forward(ref: ReferenceModel, embeds: torch.Tensor, im_mask: torch.Tensor, past: Any,
             use_cache: bool) -> tuple[torch.Tensor, Any]:
    """(last row's logits, the model's cache or None)."""
    device = ref.device  # the reference's placement (parity.device)
    kwargs = {"past_key_values": past} if past is not None else {}
    with compute_dtype(ref.model, ref.anatomy.layers, ref.dtype, outside="run", via=ref.weights_dtype):
        out = ref.model(inputs_embeds=embeds.to(device, ref.dtype), im_mask=im_mask.to(device),
                        use_cache=use_cache, **kwargs)
    logits = out.logits if hasattr(out, "logits") else out[0]
    cache = getattr(out, "past_key_values", None) if use_cache else None
    return logits[0, -1].float().cpu(), cache


def greedy(ref: ReferenceModel, call: HFCall, n: int, use_cache: bool = True) -> ReferenceDecode:
    """Generate `n` tokens greedily (argmax, first index on ties) after `call`'s prompt; with `use_cache`
    (default) through the model's own KV cache when its code returns one."""
    if n < 1:
        raise ValueError("greedy decode needs n >= 1")
    embeds, mask = call.inputs_embeds, call.im_mask
    prompt_rows = int(embeds.shape[1])
    logits, past = _forward(ref, embeds, mask, None, use_cache)
    cached = past is not None
    tokens: list[int] = []
    for k in range(n):
        tokens.append(int(torch.argmax(logits)))
        if k == n - 1:
            break
        row = ref.embed_tokens(torch.tensor([tokens[-1]])).to(embeds.dtype)[None]
        row_mask = torch.zeros(1, 1, dtype=mask.dtype)  # no PLoRA on generated rows
        embeds = torch.cat([embeds, row], dim=1)
        mask = torch.cat([mask, row_mask], dim=1)
        if cached:
            logits, past = _forward(ref, row, row_mask, past, True)
        else:
            logits, _ = _forward(ref, embeds, mask, None, False)
    digest = hashlib.sha256(f"{call.content_hash}|decode|{tokens[:-1]}".encode()).hexdigest()[:16]
    return ReferenceDecode(tokens, HFCall(embeds, mask, digest), prompt_rows, cached)
