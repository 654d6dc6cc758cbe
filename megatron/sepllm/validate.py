"""Checks of a SepLLM config before launch: every problem as one clear message."""

from __future__ import annotations

from megatron.sepllm.config import SepLLMConfig
from megatron.sepllm.kernels import AUTO, KERNELS

MODES = ("full", "sepllm", "streamingllm")
KERNEL_CHOICES = (AUTO, *KERNELS)  # the registry is the one list of kernel names


def _check_windows(name: str, windows: list[int] | None, num_layers: int) -> list[str]:
    if windows is None:
        return []
    errors = []
    if len(windows) != num_layers:
        errors.append(
            f"sepllm.{name} has {len(windows)} entries but the model has {num_layers} layers"
        )
    bad = [w for w in windows if int(w) < 1]
    if bad:
        errors.append(f"sepllm.{name}: windows must be >= 1, got {bad}")
    return errors


def validate_sepllm(sep: SepLLMConfig, num_layers: int, seq_length: int) -> list[str]:
    """Error messages for `sep` (empty list = valid)."""
    errors: list[str] = []
    if sep.mode not in MODES:
        errors.append(f"sepllm.mode {sep.mode!r} is unknown; choose one of {list(MODES)}")
    if sep.attention_kernel not in KERNEL_CHOICES:
        errors.append(
            f"sepllm.attention_kernel {sep.attention_kernel!r} is unknown; "
            f"choose one of {list(KERNEL_CHOICES)}"
        )
    elif sep.attention_kernel == "causal" and sep.mode in ("sepllm", "streamingllm"):
        errors.append(
            f"sepllm.attention_kernel 'causal' ignores the {sep.mode} mask; use auto / compact / "
            "dense / flex, or mode full"
        )
    if sep.local_window < 1:
        errors.append(f"sepllm.local_window must be >= 1, got {sep.local_window}")
    errors += _check_windows("local_window_per_layer", sep.local_window_per_layer, num_layers)
    if sep.init_tokens < 0:
        errors.append(f"sepllm.init_tokens must be >= 0, got {sep.init_tokens}")
    if seq_length < 1:
        errors.append(f"seq_length must be >= 1, got {seq_length}")
    ids = list(sep.separator_token_ids or [])
    negative = [i for i in ids if int(i) < 0]
    if negative:
        errors.append(
            f"sepllm.separator_token_ids has negative ids {negative}; write [] for no separators"
        )
    if sep.mode == "sepllm" and not [i for i in ids if int(i) >= 0]:
        errors.append(
            "sepllm.mode sepllm needs separator_token_ids (derive them with "
            "tools/sepllm/separator_ids.py TOKENIZER); for sinks + window only use mode "
            "streamingllm"
        )
    if sep.mode == "streamingllm" and ids:
        errors.append(
            f"sepllm.mode streamingllm keeps no separators, but separator_token_ids={ids} is "
            "set; use mode sepllm or remove the ids"
        )
    if sep.print_kv_ratio and sep.print_ratio_intervals < 1:
        errors.append(f"sepllm.print_ratio_intervals must be >= 1, got {sep.print_ratio_intervals}")
    return errors
