"""Reliability: bad config values are refused up front, all at once, with the key named.

Cases of the reliability issue: 9 (separator / pad ids outside the vocabulary), 11 (every
numeric range checked in one place), 12 (a key set twice in one file), 16 (every unknown key of
a ported config reported in one run).
"""

from __future__ import annotations

import typing
from pathlib import Path

import pytest

from megatron.config import ConfigError, finalize, load_config, validate
from megatron.config.loader import build_config, field_index, merge_sources
from megatron.config.reference import render
from tests.test_config import cfg_from, write


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("exit_interval", -1, "exit_interval must be >= 1, got -1"),
        ("lr_decay_iters", -10, "lr_decay_iters must be >= 1, got -10"),
        ("weight_decay", -0.1, "weight_decay must be >= 0, got -0.1"),
        ("gradient_clipping", -1.0, "gradient_clipping must be >= 0, got -1.0"),
        ("lr", 0.0, "lr must be > 0, got 0.0"),
        ("adam_beta2", 1.0, r"adam_beta2 must be in \[0, 1\), got 1.0"),
        ("attention_dropout", 1.5, r"attention_dropout must be in \[0, 1\), got 1.5"),
        ("layernorm_epsilon", 0.0, "layernorm_epsilon must be > 0, got 0.0"),
        ("rotary_emb_base", -5.0, "rotary_emb_base must be > 0"),
        ("seed", -1, "seed must be >= 0, got -1"),
        ("master_port", 70000, r"master_port must be in \[1, 65535\], got 70000"),
        ("eval_iters", 0, "eval_iters must be >= 1, got 0"),
    ],
)
def test_numeric_ranges_are_checked_in_one_place(key: str, value, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        validate(cfg_from(**{key: value}))


def test_out_of_range_values_are_all_reported_without_crashing_cross_checks() -> None:
    with pytest.raises(ConfigError) as exc:
        validate(cfg_from(num_attention_heads=0, lr=-1.0, log_interval=0))
    text = str(exc.value)
    for key in ("num_attention_heads", "lr", "log_interval"):
        assert f"{key} must be" in text


# Numeric keys whose every value is meaningful, so they carry no range.
# num_nodes: -1 = all nodes, checked in megatron/config/launcher.py; sa_numerator_bias: any
# real bias of Self-Adjust softmax's numerator (non-finite values are refused for every key).
UNBOUNDED = {"num_nodes", "sa_numerator_bias"}


def test_every_numeric_key_declares_its_range() -> None:
    for name, (section, f) in field_index().items():
        hint = typing.get_type_hints(type(getattr(cfg_from(), section)))[name]
        numeric = hint in (int, float, int | None, float | None)
        if numeric and name not in UNBOUNDED:
            assert {"ge", "gt", "le", "lt"} & set(f.metadata), f"{section}.{name} has no range"


def test_reference_doc_shows_the_allowed_values() -> None:
    doc = render()
    assert "| `lr` | float | > 0 |" in doc
    assert "| `norm` | str | layernorm, rmsnorm |" in doc


def test_a_key_set_twice_in_one_file_is_an_error(tmp_path: Path) -> None:
    p = write(tmp_path, "dup.yml", "num_layers: 2\nhidden_size: 64\nnum_layers: 3\n")
    with pytest.raises(ConfigError, match=r"key 'num_layers' is set twice .*first on line 1"):
        load_config([p])
    nested = write(tmp_path, "nested.yml", "sepllm:\n  mode: sepllm\n  mode: full\n")
    with pytest.raises(ConfigError, match="key 'mode' is set twice"):
        load_config([nested])


def test_every_unknown_key_of_a_file_is_reported_at_once(tmp_path: Path) -> None:
    p = write(tmp_path, "neox.yml", "num_layers: 2\nattn_config: x\nscaled_upper: 1\n")
    with pytest.raises(ConfigError) as exc:
        load_config([p])
    text = str(exc.value)
    assert "2 unknown keys" in text
    assert "'attn_config'" in text and "'scaled_upper'" in text


def test_separator_and_pad_ids_must_be_in_the_tokenizer_vocabulary() -> None:
    sep = {"mode": "sepllm", "separator_token_ids": [5, 120, 300], "local_window": 8}
    with pytest.raises(ConfigError, match=r"separator_token_ids \[120, 300\] are outside"):
        finalize(cfg_from(**sep), world_size=1, vocab_size=100)
    pad = {**sep, "separator_token_ids": [5], "batch_adaptive_init_pos": True, "pad_token_id": 100}
    with pytest.raises(ConfigError, match="pad_token_id 100 is outside"):
        finalize(cfg_from(**pad), world_size=1, vocab_size=100)
    assert finalize(cfg_from(**{**sep, "separator_token_ids": [5, 99]}), 1, 100).derived


@pytest.mark.parametrize(
    ("section", "message"),
    [
        ({"batch_adaptive_init_pos": "false"}, "'batch_adaptive_init_pos' must be true or false"),
        ({"BATCH_ADAPTIVE_INIT_POS": "false"}, "must be true or false, got 'false'"),
        ({"print_ratio_intervals": 2.7}, "print_ratio_intervals must be an integer, got 2.7"),
        ({"PADDING_ID": "0"}, "pad_token_id must be an integer"),
        ({"streamingLLM": "yes"}, "must be true or false, got 'yes'"),
        ({"init_tok_max_idx": 2.5}, "must be an integer, got 2.5"),
    ],
)
def test_quoted_booleans_and_fractional_ints_in_sepllm_keys_are_refused(section, message) -> None:
    """Case 10: a native key that matched an original alias case-insensitively skipped the
    typed coercion ("false" became True, 2.7 became 2)."""
    with pytest.raises(ConfigError, match=message):
        build_config(merge_sources([("c.yml", {"sepllm": {"mode": "sepllm", **section}})]))


def test_native_sepllm_booleans_still_load() -> None:
    cfg = build_config(merge_sources([("c.yml", {"sepllm": {"batch_adaptive_init_pos": False}})]))
    assert cfg.sepllm.batch_adaptive_init_pos is False
    cfg = build_config(merge_sources([("c.yml", {"BATCH_ADAPTIVE_INIT_POS": True})]))
    assert cfg.sepllm.batch_adaptive_init_pos is True
