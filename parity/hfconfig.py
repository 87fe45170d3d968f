"""Reading an HF model folder's config.json, with the one clear error every stage gives for a bad folder."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .errors import ParityInputError


def read_hf_config(folder: Path | str, what: str = "an HF model folder") -> dict[str, Any]:
    """config.json of `folder` as a dict; `what` says in the error what the folder should have been."""
    folder = Path(folder)
    path = folder / "config.json"
    if not folder.is_dir():
        raise ParityInputError(f"Folder {folder} does not exist; expected {what} with config.json.")
    if not path.is_file():
        raise ParityInputError(f"{path} is missing; expected {what} (config.json, remote code, tokenizer, weights).")
    try:
        cfg = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ParityInputError(f"{path} is not valid JSON ({e}); expected the model's Hugging Face config.") from None
    if not isinstance(cfg, dict):
        raise ParityInputError(f"{path} must hold a JSON object, got {type(cfg).__name__}.")
    return cfg
