"""GPT-NeoX config keys -> our fields: renames, the blocks NeoX hands to DeepSpeed, the keys
that have no effect here (accepted with one INFO line saying why) and the keys of features
that are not built (refused by name). docs/neox_compat.md lists every key of NeoX's shipped
configs with what happens to it; tests/compat checks each class.

Every function here maps one YAML value to the fields it sets ({} for a no-op) or raises
ValueError naming the key (the loader adds the file).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

log = logging.getLogger("megatron")

Alias = Callable[[Any], dict[str, Any]]

# DeepSpeed's fp16 block (https://www.deepspeed.ai/docs/config-json/#fp16-training-options).
FP16_KEYS = (
    "auto_cast",
    "loss_scale",
    "initial_scale_power",
    "loss_scale_window",
    "hysteresis",
    "consecutive_hysteresis",
    "min_loss_scale",
)


def _rename(target: str, fn: Callable[[Any], Any] = lambda v: v) -> Alias:
    return lambda value: {target: fn(value)}


def _neox_optimizer(value: Any) -> dict[str, Any]:
    # NeoX form: optimizer: {type: Adam, params: {lr, betas: [b1, b2], eps, weight_decay}}
    if not isinstance(value, dict):
        raise ValueError(f"'optimizer' must be a mapping with 'type' and 'params', got {value!r}")
    unknown = set(value) - {"type", "params"}
    if unknown:
        raise ValueError(f"'optimizer' accepts only 'type' and 'params', not {sorted(unknown)}")
    out: dict[str, Any] = {}
    if "type" in value:
        out["optimizer_type"] = str(value["type"]).lower()
    params = dict(value.get("params", {}))
    for key, target in (("lr", "lr"), ("eps", "adam_eps"), ("weight_decay", "weight_decay")):
        if key in params:
            out[target] = params.pop(key)
    if "betas" in params:
        out["adam_beta1"], out["adam_beta2"] = params.pop("betas")
    if params:
        raise ValueError(f"unsupported optimizer params {sorted(params)}")
    return out


def _precision_block(name: str) -> Alias:
    """NeoX's `fp16:` / `bf16:` block. NeoX hands it to DeepSpeed: an enabled fp16 block sets
    precision fp16 (or its `type`, e.g. bfloat16) and its loss-scaling entries go to
    DeepSpeed's fp16 block (`fp16_settings`); bf16 has no loss scaling, so a bf16 run says
    once that those entries have no effect."""

    def convert(value: Any) -> dict[str, Any]:
        if not isinstance(value, dict):
            return {"precision": "fp16" if name == "fp16" else "bfloat16"} if value else {}
        block = {str(k): v for k, v in value.items()}
        block.pop(name, None)  # NeoX's redundant `fp16: {fp16: true, ...}`
        enabled = block.pop("enabled", False)
        if not isinstance(enabled, bool):  # a quoted "false" would be truthy
            raise ValueError(f"{name}.enabled must be true or false, got {enabled!r}")
        kind = str(block.pop("type", "fp16" if name == "fp16" else "bfloat16")).lower()
        kinds = {"fp16": "fp16", "float16": "fp16", "bfloat16": "bfloat16", "bf16": "bfloat16"}
        if kind not in kinds:
            raise ValueError(f"{name}.type {kind!r}: must be fp16 or bfloat16")
        unknown = sorted(set(block) - set(FP16_KEYS))
        if unknown:
            raise ValueError(
                f"{name} block: unknown entries {unknown} (DeepSpeed's fp16 block takes "
                f"enabled, type, {', '.join(FP16_KEYS)})"
            )
        if not enabled:
            return {}
        if kinds[kind] == "fp16":
            return {"precision": "fp16", "fp16_settings": block}
        if block:
            log.info(
                "config: %s block entries %s have no effect: bfloat16 needs no loss scaling",
                name,
                ", ".join(sorted(block)),
            )
        return {"precision": "bfloat16"}

    return convert


def _noop(key: str, why: str, check: Callable[[Any], str | None] | None = None) -> Alias:
    """Accepted with no effect: one INFO line naming why; `check` refuses values whose
    meaning would differ from what this code does (returns the reason)."""

    def alias(value: Any) -> dict[str, Any]:
        problem = check(value) if check else None
        if problem:
            raise ValueError(f"{key}={value!r}: {problem}")
        log.info("config: %s=%r accepted with no effect: %s", key, value, why)
        return {}

    return alias


def _refused_if_set(key: str, feature: str) -> Alias:
    """A key of an unbuilt feature: false / null / 0 / empty is accepted (the feature off),
    anything else is refused naming the feature."""

    def alias(value: Any) -> dict[str, Any]:
        if value in (None, False, 0, "", [], {}):
            return {}
        raise ValueError(f"{key}={value!r}: {feature} is not built in this trainer")

    return alias


def _one_of(*allowed: Any, why: str) -> Callable[[Any], str | None]:
    return lambda v: None if v in allowed else f"{why} (accepted: {', '.join(map(str, allowed))})"


def _bool(value: Any) -> str | None:
    return None if isinstance(value, bool) else "must be true or false"


ATTENTION_TYPES = {
    "global": "dense causal attention",
    "flash": "dense causal attention (flash kernels where the device has them)",
}
UNBUILT_LAYERS = {
    "local": "local (sliding-window) sparse attention",
    "sparse_fixed": "DeepSpeed sparse attention",
    "sparse_variable": "DeepSpeed sparse attention",
    "bigbird": "DeepSpeed sparse attention (bigbird)",
    "bslongformer": "DeepSpeed sparse attention (longformer)",
    "gmlp": "gMLP layers",
    "amlp": "aMLP layers",
    "mamba": "Mamba layers",
    "rwkv": "RWKV layers",
}


def _attention_config(value: Any) -> dict[str, Any]:
    """NeoX's [[[types], count or "all"], ...]. Global and flash are the dense causal
    attention every layer has here (SepLLM's mask is set by the sepllm section, as in the
    original, which ships `global`), so nothing is set; other layer types are not built."""
    try:
        types = [str(t) for entry in value for t in entry[0]]
        counts = [entry[1] for entry in value]
    except (TypeError, IndexError, KeyError):
        raise ValueError(
            f"attention_config must be a list of [[types], count], got {value!r}"
        ) from None
    for t in types:
        if t in UNBUILT_LAYERS:
            raise ValueError(f"attention_config type '{t}': {UNBUILT_LAYERS[t]} not built")
        if t not in ATTENTION_TYPES:
            raise ValueError(
                f"attention_config type '{t}' unknown (built: {', '.join(ATTENTION_TYPES)})"
            )
    bad = [c for c in counts if c != "all" and (isinstance(c, bool) or not isinstance(c, int))]
    if bad:
        raise ValueError(f"attention_config counts must be integers or 'all', got {bad}")
    log.info(
        "config: attention_config %s = %s in every layer",
        "/".join(dict.fromkeys(types)),
        ATTENTION_TYPES["flash" if "flash" in types else "global"],
    )
    return {}


def _deepspeed_block(name: str) -> Alias:
    """A DeepSpeed config block NeoX passes through unchanged."""

    def alias(value: Any) -> dict[str, Any]:
        if not isinstance(value, dict):
            raise ValueError(f"{name} must be a mapping, got {value!r}")
        return {"deepspeed_extra": {name: dict(value)}}

    return alias


def _deepspeed_slurm(value: Any) -> dict[str, Any]:
    if not isinstance(value, bool):
        raise ValueError(f"deepspeed_slurm must be true or false, got {value!r}")
    return {"launcher": "slurm"} if value else {}


def _checkpoint_layers(value: Any) -> str | None:
    return None if value == 1 else "only per-block recomputation (1 layer per checkpoint) is built"


# Keys with a meaning here: renames and NeoX's blocks.
NEOX_MAPPED: dict[str, Alias] = {
    "optimizer": _neox_optimizer,
    "bf16": _precision_block("bf16"),
    "fp16": _precision_block("fp16"),
    "rms_norm_epsilon": _rename("layernorm_epsilon"),
    "gas": _rename("gradient_accumulation_steps"),
    "num_gpus_per_node": _rename("num_gpus"),
    "save_interval": _rename("checkpoint_factor"),
    "lr_warmup_fraction": _rename("warmup"),
    "use_bias_in_norm": _rename("use_bias_in_norms"),
    "train_micro_batch_size": _rename("train_micro_batch_size_per_gpu"),
    "attention_config": _attention_config,
    "deepspeed_extra_args": _rename("deepspeed_extra", dict),
    "data_types": _deepspeed_block("data_types"),
    "deepspeed_slurm": _deepspeed_slurm,
}
# Keys with no effect here: one INFO line each, saying why.
NEOX_NOOPS: dict[str, Alias] = {
    "output_layer_parallelism": _noop(
        "output_layer_parallelism",
        "the output layer is split over the vocabulary (column), NeoX's only choice",
        _one_of("column", why="only the column-parallel output layer is built"),
    ),
    "bias_gelu_fusion": _noop(
        "bias_gelu_fusion",
        "a speed-only kernel in NeoX; the MLP adds the bias and applies exact GeLU in "
        "PyTorch (NeoX's fused kernel uses GeLU's tanh approximation)",
        _bool,
    ),
    "scaled_upper_triang_masked_softmax_fusion": _noop(
        "scaled_upper_triang_masked_softmax_fusion",
        "a speed-only softmax kernel; the attention kernel is chosen per device (select_kernel)",
        _bool,
    ),
    "scaled_masked_softmax_fusion": _noop(
        "scaled_masked_softmax_fusion",
        "a speed-only softmax kernel; the attention kernel is chosen per device (select_kernel)",
        _bool,
    ),
    "checkpoint_num_layers": _noop(
        "checkpoint_num_layers",
        "checkpoint_activations recomputes one block at a time, i.e. 1",
        _checkpoint_layers,
    ),
    "partition_activations": _noop(
        "partition_activations",
        "saved activations are not split over tensor-parallel ranks (same numbers, more memory)",
        _bool,
    ),
    "synchronize_each_layer": _noop(
        "synchronize_each_layer", "a CUDA synchronisation for timing/debugging only", _bool
    ),
    "data_impl": _noop(
        "data_impl",
        "datasets are memory-mapped .bin/.idx files (mmap)",
        _one_of("mmap", "infer", why="only memory-mapped (mmap) datasets are built"),
    ),
    "distributed_backend": _noop(
        "distributed_backend",
        "the backend follows the device: nccl on GPU, gloo on CPU",
        _one_of("nccl", "gloo", why="the backend is nccl on GPU and gloo on CPU"),
    ),
    "steps_per_print": _noop(
        "steps_per_print", "DeepSpeed's own step print is off; log_interval sets the log line"
    ),
    "wall_clock_breakdown": _noop(
        "wall_clock_breakdown",
        "DeepSpeed's timers are off; the log line shows the step time",
        _bool,
    ),
    "log_dir": _noop("log_dir", "logs go to stdout/stderr (redirect them to keep a file)"),
    "log_grad_norm": _noop(
        "log_grad_norm", "the gradient norm is in every log line and metric", _bool
    ),
    "fp32_allreduce": _noop(
        "fp32_allreduce",
        "DeepSpeed all-reduces gradients in the optimizer's gradient type (fp32 except under "
        "fp16/bf16 engines)",
        _bool,
    ),
    "checkpoint_validation_with_forward_pass": _noop(
        "checkpoint_validation_with_forward_pass",
        "checkpoints are verified by their checksums instead (verify_checkpoint_checksums)",
        _one_of(False, why="re-running a forward pass after each save is not built"),
    ),
    "comment": _noop("comment", "free text"),
    "global_num_gpus": _noop("global_num_gpus", "the world size comes from the launch"),
    "wandb_host": _noop(
        "wandb_host", "set WANDB_BASE_URL for online logging (wandb_mode offline by default)"
    ),
}
# Keys of features that are not built: accepted only when off, else refused naming the feature.
NEOX_REFUSED: dict[str, Alias] = {
    "sliding_window_width": _refused_if_set(
        "sliding_window_width", "sliding-window attention (Mistral)"
    ),
    "sparsity_config": _refused_if_set("sparsity_config", "DeepSpeed sparse attention"),
    "moe_num_experts": lambda v: (
        {} if v in (None, 1) else _refused_if_set("moe_num_experts", "mixture of experts")(v)
    ),
    "gmlp_attn_dim": _refused_if_set("gmlp_attn_dim", "gMLP"),
    "use_comet": _refused_if_set("use_comet", "Comet logging (use use_wandb or tensorboard_dir)"),
    "use_bnb_optimizer": _refused_if_set("use_bnb_optimizer", "the bitsandbytes 8-bit optimizer"),
    "profile": _refused_if_set("profile", "NVTX profiling of steps (profile)"),
    "memory_profiling": _refused_if_set("memory_profiling", "CUDA memory profiling"),
}
for _key in ("comet_project", "comet_experiment_name", "comet_tags", "comet_others"):
    NEOX_REFUSED[_key] = _refused_if_set(_key, "Comet logging")
for _key in ("profile_step_start", "profile_step_stop", "memory_profiling_path"):
    NEOX_NOOPS[_key] = _noop(_key, "used only by profile / memory_profiling (not built)")
for _key in ("mamba_selective_scan_fusion", "mamba_causal_conv_fusion", "mamba_inner_func_fusion"):
    NEOX_REFUSED[_key] = _refused_if_set(_key, "Mamba layers")
for _key in (
    "te_columnparallel",
    "te_rowparallel",
    "te_layernorm_mlp",
    "te_mha",
    "te_fp8_format",
    "te_fp8_wgrad",
    "te_fp8_amax_history_len",
    "te_fp8_amax_compute_algo",
    "te_fp8_margin",
    "te_fp8_mha",
):
    NEOX_REFUSED[_key] = _refused_if_set(_key, "TransformerEngine")

NEOX_ALIASES: dict[str, Alias] = {**NEOX_MAPPED, **NEOX_NOOPS, **NEOX_REFUSED}
