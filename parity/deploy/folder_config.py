"""What a model folder asks lmdeploy for beyond its config.json: `parity_lora_config.json`, the lora_config a
`parity disguise` folder (or a truncated copy) is converted and served with, and a disguise's q/k/v bias flag.
Read by the converter, the live engine and the disguise registration alike."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping

from ..errors import ParityInputError
from ..hfconfig import read_hf_config
from .lora_config import LORA_KEYS, check_lora_override

LORA_CONFIG_FILE = "parity_lora_config.json"


def validated_lora_config(cfg: Any, where: str) -> dict[str, Any]:
    """A complete lora_config (all six keys) read from `where`, checked as `parity convert` checks one."""
    if not isinstance(cfg, dict):
        raise ParityInputError(f"{where}: expected a JSON object with the keys {', '.join(LORA_KEYS)}.")
    missing = [k for k in LORA_KEYS if k not in cfg]
    if missing:
        raise ParityInputError(f"{where}: missing key(s) {', '.join(missing)}; expected all of {', '.join(LORA_KEYS)}.")
    try:
        return check_lora_override(cfg)
    except ParityInputError as e:
        raise ParityInputError(f"{where}: {e}") from None


def read_lora_file(model_dir: str | Path) -> Any | None:
    """The parsed JSON of the folder's `parity_lora_config.json`, or None when it has none."""
    path = Path(model_dir) / LORA_CONFIG_FILE
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ParityInputError(f"{path} is not valid JSON ({e}); expected the lora_config mapping that `parity "
                               "disguise` (or a truncated copy of a model) writes.") from None


def read_lora_config(model_dir: str | Path) -> dict[str, Any] | None:
    """The folder's complete lora_config (validated, all six keys), or None when it has none."""
    data = read_lora_file(model_dir)
    return None if data is None else validated_lora_config(data, str(Path(model_dir) / LORA_CONFIG_FILE))


def disguise_qkv_bias(model_dir: str | Path) -> bool:
    """Whether the disguise in `model_dir` carries q/k/v biases (XComposer2's config.json flag `bias`)."""
    bias = read_hf_config(model_dir, "the folder `parity disguise` wrote").get("bias", False)
    if not isinstance(bias, bool):
        raise ParityInputError(f"{Path(model_dir) / 'config.json'}: 'bias' is {bias!r}; expected true or false "
                               "(XComposer2's q/k/v/o bias flag).")
    return bias


def disguise_model_info(model_dir: str | Path, lora_config: Mapping[str, Any] | None = None) -> dict[str, Any] | None:
    """What parity adds to lmdeploy's `model_info()` for a disguise folder: its lora_config (`lora_config`, else
    the folder's parity_lora_config.json) and `attn_bias` (1 when its q/k/v carry biases). None for a folder
    without parity_lora_config.json (and no `lora_config`): lmdeploy's own settings stay."""
    cfg = dict(lora_config) if lora_config is not None else read_lora_config(model_dir)
    if cfg is None:
        return None
    return {**cfg, "attn_bias": int(disguise_qkv_bias(model_dir))}
