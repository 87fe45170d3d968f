"""compute_dtype: outside the decoder layers, "run" casts only the modules that run, while they run, with
results bit-identical to casting everything for the whole forward ("all"), and restores the originals."""

import pytest
import torch

from parity.inputs import hf_call
from parity.reference.precision import compute_dtype


@pytest.fixture(scope="module")
def call(prepared):
    return hf_call(prepared)


def _state(model):
    return {k: (v, v.data_ptr(), v.dtype) for k, v in model.state_dict(keep_vars=True).items()}


def _assert_restored(model, before):
    after = _state(model)
    assert after.keys() == before.keys()
    for k, (v, ptr, dtype) in before.items():
        assert after[k][1] == ptr and after[k][2] == dtype, k   # the very same tensors, not re-cast copies


@torch.no_grad()
def _forward(ref, call, dtype, outside, seen=None):
    a = ref.anatomy
    got = {}
    hooks = [a.final_norm.register_forward_hook(lambda m, i, o: got.__setitem__("norm", o.clone())),
             a.lm_head.register_forward_hook(lambda m, i, o: got.__setitem__("output", o.clone()))]
    if seen is not None:
        def look(m, i, o):  # what is cast while the LM head runs
            seen["lm_head"] = a.lm_head.weight.dtype
            seen["tok_embeddings"] = a.embed_tokens.weight.dtype
            seen["vit"] = {p.dtype for p in ref.model.vit.parameters()}
            seen["vision_proj"] = {p.dtype for p in ref.model.vision_proj.parameters()}
        hooks.append(a.lm_head.register_forward_hook(look))
        hooks.append(a.final_norm.register_forward_hook(
            lambda m, i, o: seen.__setitem__("final_norm", a.final_norm.weight.dtype)))
    try:
        with compute_dtype(ref.model, a.layers, dtype, outside=outside):
            logits = ref.model(inputs_embeds=call.inputs_embeds.to(dtype), im_mask=call.im_mask,
                               use_cache=False).logits
    finally:
        for h in hooks:
            h.remove()
    return got["norm"], got["output"], logits


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_casting_only_what_runs_is_bit_identical(ref, call, dtype):
    before = _state(ref.model)
    n_all, o_all, l_all = _forward(ref, call, dtype, "all")
    _assert_restored(ref.model, before)
    seen = {}
    n_run, o_run, l_run = _forward(ref, call, dtype, "run", seen)
    _assert_restored(ref.model, before)
    assert n_all.dtype == n_run.dtype == dtype
    assert torch.equal(n_all, n_run) and torch.equal(o_all, o_run) and torch.equal(l_all, l_run)
    # the final norm and the LM head ran cast; the token embedding and the vision tower were never cast
    assert seen["final_norm"] == dtype and seen["lm_head"] == dtype
    assert seen["tok_embeddings"] == torch.float32
    assert seen["vit"] == {torch.float32} and seen["vision_proj"] == {torch.float32}


def test_run_mode_restores_the_originals_when_the_forward_fails(ref, call):
    before = _state(ref.model)

    def boom(m, i, o):
        raise RuntimeError("stop")

    for target in (ref.anatomy.lm_head, ref.anatomy.layers[1]):
        h = target.register_forward_hook(boom)
        try:
            with pytest.raises(RuntimeError, match="stop"):
                _forward(ref, call, torch.float64, "run")
        finally:
            h.remove()
        _assert_restored(ref.model, before)


def test_run_mode_casts_the_vision_tower_when_it_runs(ref):
    """A module outside the layers that runs is cast, whole, for its forward, whatever the entry point."""
    vit, vp = ref.model.vit, ref.model.vision_proj
    size = vit.vision_config.image_size
    pixels = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    before = _state(ref.model)
    out = {}
    for mode in ("run", "all"):
        with torch.no_grad(), compute_dtype(ref.model, ref.anatomy.layers, torch.float64, outside=mode):
            out[mode] = vp(vit(pixels))
        _assert_restored(ref.model, before)
    assert out["run"].dtype == torch.float64 and torch.equal(out["run"], out["all"])


def test_unknown_mode_is_refused(ref):
    with pytest.raises(ValueError, match="outside"):
        with compute_dtype(ref.model, ref.anatomy.layers, torch.float64, outside="some"):
            pass


def test_float64_run_widens_what_the_code_pins_to_float32(ref):
    """A float64 run lifts the model code's explicit float32 (`.float()`, `dtype=torch.float32`,
    `.to(torch.float32)`) to float64: XComposer2's rotary cos/sin at position ~4,000 are then the exact ones,
    where the code's float32 angles are ~1e-4 off. Without the widening the float64 run would share the float32
    rounding and the noise floor could not see it (the 4KHD one-image decode false alarm)."""
    from torch.nn import functional as F

    from parity.reference.precision import widened_float32

    x = torch.randn(3, 5)
    with widened_float32(torch.float64):
        got = [torch.arange(4, dtype=torch.float32), x.float(), x.to(torch.float32), x.to(dtype=torch.float32),
               F.softmax(x, -1, dtype=torch.float32)]
    assert all(t.dtype == torch.float64 for t in got)
    with widened_float32(torch.bfloat16):  # a low-precision floor keeps the code's float32 (as the engine does)
        assert x.double().float().dtype == torch.float32 and torch.arange(2, dtype=torch.float32).dtype == torch.float32

    rope = ref.model.model.layers[0].attention.rotary_emb
    probe = torch.zeros(1, dtype=torch.float64)
    plain, _ = rope(probe, seq_len=4000)
    with widened_float32(torch.float64):
        wide, _ = rope(probe, seq_len=4000)
    dim, base = rope.dim, rope.base
    inv = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
    ang = torch.arange(4000, dtype=torch.float64)[:, None] * inv[None, :]
    exact = torch.cat([ang, ang], -1).cos()
    assert (wide - exact).abs().max() < 1e-12
    assert (plain - exact)[-100:].abs().max() > 1e-5  # the float32 angles the float64 run used to share


class _CachedRotaryForTest(torch.nn.Module):
    """Test double of upstream XComposer2's rotary embedding: inv_freq and the cos table built once, at
    construction, as non-persistent buffers (float32 angles; the table in the default dtype)."""

    def __init__(self, dim, max_pos, base):
        super().__init__()
        self.register_buffer("inv_freq", 1.0 / (base ** (torch.arange(0, dim, 2).float() / dim)), persistent=False)
        t = torch.arange(max_pos, dtype=self.inv_freq.dtype)
        emb = torch.cat([torch.outer(t, self.inv_freq)] * 2, -1)
        self.register_buffer("cos_cached", emb.cos().to(torch.get_default_dtype()), persistent=False)


class _LayerForTest(torch.nn.Module):
    def __init__(self, config):
        super().__init__()
        self.proj = torch.nn.Linear(4, 4)
        self.rotary = _CachedRotaryForTest(config.dim, config.max_pos, config.base)
        self.seen = None

    def forward(self, x):
        self.seen = self.rotary.cos_cached  # what the forward computes with
        return self.proj(x)


def test_float64_run_rebuilds_tables_the_layer_builds_at_construction():
    """A decoder layer's construction-time tables (non-persistent buffers) are rebuilt by its own code in float64
    for a float64 run, not cast from the float32 ones (which are ~1e-4 off at position 4,000); a bfloat16 run
    casts; the originals are back afterwards."""
    from types import SimpleNamespace

    config = SimpleNamespace(dim=64, max_pos=4096, base=1e6)
    layer = _LayerForTest(config)
    model = torch.nn.Module()
    model.config, model.layers = config, torch.nn.ModuleList([layer])
    original = layer.rotary.cos_cached
    inv = 1.0 / (config.base ** (torch.arange(0, config.dim, 2, dtype=torch.float64) / config.dim))
    ang = torch.arange(config.max_pos, dtype=torch.float64)[:, None] * inv[None, :]
    exact = torch.cat([ang, ang], -1).cos()
    assert (original.double() - exact)[-100:].abs().max() > 1e-5
    with compute_dtype(model, [layer], torch.float64):
        layer(torch.zeros(1, 4, dtype=torch.float64))
    assert layer.seen.dtype == torch.float64 and (layer.seen - exact).abs().max() < 1e-12
    assert layer.rotary.cos_cached is original
    with compute_dtype(model, [layer], torch.bfloat16):
        layer(torch.zeros(1, 4, dtype=torch.bfloat16))
    assert torch.equal(layer.seen, original.to(torch.bfloat16))
