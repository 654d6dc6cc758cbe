"""Deterministic, resumable batching: sample indices are a pure function of the step."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset


class GlobalBatchSampler:
    """Yields this rank's micro-batch index lists, starting after `consumed` samples.

    Global batch g covers samples [g*G, (g+1)*G); micro step m of it gives rank r the slice
    starting at g*G + (m*dp + r)*micro. A resumed run therefore reads exactly the next samples.
    """

    def __init__(self, total: int, consumed: int, micro: int, dp: int, rank: int) -> None:
        self.total, self.consumed = total, consumed
        self.micro, self.dp, self.rank = micro, dp, rank

    def __iter__(self) -> Iterator[list[int]]:
        step = self.micro * self.dp
        start = self.consumed
        while start + step <= self.total:
            first = start + self.rank * self.micro
            yield list(range(first, first + self.micro))
            start += step

    def __len__(self) -> int:
        return (self.total - self.consumed) // (self.micro * self.dp)


def _collate(items: list[dict]) -> torch.Tensor:  # -> [B, S+1] int64
    return torch.from_numpy(np.stack([np.asarray(it["text"], dtype=np.int64) for it in items]))


def make_loader(
    dataset: Dataset, consumed: int, micro: int, dp: int, rank: int, num_workers: int
) -> DataLoader:
    sampler = GlobalBatchSampler(len(dataset), consumed, micro, dp, rank)
    # A private generator: creating a loader must not advance the global RNG (dropout), or a
    # resumed run (which creates its loader at a different moment) would diverge.
    return DataLoader(
        dataset,
        batch_sampler=sampler,
        collate_fn=_collate,
        num_workers=num_workers,
        generator=torch.Generator().manual_seed(consumed),
    )


def split_batch(
    tokens: torch.Tensor, eod: int | None, eod_mask_loss: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """[B, S+1] -> inputs [B, S], labels [B, S], loss mask [B, S] (float)."""
    inputs, labels = tokens[:, :-1], tokens[:, 1:]
    mask = torch.ones_like(labels, dtype=torch.float32)
    if eod_mask_loss and eod is not None:
        mask[inputs == eod] = 0.0  # don't learn to predict across a document boundary
    return inputs, labels, mask
