"""Image features the way lmdeploy 0.7.1's XComposer2 vision loader computes them, on CPU, for a disguise.

The vision model is lmdeploy's own, built on CPU by `parity.deploy.image_input.build_vision_shell` (which says
what is replayed and why); here it runs the 7b preprocessing (`Xcomposer2VisionModel._preprocess_7b`) and the
forward. A disguise is always the 7b sub-type: 4KHD / 2.5 checkpoints are refused here (`parity run` compares
their image path through `parity.deploy.image_input`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import torch

from ..errors import ParityInputError
from ..hfconfig import hub_offline, require_trusted_code


def _build(model_dir: str) -> Any:
    from lmdeploy.vl.model.xcomposer2 import ModelType

    from ..deploy.image_input import build_vision_shell

    shell, _ = build_vision_shell(model_dir)
    if shell.model_type != ModelType.XCOMPOSER2:
        raise ParityInputError(
            f"{model_dir}: lmdeploy sees an XComposer2 {shell.model_type.name} checkpoint; a disguise is always the "
            "7b sub-type (fixed-size images)."
        )
    return shell


@torch.no_grad()
def lmdeploy_vision_features(model_dir: str | Path, images: Sequence[str | Path], *,
                             trust_remote_code: bool = False) -> list[torch.Tensor]:
    """Per image, the float16 [tokens, hidden] features lmdeploy 0.7.1 would feed TurboMind (see module doc).

    Runs the model folder's remote code (lmdeploy always does): requires `trust_remote_code=True`.
    """
    require_trusted_code(model_dir, trust_remote_code, "lmdeploy runs to compute the vision features")
    hub_offline()
    from PIL import Image

    from ..deploy.image_input import lmdeploy_quiet

    with lmdeploy_quiet():
        from lmdeploy.vl.model.xcomposer2 import Xcomposer2VisionModel

        shell = _build(str(Path(model_dir).resolve()))
        content = []
        for path in images:
            pixels, _ = Xcomposer2VisionModel._preprocess_7b(shell, Image.open(path).convert("RGB"), {})
            content.append({"pixel_values": pixels})
        messages = Xcomposer2VisionModel.forward(shell, [{"role": "preprocess", "content": content}])
    return [x.reshape(-1, x.shape[-1]) for x in messages[-1]["content"]]
