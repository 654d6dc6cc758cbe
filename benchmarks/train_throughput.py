"""Training tokens/s of our trainer vs the same architecture in transformers + a plain loop.

Both sides train the model of a config (default configs/tiny.yml) on the same batches, with
the same micro batch, sequence length, precision and optimizer settings, in one process. Ours
runs through the real Trainer (DeepSpeed engine, data loader, loss masking, grad-norm); the
baseline is GPTNeoXForCausalLM / LlamaForCausalLM with torch.optim.AdamW. Rounds alternate
between the two so machine noise hits both; the median round is reported.

    python benchmarks/train_throughput.py [configs/tiny.yml] [--steps 20] [--rounds 3]
"""

from __future__ import annotations

import argparse
import logging
import statistics
import time

import torch
import torch.nn.functional as F
from transformers import GPTNeoXForCausalLM, LlamaForCausalLM

from megatron.config.loader import load_config
from megatron.data.bundled import prepare_bundled_data
from megatron.hf.adapters import family, hf_config
from megatron.training.distributed import init_distributed
from megatron.training.optimizer import param_groups
from megatron.training.run import build_run
from megatron.training.trainer import Trainer


def build_trainer(paths: list[str], steps: int) -> Trainer:
    cfg = load_config(
        paths,
        overrides={
            "save": None,
            "load": None,
            "eval_interval": 0,
            "train_iters": 10 * steps,
            "use_wandb": False,
        },
    )
    prepare_bundled_data(cfg)
    rank, world, device = init_distributed(cfg.launcher)
    return build_run(cfg, rank, world, device).trainer


def time_ours(trainer: Trainer, batches, steps: int) -> float:
    start = time.perf_counter()
    for _ in range(steps):
        trainer.steps.train_step(batches)
    return time.perf_counter() - start


def time_hf(model, opt, batches, steps: int, accum: int, clip: float, dtype) -> float:
    start = time.perf_counter()
    for _ in range(steps):
        for _ in range(accum):
            tokens = next(batches)
            with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
                logits = model(tokens[:, :-1]).logits
            loss = F.cross_entropy(logits.float().flatten(0, 1), tokens[:, 1:].flatten())
            (loss / accum).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
    return time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("configs", nargs="*", default=["configs/tiny.yml"])
    p.add_argument("--steps", type=int, default=20, help="optimizer steps per round")
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING)
    trainer = build_trainer(args.configs, args.steps)
    cfg = trainer.cfg
    cls = LlamaForCausalLM if family(cfg.model) == "llama" else GPTNeoXForCausalLM
    hf = cls(hf_config(cfg.model, cfg.derived.padded_vocab_size))
    hf.config._attn_implementation = "sdpa"
    hf.train()
    # What a plain loop writes: torch's AdamW with its defaults, same groups and hyperparameters.
    o = cfg.optimizer
    opt = torch.optim.AdamW(
        param_groups(hf, o.weight_decay),
        lr=o.lr,
        betas=(o.adam_beta1, o.adam_beta2),
        eps=o.adam_eps,
    )
    dtype = torch.bfloat16 if cfg.training.precision == "bfloat16" else torch.float32
    ours_batches = trainer._batches(trainer.data.train, 0)
    hf_batches = trainer._batches(trainer.data.train, 0)
    accum, clip = cfg.derived.grad_accum, cfg.optimizer.gradient_clipping
    time_ours(trainer, ours_batches, 2)  # warm-up both
    time_hf(hf, opt, hf_batches, 2, accum, clip, dtype)
    ours_t, hf_t = [], []
    for r in range(args.rounds):  # alternate which side goes first: drift hits both alike
        if r % 2:
            hf_t.append(time_hf(hf, opt, hf_batches, args.steps, accum, clip, dtype))
        ours_t.append(time_ours(trainer, ours_batches, args.steps))
        if not r % 2:
            hf_t.append(time_hf(hf, opt, hf_batches, args.steps, accum, clip, dtype))
    tokens = args.steps * cfg.derived.global_batch * cfg.model.seq_length
    ours_tps, hf_tps = tokens / statistics.median(ours_t), tokens / statistics.median(hf_t)
    n_params = sum(p.numel() for p in trainer.engine.module.parameters())
    print(
        f"model: {family(cfg.model)} {n_params / 1e6:.2f}M params, seq {cfg.model.seq_length}, "
        f"batch {cfg.derived.global_batch}, {cfg.training.precision}, "
        f"threads {torch.get_num_threads()}"
    )
    print(f"{'trainer':<34}{'tokens/s':>12}{'ms/step':>10}")
    print(
        f"{'ours (DeepSpeed engine + Trainer)':<34}{ours_tps:>12,.0f}"
        f"{1000 * statistics.median(ours_t) / args.steps:>10.1f}"
    )
    print(
        f"{'transformers + plain PyTorch loop':<34}{hf_tps:>12,.0f}"
        f"{1000 * statistics.median(hf_t) / args.steps:>10.1f}"
    )
    print(f"ratio ours / transformers: {ours_tps / hf_tps:.3f}x")


if __name__ == "__main__":
    main()
