"""Original SepLLM config keys -> our SepLLMConfig fields.

`SEPLLM_ALIASES[key](value)` returns the fields that key sets ({} when the key only matters in
combination, e.g. a false mode flag). The loader errors when two keys set one field to
different values. `apply_sepllm_aliases` does the whole translation of a section, including the
combinations a single key cannot decide:
  * the original's exclusive flags (EXCLUSIVE_FLAGS: full attention, streamingLLM, its kernel
    accelerator, the two Self-Adjust softmax flags): more than one true is an error;
  * both mode flags false (the original's default meaning), or a Self-Adjust softmax flag
    without them -> mode sepllm;
  * USE_PREFILL_LOCAL_WIN_SIZES_wrt_LAYERS false -> the per-layer lists are ignored, as in the
    original (which ships default lists next to a false flag).
The decode-time windows (generate_local_window_size, generate_win_loc_size_list,
USE_GENERATE_LOCAL_WIN_SIZES_wrt_LAYERS) and RECOMPILE_SEP_ATTN_KERNEL are accepted so
original YAML files load, but set nothing: each logs one INFO line saying why.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from typing import Any

from megatron.sepllm.config import SepLLMConfig

log = logging.getLogger(__name__)


def _sep_ids(value: Any) -> dict[str, Any]:
    if value is not None and not isinstance(value, (list, tuple)):
        value = [value]
    ids = [_strict_int(x) for x in (value or [])]
    # [-1] (or any negative id) means "no separators" in the original.
    return {"separator_token_ids": [x for x in ids if x >= 0]}


def _init_tok_max_idx(value: Any) -> dict[str, Any]:
    # a = idx + 1 initial tokens (positions 0..idx); -1 disables them.
    return {"init_tokens": max(_strict_int(value) + 1, 0)}


def _flag_mode(mode: str) -> Callable[[Any], dict[str, Any]]:
    def alias(value: Any) -> dict[str, Any]:
        return {"mode": mode} if _strict_bool(value) else {}

    return alias


def _sa_flag(kernel: str) -> Callable[[Any], dict[str, Any]]:
    # Self-Adjust softmax is a kernel of its own (megatron/sepllm/kernels/sa_softmax.py).
    def alias(value: Any) -> dict[str, Any]:
        return {"attention_kernel": kernel} if _strict_bool(value) else {}

    return alias


def _bipe_seps(value: Any) -> dict[str, Any]:
    # None (the original's default): BiPE segments end at separator_token_ids (bipe.py).
    ids = _int_list(value)
    return {} if ids is None else {"bipe_separator_token_ids": ids}


def _strict_float(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"must be a number, got {value!r}")
    return float(value)


def _field(name: str, cast: Callable[[Any], Any]) -> Callable[[Any], dict[str, Any]]:
    def alias(value: Any) -> dict[str, Any]:
        try:
            return {name: cast(value)}
        except ValueError as exc:
            raise ValueError(f"sepllm config: {name} {exc}") from None

    return alias


def _strict_int(value: Any) -> int:
    """An integer, or a float with an integral value; never a truncated 2.7 or a string."""
    if isinstance(value, bool) or not (
        isinstance(value, int) or (isinstance(value, float) and value.is_integer())
    ):
        raise ValueError(f"must be an integer, got {value!r}")
    return int(value)


def _strict_bool(value: Any) -> bool:
    """true / false only: a quoted "false" is a string, and bool("false") would be True."""
    if not isinstance(value, bool):
        raise ValueError(f"must be true or false, got {value!r}")
    return value


def _int_list(value: Any) -> list[int] | None:
    if value is None:
        return None
    if not isinstance(value, (list, tuple)):
        raise ValueError(f"must be a list of integers, got {value!r}")
    return [_strict_int(x) for x in value]


def _decode_only(key: str) -> Callable[[Any], dict[str, Any]]:
    def alias(value: Any) -> dict[str, Any]:
        log.info(
            "sepllm config: %s=%r accepted with no effect: a decode-time setting of the "
            "original; training uses prefill_local_window_size / local_window (streaming "
            "evaluation takes its windows from its own flags)",
            key,
            value,
        )
        return {}

    return alias


def _recompile(value: Any) -> dict[str, Any]:
    _strict_bool(value)
    log.info(
        "sepllm config: RECOMPILE_SEP_ATTN_KERNEL=%r accepted with no effect: the original "
        "recompiles its FlexAttention kernel; ours are compiled on first use",
        value,
    )
    return {}


def _kernel_accelerator(value: Any) -> dict[str, Any]:
    # The original's flag selects its FlexAttention path; our 'auto' picks flex or compact on CUDA
    # and compact / dense on CPU (fastest measured), so a true flag keeps 'auto'; false: nothing.
    return {"attention_kernel": "auto"} if _strict_bool(value) else {}


SEPLLM_ALIASES: dict[str, Callable[[Any], dict[str, Any]]] = {
    "separator_token_ids": _sep_ids,
    "PADDING_ID": _field("pad_token_id", _strict_int),
    "prefill_local_window_size": _field("local_window", _strict_int),
    "generate_local_window_size": _decode_only("generate_local_window_size"),
    "USE_PREFILL_LOCAL_WIN_SIZES_wrt_LAYERS": lambda value: {},  # see apply_sepllm_aliases
    "prefill_loc_win_size_list": _field("local_window_per_layer", _int_list),
    "generate_win_loc_size_list": _decode_only("generate_win_loc_size_list"),
    "USE_GENERATE_LOCAL_WIN_SIZES_wrt_LAYERS": _decode_only(
        "USE_GENERATE_LOCAL_WIN_SIZES_wrt_LAYERS"
    ),
    "RECOMPILE_SEP_ATTN_KERNEL": _recompile,
    "init_tok_max_idx": _init_tok_max_idx,
    "USE_ORIGINAL_FULL_ATTEN": _flag_mode("full"),
    "streamingLLM": _flag_mode("streamingllm"),
    "USE_SEP_ATTN_KERNEL_ACCELERATOR": _kernel_accelerator,
    "BATCH_ADAPTIVE_INIT_POS": _field("batch_adaptive_init_pos", _strict_bool),
    "PRINT_KV_RATIO": _field("print_kv_ratio", _strict_bool),
    "print_ratio_intervals": _field("print_ratio_intervals", _strict_int),
    "USE_BiPE": _field("bipe", _strict_bool),
    "BiPE_seps": _bipe_seps,
    "USE_SA_SOFTMAX": _sa_flag("sa"),
    "USE_SA_SOFTMAX_NO_DENO": _sa_flag("sa_no_deno"),
    "SA_Numerator_Bias": _field("sa_numerator_bias", _strict_float),
    "SA_Denominator_Bias": _field("sa_denominator_bias", _strict_float),
}
# The original accepts at most one of these true at a time (its SepAttention asserts it).
EXCLUSIVE_FLAGS = (
    "USE_ORIGINAL_FULL_ATTEN",
    "streamingLLM",
    "USE_SEP_ATTN_KERNEL_ACCELERATOR",
    "USE_SA_SOFTMAX",
    "USE_SA_SOFTMAX_NO_DENO",
)

_LOWER = {k.lower(): k for k in SEPLLM_ALIASES}
_NATIVE = {f.name for f in dataclasses.fields(SepLLMConfig)}


def lookup_alias(key: str) -> str | None:
    """The original key a config key names: exact match first, then case-insensitive
    (dashes are read as underscores). Our own field names (`batch_adaptive_init_pos`) are
    never taken for a differently-cased original key, so they keep the loader's typed checks."""
    key = key.replace("-", "_")
    if key in SEPLLM_ALIASES:
        return key
    if key in _NATIVE:
        return None
    return _LOWER.get(key.lower())


def apply_sepllm_aliases(section: dict[str, Any]) -> dict[str, Any]:
    """Translate original keys in `section` (others pass through); ValueError on conflicts."""
    out: dict[str, Any] = {}
    origin: dict[str, str] = {}
    originals: dict[str, Any] = {}
    for key, value in section.items():
        name = lookup_alias(key)
        if name is None:
            _set(out, origin, key, value, key)
        else:
            originals[name] = value
    on = [f for f in EXCLUSIVE_FLAGS if originals.get(f) is True]
    if len(on) > 1:
        raise ValueError(
            f"sepllm config: at most one of {', '.join(EXCLUSIVE_FLAGS)} may be true (the "
            f"original SepLLM's rule); true here: {', '.join(on)}"
        )
    use_layers = originals.get("USE_PREFILL_LOCAL_WIN_SIZES_wrt_LAYERS", True)
    for name, value in originals.items():
        if not use_layers and name == "prefill_loc_win_size_list":
            continue  # the original ignores the list unless the flag is on
        try:
            translated = SEPLLM_ALIASES[name](value)
        except ValueError as exc:  # the message names the key the user wrote
            text = str(exc)
            raise ValueError(text if name in text else f"sepllm config: {name} {text}") from None
        for field, v in translated.items():
            _set(out, origin, field, v, name)
    flags = ("USE_ORIGINAL_FULL_ATTEN", "streamingLLM")
    # The original runs Self-Adjust softmax over its SepLLM mask (full / streaming excluded).
    sa = any(originals.get(f) is True for f in ("USE_SA_SOFTMAX", "USE_SA_SOFTMAX_NO_DENO"))
    if "mode" not in out and (sa or any(f in originals for f in flags)):
        if not any(bool(originals.get(f, False)) for f in flags):
            out["mode"] = "sepllm"  # neither full nor streaming: the original's SepLLM mode
    return out


def _set(out: dict[str, Any], origin: dict[str, str], field: str, value: Any, src: str) -> None:
    if field in out and out[field] != value:
        raise ValueError(
            f"sepllm config: {src}={value!r} conflicts with {origin[field]}={out[field]!r} "
            f"(both set {field})"
        )
    out[field] = value
    origin[field] = src
