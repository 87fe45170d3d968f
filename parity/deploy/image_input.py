"""The engine-side image input as lmdeploy 0.7.1 builds it, run on CPU with lmdeploy's own code, and its
comparison with what the HF model's own code gives the reference.

lmdeploy's `Xcomposer2VisionModel` cannot be instantiated here as is: its `__init__` insists on `decord`,
`build_preprocessor` on torchvision and `build_model` on accelerate's GPU dispatch. So `build_vision_shell`
does the closest faithful thing:

* lmdeploy's own code picks the config (`lmdeploy.archs.get_model_arch`), the sub-type
  (`get_xcomposer_type`, which imports the checkpoint's `ixc_utils`), preprocesses each image
  (`_preprocess_7b` / `_preprocess_4khd_7b` / `_preprocess_2d5`: the checkpoint's HD transform with lmdeploy's
  hd_num, lmdeploy's row count), runs the vision forward (`Xcomposer2VisionModel.forward`, unbound, on a
  shell object holding the built model) and places the image tokens in the prompt (`proc_messages`);
* `build_model`'s steps are replayed without accelerate: `AutoModelForCausalLM.from_config(...,
  trust_remote_code=True)` inside lmdeploy's `init_empty_vit`, `vit.load_model()`, `vit.resize_pos()`,
  the embeddings' `image_size` set to `img_size`, the language model deleted, the checkpoint's remaining
  tensors loaded and everything cast to float16 (what `load_checkpoint_and_dispatch(dtype=torch.half)` does);
* torchvision's `[Resize(BICUBIC) +] ToTensor + Normalize(CLIP mean/std)` is the same arithmetic on PIL.

Applied in this process only, and reported: lmdeploy 0.7.1's `init_empty_vit` looks the 2.5 modeling module
up in `sys.modules` under the raw folder name, while transformers registers it under a sanitised one
(`-` -> `_hyphen_`); any model folder with a hyphen in its name raises KeyError there. The module is
registered under the raw name too while the vision model is built.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import warnings
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch

from ..checkpoint import load_state
from ..errors import ParityInputError
from ..inputs import prepare
from ..records import CanonicalInput, Chat, Finding, PreparedInput, Segment

_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# sub-type (lmdeploy's, as parity names it) -> lmdeploy's chat template for it (lmdeploy.model)
CHAT_TEMPLATES = {"7b": "internlm-xcomposer2", "4khd": "internlm-xcomposer2", "2.5": "internlm-xcomposer2d5"}
# what the HF code of a 2.5 checkpoint uses for each image when a prompt holds several (lmdeploy 0.7.1: 24)
HF_2D5_MULTI_IMAGE_HD_NUM = 6
KEYERROR_PATCH = ("lmdeploy 0.7.1 init_empty_vit looks the XComposer2.5 modeling module up under the raw folder "
                  "name (KeyError for a folder name with '-' or '.'): registered under that name too")


class _ClipTransform:
    """torchvision's [Resize((s, s), BICUBIC) +] ToTensor + Normalize on a PIL image, without torchvision."""

    def __init__(self, size: int | None):
        self.size = int(size) if size else None

    def __call__(self, image) -> torch.Tensor:
        from PIL import Image

        image = image.convert("RGB")
        if self.size:
            image = image.resize((self.size, self.size), Image.BICUBIC)
        x = torch.from_numpy(np.array(image, dtype=np.uint8, copy=True)).permute(2, 0, 1).float().div(255)
        mean = torch.tensor(_CLIP_MEAN).view(3, 1, 1)
        std = torch.tensor(_CLIP_STD).view(3, 1, 1)
        return x.sub(mean).div(std)


def sub_type_name(model_type: Any) -> str:
    from .convert import SUB_TYPES

    name = getattr(model_type, "name", str(model_type))
    return SUB_TYPES.get(name, name.lower())


def hf_sub_type(model_dir: Path) -> str:
    """The sub-type the checkpoint's own code is (what its `ixc_utils.py` defines), whatever lmdeploy decides."""
    from .convert import ixc_expected

    return ixc_expected(Path(model_dir))[0] or "7b"


def _modeling_module(model_dir: str) -> Any:
    """The checkpoint's modeling_internlm_xcomposer2 module, as transformers registers it."""
    from transformers.dynamic_module_utils import get_class_from_dynamic_module

    return sys.modules[get_class_from_dynamic_module("modeling_internlm_xcomposer2.get_font", model_dir).__module__]


@contextlib.contextmanager
def raw_folder_alias(model_dir: str, applied: list[str]) -> Iterator[None]:
    """Register the 2.5 modeling module under the raw folder name lmdeploy looks up (see module doc)."""
    from transformers.utils import TRANSFORMERS_DYNAMIC_MODULE_NAME

    folder = model_dir.rstrip(os.sep).split(os.sep)[-1]
    raw = ".".join([TRANSFORMERS_DYNAMIC_MODULE_NAME, folder, "modeling_internlm_xcomposer2"])
    added = False
    if raw not in sys.modules:
        sys.modules[raw] = _modeling_module(model_dir)
        added = True
        applied.append(KEYERROR_PATCH)
    try:
        yield
    finally:
        if added:
            sys.modules.pop(raw, None)


@contextlib.contextmanager
def init_empty_vit_contained(model_dir: str | None = None) -> Iterator[None]:
    """Whatever runs lmdeploy 0.7.1's `init_empty_vit` (here, and lmdeploy's own `load_vl_model` under `parity
    quantize`) leaves transformers and lmdeploy as found. Its `rewrite_ctx` swaps `CLIPVisionModel.from_pretrained`
    and restores it by assignment (a bound copy left in CLIPVisionModel's own dict, which shadowed parity's hub
    resolution for the rest of the process), and its gc-referrer swap rebinds lmdeploy's module-level
    `_CLIPVisionModel_from_pretrained` to that bound method, so a later `init_empty_vit` downloads again; on an
    exception it restores nothing. Both entries are put back exactly (parity/patching.py); for the XComposer2.5
    checkpoint in `model_dir` also every binding of its code's `get_font`, which init_empty_vit swaps for a no-op."""
    import lmdeploy.vl.model.xcomposer2 as xc2
    from transformers import CLIPVisionModel

    from ..patching import left_as_found

    with contextlib.ExitStack() as stack:
        stack.enter_context(left_as_found(CLIPVisionModel, "from_pretrained"))
        stack.enter_context(left_as_found(xc2, "_CLIPVisionModel_from_pretrained"))
        if model_dir is not None and xc2.get_xcomposer_type(model_dir)[0] == xc2.ModelType.XCOMPOSER2D5:
            for module, name in get_font_holders(model_dir):
                stack.enter_context(left_as_found(module, name))
        yield


def get_font_holders(model_dir: str) -> list[tuple[Any, str]]:
    """(module, name) for every name of the checkpoint's code modules bound to its `get_font`: lmdeploy's swap
    (gc.get_referrers) rewrites all of them, the defining module and each that imported it."""
    from transformers.dynamic_module_utils import get_class_from_dynamic_module
    from transformers.utils import TRANSFORMERS_DYNAMIC_MODULE_NAME

    fn = get_class_from_dynamic_module("modeling_internlm_xcomposer2.get_font", model_dir)
    modules = {id(m): m for key, m in list(sys.modules.items())
               if m is not None and key.startswith(TRANSFORMERS_DYNAMIC_MODULE_NAME + ".")}
    return [(m, name) for m in modules.values() for name, value in list(vars(m).items()) if value is fn]


def build_vision_shell(model_dir: str) -> tuple[Any, list[str]]:
    """lmdeploy's `Xcomposer2VisionModel` for `model_dir`, built on CPU (see module doc), and the in-process
    patches that were needed."""
    from transformers import AutoModelForCausalLM

    from lmdeploy.archs import get_model_arch
    from lmdeploy.vl.model.xcomposer2 import ModelType, Xcomposer2VisionModel, get_xcomposer_type, init_empty_vit

    _, hf_config = get_model_arch(model_dir)
    if not Xcomposer2VisionModel.match(hf_config):
        raise ParityInputError(
            f"{model_dir}: lmdeploy's Xcomposer2VisionModel does not match this config (architectures / auto_map "
            "do not name InternLMXComposer2ForCausalLM); lmdeploy would not load the XComposer2 vision part."
        )
    shell = Xcomposer2VisionModel.__new__(Xcomposer2VisionModel)
    shell.model_path = model_dir
    shell.hf_config = hf_config
    shell.with_llm = False
    shell.model_type, shell.module = get_xcomposer_type(model_dir)
    hd = shell.model_type in (ModelType.XCOMPOSER2D5, ModelType.XCOMPOSER2_4KHD)
    shell.vis_processor = _ClipTransform(None if hd else hf_config.img_size)
    if hd:
        shell.HD_transform = shell.module
    applied: list[str] = []
    with contextlib.ExitStack() as stack:
        if shell.model_type == ModelType.XCOMPOSER2D5:
            stack.enter_context(raw_folder_alias(model_dir, applied))
        stack.enter_context(warnings.catch_warnings())
        warnings.simplefilter("ignore")
        stack.enter_context(init_empty_vit_contained(model_dir))
        stack.enter_context(init_empty_vit(model_dir))
        model = AutoModelForCausalLM.from_config(hf_config, trust_remote_code=True)
        model.vit.load_model()
        model.vit.resize_pos()
        if hasattr(hf_config, "img_size"):
            model.vit.vision_tower.vision_model.embeddings.image_size = hf_config.img_size
        del model.model
        del model.output
    model = model.half()
    wanted = model.state_dict()
    state: dict[str, torch.Tensor] = {}
    for k, v in load_state(model_dir).items():  # safetensors, or an AWQ folder's pytorch_model.bin
        if k in wanted:
            state[k] = v.to(wanted[k].dtype) if v.is_floating_point() else v
    missing = sorted(set(wanted) - set(state))
    if missing:
        raise ParityInputError(
            f"{model_dir}: the checkpoint lacks {len(missing)} vision tensor(s) lmdeploy's loader fills, e.g. {missing[0]}."
        )
    model.load_state_dict(state, strict=True)
    shell.model = model.eval()
    return shell, applied


@contextlib.contextmanager
def lmdeploy_quiet() -> Iterator[None]:
    """lmdeploy importable on CPU, and its per-forward INFO logging off."""
    from .compat import cpu_converter_patches

    lg = logging.getLogger("lmdeploy")
    level = lg.level
    try:
        with cpu_converter_patches():
            lg.setLevel(logging.WARNING)
            yield
    finally:
        lg.setLevel(level)


# ---------------------------------------------------------------- records


@dataclass(frozen=True)
class VisionFault:
    """A deliberate mistake on lmdeploy's side of the image path (the fault catalogue's; never in plain runs)."""

    swap_separators: bool = False        # plora_glb_GN and plora_sub_GN exchanged
    swap_tiles: bool = False             # the first two tiles of each image exchanged before the ViT
    hd_num: int | None = None            # preprocess with this hd_num instead of lmdeploy's
    placement_sub_type: str | None = None  # place image tokens as this sub-type does


class VisionFailed(Exception):
    """lmdeploy's image path raised for an image: a deployment would fail (or be refused) at this point."""


@dataclass(frozen=True)
class LmdeployImage:
    """One image as lmdeploy 0.7.1 feeds it to TurboMind."""

    path: Path
    sub_type: str                        # lmdeploy's: "7b" | "4khd" | "2.5"
    hd_num: int | None
    size: tuple[int, int]                # the preprocessed image (width, height)
    tiles: tuple[int, int] | None        # (rows, columns) of tiles; None for 7b
    n_token: int                         # lmdeploy's own count (its prompt reserves this many rows)
    features: torch.Tensor               # float32 [rows, hidden], computed in float16


class LmdeployVision:
    """lmdeploy's vision side for one model folder: images -> features, chat -> placement."""

    def __init__(self, model_dir: Path | str, fault: VisionFault | None = None):
        self.model_dir = str(Path(model_dir).resolve())
        self.fault = fault or VisionFault()
        self._shell = None
        self.applied: list[str] = []
        self._cache: dict[tuple[str, int | None], LmdeployImage] = {}

    @property
    def shell(self):
        if self._shell is None:
            try:
                with lmdeploy_quiet():
                    self._shell, self.applied = build_vision_shell(self.model_dir)
            except ParityInputError:
                raise
            except Exception as e:  # noqa: BLE001 - the model's own code under lmdeploy's loader
                first = (str(e).strip().splitlines() or [type(e).__name__])[0]
                raise VisionFailed(f"lmdeploy's vision model could not be built ({type(e).__name__}: {first})") from None
        return self._shell

    @property
    def sub_type(self) -> str:
        """lmdeploy's sub-type ("unknown" when its vision model could not be built)."""
        try:
            return sub_type_name(self.shell.model_type)
        except VisionFailed:
            return "unknown"

    @torch.no_grad()
    def encode(self, path: Path, n_images: int = 1) -> LmdeployImage:
        """What lmdeploy computes for one image of a prompt holding `n_images` (0.7.1 ignores the count)."""
        from PIL import Image

        key = (str(path), n_images)
        if key in self._cache:
            return self._cache[key]
        with lmdeploy_quiet():
            from lmdeploy.vl.model.xcomposer2 import ModelType, Xcomposer2VisionModel

            shell = self.shell
            sub = sub_type_name(shell.model_type)
            params = {} if self.fault.hd_num is None else {"hd_num": self.fault.hd_num}
            image = Image.open(path).convert("RGB")
            hd_num = None
            if shell.model_type == ModelType.XCOMPOSER2D5:
                pixels, n_token = Xcomposer2VisionModel._preprocess_2d5(shell, image, params)
                hd_num, tile = params.get("hd_num", 24), 560
            elif shell.model_type == ModelType.XCOMPOSER2_4KHD:
                pixels, n_token = (Xcomposer2VisionModel._preprocess_4khd_7b(shell, image, params)
                                   if self.fault.hd_num is None else self._4khd_with(shell, image))
                hd_num, tile = self.fault.hd_num or 25, 336
            else:
                pixels, n_token = Xcomposer2VisionModel._preprocess_7b(shell, image, params)
                tile = None
            height, width = pixels.shape[-2:]
            tiles = (height // tile, width // tile) if tile else None
            if self.fault.swap_tiles and tiles and tiles[0] * tiles[1] > 1:
                pixels = _swap_first_tiles(pixels, tile, tiles)
            try:
                with self._separators_swapped(shell):
                    messages = Xcomposer2VisionModel.forward(shell, [{"role": "preprocess",
                                                                      "content": [{"pixel_values": pixels}]}])
            except Exception as e:  # noqa: BLE001 - the model's own code under lmdeploy's calls
                first = (str(e).strip().splitlines() or [type(e).__name__])[0]
                raise VisionFailed(
                    f"lmdeploy's {sub} vision forward raised {type(e).__name__} ({first}) for {Path(path).name}"
                ) from None
        feats = messages[-1]["content"][0]
        out = LmdeployImage(Path(path), sub, hd_num, (int(width), int(height)), tiles, int(n_token),
                            feats.reshape(-1, feats.shape[-1]).float())
        self._cache[key] = out
        return out

    def _4khd_with(self, shell, image):
        """lmdeploy's 4KHD preprocessing with another hd_num (0.7.1 hard-codes 25): the fault catalogue's."""
        image = shell.HD_transform(image, hd_num=self.fault.hd_num)
        pixels = shell.vis_processor(image).unsqueeze(0).half()
        w, h = image.size[0] // 336, image.size[1] // 336
        return pixels, int((h * w + 1) * 144 + 1 + (h + 1) * 12)

    @contextlib.contextmanager
    def _separators_swapped(self, shell) -> Iterator[None]:
        m = shell.model
        if not (self.fault.swap_separators and hasattr(m, "plora_glb_GN")):
            yield
            return
        glb, sub = m.plora_glb_GN.data.clone(), m.plora_sub_GN.data.clone()
        m.plora_glb_GN.data.copy_(sub.reshape(glb.shape))
        m.plora_sub_GN.data.copy_(glb.reshape(sub.shape))
        try:
            yield
        finally:
            m.plora_glb_GN.data.copy_(glb)
            m.plora_sub_GN.data.copy_(sub)

    def chat_segments(self, chat: Chat) -> tuple[Segment, ...]:
        """The prompt lmdeploy builds for `chat` (its `proc_messages` and chat template), as segments."""
        with lmdeploy_quiet():
            from lmdeploy.model import MODELS
            from lmdeploy.vl.model.xcomposer2 import ModelType, Xcomposer2VisionModel

            sub = self.fault.placement_sub_type or self.sub_type
            model_type = {"7b": ModelType.XCOMPOSER2, "4khd": ModelType.XCOMPOSER2_4KHD,
                          "2.5": ModelType.XCOMPOSER2D5}[sub]
            template = MODELS.get(CHAT_TEMPLATES[sub])(meta_instruction=chat.system)
            content = [{"type": "text", "text": chat.query}] + [{"type": "image"} for _ in chat.images]
            prompt, token = Xcomposer2VisionModel.proc_messages(
                [{"role": "user", "content": content}], template, True, model_type)
        return _split(prompt, token, chat.images)


def _swap_first_tiles(pixels: torch.Tensor, tile: int, tiles: tuple[int, int]) -> torch.Tensor:
    pixels = pixels.clone()
    r2, c2 = divmod(1, tiles[1])
    a = pixels[..., :tile, :tile].clone()
    b = pixels[..., r2 * tile:(r2 + 1) * tile, c2 * tile:(c2 + 1) * tile].clone()
    pixels[..., :tile, :tile] = b
    pixels[..., r2 * tile:(r2 + 1) * tile, c2 * tile:(c2 + 1) * tile] = a
    return pixels


def _split(prompt: str, token: str, images: Sequence[Path]) -> tuple[Segment, ...]:
    parts = prompt.split(token)
    if len(parts) != len(images) + 1:
        raise ParityInputError(f"The prompt holds {len(parts) - 1} image token(s) for {len(images)} image(s).")
    segs: list[Segment] = []
    for i, text in enumerate(parts):
        if text:
            segs.append(Segment("text", text=text))
        if i < len(images):
            segs.append(Segment("image", image=Path(images[i])))
    return tuple(segs)


# ---------------------------------------------------------------- the HF side's placement


def _chat_turns(system: str, query: str) -> str:
    """InternLM-XComposer2's chat prompt (meta instruction, one user turn, the assistant's header)."""
    sys_part = f"[UNUSED_TOKEN_146]system\n{system}[UNUSED_TOKEN_145]\n" if system else ""
    return f"{sys_part}[UNUSED_TOKEN_146]user\n{query}[UNUSED_TOKEN_145]\n[UNUSED_TOKEN_146]assistant\n"


def hf_chat_segments(chat: Chat, sub_type: str) -> tuple[Segment, ...]:
    """Where the HF model's own chat code puts the images of `chat`: 7b / 4KHD at the start of the user's
    query; 2.5 one image before the whole template, several as `Image{i} <image>; ` before the query."""
    marker = "\0image\0"
    if sub_type == "2.5" and len(chat.images) == 1:
        prompt = marker + _chat_turns(chat.system, chat.query)
    elif sub_type == "2.5":
        prompt = _chat_turns(chat.system, "".join(f"Image{i + 1} {marker}; " for i in range(len(chat.images)))
                             + chat.query)
    else:
        prompt = _chat_turns(chat.system, marker * len(chat.images) + chat.query)
    return _split(prompt, marker, chat.images)


def hf_hd_num(sub_type: str, n_images: int) -> int | None:
    """The hd_num the HF chat code of a sub-type uses per image (None: its encode_img default)."""
    return HF_2D5_MULTI_IMAGE_HD_NUM if sub_type == "2.5" and n_images > 1 else None


# ---------------------------------------------------------------- comparison


def _image_spans(p: PreparedInput) -> list[tuple[int, int]]:
    return [tuple(r) for r in p.ranges]


def vision_failed(case: str, hf_sub: str, lm_sub: str, error: Exception) -> Finding:
    trap = (f" lmdeploy sees this {hf_sub} checkpoint as {lm_sub} (its `ixc_utils` import failed: the sub-type "
            "trap of the conversion warnings), so it runs the wrong image path." if hf_sub != lm_sub else "")
    return Finding(check="inputs", severity="error", cause="input_mismatch", module="embeddings", positions="image",
                   case=case, metrics={"sub_type_hf": hf_sub, "sub_type_lmdeploy": lm_sub},
                   message=f"{error}: a deployment fails to build this image's input.{trap} The engine was given the "
                           "HF image features instead.")


def compare_images(case: str, hf: PreparedInput, lm: Sequence[LmdeployImage], allowance: float,
                   hf_sub_type: str) -> tuple[list[Finding], list[dict[str, Any]]]:
    """Row count, lmdeploy's own count, and per-row features of each image: lmdeploy's against the HF side's.

    A feature row differs when its largest difference exceeds `allowance` times the row's largest HF value
    (lmdeploy runs the ViT in float16). Rows are named as prompt rows of the HF side."""
    findings: list[Finding] = []
    table: list[dict[str, Any]] = []
    for k, (img, (b, e)) in enumerate(zip(lm, _image_spans(hf))):
        ref = hf.image_features[k]
        row = {"case": case, "image": img.path.name, "sub_type": img.sub_type, "hd_num": img.hd_num,
               "size": list(img.size), "tiles": list(img.tiles) if img.tiles else None,
               "rows_hf": int(ref.shape[0]), "rows_lmdeploy": int(img.features.shape[0]),
               "n_token_lmdeploy": img.n_token}
        if img.features.shape[0] != img.n_token:
            findings.append(Finding(
                check="inputs", severity="error", cause="input_mismatch", module="embeddings", positions="image",
                case=case, metrics={"image": k, "n_token": img.n_token, "rows": int(img.features.shape[0])},
                message=(f"Image {k + 1} ({img.path.name}): lmdeploy's prompt reserves {img.n_token} rows (its "
                         f"{img.sub_type} formula) but its vision forward gives {img.features.shape[0]}; TurboMind "
                         "rejects or misplaces the features."),
            ))
        if img.features.shape[0] != ref.shape[0]:
            tiles = f", {img.tiles[0]} x {img.tiles[1]} tiles" if img.tiles else ""
            findings.append(Finding(
                check="inputs", severity="error", cause="input_mismatch", module="embeddings", positions="image",
                case=case, metrics={"image": k, "rows_hf": int(ref.shape[0]), "rows_lmdeploy": img.n_token,
                                    "hf_rows": [b, e]},
                message=(f"Image {k + 1} ({img.path.name}) has {ref.shape[0]} rows on the HF side (rows {b}-{e - 1}) "
                         f"but {img.features.shape[0]} in lmdeploy ({img.sub_type}, hd_num {img.hd_num}, "
                         f"{img.size[0]} x {img.size[1]} px{tiles}): the two sides tile the image differently."),
            ))
            table.append(row)
            continue
        scale = ref.abs().amax(dim=1).clamp_min(torch.finfo(torch.float32).tiny)
        rel = (img.features - ref).abs().amax(dim=1) / scale
        bad = torch.nonzero(~(rel <= allowance)).flatten()
        row["max_row_error"] = float(rel.max()) if rel.numel() else 0.0
        table.append(row)
        if bad.numel():
            rows = [b + int(i) for i in bad.tolist()]
            findings.append(Finding(
                check="inputs", severity="error", cause="input_mismatch", module="embeddings", positions="image",
                case=case, metrics={"image": k, "rows": rows[:64], "count": len(rows),
                                    "max_row_error": float(rel.max()), "allowance": allowance},
                message=(f"Image {k + 1} ({img.path.name}): lmdeploy's image features differ from the HF model's "
                         f"beyond the float16 allowance ({allowance:.3g} of each row's largest value) at "
                         f"{len(rows)} of {ref.shape[0]} row(s), first at prompt row {rows[0]} (rows {rows[:8]}); "
                         f"largest error {float(rel.max()):.3g}."),
            ))
    n = len(lm)
    if hf_sub_type == "2.5" and n > 1 and lm and lm[0].sub_type == "2.5" and lm[0].hd_num != HF_2D5_MULTI_IMAGE_HD_NUM:
        findings.append(Finding(
            check="inputs", severity="warning", cause="input_mismatch", module="embeddings", positions="image",
            case=case, metrics={"hd_num_hf_chat": HF_2D5_MULTI_IMAGE_HD_NUM, "hd_num_lmdeploy": lm[0].hd_num},
            message=(f"This prompt holds {n} images: the XComposer2.5 HF chat code tiles each with hd_num "
                     f"{HF_2D5_MULTI_IMAGE_HD_NUM}, lmdeploy 0.7.1 with {lm[0].hd_num} (its _preprocess_2d5 ignores the "
                     "image count), so a deployment sees more tiles per image than the model was used with. Here "
                     f"both sides were given hd_num {lm[0].hd_num}; pass hd_num={HF_2D5_MULTI_IMAGE_HD_NUM} "
                     "per image to lmdeploy to match the HF chat."),
        ))
    return findings, table


class ImagePath:
    """Both sides' image rows for each case. For the 4KHD / 2.5 sub-types (either side's), the engine's come
    from lmdeploy's own image path (`LmdeployVision`) and are compared with the HF side's; the
    engine is then given the HF features wherever an image's row count agrees, so the layer checks judge
    the layers, and the input findings the image path."""

    def __init__(self, model: Path, ref, ws, allowance: float, vision_fault: "VisionFault | None" = None):
        """`ref`: the reference model (`reference.loader.ReferenceModel`), `ws` the workspace, `allowance` the
        relative feature difference allowed (`Thresholds.image_feature_rel`)."""
        self.ref, self.allowance = ref, allowance
        self.hf_sub = hf_sub_type(model) if ref.family == "xcomposer2" else "7b"
        record = ws.conversion_record()
        hd = ("4khd", "2.5")
        self.vision = (LmdeployVision(model, vision_fault)
                       if ref.family == "xcomposer2" and (self.hf_sub in hd or (record and record.sub_type in hd))
                       else None)
        self.section: dict[str, Any] = {}

    def prepare(self, case: CanonicalInput) -> tuple[PreparedInput, PreparedInput, list[Finding]]:
        ref = self.ref
        hf_case = replace(case, segments=hf_chat_segments(case.chat, self.hf_sub)) if case.chat else case
        prepared = prepare(hf_case, ref.tokenize, ref.embed_tokens, ref.encode_image, ref.bos_id, ref.decode)
        if self.vision is None:
            return prepared, prepared, []
        try:
            eng_case = replace(case, segments=self.vision.chat_segments(case.chat)) if case.chat else hf_case
            paths = [s.image for s in eng_case.segments if s.kind == "image"]
            lm = [self.vision.encode(p, len(paths)) for p in paths]
        except VisionFailed as e:
            return prepared, prepared, [vision_failed(case.name, self.hf_sub, self.vision.sub_type, e)]
        # the HF features where the row counts agree (compare_images judges the difference), else lmdeploy's
        feats = iter([hf if hf.shape[0] == img.features.shape[0] else img.features
                      for hf, img in zip(prepared.image_features, lm)])
        eng = prepare(eng_case, ref.tokenize, ref.embed_tokens, lambda _: next(feats), ref.bos_id, ref.decode)
        found, table = compare_images(case.name, prepared, lm, self.allowance, self.hf_sub)
        self.section = {"sub_type_hf": self.hf_sub, "sub_type_lmdeploy": self.vision.sub_type,
                        "applied": list(self.vision.applied), "images": self.section.get("images", []) + table}
        return prepared, eng, found
