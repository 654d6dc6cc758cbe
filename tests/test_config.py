"""Config loading: merge, aliases, unknown keys, every validation error, derived values."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from megatron.config import ConfigError, finalize, load_config, validate
from megatron.config.loader import build_config, config_to_dict, field_index, merge_sources
from megatron.config.reference import render
from megatron.config.schema import ModelConfig
from tests.conftest import MINIMAL_CONFIG


def cfg_from(**kw):
    return build_config(merge_sources([("test", {**MINIMAL_CONFIG, **kw})]))


def write(tmp_path: Path, name: str, text: str) -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


def test_merge_files_and_dashes(tmp_path: Path) -> None:
    a = write(tmp_path, "a.yml", "num-layers: 3\nhidden_size: 96\nnum_attention_heads: 3\n")
    b = write(tmp_path, "b.yml", "seq-length: 64\nsepllm: {mode: full}\ntrain_iters: 7\n")
    cfg = load_config([a, b])
    assert (cfg.model.num_layers, cfg.model.hidden_size, cfg.model.seq_length) == (3, 96, 64)
    assert cfg.training.train_iters == 7


def test_key_in_two_files_is_an_error(tmp_path: Path) -> None:
    a = write(tmp_path, "a.yml", "num_layers: 3\n")
    b = write(tmp_path, "b.yml", "num-layers: 4\n")
    with pytest.raises(ConfigError, match="defined twice"):
        load_config([a, b])


def test_overrides_win(tmp_path: Path) -> None:
    a = write(tmp_path, "a.yml", "num_layers: 3\n")
    assert load_config([a], overrides={"num_layers": 5}).model.num_layers == 5


@pytest.mark.parametrize(
    ("key", "suggestion"),
    [
        ("hiden_size", "hidden_size"),
        ("num_atention_heads", "num_attention_heads"),
        ("train_iter", "train_iters"),
    ],
)
def test_unknown_key_names_closest(key: str, suggestion: str) -> None:
    with pytest.raises(ConfigError, match=f"unknown key '{key}'.*did you mean '{suggestion}'"):
        cfg_from(**{key: 1})


def test_unknown_key_in_section() -> None:
    with pytest.raises(ConfigError, match="section 'sepllm'.*did you mean 'local_window'"):
        cfg_from(sepllm={"local_windw": 3})


def test_neox_optimizer_and_precision_aliases() -> None:
    cfg = cfg_from(
        optimizer={"type": "Adam", "params": {"lr": 3e-4, "betas": [0.8, 0.9], "eps": 1e-6}},
        bf16={"enabled": True},
    )
    o = cfg.optimizer
    assert (o.optimizer_type, o.lr, o.adam_beta1, o.adam_beta2, o.adam_eps) == (
        "adam",
        3e-4,
        0.8,
        0.9,
        1e-6,
    )
    assert cfg.training.precision == "bfloat16"


def test_type_errors_name_the_key() -> None:
    with pytest.raises(ConfigError, match="'num_layers' must be an integer"):
        cfg_from(num_layers="two")
    with pytest.raises(ConfigError, match="'gpt_j_residual' must be true or false"):
        cfg_from(gpt_j_residual="yes")


INVALID = [
    ({"hidden_size": 66}, "not divisible by num_attention_heads"),
    ({"num_kv_heads": 3}, "multiple of num_kv_heads"),
    ({"activation": "relu"}, "activation = 'relu'"),
    ({"norm": "batchnorm"}, "norm = 'batchnorm'"),
    ({"precision": "fp8"}, "precision = 'fp8'"),
    ({"lr_decay_style": "step"}, "lr_decay_style"),
    ({"rotary_pct": 0.1}, "must be even"),
    ({"rotary_pct": 1.5}, "rotary_pct must be in"),
    ({"max_position_embeddings": 16}, "exceeds max_position_embeddings"),
    ({"train_batch_size": 7}, "batch triple inconsistent|not a multiple"),
    ({"gradient_accumulation_steps": 2, "train_batch_size": 6}, "inconsistent"),
    ({"finetune": True}, "finetune: true needs `load`"),
    ({"data_path": None}, "no training data"),
    ({"train_data_paths": ["a", "b"], "train_data_weights": [1.0]}, "2 paths"),
    ({"zero_optimization": {"stage": 4}}, "stage must be"),
    ({"model_parallel_size": 3}, "not divisible by model_parallel_size 3"),
    ({"sequence_parallel": True}, "sequence_parallel"),
    ({"pipe_parallel_size": 2, "zero_optimization": {"stage": 2}}, "ZeRO stage 2 cannot"),
    ({"pipe_parallel_size": 3}, "exceeds num_layers"),
    ({"train_iters": 0}, "train_iters must be"),
    ({"min_lr": 1.0}, "min_lr"),
    ({"warmup": 2.0}, "warmup must be in"),
]


@pytest.mark.parametrize(("change", "message"), INVALID)
def test_validation_errors(change: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        validate(cfg_from(**change))


def test_all_errors_reported_together() -> None:
    with pytest.raises(ConfigError) as exc:
        validate(cfg_from(hidden_size=66, activation="relu"))
    assert "not divisible" in str(exc.value) and "activation" in str(exc.value)


@pytest.mark.parametrize(
    ("given", "world", "expected"),
    [
        ({"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 3}, 2, (2, 3, 12)),
        ({"train_micro_batch_size_per_gpu": 2, "train_batch_size": 8}, 2, (2, 2, 8)),
        (
            {
                "train_micro_batch_size_per_gpu": None,
                "train_batch_size": 12,
                "gradient_accumulation_steps": 2,
            },
            3,
            (2, 2, 12),
        ),
    ],
)
def test_batch_triple_derived(given: dict, world: int, expected: tuple) -> None:
    cfg = finalize(cfg_from(**given), world_size=world, vocab_size=100)
    d = cfg.derived
    assert (d.micro_batch, d.grad_accum, d.global_batch) == expected
    assert d.data_parallel_size == world


def test_padded_vocab_and_ffn() -> None:
    cfg = finalize(cfg_from(make_vocab_size_divisible_by=64), world_size=1, vocab_size=8193)
    assert cfg.derived.padded_vocab_size == 8256
    assert cfg.model.ffn_size == 4 * 64
    llama = finalize(cfg_from(activation="swiglu", hidden_size=256), 1, 10)
    assert llama.model.ffn_size == 768  # 256 * ceil(8 * 256 / 3 / 256)


def test_model_config_derives_its_values() -> None:
    m = ModelConfig(hidden_size=96, num_attention_heads=6, num_kv_heads=2, rotary_pct=0.25)
    assert (m.head_dim, m.kv_heads, m.rotary_dims) == (16, 2, 4)
    assert m.qkv_sizes == (96, 32, 32)
    assert ModelConfig(num_attention_heads=4).kv_heads == 4
    assert ModelConfig(seq_length=64).max_positions == 64
    assert ModelConfig(seq_length=64, max_position_embeddings=256).max_positions == 256
    assert ModelConfig(pos_emb="learned").rotary_dims == 0


def test_run_shape_is_frozen_and_the_config_keeps_what_was_written() -> None:
    cfg = finalize(cfg_from(train_batch_size=None, gradient_accumulation_steps=None), 2, 100)
    assert cfg.training.train_batch_size is None  # not written back into the section
    assert cfg.derived.global_batch == cfg.derived.micro_batch * 2
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.derived.global_batch = 1  # type: ignore[misc]
    saved = config_to_dict(cfg)["training"]  # what a checkpoint's config.yml records
    assert saved["train_batch_size"] == cfg.derived.global_batch


@pytest.mark.parametrize(
    ("key", "value"),
    [("norm", "batchnorm"), ("precision", "fp8"), ("lr_decay_style", "step"), ("mode", "dense")],
)
def test_enumerated_keys_are_checked_from_yaml_and_in_code(key, value) -> None:
    with pytest.raises(ConfigError, match=f"{key} = '{value}': must be one of"):
        validate(cfg_from(**{key: value}))
    cfg = cfg_from()
    section = field_index()[key][0]
    setattr(getattr(cfg, section), key, value)
    with pytest.raises(ConfigError, match=f"{key} = '{value}': must be one of"):
        validate(cfg)


def test_reference_doc_is_current() -> None:
    doc = Path(__file__).resolve().parent.parent / "docs" / "config_reference.md"
    assert doc.read_text() == render(), "run: python tools/gen_config_reference.py"


def test_shipped_configs_load_and_validate() -> None:
    """Full configs validate alone; overlays (no model section) validate on top of tiny.yml."""
    root = Path(__file__).resolve().parent.parent / "configs"
    # text_generation.yml holds generate.py's settings, not a training config.
    files = sorted(p for p in root.glob("*.yml") if not p.name.startswith("text_generation"))
    assert len(files) >= 2
    for path in files:
        standalone = "num_layers" in path.read_text()
        validate(load_config([path] if standalone else [root / "tiny.yml", path]))


def test_original_sepllm_keys_translate_together() -> None:
    original = {
        "separator_token_ids": [15, 13, 32],
        "PADDING_ID": 0,
        "prefill_local_window_size": 64,
        "init_tok_max_idx": 2,
        "USE_ORIGINAL_FULL_ATTEN": False,
        "streamingLLM": False,
        "USE_PREFILL_LOCAL_WIN_SIZES_wrt_LAYERS": False,
        "prefill_loc_win_size_list": [1, 2, 3],
    }
    cfg = cfg_from(**original)
    s = cfg.sepllm
    assert (s.mode, s.init_tokens, s.local_window, s.separator_token_ids) == (
        "sepllm",
        3,
        64,
        [15, 13, 32],
    )
    assert s.local_window_per_layer is None  # ignored while its flag is off, as in the original
    validate(cfg)
    nested = cfg_from(sepllm={"streamingLLM": True, "separator_token_ids": [-1]})
    assert (nested.sepllm.mode, nested.sepllm.separator_token_ids) == ("streamingllm", [])


def test_contradictory_sepllm_modes_rejected() -> None:
    with pytest.raises(ConfigError, match="at most one of"):
        cfg_from(USE_ORIGINAL_FULL_ATTEN=True, streamingLLM=True)
