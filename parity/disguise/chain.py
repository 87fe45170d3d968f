"""The whole deployment chain of a Qwen2 PLoRA model, cached: disguise -> lmdeploy conversion with the
disguise's lora_config. For `parity run ORIGINAL` without `--workspace`."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from ..atomic import remove_leftovers
from ..errors import ParityInputError
from ..locks import entry_lock
from .lora import read_lora_config
from .writer import DISGUISE_RECORD, DisguiseRecord, disguise

# Bump when the disguise's output for the same input changes (part of the cache key).
DISGUISE_VERSION = "2"  # 2: biases kept as exported (no longer a loss)


def disguised_workspace(model_dir: str | Path, cache_root: str | Path, *, tp: int = 1,
                        trust_remote_code: bool = False) -> tuple[Path, Path, DisguiseRecord]:
    """(workspace, disguise folder, record) for the Qwen2 PLoRA model in `model_dir`.

    The disguise goes to `cache_root/disguises/<name>-<key>` (key: the model folder's files, sizes, mtimes,
    the lmdeploy version and DISGUISE_VERSION; reused when present), the workspace to
    `cache_root/workspaces` via `parity.deploy.convert.convert_cached` with the disguise's
    parity_lora_config.json as the lora_config -- what lmdeploy writes when `register_lora_config()` is
    active in the converting/serving process.
    """
    from ..deploy.convert import cache_key, convert_cached

    model_dir = Path(model_dir).resolve()
    key = hashlib.sha256(f"{cache_key(model_dir)}/{DISGUISE_VERSION}".encode()).hexdigest()[:16]
    dst = Path(cache_root).resolve() / "disguises" / f"{model_dir.name}-{key}"
    record_path = dst / DISGUISE_RECORD
    dst.parent.mkdir(parents=True, exist_ok=True)
    with entry_lock(dst.parent / f".{dst.name}.lock"):  # several processes (pytest -n, --jobs) may ask at once
        try:
            record = DisguiseRecord(**json.loads(record_path.read_text()))
        except (OSError, ValueError, TypeError):
            remove_leftovers(dst, "disguise")  # of a run killed outright (we hold the entry's lock)
            record = disguise(model_dir, dst, trust_remote_code=trust_remote_code, overwrite=True, quiet=True)
    lora = read_lora_config(dst)
    if lora is None:  # pragma: no cover - disguise always writes it
        raise ParityInputError(f"{dst} has no parity_lora_config.json; delete the folder and run again.")
    ws = convert_cached(dst, Path(cache_root).resolve() / "workspaces", tp=tp, lora_config=lora)
    return ws, dst, record
