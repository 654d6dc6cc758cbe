"""Evaluate checkpoints with lm-evaluation-harness (pinned in requirements/requirements.txt),
on local tasks only (megatron/eval/tasks; nothing is downloaded).

    python eval.py --model_name_or_path checkpoints/tiny --tasks shakespeare_lambada
    python eval.py --model_name_or_path hf/tiny --tasks shakespeare_lambada --num_fewshot 2 \
        --output_path results/tiny
    python eval.py --model hf --model_args pretrained=hf/tiny,dtype=float32 --tasks ...
    python eval.py configs/tiny.yml --eval_tasks shakespeare_lambada           # NeoX style
    python deepy.py eval.py configs/tiny.yml --eval_tasks shakespeare_lambada  # same

--model_name_or_path picks the backend: one of our checkpoints -> the `sepneox` adapter
(megatron/eval/lm.py: our GPTModel with the kept set it trained with), a transformers folder
-> lm-eval's `hf` backend (with attn_implementation=sepllm for a SepLLM folder). NeoX style:
the YAMLs' `load` (else `save`) is the checkpoint and `eval_tasks` / `eval_num_fewshot` /
`eval_results_prefix` may sit in them; the command line wins. Local tasks:
shakespeare_lambada (last-word accuracy and perplexity on held-out passages) and
shakespeare_heldout_ppl (rolling perplexity of the same passages); --include_path adds
task YAML directories of your own.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Any

from megatron.checkpoint import READ_ERRORS, add_read_args, read_options
from megatron.common.accelerator import pin_cpu_accelerator
from megatron.config.loader import ConfigError, build_config, merge_sources, read_yaml

NEOX_KEYS = {"eval_tasks": "tasks", "eval_num_fewshot": "num_fewshot"}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("configs", nargs="*", help="NeoX style: model config YAMLs (their `load`)")
    p.add_argument("-d", "--conf_dir", default="", help="directory the YAML names are in")
    p.add_argument("--model_name_or_path", default=None, help="our checkpoint or an HF folder")
    p.add_argument("--model", default=None, help="lm-eval model name (sepneox, hf, ...)")
    p.add_argument("--model_args", default=None, help="lm-eval model_args, k=v,k=v")
    p.add_argument("--tasks", "--eval_tasks", nargs="+", default=None, dest="tasks")
    p.add_argument("--num_fewshot", "--eval_num_fewshot", type=int, default=None)
    p.add_argument("--output_path", "--eval_results_prefix", default=None)
    p.add_argument("--limit", type=float, default=None, help="documents per task (or fraction)")
    p.add_argument("--batch_size", type=int, default=1)
    p.add_argument("--device", default="cpu")
    p.add_argument("--bootstrap_iters", type=int, default=100000, help="0 = no stderr")
    p.add_argument("--include_path", nargs="*", default=[], help="more task YAML directories")
    add_read_args(p)
    return p.parse_args(argv)


def _yaml_settings(paths: list[str]) -> tuple[dict[str, Any], str | None]:
    """NeoX eval keys of the YAMLs, and the checkpoint their model config names."""
    evals: dict[str, Any] = {}
    rest = []
    for path in paths:
        raw = read_yaml(path)
        for key in list(raw):
            name = str(key).replace("-", "_")
            if name in NEOX_KEYS or name == "eval_results_prefix":
                evals[NEOX_KEYS.get(name, "output_path")] = raw.pop(key)
        rest.append((path, raw))
    if not rest:
        return evals, None
    cfg = build_config(merge_sources(rest))
    return evals, cfg.checkpoint.load or cfg.checkpoint.save


def settings(argv: list[str] | None) -> argparse.Namespace:
    """Command line over YAML; every check before lm-eval or a model is loaded."""
    from megatron.eval.harness import local_task_names, model_spec, parse_model_args

    args = parse_args(argv)
    evals, ckpt = _yaml_settings([os.path.join(args.conf_dir, c) for c in args.configs])
    for key, value in evals.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if isinstance(args.tasks, str):
        args.tasks = [t for t in args.tasks.replace(",", " ").split() if t]
    if not args.tasks:
        raise ValueError(f"no tasks: pass --tasks (local tasks: {', '.join(local_task_names())})")
    if args.num_fewshot is not None and not (
        isinstance(args.num_fewshot, int) and args.num_fewshot >= 0
    ):
        raise ValueError(f"num_fewshot must be an integer >= 0, got {args.num_fewshot!r}")
    args.tasks = [t for item in args.tasks for t in item.split(",") if t]
    if args.model is not None:
        args.model_args = parse_model_args(args.model_args)
        return args
    path = args.model_name_or_path or ckpt
    if not path:
        raise ValueError("no model: pass --model_name_or_path, --model, or a config with `load`")
    extra = parse_model_args(args.model_args)  # e.g. max_length=256 on top of the detected ones
    args.model, args.model_args = model_spec(path, read_options(args))
    args.model_args.update(extra)
    return args


def show(results: dict[str, Any]) -> None:
    from lm_eval.utils import make_table

    print(make_table(results))


def main(argv: list[str] | None = None) -> dict[str, Any]:
    from megatron.eval.harness import evaluate, write_results

    args = settings(argv)
    t0 = time.perf_counter()
    results = evaluate(
        args.model,
        args.model_args,
        args.tasks,
        num_fewshot=args.num_fewshot,
        limit=args.limit,
        batch_size=args.batch_size,
        device=args.device,
        include_paths=args.include_path,
        bootstrap_iters=args.bootstrap_iters,
    )
    results["eval_seconds"] = time.perf_counter() - t0
    show(results)
    if args.output_path:
        print(f"results -> {write_results(results, args.output_path)}")
    return results


if __name__ == "__main__":
    pin_cpu_accelerator()  # DeepSpeed's CPU fallback without its "If you have GPU" warning
    try:
        main()
    except (ValueError, FileNotFoundError, ConfigError, RuntimeError, *READ_ERRORS) as e:
        print(f"eval.py: {e}", file=sys.stderr)
        sys.exit(2)
