"""Sampling and a streaming generation loop over any cache (SepCache, sink, full).

`generate` prefills the prompt in chunks cut at the cache's room (decode.chunks), then draws
one token per step, calling `on_text` with each new piece of text as soon as it exists (the
text of all generated ids so far, minus what was already emitted, so multi-byte characters
split over tokens come out whole).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from megatron.inference.decode import chunks
from megatron.inference.loading import Streamer


@dataclass(frozen=True)
class Sampling:
    temperature: float = 1.0  # 0: greedy
    top_k: int = 0  # 0: off
    top_p: float = 0.0  # 0 or 1: off
    max_tokens: int = 64

    def __post_init__(self) -> None:
        # Each setting named with what it needs; `not (x >= 0)` also refuses NaN, and a string
        # from YAML (`maximum_tokens: abc`) is refused instead of failing in a comparison.
        checks = (
            ("temperature", self.temperature, (int, float), lambda v: v >= 0, ">= 0"),
            ("top_k", self.top_k, (int,), lambda v: v >= 0, "an integer >= 0"),
            ("top_p", self.top_p, (int, float), lambda v: 0 <= v <= 1, "in [0, 1]"),
            ("maximum_tokens", self.max_tokens, (int,), lambda v: v >= 1, "an integer >= 1"),
        )
        for name, value, kinds, ok, need in checks:
            if isinstance(value, bool) or not isinstance(value, kinds) or not ok(value):
                raise ValueError(f"{name} must be {need}, got {value!r}")


def sample(
    logits: torch.Tensor, s: Sampling, generator: torch.Generator | None = None
) -> torch.Tensor:
    """logits [B, V] -> token ids [B]."""
    logits = logits.float()
    if s.temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits / s.temperature
    if s.top_k > 0:
        kth = torch.topk(logits, min(s.top_k, logits.shape[-1]), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if 0 < s.top_p < 1:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        probs = sorted_logits.softmax(-1)
        # Drop a token when the tokens before it already reach top_p (the first always stays).
        drop = probs.cumsum(-1) - probs >= s.top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    probs = logits.softmax(-1)
    return torch.multinomial(probs, 1, generator=generator)[:, 0]


def generate(
    streamer: Streamer,
    cache: Any,
    prompt: list[int],
    s: Sampling,
    chunk_size: int = 64,
    on_text: Callable[[str], None] | None = None,
    generator: torch.Generator | None = None,
    stop_id: int | None = None,
) -> list[int]:
    """The generated ids (without the prompt); the prompt must hold at least one token."""
    if not prompt:
        raise ValueError("an empty prompt: unconditional generation starts from the EOD token")
    device = next(streamer.model.parameters()).device
    ids = torch.tensor(prompt, dtype=torch.long, device=device)[None]
    stream = streamer.stream_of(cache)
    logits = None
    for start, end in chunks(stream, ids.shape[1], chunk_size):
        logits = streamer.step(cache, ids[:, start:end])[:, -1]  # [1, V]
    out: list[int] = []
    emitted = ""
    tok = streamer.tokenizer
    for _ in range(s.max_tokens):
        assert logits is not None
        nxt = sample(logits, s, generator)  # [1]
        token = int(nxt[0])
        if stop_id is not None and token == stop_id:
            break
        out.append(token)
        if on_text is not None and tok is not None:
            text = tok.detokenize(out)
            if len(text) > len(emitted) and not text.endswith("\ufffd"):
                on_text(text[len(emitted) :])
                emitted = text
        if len(out) < s.max_tokens:
            logits = streamer.step(cache, nxt[:, None])[:, -1]
    return out
