"""Per-batch SepLLM description shared by every attention layer.

The kept set (0-based, query i, key j) is

    keep(i, j) = j <= i and (start[b] <= j < start[b] + a  or  i - j < w  or  is_sep[b, j])

with `start[b] = 0` unless `batch_adaptive_init_pos`, where it is the number of leading pad
tokens of row b (left padding), so the initial "sink" tokens are the first `a` real tokens.
Leading pads are never separators, even if the pad id is in the separator list (GPT-2's "!" is
id 0, a common pad id). StreamingLLM is the same description without separators.

The window `w` is not part of the info: layers may use different windows, so kernels receive it
per call. Everything a kernel needs is derived here once per batch; kernels cache derived
masks on the object (`cache`), which all layers share.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from megatron.sepllm.config import SepLLMConfig


@dataclass
class SepInfo:
    is_sep: torch.Tensor  # [B, S] bool: key j is a separator (never true for leading pads)
    init_start: torch.Tensor  # [B] long: first initial-token position of each row
    sep_pos: torch.Tensor  # [B, M] long: separator positions outside the initial range, sorted,
    #                        padded with S (an impossible key position) beyond sep_count[b]
    sep_count: torch.Tensor  # [B] long: valid entries of sep_pos per row
    init_tokens: int  # a
    # Derived per-window tensors (masks, flex block masks); not part of the tensor bundle.
    cache: dict[Any, Any] = field(default_factory=dict, repr=False, compare=False)

    @property
    def batch_size(self) -> int:
        return self.is_sep.shape[0]

    @property
    def seq_len(self) -> int:
        return self.is_sep.shape[1]

    @property
    def device(self) -> torch.device:
        return self.is_sep.device

    def to_tensors(self) -> tuple[torch.Tensor, ...]:
        """Flat tensor bundle (for pipeline p2p); inverse of `from_tensors`.

        sep_pos has a batch-dependent width M; a transport that needs fixed shapes can send
        only (is_sep, init_start, init_tokens) and call `from_mask`.
        """
        a = torch.tensor([self.init_tokens], dtype=torch.long, device=self.device)
        return (self.is_sep, self.init_start, self.sep_pos, self.sep_count, a)

    @classmethod
    def from_tensors(cls, *tensors: torch.Tensor) -> SepInfo:
        if len(tensors) == 1 and isinstance(tensors[0], (tuple, list)):
            tensors = tuple(tensors[0])
        if len(tensors) == 3:  # fixed-shape form (is_sep, init_start, a)
            is_sep, init_start, a = tensors
            return cls.from_mask(is_sep, init_start, int(a.reshape(-1)[0]))
        is_sep, init_start, sep_pos, sep_count, a = tensors
        return cls(
            is_sep=is_sep.bool(),
            init_start=init_start.long(),
            sep_pos=sep_pos.long(),
            sep_count=sep_count.long(),
            init_tokens=int(a.reshape(-1)[0]),
        )

    @classmethod
    def from_mask(cls, is_sep: torch.Tensor, init_start: torch.Tensor, init_tokens: int) -> SepInfo:
        """Build from the separator mask [B, S] and the initial-range starts [B]."""
        is_sep = is_sep.bool()
        init_start = init_start.long()
        B, S = is_sep.shape
        pos = torch.arange(S, device=is_sep.device).expand(B, S)
        in_init = (pos >= init_start[:, None]) & (pos < init_start[:, None] + init_tokens)
        # Separators inside the initial range are kept as initial tokens already; leaving them
        # out of the compact list keeps the kernels' key partition disjoint.
        compact = is_sep & ~in_init
        counts = compact.sum(dim=1)
        M = int(counts.max()) if B > 0 else 0
        # Sort positions with non-separators pushed to the end (key S), then cut to M.
        keyed = torch.where(compact, pos, torch.full_like(pos, S))
        sep_pos = torch.sort(keyed, dim=1).values[:, :M].contiguous()
        return cls(is_sep, init_start, sep_pos, counts, init_tokens)

    def window_cache(self, key: Any, builder: Any) -> Any:
        """Memoise `builder()` under `key` (per window / dtype) for all layers of this batch."""
        if key not in self.cache:
            self.cache[key] = builder()
        return self.cache[key]


def leading_pad_count(input_ids: torch.Tensor, pad_token_id: int) -> torch.Tensor:
    """[B, S] -> [B]: length of the run of `pad_token_id` at the start of each row."""
    is_pad = input_ids == pad_token_id
    return torch.cumprod(is_pad.to(torch.int32), dim=1).sum(dim=1).long()


def build_sep_info(input_ids: torch.Tensor, cfg: SepLLMConfig) -> SepInfo | None:
    """Describe the kept set of a batch [B, S]; None for full attention (cfg.mode == 'full')."""
    if cfg.mode == "full":
        return None
    if cfg.mode not in ("sepllm", "streamingllm"):
        raise ValueError(f"unknown sepllm mode {cfg.mode!r}")
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be [B, S], got shape {tuple(input_ids.shape)}")
    ids = input_ids.long()
    B, S = ids.shape
    if cfg.batch_adaptive_init_pos:
        init_start = leading_pad_count(ids, cfg.pad_token_id)
    else:
        init_start = torch.zeros(B, dtype=torch.long, device=ids.device)
    if cfg.mode == "sepllm" and cfg.separator_token_ids:
        table = torch.tensor(sorted(set(cfg.separator_token_ids)), device=ids.device)
        is_sep = torch.isin(ids, table)
        pos = torch.arange(S, device=ids.device)
        is_sep &= pos[None, :] >= init_start[:, None]  # leading pads are never separators
    else:  # streamingllm: sinks + window only
        is_sep = torch.zeros(B, S, dtype=torch.bool, device=ids.device)
    return SepInfo.from_mask(is_sep, init_start, max(int(cfg.init_tokens), 0))


def dense_keep_mask(info: SepInfo, window: int) -> torch.Tensor:
    """[B, S, S] bool kept set, straight from the definition (reference / tests only)."""
    S = info.seq_len
    i = torch.arange(S, device=info.device)[:, None]  # [S, 1]
    j = torch.arange(S, device=info.device)[None, :]  # [1, S]
    start = info.init_start[:, None, None]  # [B, 1, 1]
    init = (j >= start) & (j < start + info.init_tokens)  # [B, 1, S]
    local = (i - j) < window  # [S, S]
    sep = info.is_sep[:, None, :]  # [B, 1, S]
    return (j <= i) & (init | local | sep)
