"""Kept-set statistics measured from the actual separator positions (no S x S tensor).

For a row with initial range [s, s + a) and compact separators P (outside that range), the
kept keys of query i are the window {i - w < j <= i} plus the initial tokens and separators
at j <= i - w (the rest are inside the window already). So

    kept(i)        = min(i + 1, w) + #{p in init u P : p <= i - w}
    sum_i kept(i)  = sum_i min(i + 1, w) + sum_{p in init u P} max(0, S - w - p)

which costs O(S) per row. Leading pads (left padding) count as ordinary keys, exactly as the
kernels treat them. Training batches only: the kept set must have the aligned layout.
"""

from __future__ import annotations

import logging

import torch

from megatron.sepllm.config import SepLLMConfig
from megatron.sepllm.info import KeptSet

log = logging.getLogger("megatron")


def _extra_positions(kept: KeptSet, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Positions beyond the window that can be kept: [B, a + M] long and a validity mask."""
    a = kept.init_tokens
    init = kept.init_start[:, None] + torch.arange(a, device=kept.device)[None, :]  # [B, a]
    init_ok = init < seq_len
    M = kept.sep_pos.shape[1]
    sep_ok = torch.arange(M, device=kept.device)[None, :] < kept.sep_count[:, None]  # [B, M]
    return torch.cat([init, kept.sep_pos], 1), torch.cat([init_ok, sep_ok], 1)


def kept_counts(kept: KeptSet, window: int, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row: (kept pairs [B] float64, kept keys of the last query [B] float64)."""
    if not kept.aligned:
        raise ValueError("kept statistics need the aligned (training) layout")
    S, w = seq_len, max(int(window), 1)
    pos, ok = _extra_positions(kept, S)
    pos = pos.double()
    m = min(S, w)
    window_pairs = m * (m + 1) / 2 + max(S - w, 0) * w  # sum_i min(i + 1, w)
    extra = torch.where(ok, (S - w - pos).clamp(min=0), torch.zeros_like(pos)).sum(1)  # [B]
    pairs = window_pairs + extra
    last = min(S, w) + (ok & (pos <= S - 1 - w)).sum(1).double()  # [B]
    return pairs, last


def kept_stats(kept: KeptSet, windows: list[int], seq_len: int) -> dict[str, float]:
    """Kept-KV ratio and attention-map density per layer group (layers with equal window).

    kv_ratio/w{w}: kept keys of the last query / S;  density/w{w}: kept pairs / causal pairs;
    both averaged over the batch. `*/mean` averages over layers (each layer counts once).
    """
    S = int(seq_len)
    causal_pairs = S * (S + 1) / 2
    out: dict[str, float] = {}
    kv_sum = dens_sum = 0.0
    for w in windows:
        pairs, last = kept_counts(kept, w, S)
        kv = float((last / S).mean())
        dens = float((pairs / causal_pairs).mean())
        out[f"kv_ratio/w{w}"] = kv
        out[f"density/w{w}"] = dens
        kv_sum, dens_sum = kv_sum + kv, dens_sum + dens
    if windows:
        out["kv_ratio/mean"] = kv_sum / len(windows)
        out["density/mean"] = dens_sum / len(windows)
    return out


class SeparatorWatch:
    """Warns when a SepLLM batch holds no separator at all: its kept set is then exactly
    StreamingLLM's, and a whole run of such batches usually means separator ids from another
    tokenizer. Checks the token ids on the host, where the loader produces them."""

    def __init__(self, cfg: SepLLMConfig, report: bool = True) -> None:
        ids = sorted(set(cfg.separator_token_ids)) if cfg.mode == "sepllm" else []
        self.table = torch.tensor(ids, dtype=torch.long) if ids else None
        self.report = report  # only one rank of a run needs to say it
        self.batches = self.without = 0

    def check(self, tokens: torch.Tensor) -> None:  # [B, S+1] ids
        if self.table is None:
            return
        self.batches += 1
        if torch.isin(tokens, self.table.to(tokens.device)).any():
            return
        self.without += 1
        if self.report and (self.without == 1 or self.without % 100 == 0):
            log.warning(
                "sepllm: %d of %d batches so far hold none of the separator ids %s, so they "
                "train as StreamingLLM; check separator_token_ids against the tokenizer "
                "(tools/sepllm/separator_ids.py)",
                self.without,
                self.batches,
                self.table.tolist(),
            )
