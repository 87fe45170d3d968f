"""The 4KHD and XComposer2.5 image paths: lmdeploy's own preprocessing, vision forward and placement (run on
CPU) against what the HF model's own code gives the reference, on the high-resolution fixtures."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from parity.deploy.image_input import (
    KEYERROR_PATCH,
    LmdeployVision,
    VisionFault,
    hf_chat_segments,
    hf_sub_type,
)
from parity.fixtures.generator import make_hd_image
from parity.pipeline import RunOptions, run_parity
from parity.records import CanonicalInput, Chat, FaultHooks

REPO = Path(__file__).resolve().parents[1]
SYSTEM = "You are a helpful assistant."


def lmdeploy_rows(width: int, height: int, tile: int) -> int:
    """lmdeploy 0.7.1's own count for a preprocessed image (`_preprocess_4khd_7b` / `_preprocess_2d5`)."""
    h, w = height // tile, width // tile
    side = {336: 12, 560: 20}[tile]
    return (h * w + 1) * side * side + 1 + (h + 1) * side


@pytest.fixture(scope="module")
def vision(fixture_models):
    return {name: LmdeployVision(fixture_models[name]) for name in ("xcomposer2d5-tiny", "xcomposer2-4khd-tiny")}


@pytest.fixture(scope="module")
def refs(fixture_models):
    from parity.reference.loader import load_reference

    return {name: load_reference(fixture_models[name], trust_remote_code=True)
            for name in ("xcomposer2d5-tiny", "xcomposer2-4khd-tiny")}


def image(tmp: Path, width: int, height: int) -> Path:
    path = tmp / f"img-{width}x{height}.png"
    if not path.exists():
        make_hd_image(width, height).save(path)
    return path


# ---------------------------------------------------------------- sub-types, conversion, placement


def test_sub_types_as_lmdeploy_and_the_checkpoint_see_them(fixture_models, vision):
    assert hf_sub_type(fixture_models["xcomposer2d5-tiny"]) == vision["xcomposer2d5-tiny"].sub_type == "2.5"
    assert hf_sub_type(fixture_models["xcomposer2-4khd-tiny"]) == vision["xcomposer2-4khd-tiny"].sub_type == "4khd"
    assert hf_sub_type(fixture_models["xcomposer2-tiny"]) == "7b"
    # lmdeploy 0.7.1 raises KeyError on the hyphenated 2.5 folder name without parity's in-process patch
    assert vision["xcomposer2d5-tiny"].applied == [KEYERROR_PATCH]
    assert vision["xcomposer2-4khd-tiny"].applied == []


def test_2d5_converts_with_the_7b_lora_settings(fixture_models, tmp_path):
    from parity.deploy.convert import convert

    rec = convert(fixture_models["xcomposer2d5-tiny"], tmp_path / "ws")
    assert rec.sub_type == "2.5" and rec.warnings == []
    assert rec.lora_config["lora_r"] == 256 and rec.lora_config["lora_scale"] == 1.0
    assert rec.lora_config["lora_rank_pattern"] == "" and rec.lora_config["lora_scale_pattern"] == ""


@pytest.mark.parametrize("n_images", [1, 2, 3])
def test_placement_of_both_sides_agrees(vision, tmp_path, n_images):
    imgs = tuple(image(tmp_path, 100 + 10 * i, 80) for i in range(n_images))
    chat = Chat("What is shown?", imgs, SYSTEM)
    for name, sub in (("xcomposer2d5-tiny", "2.5"), ("xcomposer2-4khd-tiny", "4khd")):
        lm = vision[name].chat_segments(chat)
        assert lm == hf_chat_segments(chat, sub)
        kinds = [s.kind for s in lm]
        if sub == "2.5" and n_images == 1:  # before the whole template
            assert kinds == ["image", "text"] and lm[1].text.startswith("[UNUSED_TOKEN_146]system\n")
        elif sub == "2.5":                   # `Image{i} <image>; ` inside the user turn
            assert "".join(s.text for s in lm).count("; Image") == n_images - 1
            assert lm[0].text.endswith("user\nImage1 ") and lm[-1].text.startswith("; What is shown?")
        else:                                # 4KHD: at the start of the user's query
            assert kinds == ["text"] + ["image"] * n_images + ["text"] and lm[0].text.endswith("user\n")


# ---------------------------------------------------------------- rows and features per image


@settings(max_examples=8, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(size=st.tuples(st.integers(40, 1200), st.integers(40, 1200)))
def test_2d5_rows_equal_lmdeploy_formula_and_features_agree(size, vision, refs, tmp_path):
    """Any image size: lmdeploy's reserved count == its vision forward's rows == the HF encode_img rows, the
    tiles are at most ceil(side / 560) per side (2.5 never scales up past that), and every feature row is
    within the float16 allowance."""
    w, h = size
    path = image(tmp_path, w, h)
    img = vision["xcomposer2d5-tiny"].encode(path)
    hf = refs["xcomposer2d5-tiny"].encode_image(path)
    assert img.n_token == img.features.shape[0] == hf.shape[0] == lmdeploy_rows(*img.size, 560)
    assert img.size[0] % 560 == 0 and img.size[1] % 560 == 0
    rows, cols = img.tiles
    assert rows * cols <= 24 and max(rows, cols) <= -(-max(w, h) // 560)
    rel = (img.features - hf).abs().amax(1) / hf.abs().amax(1)
    assert float(rel.max()) < 2 ** -6


@pytest.mark.parametrize("size,tiles", [((500, 400), (1, 1)), ((1000, 500), (1, 2)), ((500, 1000), (2, 1)),
                                        ((1100, 1000), (2, 2))])
def test_2d5_tile_counts_one_to_four(size, tiles, vision, tmp_path):
    img = vision["xcomposer2d5-tiny"].encode(image(tmp_path, *size))
    assert img.tiles == tiles and img.hd_num == 24
    assert img.features.shape[0] == lmdeploy_rows(*img.size, 560)


def test_4khd_uses_hd_num_25_and_336_px_tiles(vision, refs, tmp_path):
    path = image(tmp_path, 900, 300)
    img = vision["xcomposer2-4khd-tiny"].encode(path)
    assert img.hd_num == 25 and img.size[0] % 336 == 0 and img.size[1] % 336 == 0
    rows, cols = img.tiles
    assert rows * cols <= 25 and (rows, cols) == (3, 8)  # largest s with s * ceil(s / 3) <= 25 is 8
    hf = refs["xcomposer2-4khd-tiny"].encode_image(path)
    assert img.n_token == img.features.shape[0] == hf.shape[0] == lmdeploy_rows(*img.size, 336)


# ---------------------------------------------------------------- whole runs


def warnings(report):
    return [f for f in report.findings if f.severity == "warning"]


def run(model: Path, cases, numeric="fp32", faults=None, **kw):
    kw.setdefault("cache_dir", REPO / ".cache")
    return run_parity(RunOptions(model=model, trust_remote_code=True, cases=cases, numeric=numeric, **kw), faults)


@pytest.fixture(scope="module")
def session_2d5(fixture_models):
    from parity.reference.session import ReferenceSession

    with ReferenceSession(fixture_models["xcomposer2d5-tiny"], trust_remote_code=True) as s:
        yield s


@pytest.mark.parametrize("numeric", ["fp32", "emulate"])
def test_2d5_clean_runs_with_tile_counts_one_to_four(numeric, fixture_models, session_2d5, tmp_path):
    cases = [CanonicalInput(f"tiles-{w}x{h}", (), chat=Chat("What is in the image?", (image(tmp_path, w, h),), SYSTEM))
             for w, h in ((500, 400), (1000, 500), (1100, 1000))]
    report = run(fixture_models["xcomposer2d5-tiny"], cases, numeric, session=session_2d5)
    assert report.status == "pass" and not report.errors() and not warnings(report), report.findings
    section = report.engine["image_input"]
    assert section["sub_type_hf"] == section["sub_type_lmdeploy"] == "2.5"
    assert [r["tiles"] for r in section["images"]] == [[1, 1], [1, 2], [2, 2]]
    for r in section["images"]:
        assert r["rows_hf"] == r["rows_lmdeploy"] == r["n_token_lmdeploy"] == lmdeploy_rows(*r["size"], 560)
        assert r["max_row_error"] < 2 ** -6
    for c, r in zip(report.cases, section["images"]):  # one image, right after BOS, before the template
        assert c.image_spans == [(1, 1 + r["rows_hf"])]


def test_2d5_several_images_warn_about_hd_num(fixture_models, session_2d5, tmp_path):
    chat = Chat("Compare them.", (image(tmp_path, 500, 400), image(tmp_path, 1000, 500)), SYSTEM)
    report = run(fixture_models["xcomposer2d5-tiny"], [CanonicalInput("two", (), chat=chat)], session=session_2d5)
    assert report.status == "pass" and not report.errors(), report.findings
    [w] = warnings(report)
    assert w.cause == "input_mismatch" and "hd_num 6" in w.message and "24" in w.message


@pytest.mark.parametrize("numeric", ["fp32", "emulate"])
def test_4khd_clean_run(numeric, fixture_models, tmp_path):
    chat = Chat("What is in the image?", (image(tmp_path, 900, 300),), SYSTEM)
    report = run(fixture_models["xcomposer2-4khd-tiny"], [CanonicalInput("wide", (), chat=chat)], numeric)
    assert report.status == "pass" and not report.errors() and not warnings(report), report.findings
    [r] = report.engine["image_input"]["images"]
    assert r["tiles"] == [3, 8] and r["rows_hf"] == r["rows_lmdeploy"] == lmdeploy_rows(*r["size"], 336)


# ---------------------------------------------------------------- faults name the rows


def _separator_rows(first: int, rows: int, cols: int, side: int) -> list[int]:
    """Prompt rows of the sub_GN / glb_GN separators of one image starting at row `first`."""
    glb = [first + k * (side + 1) + side for k in range(side)]
    at = first + side * (side + 1)
    sub = [at + 1 + k * (cols * side + 1) + cols * side for k in range(rows * side)]
    return sorted(glb + [at] + sub)


def test_swapped_separators_are_named_row_by_row(fixture_models, session_2d5, tmp_path):
    chat = Chat("What is in the image?", (image(tmp_path, 1000, 500),), SYSTEM)
    report = run(fixture_models["xcomposer2d5-tiny"], [CanonicalInput("sep", (), chat=chat)], session=session_2d5,
                 faults=FaultHooks(lmdeploy_vision_fault=VisionFault(swap_separators=True)))
    assert report.status == "fail"
    [f] = [f for f in report.errors() if "float16 allowance" in f.message]
    assert (f.cause, f.module, f.positions, f.layer) == ("input_mismatch", "embeddings", "image", None)
    expected = _separator_rows(1, 1, 2, 20)
    assert f.metrics["count"] == len(expected) == 20 + 1 + 20 and f.metrics["rows"] == expected[:64]


def test_placement_fault_names_the_rows(fixture_models, session_2d5, tmp_path):
    chat = Chat("What is in the image?", (image(tmp_path, 500, 400),), SYSTEM)
    report = run(fixture_models["xcomposer2d5-tiny"], [CanonicalInput("place", (), chat=chat)], session=session_2d5,
                 faults=FaultHooks(lmdeploy_vision_fault=VisionFault(placement_sub_type="7b")))
    d = report.first_divergence
    assert (d.cause, d.module, d.positions) == ("im_mask_mismatch", "embeddings", "all")
    [f] = [f for f in report.errors() if f.cause == "im_mask_mismatch" and f.check == "inputs"]
    assert f.metrics["rows"][0] == 1  # HF's image starts right after BOS; lmdeploy's (7b) after the user header


def test_hd_num_fault_names_both_row_counts(fixture_models, session_2d5, tmp_path):
    chat = Chat("What is in the image?", (image(tmp_path, 1000, 500),), SYSTEM)
    report = run(fixture_models["xcomposer2d5-tiny"], [CanonicalInput("hd", (), chat=chat)], session=session_2d5,
                 faults=FaultHooks(lmdeploy_vision_fault=VisionFault(hd_num=1)))
    [f] = [f for f in report.errors() if "tile the image differently" in f.message]
    assert f.metrics["rows_hf"] == 1241 and f.metrics["rows_lmdeploy"] == 841 and "hd_num 1" in f.message
    assert torch.tensor(f.metrics["hf_rows"]).tolist() == [1, 1242]


def test_sub_type_trap_on_2d5_is_a_finding_not_a_crash(fixture_models, tmp_path):
    """The serving machine cannot import ixc_utils (e.g. torchvision missing): lmdeploy treats the 2.5 checkpoint
    as 7b, converts it with the 7b settings and runs the 7b image path, which the 2.5 ViT cannot take."""
    import shutil

    broken = tmp_path / "xcomposer2d5-broken"
    shutil.copytree(fixture_models["xcomposer2d5-tiny"], broken)
    ixc = broken / "ixc_utils.py"
    ixc.write_text("import parity_no_such_module  # missing on the serving machine\n" + ixc.read_text())
    chat = Chat("What is in the image?", (image(tmp_path, 500, 400),), SYSTEM)
    report = run(broken, [CanonicalInput("trap", (), chat=chat)], cache_dir=tmp_path / "cache")
    assert report.status == "fail" and report.engine["sub_type"] == "7b"
    [f] = [f for f in report.errors() if "vision forward raised" in f.message]
    assert (f.cause, f.positions) == ("input_mismatch", "image") and "sees this 2.5 checkpoint as 7b" in f.message
    assert any("trap" in w for w in report.engine["conversion_warnings"])


def test_inputs_file_chat_cases(tmp_path):
    from parity.errors import ParityInputError
    from parity.inputs import load_cases

    image(tmp_path, 100, 80)
    (tmp_path / "in.yaml").write_text(
        "cases:\n  - name: c\n    chat: {query: \"Hi?\", images: [img-100x80.png], system: S}\n")
    [case] = load_cases(tmp_path / "in.yaml")
    assert case.segments == () and case.chat == Chat("Hi?", ((tmp_path / "img-100x80.png").resolve(),), "S")
    (tmp_path / "both.yaml").write_text("cases:\n  - chat: {query: \"Hi?\"}\n    segments: [{text: a}]\n")
    with pytest.raises(ParityInputError, match="exactly one of `segments"):
        load_cases(tmp_path / "both.yaml")
    (tmp_path / "missing.yaml").write_text("cases:\n  - chat: {query: \"Hi?\", images: [nope.png]}\n")
    with pytest.raises(ParityInputError, match=r"chat\.images\[0\]"):
        load_cases(tmp_path / "missing.yaml")
    (tmp_path / "typo.yaml").write_text("cases:\n  - chat: {query: \"q\", imgs: [a.png]}\n")
    with pytest.raises(ParityInputError, match=r"unknown key 'imgs' at cases\[0\]\.chat; allowed keys there: "
                                               r"query, images, system\."):
        load_cases(tmp_path / "typo.yaml")
