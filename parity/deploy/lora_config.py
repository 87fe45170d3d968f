"""TurboMind's per-linear LoRA rank/scale resolution, and its inverse.

TurboMind (0.4 – 0.7.1, C++ `getLoraPattern` and its users) resolves, for every decoder layer `i` and every
linear with PLoRA, a rank and a scale:

* `lora_rank_pattern` / `lora_scale_pattern` are comma-separated lists of `regex:value` items
  (split on ',' as `std::getline` does -- a trailing ',' adds nothing; the value is what follows the last
  ':'). Items are stored in a `std::map<std::string, ...>` keyed by the regex text, so they are tried in
  sorted (byte-wise) key order, not in the order written; a repeated key keeps its first value
  (`emplace`).
* the name matched is `"layers.{i}." + tm_linear`, with `tm_linear` one of `attention.w_qkv`,
  `attention.wo`, `feed_forward.w1`, `feed_forward.w2`, `feed_forward.w3`;
* the first item whose regex `std::regex_search`-matches (a substring match, ECMAScript grammar) gives the
  value; otherwise the global `lora_r` / `lora_scale` applies. Values are parsed with `std::stoi` /
  `std::stof` (a numeric prefix is enough; scales are single-precision floats).
* rank 0 means: this linear has no LoRA.

Python's `re` is used for the regexes; for the simple patterns lmdeploy and this project write
(literal names, `.`, `\\.`, `^`, `$`, `|`, character classes, `\\d`) the two grammars agree.
"""

from __future__ import annotations

import re
import struct
from collections import Counter
from functools import lru_cache
from typing import TYPE_CHECKING, Any, Iterable, Mapping

from ..errors import ParityInputError
from ..names import TM_LINEARS

if TYPE_CHECKING:
    from .shapes import LoraSettings


LORA_KEYS: tuple[str, ...] = (
    "lora_policy", "lora_r", "lora_scale", "lora_max_wo_r", "lora_rank_pattern", "lora_scale_pattern",
)
_LORA_TYPES = {"lora_policy": str, "lora_r": int, "lora_scale": (int, float), "lora_max_wo_r": int,
               "lora_rank_pattern": str, "lora_scale_pattern": str}


def check_lora_override(lora_config: dict | None) -> dict | None:
    """A lora_config given to override the converter's (`parity convert --lora-config`, a disguise's
    parity_lora_config.json): known keys, their types, and patterns that parse as TurboMind parses them."""
    if lora_config is None:
        return None
    if not isinstance(lora_config, dict):
        raise ParityInputError(f"lora_config override must be a mapping of {', '.join(LORA_KEYS)}; got {type(lora_config).__name__}.")
    out = {}
    for k, v in lora_config.items():
        if k not in _LORA_TYPES:
            raise ParityInputError(f"lora_config override has unknown key {k!r}; expected only {', '.join(LORA_KEYS)}.")
        if not isinstance(v, _LORA_TYPES[k]) or isinstance(v, bool):
            raise ParityInputError(f"lora_config override key {k!r} is {v!r}; expected {_LORA_TYPES[k]}.")
        out[k] = float(v) if k == "lora_scale" else v
    parse_pattern(out.get("lora_rank_pattern", ""), "int", "lora_rank_pattern")
    parse_pattern(out.get("lora_scale_pattern", ""), "float", "lora_scale_pattern")
    return out


def f32(x: float) -> float:
    """Round a Python float to IEEE single precision (what TurboMind stores scales as)."""
    return struct.unpack("<f", struct.pack("<f", float(x)))[0]


_INT_PREFIX = re.compile(r"\s*([+-]?\d+)")
_FLOAT_PREFIX = re.compile(
    r"\s*([+-]?(?:(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?|inf(?:inity)?|nan))", re.IGNORECASE
)


def _stoi(text: str, *, field: str, item: str) -> int:
    return int(_number_prefix(text, field, item, integer=True))


def _stof(text: str, *, field: str, item: str) -> float:
    return f32(float(_number_prefix(text, field, item, integer=False)))


def _number_prefix(text: str, field: str, item: str, integer: bool) -> str:
    """The number TurboMind's std::stoi / std::stof reads at the start of `text` (they ignore what follows)."""
    pattern, kind, parser, value, example = (
        (_INT_PREFIX, "integer", "stoi", "RANK", "'attention.w_qkv:8,attention.wo:256'") if integer else
        (_FLOAT_PREFIX, "number", "stof", "SCALE", "'attention.w_qkv:2.0,attention.wo:1.0'"))
    m = pattern.match(text)
    if not m:
        raise ParityInputError(
            f"lora_config.{field} item {item!r} has no {kind} after its last ':' ({text!r}); TurboMind's "
            f"std::{parser} would throw. Expected 'regex:{value}' items separated by commas, e.g. {example}."
        )
    return m.group(1)


@lru_cache(maxsize=256)
def _parse(pattern: str, field: str, kind: str) -> tuple[tuple[str, "re.Pattern[str]", float], ...]:
    if not isinstance(pattern, str):
        raise ParityInputError(f"lora_config.{field} must be a string, got {type(pattern).__name__}.")
    items: dict[str, tuple[re.Pattern[str], float]] = {}
    if pattern:
        parts = pattern.split(",")
        if parts and parts[-1] == "":  # std::getline yields no final empty token
            parts = parts[:-1]
        for item in parts:
            pos = item.rfind(":")
            key = item[:pos] if pos >= 0 else item
            raw = item[pos + 1:] if pos >= 0 else item
            value = _stoi(raw, field=field, item=item) if kind == "int" else _stof(raw, field=field, item=item)
            if key in items:  # std::map::emplace keeps the first
                continue
            try:
                rx = re.compile(key)
            except re.error as e:
                raise ParityInputError(
                    f"lora_config.{field} item {item!r}: {key!r} is not a valid regular expression ({e}); "
                    "TurboMind's std::regex would throw."
                ) from None
            items[key] = (rx, value)
    ordered = sorted(items.items(), key=lambda kv: kv[0].encode("utf-8"))
    return tuple((k, rx, v) for k, (rx, v) in ordered)


def parse_pattern(pattern: str, kind: str = "int", field: str = "lora_rank_pattern") -> list[tuple[str, Any]]:
    """(regex, value) items in the order TurboMind tries them."""
    return [(k, int(v) if kind == "int" else v) for k, _, v in _parse(pattern, field, kind)]


def tm_name(layer: int, tm_linear: str) -> str:
    return f"layers.{layer}.{tm_linear}"


def resolve(lora: "LoraSettings", layer: int, tm_linear: str) -> tuple[int, float]:
    """(rank, scale) TurboMind uses for `tm_linear` in `layer` (rank 0: no LoRA on that linear).

    Does not look at `lora_policy`: with a policy other than 'plora' TurboMind applies no LoRA at all
    (see `effective`).
    """
    name = tm_name(layer, tm_linear)
    rank = _first_match(lora.lora_rank_pattern, "lora_rank_pattern", "int", name, lora.lora_r)
    scale = _first_match(lora.lora_scale_pattern, "lora_scale_pattern", "float", name, f32(lora.lora_scale))
    return int(rank), float(scale)


def _first_match(pattern: str, field: str, kind: str, name: str, default: float) -> float:
    """The value of the first `pattern` item whose regex matches `name` (TurboMind's getLoraPattern), else
    `default`."""
    return next((v for _, rx, v in _parse(pattern or "", field, kind) if rx.search(name)), default)


def effective(lora: "LoraSettings", layer: int, tm_linear: str) -> tuple[int, float]:
    """Like `resolve`, but rank 0 unless `lora_policy == 'plora'` (what the runtime actually applies)."""
    if lora.lora_policy != "plora":
        return 0, 0.0
    r, s = resolve(lora, layer, tm_linear)
    return (r, s) if r > 0 else (0, s)


def _regex_literal(text: str) -> str:
    return text.replace(".", r"\.")


def _most_common(values: Iterable[Any]) -> Any:
    counts = Counter(values)
    best = max(counts.values())
    # deterministic tie-break: the largest value among the most common
    return max(v for v, c in counts.items() if c == best)


def _fmt_scale(v: float) -> str:
    return repr(float(v))


def lora_config_for(ranks_scales: Mapping[tuple[int, str], tuple[int, float]]) -> dict[str, Any]:
    """The smallest lora_config (all six TurboMind keys) under which `resolve` reproduces `ranks_scales`.

    `ranks_scales` maps (layer, tm_linear) -> (rank, scale). Scales are rounded to float32 (TurboMind's
    precision). Construction: the most common rank/scale become `lora_r`/`lora_scale`; a linear whose most
    common value differs gets an unanchored pattern (`attention.w_qkv:8`); a layer that differs from its
    linear gets an anchored one (`^layers\\.3\\.attention\\.w_qkv:4`). `^` sorts before every letter, so
    per-layer items are tried before per-linear items (std::map order), and items of one kind never match
    the same name. Only the given (layer, linear) pairs are guaranteed; others resolve to the defaults or
    their linear's value. `lora_policy` is 'plora' when any rank is > 0, `lora_max_wo_r` the largest
    `attention.wo` rank (or `lora_r` when no wo is given).
    """
    if not ranks_scales:
        return dict(lora_policy="", lora_r=0, lora_scale=0.0, lora_max_wo_r=0,
                    lora_rank_pattern="", lora_scale_pattern="")
    for (layer, linear), (r, s) in ranks_scales.items():
        if linear not in TM_LINEARS:
            raise ParityInputError(f"Unknown TurboMind linear {linear!r}; expected one of {', '.join(TM_LINEARS)}.")
        if not isinstance(layer, int) or layer < 0:
            raise ParityInputError(f"Layer index {layer!r} for {linear} must be a non-negative integer.")
        if int(r) < 0:
            raise ParityInputError(f"LoRA rank {r!r} for layers.{layer}.{linear} must be >= 0.")
    ranks = {k: int(v[0]) for k, v in ranks_scales.items()}
    scales = {k: f32(v[1]) for k, v in ranks_scales.items()}

    def patterns(values: dict[tuple[int, str], Any], default: Any, fmt) -> str:
        items: list[str] = []
        for linear in TM_LINEARS:
            per_layer = {layer: v for (layer, lin), v in values.items() if lin == linear}
            if not per_layer:
                continue
            lin_value = _most_common(per_layer.values())
            # Only worth a per-linear item if it saves items; otherwise leave the default in charge.
            base = default
            if lin_value != default:
                n_with = 1 + sum(1 for v in per_layer.values() if v != lin_value)
                n_without = sum(1 for v in per_layer.values() if v != default)
                if n_with < n_without:
                    items.append(f"{_regex_literal(linear)}:{fmt(lin_value)}")
                    base = lin_value
            for layer in sorted(per_layer):
                if per_layer[layer] != base:
                    items.append(f"^layers\\.{layer}\\.{_regex_literal(linear)}:{fmt(per_layer[layer])}")
        return ",".join(items)

    lora_r = int(_most_common(ranks.values()))
    lora_scale = float(_most_common(scales.values()))
    rank_pattern = patterns(ranks, lora_r, lambda v: str(int(v)))
    scale_pattern = patterns(scales, lora_scale, _fmt_scale)
    wo = [r for (_, lin), r in ranks.items() if lin == "attention.wo"]
    return dict(
        lora_policy="plora" if any(r > 0 for r in ranks.values()) else "",
        lora_r=lora_r,
        lora_scale=lora_scale,
        lora_max_wo_r=max(wo) if wo else lora_r,
        lora_rank_pattern=rank_pattern,
        lora_scale_pattern=scale_pattern,
    )


def resolve_all(lora: "LoraSettings", num_layer: int) -> dict[tuple[int, str], tuple[int, float]]:
    """`resolve` for every layer and linear."""
    return {(i, lin): resolve(lora, i, lin) for i in range(num_layer) for lin in TM_LINEARS}
