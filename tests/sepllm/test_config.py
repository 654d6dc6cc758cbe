"""Original-key aliases, config checks and separator-id derivation."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest

from megatron.config import load_config
from megatron.config.schema import SepLLMConfig
from megatron.data.tokenizers import default_tiktoken_file, tokenizer_for_file
from megatron.sepllm.aliases import SEPLLM_ALIASES, apply_sepllm_aliases, lookup_alias
from megatron.sepllm.separators import separator_tokens
from megatron.sepllm.validate import validate_sepllm

ORIGINAL_KEYS = (
    "separator_token_ids PADDING_ID prefill_local_window_size generate_local_window_size "
    "USE_PREFILL_LOCAL_WIN_SIZES_wrt_LAYERS prefill_loc_win_size_list generate_win_loc_size_list "
    "init_tok_max_idx USE_ORIGINAL_FULL_ATTEN streamingLLM USE_SEP_ATTN_KERNEL_ACCELERATOR "
    "BATCH_ADAPTIVE_INIT_POS PRINT_KV_RATIO print_ratio_intervals USE_BiPE BiPE_seps "
    "USE_SA_SOFTMAX USE_SA_SOFTMAX_NO_DENO SA_Numerator_Bias SA_Denominator_Bias "
    "USE_GENERATE_LOCAL_WIN_SIZES_wrt_LAYERS RECOMPILE_SEP_ATTN_KERNEL"
).split()


def test_every_original_key_has_an_alias() -> None:
    assert set(ORIGINAL_KEYS) == set(SEPLLM_ALIASES)
    fields = set(SepLLMConfig.__dataclass_fields__)
    for key, fn in SEPLLM_ALIASES.items():
        ints = ("PADDING_ID", "prefill_local_window_size", "generate_local_window_size")
        ints += ("init_tok_max_idx", "print_ratio_intervals")
        lists = ("separator_token_ids", "BiPE_seps")
        value = [1, 2] if "list" in key or key in lists else False
        value = 3 if key in ints else value
        value = 0.5 if key.endswith("_Bias") else value
        assert set(fn(value)) <= fields, key


@pytest.mark.parametrize(
    "key, value, expected",
    [
        ("init_tok_max_idx", 2, {"init_tokens": 3}),
        ("init_tok_max_idx", -1, {"init_tokens": 0}),
        ("separator_token_ids", [-1], {"separator_token_ids": []}),
        ("separator_token_ids", [15, 13], {"separator_token_ids": [15, 13]}),
        ("USE_ORIGINAL_FULL_ATTEN", True, {"mode": "full"}),
        ("streamingLLM", True, {"mode": "streamingllm"}),
        ("streamingLLM", False, {}),
        ("prefill_local_window_size", 64, {"local_window": 64}),
        ("PADDING_ID", 0, {"pad_token_id": 0}),
        ("BATCH_ADAPTIVE_INIT_POS", True, {"batch_adaptive_init_pos": True}),
        ("PRINT_KV_RATIO", True, {"print_kv_ratio": True}),
    ],
)
def test_alias_values(key: str, value, expected) -> None:
    assert SEPLLM_ALIASES[key](value) == expected


@pytest.mark.parametrize(
    "key, value", [("generate_local_window_size", 64), ("generate_win_loc_size_list", [8, 9])]
)
def test_decode_window_keys_are_accepted_with_a_warning(key: str, value, caplog) -> None:
    """The original's decode-time windows load (so its YAML files do) but set nothing, and say
    so: this trainer does not decode."""
    with caplog.at_level(logging.INFO, logger="megatron.sepllm.aliases"):
        assert SEPLLM_ALIASES[key](value) == {}
    assert any(key in r.getMessage() and "no effect" in r.getMessage() for r in caplog.records)


def test_decode_window_keys_in_yaml_warn(tmp_path: Path, caplog) -> None:
    path = tmp_path / "original.yml"
    path.write_text(
        "sepllm:\n  separator_token_ids: [13]\n  prefill_local_window_size: 32\n"
        "  generate_local_window_size: 16\n  USE_PREFILL_LOCAL_WIN_SIZES_wrt_LAYERS: false\n"
        "  generate_win_loc_size_list: [4, 4]\n"
    )
    with caplog.at_level(logging.INFO, logger="megatron.sepllm.aliases"):
        cfg = load_config([path])
    assert cfg.sepllm.local_window == 32
    assert not hasattr(cfg.sepllm, "generate_window")
    messages = " ".join(r.getMessage() for r in caplog.records)
    assert "generate_local_window_size=16" in messages
    assert "generate_win_loc_size_list=[4, 4]" in messages  # even with the list flag off


def test_apply_aliases_section() -> None:
    out = apply_sepllm_aliases(
        {
            "USE_ORIGINAL_FULL_ATTEN": False,
            "streamingLLM": False,
            "init-tok-max-idx": 3,
            "USE_PREFILL_LOCAL_WIN_SIZES_wrt_LAYERS": False,
            "prefill_loc_win_size_list": [1, 2],
            "local_window": 64,
        }
    )
    assert out == {"mode": "sepllm", "init_tokens": 4, "local_window": 64}
    with pytest.raises(ValueError, match="at most one of"):
        apply_sepllm_aliases({"USE_ORIGINAL_FULL_ATTEN": True, "streamingLLM": True})
    assert lookup_alias("streamingllm") == "streamingLLM"  # case-insensitive fallback
    assert lookup_alias("separator-token-ids") == "separator_token_ids"


def _errors(**kw) -> list[str]:
    base = {"mode": "sepllm", "separator_token_ids": [13], "local_window": 64}
    return validate_sepllm(SepLLMConfig(**{**base, **kw}), num_layers=4, seq_length=256)


def test_validate_accepts_good_configs() -> None:
    assert _errors() == []
    assert _errors(mode="streamingllm", separator_token_ids=[]) == []
    assert _errors(mode="full") == []
    assert _errors(local_window_per_layer=[256, 64, 64, 256]) == []


@pytest.mark.parametrize(
    "kw, fragment",
    [
        ({"mode": "sparse"}, "mode 'sparse' is unknown"),
        ({"attention_kernel": "fast"}, "attention_kernel 'fast' is unknown"),
        ({"attention_kernel": "causal"}, "ignores the sepllm mask"),
        ({"local_window": 0}, "local_window must be >= 1"),
        ({"local_window_per_layer": [64, 64]}, "has 2 entries but the model has 4 layers"),
        ({"local_window_per_layer": [64, 0, 1, 2]}, "windows must be >= 1"),
        ({"separator_token_ids": []}, "needs separator_token_ids"),
        ({"mode": "streamingllm"}, "keeps no separators"),
        ({"init_tokens": -1}, "init_tokens must be >= 0"),
        ({"separator_token_ids": [-1]}, "negative ids"),
    ],
)
def test_validate_errors(kw, fragment: str) -> None:
    errors = _errors(**kw)
    assert any(fragment in e for e in errors), errors


GPT2 = default_tiktoken_file()


@pytest.mark.skipif(GPT2 is None, reason="gpt2.tiktoken (whisper assets) not installed")
def test_gpt2_separator_ids() -> None:
    gpt2 = tokenizer_for_file(GPT2)  # the data pipeline's TiktokenTokenizer
    found = {t.text: t.id for t in separator_tokens(gpt2)}
    expected = {".": 13, ",": 11, "?": 30, "!": 0, ";": 26, ":": 25, "\n": 198, " ": 220}
    assert {k: found[k] for k in expected} == expected
    extended = {t.text: t.id for t in separator_tokens(gpt2, extended=True)}
    assert extended[" ."] == 764 and extended["\n\n"] == 628


def test_hf_tokenizer_json(tmp_path) -> None:
    tokenizers = pytest.importorskip("tokenizers")
    from tokenizers import decoders, models, pre_tokenizers, trainers

    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<|endoftext|>", "<|padding|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(["Hello, world. How are you?  Fine!\n"] * 20, trainer=trainer)
    path = os.path.join(tmp_path, "tokenizer.json")
    tok.save(path)
    found = separator_tokens(tokenizer_for_file(path))
    # Same ordering rule as GPT-NeoX-20B: printable bytes first, after the 2 special tokens.
    assert [t.id for t in found[:6]] == [15, 13, 32, 2, 28, 27]
    assert [t.text for t in found] == [".", ",", "?", "!", ";", ":", " ", "\t", "\n"]


def test_neox20b_layout_gives_the_pythia_list(tmp_path) -> None:
    """A byte-level tokenizer.json laid out like GPT-NeoX-20B's (2 specials, then the printable
    bytes, with tab / newline / space at ids 186 / 187 / 209) gives the reference notes' Pythia
    list: the ids come from the file's vocabulary, not from assumptions."""
    tokenizers = pytest.importorskip("tokenizers")
    from tokenizers import decoders, models, pre_tokenizers

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    printable = sorted(c for c in alphabet if 33 <= ord(c) <= 126)  # ids 2..95, as in NeoX
    rest = sorted(c for c in alphabet if not 33 <= ord(c) <= 126)
    byte_char = {b: c for b, c in enumerate(_gpt2_byte_chars())}
    pinned = {byte_char[9]: 186, byte_char[10]: 187, byte_char[32]: 209}
    vocab = {"<|endoftext|>": 0, "<|padding|>": 1}
    vocab |= {c: 2 + i for i, c in enumerate(printable)}
    free = iter(i for i in range(96, 96 + len(rest)) if i not in pinned.values())
    vocab |= {c: pinned[c] if c in pinned else next(free) for c in rest}
    tok = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    path = os.path.join(tmp_path, "tokenizer.json")
    tok.save(path)
    found = separator_tokens(tokenizer_for_file(path))  # an HFTokenizer, as for training
    assert [t.id for t in found] == [15, 13, 32, 2, 28, 27, 209, 186, 187]


def _gpt2_byte_chars() -> list[str]:
    """GPT-2's byte -> printable-character map (bytes outside the printable ranges -> 256 + n)."""
    keep = [*range(33, 127), *range(161, 173), *range(174, 256)]
    chars, n = [], 0
    for b in range(256):
        if b in keep:
            chars.append(chr(b))
        else:
            chars.append(chr(256 + n))
            n += 1
    return chars
