"""In-process patches leave transformers and lmdeploy as found, and the hub resolution holds even when they don't.

The bug these pin: run after `parity quantize` (or anything running lmdeploy 0.7.1's `init_empty_vit`) in one
process, building the genuine-shaped vl fixture failed with `'NoneType' object has no attribute 'endswith'`
inside `CLIPVisionModel.from_pretrained`: lmdeploy's `rewrite_ctx` restored that attribute by assignment (a
bound copy in CLIPVisionModel's own dict, shadowing parity's PreTrainedModel-level hub resolution), and its
gc-referrer swap rebound lmdeploy's `_CLIPVisionModel_from_pretrained` to a stale parity wrapper."""

from __future__ import annotations

import sys
import types
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from parity.errors import ParityInputError
from parity.fixtures import CLIP_HUB_ID, GENUINE_FIXTURE_NAMES, ensure, hf_home, hub_snapshot
from parity.fixtures.generator import BUILTIN_SPECS
from parity.patching import left_as_found, patched

REPO = Path(__file__).resolve().parents[1]
FIXTURE_CACHE = REPO / ".cache" / "fixtures"
VL = "xcomposer2-vl-tiny"


@pytest.fixture(scope="module")
def vl() -> Path:
    return ensure(FIXTURE_CACHE, GENUINE_FIXTURE_NAMES)[VL]


@pytest.fixture
def clip_provided(vl, monkeypatch, tmp_path):
    """The hub CLIP only as a local folder (--hub-model), with an empty HF cache: only parity's resolution finds it."""
    from parity.reference import modelcode

    monkeypatch.setenv("HF_HOME", str(tmp_path / "empty-home"))
    monkeypatch.setenv(modelcode.PROVIDED_ENV, "{}")
    modelcode.provide(CLIP_HUB_ID, hub_snapshot(BUILTIN_SPECS[VL], hf_home(FIXTURE_CACHE)))


def _vit_state():
    import lmdeploy.vl.model.xcomposer2 as xc2
    from transformers import CLIPVisionModel

    return "from_pretrained" in vars(CLIPVisionModel), xc2._CLIPVisionModel_from_pretrained


# ------------------------------------------------------------------------------------------- the helper


KINDS = ("function", "classmethod", "staticmethod")


def _make(kind):
    def f(*args):
        return args
    return {"function": f, "classmethod": classmethod(f), "staticmethod": staticmethod(f)}[kind]


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(base_kind=st.sampled_from(KINDS), sub_own=st.booleans(), how=st.sampled_from(["setattr", "rewrite_ctx"]),
       raises=st.booleans(), module_level=st.booleans())
def test_left_as_found_restores_own_entries_exactly(monkeypatch, base_kind, sub_own, how, raises, module_level):
    """Property: whatever the code inside does to the attribute (assign, or lmdeploy 0.7.1's own rewrite_ctx with
    its gc-referrer swap and its restore-by-assignment), also when it raises, the owner's own dict entry is
    exactly what it was (absent stays absent; a classmethod stays the same classmethod object) and the base
    class is untouched. lmdeploy rewrites classmethods on classes and plain functions in modules (its
    gc-referrer swap of a plain function reaches every dict holding it, a base class's too, so that case is
    the module one)."""
    from lmdeploy.vl.model.utils import rewrite_ctx

    if how == "rewrite_ctx" and not module_level:
        base_kind = "classmethod"
    probe = types.ModuleType("parity_leak_probe")
    base = type("Base", (), {"f": _make(base_kind)})
    sub = type("Sub", (base,), {"f": _make(base_kind)} if sub_own else {})
    probe.Base, probe.Sub, probe.g = base, sub, _make("function")
    monkeypatch.setitem(sys.modules, "parity_leak_probe", probe)
    owner, name, path = (probe, "g", "parity_leak_probe.g") if module_level else (sub, "f", "parity_leak_probe.Sub.f")
    # tuples: lmdeploy's swap rewrites every dict and list that refers to the function
    before_owner, before_base = tuple(vars(owner).items()), tuple(vars(base).items())

    def replacement(*args):
        return "replaced"

    with pytest.raises(RuntimeError) if raises else _nothing():
        with left_as_found(owner, name):
            if how == "setattr":
                setattr(owner, name, replacement)
                assert getattr(owner, name)() == "replaced"
                if raises:
                    raise RuntimeError("inside")
            else:
                with rewrite_ctx([path], [replacement]):
                    assert getattr(owner, name)() == "replaced"
                    if raises:
                        raise RuntimeError("inside")
    after_owner, after_base = tuple(vars(owner).items()), tuple(vars(base).items())
    assert sorted(k for k, _ in after_owner) == sorted(k for k, _ in before_owner)
    assert all(v is dict(after_owner)[k] for k, v in before_owner)
    assert len(after_base) == len(before_base) and all(v is dict(after_base)[k] for k, v in before_base)


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def test_patched_deletes_what_was_inherited():
    """Fault the helper exists for: restore-by-assignment leaves an inherited method in the subclass's dict."""
    import torch

    assert "cuda" not in vars(torch.Tensor)
    saved = torch.Tensor.cuda
    torch.Tensor.cuda = lambda self, *a, **k: self
    torch.Tensor.cuda = saved  # what the converter patches did before
    try:
        assert "cuda" in vars(torch.Tensor)  # the leak is real
    finally:
        del torch.Tensor.cuda
    with patched(torch.Tensor, "cuda", lambda self, *a, **k: self):
        assert torch.ones(1).cuda() is not None
    assert "cuda" not in vars(torch.Tensor)


def test_cpu_converter_patches_leave_torch_and_lmdeploy_as_found():
    import torch

    from parity.deploy.compat import cpu_converter_patches

    if torch.cuda.is_available():
        pytest.skip("nothing is patched on a CUDA machine")
    before = (dict(vars(torch.Tensor)), dict(vars(torch.cuda)))
    with cpu_converter_patches():
        import lmdeploy.turbomind.deploy.converter  # noqa: F401
    assert (dict(vars(torch.Tensor)), dict(vars(torch.cuda))) == before


# ------------------------------------------------------------------------------------------- lmdeploy's init_empty_vit


def test_lmdeploy_init_empty_vit_leaks_and_the_containment_undoes_it(fixture_models):
    """lmdeploy 0.7.1's own init_empty_vit, bare: it leaves CLIPVisionModel.from_pretrained in the class dict and
    rebinds its module function (the fault). Contained (as parity runs it): both as found, also on an exception."""
    import lmdeploy.vl.model.xcomposer2 as xc2
    from lmdeploy.vl.model.xcomposer2 import init_empty_vit
    from transformers import CLIPVisionModel

    from parity.deploy.image_input import init_empty_vit_contained

    model = str(fixture_models["xcomposer2-tiny"].resolve())
    clean = _vit_state()
    assert clean[0] is False and isinstance(clean[1], types.FunctionType)
    with left_as_found(CLIPVisionModel, "from_pretrained"), left_as_found(xc2, "_CLIPVisionModel_from_pretrained"):
        with init_empty_vit(model):
            pass
        leaked = _vit_state()
    assert leaked[0] is True and leaked[1] is not clean[1]  # what lmdeploy leaves behind
    assert _vit_state() == clean

    for raises in (False, True):
        with pytest.raises(RuntimeError) if raises else _nothing():
            with init_empty_vit_contained(), init_empty_vit(model):
                assert CLIPVisionModel.from_pretrained is clean[1]  # lmdeploy's no-download loader is in place
                if raises:
                    raise RuntimeError("the model's code failed while lmdeploy built the vision part")
        assert _vit_state() == clean


def test_init_empty_vit_on_a_2d5_checkpoint_leaves_its_get_font(fixture_models):
    """lmdeploy's init_empty_vit swaps an XComposer2.5 code's `get_font` for a no-op in every module that binds it
    (gc-referrer swap: the fixture's hd_vision defines it, its modeling module imports it) and, when the code
    inside raises, puts none back (the fault, shown bare). Contained, every binding is the original again."""
    import contextlib

    from lmdeploy.vl.model.xcomposer2 import init_empty_vit

    from parity.deploy.image_input import raw_folder_alias, get_font_holders, init_empty_vit_contained

    model = str(fixture_models["xcomposer2d5-tiny"].resolve())
    with raw_folder_alias(model, []):
        holders = get_font_holders(model)
        original = vars(holders[0][0])[holders[0][1]]
        assert len({id(m) for m, _ in holders}) >= 2  # the defining module and the modeling module

        def bindings():
            return [vars(m)[name] for m, name in holders]

        with contextlib.ExitStack() as guard:  # bare, the test cleans up after lmdeploy itself
            for m, name in holders:
                guard.enter_context(left_as_found(m, name))
            with pytest.raises(RuntimeError), init_empty_vit_contained(), init_empty_vit(model):
                raise RuntimeError("the model's code failed")
            assert all(f is not original for f in bindings())  # what lmdeploy leaves behind
        assert all(f is original for f in bindings())
        with pytest.raises(RuntimeError), init_empty_vit_contained(model), init_empty_vit(model):
            assert all(f is not original for f in bindings())
            raise RuntimeError("the model's code failed")
        assert all(f is original for f in bindings())


# ------------------------------------------------------------------------------------------- hub resolution


def test_hub_resolution_covers_a_subclass_level_from_pretrained(vl, clip_provided, monkeypatch):
    """Fault: CLIPVisionModel holds its own bound from_pretrained (what lmdeploy's rewrite_ctx leaves). The
    genuine build still resolves the hub CLIP through parity (before: 'NoneType'.endswith inside the build)."""
    from transformers import CLIPVisionModel

    from parity.reference.loader import load_reference

    monkeypatch.setattr(CLIPVisionModel, "from_pretrained", CLIPVisionModel.from_pretrained, raising=False)
    leaked = vars(CLIPVisionModel)["from_pretrained"]
    ref = load_reference(vl, trust_remote_code=True)
    assert ref.model.vit.vision_tower.vision_model.embeddings.position_embedding.weight.shape[0] == 35 * 35 + 1
    assert vars(CLIPVisionModel)["from_pretrained"] is leaked  # left as found


def test_missing_hub_model_is_named_even_with_a_subclass_level_from_pretrained(vl, monkeypatch, tmp_path):
    from transformers import CLIPVisionModel

    from parity.reference import modelcode
    from parity.reference.loader import load_reference

    monkeypatch.setenv("HF_HOME", str(tmp_path / "empty-home"))
    monkeypatch.setenv(modelcode.PROVIDED_ENV, "{}")
    monkeypatch.setattr(CLIPVisionModel, "from_pretrained", CLIPVisionModel.from_pretrained, raising=False)
    with pytest.raises(modelcode.MissingHubModel) as e:
        load_reference(vl, trust_remote_code=True)
    assert e.value.hub_id == CLIP_HUB_ID and "build_mlp.py (load_model" in str(e.value)
    assert isinstance(e.value, ParityInputError) and e.value.exit_code == 2


@pytest.mark.slow
def test_genuine_build_after_quantize_in_one_process(vl, fixture_models, clip_provided, tmp_path):
    """The order-dependent failure, in one process: `parity quantize` (lmdeploy's load_vl_model runs
    init_empty_vit) and then the genuine hub-tower build."""
    from parity.quant.quantize import quantize
    from parity.reference.loader import load_reference

    clean = _vit_state()
    quantize(fixture_models["xcomposer2-tiny"], tmp_path / "q", trust_remote_code=True, calib_samples=1,
             calib_seqlen=16)
    assert _vit_state() == clean
    ref = load_reference(vl, trust_remote_code=True)
    assert ref.applied and "image_size 336 -> 490" in ref.applied[0]
