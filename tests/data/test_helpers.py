"""The C++ helpers and the numpy fallback must produce identical arrays."""

from __future__ import annotations

import numpy as np
import pytest

from megatron.data import helpers
from megatron.data.gpt_dataset import build_doc_idx


@pytest.fixture(scope="module")
def ext():
    mod = helpers.get_extension()
    if mod is None:
        pytest.skip("C++ helpers could not be built here (numpy fallback in use)")
    return mod


def _reference_sample_idx(sizes, doc_idx, seq_length, num_samples):
    """Direct transcription of the packing rule: sample k starts at token k*seq_length."""
    stream = [(d, o) for d in range(len(doc_idx)) for o in range(sizes[doc_idx[d]])]
    return np.array([[0, 0]] + [list(stream[k * seq_length]) for k in range(1, num_samples + 1)])


def test_sample_idx_cpp_equals_numpy_random(ext) -> None:
    rng = np.random.default_rng(0)
    for _ in range(200):
        n = int(rng.integers(1, 40))
        sizes = rng.integers(0, 25, n).astype(np.int32)
        sizes[rng.integers(0, n)] += 2  # at least one usable document
        doc_idx = build_doc_idx(
            np.arange(n), int(rng.integers(1, 4)), np.random.RandomState(1), False
        )
        seq = int(rng.integers(1, 30))
        ns = (int(sizes[doc_idx].sum()) - 1) // seq
        if ns < 1:
            continue
        a = ext.build_sample_idx(sizes, doc_idx, seq, ns)
        b = helpers.build_sample_idx_numpy(sizes, doc_idx, seq, ns)
        np.testing.assert_array_equal(a, b)
        if sizes[doc_idx[0]] > 0:  # the reference puts row 0 on the first non-empty document
            np.testing.assert_array_equal(b, _reference_sample_idx(sizes, doc_idx, seq, ns))


def test_sample_idx_large(ext) -> None:
    rng = np.random.default_rng(1)
    sizes = rng.integers(1, 3000, 20000).astype(np.int32)
    doc_idx = np.concatenate([rng.permutation(20000) for _ in range(2)]).astype(np.int64)
    ns = (int(sizes[doc_idx].sum()) - 1) // 2048
    np.testing.assert_array_equal(
        ext.build_sample_idx(sizes, doc_idx, 2048, ns),
        helpers.build_sample_idx_numpy(sizes, doc_idx, 2048, ns),
    )


def test_sample_idx_exhausted_errors(ext) -> None:
    sizes = np.array([3, 3], np.int32)
    doc_idx = np.array([0, 1], np.int64)
    with pytest.raises(RuntimeError, match="exhausted"):
        ext.build_sample_idx(sizes, doc_idx, 4, 3)
    with pytest.raises(RuntimeError, match="exhausted"):
        helpers.build_sample_idx_numpy(sizes, doc_idx, 4, 3)


@pytest.mark.parametrize("weights", [[0.5, 0.5], [0.7, 0.2, 0.1], [0.01, 0.99], [1.0]])
def test_blending_cpp_equals_numpy_and_proportions(ext, weights) -> None:
    w = np.array(weights)
    a = ext.build_blending_indices(w, 20000)
    b = helpers.build_blending_indices_numpy(w, 20000)
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
    frac = np.bincount(a[0], minlength=len(w)) / 20000
    assert np.all(np.abs(frac - w) <= 0.01 * w + 1e-4)
    for d in range(len(w)):  # sample indices per dataset are 0, 1, 2, ... in order
        np.testing.assert_array_equal(a[1][a[0] == d], np.arange((a[0] == d).sum()))


def test_forced_numpy_fallback(monkeypatch) -> None:
    monkeypatch.setattr(helpers, "_tried", False)
    monkeypatch.setattr(helpers, "_cached", None)
    monkeypatch.setenv("SEPNEOX_DATA_HELPERS", "numpy")
    assert helpers.get_extension() is None
