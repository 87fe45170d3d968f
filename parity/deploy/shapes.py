"""What a workspace's config.yaml says about the model: its shape (`model_config`) and its LoRA settings
(`lora_config`). Plain records, below the modules that read (workspace), lay out (layout) and resolve
(lora_config) them, so none of those needs another to name these types."""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any


@dataclass
class ModelShape:
    head_num: int
    kv_head_num: int
    size_per_head: int
    hidden_units: int
    num_layer: int
    inter_size: list[int]
    norm_eps: float
    vocab_size: int
    weight_type: str
    tp: int
    attn_bias: int
    model_arch: str
    embedding_size: int = 0  # rows of tok_embeddings when they differ from vocab_size (0: same)
    group_size: int = 0      # quantization group size (int4 workspaces)


@dataclass
class LoraSettings:
    lora_policy: str = ""
    lora_r: int = 0
    lora_scale: float = 0.0
    lora_max_wo_r: int = 0
    lora_rank_pattern: str = ""
    lora_scale_pattern: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}
