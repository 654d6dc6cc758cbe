"""Cross-field validation and derived values, computed once before any work starts."""

from __future__ import annotations

import math

from megatron.config.checks import section_errors
from megatron.config.launcher import validate_launcher
from megatron.config.loader import ConfigError
from megatron.config.neox import FP16_KEYS
from megatron.config.schema import (
    SECTIONS,
    Config,
    ModelConfig,
    RunShape,
    TrainingConfig,
    neox_ffn_sizes,
)
from megatron.sepllm.bipe import bipe_errors
from megatron.sepllm.validate import validate_sepllm


def validate_model(m: ModelConfig, errors: list[str]) -> None:
    """Cross-field checks of the model section (its fields are already in range)."""
    if m.hidden_size % m.num_attention_heads:
        errors.append(
            f"hidden_size {m.hidden_size} is not divisible by num_attention_heads "
            f"{m.num_attention_heads}"
        )
    kv = m.kv_heads
    if m.num_attention_heads % kv:
        errors.append(
            f"num_attention_heads {m.num_attention_heads} must be a multiple of num_kv_heads {kv}"
        )
    if m.pos_emb == "rotary" and m.rotary_dims % 2:
        errors.append(
            f"rotary dims = head_dim {m.head_dim} x rotary_pct {m.rotary_pct} must be even"
        )
    if m.mlp_multiple_of is not None and m.activation != "swiglu":
        first, second = neox_ffn_sizes(m)
        if first != second:
            errors.append(
                f"mlp_multiple_of {m.mlp_multiple_of}: NeoX's rule gives a gelu MLP of "
                f"{first} in and {second} out for intermediate_size "
                f"{m.intermediate_size or 4 * m.hidden_size}; use a multiple of "
                f"{2 * m.mlp_multiple_of}"
            )
    if m.attention_type == "groupedquery" and m.num_kv_heads is None:
        errors.append("attention_type groupedquery needs num_kv_heads")
    if m.attention_type == "multihead" and m.kv_heads != m.num_attention_heads:
        errors.append(
            f"attention_type multihead with num_kv_heads {m.num_kv_heads} != "
            f"num_attention_heads {m.num_attention_heads}: use attention_type groupedquery"
        )
    if m.seq_length > m.max_positions:
        errors.append(
            f"seq_length {m.seq_length} exceeds max_position_embeddings {m.max_positions}"
        )


def resolve_batch(t: TrainingConfig, dp: int) -> tuple[int, int, int]:
    """(micro, accumulation, global) from any two of them; raises if inconsistent."""
    micro, accum, total = (
        t.train_micro_batch_size_per_gpu,
        t.gradient_accumulation_steps,
        t.train_batch_size,
    )
    if micro is None and accum is None and total is None:
        raise ConfigError("set at least train_micro_batch_size_per_gpu (or train_batch_size)")
    if micro is not None and accum is not None:
        if total is not None and total != micro * accum * dp:
            raise ConfigError(
                f"batch triple inconsistent: train_batch_size {total} != "
                f"train_micro_batch_size_per_gpu {micro} x gradient_accumulation_steps {accum} "
                f"x data-parallel size {dp} = {micro * accum * dp}"
            )
    elif micro is not None:
        accum = 1 if total is None else total // (micro * dp)
        if total is not None and (accum < 1 or accum * micro * dp != total):
            raise ConfigError(
                f"train_batch_size {total} is not a multiple of micro batch {micro} x "
                f"data-parallel size {dp}"
            )
    elif total is not None:
        accum = accum or 1
        micro = total // (accum * dp)
        if micro < 1 or micro * accum * dp != total:
            raise ConfigError(
                f"train_batch_size {total} is not divisible by gradient_accumulation_steps "
                f"{accum} x data-parallel size {dp}"
            )
    else:
        raise ConfigError("gradient_accumulation_steps alone does not define the batch size")
    for name, v in (("micro batch", micro), ("gradient_accumulation_steps", accum)):
        if v < 1:
            raise ConfigError(f"{name} must be >= 1, got {v}")
    return micro, accum, micro * accum * dp


def padded_vocab(vocab_size: int, divisible_by: int, tp: int) -> int:
    multiple = divisible_by * tp
    return int(math.ceil(vocab_size / multiple) * multiple)


def validate(cfg: Config, world_size: int = 1) -> None:
    """Raise one ConfigError listing every problem found (not just the first)."""
    errors: list[str] = []
    bad = set()  # sections with a field out of range: their cross-field checks are skipped
    for section in SECTIONS:
        choices, ranges = section_errors(getattr(cfg, section))
        errors += choices + ranges
        bad |= {section} if ranges else set()
    if "model" not in bad:
        validate_model(cfg.model, errors)
    if cfg.schedule.min_lr > cfg.optimizer.lr:
        errors.append(f"min_lr {cfg.schedule.min_lr} is above lr {cfg.optimizer.lr}")
    if cfg.schedule.decay_lr_to is not None and cfg.schedule.min_lr:
        errors.append(
            f"decay_lr_to {cfg.schedule.decay_lr_to} and min_lr {cfg.schedule.min_lr} both set "
            "the floor of the learning rate: keep one"
        )
    unknown = sorted(set(cfg.training.fp16_settings) - set(FP16_KEYS))
    if unknown:
        errors.append(f"fp16_settings: unknown entries {unknown} (known: {', '.join(FP16_KEYS)})")
    if any(i < 0 for i in cfg.checkpoint.extra_save_iters):
        errors.append(f"extra_save_iters must be >= 0, got {cfg.checkpoint.extra_save_iters}")
    stage = cfg.training.zero_optimization.get("stage", 0)
    if stage not in (0, 1, 2, 3):
        errors.append(f"zero_optimization.stage must be 0, 1, 2 or 3, got {stage}")
    if not bad & {"model", "parallel"}:
        _validate_parallel(cfg, world_size, errors)
    validate_launcher(cfg.launcher, errors)
    if cfg.checkpoint.finetune and not cfg.checkpoint.load:
        errors.append("finetune: true needs `load` (the checkpoint to start from)")
    d = cfg.data
    if not (d.data_path or d.train_data_paths):
        errors.append("no training data: set data_path or train_data_paths")
    for split in ("train", "valid", "test"):
        paths, weights = getattr(d, f"{split}_data_paths"), getattr(d, f"{split}_data_weights")
        if weights and len(weights) != len(paths):
            errors.append(f"{split}_data_weights has {len(weights)} entries for {len(paths)} paths")
    if not bad & {"model", "sepllm"}:
        errors.extend(_sepllm_errors(cfg))
    if not errors:
        try:
            batch = resolve_batch(cfg.training, _dp_size(cfg, world_size))
            errors += _deepspeed_batch_errors(cfg.training.deepspeed_extra, batch)
        except ConfigError as exc:
            errors.append(str(exc))
    if errors:
        unique = list(dict.fromkeys(errors))  # a section check may also run on its own
        raise ConfigError("invalid configuration:\n  - " + "\n  - ".join(unique))


def _deepspeed_batch_errors(extra: dict, batch: tuple[int, int, int]) -> list[str]:
    """deepspeed_extra is merged over the resolved batch: a different value there would fail
    inside DeepSpeed after the launch (or silently change the batch)."""
    names = ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "train_batch_size")
    return [
        f"deepspeed_extra.{name} = {extra[name]!r} disagrees with the batch this config "
        f"resolves to (micro {batch[0]} x accumulation {batch[1]} x data parallel = global "
        f"{batch[2]}): set the batch with the training keys, not in deepspeed_extra"
        for name, value in zip(names, batch)
        if name in extra and extra[name] != value
    ]


def _sepllm_errors(cfg: Config) -> list[str]:
    errors = validate_sepllm(cfg.sepllm, cfg.model.num_layers, cfg.model.seq_length)
    return errors + bipe_errors(cfg.sepllm, cfg.model.pos_emb)


def _dp_size(cfg: Config, world_size: int) -> int:
    p = cfg.parallel
    return max(1, world_size // (p.model_parallel_size * max(1, p.pipe_parallel_size)))


def _validate_parallel(cfg: Config, world_size: int, errors: list[str]) -> None:
    p, m = cfg.parallel, cfg.model
    tp = p.model_parallel_size
    if p.sequence_parallel:
        errors.append("sequence_parallel is not available yet: set sequence_parallel: false")
    for name, n in (
        ("num_attention_heads", m.num_attention_heads),
        ("num_kv_heads", m.kv_heads),
        ("MLP width (intermediate_size)", m.ffn_size),
    ):
        if n % tp:
            errors.append(f"{name} = {n} is not divisible by model_parallel_size {tp}")
    pp = max(1, p.pipe_parallel_size)
    if pp > m.num_layers:
        errors.append(f"pipe_parallel_size {pp} exceeds num_layers {m.num_layers}")
    grid = tp * pp
    if world_size % grid:
        errors.append(f"world size {world_size} is not divisible by TP x PP = {grid}")
    stage = cfg.training.zero_optimization.get("stage", 0)
    if p.pipe_parallel_size > 1 and stage > 1:
        errors.append(
            f"ZeRO stage {stage} cannot shard gradients across pipeline stages (DeepSpeed's "
            "pipeline engine supports ZeRO 0 and 1): use zero_optimization.stage <= 1 with "
            "pipe_parallel_size > 1"
        )


def finalize(cfg: Config, world_size: int, vocab_size: int) -> Config:
    """Validate, then compute the run's shape (batch triple, padded vocab, windows) exactly
    once into the frozen `cfg.derived`; the sections keep what the user wrote."""
    validate(cfg, world_size)
    _check_token_ids(cfg, vocab_size)
    dp = _dp_size(cfg, world_size)
    micro, accum, total = resolve_batch(cfg.training, dp)
    m = cfg.model
    cfg.derived = RunShape(
        world_size=world_size,
        data_parallel_size=dp,
        micro_batch=micro,
        grad_accum=accum,
        global_batch=total,
        vocab_size=vocab_size,
        padded_vocab_size=padded_vocab(
            vocab_size, m.make_vocab_size_divisible_by, cfg.parallel.model_parallel_size
        ),
        windows=tuple(cfg.sepllm.layer_windows(m.num_layers, m.seq_length)),
    )
    return cfg


def _check_token_ids(cfg: Config, vocab_size: int) -> None:
    """Separator and pad ids must be tokens of the run's tokenizer: an id past the vocabulary
    never occurs in the data, which silently turns SepLLM into StreamingLLM."""
    s, errors = cfg.sepllm, []
    bipe_ids = (s.bipe_separator_token_ids or []) if s.bipe else []  # unused without BiPE
    ids = [*s.separator_token_ids, *bipe_ids]
    outside = sorted({int(i) for i in ids if int(i) >= vocab_size})
    if outside:
        errors.append(
            f"sepllm.separator_token_ids / bipe_separator_token_ids {outside} are outside the "
            "tokenizer's vocabulary "
            f"(size {vocab_size}): derive the ids for this tokenizer with "
            "tools/sepllm/separator_ids.py"
        )
    if s.mode != "full" and s.batch_adaptive_init_pos and s.pad_token_id >= vocab_size:
        errors.append(
            f"sepllm.pad_token_id {s.pad_token_id} is outside the tokenizer's vocabulary "
            f"(size {vocab_size})"
        )
    if errors:
        raise ConfigError("invalid configuration:\n  - " + "\n  - ".join(errors))
