"""Fuzzing the readers of user-supplied files: only `ParityInputError` (or success) may come out.

* weight files of a real converted workspace (tp 1 and tp 2): random truncations, extensions, same-size
  rewrites, stray files -- then `Workspace.open` and every tensor read;
* config.yaml: random deletions, type changes and garbage values of its keys and sections, random YAML
  documents, random text and bytes -- then the same full read, and the replay engine built on it;
* parity-conversion.json: random JSON and bytes;
* inputs files for `parity.inputs.load_cases`: random YAML documents, text and bytes, and mutations of a
  valid file; every case that loads must be usable by the pipeline (its name is a folder name there).

Any other exception is a traceback for the user of `parity run`. Seeds that once failed are kept as
`@example`s. Deterministic (`derandomize=True`); env PARITY_FUZZ_SCALE=N runs N times as many examples.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import pytest
import torch
import yaml
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from parity.deploy.convert import convert, read_record
from parity.names import TM_LINEARS
from parity.deploy.replay import ReplayEngine
from parity.deploy.versions import semantics_for
from parity.deploy.workspace import CONFIG_NAME, RECORD_NAME, Workspace
from parity.errors import ParityInputError
from parity.fixtures import IMAGES_DIR, FixtureSpec, write_model
from parity.fixtures.generator import TOKENIZER_SIZE
from parity.inputs import load_cases
from parity.records import EngineCall
from parity.trace import TraceMeta, TraceWriter

_BASE = settings(deadline=None, derandomize=True, database=None, suppress_health_check=list(HealthCheck))


def fuzz(n: int) -> settings:
    """n examples per run in CI; env PARITY_FUZZ_SCALE multiplies them for a longer local search."""
    return settings(_BASE, max_examples=n * int(os.environ.get("PARITY_FUZZ_SCALE", "1")))
SEM = semantics_for("0.7.1")


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def workspaces(tmp_path_factory) -> dict[int, Path]:
    """A small model converted by lmdeploy's converter at tp 1 and tp 2 (pristine; tests work on copies)."""
    root = tmp_path_factory.mktemp("fuzz")
    spec = FixtureSpec(name="fuzz", variant="4khd", layers=2, heads=4, kv_heads=2, intermediate=128,
                       vocab=TOKENIZER_SIZE, vision_layers=1, vision_hidden=16, image_size=14, patch_size=7)
    model = write_model(spec, root / "model")
    return {tp: (convert(model, root / f"ws-tp{tp}", tp=tp), root / f"ws-tp{tp}")[1] for tp in (1, 2)}


@pytest.fixture(scope="module")
def scratch(tmp_path_factory, workspaces) -> dict[int, Path]:
    """Working copies of the workspaces; each example restores what it changed."""
    root = tmp_path_factory.mktemp("fuzz-scratch")
    out = {}
    for tp, src in workspaces.items():
        shutil.copytree(src, root / f"tp{tp}")
        out[tp] = root / f"tp{tp}"
    return out


def read_all(ws_dir: Path) -> Workspace:
    """Everything the pipeline asks of a workspace: open it, read every tensor, the record, the LoRA ranks."""
    ws = Workspace.open(ws_dir)
    for name in sorted(set(ws.names()) | set(ws.expected_names()), key=ws._order):
        ws.tensor(name)
    for i in range(ws.model.num_layer):
        for lin in TM_LINEARS:
            ws.lora_rank(i, lin)
            ws.lora_rank_on_disk(i, lin)
    ws.conversion_record()
    return ws


def only_input_errors(fn, *args):
    """Run fn; return (result, None) or (None, ParityInputError). Any other exception fails the test."""
    try:
        return fn(*args), None
    except ParityInputError as e:
        msg = str(e)
        assert msg.strip() and "Traceback" not in msg
        return None, e


class Restore:
    """Snapshot files (or their absence) and put them back."""

    def __init__(self, *paths: Path):
        self.saved = {p: (p.read_bytes() if p.is_file() else None) for p in paths}

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        for p, data in self.saved.items():
            if data is None:
                p.unlink(missing_ok=True)
            else:
                p.write_bytes(data)


def weights(ws_dir: Path) -> Path:
    return ws_dir / "triton_models" / "weights"


# ----------------------------------------------------------------------------- weight files


def test_pristine_workspaces_read(workspaces):
    for tp, ws_dir in workspaces.items():
        ws = read_all(ws_dir)
        assert ws.model.tp == tp and ws.names() == ws.expected_names()


@st.composite
def file_edits(draw, files: list[str]):
    name = draw(st.sampled_from(files))
    kind = draw(st.sampled_from(("truncate", "extend", "rewrite", "empty")))
    return name, kind, draw(st.integers(1, 4096)), draw(st.binary(min_size=1, max_size=64))


@fuzz(60)
@given(data=st.data(), tp=st.sampled_from((1, 2)))
def test_weight_file_size_changes_are_named(scratch, data, tp):
    ws_dir = scratch[tp]
    files = sorted(p.name for p in weights(ws_dir).iterdir() if p.name != CONFIG_NAME)
    name, kind, n, junk = data.draw(file_edits(files))
    path = weights(ws_dir) / name
    with Restore(path):
        raw = path.read_bytes()
        if kind == "truncate":
            new = raw[: max(0, len(raw) - n)]
        elif kind == "extend":
            new = raw + (junk * (n // len(junk) + 1))[:n]
        elif kind == "rewrite":  # same size, other bytes: still a readable workspace
            new = (junk * (len(raw) // len(junk) + 1))[: len(raw)]
        else:
            new = b""
        path.write_bytes(new)
        _, err = only_input_errors(read_all, ws_dir)
    if len(new) == len(raw):
        # readable, unless the file is one tp rank's copy of a replicated tensor that now differs from the others
        assert err is None or ("should be a copy" in str(err) and name.split(".")[0] in str(err))
    else:
        assert err is not None and name in str(err) and ("short" in str(err) or "long" in str(err))


@fuzz(20)
@given(data=st.data(), tp=st.sampled_from((1, 2)))
def test_missing_weight_file_is_named(scratch, data, tp):
    ws_dir = scratch[tp]
    files = sorted(p.name for p in weights(ws_dir).iterdir() if p.name != CONFIG_NAME)
    name = data.draw(st.sampled_from(files))
    path = weights(ws_dir) / name
    with Restore(path):
        path.unlink()
        _, err = only_input_errors(read_all, ws_dir)
    assert err is not None and name in str(err)


_TM_LIKE = st.builds(
    lambda layer, lin, kind, rank: f"layers.{layer}.{lin}.{rank}{kind}",
    st.integers(0, 10**20).map(str) | st.sampled_from(("-1", "x", "")),
    st.sampled_from(TM_LINEARS + ("attention_norm", "ffn_norm", "nonsense")),
    st.sampled_from(("weight", "bias", "lora_a.weight", "lora_b.weight", "qweight", "scales")),
    st.sampled_from(("", "0.", "1.", "7.", "-1.", "x.")),
)
_STRAY_NAMES = _TM_LIKE | st.text(alphabet=st.characters(blacklist_characters="/\0", codec="utf-8"), min_size=1,
                                  max_size=40).filter(lambda s: s not in (".", ".."))


@fuzz(40)
@given(name=_STRAY_NAMES, content=st.binary(max_size=64), tp=st.sampled_from((1, 2)))
@example(name="layers.99999999999999999999.attention.wo.weight", content=b"", tp=1)
@example(name="layers.0.attention.wo.5.weight", content=b"\0\0", tp=2)
def test_stray_files_are_ignored_or_named(scratch, name, content, tp):
    path = weights(scratch[tp]) / name
    if path.exists() or len(name.encode()) > 200:
        return
    with Restore(path):
        path.write_bytes(content)
        only_input_errors(read_all, scratch[tp])


# ----------------------------------------------------------------------------- config.yaml


_GARBAGE = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=20) | st.sampled_from(("", "plora", "bfloat16", "float16", "int4", "1e6", "nan", "-1")),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=8,
)


def _yaml_dump(obj) -> str:
    return yaml.safe_dump(obj, allow_unicode=True)


def _config_keys(cfg: dict) -> list[tuple[str, ...]]:
    out: list[tuple[str, ...]] = []
    for sec, body in cfg.items():
        out.append((sec,))
        if isinstance(body, dict):
            out += [(sec, k) for k in body]
    return sorted(out)


@st.composite
def config_edits(draw, cfg: dict):
    """1-3 edits: delete a key/section, or set it to a garbage value (a type change, a wrong number...)."""
    edits = []
    keys = _config_keys(cfg)
    for _ in range(draw(st.integers(1, 3))):
        path = draw(st.sampled_from(keys))
        if draw(st.booleans()):
            edits.append(("delete", path, None))
        else:
            value = draw(_GARBAGE | st.integers(-3, 3) | st.sampled_from((0, 1, 2**31, 2**63, 0.5, -1.0)))
            edits.append(("set", path, value))
    return edits


def _apply(cfg: dict, edits) -> dict:
    import copy

    cfg = copy.deepcopy(cfg)
    for op, path, value in edits:
        node = cfg
        for k in path[:-1]:
            if not isinstance(node.get(k), dict):
                break
            node = node[k]
        else:
            if op == "delete":
                node.pop(path[-1], None)
            else:
                node[path[-1]] = value
    return cfg


def read_and_replay(ws_dir: Path) -> None:
    """Read everything, then replay a 4-row call (2 image rows) in both numeric modes: what `parity run` does."""
    ws = read_all(ws_dir)
    gen = torch.Generator().manual_seed(0)
    call = EngineCall(input_ids=[1, 0, 0, 7], input_embeddings=[torch.randn(2, ws.model.hidden_units, generator=gen)],
                      input_embedding_ranges=[(1, 3)], content_hash="fuzz")
    for numeric in ("fp32", "emulate"):
        engine = ReplayEngine(ws, SEM, numeric=numeric)
        with tempfile.TemporaryDirectory() as d:
            writer = TraceWriter(Path(d) / "t", TraceMeta(side="replay", case="fuzz", num_layers=ws.model.num_layer,
                                                          dtype=str(ws.dtype)))
            engine.run(call, writer)
            writer.close()


@fuzz(150)
@given(data=st.data(), tp=st.sampled_from((1, 2)))
@example(data=None, tp=1)  # untouched config: must read
def test_config_yaml_key_edits(workspaces, scratch, data, tp):
    ws_dir = scratch[tp]
    cfg_path = weights(ws_dir) / CONFIG_NAME
    cfg = yaml.safe_load((weights(workspaces[tp]) / CONFIG_NAME).read_text())
    edits = data.draw(config_edits(cfg)) if data is not None else []
    with Restore(cfg_path):
        cfg_path.write_text(_yaml_dump(_apply(cfg, edits)))
        _, err = only_input_errors(read_and_replay, ws_dir)
    if err is not None:
        assert str(cfg_path) in str(err) or "Weight file" in str(err) or weights(ws_dir).name in str(err)
    if not edits:
        assert err is None


@fuzz(60)
@given(doc=_GARBAGE | st.text(max_size=200) | st.binary(max_size=200), tp=st.sampled_from((1, 2)))
@example(doc=b"\xff\xfe\x00garbage", tp=1)
@example(doc="[" * 2000, tp=1)
@example(doc="model_config: " + "[" * 5000 + "]" * 5000, tp=1)
@example(doc="model_config: &a [*a]", tp=1)
@example(doc="model_config: !!python/object:os.system ls", tp=1)
@example(doc={"model_config": {"head_num": 2}}, tp=1)
def test_config_yaml_garbage(scratch, doc, tp):
    cfg_path = weights(scratch[tp]) / CONFIG_NAME
    with Restore(cfg_path):
        if isinstance(doc, bytes):
            cfg_path.write_bytes(doc)
        elif isinstance(doc, str):
            cfg_path.write_text(doc)
        else:
            cfg_path.write_text(_yaml_dump(doc))
        _, err = only_input_errors(read_and_replay, scratch[tp])
    assert err is not None and str(cfg_path) in str(err)


@pytest.mark.parametrize("key,value", [("rotary_embedding", 3), ("rotary_embedding", 256)])
def test_rotary_embedding_must_fit_the_head(scratch, key, value):
    """Found by fuzzing: an odd or too wide rotary_embedding crashed the replay (RuntimeError in a reshape)."""
    cfg_path = weights(scratch[1]) / CONFIG_NAME
    with Restore(cfg_path):
        cfg = yaml.safe_load(cfg_path.read_text())
        cfg["attention_config"][key] = value
        cfg_path.write_text(_yaml_dump(cfg))
        _, err = only_input_errors(read_and_replay, scratch[1])
    assert err is not None and f"attention_config.{key}" in str(err) and "size_per_head" in str(err)


@pytest.mark.parametrize("key,value", [("use_logn_attn", 1), ("rope_scaling_type", "llama3"),
                                       ("rope_scaling_type", "yarn")])
def test_regression_unreplayable_attention_config(scratch, key, value):
    cfg_path = weights(scratch[1]) / CONFIG_NAME
    with Restore(cfg_path):
        cfg = yaml.safe_load(cfg_path.read_text())
        cfg["attention_config"][key] = value
        cfg_path.write_text(_yaml_dump(cfg))
        _, err = only_input_errors(read_and_replay, scratch[1])
    assert err is not None and key in str(err)


# ----------------------------------------------------------------------------- parity-conversion.json


@fuzz(40)
@given(doc=_GARBAGE | st.binary(max_size=100))
@example(doc=[1, 2])
@example(doc={"model": "m", "workspace": 1})
@example(doc=b"\xff\xfe")
def test_conversion_record_garbage(scratch, doc):
    ws_dir = scratch[1]
    path = ws_dir / RECORD_NAME
    with Restore(path):
        path.write_bytes(doc if isinstance(doc, bytes) else json.dumps(doc, default=str).encode())
        ws = Workspace.open(ws_dir)
        rec, err = only_input_errors(ws.conversion_record)
        rec2, err2 = only_input_errors(read_record, ws_dir)
    assert (err is None) == (err2 is None)
    if err is not None:
        assert RECORD_NAME in str(err)


# ----------------------------------------------------------------------------- inputs files

VALID_INPUTS = {
    "cases": [
        {"name": "one", "bos_policy": "first", "segments": [{"text": "Hi "}, {"image": "img.png"}, {"text": "?"}]},
        {"name": "two", "bos_policy": "every_text", "segments": [{"text": "only text"}]},
    ]
}


@pytest.fixture(scope="module")
def inputs_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("inputs")
    shutil.copy(sorted(Path(IMAGES_DIR).glob("*.png"))[0], d / "img.png")
    return d


def usable(cases) -> None:
    """What the pipeline assumes of loaded cases."""
    assert cases and len({c.name for c in cases}) == len(cases)
    for c in cases:
        assert isinstance(c.name, str)
        assert c.bos_policy in ("first", "every_text") and c.segments
        for s in c.segments:
            assert (s.kind == "text" and isinstance(s.text, str)) or (s.kind == "image" and s.image.is_file())


def _inputs_mutations():
    seg = st.one_of(
        st.fixed_dictionaries({"text": _GARBAGE}), st.fixed_dictionaries({"image": _GARBAGE}),
        st.fixed_dictionaries({"image": st.sampled_from(("img.png", "missing.png", "", ".", "/", "img.png\0"))}),
        _GARBAGE,
    )
    case = st.fixed_dictionaries(
        {"segments": st.lists(seg, max_size=3) | _GARBAGE},
        optional={"name": _GARBAGE | st.sampled_from(("one", "a/b", "..", "", ".")), "bos_policy": _GARBAGE},
    )
    return st.one_of(
        st.fixed_dictionaries({"cases": st.lists(case, max_size=3)}),
        st.lists(case, max_size=3),
        _GARBAGE,
    )


def _write(path: Path, doc) -> None:
    if isinstance(doc, bytes):
        path.write_bytes(doc)
    elif isinstance(doc, str):
        path.write_text(doc)
    else:
        path.write_text(yaml.safe_dump(doc, allow_unicode=True))


def test_valid_inputs_file_loads(inputs_dir):
    p = inputs_dir / "valid.yaml"
    _write(p, VALID_INPUTS)
    cases = load_cases(p)
    usable(cases)
    assert [c.name for c in cases] == ["one", "two"]


@fuzz(200)
@given(doc=_inputs_mutations() | st.text(max_size=200) | st.binary(max_size=200))
@example(doc=b"\xff\xfe\x00")
@example(doc="cases: !!python/object/apply:os.system [ls]")
@example(doc={"cases": [{"segments": [{"text": "x"}], "name": "a"}, {"segments": [{"text": "y"}], "name": "a"}]})
def test_inputs_file_garbage(inputs_dir, doc):
    p = inputs_dir / "fuzz.yaml"
    _write(p, doc)
    cases, err = only_input_errors(load_cases, p)
    if err is None:
        usable(cases)
    else:
        assert str(p) in str(err)


@pytest.mark.parametrize("name", ["..", "a/b", "a\0b", "."])
def test_regression_case_names_are_folder_safe(inputs_dir, name):
    p = inputs_dir / "names.yaml"
    _write(p, {"cases": [{"name": name, "segments": [{"text": "x"}]}]})
    cases, err = only_input_errors(load_cases, p)
    # a loaded name is used as a folder name of its traces
    assert err is not None or all(c.name not in ("", ".", "..") and not set(c.name) & {"/", "\\", "\0"}
                                  for c in cases)


def test_regression_image_path_with_nul_byte(inputs_dir):
    p = inputs_dir / "nul.yaml"
    _write(p, {"cases": [{"segments": [{"image": "img.png\0"}]}]})
    _, err = only_input_errors(load_cases, p)
    assert err is not None and str(p) in str(err)


def test_regression_deeply_nested_inputs_file(inputs_dir):
    for i, doc in enumerate(("cases: " + "[" * 5000 + "]" * 5000, "[" * 2000)):
        p = inputs_dir / f"deep{i}.yaml"
        _write(p, doc)
        _, err = only_input_errors(load_cases, p)
        assert err is not None and str(p) in str(err)
