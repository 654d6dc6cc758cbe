"""The kept set: which keys each query attends to, shared by every attention layer of a batch.

Keys and queries are described separately, by their *text positions* (the token's index in
the original text, not its slot in a tensor):

    keep(i, j) = kpos[j] <= qpos[i] and (start <= kpos[j] < start + a
                                          or qpos[i] - kpos[j] < w
                                          or is_sep[j])

per row b (kpos = key_pos[b], qpos = query_pos[b], start = init_start[b], is_sep = is_sep[b]).
`start` is 0 unless `batch_adaptive_init_pos`, where it is the number of leading pad tokens of
row b (left padding), so the initial "sink" tokens are the first `a` real tokens. Leading pads
are never separators, even if the pad id is in the separator list (GPT-2's "!" is id 0, a common
pad id). StreamingLLM is the same description without separators.

Two layouts, one type:
  * training / prefill (`build_kept_set(input_ids, cfg)`): queries and keys are the same S
    tokens, query_pos == key_pos == arange(S); `aligned` is True and positions equal indices.
  * a decode step over a cache (`KeptSet.from_cache(...)`): Sq <= Sk queries over keys at
    arbitrary increasing text positions (a compacted cache holds the initial tokens, kept
    separators and the recent window); `aligned` is False unless the cache holds exactly the
    aligned layout.
Only the dense reference kernel accepts unaligned kept sets (`select_kernel` routes them there).

The window `w` is not part of the kept set: layers may use different windows, so kernels
receive it per call. Kernels memoise what they derive per window (masks, plans, block masks)
with `window_cache`, so all layers of a batch share it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from megatron.sepllm.config import SepLLMConfig


@dataclass(eq=False)
class KeptSet:
    key_pos: torch.Tensor  # [B, Sk] long: text position of each key, increasing along a row
    is_sep: torch.Tensor  # [B, Sk] bool: key j is a separator (never true for leading pads)
    init_start: torch.Tensor  # [B] long: text position of each row's first initial token
    init_tokens: int  # a
    query_pos: torch.Tensor  # [B, Sq] long: text position of each query
    aligned: bool  # query_pos == key_pos == arange(S): the training layout
    sep_pos: torch.Tensor  # [B, M] long: key indices of the separators outside the initial
    #                        range, sorted, padded with Sk (no key) beyond sep_count[b]; in the
    #                        aligned layout indices are text positions
    sep_count: torch.Tensor  # [B] long: valid entries of sep_pos per row
    # Derived per-window tensors (masks, plans, flex block masks), shared by all layers.
    cache: dict[Any, Any] = field(default_factory=dict, repr=False)

    @property
    def batch_size(self) -> int:
        return self.is_sep.shape[0]

    @property
    def q_len(self) -> int:
        return self.query_pos.shape[1]

    @property
    def kv_len(self) -> int:
        return self.is_sep.shape[1]

    @property
    def device(self) -> torch.device:
        return self.is_sep.device

    @classmethod
    def from_cache(
        cls,
        key_pos: torch.Tensor,
        is_sep: torch.Tensor,
        init_start: torch.Tensor,
        init_tokens: int,
        query_pos: torch.Tensor,
    ) -> KeptSet:
        """Kept set of queries over the keys a cache holds.

        key_pos    [B, Sk] long, the text position of each cached key, increasing per row
        is_sep     [B, Sk] bool, whether each cached key is a separator
        init_start [B] long, the text position of each row's first initial token
        init_tokens a, the number of initial tokens kept from init_start on
        query_pos  [B, Sq] or [Sq] long, the text positions of the queries (Sq <= Sk; a decode
                   step's queries are usually the last Sq cached keys)
        `aligned` is set when the cache holds exactly the training layout (positions 0..S-1
        for both keys and queries), so such a kept set equals `build_kept_set`'s.
        """
        if key_pos.dim() != 2 or is_sep.shape != key_pos.shape:
            raise ValueError(
                f"key_pos and is_sep must both be [B, Sk], got {tuple(key_pos.shape)} and "
                f"{tuple(is_sep.shape)}"
            )
        B, Sk = key_pos.shape
        if query_pos.dim() == 1:
            query_pos = query_pos[None, :].expand(B, -1)
        if query_pos.dim() != 2 or query_pos.shape[0] != B or query_pos.shape[1] > Sk:
            raise ValueError(
                f"query_pos must be [Sq] or [{B}, Sq] with Sq <= {Sk}, got {tuple(query_pos.shape)}"
            )
        if init_start.shape != (B,):
            raise ValueError(f"init_start must be [{B}], got {tuple(init_start.shape)}")
        key_pos, query_pos = key_pos.long(), query_pos.long()
        arange = torch.arange(Sk, device=key_pos.device)
        aligned = (
            query_pos.shape[1] == Sk
            and bool((key_pos == arange).all())
            and bool((query_pos == arange).all())
        )
        return cls._build(key_pos, is_sep, init_start, init_tokens, query_pos, aligned)

    @classmethod
    def _build(
        cls,
        key_pos: torch.Tensor,
        is_sep: torch.Tensor,
        init_start: torch.Tensor,
        init_tokens: int,
        query_pos: torch.Tensor,
        aligned: bool,
    ) -> KeptSet:
        is_sep = is_sep.bool()
        init_start = init_start.long()
        B, Sk = is_sep.shape
        idx = torch.arange(Sk, device=is_sep.device).expand(B, Sk)
        start = init_start[:, None]
        in_init = (key_pos >= start) & (key_pos < start + init_tokens)
        # Separators inside the initial range are kept as initial tokens already; leaving them
        # out of the compact list keeps the kernels' key partition disjoint.
        compact = is_sep & ~in_init
        counts = compact.sum(dim=1)
        M = int(counts.max()) if B > 0 else 0
        # Sort indices with non-separators pushed to the end (index Sk), then cut to M.
        keyed = torch.where(compact, idx, torch.full_like(idx, Sk))
        sep_pos = torch.sort(keyed, dim=1).values[:, :M].contiguous()
        return cls(key_pos, is_sep, init_start, init_tokens, query_pos, aligned, sep_pos, counts)

    def window_cache(self, key: Any, builder: Any) -> Any:
        """Memoise `builder()` under `key` (per window / dtype) for all layers of this batch."""
        if key not in self.cache:
            self.cache[key] = builder()
        return self.cache[key]


def leading_pad_count(input_ids: torch.Tensor, pad_token_id: int) -> torch.Tensor:
    """[B, S] -> [B]: length of the run of `pad_token_id` at the start of each row."""
    is_pad = input_ids == pad_token_id
    return torch.cumprod(is_pad.to(torch.int32), dim=1).sum(dim=1).long()


def build_kept_set(input_ids: torch.Tensor, cfg: SepLLMConfig) -> KeptSet | None:
    """Kept set of a training / prefill batch [B, S] (the aligned layout); None for full
    attention (cfg.mode == 'full')."""
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
    pos = torch.arange(S, device=ids.device)
    if cfg.mode == "sepllm" and cfg.separator_token_ids:
        table = torch.tensor(sorted(set(cfg.separator_token_ids)), device=ids.device)
        is_sep = torch.isin(ids, table)
        is_sep &= pos[None, :] >= init_start[:, None]  # leading pads are never separators
    else:  # streamingllm: sinks + window only
        is_sep = torch.zeros(B, S, dtype=torch.bool, device=ids.device)
    key_pos = pos.expand(B, S)  # a view: no [B, S] copy
    a = max(int(cfg.init_tokens), 0)
    return KeptSet._build(key_pos, is_sep, init_start, a, key_pos, aligned=True)


def dense_keep_mask(kept: KeptSet, window: int) -> torch.Tensor:
    """[B, Sq, Sk] bool kept set, straight from the definition (dense kernel, tests)."""
    if kept.aligned:  # positions are indices: broadcast [Sq, 1] / [1, Sk], no [B, Sq, Sk] temps
        i = torch.arange(kept.q_len, device=kept.device)[None, :, None]  # [1, Sq, 1]
        j = torch.arange(kept.kv_len, device=kept.device)[None, None, :]  # [1, 1, Sk]
    else:
        i = kept.query_pos[:, :, None]  # [B, Sq, 1]
        j = kept.key_pos[:, None, :]  # [B, 1, Sk]
    start = kept.init_start[:, None, None]  # [B, 1, 1]
    init = (j >= start) & (j < start + kept.init_tokens)  # [B, 1, Sk]
    local = (i - j) < window  # [B or 1, Sq, Sk]
    sep = kept.is_sep[:, None, :]  # [B, 1, Sk]
    return (j <= i) & (init | local | sep)
