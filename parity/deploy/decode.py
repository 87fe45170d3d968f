"""REPLAY decoder: TurboMind's (lmdeploy 0.7.1) generation loop on CPU, with a real KV cache.

After the prefill, each decode step runs the decoder layers on *one* row — the token fed at the next
position — and attention reads the keys and values of every earlier token from the KV cache
(`parity.deploy.kvcache`), as TurboMind does; nothing of the prompt is recomputed, so a step costs O(1) rows
of linear work per layer plus one pass over the cache. The layer math is the replay engine's own
(`ReplayEngine._layer`, `_linear`, `_rmsnorm`, `_rope`), so prefill and decode cannot drift apart; only
attention differs: it writes the new keys (rotated) and values into the cache and reads the cache back,
which is where the cache's storage precision enters. What decode does in TurboMind, and is replayed:

* generated tokens get no image embeddings and a LoRA mask of 0 (`LlamaV2::updateEmbedding` only marks rows
  of input embeddings), so no PLoRA branch is added on generated rows;
* the token fed at step k sits at position `prompt_rows + k - 1`; its rotary base follows the same dynamic-NTK
  rule as the prefill, evaluated at the current context length;
* a sequence is limited to `session_len - 1` tokens (`LlamaBatch::ProcessInferRequests` truncates
  `max_new_tokens`; a longer prompt is refused): generation ends there.

Two streams run in lockstep, each with its own cache: end to end (the engine's own hidden state, fed the
reference's tokens), and teacher-forced (every module fed the reference's value of the point before it, the
cache built from the reference's keys and values), which is how a step's error is located to one module.

`DecodeDeviations` are what a faulty runtime does differently; they exist for the fault catalogue and are all
off by default. The decoder reports what it did beside what TurboMind does (`DecodeStep.expected_*`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterator

import torch

from ..records import DecodeStep, EngineCall
from .kvcache import DtypeStorage, KVCache, KVStorage, block_len, session_len
from .replay import ReplayEngine, LayerWeights, BufferPool, PreparedCall, MaskedRows, TraceStream

_PRE, _POST = "embeddings", ("norm", "output")


@dataclass(frozen=True)
class DecodeDeviations:
    """A faulty runtime's decode behaviour (fault catalogue only; everything off by default)."""

    lora_on_generated: bool = False          # a LoRA mask of 1 on generated rows
    position_offset: int = 0                 # generated tokens placed this many positions off
    rope_base_past_prompt: float | None = None  # another rotary base for generated rows
    kv_lower_precision: bool = False         # the cache stored one precision step below the workspace's


def generated_limit(session_len: int, prompt_rows: int) -> int:
    """Tokens TurboMind 0.7.1 generates at most after a prompt of `prompt_rows` rows (<= 0: none):
    `LlamaBatch::ProcessInferRequests` refuses a prompt longer than session_len (kTooLong) and otherwise limits
    the sequence to session_len - 1 tokens (max_new_tokens truncated, with a warning). The replay's decoder and
    the live engine stop there alike."""
    return session_len - 1 - prompt_rows


def lower_precision(dtype: torch.dtype, device: torch.device | str = "cpu") -> KVStorage:
    """A storage one step below `dtype` (float32 -> bfloat16, 16-bit -> float8 e5m2): the precision fault."""
    return DtypeStorage(torch.bfloat16 if dtype == torch.float32 else torch.float8_e5m2, torch.device(device))


class _SeqRows:
    """A reference trace's rows `[start, start + n)` as a teacher for `ReplayEngine._layer` (`get`, `root`)."""

    def __init__(self, rows, start: int, n: int):
        self._rows = rows.at(start, start + n)
        self.root = rows.root

    def get(self, layer, point):
        return self._rows.get(layer, point)


class ReplayDecoder:
    """Greedy decode of one engine call on the replay engine (see module docstring)."""

    side = "replay"

    def __init__(self, engine: ReplayEngine, storage: KVStorage | None = None,
                 deviations: DecodeDeviations | None = None):
        self.eng = engine
        # what the workspace and quant policy say: `storage` for --quant-policy, else the activation dtype
        self.faithful = storage or DtypeStorage(engine.T, engine.device)
        self.dev = deviations or DecodeDeviations()
        self.storage = lower_precision(engine.T, engine.device) if self.dev.kv_lower_precision else self.faithful
        self.session_len = session_len(engine.ws)
        self.block_len = block_len(engine.ws)
        self.info: dict = {}

    def _cache(self) -> KVCache:
        e = self.eng
        return KVCache(e.num_layers, e.KV, e.D, self.storage, self.session_len, self.block_len)

    # ---------------------------------------------------------------- attention over the cache

    def _attend(self, qkv: torch.Tensor, layer: int, pos0: int, theta: float, cache: KVCache) -> torch.Tensor:
        """`n` new rows (TurboMind qkv layout, positions pos0..pos0+n-1): rotate q and k, store k and v, attend
        over every cached token (causal among the new rows). fp32 scores and softmax; emulate mode rounds the
        unnormalised P to T before P@V and the output to T, as the prefill attention does."""
        e = self.eng
        H, KV, D = e.H, e.KV, e.D
        n = qkv.shape[0]
        q, k, v = torch.split(qkv, [H * D, KV * D, KV * D], dim=-1)
        cos, sin = e._cos_sin(pos0 + n, theta)
        cos, sin = cos[pos0:].to(qkv.device), sin[pos0:].to(qkv.device)
        q = e._rope(q.reshape(n, H, D), cos, sin)
        k = e._rope(k.reshape(n, KV, D), cos, sin)
        cache.append(layer, k, v.reshape(n, KV, D))
        K, V = cache.read(layer)  # [KV, len, D]
        Lk, gs = K.shape[1], H // KV
        qg = q.reshape(n, KV, gs, D).permute(1, 2, 0, 3).reshape(KV, gs * n, D)
        s = torch.bmm(qg, K.transpose(1, 2)).mul_(e.qk_scale).view(KV, gs, n, Lk)
        idx = torch.arange(Lk, device=s.device)
        future = idx[None, :] > (Lk - n + idx[:n])[:, None]
        s.masked_fill_(future, float("-inf"))
        p = s.sub_(s.amax(-1, keepdim=True)).exp_()
        denom = p.sum(-1, keepdim=True)
        if e.emulating:
            p = p.to(e.T).float()
        o = torch.bmm(p.view(KV, gs * n, Lk), V).view(KV, gs, n, D)
        o = e.rnd(o / denom)
        return o.permute(2, 0, 1, 3).reshape(n, H * D)

    # ---------------------------------------------------------------- run

    def _head(self, x: torch.Tensor, norm_w: torch.Tensor, out_w: torch.Tensor,
              norm_in_teacher: torch.Tensor | None = None, head_in_teacher: torch.Tensor | None = None):
        e = self.eng
        norm = e._rmsnorm(e.rnd(norm_in_teacher.float()) if norm_in_teacher is not None else x, norm_w)
        h = e.rnd(head_in_teacher.float()) if head_in_teacher is not None else norm
        return norm, h @ out_w.T

    @torch.no_grad()
    def run(self, call: EngineCall, tokens: list[int], teacher=None) -> Iterator[DecodeStep]:
        """Prefill `call`, then feed `tokens[:-1]` one per step (the reference's generated tokens; the last one
        is only predicted). Yields step 0 (the prefill's prediction) and one `DecodeStep` per decode forward;
        stops early when the session is full (`self.info["truncated_at"]`). `teacher`: a `TraceRows` of the
        reference captured over the prompt and the fed tokens, for the teacher-forced stream."""
        e = self.eng
        prep = e._prepare(call)
        P = prep.L
        pool = BufferPool(e.device)
        notes: list[str] = []
        weights = [LayerWeights(e, i, notes, pool, users=math.inf) for i in range(e.num_layers)]
        norm_w = e._w("norm.weight")
        out_w = e.ws.tensor("output.weight").float().to(e.device)
        table = e.ws.tensor("tok_embeddings.weight")
        streams = {"e2e": (TraceStream(None, None), self._cache())}
        if teacher is not None:
            streams["local"] = (TraceStream(None, _SeqRows(teacher, 0, P)), self._cache())
        self.info = {"session_len": self.session_len, "kv_storage": self.storage.name,
                     "kv_expected": self.faithful.name, "block_len": self.block_len, "prompt_rows": P,
                     "truncated_at": None, "requested": len(tokens)}
        max_new = generated_limit(self.session_len, P)
        if max_new <= 0:
            self.info["truncated_at"] = 0
            return
        # prefill: the cache is filled with every prompt row's keys and values
        for s, _ in streams.values():
            s.x = prep.x
        for i in range(e.num_layers):
            for s, cache in streams.values():
                vals = e._layer(i, weights[i], prep, pool, s,
                                attend=lambda qkv, c=cache, i=i: self._attend(qkv, i, 0, prep.rope_theta, c))
                s.x = vals["layer"]
        _, logits = self._head(streams["e2e"][0].x[-1:], norm_w, out_w)
        yield DecodeStep(step=0, token=None, position=None, expected_position=None, rope_theta=prep.rope_theta,
                         expected_rope_theta=prep.rope_theta, e2e={(None, "output"): logits.cpu()})
        for k in range(1, len(tokens)):
            if k >= max_new:
                self.info["truncated_at"] = k
                break
            expected = P + k - 1
            pos = expected + self.dev.position_offset
            expected_theta = e._rope_theta(expected + 1)
            theta = self.dev.rope_base_past_prompt or e._rope_theta(pos + 1)
            tok = int(tokens[k - 1])
            x = e.rnd(table[tok: tok + 1].float().to(e.device))
            mask = torch.tensor([1 if (self.dev.lora_on_generated and e.plora_policy) else 0], dtype=torch.uint8)
            step_prep = PreparedCall(1, x, MaskedRows.of(mask), {}, None, torch.zeros(1, dtype=torch.uint8), theta,
                                  prep.cos[:0], prep.sin[:0])
            out: dict[str, dict] = {name: {(None, _PRE): x} for name in streams}
            for name, (s, cache) in streams.items():
                s.x = x
                if s.teacher is not None:
                    s.teacher = _SeqRows(teacher, expected, 1)
            for i in range(e.num_layers):
                for name, (s, cache) in streams.items():
                    vals = e._layer(i, weights[i], step_prep, pool, s,
                                    attend=lambda qkv, c=cache, i=i: self._attend(qkv, i, pos, theta, c))
                    s.x = vals["layer"]
                    out[name].update({(i, p): v for p, v in vals.items()})
            for name, (s, _) in streams.items():
                t = s.teacher
                last = e.num_layers - 1
                norm, logits = self._head(s.x, norm_w, out_w,
                                          t.get(last, "layer") if t is not None else None,
                                          t.get(None, "norm") if t is not None else None)
                out[name][(None, "norm")] = norm
                out[name][(None, "output")] = logits
            host = {name: {key: v.cpu() for key, v in vals.items()} for name, vals in out.items()}  # one row each
            yield DecodeStep(step=k, token=tok, position=pos, expected_position=expected, rope_theta=theta,
                             expected_rope_theta=expected_theta, e2e=host["e2e"], local=host.get("local", {}))
        self.info["cache_bytes"] = streams["e2e"][1].nbytes()
        self.info["cache_tokens"] = streams["e2e"][1].length()
