"""The reference's greedy generation, and its capture over the generated tokens.

The reference is the truth, so it is computed without any cache: each generated token comes from a forward
over the whole sequence so far (`use_cache=False`, as every reference capture here; the XComposer2 remote
code's legacy tuple cache does not work with current transformers). Generated rows get the token's own
embedding and `im_mask` False, as in the HF code, where only the prefill passes an image mask.

Because attention is causal, one forward over the prompt plus the fed tokens holds, row by row, every decode
step's values; it is captured once with the ordinary hooks (`ReferenceSession.reference`), with its noise
floors, and a decode step reads its row. That forward is also the last greedy step's.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch

from ..records import HFCall
from .loader import ReferenceModel
from .precision import compute_dtype


@dataclass
class ReferenceDecode:
    tokens: list[int]     # generated tokens, greedy: tokens[k] is step k's (tokens[0] from the prefill)
    call: HFCall          # prompt + tokens[:-1]: the rows the decode steps run on
    prompt_rows: int


@torch.no_grad()
def _last_logits(ref: ReferenceModel, embeds: torch.Tensor, im_mask: torch.Tensor) -> torch.Tensor:
    device = ref.device  # the reference's placement (parity.device)
    with compute_dtype(ref.model, ref.anatomy.layers, ref.dtype, outside="run", via=ref.weights_dtype):
        out = ref.model(inputs_embeds=embeds.to(device, ref.dtype), im_mask=im_mask.to(device), use_cache=False)
    logits = out.logits if hasattr(out, "logits") else out[0]
    return logits[0, -1].float().cpu()


def greedy(ref: ReferenceModel, call: HFCall, n: int) -> ReferenceDecode:
    """Generate `n` tokens greedily (argmax, first index on ties) after `call`'s prompt."""
    if n < 1:
        raise ValueError("greedy decode needs n >= 1")
    embeds, mask = call.inputs_embeds, call.im_mask
    prompt_rows = int(embeds.shape[1])
    tokens: list[int] = []
    for k in range(n):
        tokens.append(int(torch.argmax(_last_logits(ref, embeds, mask))))
        if k < n - 1:
            row = ref.embed_tokens(torch.tensor([tokens[-1]]))
            embeds = torch.cat([embeds, row.to(embeds.dtype)[None]], dim=1)
            mask = torch.cat([mask, torch.zeros(1, 1, dtype=mask.dtype)], dim=1)
    digest = hashlib.sha256(f"{call.content_hash}|decode|{tokens[:-1]}".encode()).hexdigest()[:16]
    return ReferenceDecode(tokens, HFCall(embeds, mask, digest), prompt_rows)
