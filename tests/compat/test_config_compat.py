"""NeoX / SepLLM configs load as their users wrote them: each key class of docs/neox_compat.md
(mapped, no-op with one INFO line, refused feature) checked in process on the YAML files of
this folder (written for these tests in the form of the real ones)."""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from megatron.config.loader import ConfigError, load_config, read_yaml
from megatron.config.schema import ModelConfig, OptimizerConfig, ScheduleConfig
from megatron.config.validate import finalize, validate
from megatron.model.mlp import build_mlp
from megatron.training.schedule import apply_config_hyperparameters, lr_at
from megatron.training.setup import deepspeed_config
from tests.conftest import MINIMAL_CONFIG

HERE = Path(__file__).resolve().parent
PYTHIA = [HERE / "neox_pythia.yml", HERE / "neox_setup.yml"]
LLAMA = HERE / "neox_llama.yml"
SEPLLM = HERE / "sepllm_n64.yml"


def load(paths: list[Path], **overrides: Any):
    cfg = load_config(paths, overrides or None)
    validate(cfg)
    return cfg


def test_neox_pythia_config_maps_its_keys() -> None:
    cfg = load(PYTHIA)
    m, o, s = cfg.model, cfg.optimizer, cfg.schedule
    assert (m.num_layers, m.hidden_size, m.rotary_pct, m.gpt_j_residual) == (2, 64, 0.25, True)
    assert (o.optimizer_type, o.lr, o.adam_beta2, s.min_lr) == ("adam", 0.002, 0.95, 0.0002)
    assert cfg.training.gradient_accumulation_steps == 1  # `gas`
    assert cfg.checkpoint.extra_save_iters == [0, 1, 2]
    assert (cfg.logging.wandb_team, cfg.logging.wandb_group) == ("compat", "tests")
    # The fp16 block goes to DeepSpeed: precision fp16 and its loss-scaling entries.
    assert cfg.training.precision == "fp16"
    finalize(cfg, world_size=1, vocab_size=1000)
    fp16 = deepspeed_config(cfg)["fp16"]
    assert fp16 == {
        "enabled": True,
        "loss_scale": 0,
        "loss_scale_window": 1000,
        "initial_scale_power": 12,
        "hysteresis": 2,
        "min_loss_scale": 1,
    }


def test_fp16_block_on_cpu_is_refused_before_any_work() -> None:
    from megatron.training.run import build_run

    cfg = load(PYTHIA)  # its data files do not exist: the refusal comes before reading them
    with pytest.raises(ConfigError, match="precision fp16 needs a GPU .* --set precision=fp32"):
        build_run(cfg, 0, 1, torch.device("cpu"))


def test_noop_keys_say_why_once_each(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO):
        load(PYTHIA)
    lines = [r.getMessage() for r in caplog.records if "accepted with no effect" in r.message]
    raw = {k.replace("-", "_") for p in PYTHIA for k in read_yaml(p)}
    noop = {
        "output_layer_parallelism",
        "bias_gelu_fusion",
        "scaled_upper_triang_masked_softmax_fusion",
        "checkpoint_num_layers",
        "partition_activations",
        "synchronize_each_layer",
        "data_impl",
        "distributed_backend",
        "steps_per_print",
        "wall_clock_breakdown",
        "log_grad_norm",
        "fp32_allreduce",
        "comment",
        "checkpoint_validation_with_forward_pass",
        "log_dir",
        "global_num_gpus",
        "wandb_host",
    }
    assert noop <= raw
    for key in noop:
        assert sum(line.startswith(f"config: {key}=") for line in lines) == 1, key


def test_sepllm_sample_config_keys(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO):
        cfg = load([SEPLLM], data_path="x")
    s = cfg.sepllm
    assert (s.mode, s.init_tokens, s.pad_token_id) == ("sepllm", 3, 1)
    assert s.local_window_per_layer == [64, 16] and s.print_kv_ratio
    assert cfg.training.precision == "fp16" and cfg.training.fp16_settings["hysteresis"] == 2
    said = " ".join(r.getMessage() for r in caplog.records)
    for key in ("USE_GENERATE_LOCAL_WIN_SIZES_wrt_LAYERS", "RECOMPILE_SEP_ATTN_KERNEL"):
        assert f"{key}=" in said and "accepted with no effect" in said


@pytest.mark.parametrize(
    ("key", "value", "feature"),
    [
        ("sliding_window_width", 4096, "sliding-window attention"),
        ("moe_num_experts", 8, "mixture of experts"),
        ("te_mha", True, "TransformerEngine"),
        ("use_bnb_optimizer", True, "bitsandbytes"),
        ("use_comet", True, "Comet"),
        ("profile", True, "profiling"),
        ("sparsity_config", {"block": 16}, "sparse attention"),
        ("mamba_selective_scan_fusion", True, "Mamba"),
        ("attention_config", [[["mamba"], 2]], "Mamba layers"),
        ("attention_config", [[["local", "global"], "all"]], "sparse attention"),
        ("attention_config", [[["rwkv"], 2]], "RWKV"),
        ("attention_config", [[["gmlp"], 2]], "gMLP"),
    ],
)
def test_unbuilt_features_are_refused_by_name(key: str, value: Any, feature: str) -> None:
    with pytest.raises(ConfigError, match=feature) as err:
        load_config([], {**MINIMAL_CONFIG, key: value})
    assert key in str(err.value)


@pytest.mark.parametrize(
    ("key", "value", "match"),
    [
        ("data_impl", "lazy", "only memory-mapped"),
        ("checkpoint_num_layers", 2, "per-block recomputation"),
        ("output_layer_parallelism", "row", "column-parallel"),
        ("distributed_backend", "mpi", "nccl on GPU"),
        ("checkpoint_validation_with_forward_pass", True, "not built"),
        ("bias_gelu_fusion", "yes", "true or false"),
        ("fp16", {"enabled": True, "loss_scael": 0}, "loss_scael"),
        ("fp16", {"enabled": "false"}, "fp16.enabled must be true or false"),
        ("attention_config", [[["flash"], "two"]], "integers or 'all'"),
        ("bias_gelu_fusoin", True, "did you mean 'bias_gelu_fusion'"),
        ("RECOMPILE_SEP_ATTN_KERNEL", "no", "true or false"),
    ],
)
def test_values_and_typos_are_still_checked(key: str, value: Any, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        load_config([], {**MINIMAL_CONFIG, key: value})


def test_neox_llama_intermediate_size_is_neox_s() -> None:
    """NeoX (megatron/model/transformer.py ParallelMLP): gated widths are int(I*2/3)//2
    rounded up to mlp_multiple_of; NeoX's Llama configs write I = 3x the real width."""
    for hidden, inter, width in ((4096, 32768, 11008), (5120, 41472, 13824), (8192, 86016, 28672)):
        m = ModelConfig(
            hidden_size=hidden, intermediate_size=inter, mlp_multiple_of=256, activation="swiglu"
        )
        assert m.ffn_size == width
    cfg = load([LLAMA])
    m = cfg.model
    k = m.mlp_multiple_of
    width = k * math.ceil((int(m.intermediate_size * 2 / 3) // 2) / k)
    assert m.ffn_size == width == 192
    mlp = build_mlp(m.activation, m.hidden_size, m.ffn_size, m.use_bias_in_mlp)
    widths = {tuple(p.shape) for p in mlp.parameters()}
    assert (width, m.hidden_size) in widths and (m.hidden_size, width) in widths
    # Our own meaning is unchanged without mlp_multiple_of (configs/tiny_llama.yml).
    assert ModelConfig(hidden_size=256, intermediate_size=688, activation="swiglu").ffn_size == 688
    gelu = load_config([], {**MINIMAL_CONFIG, "intermediate_size": 96, "mlp_multiple_of": 32})
    with pytest.raises(ConfigError, match="use a multiple of 64"):
        validate(gelu)  # NeoX would build a 128-wide first and a 96-wide second linear


def test_neox_llama_schedule_attention_and_deepspeed_blocks() -> None:
    cfg = load([LLAMA])
    assert (cfg.model.attention_type, cfg.model.kv_heads) == ("groupedquery", 2)
    assert cfg.training.precision == "bfloat16" and cfg.schedule.override_lr_scheduler
    finalize(cfg, world_size=1, vocab_size=1000)
    ds = deepspeed_config(cfg)
    assert ds["data_types"] == {"grad_accum_dtype": "fp32"}
    assert ds["comms_logger"] == {"enabled": False}
    # warmup_iters: 2 steps of warmup; decay_lr_to: the floor is 0.1 x lr.
    o, s, n = cfg.optimizer, cfg.schedule, cfg.training.train_iters
    assert lr_at(0, o, s, n) == pytest.approx(o.lr / 2) and lr_at(1, o, s, n) == o.lr
    assert lr_at(n, o, s, n) == pytest.approx(0.1 * o.lr)
    mid = 0.1 * o.lr + 0.5 * (1 + math.cos(math.pi * 9 / 18)) * 0.9 * o.lr
    assert lr_at(11, o, s, n) == pytest.approx(mid)
    for bad, match in (
        ({"attention_type": "multihead"}, "use attention_type groupedquery"),
        ({"num_kv_heads": None}, "needs num_kv_heads"),
        ({"min_lr": 1e-5}, "keep one"),
    ):
        with pytest.raises(ConfigError, match=match):
            load([LLAMA], **bad)


def test_deepspeed_slurm_is_the_slurm_launcher() -> None:
    assert load_config([], {**MINIMAL_CONFIG, "deepspeed_slurm": True}).launcher.launcher == "slurm"
    assert load_config([], {**MINIMAL_CONFIG, "deepspeed_slurm": False}).launcher.launcher == "pdsh"
    with pytest.raises(ConfigError, match="set twice"):
        load_config([], {**MINIMAL_CONFIG, "deepspeed_slurm": True, "launcher": "pdsh"})


def test_deepspeed_blocks_join_across_files(tmp_path: Path) -> None:
    a, b = tmp_path / "a.yml", tmp_path / "b.yml"
    a.write_text(yaml.safe_dump({**MINIMAL_CONFIG, "data_types": {"grad_accum_dtype": "fp32"}}))
    b.write_text(yaml.safe_dump({"deepspeed_extra": {"wall_clock_breakdown": False}}))
    cfg = load_config([a, b])
    assert cfg.training.deepspeed_extra == {
        "data_types": {"grad_accum_dtype": "fp32"},
        "wall_clock_breakdown": False,
    }
    b.write_text(yaml.safe_dump({"deepspeed_extra": {"data_types": {"grad_accum_dtype": "bf16"}}}))
    with pytest.raises(ConfigError, match="defined twice"):
        load_config([a, b])


def test_override_applies_the_config_s_hyperparameters() -> None:
    """What a resume with override_lr_scheduler does to the restored optimizer: the new lr
    schedule, betas, eps and weight decay (biases keep no decay)."""
    model = torch.nn.Linear(4, 4)
    old_opt, old_sched = OptimizerConfig(lr=1e-3, weight_decay=0.1), ScheduleConfig(warmup=0.0)
    groups = [
        {"params": [model.weight], "weight_decay": old_opt.weight_decay},
        {"params": [model.bias], "weight_decay": 0.0},
    ]
    optimizer = torch.optim.AdamW(groups, lr=old_opt.lr, betas=(0.9, 0.95))
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_at(step, old_opt, old_sched, 10) / old_opt.lr
    )
    for _ in range(4):
        optimizer.step()
        scheduler.step()
    new_opt = OptimizerConfig(lr=5e-4, adam_beta2=0.99, adam_eps=1e-6, weight_decay=0.01)
    new_sched = ScheduleConfig(warmup=0.0, min_lr=1e-5, lr_decay_style="linear")
    lr = apply_config_hyperparameters(scheduler, new_opt, new_sched, 10)
    assert lr == pytest.approx(1e-5 + (1 - 4 / 10) * (5e-4 - 1e-5))
    decay, no_decay = optimizer.param_groups
    assert (decay["lr"], decay["betas"], decay["eps"]) == (lr, (0.9, 0.99), 1e-6)
    assert (decay["weight_decay"], no_decay["weight_decay"]) == (0.01, 0.0)
    assert scheduler.get_last_lr() == [lr, lr]
