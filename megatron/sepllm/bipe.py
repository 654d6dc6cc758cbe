"""BiPE positions (bilevel positional encoding, He et al., arXiv 2401.16421) from token ids.

A text is cut into segments; a segment ends with a separator token, which belongs to the
segment it closes. Each token gets two positions:

    intra  its index inside its segment (0 for the first token after a separator): a row of
           the model's learned absolute position table, added to the token embedding
    inter  its segment's index = the number of separators before it: drives RoPE

    ids     a  b  .  c  d  ,  e
    intra   0  1  2  0  1  2  0
    inter   0  0  0  1  1  1  2

This is the original SepLLM trainer's convention (its `get_bilevel_positional_ids`): the
separator keeps the segment's inter index and the next token restarts intra at 0.

Positions are data, built once per batch from the ids like the kept set (`token_positions`),
and the model reads them without knowing which scheme made them: without BiPE both are the
absolute position. A stream fed in steps (decode) carries the two counters that continue
them (`BipeState`), so a token gets the same positions whether its text came in one
forward or token by token.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from megatron.sepllm.config import SepLLMConfig
from megatron.sepllm.info import leading_pad_count


@dataclass(frozen=True)
class TokenPositions:
    """What the model gives each token: a row of the learned position table (absolute or
    BiPE intra) and a RoPE position (absolute or BiPE inter)."""

    embed: torch.Tensor  # [S] or [B, S] long
    rope: torch.Tensor  # [S] or [B, S] long


@dataclass(frozen=True)
class BipeState:
    """Per row, what continues the positions after the tokens seen so far."""

    seps: torch.Tensor  # [B] long: separators seen (the next token's inter index)
    intra: torch.Tensor  # [B] long: the next token's intra index

    @classmethod
    def start(cls, batch: int, device: torch.device) -> BipeState:
        zeros = torch.zeros(batch, dtype=torch.long, device=device)
        return cls(zeros, zeros)


def bipe_separator_ids(sep: SepLLMConfig) -> list[int]:
    """The ids that end a BiPE segment: bipe_separator_token_ids, else separator_token_ids."""
    ids = sep.bipe_separator_token_ids
    return sorted({int(i) for i in (sep.separator_token_ids if ids is None else ids)})


def bipe_positions(
    is_sep: torch.Tensor,  # [B, S] bool: token ends a segment
    state: BipeState | None = None,
    valid: torch.Tensor | None = None,  # [B, S] bool: real tokens (False: padding)
) -> tuple[torch.Tensor, torch.Tensor, BipeState]:  # intra [B, S], inter [B, S], next state
    """Intra / inter positions of S tokens following `state` (a fresh text when None).

    Padding counts for nothing and gets position 0."""
    B, S = is_sep.shape
    dev = is_sep.device
    state = state or BipeState.start(B, dev)
    real = torch.ones_like(is_sep) if valid is None else valid.bool()
    sep = (is_sep.bool() & real).long()
    count = real.long()
    before = count.cumsum(1) - count  # [B, S] real tokens before t in this step
    seps_before = sep.cumsum(1) - sep  # [B, S]
    inter = state.seps[:, None] + seps_before
    # `after` = real-token count just after each separator; its running max, shifted one
    # step right, is where the segment of token t started (when a separator precedes it).
    after = torch.where(sep.bool(), before + 1, torch.zeros_like(before)).cummax(1).values
    start = torch.cat([after.new_zeros(B, 1), after[:, :-1]], 1)
    intra = torch.where(seps_before > 0, before - start, state.intra[:, None] + before)
    intra = torch.where(real, intra, torch.zeros_like(intra))
    inter = torch.where(real, inter, torch.zeros_like(inter))
    total, seps = count.sum(1), sep.sum(1)  # [B]
    last = after[:, -1] if S else total.new_zeros(B)
    nxt = torch.where(seps > 0, total - last, state.intra + total)
    return intra, inter, BipeState(state.seps + seps, nxt)


def _is_sep(ids: torch.Tensor, sep: SepLLMConfig) -> torch.Tensor:
    table = torch.tensor(bipe_separator_ids(sep), dtype=torch.long, device=ids.device)
    return torch.isin(ids.long(), table)


def token_positions(
    input_ids: torch.Tensor,  # [B, S]
    sep: SepLLMConfig,
    position_ids: torch.Tensor | None = None,  # [S] or [B, S]; default arange(S)
) -> TokenPositions:
    """The positions of a training / prefill batch: absolute ones (`position_ids`), or with
    `sep.bipe` the BiPE intra / inter positions of each row (a fresh text per row; with
    `batch_adaptive_init_pos` each row's text starts after its leading pads)."""
    if not sep.bipe:
        if position_ids is None:
            position_ids = torch.arange(input_ids.shape[1], device=input_ids.device)
        return TokenPositions(position_ids, position_ids)
    valid = None
    if sep.batch_adaptive_init_pos:
        pads = leading_pad_count(input_ids, sep.pad_token_id)  # [B]
        valid = torch.arange(input_ids.shape[1], device=input_ids.device) >= pads[:, None]
    intra, inter, _ = bipe_positions(_is_sep(input_ids, sep), valid=valid)
    return TokenPositions(intra, inter)


def stream_positions(
    ids: torch.Tensor,  # [B, n]: the step's tokens
    sep: SepLLMConfig,
    state: BipeState | None,  # after the text seen so far (None: a fresh text)
    valid: torch.Tensor | None,  # [B, n]: 1 real / 0 left padding
    max_positions: int,  # rows of the learned intra-segment table
) -> tuple[TokenPositions, BipeState]:
    """BiPE positions of one step of a stream (decode / chunked prefill) and the state after
    it: feeding a text in steps gives `token_positions` of the whole text."""
    intra, inter, nxt = bipe_positions(_is_sep(ids, sep), state, valid)
    longest = int(intra.max()) if intra.numel() else 0
    if longest >= max_positions:
        raise ValueError(
            f"BiPE: a segment reached {longest + 1} tokens without a separator, beyond the "
            f"learned intra-segment table ({max_positions} rows, max_position_embeddings)"
        )
    return TokenPositions(intra, inter), nxt


def cache_step_positions(
    sep: SepLLMConfig,
    cache: Any,  # megatron.model.cache.KVCache: carries `bipe` (a BipeState) and `pos_shift`
    ids: torch.Tensor,  # [B, n]: the step's tokens
    valid: torch.Tensor | None,  # [B, n]: 1 real / 0 left padding
    max_positions: int,
) -> TokenPositions | None:
    """BiPE positions of a step over `cache`, advancing the counters the cache carries for
    its stream; None without BiPE (the model then gives each layer the cache's positions)."""
    if not sep.bipe:
        return None
    if cache.pos_shift:
        raise ValueError(
            "BiPE over a cache needs pos_shift off (--enable_pos_shift False): its RoPE "
            "positions count separators, and the shift re-rotates held keys to cache indices"
        )
    pos, cache.bipe = stream_positions(ids, sep, cache.bipe, valid, max_positions)
    return pos


def bipe_errors(sep: SepLLMConfig, pos_emb: str) -> list[str]:
    """Config errors of the BiPE settings (empty list = valid)."""
    if not sep.bipe:
        return []
    errors = []
    if pos_emb != "rotary":
        errors.append(
            f"sepllm.bipe (USE_BiPE) needs pos_emb rotary (RoPE on the inter-segment index), got "
            f"pos_emb {pos_emb!r}; BiPE with ALiBi is not built"
        )
    ids = sep.bipe_separator_token_ids
    if ids is not None and [i for i in ids if int(i) < 0]:
        errors.append(f"sepllm.bipe_separator_token_ids (BiPE_seps) has negative ids {ids}")
    if not bipe_separator_ids(sep):
        errors.append(
            "sepllm.bipe (USE_BiPE) needs segment separators: set bipe_separator_token_ids "
            "(BiPE_seps) or separator_token_ids"
        )
    return errors
