"""PNG plots of the SepLLM study (docs/results.md), from a study directory written by
tools/experiments/run_study.py:

    python tools/plots/study_plots.py --study runs/study [--benchmark bench.txt]

loss_curves.png       training (and validation) loss of every run on one plot
streaming_ppl.png     running perplexity vs position for each cache, with / without shift
cache_length.png      cache length vs position (SepCache oscillates, sink stays at c)
attention_pattern.png which keys each query of a real sentence keeps under SepLLM
speedup.png           SepLLM training speed-up vs sequence length, from the benchmark's
                      JSON / CSV (benchmarks/sepllm_training.py); skipped with a message when
                      there is none
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import re
import sys
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from megatron.common.files import atomic_path  # noqa: E402

SENTENCE = (
    "ROMEO: But, soft! what light through yonder window breaks? It is the east, and Juliet "
    "is the sun."
)
DPI = 90


def _save(fig: Any, path: Path) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    with atomic_path(path, ".png") as tmp:
        fig.savefig(tmp, format="png", dpi=DPI)
    plt.close(fig)
    return str(path)


def loss_curves(results: dict[str, Any], path: Path) -> str:
    fig, ax = plt.subplots(figsize=(7, 4))
    for name, r in results["runs"].items():
        xs, ys = zip(*r["train_loss"], strict=True) if r["train_loss"] else ((), ())
        (line,) = ax.plot(xs, ys, label=f"{name} (valid ppl {r['valid_ppl']:.1f})")
        if r["valid_loss"]:
            vx, vy = zip(*r["valid_loss"], strict=True)
            ax.plot(vx, vy, "o", color=line.get_color(), ms=4)
    ax.set(xlabel="iteration", ylabel="loss (nats/token)", title="Training loss (dots: validation)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return _save(fig, path)


def _block_ppl(nll: list[float], blocks: int = 32) -> tuple[list[int], list[float]]:
    """Perplexity of each of `blocks` equal spans of the stream, at the span's end: unlike
    a running mean, a blow-up past the trained length shows where it happens."""
    size = max(1, len(nll) // blocks)
    xs, ys = [], []
    for lo in range(0, len(nll), size):
        part = nll[lo : lo + size]
        xs.append(lo + len(part))
        ys.append(math.exp(min(sum(part) / len(part), 50.0)))
    return xs, ys


def streaming_ppl(study: Path, results: dict[str, Any], path: Path) -> str:
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    seq = next(iter(results["runs"].values()), {}).get("seq_length")
    n = 0
    for key, s in results["streaming"].items():
        nll_file = study / "streaming" / key / "nll.txt"
        if not nll_file.is_file():
            continue
        nll = [float(v) for v in nll_file.read_text().split()]
        n = len(nll)
        xs, ys = _block_ppl(nll)
        o = s["options"]
        ax = axes[0] if (o["shift"] or o["cache"] == "full") else axes[1]
        style = {"sep": "-", "sink": "--", "full": ":"}[o["cache"]]
        ax.plot(xs, ys, style, label=f"{key} ({s['ppl']:.1f})", lw=1.2)
    for ax, title in zip(
        axes, ("with positional shift (+ full caches)", "without positional shift"), strict=True
    ):
        if seq:
            ax.axvline(seq, color="grey", lw=0.8)
        ax.set(xlabel="tokens streamed", title=title, yscale="log")
        ax.legend(fontsize=6)
        ax.grid(alpha=0.3, which="both")
    axes[0].set_ylabel(f"perplexity per {max(1, n // 32)}-token block")
    return _save(fig, path)


def cache_length(results: dict[str, Any], path: Path) -> str:
    fig, ax = plt.subplots(figsize=(7, 4))
    for key, s in results["streaming"].items():
        if not key.startswith("vanilla__") and not key.startswith("sepllm_w__sep"):
            continue  # the vanilla caches + the SepLLM model's SepCache: one line per policy
        if s["lengths"]:
            xs, ys = zip(*s["lengths"], strict=True)
            ax.step(xs, ys, where="post", label=key, lw=1)
    ax.set(
        xlabel="tokens streamed",
        ylabel="keys held (layer 0)",
        title="Cache length vs position",
        yscale="log",
    )
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    return _save(fig, path)


def _study_tokenizer(study: Path) -> Any:
    """The tokenizer the study's SepLLM(w) run trained with (its checkpoint names it)."""
    from megatron.checkpoint import open_checkpoint

    tok = open_checkpoint(study / "ckpt" / "sepllm_w").tokenizer()
    if tok is None:
        raise FileNotFoundError(f"{study / 'ckpt' / 'sepllm_w'}: its tokenizer file is gone")
    return tok


def attention_pattern(study: Path, path: Path, window: int = 8) -> str:
    """Kept (query, key) pairs of a real sentence under SepLLM(a=4, w=window), with the
    separator keys marked; tokens from the study's tokenizer."""
    import torch

    from megatron.sepllm.config import SepLLMConfig
    from megatron.sepllm.info import build_kept_set, dense_keep_mask

    sep_cfg = json.loads((study / "results" / "sepllm_w.json").read_text())["sepllm"]
    tok = _study_tokenizer(study)
    ids = tok.tokenize(SENTENCE)
    cfg = SepLLMConfig(
        mode="sepllm",
        separator_token_ids=list(sep_cfg["separator_token_ids"]),
        init_tokens=4,
        local_window=window,
    )
    kept = build_kept_set(torch.tensor([ids]), cfg)
    mask = dense_keep_mask(kept, window)[0].squeeze().float().numpy()  # [S, S]
    labels = [tok.detokenize([i]).replace("\n", "\\n") for i in ids]
    seps = set(cfg.separator_token_ids)
    fig, ax = plt.subplots(figsize=(7.5, 7))
    ax.imshow(mask, cmap="Blues", vmin=0, vmax=1.3)
    ax.set_xticks(range(len(ids)), labels, rotation=90, fontsize=7)
    ax.set_yticks(range(len(ids)), labels, fontsize=7)
    for j, i in enumerate(ids):
        if i in seps:
            ax.get_xticklabels()[j].set_color("red")
            ax.get_yticklabels()[j].set_color("red")
    density = mask.sum() / (len(ids) * (len(ids) + 1) / 2)
    ax.set(
        xlabel="key (red: separator)",
        ylabel="query",
        title=f"SepLLM kept pairs, a=4, w={window}: {density:.0%} of causal pairs",
    )
    return _save(fig, path)


# A row of the printed table, or of its markdown copy in docs/benchmarks.md (`| 2048 | 64 |`).
_TABLE_ROW = re.compile(
    r"^\|?\s*(\d+)\s*\|?\s+(full|\d+)\s*\|?\s+(\S+)\s*\|?\s+([\d.]+)\s*\|?\s+([\d.]+)x"
)


def _bench_rows(path: Path) -> list[dict[str, Any]]:
    """Rows {seq, speedup, label}: from benchmarks/sepllm_training.py's printed table (.txt /
    .log: `seq w kernel ms/iter speed-up ...`), a JSON list / {"rows": [...]}, or a CSV with a
    seq column and a speedup column (or dense_ms and sepllm_ms)."""
    if path.suffix in (".txt", ".log", ".md"):
        found = {}
        for line in path.read_text().splitlines():
            m = _TABLE_ROW.match(line)
            if m and m.group(2) != "full":  # last table wins: the summary after the per-seq ones
                found[(int(m.group(1)), m.group(2))] = float(m.group(5))
        return [{"seq": s, "speedup": x, "label": w} for (s, w), x in sorted(found.items())]
    if path.suffix == ".csv":
        with open(path, newline="") as f:
            raw: list[dict[str, Any]] = list(csv.DictReader(f))
    else:
        data = json.loads(path.read_text())
        raw = data.get("rows", data.get("results", [])) if isinstance(data, dict) else data
    rows = []
    for r in raw:
        seq = r.get("seq", r.get("seq_length", r.get("S")))
        speed = r.get("speedup", r.get("speed_up"))
        if speed is None and r.get("dense_ms") and r.get("sepllm_ms"):
            speed = float(r["dense_ms"]) / float(r["sepllm_ms"])
        if seq is not None and speed is not None:
            label = str(r.get("window", r.get("w", r.get("label", ""))))
            rows.append({"seq": float(seq), "speedup": float(speed), "label": label})
    return rows


def speedup(bench: Path | None, path: Path) -> str | None:
    if bench is None or not bench.is_file():
        print(
            f"speedup.png skipped: no benchmark table ({bench or 'pass --benchmark'}; "
            "benchmarks/sepllm_training.py produces it)",
            file=sys.stderr,
        )
        return None
    rows = _bench_rows(bench)
    if not rows:
        print(f"speedup.png skipped: {bench} holds no rows with seq and speedup", file=sys.stderr)
        return None
    fig, ax = plt.subplots(figsize=(6, 4))
    for label in sorted({r["label"] for r in rows}):
        pts = sorted((r["seq"], r["speedup"]) for r in rows if r["label"] == label)
        ax.plot(*zip(*pts, strict=True), "o-", label=f"w={label}" if label else None)
    seqs = sorted({int(r["seq"]) for r in rows})
    ax.set_xscale("log", base=2)
    ax.set_xticks(seqs, [str(x) for x in seqs])
    ax.minorticks_off()
    ax.axhline(1.0, color="grey", lw=0.8)
    ax.set(
        xlabel="sequence length",
        ylabel="speed-up vs dense causal",
        title="SepLLM training step speed-up",
    )
    if any(r["label"] for r in rows):
        ax.legend()
    ax.grid(alpha=0.3)
    return _save(fig, path)


def plot_all(study: Path, results: dict[str, Any], bench: Path | None = None) -> list[str]:
    out = study / "plots"
    pngs = [
        loss_curves(results, out / "loss_curves.png"),
        streaming_ppl(study, results, out / "streaming_ppl.png"),
        cache_length(results, out / "cache_length.png"),
    ]
    if (study / "results" / "sepllm_w.json").is_file():
        pngs.append(attention_pattern(study, out / "attention_pattern.png"))
    sp = speedup(bench, out / "speedup.png")
    return pngs + ([sp] if sp else [])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--study", type=Path, required=True, help="run_study.py --out directory")
    p.add_argument("--benchmark", type=Path, default=None)
    args = p.parse_args(argv)
    results_file = args.study / "results.json"
    if not results_file.is_file():
        print(
            f"study_plots.py: {results_file} not found (run tools/experiments/run_study.py)",
            file=sys.stderr,
        )
        return 2
    for png in plot_all(args.study, json.loads(results_file.read_text()), args.benchmark):
        print(png)
    return 0


if __name__ == "__main__":
    sys.exit(main())
