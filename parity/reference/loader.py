"""Load the HF reference model the way a user's checkpoint ships: remote code, asked for explicitly.

Accepted: XComposer2 checkpoints (what lmdeploy applies PLoRA to) and Qwen2-based PLoRA checkpoints
(`Qwen2PLoRAForCausalLM`, or `Qwen2ForCausalLM` with its own remote code): the original model a user
disguises as XComposer2 (`parity disguise`) and compares against the deployment of that disguise. Their
q/k/v projections are seen as one canonical `attention.wqkv` (`anatomy.FusedQKV`).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import ParityInputError
from .anatomy import Anatomy, discover
from ..hfconfig import hub_offline, read_hf_config, require_trusted_code

XCOMPOSER2_ARCH = "InternLMXComposer2ForCausalLM"


def is_xcomposer2(cfg: dict[str, Any]) -> bool:
    """lmdeploy's own test (archs.get_model_arch / Xcomposer2VisionModel.match): arch or any auto_map value."""
    archs = cfg.get("architectures") or []
    if archs and archs[0] == XCOMPOSER2_ARCH:
        return True
    return any(XCOMPOSER2_ARCH in str(v) for v in (cfg.get("auto_map") or {}).values())


def model_family(cfg: dict[str, Any]) -> str | None:
    """"xcomposer2", "qwen2-plora" or None (not a model parity compares)."""
    from .qwen2 import is_qwen2_plora

    if is_xcomposer2(cfg):
        return "xcomposer2"
    if is_qwen2_plora(cfg):
        return "qwen2-plora"
    return None


@dataclass
class ReferenceModel:
    path: Path
    model: nn.Module
    anatomy: Anatomy
    tokenizer: Any
    config: dict[str, Any]
    dtype: torch.dtype
    family: str = "xcomposer2"          # "xcomposer2" | "qwen2-plora"
    applied: list[str] = field(default_factory=list)   # in-process fixes made to the loaded model (modelcode)
    # the language model's weights rounded to this dtype first: what the deployment stores (None: as loaded)
    weights_dtype: torch.dtype | None = None

    @property
    def hidden_size(self) -> int:
        return int(self.config["hidden_size"])

    @property
    def bos_id(self) -> int:
        bos = getattr(self.tokenizer, "bos_token_id", None)
        return int(bos if bos is not None else self.config.get("bos_token_id", 1))

    def tokenize(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def decode(self, token_id: int) -> str:
        return self.tokenizer.convert_ids_to_tokens(int(token_id))

    @property
    def device(self) -> torch.device:
        """Where the model's inputs go (the token embedding's device; `parity.device.place_reference`)."""
        from ..device import module_device

        return module_device(self.anatomy.embed_tokens)

    @torch.no_grad()
    def embed_tokens(self, ids: torch.Tensor) -> torch.Tensor:
        rows = self.anatomy.embed_tokens(ids.to(self.device))
        if self.weights_dtype is not None:  # a row of the table as deployed is the row rounded
            rows = rows.to(self.weights_dtype)
        return rows.float().cpu()

    @torch.no_grad()
    def encode_image(self, image: Path) -> torch.Tensor:
        """Image features as the model itself computes them (its own `encode_img`), float32 [n, hidden]."""
        if not hasattr(self.model, "encode_img"):
            raise ParityInputError(
                f"Model {self.path} has no `encode_img` method; parity needs XComposer2's image entry point to "
                "build image rows."
            )
        from .modelcode import model_code_error
        from .precision import compute_dtype

        try:
            with compute_dtype(self.model, self.anatomy.layers, self.dtype):
                feats = self.model.encode_img(str(image))
        except ParityInputError:
            raise
        except Exception as e:
            raise model_code_error(e, self.path, f"computing the features of {image} (encode_img)",
                                   "encode_img(path) to return the image's feature rows [1, n, hidden]") from None
        return feats.float().reshape(-1, feats.shape[-1]).cpu()

    def xcomposer2_state_dict(self) -> dict[str, torch.Tensor]:
        """The weights under XComposer2 names, as a faithful conversion sees them (the weights audit's input).

        XComposer2: the model's own state dict. Qwen2 PLoRA: what `parity disguise` writes for it (grouped
        wqkv, fused LoRA with folded scales; `parity.disguise.xcomposer2_state_dict`).
        """
        if self.family == "qwen2-plora":
            from .qwen2 import xcomposer2_state_dict

            return xcomposer2_state_dict(self.model)
        return self.model.state_dict()

    def weights_note(self, workspace_weight_type: str) -> str:
        """How the reference held its weights for this run (report.json engine.reference_weights)."""
        if self.weights_dtype is None:
            return f"as stored in the checkpoint (the workspace's {workspace_weight_type} weights hold the same values)"
        return (f"rounded to {str(self.weights_dtype).replace('torch.', '')}, the dtype the workspace stores them in "
                "(the checkpoint holds other dtypes; lmdeploy 0.7.1 writes no float32 weights); the weights check "
                "compares the workspace with the checkpoint the same way")

    def with_dtype(self, dtype: torch.dtype) -> "ReferenceModel":
        """The same model computing in another dtype (for the noise floor). No copy: the capture casts one
        decoder layer at a time (parity.reference.precision)."""
        return self if dtype == self.dtype else replace(self, dtype=dtype)

    def with_weights(self, dtype: torch.dtype | None) -> "ReferenceModel":
        """The same model with its language model's weights as a deployment storing them in `dtype` holds
        them (rounded; None: as loaded). No copy: rounded one layer at a time while it runs."""
        return self if dtype == self.weights_dtype else replace(self, weights_dtype=dtype)


def _fits_in_memory(path: Path, dtype: torch.dtype) -> bool:
    """Whether the weights at `dtype` take under half the memory available now (the rest is for the run)."""
    from ..resources import available_memory

    avail = available_memory()
    if avail is None:
        return True
    stored = sum(f.stat().st_size for f in path.glob("*.safetensors"))
    from .lowmem import storage_dtype

    factor = torch.finfo(dtype).bits / torch.finfo(storage_dtype(path)).bits if stored else 1
    return stored * factor < avail / 2


def load_reference(path: Path | str, trust_remote_code: bool, dtype: torch.dtype = torch.float32,
                   low_memory: bool | None = None) -> ReferenceModel:
    """Load the HF reference computing in `dtype`. `low_memory` (default: when `dtype` would not fit) keeps the
    weights in the checkpoint's dtype and upcasts one layer at a time, with identical results."""
    path = Path(path)
    cfg = read_hf_config(path)
    family = model_family(cfg)
    if family is None:
        raise ParityInputError(
            f"{path / 'config.json'}: architectures={cfg.get('architectures')} and auto_map do not name "
            f"{XCOMPOSER2_ARCH} (or a Qwen2 PLoRA model: Qwen2PLoRAForCausalLM, or Qwen2ForCausalLM with its own "
            "remote code); lmdeploy applies PLoRA only to XComposer2 models, so parity compares those and the "
            "Qwen2 PLoRA originals of disguised ones. For a Qwen2-based PLoRA model, disguise it first "
            "(`parity disguise SRC DST`, docs/qwen2-plora.md) and compare the original with the disguise's workspace."
        )
    if cfg.get("auto_map"):
        require_trusted_code(path, trust_remote_code, "runs on this machine when loaded (auto_map in config.json)")
    hub_offline()
    from transformers import AutoTokenizer

    from ..quant.awq_folder import is_awq_folder, load_awq_model
    from .modelcode import apply_clip_geometry, model_code_error, resolving_hub_models

    try:
        with resolving_hub_models(path):
            if is_awq_folder(path):  # AWQ (W4A16) checkpoint: the model with its exactly dequantized weights
                model = load_awq_model(path, trust_remote_code, dtype)
            else:
                model = _load_model(path, trust_remote_code, dtype, low_memory)
        tokenizer = AutoTokenizer.from_pretrained(str(path), trust_remote_code=trust_remote_code)
    except ParityInputError:
        raise
    except Exception as e:  # transformers/safetensors raise many types for a broken folder
        if _raised_in_model_code(e, path):
            raise model_code_error(e, path, "building the model (from_pretrained)",
                                   "its code to build the model from config.json and the folder's weights") from None
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ParityInputError(
            f"Could not load the model in {path} with transformers ({type(e).__name__}: {first}). Expected a "
            "complete HF folder: config.json, the remote-code .py files it names, readable *.safetensors and a "
            "tokenizer."
        ) from None
    applied = apply_clip_geometry(model)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return ReferenceModel(path, model, discover(model, str(path)), tokenizer, cfg, dtype, family, applied)


def _load_model(path: Path, trust_remote_code: bool, dtype: torch.dtype, low_memory: bool | None) -> nn.Module:
    from transformers import AutoModelForCausalLM

    if low_memory is None:
        low_memory = not _fits_in_memory(path, dtype)
    if low_memory:
        from .lowmem import load_lowmem

        return load_lowmem(path, trust_remote_code)
    model, info = AutoModelForCausalLM.from_pretrained(
        str(path), trust_remote_code=trust_remote_code, dtype=dtype, attn_implementation="eager",
        output_loading_info=True,
    )
    # transformers fills missing tensors with random values (and only logs it): never compare those
    missing = sorted(info.get("missing_keys") or [])
    if missing:
        raise ParityInputError(
            f"The checkpoint in {path} lacks {len(missing)} tensor(s) the model defines, e.g. "
            f"{', '.join(missing[:3])}; transformers would fill them with random values. Expected a complete "
            "checkpoint (a merged or stripped export without its Plora_A/Plora_B tensors cannot be compared)."
        )
    return model


def _raised_in_model_code(exc: BaseException, path: Path) -> bool:
    import traceback

    from .modelcode import model_frame

    return model_frame(traceback.extract_tb(exc.__traceback__), path) is not None
