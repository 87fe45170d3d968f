"""Deploy a Qwen2-based PLoRA model with lmdeploy 0.7.1's TurboMind by disguising it as InternLM-XComposer2.

lmdeploy applies PLoRA only to `InternLMXComposer2ForCausalLM` (one architecture string picks both its
weight reader and its vision loader; lmdeploy issue #2437). This package:

* `disguise(src, dst) -> DisguiseRecord` writes the exact XComposer2 equivalent of a Qwen2 PLoRA checkpoint
  (names, grouped wqkv, fused LoRA with folded scales, config, remote code, vision part), refuses what
  cannot be represented (head_dim != 128), keeps the q/k/v biases and lists what lmdeploy will lose;
* writes `parity_lora_config.json`, the lora_config that reproduces the model's per-linear ranks/scales, and
  `register_lora_config()` makes lmdeploy's own conversion and serving use it and export the biases
  (attn_bias = 1); `parity lmdeploy -- ARGS` runs lmdeploy's CLI with it active;
* `audit_deployment(model_dir) -> DeploymentAudit` says what lmdeploy would pick for a folder (architecture,
  reader, vision model, sub-type, lora_config) and whether it fits the model;
* `xcomposer2_state_dict(model)` gives a loaded Qwen2 PLoRA model's weights under XComposer2 names (the
  parity pipeline's weights audit);
* `lmdeploy_vision_features(model_dir, images)` runs lmdeploy's XComposer2 vision forward on CPU;
* `disguised_workspace(model_dir, cache_root)` disguises and converts (cached), for `parity run ORIGINAL`.

See docs/qwen2-plora.md.
"""

from __future__ import annotations

from typing import Any

_EXPORTS = {
    "disguise": "writer",
    "DisguiseRecord": "writer",
    "DISGUISE_RECORD": "writer",
    "LORA_CONFIG_FILE": "lora",
    "lora_config_for_disguise": "lora",
    "read_lora_config": "lora",
    "register_lora_config": "lora",
    "unregister_lora_config": "lora",
    "lora_config_registered": "lora",
    "audit_deployment": "audit",
    "DeploymentAudit": "audit",
    "lmdeploy_vision_features": "vision",
    "disguised_workspace": "chain",
    "xcomposer2_state_dict": "parity.reference.qwen2",  # the Qwen2 <-> XComposer2 mapping: reference side
    "is_qwen2_plora": "parity.reference.qwen2",
    "QWEN2_PLORA_ARCH": "parity.reference.qwen2",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:  # lazy: `import parity.disguise` stays cheap
    if name in _EXPORTS:
        import importlib

        where = _EXPORTS[name]
        mod = importlib.import_module(where if "." in where else f"{__name__}.{where}")
        return getattr(mod, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
