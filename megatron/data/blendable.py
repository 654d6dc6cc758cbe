"""Weighted blend of several datasets (Megatron BlendableDataset semantics)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from megatron.data.helpers import build_blending_indices


class BlendableDataset:
    """Sample i comes from dataset ``dataset_index[i]``; the greedy rule keeps every prefix of
    the blend within one sample of the target proportions, and is deterministic."""

    def __init__(self, datasets: Sequence, weights: Sequence[float], size: int) -> None:
        if len(datasets) != len(weights) or not datasets:
            raise ValueError(f"{len(datasets)} datasets but {len(weights)} weights")
        w = np.asarray(weights, dtype=np.float64)
        if np.any(w < 0) or w.sum() <= 0:
            raise ValueError(f"blend weights must be >= 0 with a positive sum, got {list(weights)}")
        self.datasets = list(datasets)
        self.weights = w / w.sum()
        self.size = int(size)
        self.dataset_index, self.dataset_sample_index = build_blending_indices(
            self.weights, self.size
        )
        # Every dataset must be long enough for the samples the blend draws from it.
        counts = np.bincount(self.dataset_index, minlength=len(self.datasets))
        for d, (ds, c) in enumerate(zip(self.datasets, counts)):
            if c > len(ds):
                raise ValueError(f"blend needs {c} samples from dataset {d}, it has {len(ds)}")

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        if not 0 <= i < self.size:
            raise IndexError(f"blended sample {i} out of range [0, {self.size})")
        d = int(self.dataset_index[i])
        return self.datasets[d][int(self.dataset_sample_index[i])]
