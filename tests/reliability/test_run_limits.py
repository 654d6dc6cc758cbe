"""Issue 22 (WEAK, config values): refused or warned before the launch / before the data is
touched, naming the key: lr = .inf (it passed validation), a deepspeed_extra batch that
disagrees with the training keys (it failed inside DeepSpeed after the launch), train_iters
so large that the sample index cannot fit in memory (a MemoryError after 30 s), a warmup
longer than the run (no word), and the original SepLLM keys' messages (separator_token_ids,
quoted "false" flags) name their key."""

from __future__ import annotations

import pytest

from megatron.config.loader import ConfigError, build_config, merge_sources
from megatron.config.validate import finalize, validate
from megatron.training import preflight
from tests.conftest import MINIMAL_CONFIG


def config(**kw):
    return build_config(merge_sources([("t.yml", {**MINIMAL_CONFIG, **kw})]))


@pytest.mark.parametrize(
    ("keys", "message"),
    [
        ({"lr": float("inf")}, "lr must be a finite number, got inf"),
        ({"min_lr": float("nan")}, "min_lr must be a finite number, got nan"),
        (
            {"deepspeed_extra": {"train_batch_size": 64}},
            "deepspeed_extra.train_batch_size = 64 disagrees with the batch this config "
            "resolves to (micro 2 x accumulation 1 x data parallel = global 2)",
        ),
    ],
)
def test_bad_values_are_refused_by_validation(keys: dict, message: str) -> None:
    with pytest.raises(ConfigError) as exc:
        validate(config(**keys))
    assert message in str(exc.value)


@pytest.mark.parametrize(
    ("keys", "message"),
    [
        ({"separator_token_ids": ["a"]}, "separator_token_ids must be an integer, got 'a'"),
        (
            {"USE_SEP_ATTN_KERNEL_ACCELERATOR": "false"},
            "USE_SEP_ATTN_KERNEL_ACCELERATOR must be true or false, got 'false'",
        ),
    ],
)
def test_sepllm_key_messages_name_the_key(keys: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        config(**keys)


def test_matching_deepspeed_extra_batch_passes() -> None:
    validate(config(deepspeed_extra={"train_batch_size": 2}))


def test_index_that_cannot_fit_in_memory_is_refused() -> None:
    cfg = finalize(config(train_iters=10**12), 1, 1024)
    (err,) = preflight.index_size_errors(cfg)
    assert "train_iters 1,000,000,000,000 x global batch 2" in err and "GiB of memory" in err
    assert preflight.index_size_errors(finalize(config(), 1, 1024)) == []


def test_warmup_longer_than_the_run_is_said() -> None:
    cfg = finalize(config(train_iters=10, warmup_iters=40, lr=1e-3), 1, 1024)
    (warning,) = preflight.schedule_warnings(cfg)
    assert "warmup is 40 iterations, longer than the run (train_iters 10)" in warning
    assert "ends at 0.00025" in warning  # 10 / 40 of lr
    assert preflight.schedule_warnings(finalize(config(warmup_iters=5), 1, 1024)) == []
