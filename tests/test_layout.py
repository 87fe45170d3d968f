"""HF <-> TurboMind layout transforms (parity.deploy.layout).

Property tests: every inverse undoes its forward over random shapes. Converter tests: `hf_to_tm` reproduces
what lmdeploy's real converter writes, bit for bit, on the fixture models and on variants that hit the
converter's corner cases (tp=2 with vocab / inter_size padding, head_dim != 128, replicated kv heads).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st
from safetensors.torch import load_file

from parity.deploy import layout
from parity.deploy.compat import cpu_converter_patches
from parity.deploy.convert import convert, convert_cached
from parity.deploy.workspace import ModelShape, Workspace
from parity.errors import ParityInputError
from parity.names import parse_tm_name

REPO = Path(__file__).resolve().parents[1]
WS_CACHE = REPO / ".cache" / "workspaces"

FAST = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# ----------------------------------------------------------------------------- helpers


def make_shape(H, KV, D, inter, vocab, layers, tp, weight_type="bfloat16") -> ModelShape:
    kv_cfg = tp if (tp > KV and tp % KV == 0) else KV
    inter_p = -(-inter // tp) * tp
    return ModelShape(head_num=H, kv_head_num=kv_cfg, size_per_head=D, hidden_units=H * D, num_layer=layers,
                      inter_size=[inter_p] * layers, norm_eps=1e-6, vocab_size=vocab, weight_type=weight_type,
                      tp=tp, attn_bias=0, model_arch="InternLMXComposer2ForCausalLM")


def make_hf_state(H, KV, D, inter, vocab, layers, ranks, dtype, seed=0, lora=True) -> dict[str, torch.Tensor]:
    """A random XComposer2 language-model state dict. `ranks`: tm-independent (wqkv, wo, w1, w2, w3)."""
    g = torch.Generator().manual_seed(seed)
    hid = H * D

    def rnd(*shape):
        return torch.randn(shape, generator=g).to(dtype)

    sd = {"model.tok_embeddings.weight": rnd(vocab, hid), "model.norm.weight": rnd(hid), "output.weight": rnd(vocab, hid)}
    dims = {"attention.wqkv": (hid, (H + 2 * KV) * D), "attention.wo": (H * D, hid),
            "feed_forward.w1": (hid, inter), "feed_forward.w3": (hid, inter), "feed_forward.w2": (inter, hid)}
    for i in range(layers):
        p = f"model.layers.{i}."
        sd[p + "attention_norm.weight"] = rnd(hid)
        sd[p + "ffn_norm.weight"] = rnd(hid)
        for (lin, (fin, fout)), r in zip(dims.items(), ranks):
            sd[p + f"{lin}.weight"] = rnd(fout, fin)
            if lora:
                sd[p + f"{lin}.Plora_A.weight"] = rnd(r, fin)
                sd[p + f"{lin}.Plora_B.weight"] = rnd(fout, r)
    return sd


def bits_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(layout._bits(a), layout._bits(b))


def assert_states_equal(got: dict, want: dict):
    assert sorted(got) == sorted(want)
    bad = [k for k in want if not bits_equal(got[k], want[k])]
    assert not bad, f"differ: {bad[:5]}"


# ----------------------------------------------------------------------------- activation transforms


@FAST
@given(heads=st.integers(1, 6), kv_div=st.integers(1, 6), hd=st.sampled_from([2, 4, 8, 16]), rows=st.integers(1, 3))
def test_activation_qkv_roundtrip(heads, kv_div, hd, rows):
    kv = max(1, heads // kv_div) if heads % max(1, heads // kv_div) == 0 else 1
    x = torch.randn(rows, (heads + 2 * kv) * hd)
    y = layout.hf_qkv_cols_to_tm(x, heads, kv, hd)
    assert torch.equal(layout.tm_qkv_cols_to_hf(y, heads, kv, hd), x)
    assert torch.equal(layout.pairs_to_rotary(layout.rotary_to_pairs(x, hd), hd), x)


def test_rotary_to_pairs_is_lmdeploys_permute_v2():
    with cpu_converter_patches():
        from lmdeploy.turbomind.deploy.module import permute_v2
    g = torch.Generator().manual_seed(0)
    for heads, hd, rows in [(1, 2, 1), (3, 8, 5), (4, 128, 7), (2, 64, 3)]:
        x = torch.randn(rows, heads * hd, generator=g)
        assert torch.equal(layout.rotary_to_pairs(x, hd), permute_v2(x, hd))


def test_activation_transform_matches_weight_transform():
    """x @ W_tm == tm_cols(x @ W_hf.T): the activation transform is the weight transform's column map."""
    H, KV, D = 4, 2, 8
    shape = make_shape(H, KV, D, 16, 8, 1, 1, "float16")
    sd = make_hf_state(H, KV, D, 16, 8, 1, (2, 2, 2, 2, 2), torch.float64, lora=False)
    sd = {k: v.to(torch.float16) for k, v in sd.items()}
    tm = layout.hf_to_tm(sd, shape, reader_head_dim=None)
    w_hf = sd["model.layers.0.attention.wqkv.weight"].double()
    w_tm = tm["layers.0.attention.w_qkv.weight"].double()
    x = torch.randint(-3, 4, (3, H * D)).double()  # integer rows: every product/sum is exact in float64
    assert torch.equal(layout.hf_qkv_cols_to_tm(x @ w_hf.T, H, KV, D), x @ w_tm)


# ----------------------------------------------------------------------------- whole-model round trips


@st.composite
def model_cases(draw):
    tp = draw(st.sampled_from([1, 2]))
    quirk = draw(st.booleans())  # reproduce lmdeploy's hard-coded 128 reader view with head_dim != 128
    if quirk:
        D = draw(st.sampled_from([16, 32, 64]))
        H = draw(st.sampled_from([1, 2, 4])) if tp == 1 else draw(st.sampled_from([2, 4]))
        rank = st.sampled_from([8, 16])
    else:
        D = draw(st.sampled_from([2, 4, 8]))
        H = draw(st.sampled_from([1, 2, 3, 4, 6])) if tp == 1 else draw(st.sampled_from([2, 4, 6]))
        rank = st.integers(1, 5)
    KV = draw(st.sampled_from([k for k in range(1, H + 1) if H % k == 0]))
    if tp > KV and tp % KV:
        KV = H
    inter = draw(st.integers(1, 9))
    vocab = draw(st.integers(1, 9))
    layers = draw(st.integers(1, 2))
    ranks = tuple(draw(rank) for _ in range(5))
    dtype = draw(st.sampled_from([torch.bfloat16, torch.float16]))
    lora = draw(st.booleans())
    return dict(tp=tp, quirk=quirk, D=D, H=H, KV=KV, inter=inter, vocab=vocab, layers=layers, ranks=ranks,
                dtype=dtype, lora=lora, seed=draw(st.integers(0, 2**16)))


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(model_cases())
def test_tm_to_hf_inverts_hf_to_tm(c):
    H, KV, D, tp = c["H"], c["KV"], c["D"], c["tp"]
    wt = "bfloat16" if c["dtype"] == torch.bfloat16 else "float16"
    shape = make_shape(H, KV, D, c["inter"], c["vocab"], c["layers"], tp, wt)
    hf = make_hf_state(H, KV, D, c["inter"], c["vocab"], c["layers"], c["ranks"], c["dtype"], c["seed"], c["lora"])
    rd = 128 if c["quirk"] else None
    repeated = tp > KV
    if repeated and ((c["lora"] and c["ranks"][0] != H * D) or c["quirk"]):
        # lmdeploy replicates kv heads by viewing the tensor with hidden_units rows: that fails for a PLoRA B
        # (rank rows) and after the head_dim-128 reader view of a head_dim != 128 model (see layout.py)
        with pytest.raises(ParityInputError):
            layout.hf_to_tm(hf, shape, reader_head_dim=rd)
        return
    files = layout.hf_to_tm_files(hf, shape, reader_head_dim=rd)
    tm = layout.merge_files(files, shape)
    assert all(t.dtype == c["dtype"] for t in tm.values())
    # every file has the shape config.yaml implies
    for fname, t in files.items():
        base, _ = layout.merged_name_of_file(fname)
        r = t.shape[-1] if base.endswith("lora_a.weight") else (t.shape[0] if base.endswith("lora_b.weight") else 0)
        assert tuple(t.shape) == layout.tensor_spec(base, shape, r).shard_shape
    # split_merged is merge's inverse on every tensor
    for name, t in tm.items():
        r = t.shape[-1] if name.endswith("lora_a.weight") else (t.shape[0] if name.endswith("lora_b.weight") else 0)
        spec = layout.tensor_spec(name, shape, r)
        assert tuple(t.shape) == spec.merged_shape
        for i, s in enumerate(layout.split_merged(spec, t)):
            want = files[layout.rank_file_name(name, i)] if spec.rule != layout.RULE_NONE else files[name]
            assert bits_equal(s, want), name
    back = layout.tm_to_hf(tm, shape, hf_kv_heads=KV, hf_inter_size=c["inter"], reader_head_dim=rd)
    assert_states_equal(back, hf)


def test_tp2_merged_equals_tp1():
    H, KV, D = 4, 2, 8
    hf = make_hf_state(H, KV, D, 10, 7, 2, (3, 4, 5, 6, 7), torch.bfloat16, seed=3)
    one = layout.hf_to_tm(hf, make_shape(H, KV, D, 10, 7, 2, 1), reader_head_dim=None)
    two = layout.hf_to_tm(hf, make_shape(H, KV, D, 10, 7, 2, 2), reader_head_dim=None)
    assert_states_equal(two, one)


def test_plora_a_is_never_permuted_and_b_is():
    H, KV, D = 2, 1, 4
    hf = make_hf_state(H, KV, D, 4, 3, 1, (2, 2, 2, 2, 2), torch.float16, seed=1)
    tm = layout.hf_to_tm(hf, make_shape(H, KV, D, 4, 3, 1, 1, "float16"), reader_head_dim=None)
    a = hf["model.layers.0.attention.wqkv.Plora_A.weight"]
    assert bits_equal(tm["layers.0.attention.w_qkv.lora_a.weight"], a.t().contiguous())
    b = hf["model.layers.0.attention.wqkv.Plora_B.weight"]
    assert bits_equal(tm["layers.0.attention.w_qkv.lora_b.weight"], layout.hf_qkv_cols_to_tm(b.t(), H, KV, D))
    w = hf["model.layers.0.attention.wqkv.weight"]
    assert bits_equal(tm["layers.0.attention.w_qkv.weight"], layout.hf_qkv_cols_to_tm(w.t(), H, KV, D))
    # output.weight is stored as HF has it (not transposed)
    assert bits_equal(tm["output.weight"], hf["output.weight"])


def test_names_and_rules():
    assert layout.rank_file_name("layers.0.attention.w_qkv.lora_a.weight", 1) == "layers.0.attention.w_qkv.lora_a.1.weight"
    assert layout.rank_file_name("layers.3.ffn_norm.weight", 1) == "layers.3.ffn_norm.weight"
    assert layout.rank_file_name("tok_embeddings.weight", 0) == "tok_embeddings.0.weight"
    assert layout.merged_name_of_file("layers.0.attention.w_qkv.lora_b.1.weight") == ("layers.0.attention.w_qkv.lora_b.weight", 1)
    assert layout.merged_name_of_file("layers.10.attention_norm.weight") == ("layers.10.attention_norm.weight", None)
    assert layout.merged_name_of_file("norm.weight") == ("norm.weight", None)
    assert layout.merged_name_of_file("output.1.weight") == ("output.weight", 1)
    rules = {
        "layers.0.attention.w_qkv.weight": "qkv", "layers.0.attention.w_qkv.lora_a.weight": "copy",
        "layers.0.attention.w_qkv.lora_b.weight": "qkv", "layers.0.attention.wo.weight": "row",
        "layers.0.attention.wo.lora_a.weight": "row", "layers.0.attention.wo.lora_b.weight": "copy",
        "layers.0.feed_forward.w1.weight": "col", "layers.0.feed_forward.w1.lora_a.weight": "copy",
        "layers.0.feed_forward.w3.lora_b.weight": "col", "layers.0.feed_forward.w2.weight": "row",
        "layers.0.feed_forward.w2.lora_a.weight": "row", "layers.0.feed_forward.w2.lora_b.weight": "copy",
        "tok_embeddings.weight": "emb", "output.weight": "row", "norm.weight": "none",
    }
    for name, rule in rules.items():
        assert layout.split_rule(name) == rule, name
    with pytest.raises(ParityInputError):
        parse_tm_name("layers.0.attention.wq.weight")
    with pytest.raises(ParityInputError):
        layout.tm_dtype("int8")  # no int8 weight type in TurboMind 0.7.1 (int4 is read by parity.quant)


# ----------------------------------------------------------------------------- the real converter, bit for bit


@pytest.fixture(scope="session")
def converted(fixture_models) -> dict[tuple[str, int], Path]:
    """The fixture models converted by lmdeploy's converter (tp 1 and 2), cached in .cache/workspaces."""
    return {(name, tp): convert_cached(path, WS_CACHE, tp=tp) for name, path in fixture_models.items() for tp in (1, 2)}


def _files_on_disk_match(ws: Workspace, files: dict[str, torch.Tensor]) -> list[str]:
    on_disk = sorted(p.name for p in ws.weights_dir.iterdir() if p.name != "config.yaml")
    assert on_disk == sorted(files), set(on_disk) ^ set(files)
    bad = []
    for name, t in files.items():
        raw = t.contiguous().view(torch.uint8).numpy().tobytes()
        if (ws.weights_dir / name).read_bytes() != raw:
            bad.append(name)
    return bad


@pytest.mark.parametrize("tp", [1, 2])
@pytest.mark.parametrize("name", ["xcomposer2-tiny", "xcomposer2-4khd-tiny"])
def test_forward_is_bit_exact_with_lmdeploys_converter(fixture_models, converted, name, tp):
    ws = Workspace.open(converted[(name, tp)])
    hf = load_file(str(fixture_models[name] / "model.safetensors"))
    files = layout.hf_to_tm_files(hf, ws.model)
    assert _files_on_disk_match(ws, files) == []
    tm = layout.merge_files(files, ws.model)
    assert sorted(tm) == sorted(ws.names()) == sorted(ws.expected_names())
    for n in ws.names():
        assert bits_equal(ws.tensor(n), tm[n]), n
    # and back
    hf_lm = {k: v for k, v in hf.items() if k.startswith("model.") or k == "output.weight"}
    assert_states_equal(layout.tm_to_hf(tm, ws.model), hf_lm)


def _variant(tmp_root: Path, spec, tp: int) -> tuple[Workspace, dict]:
    from parity.fixtures import write_model

    md = write_model(spec, tmp_root / spec.name)
    ws_dir = tmp_root / f"ws-{spec.name}-tp{tp}"
    convert(md, ws_dir, tp=tp)
    return Workspace.open(ws_dir), load_file(str(md / "model.safetensors"))


@pytest.fixture(scope="module")
def variants_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("layout-variants")


def test_bit_exact_with_vocab_and_inter_padding(variants_root):
    from parity.fixtures import FixtureSpec

    spec = FixtureSpec(name="odd-pad", vocab=129, intermediate=767, layers=2)
    ws, hf = _variant(variants_root, spec, 2)
    assert ws.model.inter_size == [768, 768] and ws.model.vocab_size == 129
    files = layout.hf_to_tm_files(hf, ws.model)
    assert _files_on_disk_match(ws, files) == []
    tm = layout.merge_files(files, ws.model)
    for n in ws.names():
        assert bits_equal(ws.tensor(n), tm[n]), n
    assert ws.tensor("tok_embeddings.weight").shape == (129, spec.hidden)
    assert ws.tensor("output.weight").shape == (129, spec.hidden)
    w1 = ws.tensor("layers.0.feed_forward.w1.weight")
    assert w1.shape == (spec.hidden, 768) and not w1[:, 767:].float().any()
    hf_lm = {k: v for k, v in hf.items() if k.startswith("model.") or k == "output.weight"}
    assert_states_equal(layout.tm_to_hf(tm, ws.model, hf_inter_size=767), hf_lm)


@pytest.mark.parametrize("tp", [1, 2])
def test_head_dim_64_reproduces_the_converters_hardcoded_128(variants_root, tp):
    """lmdeploy's internlm2 reader views wqkv with head_dim 128: for head_dim 64 it writes scrambled q/k/v.
    `reader_head_dim=128` (the default) reproduces those bytes; the correct layout differs from them."""
    from parity.fixtures import FixtureSpec

    spec = FixtureSpec(name=f"hd64-{tp}", head_dim=64, heads=4, kv_heads=2, layers=2)
    ws, hf = _variant(variants_root, spec, tp)
    files = layout.hf_to_tm_files(hf, ws.model)
    assert _files_on_disk_match(ws, files) == []
    correct = layout.hf_to_tm(hf, ws.model, reader_head_dim=None)
    differ = sorted(n for n in ws.names() if not bits_equal(ws.tensor(n), correct[n]))
    assert differ == [f"layers.{i}.attention.w_qkv.{k}" for i in range(2) for k in ("lora_b.weight", "weight")]


def test_replicated_kv_heads_bit_exact(variants_root):
    """tp=2 > kv heads=1: the converter replicates k/v heads (config kv_head_num becomes 2). With a wqkv
    PLoRA rank equal to hidden_units it can (any other rank makes the converter fail, see below)."""
    from parity.fixtures import FixtureSpec

    spec = FixtureSpec(name="kv1-r512", variant="4khd", kv_heads=1, layers=1, lora={"attention.wqkv": (512, 512)})
    ws, hf = _variant(variants_root, spec, 2)
    assert ws.model.kv_head_num == 2
    files = layout.hf_to_tm_files(hf, ws.model)
    assert _files_on_disk_match(ws, files) == []
    tm = layout.merge_files(files, ws.model)
    for n in ws.names():
        r = 512 if "w_qkv.lora" in n else None  # 4KHD config says rank 8: read with the rank on disk
        assert bits_equal(ws.tensor(n, rank=r), tm[n]), n
    assert ws.lora_rank_on_disk(0, "attention.w_qkv") == 512
    hf_lm = {k: v for k, v in hf.items() if k.startswith("model.") or k == "output.weight"}
    assert_states_equal(layout.tm_to_hf(tm, ws.model, hf_kv_heads=1), hf_lm)


def test_replicated_kv_heads_with_plora_fails_like_the_converter(variants_root):
    from parity.fixtures import FixtureSpec, write_model

    spec = FixtureSpec(name="kv1", kv_heads=1, layers=1)
    md = write_model(spec, variants_root / spec.name)
    with pytest.raises(ParityInputError) as e:
        convert(md, variants_root / "ws-kv1", tp=2)
    assert "converter failed" in str(e.value)
    assert not (variants_root / "ws-kv1").exists()
    hf = load_file(str(md / "model.safetensors"))
    with pytest.raises(ParityInputError):
        layout.hf_to_tm(hf, make_shape(spec.heads, 1, spec.head_dim, spec.intermediate, spec.vocab, 1, 2))


@pytest.mark.parametrize("drop", ["model.layers.0.ffn_norm.weight", "model.layers.1.attention.wo.Plora_A.weight",
                                  "model.layers.0.feed_forward.w3.Plora_B.weight", "model.layers.1.attention.wqkv.weight"])
def test_missing_hf_tensor_is_named(drop):
    hf = make_hf_state(2, 1, 4, 4, 3, 2, (2, 2, 2, 2, 2), torch.float16)
    del hf[drop]
    with pytest.raises(ParityInputError) as e:
        layout.hf_to_tm(hf, make_shape(2, 1, 4, 4, 3, 2, 1, "float16"), reader_head_dim=None)
    assert drop in str(e.value)


def test_extra_hf_layers_are_refused():
    hf = make_hf_state(2, 1, 4, 4, 3, 2, (2, 2, 2, 2, 2), torch.float16)
    with pytest.raises(ParityInputError) as e:
        layout.hf_to_tm(hf, make_shape(2, 1, 4, 4, 3, 1, 1, "float16"), reader_head_dim=None)
    assert "num_layer=1" in str(e.value)
