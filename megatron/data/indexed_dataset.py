"""Megatron / GPT-NeoX "mmap" indexed dataset: reader, streaming writer and validation.

Layout (files written by Megatron or NeoX must load unchanged):

``<prefix>.idx``: magic ``MMIDIDX\\x00\\x00``, ``<Q`` version (1), ``<B`` dtype code,
``<Q`` number of sequences n, ``<Q`` number of doc_idx entries (documents + 1), then
``int32 sizes[n]``, ``int64 pointers[n]`` (byte offsets into .bin), ``int64 doc_idx[docs + 1]``.

``<prefix>.bin``: the concatenated token stream in that dtype.
"""

from __future__ import annotations

import os
import struct
from array import array
from collections.abc import Iterable
from functools import cached_property

import numpy as np

from megatron.common.files import AtomicFile, atomic_write

MAGIC = b"MMIDIDX\x00\x00"
VERSION = 1
HEADER_SIZE = len(MAGIC) + 8 + 1 + 8 + 8  # magic, version, dtype code, n sequences, n doc_idx

DTYPES: dict[int, type] = {
    1: np.uint8,
    2: np.int8,
    3: np.int16,
    4: np.int32,
    5: np.int64,
    6: np.float64,
    7: np.float32,
    8: np.uint16,
}


class DataError(ValueError):
    """A data file is missing or malformed; the message always names the file."""


def dtype_code(dtype: type | np.dtype) -> int:
    dt = np.dtype(dtype)
    for code, candidate in DTYPES.items():
        if np.dtype(candidate) == dt:
            return code
    raise ValueError(f"dtype {dt} has no code in the mmap index format")


def best_dtype(vocab_size: int) -> type:
    """uint16 below 65,500 ids (the NeoX/Megatron threshold), else int32."""
    return np.uint16 if vocab_size is not None and vocab_size < 65500 else np.int32


def data_file_path(prefix: str) -> str:
    return prefix + ".bin"


def index_file_path(prefix: str) -> str:
    return prefix + ".idx"


def _read_header(path: str, file_size: int) -> tuple[type, int, int]:
    if file_size < HEADER_SIZE:
        raise DataError(
            f"{path}: truncated index ({file_size} bytes, header alone needs {HEADER_SIZE})"
        )
    with open(path, "rb") as f:
        magic = f.read(len(MAGIC))
        if magic != MAGIC:
            raise DataError(
                f"{path}: bad magic {magic!r} (expected {MAGIC!r}); not a Megatron/NeoX mmap index"
            )
        (version,) = struct.unpack("<Q", f.read(8))
        if version != VERSION:
            raise DataError(f"{path}: unsupported index version {version} (expected {VERSION})")
        (code,) = struct.unpack("<B", f.read(1))
        if code not in DTYPES:
            raise DataError(f"{path}: unknown dtype code {code} (valid: {sorted(DTYPES)})")
        (n_seq,) = struct.unpack("<Q", f.read(8))
        (n_doc,) = struct.unpack("<Q", f.read(8))
    return DTYPES[code], n_seq, n_doc


class MMapIndexedDataset:
    """Read-only view of a .bin/.idx pair; ``ds[i]`` is document/sequence i as a numpy array.

    Everything is validated at open time (cheap, O(n) vectorised) so a corrupted or truncated
    file fails here with its name, instead of producing garbage batches hours later.
    """

    def __init__(self, prefix: str, validate: bool = True) -> None:
        self.prefix = prefix
        idx_path, bin_path = index_file_path(prefix), data_file_path(prefix)
        for p in (idx_path, bin_path):
            if not os.path.isfile(p):
                raise DataError(f"{p}: missing (dataset prefix {prefix!r} needs .bin and .idx)")
        idx_size = os.path.getsize(idx_path)
        self.dtype, n_seq, n_doc = _read_header(idx_path, idx_size)
        if np.dtype(self.dtype).kind == "f":
            raise DataError(
                f"{idx_path}: dtype {np.dtype(self.dtype)} cannot hold token ids (an index "
                "relabelled or written by another tool?)"
            )
        expected = HEADER_SIZE + n_seq * 4 + n_seq * 8 + n_doc * 8
        if idx_size != expected:
            kind = "truncated" if idx_size < expected else "has trailing bytes"
            raise DataError(
                f"{idx_path}: {kind}: {idx_size} bytes but header (n={n_seq}, docs+1={n_doc}) "
                f"implies {expected}"
            )
        self._idx_mmap = np.memmap(idx_path, mode="r", dtype=np.uint8)
        off = HEADER_SIZE
        self.sizes = np.frombuffer(self._idx_mmap, np.int32, n_seq, off)
        off += n_seq * 4
        self.pointers = np.frombuffer(self._idx_mmap, np.int64, n_seq, off)
        off += n_seq * 8
        self.doc_idx = np.frombuffer(self._idx_mmap, np.int64, n_doc, off)
        itemsize = np.dtype(self.dtype).itemsize
        bin_size = os.path.getsize(bin_path)
        total = int(self.sizes.sum(dtype=np.int64)) * itemsize
        if bin_size != total:
            kind = "truncated" if bin_size < total else "larger than the index says"
            raise DataError(
                f"{bin_path}: size {bin_size} bytes disagrees with {idx_path} "
                f"({total} bytes = {total // itemsize} {np.dtype(self.dtype)} tokens): {kind}"
            )
        if validate:
            self._validate(idx_path, itemsize)
        self._bin = (
            np.memmap(bin_path, mode="r", dtype=self.dtype) if bin_size else np.zeros(0, self.dtype)
        )

    def _validate(self, idx_path: str, itemsize: int) -> None:
        n = len(self.sizes)
        if n and int(self.sizes.min()) < 0:
            raise DataError(f"{idx_path}: negative sequence size")
        expect_ptr = np.zeros(n, np.int64)
        if n > 1:
            np.cumsum(self.sizes[:-1], dtype=np.int64, out=expect_ptr[1:])
        if not np.array_equal(expect_ptr * itemsize, self.pointers):
            raise DataError(f"{idx_path}: byte pointers are not contiguous cumulative sizes")
        d = self.doc_idx
        if len(d) == 0 or d[0] != 0 or d[-1] != n or (len(d) > 1 and np.any(np.diff(d) < 0)):
            raise DataError(f"{idx_path}: doc_idx must rise from 0 to the number of sequences")

    def __len__(self) -> int:
        return len(self.sizes)

    def __getitem__(self, i: int) -> np.ndarray:
        return self.get(i)

    def get(self, i: int, offset: int = 0, length: int | None = None) -> np.ndarray:
        """Tokens of sequence i from ``offset`` (``length`` tokens, default to the end)."""
        start = int(self.pointers[i]) // np.dtype(self.dtype).itemsize + offset
        if length is None:
            length = int(self.sizes[i]) - offset
        return np.asarray(self._bin[start : start + length])

    @cached_property
    def num_tokens(self) -> int:
        return int(self.sizes.sum(dtype=np.int64))

    def max_token(self, chunk: int = 1 << 24) -> int:
        """Largest token id (full scan, chunked so memory stays flat)."""
        return self.token_range(chunk)[1]

    def token_range(self, chunk: int = 1 << 24) -> tuple[int, int]:
        """(smallest, largest) token id, (0, -1) when empty (full scan, chunked)."""
        low, high = 0, -1
        for s in range(0, len(self._bin), chunk):
            part = self._bin[s : s + chunk]
            low, high = min(low, int(part.min())), max(high, int(part.max()))
        return low, high


def dataset_exists(prefix: str) -> bool:
    return os.path.isfile(index_file_path(prefix)) and os.path.isfile(data_file_path(prefix))


class IndexedDatasetBuilder:
    """Streaming writer: tokens go straight to a temporary .bin; sizes are kept as 4 bytes
    per document. ``finalize`` writes the index and renames both files into place, so a crash
    never leaves a .bin/.idx pair that looks complete."""

    def __init__(self, prefix: str, dtype: type = np.uint16) -> None:
        self.prefix = prefix
        self.dtype = np.dtype(dtype)
        dtype_code(self.dtype)  # fail early on an unsupported dtype
        os.makedirs(os.path.dirname(os.path.abspath(prefix)), exist_ok=True)
        self._bin = AtomicFile(data_file_path(prefix), "wb")  # committed in finalize
        self._sizes = array("i")
        self._limit = np.iinfo(self.dtype).max if self.dtype.kind in "iu" else None

    def add_document(self, tokens: Iterable[int] | np.ndarray) -> None:
        arr = np.asarray(tokens)
        self._check_range(arr)
        self._bin.write(arr.astype(self.dtype, copy=False).tobytes(order="C"))
        self._sizes.append(len(arr))

    def add_documents(self, flat: np.ndarray, lengths: np.ndarray) -> None:
        """Many documents at once: ``flat`` is their concatenation, ``lengths`` their sizes."""
        self._check_range(flat)
        self._bin.write(np.asarray(flat).astype(self.dtype, copy=False).tobytes(order="C"))
        self._sizes.extend(np.asarray(lengths, dtype=np.int32).tolist())

    def _check_range(self, arr: np.ndarray) -> None:
        # A silent uint16 wrap-around would corrupt the corpus, so refuse instead.
        if self._limit is not None and arr.size and (arr.max() > self._limit or arr.min() < 0):
            raise DataError(
                f"{self.prefix}: token id {int(arr.max())} does not fit {self.dtype} "
                f"(vocabulary too large for this dtype)"
            )

    def finalize(self) -> None:
        sizes = np.frombuffer(self._sizes, dtype=np.int32) if self._sizes else np.zeros(0, np.int32)
        n = len(sizes)
        pointers = np.zeros(n, np.int64)
        if n > 1:
            np.cumsum(sizes[:-1], dtype=np.int64, out=pointers[1:])
        pointers *= self.dtype.itemsize
        doc_idx = np.arange(n + 1, dtype=np.int64)  # one sequence per document
        write_index(index_file_path(self.prefix), self.dtype, sizes, pointers, doc_idx)
        self._bin.commit()

    def abort(self) -> None:
        self._bin.discard()


def write_index(
    path: str, dtype: np.dtype, sizes: np.ndarray, pointers: np.ndarray, doc_idx: np.ndarray
) -> None:
    """Write an .idx atomically (temporary name, then rename)."""
    with atomic_write(path, "wb") as f:
        f.write(MAGIC)
        f.write(struct.pack("<Q", VERSION))
        f.write(struct.pack("<B", dtype_code(dtype)))
        f.write(struct.pack("<Q", len(sizes)))
        f.write(struct.pack("<Q", len(doc_idx)))
        f.write(np.asarray(sizes, np.int32).tobytes(order="C"))
        f.write(np.asarray(pointers, np.int64).tobytes(order="C"))
        f.write(np.asarray(doc_idx, np.int64).tobytes(order="C"))
