"""Per-layer capture from a live TurboMind (parity/deploy/live.py, truncate.py, parity/layerwise.py).

No machine here runs TurboMind, so the orchestration is exercised with test doubles:

* `ReplayStandIn` (TEST DOUBLE, tests only) plays the live engine: it converts the (truncated) model folder
  with lmdeploy's real converter (`parity.deploy.convert.convert_cached`, honouring the folder's
  `parity_lora_config.json`) and returns the REPLAY engine's final-norm output.
* `FakeTurboMind` / `FakeInstance` (TEST DOUBLES) stand in for lmdeploy 0.7.1's `TurboMind` /
  `TurboMindInstance` so `LiveTurboMind` itself runs on CPU: `from_pretrained` calls lmdeploy's real
  in-memory conversion entry point (`deploy.converter.get_tm_model`, as `TurboMind._from_hf` does) and the
  C++ engine is replaced by the replay; `async_stream_infer` has the real signature (checked) and slices
  its outputs as the real one does.

Tests marked `gpu` need a CUDA GPU with lmdeploy's compiled extension and are skipped elsewhere.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import dataclasses
import hashlib
import inspect
import io
import json
import math
import os
import shutil
import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from parity.compare.thresholds import Thresholds
from parity.deploy import live
from parity.deploy.convert import convert_cached
from parity.deploy.replay import ReplayEngine
from parity.deploy.truncate import (LORA_CONFIG_FILE, MARKER_NAME, NOLORA_OVERRIDE, TruncatedModels,
                                    lora_override, write_truncated)
from parity.deploy.versions import semantics_for
from parity.deploy.workspace import Workspace
from parity.errors import EngineUnavailable, ParityInputError
from parity.inputs import default_cases, engine_call, hf_call, prepare
from parity.layerwise import (EngineBuilds, LayerCase, LayerResult, LayerTarget, PipelineCase, PloraTarget, bisect,
                              every_layer, findings, first_true, max_bisect_builds, plora_effect, run_layers)
from parity.records import FaultHooks
from parity.reference.session import ReferenceSession
from parity.trace import TraceMeta, TraceWriter

REPO = Path(__file__).resolve().parents[1]
CACHE = REPO / ".cache" / "live-tests"
LAYERS = 6
FAULT_SCALE = 2.0
SEM_071 = semantics_for("0.7.1")
SEM_080 = semantics_for("0.8.0")  # converter writes LoRA, runtime ignores it


# ------------------------------------------------------------------------------------------- test doubles


class ReplayStandIn:
    """TEST DOUBLE for `parity.deploy.live.LiveTurboMind` (used only by these tests).

    Converts `model_dir` with lmdeploy's real converter (cached; the folder's parity_lora_config.json is
    the lora_config override) and replays the workspace on CPU; `final_hidden` is the final-norm output.
    """

    def __init__(self, model_dir: Path, cache: Path, semantics=SEM_071, numeric: str = "fp32"):
        ws = convert_cached(model_dir, cache, lora_config=lora_override(model_dir))
        self.engine = ReplayEngine(Workspace.open(ws), semantics, numeric=numeric)

    def final_hidden(self, call) -> torch.Tensor:
        with tempfile.TemporaryDirectory(prefix="parity-standin-") as d:
            w = TraceWriter(Path(d), TraceMeta(side="replay", case="standin", num_layers=0, dtype="float32"))
            self.engine.run(call, w)
            return w.close().get(None, "norm").clone()


def standin_factory(semantics=SEM_071, numeric: str = "fp32"):
    def make(model_dir: Path) -> ReplayStandIn:
        return ReplayStandIn(model_dir, CACHE / "workspaces", semantics, numeric)
    return make


# ------------------------------------------------------------------------------------------- fixtures


def _code_hash() -> str:
    h = hashlib.sha256()
    gen = REPO / "parity" / "fixtures"
    for p in sorted(gen.rglob("*.py")):
        h.update(p.name.encode() + p.read_bytes())
    return h.hexdigest()[:12]


def _cached_dir(name: str, build) -> Path:
    """REPO/.cache/live-tests/<name>-<generator hash>, built once (temp folder + rename)."""
    dest = CACHE / f"{name}-{_code_hash()}"
    if (dest / ".done").is_file():
        return dest
    CACHE.mkdir(parents=True, exist_ok=True)
    tmp = CACHE / f".{dest.name}.{os.getpid()}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    build(tmp)
    (tmp / ".done").write_text("ok\n")
    if dest.exists():
        shutil.rmtree(dest)
    os.rename(tmp, dest)
    return dest


@pytest.fixture(scope="session")
def deep_model() -> Path:
    """A 6-layer tiny XComposer2-7b (head_dim 128 as lmdeploy requires; 2 heads, 1 kv head)."""
    from parity.fixtures import FixtureSpec, write_model

    spec = FixtureSpec(name="xcomposer2-deep", layers=LAYERS, heads=2, kv_heads=1, intermediate=256,
                       vision_layers=1, seed=11)
    return _cached_dir("xcomposer2-deep", lambda d: write_model(spec, d))


def _faulty(src: Path, layer: int, name: str) -> Path:
    """A copy of `src` whose layer `layer` attention.wo Plora_B is scaled: a deployment-side fault."""
    from safetensors.torch import load_file, save_file

    def build(d: Path) -> None:
        shutil.copytree(src, d, ignore=shutil.ignore_patterns(".done"))
        sd = load_file(str(d / "model.safetensors"))
        key = f"model.layers.{layer}.attention.wo.Plora_B.weight"
        sd[key] = (sd[key].float() * FAULT_SCALE).to(sd[key].dtype)
        save_file(sd, str(d / "model.safetensors"), metadata={"format": "pt"})

    return _cached_dir(name, build)


@pytest.fixture(scope="session")
def faulty_layer1(deep_model) -> Path:
    return _faulty(deep_model, 1, "xcomposer2-deep-fault1")


@pytest.fixture(scope="session")
def faulty_layer4(deep_model) -> Path:
    return _faulty(deep_model, 4, "xcomposer2-deep-fault4")


@pytest.fixture(scope="session")
def session(deep_model):
    with ReferenceSession(deep_model, trust_remote_code=True) as s:
        yield s


@pytest.fixture(scope="session")
def case(session):
    """(prepared, hf call, engine call) of the default case (text, one image, text)."""
    from parity.fixtures import IMAGES_DIR

    ref = session.ref
    c = default_cases(sorted(Path(IMAGES_DIR).glob("*.png"))[0])[0]
    p = prepare(c, ref.tokenize, ref.embed_tokens, ref.encode_image, ref.bos_id, ref.decode)
    return p, hf_call(p), engine_call(p)


@pytest.fixture(scope="session")
def target(session, case) -> LayerTarget:
    p, hc, _ = case
    return LayerTarget.from_session(session, hc, p, numeric="fp32")


@pytest.fixture(scope="session")
def layer_cases(target, case) -> list[LayerCase]:
    return [LayerCase(target, case[2])]


def _models(src: Path) -> TruncatedModels:
    # keep=True: the copies (and their converted workspaces) are reused by later test runs
    return TruncatedModels(src, CACHE / "truncated", keep=True)


@pytest.fixture(scope="session")
def clean_models(deep_model):
    return _models(deep_model)


@pytest.fixture(scope="session")
def clean_every(layer_cases, clean_models):
    builds = EngineBuilds(standin_factory())
    return every_layer(layer_cases, clean_models, builds), builds


@pytest.fixture(scope="session")
def fault1_every(layer_cases, faulty_layer1):
    builds = EngineBuilds(standin_factory())
    return every_layer(layer_cases, _models(faulty_layer1), builds), builds


# ------------------------------------------------------------------------------------------- truncation


def _keys(path: Path) -> list[str]:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        return list(f.keys())


def test_truncated_copy_contents(deep_model, tmp_path):
    k = 2
    marker = write_truncated(deep_model, tmp_path / "k2", k, "lora")
    cfg = json.loads((tmp_path / "k2" / "config.json").read_text())
    full = json.loads((deep_model / "config.json").read_text())
    assert cfg["num_hidden_layers"] == k
    assert {a: b for a, b in cfg.items() if a != "num_hidden_layers"} == \
        {a: b for a, b in full.items() if a != "num_hidden_layers"}
    keys = _keys(tmp_path / "k2" / "model.safetensors")
    layers = {int(x.split(".")[2]) for x in keys if x.startswith("model.layers.")}
    assert layers == {0, 1}
    assert any("Plora_A" in x for x in keys)
    assert any(x.startswith("vit.") for x in keys), "vision tensors must be kept"
    assert "model.norm.weight" in keys and "output.weight" in keys
    # every non-layer tensor and every tensor of the kept layers is there, bit for bit
    from safetensors.torch import load_file

    src, dst = load_file(str(deep_model / "model.safetensors")), load_file(str(tmp_path / "k2" / "model.safetensors"))
    expected = {n for n in src if not (n.startswith("model.layers.") and int(n.split(".")[2]) >= k)}
    assert set(dst) == expected and all(torch.equal(src[n], dst[n]) for n in dst)
    assert marker["tensors_dropped"] == len(src) - len(dst)
    for name in ("modeling_internlm_xcomposer2.py", "tokenizer.json", "generation_config.json"):
        assert (tmp_path / "k2" / name).read_bytes() == (deep_model / name).read_bytes()
    assert not (tmp_path / "k2" / LORA_CONFIG_FILE).exists()

    # PLoRA off = the same engine and kernel path with Plora_B zero (not lora_policy '', which fuses w1/w3)
    marker = write_truncated(deep_model, tmp_path / "nolora", LAYERS, "nolora")
    nolora = load_file(str(tmp_path / "nolora" / "model.safetensors"))
    assert set(nolora) == set(src) and lora_override(tmp_path / "nolora") is None
    zeroed = [n for n in src if ".Plora_B." in n]
    assert len(zeroed) == LAYERS * 5 and marker["tensors_zeroed"] == len(zeroed)
    for n in src:
        expected = torch.zeros_like(src[n]) if n in zeroed else src[n]
        assert torch.equal(nolora[n], expected) and nolora[n].dtype == src[n].dtype, n


def test_truncate_rejects_bad_k(deep_model, tmp_path):
    for k in (0, LAYERS + 1):
        with pytest.raises(ParityInputError, match="num_hidden_layers=6"):
            write_truncated(deep_model, tmp_path / f"k{k}", k)
    with pytest.raises(ParityInputError, match="1 <= k <= 6"):
        TruncatedModels(deep_model, tmp_path).get(7)


def test_sharded_and_bin_checkpoints(deep_model, tmp_path):
    """A sharded safetensors checkpoint: an untouched shard is symlinked, a fully dropped one omitted, and the
    index lists exactly the kept tensors (lmdeploy's own loader counts per-layer tensors from it)."""
    from safetensors.torch import load_file, save_file

    sd = load_file(str(deep_model / "model.safetensors"))
    src = tmp_path / "sharded"
    shutil.copytree(deep_model, src, ignore=shutil.ignore_patterns("model.safetensors", ".done"))
    late = {n for n in sd if n.startswith("model.layers.") and int(n.split(".")[2]) >= 3}
    save_file({n: sd[n] for n in sd if n not in late}, str(src / "model-00001-of-00002.safetensors"))
    save_file({n: sd[n] for n in late}, str(src / "model-00002-of-00002.safetensors"))
    wm = {n: ("model-00002-of-00002.safetensors" if n in late else "model-00001-of-00002.safetensors") for n in sd}
    (src / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": wm}))

    out = tmp_path / "k3"
    write_truncated(src, out, 3)
    assert (out / "model-00001-of-00002.safetensors").is_symlink()
    assert not (out / "model-00002-of-00002.safetensors").exists()
    index = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    assert set(index) == set(sd) - late

    from parity.deploy.compat import cpu_converter_patches

    with cpu_converter_patches():
        from lmdeploy.turbomind.deploy.loader import create_loader

        loader = create_loader(str(out), r"model.layers.([0-9]+).")
        seen = sorted(i for i, _ in loader.items() if i >= 0)
    assert seen == [0, 1, 2]

    # pytorch_model.bin checkpoints are truncated into .bin files as well
    bsrc = tmp_path / "bin"
    shutil.copytree(deep_model, bsrc, ignore=shutil.ignore_patterns("model.safetensors", ".done"))
    torch.save(sd, str(bsrc / "pytorch_model.bin"))
    write_truncated(bsrc, tmp_path / "bin-k1", 1, "nolora")
    kept = torch.load(str(tmp_path / "bin-k1" / "pytorch_model.bin"), weights_only=True)
    assert {n for n in kept if n.startswith("model.layers.")} == {n for n in sd if n.startswith("model.layers.0.")}
    assert all(torch.equal(kept[n], torch.zeros_like(sd[n]) if ".Plora_B." in n else sd[n]) for n in kept)


def test_truncated_models_cache_and_cleanup(deep_model, tmp_path):
    with TruncatedModels(deep_model, tmp_path) as models:
        assert models.get(None) == deep_model.resolve()  # the full model with LoRA is the source itself
        a = models.get(2)
        assert (a / MARKER_NAME).is_file()
        mtime = (a / "model.safetensors").stat().st_mtime_ns
        assert models.get(2) == a and (a / "model.safetensors").stat().st_mtime_ns == mtime  # cached
        b = models.get(None, "nolora")
        assert a.exists() and b.exists() and a != b
        again = TruncatedModels(deep_model, tmp_path, keep=True)
        assert again.get(2) == a and not again.created  # another object finds the cached copy
        again.release(a)
        assert a.exists()  # keep=True: release is a no-op
        models.release(b)
        assert not b.exists() and models.get(None, "nolora") == b and b.exists()  # written again on demand
        models.release(deep_model.resolve())
        assert deep_model.exists()  # the source itself is never removed
    assert not a.exists() and not b.exists() and deep_model.exists()


def test_truncated_models_cache_clears_a_killed_builds_temp(deep_model, tmp_path):
    """A build killed outright leaves a hidden temp folder beside its entry; the next build of that entry removes
    it (the writer's process is gone) and a running writer's is left alone."""
    import subprocess
    import sys

    models = TruncatedModels(deep_model, tmp_path)
    dest = models.path_for(2)
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead = tmp_path / f".{dest.name}.tmp.{int(gone.stdout)}.{'a' * 12}"
    alive = tmp_path / f".{dest.name}.tmp.{os.getpid()}.{'b' * 12}"
    for d in (dead, alive):
        d.mkdir(parents=True)
        (d / "half.bin").write_bytes(b"x")
    assert models.get(2) == dest and (dest / MARKER_NAME).is_file()
    assert not dead.exists() and alive.is_dir()
    models.cleanup()


def test_truncation_matches_full_model_layer(session, deep_model, case, target, tmp_path):
    """A k-layer truncated model's own HF forward ends with exactly norm(hidden_k) of the full model."""
    from parity.reference.loader import load_reference

    _, hc, _ = case
    for k in (1, 4):
        d = tmp_path / f"k{k}"
        write_truncated(deep_model, d, k)
        ref_k = load_reference(d, trust_remote_code=True)
        assert ref_k.anatomy.num_layers == k
        with torch.no_grad():
            out = ref_k.model.model(inputs_embeds=hc.inputs_embeds, im_mask=hc.im_mask, use_cache=False)
        got = out.last_hidden_state[0].double()
        torch.testing.assert_close(got, target.expected(k), rtol=0, atol=0)
    # and the k = L value is the reference's own final norm output
    torch.testing.assert_close(target.expected(LAYERS), target.reference.get(None, "norm").double(), rtol=0, atol=0)


def test_layer_target_norm_holds_the_deployed_weights():
    """Issue 15: lmdeploy 0.7.1 writes no float32 weights, so a float32 checkpoint's workspace holds float16 ones
    and the reference holds them that way (`ReferenceSession.hold_weights_as`). The final norm the layer-wise
    target applies to layer k-1's output must too (and compute as the floor model computes): with k = L it is
    the reference's and the floor's own "norm" point, bit for bit, in both numeric modes."""
    from parity.fixtures import IMAGES_DIR, FixtureSpec, write_model

    spec = FixtureSpec(name="xcomposer2-fp32-norm", layers=2, heads=2, kv_heads=1, intermediate=256, vision_layers=1,
                       vision_hidden=16, seed=5, dtype="float32")
    model = _cached_dir("xcomposer2-fp32-norm", lambda d: write_model(spec, d))
    with ReferenceSession(model, trust_remote_code=True) as s:
        s.hold_weights_as(torch.float16)
        assert s.weights_dtype == torch.float16
        w = s.ref.anatomy.final_norm.weight
        assert not torch.equal(w.to(torch.float16).to(w.dtype), w)  # the rounding is visible in the norm
        ref = s.ref
        c = default_cases(sorted(Path(IMAGES_DIR).glob("*.png"))[0])[0]
        p = prepare(c, ref.tokenize, ref.embed_tokens, ref.encode_image, ref.bos_id, ref.decode)
        hc = hf_call(p)
        for numeric, floor_dtype in (("fp32", torch.float64), ("emulate", torch.float16)):
            t = LayerTarget.from_session(s, hc, p, numeric=numeric, floor_dtype=floor_dtype)
            torch.testing.assert_close(t.expected(2), t.reference.get(None, "norm").double(), rtol=0, atol=0)
            torch.testing.assert_close(t.floor_value(2), t.floor.get(None, "norm").double(), rtol=0, atol=0)


# ------------------------------------------------------------------------------------------- every / bisect


def test_every_layer_clean_model_passes(clean_every):
    results, builds = clean_every
    assert [r.layer for r in results] == list(range(LAYERS))
    assert builds.count == LAYERS
    for r in results:
        assert not r.exceeded, (r.layer, r.metrics["rel_l2"], r.threshold)
        assert 0 < r.metrics["rel_l2"] < 1e-5 and r.floor > 0
        assert r.threshold == Thresholds().threshold(r.floor, "fp32")


def test_every_layer_locates_fault(fault1_every):
    results, _ = fault1_every
    exceeded = [r.layer for r in results if r.exceeded]
    assert exceeded == list(range(1, LAYERS)), [(r.layer, r.metrics["rel_l2"]) for r in results]
    first = next(r for r in results if r.exceeded)
    assert first.positions == "image"  # the fault is in a PLoRA branch: at its own layer only image rows move
    assert first.metrics["rel_l2"] > 100 * first.threshold


def test_bisect_clean(layer_cases, clean_models, clean_every):
    builds = EngineBuilds(standin_factory())
    res = bisect(layer_cases, clean_models, builds)
    assert res.first_divergent_layer is None and res.first is None
    assert res.builds == len(res.evaluated) <= res.max_builds == math.ceil(math.log2(LAYERS + 1))
    assert res.max_builds <= math.ceil(math.log2(LAYERS)) + 1
    assert res.evaluated[-1] == LAYERS  # the full model was checked


@pytest.mark.parametrize("layer", [1, 4])
def test_bisect_finds_first_divergent_layer(layer, layer_cases, faulty_layer1, faulty_layer4, fault1_every):
    src = {1: faulty_layer1, 4: faulty_layer4}[layer]
    builds = EngineBuilds(standin_factory())
    res = bisect(layer_cases, _models(src), builds)
    assert res.first_divergent_layer == layer, res.to_dict()["evaluated"]
    assert res.first is not None and res.first.layers_kept == layer + 1 and res.first.exceeded
    assert builds.count == res.builds <= math.ceil(math.log2(LAYERS)) + 1
    assert len(set(builds.log)) == builds.count  # no model built twice
    if layer == 1:  # every mode agrees
        every, _ = fault1_every
        assert min(r.layer for r in every if r.exceeded) == res.first_divergent_layer
        by_k = {r.layers_kept: r for r in every}
        for r in res.results:
            assert r.exceeded == by_k[r.layers_kept].exceeded
            assert r.metrics["rel_l2"] == pytest.approx(by_k[r.layers_kept].metrics["rel_l2"], rel=1e-12)
    found = findings(res.results)
    first = min(found, key=lambda f: f.layer)
    assert first.layer == layer and first.module == "layer" and first.check == "hidden"
    assert first.positions == "image" and first.severity == "error"


@settings(max_examples=200, deadline=None)
@given(n=st.integers(1, 200), data=st.data())
def test_first_true_property(n, data):
    t = data.draw(st.integers(1, n + 1))  # first true index (n + 1: none)
    calls = []

    def pred(k):
        calls.append(k)
        return k >= t

    k, evaluated = first_true(1, n, pred)
    assert k == (t if t <= n else None)
    assert evaluated == calls and len(set(calls)) == len(calls)
    assert len(calls) <= max_bisect_builds(n) <= math.ceil(math.log2(n)) + 1


def _result(layer: int, exceeded: bool) -> LayerResult:
    m = {"rel_l2": 0.5 if exceeded else 1e-7, "max_abs": 1.0, "max_abs_row": 0, "max_abs_col": 0,
         "by_class": {"image": {"rel_l2": 0.5 if exceeded else 1e-7}}}
    return LayerResult("c", layer, layer + 1, m, 1e-7, 1e-6, exceeded, "image" if exceeded else None, "x")


def test_findings_one_error_per_divergent_run():
    """An end-to-end value stays diverged after the layer that caused it: one error per run of exceeded
    (evaluated) layers, the rest of the run as one info finding."""
    rs = [_result(i, e) for i, e in enumerate([False, True, True, True, False, True])]
    found = findings(rs)
    errors = [(f.layer, f.module, f.check) for f in found if f.severity == "error"]
    assert errors == [(1, "layer", "hidden"), (5, "layer", "hidden")]
    (info,) = [f for f in found if f.severity == "info"]
    assert info.metrics["layers"] == [2, 3]
    # bisection evaluates k = 4, 2, 1: the unevaluated layer between two exceeded ones does not split the run
    found = findings([_result(3, True), _result(1, True), _result(0, False)])
    assert [f.layer for f in found if f.severity == "error"] == [1]


def test_run_layers_pipeline_entry(session, case, target, faulty_layer1):
    """What run_parity calls for `--engine turbomind --layers bisect` (here with the replay stand-in)."""
    p, hc, call = case
    pc = PipelineCase(p, hc, call, target.reference, target.floor)
    found, section = run_layers("bisect", faulty_layer1, CACHE, session, [pc], "fp32", torch.float64, Thresholds(),
                                standin_factory(), keep_copies=True)
    assert section["bisect"]["first_divergent_layer"] == 1
    assert section["builds"] <= math.ceil(math.log2(LAYERS)) + 1 + 1  # bisection + the no-LoRA deployment
    errors = [f for f in found if f.severity == "error"]
    assert errors[0].check == "hidden" and errors[0].layer == 1 and errors[0].positions == "image"
    assert any(f.check == "plora" and f.cause in ("weight_mismatch", "lora_scale_mismatch") for f in errors)
    json.dumps(section)  # goes into report.json as is


# ------------------------------------------------------------------------------------------- PLoRA on/off


@pytest.fixture(scope="session")
def plora_target(session, case, target):
    return PloraTarget.from_session(session, case[1], target)


def test_reference_no_lora_run_is_base_model(plora_target, case, target):
    p = case[0]
    eff = plora_target.effect
    before = torch.zeros(p.image_rows.numel(), dtype=torch.bool)
    before[: int(torch.nonzero(p.image_rows)[0])] = True
    assert torch.count_nonzero(eff[before]) == 0  # rows before the image: the all-False branch adds exactly 0
    assert float(eff[p.image_rows].norm()) > 0.05 * float(target.expected(LAYERS)[p.image_rows].norm())


def test_plora_effect_matches_on_clean_model(plora_target, case, clean_models):
    builds = EngineBuilds(standin_factory())
    (eff,) = plora_effect([(plora_target, case[2])], clean_models, builds)
    assert builds.count == 2
    assert not eff.exceeded and eff.cause is None, eff.message
    assert eff.ratio == pytest.approx(1.0, abs=1e-4) and eff.cosine > 0.99999
    assert findings(effects=[eff]) == []


def test_plora_effect_detects_ignored_plora(plora_target, case, clean_models):
    """lmdeploy 0.8.0 converts PLoRA and then ignores it: the engine's PLoRA effect is zero."""
    builds = EngineBuilds(standin_factory(SEM_080))
    (eff,) = plora_effect([(plora_target, case[2])], clean_models, builds)
    assert eff.exceeded and eff.cause == "lora_not_applied", eff.message
    assert eff.eng_norm == 0.0 and eff.ratio == 0.0
    (f,) = findings(effects=[eff])
    assert f.cause == "lora_not_applied" and f.positions == "image"


def test_plora_effect_names_scale_fault(plora_target, case, faulty_layer4):
    builds = EngineBuilds(standin_factory())
    (eff,) = plora_effect([(plora_target, case[2])], _models(faulty_layer4), builds)
    assert eff.exceeded and eff.cause in ("lora_scale_mismatch", "weight_mismatch"), eff.message


# ------------------------------------------------------------------------------------------- live engine


def test_live_turbomind_refuses_here(deep_model):
    ok, reason = live.available()
    if ok:
        pytest.skip("this machine can run TurboMind")
    assert "torch.cuda.is_available() is False" in reason or "_turbomind" in reason
    with pytest.raises(EngineUnavailable) as e:
        live.LiveTurboMind(deep_model)
    msg = str(e.value)
    assert isinstance(e.value, ParityInputError) and e.value.exit_code == 2
    assert reason in msg and "--engine replay" in msg and "\n" not in msg
    with pytest.raises(EngineUnavailable):
        live.live_factory()


class FakeInstance:
    """TEST DOUBLE of lmdeploy 0.7.1's TurboMindInstance (same `async_stream_infer` / `async_end` signatures).

    The embeddings go through lmdeploy's real `prepare_embeddings` (weight-dtype cast, concatenation into one
    int8 buffer, IntTensor ranges) and come back out of that buffer as the C++ engine reads it; a range list
    the C++ check rejects (`replay.validate_ranges` mirrors it) is logged on file descriptor 2 as TurboMind's
    logger does, and the run goes on without embeddings. `output_logits=None` returns no logits.
    `FakeTurboMind.request_error` makes a request raise a RuntimeError, as a failing C++ call does.

    Sessions follow `LlamaBatch::ProcessInferRequests` (v0.7.1): `sequence_start` creates one, a later request
    continues it at `step` (the session's tokens cut back to it, a negative or too large step meaning its end),
    a request past `session_len` is refused, the sequence is limited to session_len - 1 tokens, `sequence_end`
    (or `async_end`) erases it; a request generates `max_new_tokens` greedy tokens, appended to the session's
    tokens (the last one predicted, never fed). The C++ engine's values are the replay's, recomputed over the
    session's whole sequence each time (attention is causal, so a row's values are what a KV cache gives).
    Output buffers are sized as `ModelRequest::Forward` sizes them and sliced as lmdeploy's Python slices them
    ('all': `[:seq_len - 1]`; 'generation': `[:seq_len - input_len]`, rows from the last input row on; rows a
    buffer holds beyond what the engine wrote are stale: NaN here).

    Faults (class attributes of FakeTurboMind): `flip_step` (the logits row predicting that generated token
    puts its least likely token first: a flipped token), `lora_on_generated` (a LoRA mask of 1 on every row
    after the prompt: PLoRA applied to generated tokens)."""

    def __init__(self, tm: "FakeTurboMind"):
        self.tm = tm
        self.tm_model = tm  # prepare_embeddings reads self.tm_model.config.weight_type
        self.sessions: dict[int, dict] = {}

    def _forward(self, seq: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """(final hidden [rows, hidden], logits [rows, vocab]) of the session's whole sequence, float32."""
        from parity.deploy.replay import MaskedRows
        from parity.records import EngineCall

        call = EngineCall(list(seq["tokens"]), list(seq["embs"]), list(seq["ranges"]), "fake")
        engine, P = self.tm.engine, seq["prompt"]
        prepare = engine._prepare
        if FakeTurboMind.lora_on_generated and engine.plora_policy:
            def prepare_with_lora(c):  # the fault: generated rows get a LoRA mask of 1
                prep = prepare(c)
                mask = prep.rows.mask.clone()
                mask[P:] = 1
                return dataclasses.replace(prep, rows=MaskedRows.of(mask))
            engine._prepare = prepare_with_lora
        try:
            with tempfile.TemporaryDirectory() as d:
                w = TraceWriter(Path(d), TraceMeta(side="fake", case="fake", num_layers=0, dtype="bf16"))
                engine.run(call, w)
                tr = w.close()
                hidden, logits = tr.get(None, "norm").float().clone(), tr.get(None, "output").float().clone()
        finally:
            engine._prepare = prepare
        k = FakeTurboMind.flip_step
        if k is not None and 0 <= P - 1 + k < logits.shape[0]:  # the row predicting generated token k
            row = logits[P - 1 + k]
            row[int(row.argmin())] = float(row.max()) + 5.0
        return hidden, logits

    async def async_end(self, session_id):
        self.tm.requests.append(dict(session_id=session_id, end=True))
        self.sessions.pop(session_id, None)

    async def async_stream_infer(self, session_id, input_ids, input_embeddings=None, input_embedding_ranges=None,
                                 sequence_start: bool = True, sequence_end: bool = False, step=0,
                                 gen_config=None, stream_output=False, **kwargs):
        from lmdeploy.messages import EngineOutput, ResponseType
        from lmdeploy.turbomind.turbomind import TurboMindInstance

        from parity.deploy.replay import WEIGHT_DTYPES, validate_ranges

        self.tm.requests.append(dict(session_id=session_id, sequence_start=sequence_start,
                                     sequence_end=sequence_end, step=step, input_ids=list(input_ids),
                                     gen_config=gen_config))
        assert isinstance(input_ids, list) and gen_config.max_new_tokens >= 1
        if FakeTurboMind.request_error:
            raise RuntimeError(FakeTurboMind.request_error)
        embs: list[torch.Tensor] = []
        ranges: list[tuple[int, int]] = []
        emb_buf, range_buf = TurboMindInstance.prepare_embeddings(self, input_embeddings, input_embedding_ranges)
        if emb_buf is not None:  # what the C++ engine receives: one sequence's int8 buffer and [k, 2] ranges
            hidden = int(self.tm.config.model_config.hidden_units)
            dtype = WEIGHT_DTYPES[self.tm.config.weight_type]
            embs = [emb_buf[0].view(dtype).reshape(-1, hidden)]
            ranges = [tuple(r) for r in range_buf[0].tolist()]
            if not validate_ranges(len(input_ids), embs, ranges, hidden, dtype)["valid"]:
                os.write(2, b"[TM][WARNING] [ImageFeature] Skip invalid input embeddings, id = %d\n" % session_id)
                embs, ranges = [], []
        session_len = int(self.tm.config.session_len)
        await asyncio.sleep(0)
        if sequence_start:
            self.sessions[session_id] = {"tokens": [], "embs": [], "ranges": [], "prompt": None}
        seq = self.sessions.get(session_id)
        n = len(input_ids)
        if seq is None or n > session_len:  # kInvalid / kTooLong: an error status
            yield EngineOutput(ResponseType.INTERNAL_ENGINE_ERROR, [], 0)
            return
        s = len(seq["tokens"]) if step < 0 or step > len(seq["tokens"]) else step
        if s + n > session_len:
            yield EngineOutput(ResponseType.INTERNAL_ENGINE_ERROR, [], 0)
            return
        seq["tokens"] = seq["tokens"][:s]  # seq.tokens.resize(step); embeddings past it dropped
        keep = [i for i, (b, e) in enumerate(seq["ranges"]) if e <= s]
        seq["embs"], seq["ranges"] = [seq["embs"][i] for i in keep], [seq["ranges"][i] for i in keep]
        seq["embs"] += embs
        seq["ranges"] += [(b + s, e + s) for b, e in ranges]
        seq["tokens"] += [int(t) for t in input_ids]
        if seq["prompt"] is None:
            seq["prompt"] = len(seq["tokens"])
        ctx = len(seq["tokens"])
        new = min(gen_config.max_new_tokens, session_len - 1 - ctx)  # seq_len_limit truncated to session_len - 1
        generated: list[int] = []
        hidden, logits = self._forward(seq)
        for j in range(max(new, 0)):
            if j:  # the token generated last is fed: one more row
                seq["tokens"].append(generated[-1])
                hidden, logits = self._forward(seq)
            generated.append(int(logits[-1].argmax()))  # top_k=1
        fed = len(seq["tokens"])  # rows computed: the input and every generated token but the last
        if generated:
            seq["tokens"].append(generated[-1])
        seq_len = len(seq["tokens"])
        if sequence_end:
            self.sessions.pop(session_id, None)

        def out(values: torch.Tensor, kind: str | None, dtype: torch.dtype) -> torch.Tensor | None:
            if not kind:
                return None
            if kind == "all":  # rows from the first input row (cache_len == step here), then every fed token
                rows, size, cut = values[s:fed], min(n + gen_config.max_new_tokens, session_len) + 1, seq_len - 1
            else:  # 'generation': the last input row, then every fed generated token
                rows = values[ctx - 1:fed]
                size, cut = min(gen_config.max_new_tokens, session_len) + 1, seq_len - n
            buf = torch.full((size, values.shape[1]), float("nan"))
            buf[:rows.shape[0]] = rows[:size]
            return buf[:cut].to(dtype)

        yield EngineOutput(ResponseType.FINISH, generated, len(generated),
                           logits=out(logits, gen_config.output_logits, torch.float32),
                           last_hidden_state=out(hidden, gen_config.output_last_hidden_state, torch.bfloat16))


class FakeTurboMind:
    """TEST DOUBLE of lmdeploy 0.7.1's TurboMind: lmdeploy's real in-memory conversion (`get_tm_model`, as
    `_from_hf` calls it), written to a workspace, and the replay engine in place of the C++ one.

    Faults to inject (class attributes, reset by the `fake_turbomind` fixture): `load_error` (a RuntimeError
    from the C++ load), `request_error` (from a request), `close_error` (from close()), `leak` (close() does not
    give back the engine's GPU memory). GPU memory is a ledger: each engine holds `GPU_BYTES_PER_ENGINE`
    until closed; `free_gpu_bytes()` stands in for torch.cuda.mem_get_info."""

    load_error: str | None = None
    request_error: str | None = None
    close_error: str | None = None
    leak = False
    flip_step: int | None = None
    lora_on_generated = False
    held = 0
    GPU_TOTAL = 80 << 30
    GPU_BYTES_PER_ENGINE = 15 << 30

    @classmethod
    def free_gpu_bytes(cls) -> int:
        return cls.GPU_TOTAL - cls.held

    def __init__(self, model_path, engine_config):
        if FakeTurboMind.load_error:
            raise RuntimeError(FakeTurboMind.load_error)
        FakeTurboMind.held += self.GPU_BYTES_PER_ENGINE
        from lmdeploy.turbomind.deploy.config import TurbomindModelConfig
        from lmdeploy.turbomind.deploy.converter import get_tm_model

        from parity.deploy.compat import cpu_converter_patches

        self.requests: list[dict] = []
        self.dir = None
        if (Path(model_path) / "triton_models").exists():  # _from_workspace: config.yaml as written
            import yaml

            cfg = yaml.safe_load((Path(model_path) / "triton_models" / "weights" / "config.yaml").read_text())
            self.config = TurbomindModelConfig.from_dict(cfg)
            self.engine = ReplayEngine(Workspace.open(model_path), self.semantics, numeric="emulate",
                                       serve_from="workspace")
        else:  # _from_hf: in-memory conversion (written to a temp workspace for the replay)
            self.dir = Path(tempfile.mkdtemp(prefix="parity-fake-tm-"))
            weights = self.dir / "triton_models" / "weights"
            weights.mkdir(parents=True)
            with cpu_converter_patches(), contextlib.redirect_stdout(io.StringIO()):  # lmdeploy's tprint
                tm_model = get_tm_model(model_path, None, None, engine_config, out_dir=str(weights))
                tm_model.export()
            self.config = copy.deepcopy(tm_model.tm_config)
            self.engine = ReplayEngine(Workspace.open(self.dir), self.semantics, numeric="emulate")
        self.config.update_from_engine_config(engine_config)
        FakeTurboMind.built.append(self)

    built: list["FakeTurboMind"] = []
    semantics = SEM_071  # which runtime the replay plays

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str, tokenizer: object, model_name: str = None,
                        chat_template_name: str = None, engine_config=None, **kwargs):
        assert tokenizer is not None
        return cls(pretrained_model_name_or_path, engine_config)

    def create_instance(self, cuda_stream_id=0):
        return FakeInstance(self)

    def close(self):
        if self.dir is not None:
            shutil.rmtree(self.dir, ignore_errors=True)
        if FakeTurboMind.close_error:
            raise RuntimeError(FakeTurboMind.close_error)
        if not FakeTurboMind.leak:
            FakeTurboMind.held -= self.GPU_BYTES_PER_ENGINE


@pytest.fixture
def fake_turbomind(monkeypatch):
    from parity.deploy.compat import cpu_converter_patches

    with cpu_converter_patches():
        import lmdeploy.turbomind as lt
        import lmdeploy.turbomind.turbomind as real

    def sig(f):  # names, kinds and defaults (annotations are strings in this module)
        return [(p.name, p.kind, p.default) for p in inspect.signature(f).parameters.values()]

    for name in ("from_pretrained", "create_instance"):
        assert sig(getattr(FakeTurboMind, name)) == sig(getattr(real.TurboMind, name))
    assert sig(FakeInstance.async_stream_infer) == sig(real.TurboMindInstance.async_stream_infer)
    assert sig(FakeInstance.async_end) == sig(real.TurboMindInstance.async_end)
    monkeypatch.setattr(lt, "TurboMind", FakeTurboMind)
    monkeypatch.setattr(live, "available", lambda: (True, "fake TurboMind (tests)"))
    monkeypatch.setattr(live, "_free_gpu_bytes", FakeTurboMind.free_gpu_bytes)
    FakeTurboMind.built = []
    FakeTurboMind.load_error = FakeTurboMind.request_error = FakeTurboMind.close_error = None
    FakeTurboMind.leak = False
    FakeTurboMind.held = 0
    FakeTurboMind.flip_step, FakeTurboMind.lora_on_generated = None, False
    return FakeTurboMind


def test_live_turbomind_api_with_fake_engine(fake_turbomind, deep_model, case, tmp_path):
    """LiveTurboMind drives the (fake) 0.7.1 API: engine config, async generator, output slicing, traces."""
    _, _, call = case
    with live.LiveTurboMind(deep_model, session_len=512) as eng:
        assert eng.serve_from == "hf" and eng.warnings == [] and eng.lora_override is None
        out = eng.infer(call)
        tm = fake_turbomind.built[-1]
        req = tm.requests[-1]
        assert req["sequence_start"] and req["sequence_end"]
        g = req["gen_config"]
        assert (g.max_new_tokens, g.output_logits, g.output_last_hidden_state) == (1, "all", "all")
        rows = len(call.input_ids)
        assert out.last_hidden_state.shape == (rows, 256) and out.logits.shape[0] == rows
        assert torch.isfinite(out.last_hidden_state).all() and out.last_hidden_state.dtype == torch.float32
        expected = ReplayStandIn(deep_model, CACHE / "workspaces", numeric="emulate").final_hidden(call)
        torch.testing.assert_close(out.last_hidden_state, expected.to(torch.bfloat16).float(), rtol=0, atol=0)
        info = eng.info()
        assert info["kind"] == "turbomind" and info["dtype"] == "bfloat16" and info["serve_from"] == "hf"
        assert info["lora_config"]["lora_policy"] == "plora" and info["session_len"] == 512
        w = TraceWriter(tmp_path / "t", TraceMeta(side="x", case="default", num_layers=0, dtype="x"))
        res = eng.run(call, w)
        assert res["trace"].get(None, "norm").shape == (rows, 256) and res["trace"].meta.side == "turbomind"
        with pytest.raises(ValueError, match="teacher"):
            eng.run(call, w, teacher=res["trace"])
        second = eng.infer(call)
        assert tm.requests[-1]["session_id"] != req["session_id"]
        assert torch.equal(second.last_hidden_state, out.last_hidden_state)
    assert eng.tm is None


def test_live_nolora_copy_keeps_the_plora_kernel_path(fake_turbomind, deep_model, tmp_path):
    """The no-LoRA copy is served with lora_policy 'plora' (separate w1/w3, LoRA branch computed on zero
    Plora_B), so PLoRA on/off differ only by the LoRA, not by a fused-GEMM kernel path; a lora_config override
    still reaches lmdeploy's own converter in the live process."""
    d = tmp_path / "nolora"
    write_truncated(deep_model, d, 2, "nolora")
    with live.LiveTurboMind(d) as eng:
        assert eng.config.lora_config.lora_policy == "plora" and eng.lora_override is None
    with live.LiveTurboMind(d, lora_config=NOLORA_OVERRIDE) as eng:
        assert eng.config.lora_config.lora_policy == "" and eng.lora_override == NOLORA_OVERRIDE


def test_live_warns_on_workspace(fake_turbomind, deep_model, case):
    """Serving a converted workspace is allowed but warned about: its LoRA buffers stay uninitialised (the
    fake replays that as LoRA absent, so image rows differ from the HF-served engine)."""
    ws = convert_cached(deep_model, CACHE / "workspaces")
    p, _, call = case
    with live.LiveTurboMind(ws) as eng:
        assert eng.serve_from == "workspace" and len(eng.warnings) == 1
        assert "workspace" in eng.warnings[0] and "lora_a/lora_b" in eng.warnings[0]
        (f,) = eng.warning_findings()
        assert f.severity == "warning" and f.cause == "lora_not_applied"
        from_ws = eng.final_hidden(call)
    with live.LiveTurboMind(deep_model) as eng:
        from_hf = eng.final_hidden(call)
    first_img = int(torch.nonzero(p.image_rows)[0])
    assert torch.equal(from_ws[:first_img], from_hf[:first_img])
    assert not torch.allclose(from_ws[p.image_rows], from_hf[p.image_rows], rtol=0.05, atol=0.05)
    with pytest.raises(ParityInputError, match="cannot apply to the converted workspace"):
        live.LiveTurboMind(ws, lora_config=NOLORA_OVERRIDE)


def test_layerwise_with_live_engine_fake(fake_turbomind, deep_model, case, session, tmp_path):
    """The orchestration driving LiveTurboMind itself (fake 0.7.1 engine in bf16): PLoRA on/off."""
    p, hc, call = case
    tgt = LayerTarget.from_session(session, hc, p, numeric="emulate", floor_dtype=torch.bfloat16)
    pt = PloraTarget.from_session(session, hc, tgt, floor_dtype=torch.bfloat16)
    with TruncatedModels(deep_model, tmp_path) as models:
        builds = EngineBuilds(lambda d: live.LiveTurboMind(d))
        (eff,) = plora_effect([(pt, call)], models, builds)
        assert builds.count == 2 and not eff.exceeded, eff.message
        (r,) = every_layer([LayerCase(tgt, call)], models, builds, layers=[3])
        assert not r.exceeded and r.layer == 2, (r.metrics["rel_l2"], r.threshold)


@pytest.mark.gpu
def test_live_turbomind_on_gpu(deep_model, case, target, session, tmp_path):
    """Needs a CUDA GPU with lmdeploy 0.7.1's compiled TurboMind: every layer and the PLoRA effect, live."""
    ok, reason = live.available()
    if not ok:
        pytest.skip(f"TurboMind cannot run here: {reason}")
    p, hc, call = case
    tgt = LayerTarget.from_session(session, hc, p, numeric="emulate", floor_dtype=torch.bfloat16)
    pt = PloraTarget.from_session(session, hc, tgt, floor_dtype=torch.bfloat16)
    with TruncatedModels(deep_model, tmp_path) as models:
        builds = EngineBuilds(live.live_factory(session_len=1024))
        results = every_layer([LayerCase(tgt, call)], models, builds)
        assert not any(r.exceeded for r in results), [(r.layer, r.metrics["rel_l2"], r.threshold) for r in results]
        res = bisect([LayerCase(tgt, call)], models, builds)
        assert res.first_divergent_layer is None
        (eff,) = plora_effect([(pt, call)], models, builds)
        assert not eff.exceeded, eff.message


# ------------------------------------------------------------------------------------------- live engine defects


def test_live_per_layer_calls_ask_no_logits(fake_turbomind, deep_model, case):
    """final_hidden (every per-layer call) asks for the hidden state only; logits ('all': GBs at 8k rows and a
    92k vocabulary) only where the report needs them."""
    _, _, call = case
    with live.LiveTurboMind(deep_model) as eng:
        hidden = eng.final_hidden(call)
        g = fake_turbomind.built[-1].requests[-1]["gen_config"]
        assert g.output_logits is None and g.output_last_hidden_state == "all"
        full = eng.infer(call)
        assert fake_turbomind.built[-1].requests[-1]["gen_config"].output_logits == "all"
        assert torch.equal(hidden, full.last_hidden_state) and full.logits.shape[0] == len(call.input_ids)


def test_live_ranges_checked_before_the_call_and_engine_stderr_kept(fake_turbomind, deep_model, case, capfd):
    """A range list TurboMind rejects is named from Python (the replay's mirror of the C++ check), and what the
    C++ engine wrote to stderr is kept in the run's info (and still printed)."""
    from dataclasses import replace

    _, _, call = case
    (b, e), = call.input_embedding_ranges
    bad = replace(call, input_embedding_ranges=[(b, len(call.input_ids) + 5)])  # ends past the input
    with live.LiveTurboMind(deep_model) as eng:
        good = eng.run(call, TraceWriter(Path(tempfile.mkdtemp()), TraceMeta(side="x", case="c", num_layers=0,
                                                                            dtype="x")))
        assert good["ranges_valid"] is True and good["engine_stderr"] == []
        info = eng.run(bad, TraceWriter(Path(tempfile.mkdtemp()), TraceMeta(side="x", case="c", num_layers=0,
                                                                           dtype="x")))
    assert info["ranges_valid"] is False and "ends past the input" in info["reason"]
    assert info["accepted_ranges"] == []
    assert any("[ImageFeature] Skip invalid input embeddings" in ln for ln in info["engine_stderr"])
    assert "[ImageFeature]" in capfd.readouterr().err  # passed on, not swallowed
    with live.LiveTurboMind(deep_model) as eng, pytest.raises(live.LiveEngineError, match="prepare_embeddings"):
        eng.infer(replace(call, input_embedding_ranges=[]))  # lmdeploy asserts equal lengths before C++


def test_live_rejected_ranges_are_a_finding_in_the_pipeline(fake_turbomind, deep_model, tmp_path):
    """End to end through run_parity with the (fake) live engine: the inputs check names the rejected
    ranges (embeddings_skipped), from the Python-side check."""
    from dataclasses import replace

    from parity.pipeline import RunOptions, run_parity

    def past_the_end(name, call):
        (b, e), = call.input_embedding_ranges
        return replace(call, input_embedding_ranges=[(b, len(call.input_ids) + 5)])

    report = run_parity(RunOptions(model=deep_model, engine="turbomind", trust_remote_code=True, cache_dir=CACHE),
                        FaultHooks(mutate_engine_call=past_the_end))
    causes = {(f.check, f.cause) for f in report.errors()}
    assert ("inputs", "embeddings_skipped") in causes, causes


def test_live_layers_refused_with_workspace_serving(deep_model):
    """--layers with --serve-from workspace would bisect over two different deployments: exit 2, before any
    engine or model is touched."""
    from parity.pipeline import RunOptions, run_parity

    with pytest.raises(ParityInputError) as e:
        run_parity(RunOptions(model=deep_model, engine="turbomind", serve_from="workspace", layers="bisect",
                              trust_remote_code=True, cache_dir=CACHE))
    msg = str(e.value)
    assert "--serve-from workspace" in msg and "--layers" in msg and "\n" not in msg
    assert not isinstance(e.value, EngineUnavailable)


def test_live_cpp_runtime_errors_are_exit_2(fake_turbomind, deep_model, case):
    """A C++ RuntimeError (a LoRA rank TurboMind cannot hold at load; a failing request) is one paragraph with
    exit code 2, not a traceback."""
    fake_turbomind.load_error = "[TM][ERROR] Assertion fail: lora_a size mismatch (rank 24 vs 16)"
    with pytest.raises(live.LiveEngineError) as e:
        live.LiveTurboMind(deep_model)
    assert e.value.exit_code == 2 and "lora_a size mismatch" in str(e.value) and "\n" not in str(e.value)
    assert "lora_r" in str(e.value)
    fake_turbomind.load_error = None
    fake_turbomind.request_error = "CUDA error: an illegal memory access was encountered"
    with live.LiveTurboMind(deep_model) as eng, pytest.raises(live.LiveEngineError, match="illegal memory"):
        eng.infer(case[2])
    fake_turbomind.request_error = None


def test_live_close_is_checked_and_sequential_builds_free_the_gpu(fake_turbomind, deep_model, case, tmp_path):
    """Sequential builds (as --layers every makes them) each give the GPU back; a close that raises, or one
    that leaves the engine's memory held, stops the run there instead of an out-of-memory later."""
    _, _, call = case
    builds = EngineBuilds(lambda d: live.LiveTurboMind(d))
    with TruncatedModels(deep_model, tmp_path) as models:
        for k in (1, 2, 3):
            builds.final_hidden(models.get(k), [call])
        assert builds.count == 3 and fake_turbomind.held == 0
        fake_turbomind.leak = True
        with pytest.raises(live.LiveEngineError, match="less than before it was built"):
            builds.final_hidden(models.get(4), [call])
        fake_turbomind.leak, fake_turbomind.held = False, 0
        fake_turbomind.close_error = "NCCL destroy failed"
        eng = live.LiveTurboMind(deep_model)
        with pytest.raises(live.LiveEngineError, match="NCCL destroy failed") as e:
            eng.close()
        assert e.value.exit_code == 2 and eng.tm is None


def test_turbomind_environment_check_names_what_to_install(tmp_path):
    """`--engine turbomind` checks lmdeploy 0.7.1's own requirements first and names each missing piece."""
    have_wheels = all(_installed(d) for d in live.CUDA12_WHEELS)
    site = tmp_path / "site"
    for folder in live.CUDA12_WHEELS.values():
        (site / folder).mkdir(parents=True)
    complete = live.missing_requirements(torch_version="2.5.1+cu124", torch_cuda="12.4", lmdeploy_version="0.7.1",
                                         site=site)
    assert complete == [] if have_wheels else set(complete) == set(live.CUDA12_WHEELS)
    ours = live.missing_requirements(torch_version="2.13.0+cpu", torch_cuda=None, lmdeploy_version=None,
                                     site=tmp_path / "empty")
    text = " | ".join(ours)
    assert "lmdeploy==0.7.1" in text and "torch<=2.5.1 (installed: torch 2.13.0+cpu" in text
    assert "a CUDA 12 build of torch (installed: torch 2.13.0+cpu, a CPU-only build)" in text
    assert all(d in text for d in live.CUDA12_WHEELS)
    cuda13 = live.missing_requirements(torch_version="2.11.0", torch_cuda="13.0", lmdeploy_version="0.7.1", site=site)
    assert any("built for CUDA 13.0" in m for m in cuda13)
    ok, reason = live.available()
    if ok:
        pytest.skip("this machine can run TurboMind")
    if live.missing_requirements():  # this CI venv: torch 2.13 CPU
        assert reason.startswith("missing for --engine turbomind:") and "make setup-gpu" in reason
        msg = str(live.unavailable_error(reason))
        assert "\n" not in msg and "nvidia-cublas-cu12" in msg and "torch<=2.5.1" in msg


def _installed(dist: str) -> bool:
    from importlib import metadata

    try:
        metadata.distribution(dist)
        return True
    except metadata.PackageNotFoundError:
        return False


def test_pipeline_drives_live_engine_through_engine_interface(fake_turbomind, deep_model, session):
    """run_parity with --engine turbomind (fake 0.7.1 engine in bf16) goes through the same Engine interface
    as the replay: judged at the engine's precision, end to end only, per-layer bisection as its follow-up."""
    from parity.pipeline import RunOptions, run_parity

    report = run_parity(RunOptions(model=deep_model, engine="turbomind", trust_remote_code=True, session=session,
                                   cache_dir=CACHE, layers="bisect", live={"session_len": 512}))
    assert report.status == "pass", [f.message for f in report.errors()]
    e = report.engine
    assert e["kind"] == "turbomind" and e["numeric"] == "emulate" and e["dtype"] == "bfloat16"
    assert e["layerwise"]["mode"] == "bisect" and e["layerwise"]["builds"] >= 1
    assert "layers" in report.timings and fake_turbomind.built
    assert {p.module for p in report.points} == {"norm", "output"}  # the live engine exposes nothing per layer
    assert all("floor_e2e" in p.local for p in report.points)  # judged against the end-to-end floor
    assert not any(c.masks.get("engine") for c in report.cases)  # the live engine does not report its masks


# ------------------------------------------------------------------------------------------- live decode


DECODE_N = 8


def _live_decode(session, deep_model, session_len: int = 512):
    from parity.pipeline import RunOptions, run_parity

    return run_parity(RunOptions(model=deep_model, engine="turbomind", trust_remote_code=True, session=session,
                                 cache_dir=CACHE, decode=DECODE_N, live={"session_len": session_len}))


def test_live_decode_clean_passes(fake_turbomind, deep_model, session):
    """`--engine turbomind --decode N` (fake 0.7.1 engine in bf16): free-running in one request, and fed the
    reference's tokens through the same session's KV cache (`step` = prompt rows + k - 1); each step's final
    hidden state and logits judged end to end; a clean engine passes with zero error findings."""
    report = _live_decode(session, deep_model)
    assert report.status == "pass" and not report.errors(), [f.message for f in report.errors()]
    (sec,) = report.decode
    P = sec.prompt_rows
    assert sec.steps_run == DECODE_N and sec.matched_prefix == DECODE_N and sec.first_divergent_step is None
    assert {p["module"] for p in sec.points} == {"norm", "output"} and {p["layer"] for p in sec.points} == {None}
    assert {p["step"] for p in sec.points} == set(range(1, DECODE_N))  # step 0 is the prefill's last row
    assert all(p["judged"] == "e2e" and p["floor"] > 0 and not p["exceeded"] for p in sec.points)
    assert [t["position"] for t in sec.tokens[1:]] == [P + k - 1 for k in range(1, DECODE_N)]
    free = sec.engine["free_running"]
    assert free["first_divergent_step"] is None and free["agrees_with_forced"]
    assert free["compared_steps"] == DECODE_N and free["max_abs_logits_diff"] < 1e-3
    assert sec.engine["truncated_at"] is None and sec.engine["session_len"] == 512
    # the requests TurboMind received: the prefill of the end-to-end run, one free-running request of N tokens,
    # then the prompt and N - 1 continuations of one session, the last one ending it
    reqs = [r for r in fake_turbomind.built[-1].requests if "gen_config" in r]
    free_req = next(r for r in reqs if r["gen_config"].max_new_tokens == DECODE_N)
    g = free_req["gen_config"]
    assert (g.top_k, g.output_logits, g.output_last_hidden_state) == (1, "generation", "generation")
    sid = reqs[-1]["session_id"]
    forced = [r for r in reqs if r["session_id"] == sid]
    assert [r["step"] for r in forced] == [0] + [P + k - 1 for k in range(1, DECODE_N)]
    assert [r["sequence_start"] for r in forced] == [True] + [False] * (DECODE_N - 1)
    assert [r["sequence_end"] for r in forced] == [False] * (DECODE_N - 1) + [True]
    assert [r["input_ids"] for r in forced[1:]] == [[t["ref"]["id"]] for t in sec.tokens[:-1]]
    assert all(r["gen_config"].max_new_tokens == 1 for r in forced)


def test_live_decode_names_a_flipped_token(fake_turbomind, deep_model, session, tmp_path):
    """A (fake) engine whose logits put another token first at step 3: the free-running comparison diverges
    there (a clear flip: error) and the step's logits are named end to end; the reports carry it."""
    from parity.report import render_failure_message, write_reports

    fake_turbomind.flip_step = 3
    report = _live_decode(session, deep_model)
    paths = write_reports(report, tmp_path / "out")
    data = json.loads(Path(paths["json"]).read_text())
    (sec_json,) = data["decode"]
    assert sec_json["first_divergent_step"] == 3 and sec_json["engine"]["free_running"]["first_divergent_step"] == 3
    assert {p["judged"] for p in sec_json["points"]} == {"e2e"}
    assert "step 3" in render_failure_message(report)
    (sec,) = report.decode
    assert sec.first_divergent_step == 3 and sec.matched_prefix == 3
    assert sec.engine["free_running"]["first_divergent_step"] == 3
    errors = report.errors()
    tok = next(f for f in errors if f.check == "decode-tokens")
    assert tok.step == 3 and tok.severity == "error" and tok.cause == "numeric_drift"
    (step,) = [f for f in errors if f.check == "decode"]
    assert (step.step, step.module, step.layer, step.cause) == (3, "output", None, "numeric_drift")
    assert step.positions == "generated" and "end-to-end error" in step.message
    assert report.first_divergence is not None and report.first_divergence.step == 3


def test_live_decode_names_plora_on_generated_rows(fake_turbomind, deep_model, session):
    """A (fake) engine applying PLoRA on generated rows: its final hidden state moves from the first fed token
    on; the live engine shows it at step 1 (the final norm, end to end: nothing per layer to locate it further)."""
    fake_turbomind.lora_on_generated = True
    report = _live_decode(session, deep_model)
    decode = [f for f in report.errors() if f.check == "decode"]
    assert decode, [f.message for f in report.findings]
    first = min(decode, key=lambda f: f.step)
    assert first.step == 1 and first.module == "norm" and first.layer is None and first.positions == "generated"
    assert first.cause == "numeric_drift"
    assert not [f for f in report.errors() if f.check != "decode" and f.check != "decode-tokens"]  # prefill clean



def test_live_decode_stops_where_turbomind_stops(fake_turbomind, deep_model, session, case):
    """session_len leaving room for 4 of the 8 tokens: TurboMind limits the sequence to session_len - 1 tokens
    (the replay's rule, `generated_limit`); the run stops there and says so (session_truncated, step 4)."""
    P = len(case[2].input_ids)
    report = _live_decode(session, deep_model, session_len=P + 5)
    (sec,) = report.decode
    assert sec.steps_run == 4 and sec.engine["truncated_at"] == 4 and sec.engine["session_len"] == P + 5
    assert len(sec.engine["free_running"]["tokens"]) == 4
    (f,) = [f for f in report.errors() if f.check == "decode"]
    assert (f.cause, f.step) == ("session_truncated", 4)
    forced = [r for r in fake_turbomind.built[-1].requests if r.get("step", 0) >= P]
    assert [r["step"] for r in forced] == [P, P + 1, P + 2] and forced[-1]["sequence_end"]


def test_live_decode_free_running_that_disagrees_with_the_fed_steps_is_a_warning(fake_turbomind, deep_model,
                                                                                  session, monkeypatch):
    """The judged steps stand for the engine's own generation only while its free-running tokens are its greedy
    choices given the same history: a (fake) sampler that returns another token at step 2 than the logits put
    first is a warning at step 2, beside a clean teacher-forced comparison."""
    real = FakeInstance.async_stream_infer

    async def sampler_flip(self, *args, **kwargs):
        async for out in real(self, *args, **kwargs):
            if kwargs["gen_config"].max_new_tokens == DECODE_N:  # the free-running request
                out.token_ids = list(out.token_ids)
                out.token_ids[2] = (out.token_ids[2] + 1) % 128
            yield out

    monkeypatch.setattr(FakeInstance, "async_stream_infer", sampler_flip)
    report = _live_decode(session, deep_model)
    (sec,) = report.decode
    free = sec.engine["free_running"]
    assert free["first_divergent_step"] == 2 and not free["agrees_with_forced"] and free["disagrees_at"] == 2
    assert report.status == "pass" and not report.errors(), [f.message for f in report.errors()]
    (w,) = [f for f in report.findings if f.check == "decode-tokens"]
    assert w.severity == "warning" and w.step == 2 and "free-running" in w.message


@pytest.mark.gpu
def test_live_decode_on_gpu(deep_model, session):
    """Needs a CUDA GPU with lmdeploy 0.7.1's compiled TurboMind: `--decode 8` live passes clean, and the
    engine's free-running generation agrees with its token-fed steps (the continuation is its own decode)."""
    ok, reason = live.available()
    if not ok:
        pytest.skip(f"TurboMind cannot run here: {reason}")
    report = _live_decode(session, deep_model, session_len=1024)
    assert report.status == "pass", [f.message for f in report.errors()]
    (sec,) = report.decode
    free = sec.engine["free_running"]
    assert sec.steps_run == DECODE_N and free["agrees_with_forced"], free
