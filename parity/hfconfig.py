"""Reading an HF model folder's config.json, with the one clear error every stage gives for a bad folder, and
the one reading of its attention shape (the head_dim rule lives here, once)."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

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


def require_trusted_code(folder: Path | str, trust_remote_code: bool, runs: str) -> None:
    """Refuse (exit 2) to run a model folder's own code unless the user trusts it: trust_remote_code is opt-in.
    `runs` says who runs that code and when."""
    if not trust_remote_code:
        raise ParityInputError(
            f"Model {folder} ships its own modeling code, which {runs}. Pass --trust-remote-code "
            "(trust_remote_code=True in Python) if you trust it."
        )


def hub_offline() -> None:
    """parity never downloads: transformers and huggingface_hub read only local files and caches (a user's
    explicit HF_HUB_OFFLINE=0 / TRANSFORMERS_OFFLINE=0 wins)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def kv_heads_of(cfg: Mapping[str, Any]) -> int:
    """num_key_value_heads, or num_attention_heads where it is absent or null (no grouped-query attention)."""
    return int(cfg.get("num_key_value_heads") or cfg.get("num_attention_heads") or 0)


def head_dim_of(cfg: Mapping[str, Any]) -> int:
    """The head dimension: config.json's head_dim, else hidden_size // num_attention_heads (how InternLM2,
    XComposer2 and Qwen2 derive it). Raises KeyError / ZeroDivisionError on a config that says neither."""
    return int(cfg.get("head_dim") or int(cfg["hidden_size"]) // int(cfg["num_attention_heads"]))


@dataclass(frozen=True)
class AttnShape:
    """The attention layout an HF config describes: query heads, kv heads, head dimension."""

    heads: int
    kv_heads: int
    head_dim: int

    @property
    def gs(self) -> int:
        return self.heads // self.kv_heads

    @property
    def q_out(self) -> int:
        return self.heads * self.head_dim

    @property
    def kv_out(self) -> int:
        return self.kv_heads * self.head_dim

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any], where: str = "config.json") -> "AttnShape":
        """Read and check `cfg` (a config.json dict); `where` names it in the error (exit 2)."""
        try:
            heads, kv, head_dim = int(cfg["num_attention_heads"]), kv_heads_of(cfg), head_dim_of(cfg)
        except (KeyError, TypeError, ValueError, ZeroDivisionError):
            raise ParityInputError(
                f"{where}: expected integer num_attention_heads, num_key_value_heads and hidden_size (or head_dim) "
                "to lay out q/k/v."
            ) from None
        if heads < 1 or kv < 1 or heads % kv:
            raise ParityInputError(
                f"{where}: num_attention_heads ({heads}) must be a positive multiple of num_key_value_heads ({kv})."
            )
        return cls(heads, kv, head_dim)
