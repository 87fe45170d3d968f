"""Reading a TurboMind workspace written by lmdeploy's converter (`lmdeploy convert`, 0.6 – 0.9.x layout).

A workspace is `ROOT/triton_models/weights/` holding `config.yaml` and one raw little-endian file per tensor
and tensor-parallel rank, with no header (bf16 stored as its raw 16 bits). Shapes are implied by
config.yaml; `parity.deploy.layout.tensor_spec` derives them. Files are memory-mapped and read one tensor
at a time, so a 7B workspace never sits in memory at once.

`Workspace.tensor(name)` returns the tensor merged over tp ranks, i.e. exactly what a tp=1 conversion
writes (see layout.py for the two exceptions: replicated kv heads and inter_size padding). Every problem
with the folder is a `ParityInputError` whose message names the file or config key and what was expected.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
import yaml

from ..errors import ParityInputError
from ..names import TM_GLOBALS, TM_LAYER_ORDER, TM_LINEARS_IN_ORDER, TM_LORA_KINDS, parse_tm_name
from ..records import ConversionRecord
from . import layout
from .lora_config import LORA_KEYS, parse_pattern, resolve
from .shapes import LoraSettings, ModelShape

CONFIG_NAME = "config.yaml"
RECORD_NAME = "parity-conversion.json"


# ------------------------------------------------------------------------------------------ config checks

_INT = "an integer"
_INT32_MAX = 2**31 - 1
MAX_LAYERS = 4096  # sanity bound: config.yaml values beyond it are corrupt, not a model
_NUM = "a number"
_STR = "a string"


def _type_ok(value: Any, kind: str) -> bool:
    if kind == _INT:
        return isinstance(value, int) and not isinstance(value, bool)
    if kind == _NUM:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if kind == _STR:
        return isinstance(value, str)
    raise AssertionError(kind)  # pragma: no cover


class _Section:
    def __init__(self, cfg_path: Path, name: str, data: Any):
        self.path = cfg_path
        self.name = name
        if not isinstance(data, dict):
            raise ParityInputError(
                f"{cfg_path}: section '{name}' must be a mapping of keys to values, got "
                f"{type(data).__name__}. Re-convert the model with lmdeploy's converter."
            )
        self.data = data

    def fail(self, key: str, expected: str, got: Any = None, present: bool = True) -> ParityInputError:
        if not present:
            return ParityInputError(
                f"{self.path}: key '{self.name}.{key}' is missing; expected {expected}. The workspace's "
                "config.yaml is incomplete (written by another tool or edited by hand); re-convert the model."
            )
        return ParityInputError(
            f"{self.path}: key '{self.name}.{key}' is {got!r} ({type(got).__name__}); expected {expected}."
        )

    def get(self, key: str, kind: str, *, required: bool = True, default: Any = None,
            minimum: float | None = None, maximum: float | None = None) -> Any:
        if key not in self.data:
            if required:
                raise self.fail(key, kind, present=False)
            return default
        v = self.data[key]
        if not _type_ok(v, kind):
            raise self.fail(key, kind, v)
        if kind == _INT and maximum is None:
            maximum = _INT32_MAX  # TurboMind reads these into C++ ints
        if minimum is not None and v < minimum:
            raise self.fail(key, f"{kind} >= {minimum}", v)
        if maximum is not None and v > maximum:
            raise self.fail(key, f"{kind} <= {maximum}", v)
        return v


_ATTN_INTS = ("rotary_embedding", "max_position_embeddings", "original_max_position_embeddings",
              "cache_block_seq_len")
_ATTN_FLAGS = ("use_dynamic_ntk", "use_logn_attn")
_ATTN_NUMS = ("rope_theta", "softmax_scale", "rope_scaling_factor", "low_freq_factor", "high_freq_factor",
              "beta_fast", "beta_slow")


def _parse_config(cfg_path: Path, tp_files: set[int] | None = None) -> tuple[dict, ModelShape, dict, LoraSettings]:
    try:
        text = cfg_path.read_text(encoding="utf-8")
    except OSError as e:
        raise ParityInputError(f"Cannot read {cfg_path}: {e}.") from None
    except UnicodeDecodeError as e:
        raise ParityInputError(f"{cfg_path} is not UTF-8 text ({e.reason} at byte {e.start}); expected the YAML "
                               "config lmdeploy's converter writes.") from None
    try:
        cfg = yaml.safe_load(text)
    except yaml.YAMLError as e:
        msg = " ".join(str(e).split())
        raise ParityInputError(f"{cfg_path} is not valid YAML ({msg}); expected the config lmdeploy's converter writes.") from None
    except RecursionError:  # PyYAML composes nested collections recursively
        raise ParityInputError(f"{cfg_path} nests collections too deeply to be a TurboMind config; expected the "
                               "flat model_config/attention_config/lora_config sections lmdeploy writes.") from None
    if not isinstance(cfg, dict):
        raise ParityInputError(
            f"{cfg_path} must be a YAML mapping with sections model_config, attention_config and lora_config; "
            f"got {type(cfg).__name__}."
        )
    if "model_config" not in cfg:
        raise ParityInputError(
            f"{cfg_path} has no 'model_config' section; expected model_config, attention_config and lora_config "
            "as written by lmdeploy's converter (0.6 or later)."
        )
    mc = _Section(cfg_path, "model_config", cfg["model_config"])
    head_num = mc.get("head_num", _INT, minimum=1)
    kv_head_num = mc.get("kv_head_num", _INT, minimum=1)
    size_per_head = mc.get("size_per_head", _INT, minimum=2)
    hidden_units = mc.get("hidden_units", _INT, minimum=1)
    num_layer = mc.get("num_layer", _INT, minimum=1, maximum=MAX_LAYERS)
    if "inter_size" not in mc.data:
        raise mc.fail("inter_size", "a list of integers, one per layer", present=False)
    inter = mc.data["inter_size"]
    if _type_ok(inter, _INT):
        inter = [inter] * num_layer
    if not isinstance(inter, list) or not all(_type_ok(v, _INT) and 0 <= v <= _INT32_MAX for v in inter):
        raise mc.fail("inter_size", "a list of non-negative integers, one per layer", inter)
    if len(inter) != num_layer:
        raise mc.fail("inter_size", f"a list of {num_layer} integers (model_config.num_layer)", inter)
    norm_eps = mc.get("norm_eps", _NUM)
    if norm_eps <= 0:
        raise mc.fail("norm_eps", "a positive number", norm_eps)
    vocab_size = mc.get("vocab_size", _INT, minimum=1)
    weight_type = mc.get("weight_type", _STR)
    if weight_type not in layout.WEIGHT_TYPE_DTYPES:
        raise mc.fail("weight_type", f"one of {', '.join(layout.WEIGHT_TYPE_DTYPES)}", weight_type)
    tp = mc.get("tp", _INT, minimum=1)
    if "attn_bias" not in mc.data:
        raise mc.fail("attn_bias", "0 or 1", present=False)
    attn_bias = mc.data["attn_bias"]
    if not (isinstance(attn_bias, (int, bool)) and int(attn_bias) in (0, 1)):
        raise mc.fail("attn_bias", "0 or 1", attn_bias)
    model_arch = mc.get("model_arch", _STR)
    embedding_size = mc.get("embedding_size", _INT, required=False, default=0, minimum=0)
    group_size = mc.get("group_size", _INT, required=False, default=0)
    if weight_type in layout.QUANT_WEIGHT_TYPES and group_size < 1:
        raise mc.fail("group_size", "a positive integer (the quantization group size of an int4 workspace)", group_size)

    def bad(msg: str) -> ParityInputError:
        return ParityInputError(f"{cfg_path}: {msg}")

    if head_num % kv_head_num:
        raise bad(f"model_config.head_num={head_num} is not a multiple of kv_head_num={kv_head_num}; "
                  "grouped-query attention needs head_num % kv_head_num == 0.")
    if size_per_head % 2:
        raise bad(f"model_config.size_per_head={size_per_head} is odd; rotary embedding needs an even head size.")
    if head_num % tp or kv_head_num % tp:
        raise bad(f"model_config.tp={tp} does not divide head_num={head_num} and kv_head_num={kv_head_num}; "
                  "the converter splits heads evenly across tensor-parallel ranks.")
    if hidden_units % tp:
        raise bad(f"model_config.tp={tp} does not divide hidden_units={hidden_units} (tok_embeddings are split "
                  "on the hidden dim).")
    for i, v in enumerate(inter):
        if v % tp:
            raise bad(f"model_config.inter_size[{i}]={v} is not a multiple of tp={tp}; the converter pads "
                      "inter_size to a multiple of tp, so this config was not written by it.")
    if embedding_size and embedding_size < vocab_size:
        raise bad(f"model_config.embedding_size={embedding_size} is smaller than vocab_size={vocab_size}.")
    if tp_files:
        ranks = sorted(tp_files)
        if ranks[-1] + 1 != tp or len(ranks) != tp:
            raise bad(
                f"model_config.tp={tp} but the weight files carry tensor-parallel ranks {ranks} "
                f"(expected ranks 0..{tp - 1}); config.yaml and the weight files come from different conversions."
            )

    shape = ModelShape(head_num=head_num, kv_head_num=kv_head_num, size_per_head=size_per_head,
                       hidden_units=hidden_units, num_layer=num_layer, inter_size=list(inter),
                       norm_eps=float(norm_eps), vocab_size=vocab_size, weight_type=weight_type, tp=tp,
                       attn_bias=int(attn_bias), model_arch=model_arch, embedding_size=embedding_size,
                       group_size=group_size)

    if "attention_config" not in cfg:
        raise ParityInputError(f"{cfg_path} has no 'attention_config' section; expected the rotary settings "
                               "(rope_theta, rotary_embedding, ...) lmdeploy's converter writes.")
    ac = _Section(cfg_path, "attention_config", cfg["attention_config"])
    ac.get("rope_theta", _NUM)
    rot = ac.get("rotary_embedding", _INT, minimum=0)
    if rot % 2 or rot > size_per_head:
        raise ac.fail("rotary_embedding", f"an even integer <= model_config.size_per_head={size_per_head} (rotary "
                                          "embedding turns pairs of channels inside each head)", rot)
    for k in _ATTN_INTS:
        ac.get(k, _INT, required=False)
    for k in _ATTN_FLAGS:
        if k in ac.data and not (isinstance(ac.data[k], (int, bool)) and int(ac.data[k]) in (0, 1)):
            raise ac.fail(k, "0 or 1", ac.data[k])
    for k in _ATTN_NUMS:
        ac.get(k, _NUM, required=False)
    if "attention_factor" in ac.data and ac.data["attention_factor"] is not None:
        ac.get("attention_factor", _NUM)
    if "rope_scaling_type" in ac.data:
        ac.get("rope_scaling_type", _STR)
    attention = dict(ac.data)

    lora = LoraSettings()
    if "lora_config" in cfg and cfg["lora_config"] is not None:
        lc = _Section(cfg_path, "lora_config", cfg["lora_config"])
        lora = LoraSettings(
            lora_policy=lc.get("lora_policy", _STR),
            lora_r=lc.get("lora_r", _INT, minimum=0),
            lora_scale=float(lc.get("lora_scale", _NUM)),
            lora_max_wo_r=lc.get("lora_max_wo_r", _INT, minimum=0),
            lora_rank_pattern=lc.get("lora_rank_pattern", _STR),
            lora_scale_pattern=lc.get("lora_scale_pattern", _STR),
        )
        if lora.lora_policy not in ("", "plora"):
            raise lc.fail("lora_policy", "'' or 'plora'", lora.lora_policy)
        # Pattern syntax errors name the key (ParityInputError from parse_pattern).
        ranks = parse_pattern(lora.lora_rank_pattern, "int", "lora_rank_pattern")
        parse_pattern(lora.lora_scale_pattern, "float", "lora_scale_pattern")
        if any(not 0 <= r <= _INT32_MAX for _, r in ranks):
            raise lc.fail("lora_rank_pattern", "'regex:rank' items with ranks >= 0", lora.lora_rank_pattern)
    return cfg, shape, attention, lora


# ------------------------------------------------------------------------------------------ workspace


def _weight_type(cfg_path: Path) -> Any:
    """model_config.weight_type of a config.yaml, or None when it cannot be read (the full parse says why)."""
    try:
        cfg = yaml.safe_load(cfg_path.read_text(encoding="utf-8"))
        return cfg["model_config"]["weight_type"]
    except Exception:  # noqa: BLE001 - _parse_config reports every problem with its own message
        return None


def _dtype_bits(dtype: torch.dtype) -> torch.dtype:
    size = torch.empty((), dtype=dtype).element_size()
    return {2: torch.int16, 4: torch.int32, 8: torch.int64}[size]


@dataclass
class Workspace:
    root: Path
    weights_dir: Path
    config: dict
    model: ModelShape
    attention: dict
    lora: LoraSettings
    dtype: torch.dtype
    _files: dict[str, dict[int | None, str]] = field(default_factory=dict, repr=False)
    _record: list = field(default_factory=list, repr=False, compare=False)  # [the record] once read

    # -------------------------------------------------------------- opening

    @classmethod
    def open(cls, path: str | Path) -> "Workspace":
        """Open a workspace given its root (`ROOT/triton_models/weights` inside) or its weights folder."""
        p = Path(path)
        if not p.exists():
            raise ParityInputError(f"Workspace path {p} does not exist; expected a folder written by "
                                   "`lmdeploy convert` (or `parity convert`).")
        if not p.is_dir():
            raise ParityInputError(f"Workspace path {p} is a file; expected the workspace folder (with "
                                   "triton_models/weights/config.yaml inside) or its weights folder.")
        if (p / "triton_models" / "weights").is_dir():
            root, weights = p, p / "triton_models" / "weights"
        elif (p / CONFIG_NAME).is_file() or p.name == "weights":
            weights = p
            root = p.parent.parent if p.parent.name == "triton_models" else p
        else:
            raise ParityInputError(
                f"{p} is not a TurboMind workspace: it has neither triton_models/weights/ nor a {CONFIG_NAME}. "
                "Pass the folder `lmdeploy convert --dst-path` wrote, or its triton_models/weights folder."
            )
        cfg_path = weights / CONFIG_NAME
        if not cfg_path.is_file():
            if (weights / "config.ini").is_file():
                raise ParityInputError(
                    f"{weights} holds config.ini, the workspace format of lmdeploy < 0.6; this harness reads "
                    f"{CONFIG_NAME} workspaces (lmdeploy 0.6 – 0.9.x). Re-convert with lmdeploy 0.7.1."
                )
            raise ParityInputError(
                f"{cfg_path} is missing; a TurboMind workspace's weights folder must contain the {CONFIG_NAME} "
                "the converter writes (model_config, attention_config, lora_config)."
            )
        if cls is Workspace and _weight_type(cfg_path) in layout.QUANT_WEIGHT_TYPES:
            from ..quant.workspace import QuantizedWorkspace  # int4 (AWQ) workspaces: packed weights

            return QuantizedWorkspace.open(path)
        files: dict[str, dict[int | None, str]] = {}
        ranks: set[int] = set()
        for entry in weights.iterdir():
            if not entry.is_file() or entry.name == CONFIG_NAME:
                continue
            base, rank = cls._file_entry(entry.name)
            try:
                parse_tm_name(base)
            except ParityInputError:
                continue  # not a tensor this harness knows (quantized parts, stray files)
            if rank is not None:
                ranks.add(rank)
            files.setdefault(base, {})[rank] = entry.name
        cfg, shape, attention, lora = _parse_config(cfg_path, ranks or None)
        ws = cls(root=root, weights_dir=weights, config=cfg, model=shape, attention=attention, lora=lora,
                 dtype=layout.tm_dtype(shape.weight_type), _files=files)
        extra = sorted({n for n in files if (parse_tm_name(n)[0] or 0) >= shape.num_layer})
        if extra:
            raise ParityInputError(
                f"{weights} holds tensors of layers beyond model_config.num_layer={shape.num_layer} "
                f"(e.g. {extra[0]}); config.yaml and the weight files do not belong together."
            )
        return ws

    @classmethod
    def _file_entry(cls, file_name: str) -> tuple[str, int | None]:
        """(merged name, rank) a weight file contributes to."""
        return layout.merged_name_of_file(file_name)

    # -------------------------------------------------------------- names

    @staticmethod
    def _order(name: str) -> tuple:
        layer, linear, kind = parse_tm_name(name)
        if layer is None:
            g = list(TM_GLOBALS).index(kind)  # tok_embeddings first, the layers, then norm and output
            return (g + (g > 0), 0, 0, "")
        return (1, layer, TM_LAYER_ORDER.index(linear), kind)

    def names(self) -> list[str]:
        """Merged names of the tensors present (at least one rank file exists)."""
        return sorted(self._files, key=self._order)

    def lora_rank(self, layer: int, tm_linear: str) -> tuple[int, float]:
        """(rank, scale) TurboMind resolves for this linear from config.yaml (rank 0 without lora_policy)."""
        if self.lora.lora_policy != "plora":
            return 0, 0.0
        return resolve(self.lora, layer, tm_linear)

    def expected_names(self) -> list[str]:
        """Names config.yaml implies: LoRA tensors only with lora_policy 'plora' and a resolved rank > 0,
        biases only with attn_bias."""
        first, *last = TM_GLOBALS
        out = [first]
        for i in range(self.model.num_layer):
            p = f"layers.{i}."
            out.append(p + "attention_norm.weight")
            for lin in TM_LINEARS_IN_ORDER:
                if lin.startswith("feed_forward") and not self.model.inter_size[i]:
                    continue
                out.append(p + f"{lin}.weight")
                if self.model.attn_bias and lin.startswith("attention"):
                    out.append(p + f"{lin}.bias")
                r, _ = self.lora_rank(i, lin)
                if r > 0:
                    out += [p + f"{lin}.{kind}" for kind in TM_LORA_KINDS]
                if lin == "attention.wo":
                    out.append(p + "ffn_norm.weight")
        out += last
        return sorted(out, key=self._order)

    def has(self, name: str) -> bool:
        return name in self._files

    # -------------------------------------------------------------- tensors

    def spec(self, name: str, rank: int | None = None) -> layout.TensorSpec:
        """Shapes of `name` as config.yaml implies them (LoRA rank: resolved, unless `rank` is given)."""
        layer, linear, kind = parse_tm_name(name)
        if layer is not None and layer >= self.model.num_layer:
            raise ParityInputError(f"{name}: layer {layer} is beyond model_config.num_layer={self.model.num_layer} "
                                   f"in {self.weights_dir / CONFIG_NAME}.")
        r = 0
        if kind in TM_LORA_KINDS:
            r = resolve(self.lora, layer, linear)[0] if rank is None else int(rank)  # type: ignore[arg-type]
        return layout.tensor_spec(name, self.model, r)

    def file_path(self, name: str, rank: int = 0) -> Path:
        spec = self.spec(name)
        return self.weights_dir / (name if spec.rule == layout.RULE_NONE else layout.rank_file_name(name, rank))

    def _elem(self) -> int:
        return torch.empty((), dtype=self.dtype).element_size()

    def lora_rank_on_disk(self, layer: int, tm_linear: str) -> int | None:
        """LoRA rank the lora_a file of this linear holds (from its size), or None when it is absent."""
        name = f"layers.{layer}.{tm_linear}.lora_a.weight"
        if not self.has(name):
            return None
        spec = self.spec(name, rank=1)
        path = self.file_path(name, 0)
        per_rank = spec.numel() * self._elem()  # bytes for rank 1
        size = path.stat().st_size if path.is_file() else 0
        return size // per_rank if per_rank and size % per_rank == 0 else None

    def _check_file(self, name: str, spec: layout.TensorSpec, path: Path) -> None:
        expected = spec.numel() * self._elem()
        dtype_name = str(self.dtype).replace("torch.", "")
        if not path.is_file():
            raise ParityInputError(
                f"Weight file {path} is missing: config.yaml implies tensor {name} with per-file shape "
                f"{list(spec.shard_shape)} of {dtype_name} ({expected} bytes). The conversion did not finish "
                "or the folder was altered; re-convert."
            )
        actual = path.stat().st_size
        if actual != expected:
            what = "short" if actual < expected else "long"
            hint = ""
            _, linear, kind = parse_tm_name(name)
            if kind in TM_LORA_KINDS:
                one = layout.tensor_spec(name, self.model, 1).numel() * self._elem()
                if one and actual % one == 0:
                    hint = (f" The file holds a LoRA of rank {actual // one}, while config.yaml's lora_config "
                            f"resolves rank {expected // one if one else 0} for this linear (lora_r / "
                            "lora_rank_pattern mismatch).")
            raise ParityInputError(
                f"Weight file {path} is {what}: it holds {actual} bytes but config.yaml implies tensor {name} "
                f"with per-file shape {list(spec.shard_shape)} of {dtype_name} = {expected} bytes "
                f"({abs(actual - expected)} bytes {'missing' if what == 'short' else 'too many'}).{hint}"
            )

    def _read(self, spec: layout.TensorSpec, path: Path) -> torch.Tensor:
        n = spec.numel()
        if n == 0:
            return torch.empty(spec.shard_shape, dtype=self.dtype)
        # Memory-mapped, copy-on-write (a private mapping): pages are read when used and shared with the page
        # cache; a caller that writes to the tensor changes its own copy, never the file. No file descriptor
        # stays open per tensor (np.memmap would keep one). The file's size was checked.
        return torch.from_file(str(path), shared=False, size=n, dtype=self.dtype).reshape(spec.shard_shape)

    def shards(self, name: str, rank: int | None = None) -> list[torch.Tensor]:
        """The per-rank files of `name`, each in its config.yaml shape."""
        spec = self.spec(name, rank)
        paths = [self.file_path(name, i) for i in range(spec.n_files)]
        for p in paths:
            self._check_file(name, spec, p)
        return [self._read(spec, p) for p in paths]

    def tensor(self, name: str, rank: int | None = None) -> torch.Tensor:
        """`name` merged over tp ranks (exactly what a tp=1 conversion writes), in the workspace dtype.

        `rank` overrides the LoRA rank config.yaml resolves (to read a lora_a/lora_b whose rank differs).
        """
        spec = self.spec(name, rank)
        return layout.merge_shards(spec, self.shards(name, rank))

    def conversion_record(self) -> ConversionRecord | None:
        """The parity-conversion.json `parity.deploy.convert` left in the workspace root, if any (read once: the
        image path, the source check, the judge and the report all ask for it)."""
        if not self._record:
            self._record.append(load_record(self.root / RECORD_NAME))
        return self._record[0]

    def lora_dict(self) -> dict[str, Any]:
        return self.lora.to_dict()


LORA_FIELDS = LORA_KEYS


# ------------------------------------------------------------------------------------------ conversion record

# field -> (accepted types, what to say); `warnings` and `source` may be absent (older records)
_RECORD_TYPES: dict[str, tuple[tuple[type, ...], str]] = {
    "model": ((str,), "a string"), "workspace": ((str,), "a string"), "lmdeploy_version": ((str,), "a string"),
    "sub_type": ((str,), "a string"), "lora_config": ((dict,), "a mapping"), "tp": ((int,), "an integer >= 1"),
    "warnings": ((list,), "a list of strings"), "source": ((dict,), "a mapping"),
}


def load_record(path: str | Path) -> ConversionRecord | None:
    """Read a parity-conversion.json (None when absent). Anything unreadable, malformed or mistyped is a
    ParityInputError naming the file and the field, so a damaged record never surfaces as a crash later."""
    path = Path(path)
    if not path.is_file():
        return None

    def bad(what: str) -> ParityInputError:
        return ParityInputError(f"{path} is not a valid conversion record ({what}); expected the JSON object "
                                "`parity convert` writes. Delete the file or re-convert.")

    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise bad(f"cannot read it: {e}") from None
    except UnicodeDecodeError as e:
        raise bad(f"not UTF-8 text: {e.reason} at byte {e.start}") from None
    except ValueError as e:
        raise bad(f"not JSON: {e}") from None
    except RecursionError:
        raise bad("JSON nested too deeply") from None
    if not isinstance(data, dict):
        raise bad(f"a JSON {type(data).__name__}, not an object")
    values = {}
    for f in fields(ConversionRecord):
        if f.name not in data:
            if f.name in ("warnings", "source"):
                continue
            raise bad(f"field '{f.name}' is missing")
        v = data[f.name]
        types, expected = _RECORD_TYPES[f.name]
        ok = isinstance(v, types) and not isinstance(v, bool)
        if ok and f.name == "tp":
            ok = v >= 1
        if ok and f.name == "warnings":
            ok = all(isinstance(w, str) for w in v)
        if not ok:
            raise bad(f"field '{f.name}' is {v!r}, expected {expected}")
        values[f.name] = v
    return ConversionRecord(**values)


# ------------------------------------------------------------------------------------------ writing


def config_dict(shape: ModelShape, attention: dict | None = None, lora: LoraSettings | None = None) -> dict:
    """A config.yaml mapping (the keys this reader needs, as lmdeploy 0.7.1 names them)."""
    mc = {
        "head_num": shape.head_num, "kv_head_num": shape.kv_head_num, "size_per_head": shape.size_per_head,
        "hidden_units": shape.hidden_units, "num_layer": shape.num_layer, "inter_size": list(shape.inter_size),
        "norm_eps": float(shape.norm_eps), "vocab_size": shape.vocab_size, "weight_type": shape.weight_type,
        "tp": shape.tp, "attn_bias": int(shape.attn_bias), "model_arch": shape.model_arch,
        "embedding_size": shape.embedding_size or shape.vocab_size, "group_size": shape.group_size,
        "model_format": "awq" if shape.weight_type in layout.QUANT_WEIGHT_TYPES else "hf",
    }
    att = {"rotary_embedding": shape.size_per_head, "rope_theta": 10000.0, "max_position_embeddings": 4096,
           "rope_scaling_type": "", "rope_scaling_factor": 0.0, "use_dynamic_ntk": 0}
    att.update(attention or {})
    return {"model_config": mc, "attention_config": att, "lora_config": (lora or LoraSettings()).to_dict()}


def write_workspace(root: str | Path, config: dict, files: dict[str, torch.Tensor]) -> Path:
    """Write a workspace folder: ROOT/triton_models/weights/{config.yaml, raw tensor files}.

    `files` maps file names (with rank, e.g. from `layout.hf_to_tm_files`) to tensors; they are dumped raw,
    little-endian, no header (bf16 as its 16 bits), like lmdeploy's exporter.
    """
    weights = Path(root) / "triton_models" / "weights"
    weights.mkdir(parents=True, exist_ok=True)
    (weights / CONFIG_NAME).write_text(yaml.safe_dump(config))
    for name, t in files.items():
        t = t.detach().contiguous().cpu()
        if torch.is_floating_point(t):
            t = t.view(_dtype_bits(t.dtype))
        t.numpy().astype(t.numpy().dtype.newbyteorder("<"), copy=False).tofile(weights / name)
    return Path(root)
