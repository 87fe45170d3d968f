"""Image features the way lmdeploy 0.7.1's XComposer2 vision loader computes them, on CPU.

lmdeploy's `Xcomposer2VisionModel` cannot be instantiated here as is: its `__init__` insists on `decord`,
`build_preprocessor` on torchvision and `build_model` on accelerate (none installed in parity's CPU
environment, and accelerate's dispatch wants GPUs). So this module does the closest faithful thing:

* lmdeploy's own code picks the config (`lmdeploy.archs.get_model_arch`), the sub-type
  (`get_xcomposer_type`) and runs the forward (`Xcomposer2VisionModel.forward`, unbound, on a shell object
  holding the built model) and the 7b preprocessing (`Xcomposer2VisionModel._preprocess_7b`);
* `build_model`'s steps are replayed without accelerate: `AutoModelForCausalLM.from_config(...,
  trust_remote_code=True)` inside lmdeploy's `init_empty_vit`, `vit.load_model()`, `vit.resize_pos()`,
  the embeddings' `image_size` set to `img_size`, the language model deleted, the checkpoint's remaining
  tensors loaded and everything cast to float16 (what `load_checkpoint_and_dispatch(dtype=torch.half)` does);
* torchvision's `Resize(BICUBIC) + ToTensor + Normalize(CLIP mean/std)` is replaced by the same arithmetic
  on PIL (bicubic resize of the PIL image, /255, normalise).

4KHD / 2.5 sub-types (dynamic high-resolution crops) are not handled: a disguise is always the 7b sub-type.
"""

from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from ..errors import ParityInputError

_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class _ClipTransform:
    """torchvision's Resize((s, s), BICUBIC) + ToTensor + Normalize on a PIL image, without torchvision."""

    def __init__(self, size: int):
        self.size = int(size)

    def __call__(self, image) -> torch.Tensor:
        from PIL import Image

        image = image.convert("RGB").resize((self.size, self.size), Image.BICUBIC)
        x = torch.from_numpy(np.array(image, dtype=np.uint8, copy=True)).permute(2, 0, 1).float().div(255)
        mean = torch.tensor(_CLIP_MEAN).view(3, 1, 1)
        std = torch.tensor(_CLIP_STD).view(3, 1, 1)
        return x.sub(mean).div(std)


def _build(model_dir: str) -> Any:
    from safetensors.torch import load_file
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
    if shell.model_type != ModelType.XCOMPOSER2:
        raise ParityInputError(
            f"{model_dir}: lmdeploy sees an XComposer2 {shell.model_type.name} checkpoint; parity reproduces only the "
            "7b vision path (fixed-size images) on CPU."
        )
    shell.vis_processor = _ClipTransform(hf_config.img_size)
    with warnings.catch_warnings(), init_empty_vit(model_dir):
        warnings.simplefilter("ignore")
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
    for f in sorted(Path(model_dir).glob("*.safetensors")):
        for k, v in load_file(str(f)).items():
            if k in wanted:
                state[k] = v.to(wanted[k].dtype) if v.is_floating_point() else v
    missing = sorted(set(wanted) - set(state))
    if missing:
        raise ParityInputError(
            f"{model_dir}: the checkpoint lacks {len(missing)} vision tensor(s) lmdeploy's loader fills, e.g. {missing[0]}."
        )
    model.load_state_dict(state, strict=True)
    shell.model = model.eval()
    return shell


@torch.no_grad()
def lmdeploy_vision_features(model_dir: str | Path, images: Sequence[str | Path], *,
                             trust_remote_code: bool = False) -> list[torch.Tensor]:
    """Per image, the float16 [tokens, hidden] features lmdeploy 0.7.1 would feed TurboMind (see module doc).

    Runs the model folder's remote code (lmdeploy always does): requires `trust_remote_code=True`.
    """
    if not trust_remote_code:
        raise ParityInputError(
            f"Computing lmdeploy's vision features runs {model_dir}'s own modeling code (as lmdeploy does); pass "
            "trust_remote_code=True if you trust it."
        )
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    from PIL import Image

    from ..deploy.compat import cpu_converter_patches

    lg = logging.getLogger("lmdeploy")
    level = lg.level
    try:
        with cpu_converter_patches():
            from lmdeploy.vl.model.xcomposer2 import Xcomposer2VisionModel

            lg.setLevel(logging.WARNING)  # lmdeploy logs every vision forward at INFO
            shell = _build(str(Path(model_dir).resolve()))
            content = []
            for path in images:
                pixels, _ = Xcomposer2VisionModel._preprocess_7b(shell, Image.open(path).convert("RGB"), {})
                content.append({"pixel_values": pixels})
            messages = Xcomposer2VisionModel.forward(shell, [{"role": "preprocess", "content": content}])
    finally:
        lg.setLevel(level)
    return [x.reshape(-1, x.shape[-1]) for x in messages[-1]["content"]]
