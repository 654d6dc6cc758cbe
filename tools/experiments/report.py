"""results.json and results.md of the SepLLM study (tools/experiments/run_study.py): every
number the stages wrote, gathered into one file and one set of markdown tables."""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path
from typing import Any

LABELS = {
    "vanilla": "Vanilla (full attention)",
    "streamingllm_w": "StreamingLLM(w)",
    "sepllm_w": "SepLLM(w)",
    "sepllm_2w": "SepLLM(2w)",
    "sepllm_ht": "SepLLM(w) H/T",
}


def _load(path: Path) -> dict[str, Any] | None:
    return json.loads(path.read_text()) if path.is_file() else None


def collect(out: Path, variants: list[str]) -> dict[str, Any]:
    runs = {v: r for v in variants if (r := _load(out / "results" / f"{v}.json")) is not None}
    streams = {}
    order = {v: i for i, v in enumerate(LABELS)}
    found = sorted(
        (out / "streaming").glob("*/result.json"),
        key=lambda p: (order.get(p.parent.name.split("__")[0], 99), p.stat().st_mtime),
    )
    for d in found:
        s = json.loads(d.read_text())
        lengths = _load(d.parent / "lengths.json") or []
        streams[d.parent.name] = {
            k: s[k]
            for k in (
                "ppl",
                "num_tokens",
                "peak_cache_length",
                "mean_cache_length",
                "kept_kv_ratio",
                "tokens_per_s",
                "seconds",
            )
        }
        streams[d.parent.name]["options"] = {
            k: s["options"][k]
            for k in ("model", "cache", "shift", "init", "sep", "local", "capacity")
        }
        streams[d.parent.name]["lengths"] = lengths
    lmeval = {}
    for v in variants:
        r = _load(out / "results" / f"{v}.lmeval.json")
        if r is not None:
            lmeval[v] = r["results"]["shakespeare_lambada"]
    return {
        "runs": runs,
        "lmeval": lmeval,
        "training_free": _load(out / "results" / "training_free.json"),
        "streaming": streams,
    }


def meta(args: argparse.Namespace, times: dict[str, float]) -> dict[str, Any]:
    import torch

    return {
        "date_utc": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": f"{platform.machine()} {os.cpu_count()} CPU cores, {platform.platform()}",
        "torch": torch.__version__,
        "smoke": bool(args.smoke),
        "launcher": args.launcher,
        "timings_s": times,
    }


def _f(x: Any, digits: int = 2) -> str:
    return "n/a" if x is None else f"{x:.{digits}f}"


def runs_table(results: dict[str, Any]) -> list[str]:
    rows = [
        "| model | valid ppl (ours) | valid ppl (HF twin) | attention density | KV ratio "
        "(last query) | ms / iter | train time (s) |",
        "|---|---|---|---|---|---|---|",
    ]
    times = results.get("meta", {}).get("timings_s", {})
    for name, r in results["runs"].items():
        rows.append(
            f"| {LABELS.get(name, name)} | {_f(r['valid_ppl'])} | {_f(r.get('hf_valid_ppl'))} | "
            f"{r['density']:.3f} | {r['kv_ratio']:.3f} | {r['ms_per_iter']:.0f} | "
            f"{_f(times.get(f'train/{name}'), 0)} |"
        )
    return rows


def lmeval_table(results: dict[str, Any]) -> list[str]:
    rows = [
        "| model | LAMBADA-style acc | LAMBADA-style ppl |",
        "|---|---|---|",
    ]
    for name, r in results.get("lmeval", {}).items():
        rows.append(
            f"| {LABELS.get(name, name)} | {r['acc,none']:.3f} | {r['perplexity,none']:.1f} |"
        )
    return rows if len(rows) > 2 else []


def training_free_table(results: dict[str, Any]) -> list[str]:
    tf = results.get("training_free")
    if not tf:
        return []
    rows = [
        "| kept rule on the vanilla weights (no training) | valid ppl (ours) | HF twin |",
        "|---|---|---|",
    ]
    vanilla = results["runs"].get("vanilla")
    if vanilla:
        rows.append(
            f"| none (full attention) | {_f(vanilla['valid_ppl'])} | "
            f"{_f(vanilla.get('hf_valid_ppl'))} |"
        )
    for key in ("sepllm_w", "sepllm_2w", "streamingllm_w"):
        r = tf[key]
        rows.append(f"| {LABELS[key]} | {_f(r['valid_ppl'])} | {_f(r.get('hf_valid_ppl'))} |")
    return rows


def streaming_table(results: dict[str, Any]) -> list[str]:
    rows = [
        "| model | cache | a / s / w / c | positional shift | stream ppl | mean cache length |"
        " peak | kept-KV ratio | tokens/s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for s in results["streaming"].values():
        o = s["options"]
        sizes = (
            "-"
            if o["cache"] == "full"
            else f"{o['init']} / {o['sep']} / {o['local']} / {o['capacity']}"
        )
        if o["cache"] == "sink":
            sizes = f"{o['init']} / - / - / {o['capacity']}"
        shift = "-" if o["cache"] == "full" else ("yes" if o["shift"] else "no")
        rows.append(
            f"| {LABELS.get(o['model'], o['model'])} | {o['cache']} | {sizes} | {shift} | "
            f"{_f(s['ppl'])} | {s['mean_cache_length']:.0f} | {s['peak_cache_length']} | "
            f"{s['kept_kv_ratio']:.3f} | {s['tokens_per_s']:.0f} |"
        )
    return rows


def markdown(results: dict[str, Any], pngs: list[str]) -> str:
    m = results.get("meta", {})
    n_stream = next(iter(results["streaming"].values()), {}).get("num_tokens", 0)
    lines = [
        "# SepLLM study results",
        "",
        f"{m.get('date_utc', '')}; {m.get('machine', '')}; torch {m.get('torch', '')}"
        f"{'; SMOKE run (numbers mean nothing)' if m.get('smoke') else ''}.",
        "",
        "## Training (validation at the training length)",
        *runs_table(results),
        "",
        "## lm-eval: shakespeare_lambada (0-shot, held-out passages; eval.py)",
        *lmeval_table(results),
        "",
        "## Training-free",
        *training_free_table(results),
        "",
        f"## Streaming perplexity ({n_stream} held-out tokens)",
        *streaming_table(results),
        "",
        "## Time per step (s)",
        "| step | seconds |",
        "|---|---|",
        *(f"| {k} | {v} |" for k, v in m.get("timings_s", {}).items()),
        "",
        "## Plots",
        *(f"![{Path(p).stem}](plots/{Path(p).name})" for p in pngs),
        "",
    ]
    return "\n".join(lines)
