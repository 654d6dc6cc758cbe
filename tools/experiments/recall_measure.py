"""Measurements of the long-range recall benchmark (tools/experiments/run_recall.py).

Held-out: HELDOUT_SEQS fresh sequences from seed HELDOUT_SEED (the training data used seeds 1
and 2), scored by the model's own forward at the training length. At every query's KEY
position the next-token target is the fact's value: accuracy = argmax over the whole
vocabulary equals it; query loss = its cross-entropy. Loss = mean next-token loss over all
non-padding positions (most tokens, keys and values of new facts, are unpredictable).

Distance of a query: in segments (query segment - fact segment) and in tokens from the fact's
VALUE token to the query's KEY token (`distance_tokens`). Buckets by tokens, w = the local
window of recall_sepllm_w.yml: near (<= w: the value is in the query's own window), mid
(w, 4w], far (> 4w: beyond L * (w - 1) for L <= 4 layers, so initial + window models are at
chance by construction).

Streaming: STREAM_SEQS streams of STREAM_FACTOR x seq_length tokens through SepCache and the
sink cache at the same capacity c, in STREAM_CHUNK-token chunks (compressed after each, so
every cache briefly holds c + chunk keys); for each query, whether the fact's VALUE token and
its separator were held in layer 0's cache (or in the same chunk) when the query was scored.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
import yaml

from megatron.checkpoint import layout, open_checkpoint
from megatron.data.recall import SEP, Query, RecallSequence, RecallSpec, generate_many
from megatron.inference.caches import make_policies
from megatron.inference.decode import chunks
from megatron.inference.loading import Streamer, load_model

CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "experiments"
HELDOUT_SEED, STREAM_SEED = 3, 4
HELDOUT_SEQS = {False: 128, True: 4}  # full run / smoke
STREAM_SEQS = {False: 16, True: 2}
STREAM_FACTOR = {False: 8, True: 2}  # stream length = factor x seq_length
STREAM_CHUNK = 16
# Streams: queries up to 96 segments back (past SepCache's 64 separators); a key is restated
# only after 96 other facts (about 140 segments), so no cache ever holds two facts of one key.
STREAM_MAX_DISTANCE = 96
SEGMENT_BIN = 8  # accuracy-vs-distance bins, in segments


def window() -> int:
    cfg = yaml.safe_load((CONFIGS / "recall_sepllm_w.yml").read_text())
    return int(cfg["sepllm"]["local_window"])


def cache_sizes(smoke: bool) -> dict[str, int]:
    """Equal capacity c: SepCache a + s + w < c, the sink cache a + the last c - a."""
    if smoke:
        return {"init": 4, "sep": 8, "local": 8, "capacity": 24}
    return {"init": 4, "sep": 64, "local": 32, "capacity": 128}


def distance_tokens(q: Query) -> int:
    return q.answer_pos - (q.fact_pos + 1)


def bucket(d_tokens: int, w: int) -> str:
    return "near" if d_tokens <= w else ("mid" if d_tokens <= 4 * w else "far")


def summarize(records: list[dict[str, Any]], w: int) -> dict[str, Any]:
    """Accuracy / query loss overall, per token bucket and per SEGMENT_BIN segments."""

    def acc(rs: list[dict[str, Any]]) -> dict[str, Any]:
        if not rs:
            return {"n": 0, "acc": float("nan"), "query_loss": float("nan")}
        return {
            "n": len(rs),
            "acc": sum(r["correct"] for r in rs) / len(rs),
            "query_loss": sum(r["nll"] for r in rs) / len(rs),
        }

    out = {"all": acc(records)}
    for name in ("near", "mid", "far"):
        out[name] = acc([r for r in records if bucket(r["d_tokens"], w) == name])
    bins: dict[int, list[dict[str, Any]]] = {}
    for r in records:
        bins.setdefault((r["d_segments"] - 1) // SEGMENT_BIN, []).append(r)
    out["by_segments"] = [
        {"lo": b * SEGMENT_BIN + 1, "hi": (b + 1) * SEGMENT_BIN, **acc(bins[b])}
        for b in sorted(bins)
    ]
    return out


@torch.no_grad()
def score_heldout(streamer: Streamer, seqs: list[RecallSequence], batch: int = 16) -> dict:
    """Per-query records and the mean loss over non-padding positions."""
    records, total, count = [], 0.0, 0
    for i in range(0, len(seqs), batch):
        part = seqs[i : i + batch]
        ids = torch.from_numpy(np.stack([s.tokens for s in part]))  # [B, S]
        logits = streamer.model(ids[:, :-1]).float()  # [B, S-1, V]
        nll = F.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none")  # [B, S-1]
        real = ids[:, 1:] != 0
        total, count = total + float(nll[real].sum()), count + int(real.sum())
        pred = logits.argmax(-1)  # [B, S-1]
        for b, s in enumerate(part):
            for q in s.queries:
                records.append(
                    {
                        "d_segments": q.distance_segments,
                        "d_tokens": distance_tokens(q),
                        "correct": int(pred[b, q.answer_pos] == q.value),
                        "nll": float(nll[b, q.answer_pos]),
                    }
                )
    return {"records": records, "loss": total / count}


def step_dirs(save: Path) -> list[tuple[int, Path]]:
    """(step, global_step<N> directory) of every COMPLETE checkpoint, by step."""
    found = []
    for d in save.iterdir():
        tag = layout.TAG.match(d.name)
        if tag and (d / layout.COMPLETE).is_file():
            found.append((int(tag.group(1)), d))
    if not found:
        raise FileNotFoundError(f"{save}: no COMPLETE global_step<N> checkpoint")
    return sorted(found)


def measure_run(save: Path, spec: RecallSpec, smoke: bool) -> dict[str, Any]:
    """Held-out accuracy and losses at every saved step; per-query detail at the last one."""
    w = window()
    steps = step_dirs(save)
    seq = open_checkpoint(steps[-1][1]).cfg.model.seq_length
    seqs = generate_many(spec, HELDOUT_SEQS[smoke], seq + 1, HELDOUT_SEED)
    curve = []
    for step, d in steps:
        scored = score_heldout(load_model(str(d)), seqs)
        s = summarize(scored["records"], w)
        curve.append({"step": step, "loss": scored["loss"], **s})
    return {
        "window": w,
        "seq_length": seq,
        "heldout_sequences": len(seqs),
        "chance_acc": 1 / spec.num_values,
        "chance_loss": math.log(spec.num_values),
        "separators": spec.separators,
        "curve": curve,
        "final": curve[-1],
    }


# --------------------------------------------------------------------------- streaming


def held_positions(streamer: Streamer, cache: Any, rows: int) -> list[set[int]]:
    """Per row, the text positions layer 0 holds (before the next step)."""
    layer = streamer.stream_of(cache).layer(0)
    if layer.length == 0:
        return [set() for _ in range(rows)]
    return [set(layer.text_pos[b][layer.valid[b]].tolist()) for b in range(layer.valid.shape[0])]


@torch.no_grad()
def stream_one(
    streamer: Streamer, kind: str, sizes: dict[str, int], seqs: list[RecallSequence]
) -> list[dict[str, Any]]:
    """All sequences as one batch through one cache kind; one record per query."""
    policies = make_policies(kind, streamer.num_layers, **sizes)
    # The data's SEP for every model: a full-attention checkpoint names no separators, and
    # its tokenizer's defaults (punctuation bytes) never occur in this data.
    cache = streamer.new_cache(policies, [SEP], True)
    stream = streamer.stream_of(cache)
    ids = torch.from_numpy(np.stack([s.tokens for s in seqs]))  # [B, N]
    by_pos = [{q.answer_pos: q for q in s.queries} for s in seqs]
    records = []
    for lo, hi in chunks(stream, ids.shape[1] - 1, STREAM_CHUNK, exact=False):
        held = held_positions(streamer, cache, len(seqs))
        logits = streamer.step(cache, ids[:, lo:hi]).float()  # [B, n, V]
        nll = F.cross_entropy(logits.transpose(1, 2), ids[:, lo + 1 : hi + 1], reduction="none")
        for b in range(len(seqs)):
            for p in range(lo, hi):
                q = by_pos[b].get(p)
                if q is None:
                    continue
                value_pos = q.fact_pos + 1
                records.append(
                    {
                        "d_segments": q.distance_segments,
                        "d_tokens": distance_tokens(q),
                        "correct": int(logits[b, p - lo].argmax() == q.value),
                        "nll": float(nll[b, p - lo]),
                        "value_held": value_pos >= lo or value_pos in held[b],
                        "sep_held": q.fact_sep_pos >= lo or q.fact_sep_pos in held[b],
                    }
                )
    return records


def held_summary(records: list[dict[str, Any]], w: int) -> dict[str, Any]:
    """Accuracy split by what the cache held of the fact when its query was scored."""
    groups = {
        "value_held": [r for r in records if r["value_held"]],
        "only_sep_held": [r for r in records if r["sep_held"] and not r["value_held"]],
        "neither_held": [r for r in records if not r["sep_held"] and not r["value_held"]],
    }
    return {k: summarize(v, w)["all"] for k, v in groups.items()}


def measure_streams(runs: dict[str, Path], smoke: bool) -> dict[str, Any]:
    """Every run through SepCache and the sink cache at equal capacity."""
    w, sizes = window(), cache_sizes(smoke)
    any_save = next(iter(runs.values()))
    seq = open_checkpoint(any_save).cfg.model.seq_length
    spec = RecallSpec(max_query_distance=STREAM_MAX_DISTANCE)
    length = STREAM_FACTOR[smoke] * seq + 1
    seqs = generate_many(spec, STREAM_SEQS[smoke], length, STREAM_SEED)
    out: dict[str, Any] = {"sizes": sizes, "stream_tokens": length - 1, "streams": len(seqs)}
    out["chunk"], out["window"] = STREAM_CHUNK, w
    for name, save in runs.items():
        streamer = load_model(str(save))
        for kind in ("sep", "sink"):
            sz = sizes if kind == "sep" else {"init": sizes["init"], "capacity": sizes["capacity"]}
            records = stream_one(streamer, kind, sz, seqs)
            out[f"{name}__{kind}"] = {
                **summarize(records, w),
                "held": held_summary(records, w),
            }
    return out
