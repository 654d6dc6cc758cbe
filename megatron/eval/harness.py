"""One lm-evaluation-harness run over our checkpoints or transformers folders, offline.

`model_spec(path)` picks the backend: our checkpoint -> `sepneox` (megatron/eval/lm.py);
a transformers folder -> lm-eval's own `hf` backend with `pretrained=<dir>` (and
`attn_implementation=sepllm` when its config.json describes a SepLLM / StreamingLLM kept
set, so the twin runs the attention it was trained with). `evaluate` runs simple_evaluate
with the local tasks of megatron/eval/tasks (and any --include_path), never the hub.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from megatron.checkpoint import ReadOptions
from megatron.checkpoint.layout import is_checkpoint
from megatron.common.files import atomic_write_text
from megatron.eval.lambada import DATA_FILE, resolved_task_dir

# Offline before datasets / transformers are imported: local files only, no hub look-ups.
for _var in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
    os.environ.setdefault(_var, "1")


def model_spec(
    path: str,
    options: ReadOptions = ReadOptions(),  # noqa: B008  (frozen)
) -> tuple[str, dict[str, Any]]:
    """(lm-eval model name, model_args) for one of our checkpoints (read by the sepneox
    adapter with `options`) or an HF folder (checked strictly here, before lm-eval's `hf`
    backend, which would fill a missing tensor with random values)."""
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"model path {path!r} does not exist")
    if is_checkpoint(p):
        return "sepneox", {"path": str(p), **dataclasses.asdict(options)}
    config = p / "config.json"
    if config.is_file():
        from megatron.hf.folder import open_hf_folder

        open_hf_folder(p)
        args: dict[str, Any] = {"pretrained": str(p), "dtype": "float32"}
        sep = json.loads(config.read_text()).get("sepllm")
        if isinstance(sep, dict) and sep.get("mode", "full") != "full":
            args["attn_implementation"] = "sepllm"
        return "hf", args
    raise FileNotFoundError(
        f"{path!r} is neither one of our checkpoints (latest + global_stepN/) nor a "
        "transformers folder (config.json + weights)"
    )


def parse_model_args(text: str | None) -> dict[str, Any]:
    """'pretrained=x,dtype=float32' -> dict (lm-eval's --model_args syntax)."""
    out: dict[str, Any] = {}
    for part in (text or "").split(","):
        if part.strip():
            key, sep, value = part.partition("=")
            if not sep:
                raise ValueError(f"--model_args: expected key=value, got {part!r}")
            out[key.strip()] = value.strip()
    return out


def task_manager(tasks: list[str], include_paths: list[str], tmp: str) -> Any:
    """Only the local task directories when they hold every requested task (indexing
    lm-eval's ~10k built-in YAMLs costs seconds per call), else the built-in ones too."""
    from lm_eval.tasks import TaskManager

    if not DATA_FILE.is_file():
        raise FileNotFoundError(
            f"{DATA_FILE} is missing: python tools/eval/make_lambada_task.py builds it"
        )
    paths = [str(resolved_task_dir(Path(tmp) / "tasks")), *include_paths]
    manager = TaskManager(include_path=paths, include_defaults=False)
    if any(t not in manager.all_tasks for t in tasks):
        manager = TaskManager(include_path=paths)
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        raise ValueError(f"unknown task(s) {unknown}; local tasks: {local_task_names()}")
    return manager


def evaluate(
    model: str,
    model_args: dict[str, Any],
    tasks: list[str],
    num_fewshot: int | None = None,
    limit: float | None = None,
    batch_size: int = 1,
    device: str = "cpu",
    include_paths: list[str] | None = None,
    bootstrap_iters: int = 100000,
) -> dict[str, Any]:
    """simple_evaluate over `tasks`; returns lm-eval's results dict (without samples)."""
    # lm-eval imports its built-in backends (hf, ...) lazily, only while its registry is
    # empty: registering sepneox first would skip that, so import them explicitly.
    import lm_eval
    import lm_eval.models  # noqa: F401

    import megatron.eval.lm  # noqa: F401  registers the "sepneox" model
    import megatron.hf.sepllm_attention  # noqa: F401  registers attn_implementation="sepllm"

    if model == "hf" and model_args.get("attn_implementation") == "sepllm":
        model_args = _sepllm_instance(model_args)
    with tempfile.TemporaryDirectory() as tmp, truncations_said_once():
        manager = task_manager(tasks, include_paths or [], tmp)
        results = lm_eval.simple_evaluate(
            model=model,
            model_args=model_args,
            tasks=tasks,
            num_fewshot=num_fewshot,
            limit=limit,
            batch_size=batch_size,
            device=device,
            task_manager=manager,
            log_samples=False,
            bootstrap_iters=bootstrap_iters,
        )
    if results is None:
        raise RuntimeError("lm_eval returned no results")
    return dict(results)


def _sepllm_instance(args: dict[str, Any]) -> dict[str, Any]:
    """lm-eval's hf backend given the loaded model: its SepLLM kept rule needs the token ids,
    which apply_sepllm(model) hands to attention (megatron/hf/sepllm_attention.py)."""
    import torch
    from transformers import AutoModelForCausalLM

    from megatron.hf.sepllm_attention import apply_sepllm

    path = args["pretrained"]
    model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True, dtype=torch.float32)
    apply_sepllm(model)
    rest = {k: v for k, v in args.items() if k not in ("attn_implementation", "dtype")}
    return {**rest, "pretrained": model.eval(), "tokenizer": path}


# lm-eval's hf backend warns once per request whose context and continuation exceed the
# model's window (78 times for 2-shot shakespeare_lambada at 128 tokens).
HF_LOGGER = "lm_eval.models.huggingface"
TRUNCATION_WARNING = "Combined length of context"


class _TruncationCounter(logging.Filter):
    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def filter(self, record: logging.LogRecord) -> bool:
        if record.getMessage().startswith(TRUNCATION_WARNING):
            self.count += 1
            return False
        return True


@contextlib.contextmanager
def truncations_said_once() -> Iterator[_TruncationCounter]:
    """lm-eval's per-request truncation warnings, counted and said once at the end."""
    counter = _TruncationCounter()
    logging.getLogger(HF_LOGGER).addFilter(counter)
    try:
        yield counter
    finally:
        logging.getLogger(HF_LOGGER).removeFilter(counter)
        if counter.count:
            print(
                f"note: {counter.count} requests were longer than the model's window; lm-eval "
                "kept the last max_length + 1 tokens of each (the context cut from the left)",
                file=sys.stderr,
            )


def local_task_names() -> list[str]:
    return sorted(p.stem for p in (Path(__file__).parent / "tasks").glob("*.yaml"))


def write_results(results: dict[str, Any], output_path: str) -> Path:
    """lm-eval's --output_path: a .json file, or a directory that gets results.json."""
    out = Path(output_path)
    if out.suffix != ".json":
        out = out / "results.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out, json.dumps(results, indent=2, default=str) + "\n")
    return out
