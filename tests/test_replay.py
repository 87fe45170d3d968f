"""The REPLAY engine (parity/deploy/replay.py) against an HF-style XComposer2 forward.

The HF side is a plain `model(inputs_embeds=..., im_mask=...)` with forward hooks. It uses the session
fixture `fixture_models` (tests/conftest.py) when the fixture package exists; otherwise a small in-test
stand-in (`_StandInXC2`) that follows the XComposer2 remote code (PLoRA, grouped wqkv, rotate-half RoPE,
HF RMSNorm). The deployment side is built from the HF state dict through the converter's layout transforms
(`FakeWorkspace`, tests only) unless a real converted workspace can be had.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from parity.deploy.layout import hf_qkv_cols_to_tm
from parity.deploy.shapes import LoraSettings, ModelShape
from parity.deploy.replay import WARNING_TEXT, ReplayEngine, validate_ranges
from parity.points import LAYER_POINTS, PLORA_LINEARS, plora_key
from parity.records import EngineCall, RuntimeSemantics
from parity.trace import Trace, TraceMeta, TraceWriter

try:
    from parity.deploy.versions import semantics_for

    SEM_071, SEM_072 = semantics_for("0.7.1"), semantics_for("0.7.2")
except ImportError:  # pragma: no cover - until versions.py exists
    SEM_071 = RuntimeSemantics(version="0.7.1", converter_writes_lora=True, runtime_applies_plora=True,
                               workspace_loads_lora=False)
    SEM_072 = RuntimeSemantics(version="0.7.2", converter_writes_lora=True, runtime_applies_plora=False,
                               workspace_loads_lora=False)

REPORT = Path(os.environ.get("PARITY_REPLAY_REPORT", "/tmp/parity-replay-errors.json"))
_measured: dict[str, dict] = {}


# ------------------------------------------------------------------------------------------- stand-ins


def plora_settings(**overrides) -> LoraSettings:
    """A converted PLoRA workspace's lora_config (rank 8, scale 1) with `overrides`."""
    return LoraSettings(**{"lora_policy": "plora", "lora_r": 8, "lora_scale": 1.0, "lora_max_wo_r": 8, **overrides})


class FakeWorkspace:
    """Stand-in for parity.deploy.workspace.Workspace (tests only): the converter's tp=1 output, built
    from an HF XComposer2 state dict with the project's layout transforms."""

    def __init__(self, sd: dict, cfg: dict, dtype=torch.bfloat16, lora: LoraSettings | None = None):
        H, KV, D = cfg["heads"], cfg["kv_heads"], cfg["head_dim"]
        self.dtype = dtype
        self.model = ModelShape(H, KV, D, cfg["hidden"], cfg["layers"], [cfg["inter"]] * cfg["layers"],
                                cfg["eps"], cfg["vocab"], {torch.bfloat16: "bf16", torch.float16: "fp16",
                                                           torch.float32: "fp32"}[dtype],
                                tp=1, attn_bias=0, model_arch="InternLMXComposer2ForCausalLM")
        self.attention = {"rope_theta": cfg["rope_theta"], "rotary_embedding": D, "max_position_embeddings": 4096,
                          "rope_scaling_type": "", "rope_scaling_factor": 0.0, "use_dynamic_ntk": 0}
        self.lora = lora or plora_settings(lora_r=cfg["lora_r"], lora_scale=cfg["lora_scale"],
                                             lora_max_wo_r=cfg["lora_r"])
        self.config = {"model_config": dict(self.model.__dict__), "attention_config": self.attention,
                       "lora_config": dict(self.lora.__dict__)}
        t: dict[str, torch.Tensor] = {}
        g = lambda k: sd[k].detach().float()  # noqa: E731
        t["tok_embeddings.weight"] = g("model.tok_embeddings.weight")
        t["norm.weight"] = g("model.norm.weight")
        t["output.weight"] = g("output.weight")  # [vocab, hidden], as the converter writes it
        names = {"attention.wqkv": "attention.w_qkv", "attention.wo": "attention.wo",
                 "feed_forward.w1": "feed_forward.w1", "feed_forward.w2": "feed_forward.w2",
                 "feed_forward.w3": "feed_forward.w3"}
        for i in range(cfg["layers"]):
            p = f"model.layers.{i}."
            t[f"layers.{i}.attention_norm.weight"] = g(p + "attention_norm.weight")
            t[f"layers.{i}.ffn_norm.weight"] = g(p + "ffn_norm.weight")
            for hf, tm in names.items():
                w = g(p + hf + ".weight").T
                a = g(p + hf + ".Plora_A.weight").T
                b = g(p + hf + ".Plora_B.weight").T
                if hf == "attention.wqkv":
                    w, b = hf_qkv_cols_to_tm(w, H, KV, D), hf_qkv_cols_to_tm(b, H, KV, D)
                t[f"layers.{i}.{tm}.weight"] = w
                t[f"layers.{i}.{tm}.lora_a.weight"] = a
                t[f"layers.{i}.{tm}.lora_b.weight"] = b
        self._t = {k: v.to(dtype).contiguous() for k, v in t.items()}

    def has(self, name):
        return name in self._t

    def tensor(self, name):
        return self._t[name]


def _fake_resolve(lora, layer, tm_linear):
    """Stand-in for parity.deploy.lora_config.resolve (no patterns)."""
    return int(lora.lora_r), float(lora.lora_scale)


try:  # the real one when another helper has written it
    from parity.deploy.lora_config import resolve as _resolve  # noqa: F401

    RESOLVE = None
except Exception:  # pragma: no cover - until lora_config.py exists
    RESOLVE = _fake_resolve


class _PLoRA(nn.Linear):
    def __init__(self, i, o, r, alpha):
        super().__init__(i, o, bias=False)
        self.lora_r, self.lora_alpha, self.lora_scaling = r, alpha, alpha / r
        self.Plora_A = nn.Linear(i, r, bias=False)
        self.Plora_B = nn.Linear(r, o, bias=False)

    def forward(self, x, im_mask=None):
        res = super().forward(x)
        if im_mask is not None and im_mask.any():
            part = self.Plora_B(self.Plora_A(x[im_mask])) * self.lora_scaling
            res[im_mask] += part
        return res


class _RMSNorm(nn.Module):
    def __init__(self, n, eps):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(n))
        self.eps = eps

    def forward(self, h):
        dt = h.dtype
        h = h.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(dt)


def _rotate_half(x):
    a, b = x.chunk(2, dim=-1)
    return torch.cat((-b, a), dim=-1)


class _Attn(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.c = c
        H, KV, D = c["heads"], c["kv_heads"], c["head_dim"]
        self.wqkv = _PLoRA(c["hidden"], (H + 2 * KV) * D, c["lora_r"], c["lora_r"] * c["lora_scale"])
        self.wo = _PLoRA(H * D, c["hidden"], c["lora_r"], c["lora_r"] * c["lora_scale"])

    def forward(self, h, im_mask):
        c = self.c
        H, KV, D = c["heads"], c["kv_heads"], c["head_dim"]
        B, L, _ = h.shape
        gs = H // KV
        qkv = self.wqkv(h, im_mask).view(B, L, KV, gs + 2, D)
        q = qkv[..., :gs, :].reshape(B, L, H, D).transpose(1, 2)
        k = qkv[..., -2, :].transpose(1, 2)
        v = qkv[..., -1, :].transpose(1, 2)
        inv = 1.0 / (c["rope_theta"] ** (torch.arange(0, D, 2).float() / D))
        fr = torch.outer(torch.arange(L).float(), inv)
        emb = torch.cat((fr, fr), -1)
        cos, sin = emb.cos().to(h.dtype), emb.sin().to(h.dtype)
        q = q * cos + _rotate_half(q) * sin
        k = k * cos + _rotate_half(k) * sin
        k = k.repeat_interleave(gs, dim=1)
        v = v.repeat_interleave(gs, dim=1)
        s = q @ k.transpose(2, 3) / math.sqrt(D)
        s = s + torch.full((L, L), torch.finfo(s.dtype).min).triu(1).to(s.dtype)
        p = F.softmax(s, dim=-1, dtype=torch.float32).to(q.dtype)
        o = (p @ v).transpose(1, 2).reshape(B, L, H * D)
        return self.wo(o, im_mask)


class _FFN(nn.Module):
    def __init__(self, c):
        super().__init__()
        r, a = c["lora_r"], c["lora_r"] * c["lora_scale"]
        self.w1 = _PLoRA(c["hidden"], c["inter"], r, a)
        self.w3 = _PLoRA(c["hidden"], c["inter"], r, a)
        self.w2 = _PLoRA(c["inter"], c["hidden"], r, a)

    def forward(self, x, im_mask):
        return self.w2(F.silu(self.w1(x, im_mask)) * self.w3(x, im_mask), im_mask)


class _Layer(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.attention = _Attn(c)
        self.feed_forward = _FFN(c)
        self.attention_norm = _RMSNorm(c["hidden"], c["eps"])
        self.ffn_norm = _RMSNorm(c["hidden"], c["eps"])

    def forward(self, h, im_mask):
        h = h + self.attention(self.attention_norm(h), im_mask)
        return h + self.feed_forward(self.ffn_norm(h), im_mask)


class _Body(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.tok_embeddings = nn.Embedding(c["vocab"], c["hidden"])
        self.layers = nn.ModuleList(_Layer(c) for _ in range(c["layers"]))
        self.norm = _RMSNorm(c["hidden"], c["eps"])


class _StandInXC2(nn.Module):
    """XComposer2-7b math at toy size (stand-in until the fixture package exists)."""

    def __init__(self, c):
        super().__init__()
        self.model = _Body(c)
        self.output = nn.Linear(c["hidden"], c["vocab"], bias=False)

    def forward(self, inputs_embeds, im_mask, use_cache=False):
        h = inputs_embeds
        for layer in self.model.layers:
            h = layer(h, im_mask)
        return self.output(self.model.norm(h)).float()


CFG = dict(hidden=64, heads=4, kv_heads=2, head_dim=16, inter=96, layers=2, vocab=160, eps=1e-5,
           rope_theta=1e6, lora_r=8, lora_scale=2.0)


def _build_standin(seed=0):
    torch.manual_seed(seed)
    m = _StandInXC2(CFG).eval()
    with torch.no_grad():
        for n, p in m.named_parameters():
            if "norm" in n:
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            elif "Plora" in n:
                p.copy_(0.15 * torch.randn_like(p))
            else:
                p.copy_(torch.randn_like(p) / math.sqrt(p.shape[-1]))
            p.copy_(p.to(torch.bfloat16).float())  # bf16-exact, so the bf16 workspace carries the same numbers
    return m


# ------------------------------------------------------------------------------------------- HF capture


def _hf_capture(model, embeds: torch.Tensor, im_mask: torch.Tensor, root: Path, dtype=torch.float32) -> Trace:
    """Plain `model(inputs_embeds=..., im_mask=...)` with forward hooks at the canonical points."""
    body = model.model
    layers = list(body.layers)
    writer = TraceWriter(root, TraceMeta(side="reference", case="t", num_layers=len(layers),
                                         dtype=str(dtype).replace("torch.", "")))
    cur: dict[str, torch.Tensor] = {}
    hooks = []
    rows = lambda t: t.detach().reshape(-1, t.shape[-1]).float().clone()  # noqa: E731

    def lin_hook(point):
        def hook(mod, args, kwargs, out):
            x = args[0]
            m = args[1] if len(args) > 1 else kwargs.get("im_mask")
            base = F.linear(x, mod.weight, mod.bias)
            flat = m.reshape(-1).bool() if m is not None else torch.zeros(rows(x).shape[0], dtype=torch.bool)
            delta = torch.zeros_like(rows(out))
            if flat.any():
                xr = x.reshape(-1, x.shape[-1])[flat]
                delta[flat] = (mod.Plora_B(mod.Plora_A(xr)) * mod.lora_scaling).float()
            if point == "attention.wo":
                cur["attention"] = rows(x)
            cur[point] = rows(out)
            cur[plora_key(point, "input")] = rows(x)
            cur[plora_key(point, "base")] = rows(base)
            cur[plora_key(point, "delta")] = delta
            cur[plora_key(point, "mask")] = flat.to(torch.uint8)
        return hook

    for i, layer in enumerate(layers):
        mods = dict(layer.named_modules())
        for p in PLORA_LINEARS:
            hooks.append(mods[p].register_forward_hook(lin_hook(p), with_kwargs=True))
            writer.meta.plora.setdefault(str(i), {})[p] = {"rank": int(mods[p].Plora_A.weight.shape[0]),
                                                          "scale": float(mods[p].lora_scaling)}
        for n in ("attention_norm", "ffn_norm"):
            hooks.append(mods[n].register_forward_hook(lambda m, a, o, n=n: cur.__setitem__(n, rows(o))))

        def done(m, a, o, i=i):
            cur["layer"] = rows(o[0] if isinstance(o, tuple) else o)
            writer.layer(i, dict(cur))
            cur.clear()
        hooks.append(layer.register_forward_hook(done))
    hooks.append(body.norm.register_forward_hook(lambda m, a, o: writer.post("norm", rows(o))))
    hooks.append(model.output.register_forward_hook(lambda m, a, o: writer.post("output", rows(o))))
    try:
        with torch.no_grad():
            e = embeds.to(dtype)[None]
            writer.pre("embeddings", e.float())
            model(inputs_embeds=e, im_mask=im_mask[None], use_cache=False)
    finally:
        for h in hooks:
            h.remove()
    return writer.close()


# ------------------------------------------------------------------------------------------- setup


@dataclass
class Setup:
    model: nn.Module
    ws: object
    call: EngineCall
    embeds: torch.Tensor      # float32 [rows, hidden]: token rows + image rows, the HF input
    im_mask: torch.Tensor     # bool [rows]
    tmp: Path
    ref32: Trace = None
    extra: dict = field(default_factory=dict)


IMG = (5, 13)  # rows 5..12 are image features
ROWS = 19


REPO = Path(__file__).resolve().parents[1]
SOURCES = ("standin", "xcomposer2-tiny", "xcomposer2-4khd-tiny")


def _have_real() -> bool:
    try:
        import parity.deploy.convert  # noqa: F401
        import parity.deploy.workspace  # noqa: F401
        import parity.fixtures  # noqa: F401
    except ImportError:
        return False
    return True


def _load_real(request, name):
    """HF model (float32, eager) from the fixture folder and its real lmdeploy-0.7.1 conversion."""
    if not _have_real():
        pytest.skip("fixture package / converter / workspace reader not available yet")
    from transformers import AutoModelForCausalLM

    from parity.deploy.convert import convert_cached
    from parity.deploy.workspace import Workspace

    path = request.getfixturevalue("fixture_models")[name]
    model = AutoModelForCausalLM.from_pretrained(str(path), trust_remote_code=True, torch_dtype=torch.float32,
                                                 attn_implementation="eager").eval()
    ws = Workspace.open(convert_cached(path, REPO / ".cache" / "workspaces"))
    return model, ws


def _make_inputs(table: torch.Tensor, vocab: int, seed: int = 1):
    """ROWS rows: text, IMG image rows (bf16-exact features of the embedding scale), text."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (ROWS,), generator=g)
    ids[IMG[0]:IMG[1]] = 0  # placeholder id on image rows
    scale = table.float().std().item()
    feats = (torch.randn(IMG[1] - IMG[0], table.shape[1], generator=g) * scale).to(torch.bfloat16).float()
    embeds = table.float()[ids].clone()
    embeds[IMG[0]:IMG[1]] = feats
    im_mask = torch.zeros(ROWS, dtype=torch.bool)
    im_mask[IMG[0]:IMG[1]] = True
    call = EngineCall(input_ids=ids.tolist(), input_embeddings=[feats], input_embedding_ranges=[IMG],
                      content_hash="test")
    return call, embeds, im_mask


@pytest.fixture(scope="module", params=SOURCES)
def setup(request, tmp_path_factory) -> Setup:
    src = request.param
    if src == "standin":
        model = _build_standin()
        ws = FakeWorkspace(model.state_dict(), CFG, dtype=torch.bfloat16)
    else:
        model, ws = _load_real(request, src)
    call, embeds, im_mask = _make_inputs(model.model.tok_embeddings.weight.detach(), ws.model.vocab_size)
    tmp = tmp_path_factory.mktemp(f"replay-{src}")
    s = Setup(model, ws, call, embeds, im_mask, tmp)
    s.extra["source"] = src
    t0 = time.perf_counter()
    s.ref32 = _hf_capture(model, embeds, im_mask, tmp / "ref32", torch.float32)
    s.extra["hf_time"] = time.perf_counter() - t0
    return s


@pytest.fixture(scope="module")
def standin(tmp_path_factory) -> Setup:
    model = _build_standin()
    ws = FakeWorkspace(model.state_dict(), CFG, dtype=torch.bfloat16)
    call, embeds, im_mask = _make_inputs(model.model.tok_embeddings.weight.detach(), CFG["vocab"])
    tmp = tmp_path_factory.mktemp("replay-standin-only")
    s = Setup(model, ws, call, embeds, im_mask, tmp)
    s.extra["source"] = "standin"
    s.ref32 = _hf_capture(model, embeds, im_mask, tmp / "ref32", torch.float32)
    return s


def _engine(s: Setup, **kw) -> ReplayEngine:
    sem = kw.pop("semantics", SEM_071)
    ws = kw.pop("ws", s.ws)
    return ReplayEngine(ws, sem, resolve=RESOLVE, **kw)


def _run(s: Setup, name: str, engine: ReplayEngine, call: EngineCall | None = None, teacher=None):
    w = TraceWriter(s.tmp / name, TraceMeta(side="replay", case="t", num_layers=CFG["layers"], dtype=""))
    info = engine.run(call or s.call, w, teacher=teacher)
    return info, info["trace"]


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    d = (a - b).norm().item()
    n = b.norm().item()
    return d / n if n > 0 else d


def _all_points(num_layers):
    yield None, "embeddings"
    for i in range(num_layers):
        for p in LAYER_POINTS:
            yield i, p
        for lin in PLORA_LINEARS:
            for part in ("input", "base", "delta"):
                yield i, plora_key(lin, part)
    yield None, "norm"
    yield None, "output"


def _errors(eng: Trace, ref: Trace) -> dict[str, float]:
    out = {}
    for layer, p in _all_points(ref.num_layers):
        a, b = eng.get(layer, p), ref.get(layer, p)
        assert a is not None and b is not None, (layer, p)
        assert a.shape == b.shape, (layer, p, a.shape, b.shape)
        out[f"{layer}:{p}" if layer is not None else p] = _rel(a, b)
    return out


def _record(s: Setup, name, errs):
    _measured.setdefault(s.extra.get("source", "?"), {})[name] = errs
    REPORT.write_text(json.dumps(_measured, indent=1))


# ------------------------------------------------------------------------------------------- tests


def test_fp32_matches_hf_at_every_point(setup):
    t0 = time.perf_counter()
    info, tr = _run(setup, "fp32", _engine(setup, numeric="fp32"))
    setup.extra["replay_time"] = time.perf_counter() - t0
    assert info["ranges_valid"] and info["warning"] is None
    assert info["mask"] == setup.im_mask.int().tolist()
    errs = _errors(tr, setup.ref32)
    _record(setup, "fp32_vs_hf_fp32", errs)
    bad = {k: v for k, v in errs.items() if v > 1e-5}
    assert not bad, bad
    L = tr.num_layers
    assert L == setup.ws.model.num_layer
    for i in range(L):
        for lin in PLORA_LINEARS:
            m = tr.get(i, plora_key(lin, "mask"))
            assert m.dtype == torch.uint8 and m.tolist() == setup.im_mask.int().tolist()
            ref_meta = setup.ref32.plora(i, lin)
            mine = tr.plora(i, lin)
            assert mine["rank"] == ref_meta["rank"] and mine["scale"] == pytest.approx(ref_meta["scale"])
            assert mine["applied"] is True
            d = tr.get(i, plora_key(lin, "delta"))
            assert not d[~setup.im_mask].any() and d[setup.im_mask].abs().sum() > 0
    assert tr.meta.side == "replay" and tr.meta.dtype == "float32" and tr.meta.layouts == {}
    ex = tr.meta.extras
    assert ex["numeric"] == "fp32" and ex["semantics"] == "0.7.1" and ex["ranges_valid"] is True
    assert ex["lora_mask"] == setup.im_mask.int().tolist() and ex["serve_from"] == "hf"


def test_emulate_within_bf16_noise(setup):
    import copy

    info, tr = _run(setup, "emu", _engine(setup, numeric="emulate"))
    assert tr.meta.dtype == "bfloat16" and tr.meta.extras["numeric"] == "emulate"
    # stored as float32, holding the rounded (bf16) values TurboMind keeps between kernels
    for i in range(tr.num_layers):
        for p in LAYER_POINTS:
            v = tr.get(i, p)
            assert v.dtype == torch.float32 and torch.equal(v, v.to(torch.bfloat16).float()), p
    model16 = copy.deepcopy(setup.model).to(torch.bfloat16)
    ref_bf16 = _hf_capture(model16, setup.embeds, setup.im_mask, setup.tmp / "refbf16", torch.bfloat16)
    del model16
    emu = _errors(tr, setup.ref32)
    floor = _errors(ref_bf16, setup.ref32)
    _record(setup, "emulate_vs_hf_fp32", emu)
    _record(setup, "hf_bf16_vs_hf_fp32", floor)
    _record(setup, "emulate_vs_hf_bf16", _errors(tr, ref_bf16))
    for k, v in emu.items():
        assert v <= max(4 * floor[k], 2e-2), (k, v, floor[k])


def test_no_runtime_plora_changes_only_image_rows(setup):
    _, on = _run(setup, "on", _engine(setup, numeric="emulate"))
    info, off = _run(setup, "off", _engine(setup, numeric="emulate", semantics=SEM_072))
    assert info["lora_applied"] is False and info["ranges_valid"] is True
    assert off.meta.extras["semantics"] == "0.7.2"
    first_img = IMG[0]
    img = setup.im_mask
    for i in range(off.num_layers):
        for lin in PLORA_LINEARS:
            assert not off.get(i, plora_key(lin, "delta")).any()
            assert not off.get(i, plora_key(lin, "mask")).any()
            assert off.plora(i, lin)["applied"] is False
        for p in LAYER_POINTS:
            # rows before the first image never see image rows: bit-identical everywhere
            assert torch.equal(on.get(i, p)[:first_img], off.get(i, p)[:first_img]), (i, p)
    for p in ("norm", "output"):
        assert torch.equal(on.get(None, p)[:first_img], off.get(None, p)[:first_img]), p
    # layer 0: identical up to the first PLoRA linear; there every text row is bit-identical, image rows not
    assert torch.equal(on.get(0, "attention_norm"), off.get(0, "attention_norm"))
    a, b = on.get(0, "attention.wqkv"), off.get(0, "attention.wqkv")
    assert torch.equal(a[~img], b[~img])
    assert not torch.equal(a[img], b[img])
    # text rows after the image attend to image keys/values, so they change from layer 0's attention on
    assert not torch.equal(on.get(0, "attention")[IMG[1]:], off.get(0, "attention")[IMG[1]:])


@pytest.mark.parametrize("case,embs,ranges,reason", [
    ("unsorted", "two", [(9, 13), (2, 6)], "unsorted or overlapping"),
    ("overlap", "two", [(2, 7), (5, 9)], "unsorted or overlapping"),
    ("past_end", "one", [(15, ROWS + 2)], "past the input"),
    ("too_few_rows", "short", [(5, 13)], "embedding rows"),
    ("empty", "zero", [(5, 5)], "empty or reversed"),
])
def test_invalid_ranges_mean_no_embeddings_no_lora(standin, case, embs, ranges, reason):
    s = standin
    h = s.ws.model.hidden_units
    g = torch.Generator().manual_seed(2)
    mk = lambda n: torch.randn(n, h, generator=g)  # noqa: E731
    emb = {"two": [mk(4), mk(4)] if case != "overlap" else [mk(5), mk(4)],
           "one": [mk(ranges[0][1] - ranges[0][0])], "short": [mk(7)], "zero": [mk(0)]}[embs]
    call = EngineCall(s.call.input_ids, emb, ranges, "bad")
    info, tr = _run(s, f"bad_{case}", _engine(s, numeric="emulate"), call)
    assert info["ranges_valid"] is False
    assert info["warning"].startswith(WARNING_TEXT) and reason in info["warning"]
    assert tr.meta.extras["ranges_valid"] is False and WARNING_TEXT in tr.meta.extras["range_warning"]
    assert info["mask"] == [0] * ROWS and info["lora_applied"] is False
    table = s.ws.tensor("tok_embeddings.weight").float()
    assert torch.equal(tr.get(None, "embeddings"), table[torch.tensor(s.call.input_ids)])
    for i in range(tr.num_layers):
        for lin in PLORA_LINEARS:
            assert not tr.get(i, plora_key(lin, "delta")).any()
            assert not tr.get(i, plora_key(lin, "mask")).any()


def test_row_count_is_checked_only_in_total_like_turbomind():
    # TurboMind checks the concatenated byte count only: a surplus is accepted, rows are taken in order.
    h = 4
    e0, e1 = torch.arange(3 * h).float().reshape(3, h), 100 + torch.arange(3 * h).float().reshape(3, h)
    rc = validate_ranges(10, [e0, e1], [(1, 3), (5, 8)], h, torch.float32)
    assert rc["valid"] and rc["ranges"] == [(1, 3), (5, 8)]
    assert torch.equal(rc["rows"][0], e0[:2])
    assert torch.equal(rc["rows"][1], torch.cat([e0[2:], e1[:2]]))  # shifted by one row
    assert len(rc["row_count_mismatch"]) == 1  # embedding 0: 3 rows for a 2-row range
    # negative range ends the list (lmdeploy pads ranges with -1)
    rc = validate_ranges(10, [e0, e1], [(1, 4), (-1, -1)], h, torch.float32)
    assert rc["valid"] and rc["ranges"] == [(1, 4)] and rc["ignored_after"] == 1
    # touching ranges are fine
    assert validate_ranges(10, [e0, e1], [(1, 4), (4, 7)], h, torch.float32)["valid"]
    # embeddings are cast to the weight dtype, as lmdeploy's prepare_embeddings does
    rc = validate_ranges(10, [e0 + 1 / 3], [(1, 4)], h, torch.bfloat16)
    assert rc["rows"][0].dtype == torch.bfloat16
    with pytest.raises(ValueError):
        validate_ranges(10, [e0], [(1, 4), (4, 7)], h, torch.float32)


def test_teacher_forced_local_errors_at_fp32_level(setup):
    info, tr = _run(setup, "local", _engine(setup, numeric="fp32"), teacher=setup.ref32)
    assert info["mode"] == "local" and tr.meta.extras["teacher"] == str(setup.ref32.root)
    assert info["mask"] == setup.im_mask.int().tolist()  # the engine's own mask
    errs = _errors(tr, setup.ref32)
    _record(setup, "local_fp32_vs_hf_fp32", errs)
    bad = {k: v for k, v in errs.items() if v > 1e-5}
    assert not bad, bad
    _, emu_local = _run(setup, "local_emu", _engine(setup, numeric="emulate"), teacher=setup.ref32)
    errs = _errors(emu_local, setup.ref32)
    _record(setup, "local_emulate_vs_hf_fp32", errs)
    assert max(errs.values()) < 2e-2


def test_teacher_inputs_are_used(standin, tmp_path):
    # Replace the teacher's layer-0 "attention" with zeros: the engine's local wo must then be exactly zero.
    s = standin
    src = s.ref32
    w = TraceWriter(tmp_path / "t", TraceMeta(**{**src.meta.__dict__}))
    w.pre("embeddings", src.get(None, "embeddings"))
    for i in range(src.num_layers):
        d = src.layer(i)
        if i == 0:
            d["attention"] = torch.zeros_like(d["attention"])
        w.layer(i, d)
    w.post("norm", src.get(None, "norm"))
    w.post("output", src.get(None, "output"))
    t = w.close()
    _, tr = _run(s, "local_zero", _engine(s, numeric="fp32"), teacher=t)
    assert not tr.get(0, "attention.wo").any()
    assert not tr.get(0, "attention.wo:input").any()
    # layer 1's norm input is the teacher's layer-0 output, not the engine's own
    assert _rel(tr.get(1, "attention_norm"), src.get(1, "attention_norm")) < 1e-5
    with pytest.raises(ValueError, match="rows"):
        short = EngineCall(s.call.input_ids[:-1], s.call.input_embeddings, s.call.input_embedding_ranges, "x")
        _run(s, "local_short", _engine(s, numeric="fp32"), call=short, teacher=t)


def test_rank_mismatch_raises(setup):
    import copy
    import dataclasses

    ws = copy.copy(setup.ws)
    ws.lora = dataclasses.replace(setup.ws.lora, lora_r=16, lora_rank_pattern="", lora_scale_pattern="")
    with pytest.raises(ValueError, match="rank mismatch at layers.0.attention.w_qkv"):
        _run(setup, "rank", _engine(setup, ws=ws, numeric="fp32"))
    # not checked where TurboMind never loads the LoRA tensors (served from the workspace folder)
    info, _ = _run(setup, "rank_ws", _engine(setup, ws=ws, numeric="fp32", serve_from="workspace"))
    assert info["lora_applied"] is False


def test_workspace_serving_trap_replays_lora_absent(setup):
    info, tr = _run(setup, "wstrap", _engine(setup, numeric="fp32", serve_from="workspace"))
    assert info["lora_applied"] is False and info["ranges_valid"] is True and info["lora_loaded"] is False
    assert "uninitialised" in tr.meta.extras["lora_buffers"] and tr.meta.extras["serve_from"] == "workspace"
    for i in range(tr.num_layers):
        for lin in PLORA_LINEARS:
            assert not tr.get(i, plora_key(lin, "delta")).any()
    # embeddings are still injected
    assert torch.equal(tr.get(None, "embeddings")[IMG[0]:IMG[1]], setup.embeds[IMG[0]:IMG[1]])


def test_lora_policy_off_means_no_mask(standin):
    s = standin
    ws = FakeWorkspace(s.model.state_dict(), CFG, dtype=torch.bfloat16,
                       lora=plora_settings(lora_policy="", lora_r=0, lora_scale=0.0, lora_max_wo_r=0))
    info, tr = _run(s, "nolora", _engine(s, ws=ws, numeric="fp32"))
    assert info["mask"] == [0] * ROWS and info["ranges_valid"]
    assert tr.plora(0, "attention.wqkv")["rank"] == 0


def test_per_linear_rank_and_scale_patterns(standin, tmp_path):
    # 4KHD-style config on the stand-in: w_qkv has its own rank and scale through the patterns.
    import copy

    s = standin
    model = copy.deepcopy(s.model)
    with torch.no_grad():
        for layer in model.model.layers:
            lin = layer.attention.wqkv
            lin.Plora_A.weight = nn.Parameter(lin.Plora_A.weight[:4].clone())
            lin.Plora_B.weight = nn.Parameter(lin.Plora_B.weight[:, :4].clone())
            lin.lora_r, lin.lora_alpha, lin.lora_scaling = 4, 12.0, 3.0
    lora = plora_settings(lora_r=CFG["lora_r"], lora_scale=CFG["lora_scale"], lora_max_wo_r=CFG["lora_r"],
                            lora_rank_pattern="attention.w_qkv:4", lora_scale_pattern="attention.w_qkv:3.0")
    ws = FakeWorkspace(model.state_dict(), CFG, dtype=torch.bfloat16, lora=lora)
    ref = _hf_capture(model, s.embeds, s.im_mask, tmp_path / "ref", torch.float32)
    info, tr = _run(s, "patterns", _engine(s, ws=ws, numeric="fp32"))
    assert tr.plora(0, "attention.wqkv") == {"rank": 4, "scale": 3.0, "applied": True}
    assert tr.plora(1, "attention.wo")["rank"] == CFG["lora_r"]
    errs = _errors(tr, ref)
    assert max(errs.values()) < 1e-5, max(errs.items(), key=lambda kv: kv[1])
    # a wrong scale is accepted silently (TurboMind does not check it): only the deltas move
    ws.lora = plora_settings(lora_r=CFG["lora_r"], lora_scale=CFG["lora_scale"], lora_max_wo_r=CFG["lora_r"],
                               lora_rank_pattern="attention.w_qkv:4")
    _, tr2 = _run(s, "patterns_scale", _engine(s, ws=ws, numeric="fp32"))
    assert tr2.plora(0, "attention.wqkv")["scale"] == CFG["lora_scale"]
    d_ok, d_bad = tr.get(0, "attention.wqkv:delta"), tr2.get(0, "attention.wqkv:delta")
    assert torch.allclose(d_bad * 3.0, d_ok * CFG["lora_scale"], rtol=1e-5, atol=1e-6)


def test_dynamic_ntk_only_past_max_position(standin):
    import copy

    s = standin
    ws = copy.copy(s.ws)
    ws.attention = {**s.ws.attention, "use_dynamic_ntk": 1, "rope_scaling_type": "dynamic",
                    "rope_scaling_factor": 2.0, "max_position_embeddings": ROWS}
    eng = _engine(s, ws=ws, numeric="fp32")
    assert eng._rope_theta(ROWS) == CFG["rope_theta"]
    info, tr = _run(s, "ntk_short", eng)
    assert info["rope_theta"] == CFG["rope_theta"]
    # one row past max_position_embeddings: base * (2 * 20/19 - 1) ** (D / (D - 2))
    D = CFG["head_dim"]
    assert eng._rope_theta(ROWS + 1) == pytest.approx(CFG["rope_theta"] * (2 * (ROWS + 1) / ROWS - 1) ** (D / (D - 2)))


# ------------------------------------------------------------------------------------------- run_pair


def _trace_values(tr: Trace) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(Path(tr.root).glob("*.safetensors")):
        from safetensors import safe_open

        with safe_open(str(f), "pt") as fh:
            for k in fh.keys():
                out[f"{f.name}/{k}"] = fh.get_tensor(k)
    return out


def _assert_same_trace(a: Trace, b: Trace):
    va, vb = _trace_values(a), _trace_values(b)
    assert sorted(va) == sorted(vb)
    for k in va:
        assert va[k].dtype == vb[k].dtype and torch.equal(va[k], vb[k]), k
    assert a.meta == b.meta


class _CountingWorkspace:
    """Proxy of a workspace that counts tensor reads."""

    def __init__(self, ws):
        self._ws, self.reads = ws, {}

    def tensor(self, name, *a, **k):
        self.reads[name] = self.reads.get(name, 0) + 1
        return self._ws.tensor(name, *a, **k)

    def __getattr__(self, name):
        return getattr(self._ws, name)


@pytest.mark.parametrize("numeric", ["fp32", "emulate"])
def test_run_pair_is_bit_identical_to_two_runs(setup, numeric):
    s = setup
    ws = _CountingWorkspace(s.ws)
    eng = _engine(s, ws=ws, numeric=numeric)
    info_e, tr_e = _run(s, f"pair-ref-e2e-{numeric}", eng)
    info_l, tr_l = _run(s, f"pair-ref-local-{numeric}", eng, teacher=s.ref32)
    ws.reads.clear()
    mk = lambda n: TraceWriter(s.tmp / n, TraceMeta(side="replay", case="t", num_layers=CFG["layers"], dtype=""))  # noqa: E731
    pe, pl = eng.run_pair(s.call, mk(f"pair-e2e-{numeric}"), mk(f"pair-local-{numeric}"), s.ref32)
    _assert_same_trace(pe["trace"], tr_e)
    _assert_same_trace(pl["trace"], tr_l)
    drop = lambda i: {k: v for k, v in i.items() if k != "trace"}  # noqa: E731
    assert drop(pe) == drop(info_e) and drop(pl) == drop(info_l)
    assert pe["mode"] == "e2e" and pl["mode"] == "local"
    # one pass over the weights: every workspace tensor read once
    assert ws.reads and max(ws.reads.values()) == 1, {k: v for k, v in ws.reads.items() if v > 1}
    assert "layers.0.attention.w_qkv.weight" in ws.reads and "output.weight" in ws.reads


class _KeepingWriter(TraceWriter):
    """Keeps every value it is given, uncopied (as a writer that does not clone does), and a copy of it."""

    def __init__(self, root):
        super().__init__(root, TraceMeta(side="replay", case="t", num_layers=CFG["layers"], dtype=""))
        self.kept: list[tuple[str, torch.Tensor, torch.Tensor]] = []
        self.shared: list = []

    def _keep(self, name, value):
        self.kept.append((name, value, value.clone()))

    def pre(self, name, value):
        self._keep(name, value)
        super().pre(name, value)

    def post(self, name, value):
        self._keep(name, value)
        super().post(name, value)

    def layer(self, index, values):
        ptrs = {}
        for k, v in values.items():
            self._keep(f"{index}:{k}", v)
            p = v.untyped_storage().data_ptr()
            if p in ptrs:
                self.shared.append((index, ptrs[p], k))
            ptrs[p] = k
        super().layer(index, values)


@pytest.mark.parametrize("numeric", ["fp32", "emulate"])
def test_values_handed_to_writers_are_fresh(standin, numeric, tmp_path):
    """A writer may keep what it is given without copying: no two values of a layer share memory (safetensors
    refuses to save that) and the engine never changes a value after handing it over."""
    s = standin
    for sem in (SEM_071, SEM_072):  # with and without LoRA (a linear without LoRA returns its base)
        eng = _engine(s, numeric=numeric, semantics=sem)
        we, wl = _KeepingWriter(tmp_path / f"e-{sem.version}"), _KeepingWriter(tmp_path / f"l-{sem.version}")
        eng.run_pair(s.call, we, wl, s.ref32)
        w1 = _KeepingWriter(tmp_path / f"r-{sem.version}")
        eng.run(s.call, w1)
        for w in (we, wl, w1):
            assert not w.shared, w.shared
            for name, v, copy in w.kept:
                assert torch.equal(v, copy), name
