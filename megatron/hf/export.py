"""Our weights + config -> a transformers folder (safetensors, config.json, generation_config).

The SepLLM settings the model was trained with go into config.json as a `sepllm` entry (read
back by megatron/hf/sepllm_attention.py); stock transformers ignores the entry and runs full
attention, so the folder loads anywhere.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch

from megatron.config.schema import ModelConfig, SepLLMConfig
from megatron.hf.adapters import to_hf
from megatron.hf.configs import family, hf_config
from megatron.sepllm.kernels.sa_softmax import SA_KERNELS

Tensor = torch.Tensor
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
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
    cfg.architectures = ["LlamaForCausalLM" if family(m) == "llama" else "GPTNeoXForCausalLM"]
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
