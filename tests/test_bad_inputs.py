"""Bad input through the command line: exit code 2, one paragraph naming the thing and what was expected,
no traceback, and nothing left behind (no report, no temp folders, no half workspace).

Most cases call `parity.cli.main` in-process (fast); `test_real_executable` runs `.venv/bin/parity` as a
subprocess for a few of them to check the real stderr and exit status.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Callable

import pytest
import yaml

from parity.cli import main
from parity.deploy.convert import convert
from parity.fixtures import IMAGES_DIR, FixtureSpec, write_model
from parity.fixtures.generator import TOKENIZER_SIZE

REPO = Path(__file__).resolve().parents[1]
SMALL = FixtureSpec(name="bad-inputs", layers=1, heads=2, kv_heads=1, intermediate=128, vocab=TOKENIZER_SIZE,
                    vision_layers=1, vision_hidden=16, image_size=14, patch_size=7)
W = Path("triton_models") / "weights"


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("bad-inputs")
    model = write_model(SMALL, root / "model")
    convert(model, root / "ws")
    return {"model": model, "ws": root / "ws"}


@pytest.fixture
def env(pristine, tmp_path, monkeypatch) -> dict[str, Path]:
    """Per-test copies of the model and workspace, a private temp dir, cache dir and report folder."""
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp))
    # a unique folder name: transformers caches remote code per folder *name* (transformers_modules.<name>)
    model = tmp_path / f"model-{tmp_path.name}"
    shutil.copytree(pristine["model"], model)
    shutil.copytree(pristine["ws"], tmp_path / "ws")
    inputs = tmp_path / "inputs.yaml"
    inputs.write_text(yaml.safe_dump({"cases": [{"name": "c", "segments": [{"text": "Hi "}, {"image": "img.png"}]}]}))
    shutil.copy(sorted(Path(IMAGES_DIR).glob("*.png"))[0], tmp_path / "img.png")
    return {"root": tmp_path, "tmp": tmp, "model": model, "ws": tmp_path / "ws", "inputs": inputs,
            "out": tmp_path / "report", "cache": tmp_path / "cache", "monkeypatch": monkeypatch}


def leftovers(e: dict[str, Path]) -> list[str]:
    """What a failed run must not leave in the user's folders: a report, a half-written workspace."""
    out = []
    if e["out"].exists():
        out += [str(p) for p in e["out"].rglob("*")] or [str(e["out"])]
    if e["cache"].exists():
        out += [str(p) for p in e["cache"].rglob("*") if ".converting." in p.name or ".old." in p.name]
    out += [str(p) for p in e["ws"].parent.glob(".*converting*")]
    return out


def temp_leftovers(e: dict[str, Path]) -> list[str]:
    """Temp folders (reference/engine traces) the run created and did not remove."""
    return [str(p) for p in e["tmp"].iterdir()]


def run_cli(e: dict[str, Path], args: list, capsys) -> tuple[int, str]:
    argv = [str(a) for a in args]
    if argv[0] == "run":
        argv += ["--out", str(e["out"]), "--cache-dir", str(e["cache"])]
    capsys.readouterr()
    rc = main(argv)  # an exception here is the traceback a user would see
    return rc, capsys.readouterr().err


def assert_one_paragraph(err: str, *words: str) -> str:
    assert "Traceback" not in err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    errs = [ln for ln in lines if ln.startswith("parity: error:")]
    assert len(errs) == 1, err
    msg = errs[0]
    for w in words:
        assert w.lower() in msg.lower(), f"{w!r} not in: {msg}"
    return msg


# ----------------------------------------------------------------------------- the bad inputs

Case = Callable[[dict], tuple[list, tuple[str, ...]]]


def _json(path: Path, edit: Callable[[dict], None]) -> None:
    cfg = json.loads(path.read_text())
    edit(cfg)
    path.write_text(json.dumps(cfg))


def _yaml(path: Path, edit: Callable[[dict], None]) -> None:
    cfg = yaml.safe_load(path.read_text())
    edit(cfg)
    path.write_text(yaml.safe_dump(cfg))


def missing_model(e):
    return ["run", e["root"] / "no-such-model", "--trust-remote-code"], ("no-such-model", "does not exist")


def model_is_a_file(e):
    (e["root"] / "model.txt").write_text("x")
    return ["run", e["root"] / "model.txt", "--trust-remote-code"], ("model.txt",)


def no_config_json(e):
    (e["model"] / "config.json").unlink()
    return ["run", e["model"], "--trust-remote-code"], ("config.json",)


def config_json_not_json(e):
    (e["model"] / "config.json").write_text("{architectures: nope")
    return ["run", e["model"], "--trust-remote-code"], ("config.json", "JSON")


def without_plora_linears(e):
    """The model's own code has no Plora_A/Plora_B (and the checkpoint none of their weights)."""
    from safetensors.torch import load_file, save_file

    code = e["model"] / "build_mlp.py"
    code.write_text(code.read_text().replace("Plora_A", "lora_down").replace("Plora_B", "lora_up"))
    sd = load_file(e["model"] / "model.safetensors")
    save_file({k.replace("Plora_A", "lora_down").replace("Plora_B", "lora_up"): v for k, v in sd.items()},
              e["model"] / "model.safetensors", metadata={"format": "pt"})
    return ["run", e["model"], "--trust-remote-code"], ("PLoRA linears", "Plora_A")


def non_xcomposer2_arch(e):
    def edit(c):
        c["architectures"] = ["LlamaForCausalLM"]
        c.pop("auto_map")

    _json(e["model"] / "config.json", edit)
    return ["run", e["model"], "--trust-remote-code"], ("LlamaForCausalLM", "InternLMXComposer2ForCausalLM")


def no_trust_remote_code(e):
    return ["run", e["model"]], ("--trust-remote-code", str(e["model"]))


def corrupt_safetensors(e):
    p = e["model"] / "model.safetensors"
    raw = bytearray(p.read_bytes())
    raw[8:48] = b"#" * 40  # the JSON header
    p.write_bytes(bytes(raw))
    return ["run", e["model"], "--trust-remote-code"], (str(e["model"]), "safetensors")


def truncated_safetensors(e):
    p = e["model"] / "model.safetensors"
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])
    return ["run", e["model"], "--trust-remote-code"], (str(e["model"]), "safetensors")


def truncated_workspace_file(e):
    p = e["ws"] / W / "layers.0.attention.w_qkv.0.weight"
    p.write_bytes(p.read_bytes()[:-6])
    return (["run", e["model"], "--trust-remote-code", "--workspace", e["ws"]],
            ("layers.0.attention.w_qkv.0.weight", "short", "6 bytes missing"))


def missing_workspace_file(e):
    (e["ws"] / W / "layers.0.feed_forward.w2.0.weight").unlink()
    return (["run", e["model"], "--trust-remote-code", "--workspace", e["ws"]],
            ("layers.0.feed_forward.w2.0.weight", "missing"))


def missing_workspace(e):
    return (["run", e["model"], "--trust-remote-code", "--workspace", e["root"] / "no-ws"], ("no-ws", "does not exist"))


def missing_config_yaml(e):
    (e["ws"] / W / "config.yaml").unlink()
    return ["run", e["model"], "--trust-remote-code", "--workspace", e["ws"]], ("config.yaml", "missing")


def config_yaml_missing_key(e):
    _yaml(e["ws"] / W / "config.yaml", lambda c: c["model_config"].pop("head_num"))
    return (["run", e["model"], "--trust-remote-code", "--workspace", e["ws"]],
            ("config.yaml", "model_config.head_num", "missing", "an integer"))


def config_yaml_wrong_type(e):
    _yaml(e["ws"] / W / "config.yaml", lambda c: c["lora_config"].__setitem__("lora_r", "eight"))
    return (["run", e["model"], "--trust-remote-code", "--workspace", e["ws"]],
            ("config.yaml", "lora_config.lora_r", "'eight'", "an integer"))


def config_yaml_missing_section(e):
    _yaml(e["ws"] / W / "config.yaml", lambda c: c.pop("attention_config"))
    return (["run", e["model"], "--trust-remote-code", "--workspace", e["ws"]], ("config.yaml", "attention_config"))


def config_yaml_not_yaml(e):
    (e["ws"] / W / "config.yaml").write_text("model_config: [unclosed\n")
    return (["run", e["model"], "--trust-remote-code", "--workspace", e["ws"]], ("config.yaml", "not valid YAML"))


def inputs_not_parsing(e):
    e["inputs"].write_text("cases: [ {name: a, segments: [")
    return ["run", e["model"], "--trust-remote-code", "--inputs", e["inputs"]], (str(e["inputs"]), "does not parse")


def inputs_missing_image(e):
    e["inputs"].write_text(yaml.safe_dump({"cases": [{"name": "c", "segments": [{"image": "nope.png"}]}]}))
    return (["run", e["model"], "--trust-remote-code", "--inputs", e["inputs"]],
            (str(e["inputs"]), "nope.png", "does not exist"))


def inputs_missing(e):
    return (["run", e["model"], "--trust-remote-code", "--inputs", e["root"] / "none.yaml"],
            ("none.yaml", "does not exist"))


def inputs_wrong_shape(e):
    e["inputs"].write_text(yaml.safe_dump({"cases": [{"name": "c", "segments": [{"text": 3}]}]}))
    return (["run", e["model"], "--trust-remote-code", "--inputs", e["inputs"]], ("segments[0]", "text"))


def out_under_a_file(e):
    (e["root"] / "a-file").write_text("x")
    e["out"] = e["root"] / "a-file" / "report"
    return ["run", e["model"], "--trust-remote-code"], ("a-file", "cannot be written")


def keep_traces_under_a_file(e):
    (e["root"] / "a-file").write_text("x")
    return (["run", e["model"], "--trust-remote-code", "--keep-traces", e["root"] / "a-file" / "traces"],
            ("a-file", "cannot be written"))


def cache_under_a_file(e):
    (e["root"] / "a-file").write_text("x")
    e["cache"] = e["root"] / "a-file" / "cache"
    return ["run", e["model"], "--trust-remote-code"], ("a-file", "workspace folder")


def version_without_plora_converter(e):
    return (["run", e["model"], "--trust-remote-code", "--lmdeploy-version", "0.10.0"],
            ("0.10.0", "cannot deploy a PLoRA model", "0.7.1"))


def version_unparseable(e):
    return (["run", e["model"], "--trust-remote-code", "--lmdeploy-version", "abc"], ("'abc'", "cannot be parsed", "0.7.1"))


def version_removed(e):
    return (["run", e["model"], "--trust-remote-code", "--lmdeploy-version", "0.14.0"], ("0.14.0", "not supported"))


def version_too_old(e):
    return (["run", e["model"], "--trust-remote-code", "--lmdeploy-version", "0.3.0"], ("0.3.0", "0.4.0"))


def bad_threshold(e):
    return ["run", e["model"], "--trust-remote-code", "--floor-factor", "-1"], ("floor_factor", "positive")


def convert_missing_model(e):
    return ["convert", e["root"] / "no-such-model", "--out", e["root"] / "ws2"], ("no-such-model", "does not exist")


def convert_out_under_a_file(e):
    (e["root"] / "a-file").write_text("x")
    return ["convert", e["model"], "--out", e["root"] / "a-file" / "ws"], ("a-file",)


def convert_non_xcomposer2(e):
    _json(e["model"] / "config.json", lambda c: c.__setitem__("architectures", ["BertModel"]) or c.pop("auto_map"))
    return ["convert", e["model"], "--out", e["root"] / "ws2"], ("BertModel", "InternLMXComposer2ForCausalLM")


def _inputs_with_image(e, name: str) -> list:
    e["inputs"].write_text(yaml.safe_dump({"cases": [{"name": "c", "segments": [{"text": "Hi "}, {"image": name}]}]}))
    return ["run", e["model"], "--trust-remote-code", "--inputs", e["inputs"]]


def inputs_corrupt_png(e):
    """A PNG cut short: decoded before any model is loaded, not a traceback from the vision tower."""
    (e["root"] / "cut.png").write_bytes((e["root"] / "img.png").read_bytes()[:100])
    return _inputs_with_image(e, "cut.png"), (str(e["inputs"]), "cut.png", "cannot be decoded")


def inputs_not_an_image(e):
    (e["root"] / "notes.png").write_text("these are my notes, not a picture\n")
    return _inputs_with_image(e, "notes.png"), (str(e["inputs"]), "notes.png", "cannot be decoded")


def inputs_image_symlink_loop(e):
    os.symlink("loop-b.png", e["root"] / "loop-a.png")
    os.symlink("loop-a.png", e["root"] / "loop-b.png")
    return _inputs_with_image(e, "loop-a.png"), ("loop-a.png", "symlink loop")


def inputs_unknown_case_key(e):
    e["inputs"].write_text("cases:\n  - name: c\n    bos_polcy: first\n    segments: [{text: hi}]\n")
    return (["run", e["model"], "--trust-remote-code", "--inputs", e["inputs"]],
            (str(e["inputs"]), "'bos_polcy'", "cases[0]", "bos_policy", "segments"))


def inputs_unknown_top_key(e):
    e["inputs"].write_text("case: {name: c}\ncases:\n  - segments: [{text: hi}]\n")
    return (["run", e["model"], "--trust-remote-code", "--inputs", e["inputs"]],
            (str(e["inputs"]), "'case'", "top level", "allowed keys there: cases"))


def inputs_unknown_segment_key(e):
    e["inputs"].write_text("cases:\n  - segments: [{text: hi, role: user}]\n")
    return (["run", e["model"], "--trust-remote-code", "--inputs", e["inputs"]],
            (str(e["inputs"]), "'role'", "cases[0].segments[0]", "text, image"))


def model_symlink_loop(e):
    os.symlink("loop-b", e["root"] / "loop-a")
    os.symlink("loop-a", e["root"] / "loop-b")
    return ["run", e["root"] / "loop-a", "--trust-remote-code"], ("loop-a", "symlink loop")


def convert_symlink_loop(e):
    os.symlink("loop-b", e["root"] / "loop-a")
    os.symlink("loop-a", e["root"] / "loop-b")
    return ["convert", e["root"] / "loop-a", "--out", e["root"] / "ws2"], ("loop-a", "symlink loop")


def inverted_thresholds(e):
    return (["run", e["model"], "--trust-remote-code", "--fp32-min-rel", "1e-3", "--fp32-max-rel", "1e-5"],
            ("fp32_min_rel", "larger than", "fp32_max_rel"))


def nonsense_threshold(e):
    return (["run", e["model"], "--trust-remote-code", "--lowp-max-rel", "3"], ("--lowp-max-rel", "below 1"))


def misspelt_option(e):
    return ["run", e["model"], "--trust-remote-code", "--floor-facter", "3"], ("--floor-facter", "--help")


def prompt_longer_than_max_positions(e):
    """The default case has ~10 rows; the model says it takes at most 8 positions."""
    _json(e["model"] / "config.json", lambda c: c.__setitem__("max_position_embeddings", 8))
    return (["run", e["model"], "--trust-remote-code", "--workspace", e["ws"]],
            ("rows", "max_position_embeddings = 8", "config.json"))


def not_enough_disk_for_the_traces(e):
    """Free space is read where the traces go: a TMPDIR on a full disk (simulated: the guard is told 0 bytes)."""
    import parity.resources

    real = shutil.disk_usage
    e["monkeypatch"].setattr(parity.resources.shutil, "disk_usage", lambda p: real(p)._replace(free=0))
    return (["run", e["model"], "--trust-remote-code", "--workspace", e["ws"]],
            ("Not enough disk", "TMPDIR"))


CASES: list[Case] = [
    missing_model, model_is_a_file, no_config_json, config_json_not_json, without_plora_linears, non_xcomposer2_arch,
    no_trust_remote_code, corrupt_safetensors, truncated_safetensors, truncated_workspace_file,
    missing_workspace_file, missing_workspace, missing_config_yaml, config_yaml_missing_key, config_yaml_wrong_type,
    config_yaml_missing_section, config_yaml_not_yaml, inputs_not_parsing, inputs_missing_image, inputs_missing,
    inputs_wrong_shape, out_under_a_file, keep_traces_under_a_file, cache_under_a_file,
    version_without_plora_converter, version_unparseable, version_removed, version_too_old, bad_threshold,
    convert_missing_model, convert_out_under_a_file, convert_non_xcomposer2,
    inputs_corrupt_png, inputs_not_an_image, inputs_image_symlink_loop, inputs_unknown_case_key,
    inputs_unknown_top_key, inputs_unknown_segment_key, model_symlink_loop, convert_symlink_loop,
    inverted_thresholds, nonsense_threshold, misspelt_option, prompt_longer_than_max_positions,
    not_enough_disk_for_the_traces,
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.__name__)
def test_bad_input_exits_2_with_one_paragraph(env, capsys, case):
    args, words = case(env)
    rc, err = run_cli(env, args, capsys)
    msg = assert_one_paragraph(err, *words)
    assert rc == 2, msg
    assert not leftovers(env), leftovers(env)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.__name__)
def test_bad_input_leaves_no_temp_folders(env, capsys, case):
    args, _ = case(env)
    rc, _ = run_cli(env, args, capsys)
    assert rc == 2
    assert not temp_leftovers(env), temp_leftovers(env)


def test_checkpoint_missing_plora_weights(env, capsys):
    """The model's code has PLoRA but the checkpoint lacks the Plora_A/Plora_B tensors (a merged or stripped
    export): transformers would initialise them randomly and the comparison would be meaningless."""
    from safetensors.torch import load_file, save_file

    sd = load_file(env["model"] / "model.safetensors")
    save_file({k: v for k, v in sd.items() if "Plora" not in k}, env["model"] / "model.safetensors",
              metadata={"format": "pt"})
    rc, err = run_cli(env, ["run", env["model"], "--trust-remote-code"], capsys)
    msg = assert_one_paragraph(err, "Plora_A", str(env["model"]))
    assert rc == 2, msg
    assert not leftovers(env) and not temp_leftovers(env)


def test_good_input_passes_and_writes_reports(env, capsys):
    """The control: the same fixture, untouched, runs and writes its reports (so the cases above fail for
    the reason they name)."""
    rc, err = run_cli(env, ["run", env["model"], "--trust-remote-code", "--workspace", env["ws"],
                            "--inputs", env["inputs"]], capsys)
    assert rc == 0, err
    assert (env["out"] / "report.json").is_file() and (env["out"] / "report.html").is_file()
    assert not list(env["tmp"].iterdir())


# ----------------------------------------------------------------------------- the real executable


@pytest.mark.parametrize("case", [missing_model, version_without_plora_converter, truncated_workspace_file,
                                  inputs_not_an_image, convert_symlink_loop],
                         ids=lambda c: c.__name__)
def test_real_executable(env, case):
    exe = Path(sys.executable).parent / "parity"
    if not exe.is_file():
        pytest.skip(f"{exe} is not installed (pip install -e .)")
    args, words = case(env)
    argv = [str(exe)] + [str(a) for a in args] + ["--out", str(env["out"]), "--cache-dir", str(env["cache"])]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=300, cwd=env["root"],
                          env={**os.environ, "TMPDIR": str(env["tmp"]), "COLUMNS": "80"})
    msg = assert_one_paragraph(proc.stderr, *words)
    assert proc.returncode == 2, msg
    # nothing else on stderr: no warnings from the libraries underneath, no progress bars
    assert [ln for ln in proc.stderr.splitlines() if ln.strip()] == [msg], proc.stderr
    assert not leftovers(env) and not temp_leftovers(env), leftovers(env) + temp_leftovers(env)
