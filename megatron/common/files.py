"""Atomic file writes and an inter-process file lock with a deadline.

`atomic_write(path)` / `atomic_path(path)` write under a temporary name in the destination's
directory (so the rename never crosses file systems), flush and fsync it, rename it over
`path` and fsync the directory: a reader sees the old file or the whole new one, never a
half-written one, and a crash or an exception inside the block leaves at most a hidden
temporary file (removed on an exception). `file_lock(path, timeout_s)` is an exclusive
`flock` that waits at most `timeout_s` and then raises `LockTimeout` naming the lock file and
the process that holds it (each holder writes its host, pid and start time into the file).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import secrets
import shutil
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

PathLike = str | os.PathLike


def _temp_name(path: PathLike, suffix: str = "") -> str:
    """A fresh hidden name beside `path`: `.<name>.<pid>-<random>.tmp<suffix>`."""
    head, name = os.path.split(os.fspath(path))
    return os.path.join(head, f".{name}.{os.getpid()}-{secrets.token_hex(4)}.tmp{suffix}")


def _fsync_dir(directory: str) -> None:
    """Make a rename durable; some file systems refuse to open or fsync a directory."""
    try:
        fd = os.open(directory or ".", os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _fsync_file(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _remove(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.remove(path)


def _commit(tmp: str, path: PathLike) -> None:
    os.replace(tmp, path)
    _fsync_dir(os.path.dirname(os.fspath(path)))


class AtomicFile:
    """A file opened under a temporary name; `commit()` renames it over `path`, `discard()`
    removes it. For writers that span several calls (a streaming dataset builder); within one
    block use `atomic_write`."""

    def __init__(self, path: PathLike, mode: str = "wb", encoding: str | None = None) -> None:
        if mode.replace("b", "").replace("t", "") not in ("w", "x"):
            raise ValueError(f"atomic files are written from scratch: mode {mode!r}")
        self.path = os.fspath(path)
        self.tmp = _temp_name(self.path)
        if "b" not in mode and encoding is None:
            encoding = "utf-8"
        # "x": the temporary name must be new; permissions follow the umask like open().
        self.file: IO[Any] = open(self.tmp, mode.replace("w", "x"), encoding=encoding)

    def write(self, data: Any) -> int:
        return self.file.write(data)

    def commit(self) -> None:
        try:
            self.file.flush()
            os.fsync(self.file.fileno())
        finally:
            self.file.close()
        _commit(self.tmp, self.path)

    def discard(self) -> None:
        self.file.close()
        _remove(self.tmp)


@contextlib.contextmanager
def atomic_write(path: PathLike, mode: str = "w", encoding: str | None = None) -> Iterator[IO[Any]]:
    """`with atomic_write(p, "wb") as f: f.write(...)`: `p` appears (or is replaced) only when
    the block ends without an exception."""
    out = AtomicFile(path, mode, encoding)
    try:
        yield out.file
    except BaseException:
        out.discard()
        raise
    out.commit()


@contextlib.contextmanager
def atomic_path(path: PathLike, suffix: str = "") -> Iterator[str]:
    """A temporary path for writers that take a file name (a compiler's -o, `np.save`,
    `Tokenizer.save`); on a clean exit the file they wrote is fsynced and renamed to `path`.
    `suffix` ends the temporary name (`.npy` stops np.save from appending one)."""
    tmp = _temp_name(path, suffix)
    try:
        yield tmp
        _fsync_file(tmp)
    except BaseException:
        _remove(tmp)
        raise
    _commit(tmp, path)


def atomic_write_bytes(path: PathLike, data: bytes) -> None:
    with atomic_write(path, "wb") as f:
        f.write(data)


def atomic_write_text(path: PathLike, text: str, encoding: str = "utf-8") -> None:
    with atomic_write(path, "w", encoding=encoding) as f:
        f.write(text)


def refuse_existing(out: Path) -> None:
    """An output directory must be new (or empty): nothing is silently overwritten."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"{out} exists and is not empty; choose a new output directory")


@contextlib.contextmanager
def atomic_dir(out: Path) -> Iterator[Path]:
    """A directory that appears whole or not at all: the block writes into a hidden temporary
    directory beside `out` (same file system: the rename is atomic); an exception removes it."""
    refuse_existing(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(_temp_name(out))
    tmp.mkdir()
    try:
        yield tmp
        if out.is_dir():
            out.rmdir()  # empty (checked above); os.replace cannot replace a directory
        os.replace(tmp, out)
        _fsync_dir(str(out.parent))
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


class LockTimeout(TimeoutError):
    """`file_lock` waited `timeout_s` without getting the lock."""


def _holder(fd: int) -> str:
    try:
        text = os.pread(fd, 512, 0).decode("utf-8", errors="replace").strip()
    except OSError:
        text = ""
    return text or "unknown (the holder wrote nothing yet)"


@contextlib.contextmanager
def file_lock(path: PathLike, timeout_s: float, poll_s: float = 0.1) -> Iterator[None]:
    """Hold an exclusive lock on `path` (created if missing) for the block.

    Waits at most `timeout_s`, then raises `LockTimeout` with the lock file and its holder.
    The lock is the kernel's `flock`, so it is released when the holder exits, even by a
    crash; the file itself stays (removing it would let two processes lock different files).
    """
    path = os.fspath(path)
    fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o644)
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise LockTimeout(
                        f"lock {path} still held after {timeout_s:g}s by {_holder(fd)}; "
                        "(flock is released when its holder exits, so that process still runs)"
                    ) from None
                time.sleep(poll_s)
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()} since {stamp}\n".encode(), 0)
        try:
            yield
        finally:
            os.ftruncate(fd, 0)  # no stale holder line once released
    finally:
        os.close(fd)  # closing the descriptor releases the flock


__all__ = [
    "AtomicFile",
    "LockTimeout",
    "atomic_dir",
    "atomic_path",
    "atomic_write",
    "atomic_write_bytes",
    "atomic_write_text",
    "file_lock",
    "refuse_existing",
]
