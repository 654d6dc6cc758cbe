"""The .bin/.idx format, written byte by byte from the format notes, and its validation."""

from __future__ import annotations

import os
import struct

import numpy as np
import pytest

from megatron.data.indexed_dataset import (
    DataError,
    IndexedDatasetBuilder,
    MMapIndexedDataset,
    best_dtype,
)

DOCS = [[5, 6, 7], [1], [65000, 2, 3, 4]]


def _write_by_hand(
    prefix: str,
    docs: list[list[int]],
    magic: bytes = b"MMIDIDX\x00\x00",
    version: int = 1,
    code: int = 8,
) -> None:
    """Independent writer following docs: uint16 tokens, doc_idx = 0..n."""
    with open(prefix + ".bin", "wb") as f:
        for d in docs:
            for t in d:
                f.write(struct.pack("<H", t))
    with open(prefix + ".idx", "wb") as f:
        f.write(magic)
        f.write(struct.pack("<Q", version))
        f.write(struct.pack("<B", code))
        f.write(struct.pack("<Q", len(docs)))
        f.write(struct.pack("<Q", len(docs) + 1))
        for d in docs:
            f.write(struct.pack("<i", len(d)))
        ptr = 0
        for d in docs:
            f.write(struct.pack("<q", ptr))
            ptr += 2 * len(d)
        for i in range(len(docs) + 1):
            f.write(struct.pack("<q", i))


def test_hand_built_index_loads(tmp_path) -> None:
    prefix = str(tmp_path / "hand")
    _write_by_hand(prefix, DOCS)
    ds = MMapIndexedDataset(prefix)
    assert ds.dtype == np.uint16
    assert len(ds) == 3 and ds.num_tokens == 8
    assert [ds[i].tolist() for i in range(3)] == DOCS
    assert ds.get(2, offset=1, length=2).tolist() == [2, 3]
    assert ds.doc_idx.tolist() == [0, 1, 2, 3]
    assert ds.max_token() == 65000


def test_builder_matches_hand_written_bytes(tmp_path) -> None:
    _write_by_hand(str(tmp_path / "hand"), DOCS)
    b = IndexedDatasetBuilder(str(tmp_path / "built"), np.uint16)
    b.add_document(DOCS[0])
    b.add_documents(np.array(DOCS[1] + DOCS[2]), np.array([1, 4]))
    b.finalize()
    for suffix in (".bin", ".idx"):
        assert (tmp_path / f"hand{suffix}").read_bytes() == (
            tmp_path / f"built{suffix}"
        ).read_bytes()
    assert sorted(os.listdir(tmp_path)) == ["built.bin", "built.idx", "hand.bin", "hand.idx"]


def test_int32_dtype_and_threshold(tmp_path) -> None:
    assert best_dtype(65499) == np.uint16 and best_dtype(65500) == np.int32
    b = IndexedDatasetBuilder(str(tmp_path / "big"), np.int32)
    b.add_document([100000, 3])
    b.finalize()
    ds = MMapIndexedDataset(str(tmp_path / "big"))
    assert ds.dtype == np.int32 and ds[0].tolist() == [100000, 3]
    b = IndexedDatasetBuilder(str(tmp_path / "small"), np.uint16)
    with pytest.raises(DataError, match="does not fit"):
        b.add_document([70000])
    b.abort()
    assert not any(p.name.startswith("small") for p in tmp_path.iterdir())


def test_unfinished_builder_leaves_no_dataset(tmp_path) -> None:
    b = IndexedDatasetBuilder(str(tmp_path / "x"), np.uint16)
    b.add_document([1, 2])
    assert not (tmp_path / "x.bin").exists() and not (tmp_path / "x.idx").exists()
    b.abort()


@pytest.mark.parametrize("missing", [".bin", ".idx"])
def test_missing_file(tmp_path, missing) -> None:
    prefix = str(tmp_path / "d")
    _write_by_hand(prefix, DOCS)
    os.remove(prefix + missing)
    with pytest.raises(DataError, match=f"d\\{missing}: missing"):
        MMapIndexedDataset(prefix)


@pytest.mark.parametrize(
    "kw,match",
    [
        ({"magic": b"NOTMAGIC\x00"}, "bad magic"),
        ({"version": 2}, "unsupported index version 2"),
        ({"code": 42}, "unknown dtype code 42"),
    ],
)
def test_bad_header(tmp_path, kw, match) -> None:
    prefix = str(tmp_path / "d")
    _write_by_hand(prefix, DOCS, **kw)
    with pytest.raises(DataError, match=match) as e:
        MMapIndexedDataset(prefix)
    assert "d.idx" in str(e.value)


def test_bin_size_mismatch_and_truncation(tmp_path) -> None:
    prefix = str(tmp_path / "d")
    _write_by_hand(prefix, DOCS)
    with open(prefix + ".bin", "ab") as f:
        f.write(b"\x00\x00")
    with pytest.raises(DataError, match=r"d\.bin: size 18 bytes disagrees"):
        MMapIndexedDataset(prefix)
    _write_by_hand(prefix, DOCS)
    with open(prefix + ".bin", "r+b") as f:
        f.truncate(10)
    with pytest.raises(DataError, match=r"d\.bin.*truncated"):
        MMapIndexedDataset(prefix)
    _write_by_hand(prefix, DOCS)
    size = os.path.getsize(prefix + ".idx")
    for cut in (size - 8, 20):
        with open(prefix + ".idx", "r+b") as f:
            f.truncate(cut)
        with pytest.raises(DataError, match=r"d\.idx: truncated"):
            MMapIndexedDataset(prefix)


def test_inconsistent_pointers(tmp_path) -> None:
    prefix = str(tmp_path / "d")
    _write_by_hand(prefix, DOCS)
    raw = bytearray(open(prefix + ".idx", "rb").read())
    off = 34 + 3 * 4 + 8  # second pointer
    raw[off : off + 8] = struct.pack("<q", 4)
    open(prefix + ".idx", "wb").write(bytes(raw))
    with pytest.raises(DataError, match="pointers"):
        MMapIndexedDataset(prefix)
