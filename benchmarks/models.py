"""Benchmark models: real 7B shapes (few layers) built with parity's own fixture generator, cached.

`bench_spec` gives the FixtureSpec (InternLM-XComposer2-7b shapes: hidden 4096 = 32 heads x 128, 8 kv heads,
intermediate 14336, rank-256 PLoRA on every linear, vocab 92544, one 490x490 image of 14-pixel patches =
35 x 35 = 1,225 image rows). `ensure_model` writes it under `.cache/bench/models/<name>` once and reuses it
while the generator's stamp (generator version, code hash, spec, library versions) is unchanged.

The weights are streamed into `model.safetensors` one tensor at a time. The generator's own `model_files`
builds the whole file in memory (state dict + raw chunks + the joined bytes, ~3x the file); for an 8-layer
7B-shaped model that is ~15 GB, so this module writes the byte-identical file (same header, same order,
same values: `parity.fixtures.generator._draw`) with one tensor in memory at a time. The smoke test checks
byte equality against `safetensors_bytes(build_state_dict(spec))` on the tiny spec.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import uuid
from dataclasses import asdict
from pathlib import Path

import torch

from parity.fixtures import generator as gen
from parity.fixtures import FixtureSpec
from parity.records import CanonicalInput, Segment

REAL_VOCAB = 92544            # InternLM2 / XComposer2-7b tokenizer size
SEVEN_B = dict(heads=32, kv_heads=8, head_dim=128, intermediate=14336)
IMAGE_490 = dict(image_size=490, patch_size=14)  # 35 x 35 = 1,225 image rows


def bench_spec(layers: int, vocab: int = REAL_VOCAB, quick: bool = False, image_size: int = 490) -> FixtureSpec:
    """The quick spec keeps head_dim 128: lmdeploy 0.7.1's xcomposer2 reader hard-codes it (another head_dim
    converts to a wrong wqkv layout, which parity reports as a weight mismatch)."""
    if quick:
        return FixtureSpec(
            name=f"bench-quick-L{layers}", variant="7b", layers=layers, heads=2, kv_heads=1, head_dim=128,
            intermediate=128, vocab=128,
            image_size=56, patch_size=14, vision_hidden=32,
            vision_layers=1, seed=7,
        )
    image = dict(IMAGE_490, image_size=image_size)
    suffix = "" if image_size == IMAGE_490["image_size"] else f"-i{image_size}"
    return FixtureSpec(
        name=f"bench-7b-L{layers}-v{vocab}{suffix}", variant="7b", layers=layers, vocab=vocab, vision_hidden=64,
        vision_layers=2, seed=7, max_position_embeddings=32768, **SEVEN_B, **image,
    )


def weight_bytes(spec: FixtureSpec) -> dict[str, int]:
    """Parameter counts of the checkpoint: per decoder layer, and the rest (embeddings, head, vision)."""
    shapes = gen.tensor_shapes(spec)
    layer = sum(_numel(s) for n, s in shapes.items() if n.startswith("model.layers.0."))
    total = sum(_numel(s) for s in shapes.values())
    return {"params_per_layer": layer, "params_other": total - layer * spec.layers, "params_total": total}


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n


# ------------------------------------------------------------------------------------ streaming writer


def write_safetensors_streaming(spec: FixtureSpec, path: Path) -> int:
    """Write `spec`'s weights as `safetensors_bytes(build_state_dict(spec))` would, one tensor at a time."""
    if sys.byteorder != "little":
        raise RuntimeError("safetensors data is little-endian; this writer assumes a little-endian host")
    dtype, code = gen._DTYPES[spec.dtype]
    item = torch.empty((), dtype=dtype).element_size()
    shapes = gen.tensor_shapes(spec)
    header: dict = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name in sorted(shapes):
        n = _numel(shapes[name]) * item
        header[name] = {"dtype": code, "shape": list(shapes[name]), "data_offsets": [offset, offset + n]}
        offset += n
    head = json.dumps(header, separators=(",", ":")).encode("utf-8")
    head += b" " * (-len(head) % 8)
    with open(path, "wb") as f:
        f.write(len(head).to_bytes(8, "little") + head)
        for name in sorted(shapes):
            t = gen._draw(spec, name, shapes[name]).to(dtype).contiguous()
            f.write(t.reshape(-1).view(torch.uint8).numpy().data)
            del t
    return 8 + len(head) + offset


def _small_files(spec: FixtureSpec) -> dict[str, bytes]:
    files = {"config.json": gen._dump_json(gen.config_dict(spec)),
             "generation_config.json": gen._dump_json(gen.generation_config())}
    files.update(gen.remote_code_files(spec.variant))
    files.update(gen.tokenizer_files())
    return files


def ensure_model(spec: FixtureSpec, root: Path, reuse_stale: bool = False) -> Path:
    """root/models/<spec.name>, generated only when missing or stale (same stamp rule as the fixtures).
    `reuse_stale`: keep a complete model whose stamp differs (e.g. the remote code changed since it was built;
    a 32-layer model is 16 GB and its workspace as much again)."""
    models = Path(root) / "models"
    models.mkdir(parents=True, exist_ok=True)
    dest = models / spec.name
    stamp_path = models / f".{spec.name}.stamp.json"
    stamp = json.loads(gen._dump_json(gen._stamp(spec)))
    if (dest / "model.safetensors").is_file() and stamp_path.is_file():
        try:
            if json.loads(stamp_path.read_text()) == stamp or reuse_stale:
                return dest
        except ValueError:
            pass
    tmp = models / f".tmp.{spec.name}.{os.getpid()}.{uuid.uuid4().hex}"
    try:
        tmp.mkdir(parents=True)
        for name, data in _small_files(spec).items():
            (tmp / name).write_bytes(data)
        write_safetensors_streaming(spec, tmp / "model.safetensors")
        if dest.exists():
            shutil.rmtree(dest)
        os.rename(tmp, dest)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    stamp_path.write_text(json.dumps(stamp, indent=2, sort_keys=True) + "\n")
    return dest


def spec_dict(spec: FixtureSpec) -> dict:
    d = asdict(spec)
    d["hidden"] = spec.hidden
    d["image_rows"] = spec.image_tokens
    d["lora"] = {k: list(v) for k, v in spec.lora_layout().items()}
    return d


# ------------------------------------------------------------------------------------ the input case


def bench_case(image: Path, extra_text_rows: int = 0) -> CanonicalInput:
    """XComposer2's chat template around one image; `extra_text_rows` filler characters (one row each with
    the fixtures' character-level tokenizer) lengthen the user turn to reach a target row count."""
    from parity.inputs import SYSTEM

    filler = ("Describe the picture in detail. " * (extra_text_rows // 32 + 1))[:max(0, extra_text_rows)]
    return CanonicalInput(
        name="bench",
        segments=(
            Segment("text", text=SYSTEM + "[UNUSED_TOKEN_146]user\n"),
            Segment("image", image=image),
            Segment("text", text=filler + "What is in the image?[UNUSED_TOKEN_145]\n[UNUSED_TOKEN_146]assistant\n"),
        ),
    )


def default_image() -> Path:
    images = sorted(Path(gen.IMAGES_DIR).glob("*.png"))
    if not images:
        raise FileNotFoundError(f"no test image in {gen.IMAGES_DIR}")
    return images[0]
