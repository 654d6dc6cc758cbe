"""Measurements of the SepLLM study (tools/experiments/run_study.py): validation perplexity
at the training length, what the trainer logged (density, KV ratio, ms per iteration,
losses), training-free kept rules on the vanilla model, and streaming perplexity with a
record of the cache length after every step.

Validation windows: seq_length + 1 tokens cut back to back from the held-out documents of
the run's `split` (the validation documents; the trainer never trains on them), the same
windows for every model, scored on all seq_length positions.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
import yaml

from megatron.checkpoint import open_checkpoint
from megatron.common.files import atomic_write_text
from megatron.config.loader import config_to_dict
from megatron.config.schema import SepLLMConfig
from megatron.data.builder import split_boundaries
from megatron.data.indexed_dataset import MMapIndexedDataset
from megatron.inference.caches import make_policies
from megatron.inference.decode import chunks
from megatron.inference.loading import Streamer, load_model
from megatron.inference.perplexity import StreamResult, write_outputs

VALID_WINDOWS = {False: 24, True: 2}  # full study / smoke: windows of seq_length + 1 tokens
CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "experiments"
STREAM_FACTOR = {False: 8, True: 2}  # held-out stream: 8 x seq_length tokens (smoke: 2 x)
# Streams go in fixed chunks, compressed after each (decode.chunks(exact=False), the fast
# prefill of docs/streaming.md): token by token, a full sink cache has room for one token
# per forward, which on the shared 2-core CPU ran at 6-8 tokens/s. Every cache then holds up
# to c + STREAM_CHUNK keys while a chunk is scored, the same for all caches.
STREAM_CHUNK = 32


def saved_config(save: Path) -> dict[str, Any]:
    """The run's resolved config (its `latest` checkpoint, verified) as nested sections."""
    return config_to_dict(open_checkpoint(save).cfg)


def heldout_tokens(save: Path) -> torch.Tensor:
    """Token ids of the run's validation documents, concatenated in order (long [N])."""
    cfg = saved_config(save)
    data = cfg["data"]
    ds = MMapIndexedDataset(str(data["data_path"]))
    _, train_end, valid_end, _ = split_boundaries(str(data["split"]), len(ds))
    if valid_end <= train_end:
        raise ValueError(f"split {data['split']!r} leaves no validation documents")
    docs = [torch.from_numpy(ds[i].astype("int64")) for i in range(train_end, valid_end)]
    return torch.cat(docs)


def valid_windows(save: Path, smoke: bool) -> torch.Tensor:
    seq = int(saved_config(save)["model"]["seq_length"])
    tokens = heldout_tokens(save)
    n = min(VALID_WINDOWS[smoke], len(tokens) // (seq + 1))
    return tokens[: n * (seq + 1)].view(n, seq + 1)


@torch.no_grad()
def mean_nll(forward: Any, windows: torch.Tensor, batch: int = 4) -> float:
    """Mean next-token NLL of `forward(ids [B, S]) -> logits [B, S, V]` over the windows."""
    total, count = 0.0, 0
    for i in range(0, len(windows), batch):
        w = windows[i : i + batch]
        logits = forward(w[:, :-1]).float()
        nll = F.cross_entropy(logits.flatten(0, 1), w[:, 1:].flatten(), reduction="sum")
        total, count = total + float(nll), count + w[:, 1:].numel()
    return total / count


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """The run's metrics.jsonl, one record per iteration (a resumed run appends: last wins)."""
    by_iter: dict[int, dict[str, Any]] = {}
    for line in path.read_text().splitlines():
        if line.strip():
            rec = json.loads(line)
            by_iter.setdefault(int(rec["iteration"]), {}).update(rec)
    return [by_iter[k] for k in sorted(by_iter)]


def training_log(save: Path) -> dict[str, Any]:
    """Loss curves, density / KV ratio and ms per iteration as the trainer logged them."""
    recs = read_metrics(save / "metrics.jsonl")
    train = [(r["iteration"], r["train/loss"]) for r in recs if "train/loss" in r]
    valid = [(r["iteration"], r["valid/loss"]) for r in recs if "valid/loss" in r]
    # Iteration 1 includes start-up work (first allocation, kernel plans): left out.
    ms = [r["train/ms_per_iter"] for r in recs if "train/ms_per_iter" in r and r["iteration"] > 1]
    dens = [r["sepllm/density/mean"] for r in recs if "sepllm/density/mean" in r]
    kv = [r["sepllm/kv_ratio/mean"] for r in recs if "sepllm/kv_ratio/mean" in r]
    return {
        "train_loss": train,
        "valid_loss": valid,
        "ms_per_iter": sorted(ms)[len(ms) // 2] if ms else float("nan"),  # median of windows
        # Full attention keeps every causal pair: density and KV ratio 1 by definition.
        "density": sum(dens) / len(dens) if dens else 1.0,
        "kv_ratio": sum(kv) / len(kv) if kv else 1.0,
        "stats_samples": len(dens),
    }


def hf_nll(folder: Path, windows: torch.Tensor, sepllm: dict[str, Any] | None) -> float:
    """The converted transformers twin on the same windows ("sepllm" attention for sparse
    runs, as docs/hf.md loads them; `sepllm` given = training-free apply_sepllm)."""
    from transformers import AutoModelForCausalLM

    import megatron.hf.sepllm_attention as sa

    model = AutoModelForCausalLM.from_pretrained(str(folder), local_files_only=True).eval()
    # training-free when `sepllm` is given, else the folder's sepllm entry (if any)
    sa.apply_sepllm(model, **(sepllm or {}))
    return mean_nll(lambda ids: model(input_ids=ids).logits, windows)


def measure_run(out: Path, name: str, save: Path, smoke: bool) -> dict[str, Any]:
    windows = valid_windows(save, smoke)
    t0 = time.perf_counter()
    streamer = load_model(str(save))
    ours = mean_nll(lambda ids: streamer.model(ids), windows)
    seconds = time.perf_counter() - t0
    result: dict[str, Any] = {
        "name": name,
        "valid_windows": int(windows.shape[0]),
        "seq_length": int(windows.shape[1] - 1),
        "valid_loss": ours,
        "valid_ppl": math.exp(ours),
        "valid_seconds": seconds,
        **training_log(save),
    }
    hf = out / "hf" / name
    if (hf / "config.json").is_file():
        twin = hf_nll(hf, windows, None)
        result.update(hf_valid_loss=twin, hf_valid_ppl=math.exp(twin))
    cfg = saved_config(save)
    result["params"] = sum(p.numel() for p in streamer.model.parameters())
    result["sepllm"] = cfg.get("sepllm", {})
    return result


def training_free(save: Path, out: Path, smoke: bool) -> dict[str, Any]:
    """Kept rules applied to the vanilla weights without training (paper's training-free
    setting): SepLLM(w), SepLLM(2w), StreamingLLM(w) at the training length, in our model and
    (SepLLM(w)) in its transformers twin through apply_sepllm."""
    windows = valid_windows(save, smoke)
    ref = load_model(str(save))
    sparse = yaml.safe_load((CONFIGS / "sepllm_w.yml").read_text())["sepllm"]
    seps, w = list(sparse["separator_token_ids"]), int(sparse["local_window"])
    rules = {
        "sepllm_w": SepLLMConfig(mode="sepllm", separator_token_ids=seps, local_window=w),
        "sepllm_2w": SepLLMConfig(mode="sepllm", separator_token_ids=seps, local_window=2 * w),
        "streamingllm_w": SepLLMConfig(mode="streamingllm", local_window=w),
    }
    result: dict[str, Any] = {"window": w, "separator_token_ids": seps}
    for key, rule in rules.items():
        model = _with_rule(ref, replace(rule, init_tokens=4, pad_token_id=1))
        nll = mean_nll(lambda ids, m=model: m(ids), windows)
        result[key] = {"valid_loss": nll, "valid_ppl": math.exp(nll)}
    hf = out / "hf" / "vanilla"
    if (hf / "config.json").is_file():
        apply = {"separator_ids": seps, "init_tokens": 4, "local_window": w, "pad_token_id": 1}
        nll = hf_nll(hf, windows, apply)
        result["sepllm_w"].update(hf_valid_loss=nll, hf_valid_ppl=math.exp(nll))
    return result


def _with_rule(streamer: Streamer, rule: SepLLMConfig) -> torch.nn.Module:
    """A copy of the model with `rule` as its kept set (same weights)."""
    from megatron.model.transformer import GPTModel

    src = streamer.model
    model = GPTModel(src.cfg, rule, streamer.vocab_size)
    model.load_state_dict(src.state_dict(), strict=True)
    return model.eval()


# --------------------------------------------------------------------------- streaming


@dataclass(frozen=True)
class StreamJob:
    model: str  # variant name
    cache: str  # sep | sink | full
    shift: bool
    init: int
    sep: int
    local: int
    capacity: int

    @property
    def key(self) -> str:
        tail = "" if self.shift or self.cache == "full" else "_noshift"
        tail += "_a0" if self.init == 0 and self.cache != "full" else ""
        return f"{self.model}__{self.cache}{tail}"


def cache_sizes(smoke: bool) -> dict[str, int]:
    """Equal budgets: SepCache a + s + w < c, the sink cache the same a and c."""
    if smoke:
        return {"init": 4, "sep": 8, "local": 16, "capacity": 48}
    return {"init": 4, "sep": 64, "local": 128, "capacity": 256}


def stream_jobs(smoke: bool) -> list[StreamJob]:
    z = cache_sizes(smoke)
    spec = [
        ("vanilla", "full", True),
        ("vanilla", "sink", True),
        ("vanilla", "sep", True),  # training-free SepCache
        ("vanilla", "sink", False),
        ("vanilla", "sep", False),
        ("streamingllm_w", "sink", True),
        ("streamingllm_w", "sep", True),
        ("sepllm_w", "sep", True),
        ("sepllm_w", "sink", True),
        ("sepllm_w", "sep", False),
        ("sepllm_w", "full", True),
        ("sepllm_2w", "sep", True),
        ("sepllm_ht", "sep", True),
    ]
    jobs = [StreamJob(m, c, s, **z) for m, c, s in spec]
    # Initial tokens matter: the same budgets with a = 0 (the first tokens can be evicted).
    jobs += [StreamJob("vanilla", "sink", True, **{**z, "init": 0})]
    jobs += [StreamJob("sepllm_w", "sep", True, **{**z, "init": 0})]
    return jobs


def heldout_stream(save: Path, smoke: bool) -> torch.Tensor:
    """The first STREAM_FACTOR x seq_length + 1 held-out tokens (validation documents)."""
    seq = int(saved_config(save)["model"]["seq_length"])
    tokens = heldout_tokens(save)
    n = STREAM_FACTOR[smoke] * seq + 1
    if len(tokens) < n:
        raise ValueError(f"the held-out documents hold {len(tokens)} tokens, fewer than {n}")
    return tokens[:n]


def run_stream(job: StreamJob, save: Path, ids: torch.Tensor, out_dir: Path) -> dict[str, Any]:
    """Stream `ids` through the job's cache; writes summary.json, nll.txt, ppl.png
    (megatron.inference.perplexity.write_outputs) and lengths.json (cache length after each
    step: [position, length of layer 0])."""
    streamer = load_model(str(save))
    policies = make_policies(
        job.cache, streamer.num_layers, job.init, job.sep, job.local, job.capacity
    )
    seps = streamer.default_separator_ids
    cache = streamer.new_cache(policies, seps, job.shift)
    stream = streamer.stream_of(cache)
    result, trace = StreamResult(), []
    start = time.perf_counter()
    with torch.no_grad():
        for lo, hi in chunks(stream, len(ids) - 1, STREAM_CHUNK, exact=False):
            logits = streamer.step(cache, ids[None, lo:hi])[0]
            nll = F.cross_entropy(logits.float(), ids[lo + 1 : hi + 1], reduction="none")
            result.nll += nll.tolist()
            trace.append([hi, int(stream.layer(0).row_lengths().max())])
    result.seconds = time.perf_counter() - start
    summary = stream.summary()
    result.cache = summary
    result.peak_length = max(summary["peak_length"])
    result.peak_attended = max(summary["peak_attended"])
    result.mean_length = sum(summary["mean_length"]) / len(summary["mean_length"])
    result.kept_kv_ratio = float(summary["kept_kv_ratio"])
    options = {**job.__dict__, "key": job.key, "separator_token_ids": seps}
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out_dir / "lengths.json", json.dumps(trace) + "\n")
    summary = write_outputs(str(out_dir), result, options, torch.device("cpu"))
    # result.json last: its presence marks the job done (run_study.py's resume check).
    atomic_write_text(out_dir / "result.json", json.dumps(summary, indent=1) + "\n")
    return summary
