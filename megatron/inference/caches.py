"""Streaming KV caches: SepCache, a StreamingLLM sink cache and a full cache, one interface.

The caches are plain tensor bookkeeping, independent of any model: per layer they hold keys
and values [B, Hkv, L, D] plus, per entry, the token id, whether it is a separator, its text
position, the position its key is currently rotated to, and whether the slot is a real token
(`valid`; left padding and rows compacted to different lengths leave invalid slots, always at
the left of a row). A model drives them in steps:

    step = cache.begin_step(ids [B, n], attention_mask [B, n] | None)   # the token ids
    for each layer l:  k, v, ... = cache.layer(l).append(k_new, v_new, step, rot_pos)
    cache.end_step()                                                      # compress, stats

`begin_step` is the documented way the cache sees the token ids it stores (it needs them to
know separators); the transformers adapter (megatron/inference/hf_cache.py) calls it too.

Semantics of a step: the n new tokens attend to the cache ++ themselves (so a chunk of n
tokens briefly holds up to c + n keys), then `end_step` compresses every row whose length
exceeds its capacity. `room()` is how many tokens fit before a compression is due, so a caller
that cuts its chunks at `room()` compresses at exactly the tokens where token-by-token
decoding would: both give the same results.

Positions ("positional shift"), as the original Streaming-SepLLM gives them: a new token's
position is its cache index (the row's held entries before it). With `pos_shift` every held key
follows its cache index as entries are evicted; without it a key keeps the position it was
computed at, so positions never exceed the capacity c and, once the cache is full, keys and
queries disagree about distances (the original's no-shift ablation). Keys are stored *after*
rotary, as the model computed them (transformers hands its cache rotated keys, so one
convention serves both model worlds), together with `rot_pos`, the position they are rotated
to. When compression moves a key from index p to p' (or a caller asks for another offset), it
is rotated by the delta p' - p on its first `rot_dims` dims: a stored key is never rotated
again as if raw, which is the original HF SepCache's double-rotation bug. RoPE is a rotation,
so R(p' - p) R(p) k = R(p') k up to float rounding (tested).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

INVALID_POS = -(1 << 50)  # text position given to invalid slots: outside every window


@dataclass(frozen=True)
class Rotary:
    """What re-rotating a cached key needs: the rotate-half RoPE frequencies of its first
    `rot_dims` dims (inv_freq [rot_dims / 2])."""

    inv_freq: torch.Tensor
    rot_dims: int

    def rotate(self, k: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        """k [B, H, L, D] rotated by delta [B, L] positions (rotate-half, partial rotary)."""
        r = self.rot_dims
        freqs = delta.to(torch.float32)[..., None] * self.inv_freq.to(delta.device)  # [B, L, r/2]
        emb = torch.cat((freqs, freqs), dim=-1)[:, None]  # [B, 1, L, r]
        cos, sin = emb.cos().to(k.dtype), emb.sin().to(k.dtype)
        rot, rest = k[..., :r], k[..., r:]
        half = r // 2
        rotated_half = torch.cat((-rot[..., half:], rot[..., :half]), dim=-1)
        return torch.cat((rot * cos + rotated_half * sin, rest), dim=-1)


@dataclass(frozen=True)
class Policy:
    """One layer's eviction rule. kind: 'sep' (SepCache), 'sink' (StreamingLLM), 'full'.

    sep:  initial a | separators s | past window | local window w, capacity c (a + s + w < c).
    sink: the first a and the last c - a tokens.  full: never evicts (c unused)."""

    kind: str
    init: int = 4
    sep: int = 0
    local: int = 0
    capacity: int = 0
    grow: bool = False  # SepCache variant: the separator block (and c) grows instead of dropping

    def __post_init__(self) -> None:
        if self.kind not in ("sep", "sink", "full"):
            raise ValueError(f"unknown cache kind {self.kind!r}: sep, sink or full")
        if self.kind == "sep":
            if min(self.init, self.sep, self.local) < 0 or self.local < 1:
                raise ValueError(f"SepCache sizes must be >= 0 and local_size >= 1: {self}")
            if self.init + self.sep + self.local >= self.capacity:
                raise ValueError(
                    f"SepCache needs init_cache_size + sep_cache_size + local_size < cache_size, "
                    f"got {self.init} + {self.sep} + {self.local} >= {self.capacity}"
                )
        if self.kind == "sink" and not 0 <= self.init < self.capacity:
            raise ValueError(
                f"sink cache needs 0 <= init_cache_size < cache_size, got {self.init}, "
                f"{self.capacity}"
            )


@dataclass
class Step:
    """The tokens of one step as the cache sees them (built by `begin_step`)."""

    ids: torch.Tensor  # [B, n] long
    valid: torch.Tensor  # [B, n] bool: real tokens (False: padding)
    text_pos: torch.Tensor  # [B, n] long: text position (INVALID_POS for padding)
    is_sep: torch.Tensor  # [B, n] bool: separator by the cache's separator list


def _rank(valid: torch.Tensor) -> torch.Tensor:
    """[B, L] bool -> [B, L] long: index of each valid entry among its row's valid entries."""
    return valid.long().cumsum(dim=1) - 1


class LayerCache:
    """One layer's entries and its policy (see the module docstring)."""

    def __init__(self, policy: Policy, pos_shift: bool, rotary: Rotary | None) -> None:
        self.policy, self.pos_shift, self.rotary = policy, pos_shift, rotary
        self.keys: torch.Tensor | None = None  # [B, Hkv, L, D]
        self.values: torch.Tensor | None = None
        self.ids = self.text_pos = self.rot_pos = torch.zeros(0, 0, dtype=torch.long)
        self.is_sep = self.valid = torch.zeros(0, 0, dtype=torch.bool)
        self.grown = torch.zeros(0, dtype=torch.long)  # [B] separator slots added (grow variant)
        self.peak = 0  # longest row held between steps
        self.peak_attended = 0  # most keys one step attended (held + the step's tokens)

    @property
    def length(self) -> int:
        """Slots per row (the tensor length L; rows may hold fewer valid entries)."""
        return self.valid.shape[1]

    def row_lengths(self) -> torch.Tensor:
        """[B] long: valid entries per row."""
        return self.valid.sum(dim=1)

    def capacity(self) -> torch.Tensor:
        """[B] long: each row's capacity c (+ growth in the grow variant)."""
        return self.policy.capacity + self.grown

    def positions(self, step: Step) -> torch.Tensor:
        """[B, n] long: the positions the model gives the step's tokens: their cache index
        (the row's held entries + rank in the step), with or without shift, as in the
        original (transformers numbers a new token by the cache length); 0 for padding."""
        base = self.row_lengths()[:, None] if self.length else 0
        pos = base + _rank(step.valid)
        return torch.where(step.valid, pos, torch.zeros_like(pos))

    def append(
        self,
        k: torch.Tensor,  # [B, Hkv, n, D], rotated to rot_pos
        v: torch.Tensor,  # [B, Hkv, n, D]
        step: Step,
        rot_pos: torch.Tensor,  # [B, n] long: the positions k is rotated to
    ) -> tuple[torch.Tensor, torch.Tensor]:  # keys, values [B, Hkv, L + n, D]
        """Add the step's keys; return every key the step attends to. Under shift, stored keys
        are first rotated to their cache index + the offset the new keys carry (0 when the
        caller rotated them by `positions`), so relative positions are cache-index ones."""
        if self.keys is None:
            B = k.shape[0]
            self.keys, self.values = k[:, :, :0], v[:, :, :0]
            self.grown = torch.zeros(B, dtype=torch.long, device=k.device)
            empty = step.ids[:, :0]
            self.ids, self.text_pos, self.rot_pos = empty, empty, empty
            self.is_sep, self.valid = step.valid[:, :0], step.valid[:, :0]
        if self.pos_shift and self.length and self.rotary is not None:
            offset = (rot_pos - self.positions(step))[:, -1:]  # [B, 1]
            self._align(_rank(self.valid) + offset)
        self.keys = torch.cat([self.keys, k], dim=2)
        self.values = torch.cat([self.values, v], dim=2)
        self.ids = torch.cat([self.ids, step.ids], dim=1)
        self.text_pos = torch.cat([self.text_pos, step.text_pos], dim=1)
        self.rot_pos = torch.cat([self.rot_pos, rot_pos], dim=1)
        self.is_sep = torch.cat([self.is_sep, step.is_sep], dim=1)
        self.valid = torch.cat([self.valid, step.valid], dim=1)
        self.peak_attended = max(self.peak_attended, int(self.row_lengths().max()))
        return self.keys, self.values

    def kept_keys(self) -> tuple[torch.Tensor, torch.Tensor]:
        """What the kept rule reads of the held entries: key_pos [B, L] (text positions,
        increasing; invalid slots at far-below positions, outside every window) and is_sep
        [B, L] (by this cache's separator list)."""
        invalid = torch.arange(self.length, device=self.valid.device) + INVALID_POS
        key_pos = torch.where(self.valid, self.text_pos, invalid[None, :])
        return key_pos, self.is_sep & self.valid

    def _align(self, target: torch.Tensor) -> None:
        """Rotate stored keys from rot_pos to target [B, L] (valid entries only)."""
        delta = torch.where(self.valid, target - self.rot_pos, torch.zeros_like(target))
        if bool((delta != 0).any()):
            assert self.rotary is not None and self.keys is not None
            self.keys = self.rotary.rotate(self.keys, delta)
            self.rot_pos = torch.where(self.valid, target, self.rot_pos)

    def keep_mask(self) -> torch.Tensor | None:
        """[B, L] bool entries to keep, or None when no row is over its capacity."""
        n = self.row_lengths()  # [B]
        over = n > self.capacity()
        if self.policy.kind == "full" or not bool(over.any()):
            return None
        p, rank, valid = self.policy, _rank(self.valid), self.valid
        if p.kind == "sink":
            keep = (rank < p.init) | (rank >= (n - (p.capacity - p.init))[:, None])
        else:
            initial = rank < p.init
            local = rank >= (n - p.local)[:, None]
            middle_sep = self.is_sep & ~initial & ~local & valid
            # Newest first: the last s separators of (separator block ++ past window).
            from_end = middle_sep.flip(1).long().cumsum(1).flip(1) - 1  # [B, L]
            held = middle_sep.sum(dim=1)  # [B]
            if p.grow:  # keep every separator; capacity grows by what exceeds s
                self.grown = torch.where(over, (held - p.sep).clamp(min=0), self.grown)
                keep_sep = middle_sep
            else:
                keep_sep = middle_sep & (from_end < p.sep)
            keep = initial | local | keep_sep
        return (keep & valid) | (~over[:, None] & valid)

    def compact(self, keep: torch.Tensor) -> None:
        """Keep the entries of keep [B, L]; each row's kept entries move to the right end, in
        order (left-padded with invalid slots), and, under shift, to their new cache index."""
        assert self.keys is not None and self.values is not None
        counts = keep.sum(dim=1)  # [B]
        new_len = int(counts.max())
        # Kept entries sorted to the end of the row, order preserved (stable sort on ~keep).
        order = torch.sort((keep.long()), dim=1, stable=True).indices[:, -new_len:]  # [B, L']
        gather = order[:, None, :, None].expand(-1, self.keys.shape[1], -1, self.keys.shape[3])
        self.keys = self.keys.gather(2, gather)
        self.values = self.values.gather(2, gather)
        self.ids, self.text_pos = self.ids.gather(1, order), self.text_pos.gather(1, order)
        self.rot_pos, self.is_sep = self.rot_pos.gather(1, order), self.is_sep.gather(1, order)
        self.valid = keep.gather(1, order)
        if self.pos_shift and self.rotary is not None:
            self._align(_rank(self.valid))

    def end_step(self) -> None:
        keep = self.keep_mask()
        if keep is not None:
            self.compact(keep)
        self.peak = max(self.peak, int(self.row_lengths().max()) if self.length else 0)

    def held_separators(self) -> list[torch.Tensor]:
        """Per row, the text positions of the separators held outside the initial block."""
        rank = _rank(self.valid)
        out = []
        for b in range(self.valid.shape[0]):
            sel = self.valid[b] & self.is_sep[b] & (rank[b] >= self.policy.init)
            out.append(self.text_pos[b][sel])
        return out


@dataclass
class Stats:
    """Measured cache usage (never the paper's formula)."""

    tokens: int = 0  # text tokens streamed (per row, max over rows)
    length_sum: list[float] = field(default_factory=list)  # per layer: sum over tokens of held
    seen_sum: float = 0.0  # sum over tokens of text tokens seen so far


class StreamCache:
    """Per-layer caches plus the step protocol and statistics (module docstring)."""

    def __init__(
        self,
        policies: Sequence[Policy],
        separator_ids: Sequence[int] = (),
        pos_shift: bool = True,
        rotary: Rotary | None = None,
    ) -> None:
        self.layers = [LayerCache(p, pos_shift, rotary) for p in policies]
        self.separator_ids = sorted(set(int(i) for i in separator_ids))
        self.pos_shift = pos_shift
        self.seen = torch.zeros(0, dtype=torch.long)  # [B] text tokens seen per row
        self.stats = Stats(length_sum=[0.0] * len(self.layers))
        self.step: Step | None = None
        # Position counters a BiPE model keeps across the steps of this stream (set by the
        # model: megatron/sepllm/bipe.py's BipeState); None for other models.
        self.bipe: Any = None

    def layer(self, i: int) -> LayerCache:
        return self.layers[i]

    def begin_step(self, ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> Step:
        """Register the token ids [B, n] of the next forward (mask [B, n]: 1 real, 0 pad)."""
        if self.step is not None:
            raise RuntimeError("begin_step called twice without end_step")
        ids = ids.long()
        valid = (
            torch.ones_like(ids, dtype=torch.bool)
            if attention_mask is None
            else attention_mask.bool()
        )
        if self.seen.numel() == 0:
            self.seen = torch.zeros(ids.shape[0], dtype=torch.long, device=ids.device)
        text = self.seen[:, None] + _rank(valid)
        text_pos = torch.where(valid, text, torch.full_like(text, INVALID_POS))
        table = torch.tensor(self.separator_ids, dtype=torch.long, device=ids.device)
        is_sep = torch.isin(ids, table) & valid
        self.step = Step(ids, valid, text_pos, is_sep)
        return self.step

    def end_step(self) -> None:
        """Compress every layer over its capacity and record the statistics."""
        if self.step is None:
            raise RuntimeError("end_step without begin_step")
        n = int(self.step.valid.sum(dim=1).max())
        self.seen = self.seen + self.step.valid.sum(dim=1)
        for i, layer in enumerate(self.layers):
            if layer.keys is not None:
                layer.end_step()
                held = float(layer.row_lengths().max())
                self.stats.length_sum[i] += held * n
        self.stats.tokens += n
        self.stats.seen_sum += float(self.seen.max()) * n
        self.step = None

    def room(self) -> int:
        """Tokens that can still be added before some layer is over its capacity (>= 1)."""
        free = []
        for layer in self.layers:
            if layer.policy.kind == "full":
                continue
            if layer.keys is None:  # nothing held yet
                free.append(layer.policy.capacity + 1)
                continue
            free.append(int((layer.capacity() - layer.row_lengths()).min()) + 1)
        return max(min(free), 1) if free else 1 << 62

    def summary(self) -> dict[str, object]:
        """Current and peak length per layer, mean length over the stream, kept-KV ratio."""
        t = max(self.stats.tokens, 1)
        current = [int(lay.row_lengths().max()) if lay.length else 0 for lay in self.layers]
        mean = [s / t for s in self.stats.length_sum]
        seen_mean = self.stats.seen_sum / t
        return {
            "tokens": self.stats.tokens,
            "current_length": current,
            "peak_length": [lay.peak for lay in self.layers],
            "peak_attended": [lay.peak_attended for lay in self.layers],
            "mean_length": mean,
            "kept_kv_ratio": (sum(mean) / len(mean)) / seen_mean if seen_mean else 1.0,
        }


def _per_layer(value: int | Sequence[int], n: int, name: str) -> list[int]:
    if isinstance(value, int):
        return [value] * n
    values = [int(v) for v in value]
    if len(values) != n:
        raise ValueError(f"{name}: {len(values)} values for {n} layers")
    return values


def make_policies(
    kind: str,
    num_layers: int,
    init: int | Sequence[int] = 4,
    sep: int | Sequence[int] = 64,
    local: int | Sequence[int] = 256,
    capacity: int | Sequence[int] = 512,
    grow: bool = False,
) -> list[Policy]:
    """One policy per layer; each size is one value or a list with one value per layer."""
    a, s = _per_layer(init, num_layers, "init"), _per_layer(sep, num_layers, "sep")
    w, c = _per_layer(local, num_layers, "local"), _per_layer(capacity, num_layers, "capacity")
    return [Policy(kind, a[i], s[i], w[i], c[i], grow) for i in range(num_layers)]
