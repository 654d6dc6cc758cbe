"""Our checkpoint -> a transformers folder (safetensors, config.json, generation_config).

`export_checkpoint` reads any layout through megatron.checkpoint's `open_checkpoint`
(verified, weights-only) and runs every check (mappable architecture, castable precision, a
tokenizer of the model's vocabulary that transformers represents exactly) before the output
directory appears; it is written under a temporary name and renamed into place.
The SepLLM settings the model was trained with go into config.json as a `sepllm` entry (read
back by megatron/hf/sepllm_attention.py); stock transformers ignores the entry and runs full
attention, so the folder loads anywhere.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from megatron.checkpoint import ReadOptions, open_checkpoint
from megatron.common.files import atomic_dir, refuse_existing
from megatron.config.schema import Config, ModelConfig, SepLLMConfig
from megatron.hf.adapters import to_hf
from megatron.hf.configs import (
    HF_ARCHITECTURES,
    UnmappedOption,
    check_exportable,
    family,
    hf_config,
    hf_model_type,
)
from megatron.hf.tokenizer import TokenizerRefused, write_tokenizer
from megatron.sepllm.kernels.sa_softmax import SA_KERNELS

Tensor = torch.Tensor
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
TRAINING_PRECISION = {"fp32": "fp32", "bfloat16": "bf16", "fp16": "fp16"}
SEPLLM_KEYS = (
    "mode",
    "separator_token_ids",
    "init_tokens",
    "local_window",
    "pad_token_id",
    "batch_adaptive_init_pos",
)


def check_sepllm_exportable(sep: SepLLMConfig) -> None:
    """Refuses, by name, the SepLLM variants stock transformers models cannot run
    (docs/sepllm_variants.md): they would load and silently compute something else."""
    if sep.bipe:
        raise ValueError(
            "BiPE (sepllm.bipe / USE_BiPE) cannot be exported to transformers: stock "
            "GPTNeoXForCausalLM / LlamaForCausalLM have no learned intra-segment position table "
            "and rotate by the token index, not by the count of separators before each token"
        )
    if sep.attention_kernel in SA_KERNELS:
        raise ValueError(
            f"Self-Adjust softmax (sepllm.attention_kernel {sep.attention_kernel!r} / "
            "USE_SA_SOFTMAX*) cannot be exported to transformers: its attention functions "
            "compute plain softmax attention"
        )


class PrecisionRefused(ValueError):
    """The weights cannot be cast to the requested precision without overflow."""


def sepllm_entry(sep: SepLLMConfig, m: ModelConfig) -> dict[str, Any]:
    """The kept-set settings, with the per-layer windows resolved as training used them."""
    entry = {k: getattr(sep, k) for k in SEPLLM_KEYS}
    entry["local_window_per_layer"] = sep.layer_windows(m.num_layers, m.seq_length)
    entry["seq_length"] = m.seq_length
    return entry


def sepllm_from_entry(entry: dict[str, Any]) -> SepLLMConfig:
    names = {f.name for f in dataclasses.fields(SepLLMConfig)}
    return SepLLMConfig(**{k: v for k, v in entry.items() if k in names})


def cast_state(state: dict[str, Tensor], precision: str) -> dict[str, Tensor]:
    """Every tensor in `precision`; refuses one whose values overflow it (fp16's 65504) or
    that holds non-finite values."""
    dtype = DTYPES[precision]
    limit = torch.finfo(dtype).max
    out = {}
    for k, v in state.items():
        if not torch.isfinite(v).all():
            raise PrecisionRefused(f"{k} holds non-finite values")
        peak = v.detach().abs().max().item() if v.numel() else 0.0
        if peak > limit:
            raise PrecisionRefused(
                f"precision {precision}: {k} reaches {peak:.4g}, beyond its max {limit:.4g}"
            )
        out[k] = v.detach().to(dtype).contiguous()
    return out


def write_hf_folder(
    out: Path,
    state: dict[str, Tensor],
    m: ModelConfig,
    sep: SepLLMConfig,
    precision: str,
    special_ids: dict[str, int | None],
) -> Any:
    """Write weights and configs into the (temporary) directory `out`; returns the config."""
    from safetensors.torch import save_file
    from transformers import GenerationConfig

    check_sepllm_exportable(sep)
    vocab = state["embedding.embed.weight"].shape[0]
    cfg = hf_config(m, vocab)  # refuses what transformers cannot express
    hf_state = cast_state(to_hf(state, m), precision)
    if cfg.tie_word_embeddings:
        hf_state.pop("lm_head.weight")  # safetensors refuses shared storage; tied on load
    cfg.architectures = [HF_ARCHITECTURES[hf_model_type(m)]]
    cfg.dtype = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}[precision]
    for key, value in special_ids.items():
        setattr(cfg, key, value)
    if sep.mode != "full":
        cfg.sepllm = sepllm_entry(sep, m)
    cfg.save_pretrained(str(out))
    save_file(hf_state, str(out / "model.safetensors"), metadata={"format": "pt"})
    GenerationConfig(**{k: v for k, v in special_ids.items() if v is not None}).save_pretrained(
        str(out)
    )
    return cfg


def _check_architecture(cfg: Config, architecture: str | None) -> None:
    m = cfg.model
    check_exportable(m)
    check_sepllm_exportable(cfg.sepllm)  # before the weights are read, not after
    if architecture and architecture != family(m):
        raise UnmappedOption(
            f"--architecture {architecture}: the checkpoint's model is {family(m)} style "
            f"(norm {m.norm}, activation {m.activation}); converting would change its logits"
        )


def export_checkpoint(
    input_dir: str | Path,
    output_dir: str | Path,
    architecture: str | None = None,
    precision: str | None = None,
    vocab_file: str | None = None,
    merge_file: str | None = None,
    skip_tokenizer: bool = False,
    options: ReadOptions = ReadOptions(),  # noqa: B008  (frozen)
    report: Callable[[str], None] = print,
) -> Path:
    """Write the transformers folder; returns it (`report` gets one line saying what was
    read and written)."""
    from megatron.data.tokenizers import build_tokenizer

    out = Path(output_dir)
    refuse_existing(out)
    ck = open_checkpoint(input_dir, options, lambda cfg: _check_architecture(cfg, architecture))
    m, data, state = ck.cfg.model, ck.cfg.data, ck.state_dict()
    precision = precision or TRAINING_PRECISION[ck.cfg.training.precision]
    state = cast_state(state, precision)  # refuses before the output directory exists
    data.vocab_file = vocab_file or ck.vocab_file()
    data.merge_file = merge_file or data.merge_file
    if not skip_tokenizer:
        try:
            size = build_tokenizer(data).vocab_size
        except Exception as exc:  # tokenizer libraries raise many kinds; name the file
            raise TokenizerRefused(f"{data.tokenizer_type} {data.vocab_file}: {exc}") from exc
        ck.check_vocab(size, f"the tokenizer {data.vocab_file}")
    with atomic_dir(out) as tmp:
        ids: dict[str, int | None] = {} if skip_tokenizer else write_tokenizer(data, tmp)
        write_hf_folder(tmp, state, m, ck.cfg.sepllm, precision, ids)
    report(f"{ck.step_dir} ({ck.source}) -> {out} [{family(m)}, {precision}]")
    return out
