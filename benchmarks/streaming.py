"""Streaming decode: per-token latency and peak memory after N tokens streamed, SepCache vs
sink cache vs full cache, for our model and the same weights as a transformers model; and our
streaming loop on the transformers model vs transformers' own `generate` (DynamicCache).

    python benchmarks/streaming.py [--sizes 1024 8192 32768 65536] [--device cpu]

Model: random weights, 4 layers, hidden 256, 4 heads, partial rotary 0.25, vocab 8192 (the
tiny.yml shape; weights do not change the timing). Stream: random ids, ~12% separators.
Caches: SepCache a=4, s=32, w=224, c=324 (the paper's PG19 setting), sink a=4, c=324, full.
Each (world, cache) runs in its own process, so its peak RSS is its own: the stream is
prefilled in chunks of 256 (compressing after each) and the cache copied at each size N;
then single-token decode steps are timed round-robin over the copies (so the shared
machine's changing load hits every size alike): median and minimum of `--decode` steps.
The full cache stops at --full_max (32k by default: its prefill is quadratic, 64k would take
about a quarter of an hour on this CPU).
`mem` is the process's peak RSS when the stream reached N (CUDA: allocator peak; it includes
the smaller sizes' copies, which matter only for the full cache) and `cache_mb` the bytes the
cache's tensors hold. Then transformers'
`generate` at an 8k context: per-token time = (t(8k prompt + M new) - t(8k prompt + 1)) /
(M - 1), against our loop's per-token time at 8k on the same model (SepCache and full).

`--generate`: transformers' own `model.generate(ids, past_key_values=cache)` after one
`apply_sepllm(model)`, SepCache (the sizes above) vs transformers' DynamicCache, on a tiny
Llama and a tiny Qwen2 built in code (4 layers, hidden 256, 4 heads, 2 key/value heads, vocab
8192; Qwen2 with its q/k/v biases) at --gen_sizes contexts (1k / 8k / 32k). Each (family,
cache, context) runs in its own process: the context is prefilled in chunks of 256 (the cache
compresses after each), then `generate` continues it for --gen_new tokens; per-token latency
is the median (and minimum) interval between consecutive new tokens, taken by a generate
`streamer`; `mem` the process's peak RSS, `cache_mb` what the cache's tensors hold at the end.

    python benchmarks/streaming.py --generate [--gen_sizes 1024 8192 32768]
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import subprocess
import sys
import time
from typing import Any

import torch

from megatron.config.schema import ModelConfig, SepLLMConfig
from megatron.hf.adapters import hf_config, to_hf
from megatron.inference.caches import StreamCache, make_policies
from megatron.inference.decode import chunks, forward_step, model_rotary
from megatron.inference.perplexity import peak_memory_bytes
from megatron.model.transformer import GPTModel

VOCAB = 8192
SEPS = list(range(10, 20))
SPEC = dict(
    num_layers=4,
    hidden_size=256,
    num_attention_heads=4,
    seq_length=2048,
    rotary_pct=0.25,
    gpt_j_residual=True,
)
SIZES = {"sep": (4, 32, 224, 324), "sink": (4, 0, 0, 324), "full": (4, 0, 0, 0)}
PREFILL_CHUNK = 256


def build(world: str, device: torch.device) -> torch.nn.Module:
    torch.manual_seed(0)
    m = ModelConfig(**SPEC)
    ours = GPTModel(m, SepLLMConfig(), VOCAB).eval()
    if world == "ours":
        return ours.to(device)
    from transformers import GPTNeoXForCausalLM

    from megatron.hf.sepllm_attention import apply_sepllm

    hf = GPTNeoXForCausalLM(hf_config(m, VOCAB)).eval()
    hf.load_state_dict(to_hf(ours.state_dict(), m), strict=False)
    apply_sepllm(hf)  # hands the streaming caches their ids
    return hf.to(device)


def stream_ids(n: int, device: torch.device) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(20, VOCAB, (1, n), generator=g)
    mask = torch.rand(1, n, generator=g) < 0.12
    ids[mask] = torch.randint(10, 20, (int(mask.sum()),), generator=g)
    return ids.to(device)


def new_cache(world: str, model: torch.nn.Module, kind: str) -> Any:
    a, s, w, c = SIZES[kind]
    policies = make_policies("sep" if kind == "sep" else kind, SPEC["num_layers"], a, s, w, c)
    if world == "ours":
        return StreamCache(policies, SEPS, True, model_rotary(model))
    from megatron.inference.hf_cache import StreamingCache, hf_rotary

    return StreamingCache(StreamCache(policies, SEPS, True, hf_rotary(model)))


def step_fn(world: str, model: torch.nn.Module) -> Any:
    if world == "ours":
        return lambda cache, ids: forward_step(model, cache, ids)
    from megatron.inference.hf_cache import hf_step

    return lambda cache, ids: hf_step(model, cache, ids)


def cache_bytes(stream: StreamCache) -> int:
    return sum(
        lay.keys.numel() * lay.keys.element_size() * 2
        for lay in stream.layers
        if lay.keys is not None
    )


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_one(
    world: str, kind: str, sizes: list[int], decode: int, device: torch.device
) -> list[dict]:
    """Stream up to max(sizes), snapshotting the cache at each size; then time decode steps
    round-robin over the snapshots, so a change in the shared machine's load hits every size
    alike (one process per world and cache)."""
    model = build(world, device)
    step = step_fn(world, model)
    cache = new_cache(world, model, kind)
    stream = cache if isinstance(cache, StreamCache) else cache.stream
    ids = stream_ids(max(sizes) + decode + 1, device)
    pos, rows, snaps = 0, [], {}
    for size in sorted(sizes):
        for start, end in chunks(stream, size - pos, PREFILL_CHUNK, exact=False):
            step(cache, ids[:, pos + start : pos + end])
        pos = size
        rows.append(
            {
                "world": world,
                "cache": kind,
                "tokens": size,
                "mem_mb": peak_memory_bytes(device) / 2**20,  # before this size's snapshot
                "cache_mb": cache_bytes(stream) / 2**20,
                "length": max(lay.length for lay in stream.layers),
            }
        )
        snaps[size] = copy.deepcopy(cache)
    times: dict[int, list[float]] = {size: [] for size in snaps}
    for k in range(decode):
        for size, snap in snaps.items():
            sync(device)
            t0 = time.perf_counter()
            step(snap, ids[:, size + k : size + k + 1])
            sync(device)
            times[size].append(time.perf_counter() - t0)
    for row in rows:
        row["ms"] = 1000 * statistics.median(times[row["tokens"]])
        row["min_ms"] = 1000 * min(times[row["tokens"]])
    return rows


def hf_generate_per_token(context: int, new: int, device: torch.device) -> float:
    """transformers' generate with its default DynamicCache: seconds per generated token."""
    model = build("hf", device)
    prompt = stream_ids(context, device)

    def timed(n: int) -> float:
        sync(device)
        t0 = time.perf_counter()
        model.generate(prompt, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)
        sync(device)
        return time.perf_counter() - t0

    timed(2)  # warm-up
    return (timed(new) - timed(1)) / (new - 1)


def gen_model(family: str) -> Any:
    """A tiny random transformers decoder of `family`, prepared with apply_sepllm (mode full:
    its own attention; the hooks hand a streaming cache its ids)."""
    import transformers as T

    from megatron.hf.sepllm_attention import apply_sepllm

    classes = {
        "llama": (T.LlamaConfig, T.LlamaForCausalLM),
        "qwen2": (T.Qwen2Config, T.Qwen2ForCausalLM),
    }
    config_cls, model_cls = classes[family]
    torch.manual_seed(0)
    config = config_cls(
        vocab_size=VOCAB, hidden_size=256, intermediate_size=768, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=65536,
        pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )  # fmt: skip
    model = model_cls(config).eval()
    apply_sepllm(model)
    return model


class TokenClock:
    """A generate `streamer` that records when each new token arrives."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self.prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if not self.prompt_seen:  # the first call hands the prompt
            self.prompt_seen = True
            return
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


@torch.no_grad()
def gen_one(family: str, kind: str, context: int, new: int, device: torch.device) -> dict:
    """Prefill `context` tokens in chunks, then time `generate` continuing it."""
    from transformers import DynamicCache

    from megatron.inference.hf_cache import hf_step, streaming_cache

    model = gen_model(family).to(device)
    ids = stream_ids(context + 1, device)
    if kind == "sep":
        a, s, w, c = SIZES["sep"]
        cache: Any = streaming_cache(model, "sep", a, s, w, c, separator_ids=SEPS)
        for start, end in chunks(cache.stream, context, PREFILL_CHUNK, exact=False):
            hf_step(model, cache, ids[:, start:end])
    else:
        cache = DynamicCache(config=model.config)
        for start in range(0, context, PREFILL_CHUNK):
            chunk = ids[:, start : min(context, start + PREFILL_CHUNK)]
            model(input_ids=chunk, past_key_values=cache, use_cache=True)
    clock = TokenClock()
    model.generate(
        ids, past_key_values=cache, max_new_tokens=new, min_new_tokens=new, do_sample=False,
        streamer=clock,
    )  # fmt: skip
    sync(device)
    gaps = [b - a for a, b in zip(clock.times, clock.times[1:], strict=False)]
    layers = cache.stream.layers if kind == "sep" else cache.layers
    held = sum(lay.keys.numel() * lay.keys.element_size() * 2 for lay in layers)
    return {
        "family": family,
        "cache": "SepCache" if kind == "sep" else "DynamicCache",
        "tokens": context,
        "ms": 1000 * statistics.median(gaps),
        "min_ms": 1000 * min(gaps),
        "mem_mb": peak_memory_bytes(device) / 2**20,
        "cache_mb": held / 2**20,
    }


def md_table(header: list[str], cells: list[list[str]]) -> str:
    """A markdown table: the header row, its rule, one row per entry of `cells`."""
    rule = "|" + "---|" * len(header)
    lines = ["| " + " | ".join(row) + " |" for row in cells]
    return "\n".join(["| " + " | ".join(header) + " |", rule, *lines])


def gen_table(rows: list[dict]) -> str:
    header = ["model", "cache", "context", "ms/token (median)", "min", "peak mem MB", "cache MB"]
    cells = [
        [r["family"], r["cache"], str(r["tokens"]), f"{r['ms']:.2f}", f"{r['min_ms']:.2f}"]
        + [f"{r['mem_mb']:.0f}", f"{r['cache_mb']:.1f}"]
        for r in rows
    ]
    return md_table(header, cells)


def run_generate(args: argparse.Namespace) -> None:
    """Every (family, cache, context) in its own process (its own peak RSS)."""
    rows: list[dict] = []
    for family in ("llama", "qwen2"):
        for kind in args.gen_caches:
            for context in args.gen_sizes:
                cmd = [sys.executable, __file__, "--gen_one", family, kind, str(context)]
                cmd += ["--device", args.device, "--threads", str(args.threads)]
                cmd += ["--gen_new", str(args.gen_new)]
                out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
                rows.append(json.loads(out.strip().splitlines()[-1]))
                print(gen_table(rows[-1:]).splitlines()[-1], flush=True)
    print(f"\n## generate: SepCache vs DynamicCache ({args.device}, torch {torch.__version__})\n")
    print(gen_table(rows))
    lo, hi = min(args.gen_sizes), max(args.gen_sizes)
    for family in ("llama", "qwen2"):
        got = {(r["cache"], r["tokens"]): r for r in rows if r["family"] == family}
        if ("SepCache", hi) in got:
            flat = got[("SepCache", hi)]["ms"] / got[("SepCache", lo)]["ms"]
            low = got[("SepCache", hi)]["min_ms"] / got[("SepCache", lo)]["min_ms"]
            print(f"- {family}: SepCache ms/token {hi} / {lo} = {flat:.2f}x median, {low:.2f}x min")
        if ("DynamicCache", hi) in got and ("SepCache", hi) in got:
            speed = [
                f"{n}: {got[('DynamicCache', n)]['ms'] / got[('SepCache', n)]['ms']:.2f}x"
                for n in args.gen_sizes
            ]
            print(f"- {family}: DynamicCache / SepCache ms/token " + ", ".join(speed))


def table(rows: list[dict]) -> str:
    header = ["world", "cache", "tokens", "decode ms (median)", "min", "peak mem MB", "cache MB"]
    cells = [
        [r["world"], r["cache"], str(r["tokens"]), f"{r['ms']:.2f}", f"{r['min_ms']:.2f}"]
        + [f"{r['mem_mb']:.0f}", f"{r['cache_mb']:.1f}", str(r["length"])]
        for r in rows
    ]
    return md_table([*header, "held"], cells)


def summary(rows: list[dict], sizes: list[int]) -> list[str]:
    out = []
    lo, hi = min(sizes), max(sizes)
    mid = min((s for s in sizes if s >= 8192), default=lo)
    for world in ("ours", "hf"):
        sep = {r["tokens"]: r for r in rows if r["world"] == world and r["cache"] == "sep"}
        if lo in sep and hi in sep:
            ratio = sep[hi]["ms"] / sep[lo]["ms"]
            ratio_min = sep[hi]["min_ms"] / sep[lo]["min_ms"]
            growth = sep[hi]["mem_mb"] / sep[mid]["mem_mb"] - 1
            out.append(
                f"{world}: SepCache latency {hi} / {lo} tokens = {ratio:.2f}x median, "
                f"{ratio_min:.2f}x min (target <= 1.2); "
                f"peak memory {mid} -> {hi}: {100 * growth:+.1f}% (target within 10%)"
            )
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=[1024, 8192, 32768, 65536])
    p.add_argument("--decode", type=int, default=16, help="timed decode steps per size")
    p.add_argument("--worlds", nargs="+", default=["ours", "hf"])
    p.add_argument("--caches", nargs="+", default=["sep", "sink", "full"])
    p.add_argument(
        "--full_max",
        type=int,
        default=32768,
        help="largest size for the full cache (its prefill is O(N^2): 64k takes ~15 min here)",
    )
    p.add_argument("--generate_new", type=int, default=32, help="tokens for the generate baseline")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=1, help="torch threads (the CPU is shared)")
    p.add_argument("--one", nargs=2, metavar=("WORLD", "CACHE"), help=argparse.SUPPRESS)
    p.add_argument("--generate", action="store_true", help="the model.generate comparison")
    p.add_argument("--gen_sizes", type=int, nargs="+", default=[1024, 8192, 32768])
    p.add_argument("--gen_new", type=int, default=33, help="new tokens per generate call")
    p.add_argument("--gen_caches", nargs="+", default=["sep", "dynamic"])
    p.add_argument("--gen_one", nargs=3, help=argparse.SUPPRESS)
    args = p.parse_args()
    device = torch.device(args.device)
    torch.set_num_threads(args.threads)
    if args.gen_one:
        family, kind, context = args.gen_one
        print(json.dumps(gen_one(family, kind, int(context), args.gen_new, device)))
        return
    if args.generate:
        run_generate(args)
        return
    if args.one:
        print(json.dumps(run_one(*args.one, args.sizes, args.decode, device)))
        return
    rows: list[dict] = []
    for world in args.worlds:
        for kind in args.caches:
            cmd = [sys.executable, __file__, "--one", world, kind, "--device", args.device]
            cmd += ["--threads", str(args.threads)]
            sizes = [n for n in args.sizes if kind != "full" or n <= args.full_max]
            cmd += ["--decode", str(args.decode), "--sizes", *map(str, sizes)]
            out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
            rows += json.loads(out.strip().splitlines()[-1])
            print(
                table([r for r in rows if r["world"] == world and r["cache"] == kind]), flush=True
            )
    print(f"\n## Streaming decode ({device}, torch {torch.__version__})\n")
    print(table(rows))
    for line in summary(rows, args.sizes):
        print("- " + line)
    if "hf" in args.worlds and 8192 in args.sizes:
        gen = 1000 * hf_generate_per_token(8192, args.generate_new, device)
        ours = {r["cache"]: r["ms"] for r in rows if r["world"] == "hf" and r["tokens"] == 8192}
        print(
            f"- transformers generate (DynamicCache) at 8192 context: {gen:.2f} ms/token; "
            "our loop on the"
        )
        print(
            "  same transformers model at 8192: "
            + ", ".join(f"{k} {v:.2f} ms" for k, v in ours.items())
        )


if __name__ == "__main__":
    main()
