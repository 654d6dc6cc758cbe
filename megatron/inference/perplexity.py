"""Streaming perplexity: feed a token stream through a model with a persistent cache and
score the next token at every position (the StreamingLLM / Streaming-SepLLM protocol), in
chunks cut at the cache's room so chunked and token-by-token streaming give the same NLL.

`stream_nll` returns per-token NLL and measured statistics; `write_outputs` writes
summary.json, nll.txt (one value per line), ppl_checkpoints.json (perplexity of the first N
tokens at N = 1k, 2k, 4k, ... and the end) and ppl.png, each atomically.
"""

from __future__ import annotations

import json
import math
import os
import resource
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from tqdm import tqdm

from megatron.common.files import atomic_path, atomic_write_text
from megatron.inference.decode import chunks
from megatron.inference.loading import Streamer


@dataclass
class StreamResult:
    nll: list[float] = field(default_factory=list)
    seconds: float = 0.0
    cache: dict[str, Any] = field(default_factory=dict)  # the last sample's cache summary
    peak_length: int = 0
    peak_attended: int = 0
    mean_length: float = 0.0
    kept_kv_ratio: float = 1.0


def peak_memory_bytes(device: torch.device) -> int:
    """Measured peak: CUDA allocator peak on GPUs, the process's peak RSS on CPU."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # Linux: KiB


LINE = "[stream] {n_fmt}/{total_fmt} tokens | {rate_fmt} | elapsed {elapsed}, ETA {remaining}"


class Progress:
    """Scored tokens, the running perplexity (all tokens so far), tokens/s and the ETA: a tqdm
    bar when stderr is a terminal, else the same line (tqdm's format) every `every` tokens."""

    def __init__(self, total: int | None, every: int = 1000) -> None:
        self.done, self.every, self.total, self.nll_sum = 0, every, total, 0.0
        self.start = time.perf_counter()
        self.bar = tqdm(total=total, unit="tok") if sys.stderr.isatty() else None

    def update(self, n: int, nll_sum: float) -> None:
        before, self.done = self.done, self.done + n
        self.nll_sum += nll_sum
        ppl = f"{math.exp(min(self.nll_sum / self.done, 700.0)):.2f}"
        if self.bar is not None:
            self.bar.update(n)
            self.bar.set_postfix(ppl=ppl)
        elif before // self.every != self.done // self.every:
            elapsed = time.perf_counter() - self.start
            fmt = LINE if self.total else LINE.split(", ETA")[0]  # no total, no ETA
            line = tqdm.format_meter(self.done, self.total, elapsed, unit="tok", bar_format=fmt)
            print(f"{line}, running ppl {ppl}", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _stream_one(
    streamer: Streamer, cache: Any, ids: torch.Tensor, chunk: int, progress: Progress
) -> list[float]:
    """NLL of ids[1:] given the prefix, streamed through `cache`; ids [T]."""
    stream = streamer.stream_of(cache)
    out: list[float] = []
    for start, end in chunks(stream, len(ids) - 1, chunk):
        logits = streamer.step(cache, ids[None, start:end])[0]  # [n, V]
        nll = F.cross_entropy(logits.float(), ids[start + 1 : end + 1], reduction="none")
        step_nll = nll.tolist()  # the one device sync of the step
        out += step_nll
        progress.update(end - start, sum(step_nll))
    return out


def stream_nll(
    streamer: Streamer,
    samples: Sequence[torch.Tensor],  # token ids [T] per sample
    make_cache: Any,  # () -> a fresh cache (one per sample)
    chunk_size: int,
    num_eval_tokens: int | None = None,
) -> StreamResult:
    result = StreamResult()
    progress = Progress(num_eval_tokens)
    lengths: list[float] = []
    ratios: list[float] = []
    start = time.perf_counter()
    for ids in samples:
        if num_eval_tokens is not None:
            ids = ids[: num_eval_tokens - len(result.nll) + 1]
        if len(ids) < 2:
            continue
        cache = make_cache()
        result.nll += _stream_one(streamer, cache, ids, chunk_size, progress)
        summary = streamer.stream_of(cache).summary()
        result.cache = summary
        result.peak_length = max(result.peak_length, max(summary["peak_length"]))
        result.peak_attended = max(result.peak_attended, max(summary["peak_attended"]))
        lengths.append(sum(summary["mean_length"]) / len(summary["mean_length"]))
        ratios.append(float(summary["kept_kv_ratio"]))
        if num_eval_tokens is not None and len(result.nll) >= num_eval_tokens:
            break
    progress.close()
    result.seconds = time.perf_counter() - start
    result.mean_length = sum(lengths) / len(lengths) if lengths else 0.0
    result.kept_kv_ratio = sum(ratios) / len(ratios) if ratios else 1.0
    return result


def ppl_checkpoints(nll: Sequence[float]) -> dict[str, float]:
    """Perplexity of the first N tokens, N = 1000 * 2^k, and of all."""
    out: dict[str, float] = {}
    total, n, mark = 0.0, 0, 1000
    for value in nll:
        total, n = total + value, n + 1
        if n == mark:
            out[str(n)] = math.exp(total / n)
            mark *= 2
    if n:
        out[str(n)] = math.exp(total / n)
    return out


def _running_ppl(nll: Sequence[float], points: int = 400) -> tuple[list[int], list[float]]:
    step = max(1, len(nll) // points)
    xs, ys, total = [], [], 0.0
    for i, value in enumerate(nll, 1):
        total += value
        if i % step == 0 or i == len(nll):
            xs.append(i)
            ys.append(math.exp(total / i))
    return xs, ys


def plot_ppl(nll: Sequence[float], path: str, title: str) -> None:
    """ppl of the first N tokens vs N as a PNG (matplotlib if installed, else drawn with PIL)."""
    xs, ys = _running_ppl(nll)
    try:
        import matplotlib  # optional heavy dependency

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        _plot_pil(xs, ys, path, title)
        return
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(xs, ys)
    ax.set(xlabel="tokens streamed", ylabel="perplexity (running)", title=title)
    with atomic_path(path, ".png") as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)


def _plot_pil(xs: list[int], ys: list[float], path: str, title: str) -> None:
    from PIL import Image, ImageDraw

    w, h, m = 700, 400, 50
    img = Image.new("RGB", (w, h), "white")
    draw = ImageDraw.Draw(img)
    draw.rectangle([m, m, w - m, h - m], outline="black")
    lo, hi = min(ys), max(ys)
    span = (hi - lo) or 1.0
    pts = [
        (
            m + (w - 2 * m) * (x - xs[0]) / max(xs[-1] - xs[0], 1),
            h - m - (h - 2 * m) * (y - lo) / span,
        )
        for x, y in zip(xs, ys, strict=True)
    ]
    if len(pts) > 1:
        draw.line(pts, fill="blue", width=2)
    draw.text((m, 10), f"{title}: running perplexity vs tokens", fill="black")
    draw.text((m, h - m + 10), f"0 .. {xs[-1]} tokens", fill="black")
    draw.text((5, m - 15), f"{hi:.2f}", fill="black")
    draw.text((5, h - m), f"{lo:.2f}", fill="black")
    with atomic_path(path, ".png") as tmp:
        img.save(tmp, format="PNG")


OUTPUT_NAMES = ("summary.json", "nll.txt", "ppl_checkpoints.json", "ppl.png")


def check_output_dir(out_dir: str, overwrite: bool) -> None:
    """Before any work: `out_dir` must be a writable directory (created if missing) and must
    not hold an earlier run's results unless `overwrite` (they would be replaced silently, and
    an old ppl.png left beside new numbers)."""
    try:
        os.makedirs(out_dir, exist_ok=True)
        probe = os.path.join(out_dir, f".probe-{os.getpid()}")
        with open(probe, "wb"):
            pass
        os.remove(probe)
    except OSError as e:
        raise ValueError(f"--output_dir {out_dir}: cannot write there ({e.strerror})") from None
    old = [n for n in OUTPUT_NAMES if os.path.lexists(os.path.join(out_dir, n))]
    if old and not overwrite:
        raise ValueError(
            f"--output_dir {out_dir} already holds results of an earlier run ({', '.join(old)}); "
            "give another --output_dir or pass --overwrite to replace them"
        )


def check_scored(result: StreamResult, num_eval_tokens: int | None, source: str) -> None:
    """A perplexity needs at least one scored token; fewer than asked for is said."""
    if not result.nll:
        raise ValueError(
            f"{source}: no token to score (every sample is shorter than 2 tokens); a perplexity "
            "needs a text of at least 2 tokens"
        )
    if num_eval_tokens is not None and len(result.nll) < num_eval_tokens:
        print(
            f"warning: --num_eval_tokens {num_eval_tokens} but {source} holds only "
            f"{len(result.nll)} tokens to score (after its first token): scored those",
            file=sys.stderr,
            flush=True,
        )


def write_outputs(
    out_dir: str, result: StreamResult, options: dict[str, Any], device: torch.device
) -> dict:
    os.makedirs(out_dir, exist_ok=True)
    n = len(result.nll)
    ppl = math.exp(sum(result.nll) / n) if n else float("nan")
    summary = {
        "ppl": ppl,
        "num_tokens": n,
        "peak_cache_length": result.peak_length,
        "peak_attended_keys": result.peak_attended,
        "mean_cache_length": result.mean_length,
        "kept_kv_ratio": result.kept_kv_ratio,
        "tokens_per_s": n / result.seconds if result.seconds else 0.0,
        "seconds": result.seconds,
        "peak_memory_bytes": peak_memory_bytes(device),
        "cache": result.cache,
        "options": options,
    }
    atomic_write_text(os.path.join(out_dir, "summary.json"), json.dumps(summary, indent=2) + "\n")
    atomic_write_text(os.path.join(out_dir, "nll.txt"), "".join(f"{v:.6f}\n" for v in result.nll))
    checkpoints = json.dumps(ppl_checkpoints(result.nll), indent=2) + "\n"
    atomic_write_text(os.path.join(out_dir, "ppl_checkpoints.json"), checkpoints)
    plot = os.path.join(out_dir, "ppl.png")
    if n:
        plot_ppl(result.nll, plot, options.get("cache", "stream"))
    elif os.path.lexists(plot):
        os.remove(plot)  # never an earlier run's plot beside these numbers
    return summary
