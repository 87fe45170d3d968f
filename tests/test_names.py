"""The one name table (parity/names.py): its parser inverts its names, and no other module writes the table again."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
from hypothesis import given, strategies as st

from parity.errors import ParityInputError
from parity.names import (CANONICAL_OF_TM, LINEAR_ALIASES, NORMS, QWEN2_LINEAR_OF, TM_GLOBALS, TM_KIND_OF_HF,
                          TM_LAYER_ORDER, TM_LINEAR_OF, TM_LINEARS, parse_tm_name, tm_linear_prefix,
                          tm_name_location)
from parity.points import LAYER_POINTS, PLORA_LINEARS

PACKAGE = Path(__file__).resolve().parents[1] / "parity"
SKIP = ("fixtures/remote_code", "fixtures/qwen2_remote_code", "names.py")


@given(st.integers(0, 200), st.sampled_from(PLORA_LINEARS), st.sampled_from(list(TM_KIND_OF_HF.values())))
def test_parser_inverts_linear_names(layer, linear, kind):
    name = f"{tm_linear_prefix(layer, linear)}.{kind}"
    assert parse_tm_name(name) == (layer, TM_LINEAR_OF[linear], kind)
    assert tm_name_location(name) == (layer, linear)


@given(st.integers(0, 200), st.sampled_from(NORMS))
def test_parser_reads_norms(layer, norm):
    assert parse_tm_name(f"layers.{layer}.{norm}.weight") == (layer, norm, "weight")
    assert tm_name_location(f"layers.{layer}.{norm}.weight") == (layer, norm)


def test_globals_and_unknown_names():
    for tm, (_, point) in TM_GLOBALS.items():
        assert parse_tm_name(tm) == (None, None, tm)
        assert tm_name_location(tm) == (None, point)
    for bad in ("layers.0.attention.wq.weight", "layers.0.attention.w_qkv.lora_c.weight", "layers.x.ffn_norm.weight"):
        with pytest.raises(ParityInputError, match="not a TurboMind tensor name"):
            parse_tm_name(bad)


def test_table_is_consistent_with_the_canonical_points():
    assert set(TM_LINEAR_OF) == set(PLORA_LINEARS) and set(CANONICAL_OF_TM) == set(TM_LINEARS)
    assert [CANONICAL_OF_TM.get(p, p) for p in TM_LAYER_ORDER] == [p for p in LAYER_POINTS if p in
                                                                   set(PLORA_LINEARS) | set(NORMS)]
    assert set(QWEN2_LINEAR_OF.values()) <= set(PLORA_LINEARS) and set(LINEAR_ALIASES.values()) == set(PLORA_LINEARS)


def _table_pairs() -> set[tuple[str, str]]:
    """(key, value) pairs of the name table's mappings that another module must not write again."""
    return {(k, v) for k, v in {**TM_LINEAR_OF, **QWEN2_LINEAR_OF}.items() if k != v} | {
        (k, v) for k, v in TM_KIND_OF_HF.items() if k != v}


def _dict_literal_pairs(tree: ast.AST) -> set[tuple[str, str]]:
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Dict):
            for k, v in zip(node.keys, node.values):
                if isinstance(k, ast.Constant) and isinstance(v, ast.Constant):
                    out.add((k.value, v.value))
    return out


@pytest.mark.parametrize("path", sorted(p for p in PACKAGE.rglob("*.py") if not any(s in str(p) for s in SKIP)),
                         ids=lambda p: str(p.relative_to(PACKAGE)))
def test_no_module_writes_the_name_table_again(path):
    again = _dict_literal_pairs(ast.parse(path.read_text())) & _table_pairs()
    assert not again, f"{path} maps {sorted(again)} itself: import the table from parity.names"


# ------------------------------------------------------------------------------ the HF config's attention shape

HEAD_RULE_FILES = ("pipeline.py", "resources.py", "checks/config.py", "checks/plora.py", "reference/qwen2.py",
                   "reference/anatomy.py", "disguise/writer.py", "disguise/audit.py", "deploy/convert.py")


@given(st.integers(1, 16), st.integers(1, 4), st.sampled_from([8, 16, 64, 128]), st.booleans(), st.booleans())
def test_head_dim_rule(kv, gs, head_dim, explicit, kv_given):
    from parity.hfconfig import AttnShape, head_dim_of, kv_heads_of

    heads = kv * gs
    cfg = {"num_attention_heads": heads, "hidden_size": heads * head_dim * (1 if not explicit else 2)}
    if explicit:
        cfg["head_dim"] = head_dim
    if kv_given:
        cfg["num_key_value_heads"] = kv
    assert head_dim_of(cfg) == head_dim
    assert kv_heads_of(cfg) == (kv if kv_given else heads)
    assert AttnShape.from_config(cfg) == AttnShape(heads, kv if kv_given else heads, head_dim)


@pytest.mark.parametrize("cfg", [{}, {"num_attention_heads": 4}, {"num_attention_heads": "four", "hidden_size": 8},
                                 {"num_attention_heads": 6, "num_key_value_heads": 4, "hidden_size": 48}])
def test_attn_shape_refuses_a_config_without_a_layout(cfg):
    from parity.hfconfig import AttnShape

    with pytest.raises(ParityInputError, match="where.json"):
        AttnShape.from_config(cfg, "where.json")


@pytest.mark.parametrize("rel", HEAD_RULE_FILES)
def test_no_module_derives_head_dim_itself(rel):
    """The rule `head_dim or hidden_size // num_attention_heads` is parity.hfconfig.head_dim_of's alone."""
    import re

    text = (PACKAGE / rel).read_text()
    assert not re.search(r'get\("head_dim"|\["head_dim"\]|"head_dim", None|// heads\b', text), \
        f"parity/{rel} derives head_dim itself"
