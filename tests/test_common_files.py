"""megatron/common/files.py: atomic writes leave no half file; the file lock has a deadline."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from megatron.common.files import (
    AtomicFile,
    LockTimeout,
    atomic_path,
    atomic_write,
    atomic_write_bytes,
    atomic_write_text,
    file_lock,
)


def _names(directory: Path) -> list[str]:
    return sorted(os.listdir(directory))


def test_atomic_write_replaces_whole_file(tmp_path: Path) -> None:
    target = tmp_path / "latest"
    atomic_write_text(target, "global_step1")
    atomic_write_text(target, "global_step2")
    assert target.read_text() == "global_step2"
    atomic_write_bytes(tmp_path / "b.bin", b"\x00\x01")
    assert (tmp_path / "b.bin").read_bytes() == b"\x00\x01"
    assert _names(tmp_path) == ["b.bin", "latest"]  # no temporaries left


def test_exception_mid_write_leaves_old_file_and_no_temporary(tmp_path: Path) -> None:
    target = tmp_path / "latest"
    atomic_write_text(target, "old")
    with pytest.raises(RuntimeError, match="crash"):
        with atomic_write(target, "w") as f:
            f.write("half of the new cont")
            raise RuntimeError("crash")
    assert target.read_text() == "old"
    assert _names(tmp_path) == ["latest"]
    # A new file that fails never appears under its final name.
    with pytest.raises(KeyboardInterrupt):
        with atomic_write(tmp_path / "new.idx", "wb") as f:
            f.write(b"MMIDIDX")
            raise KeyboardInterrupt
    assert _names(tmp_path) == ["latest"]


def test_killed_writer_leaves_no_half_file(tmp_path: Path) -> None:
    """A process killed inside the block (no cleanup at all) leaves only a hidden temporary."""
    code = (
        "import os, sys\n"
        "from megatron.common.files import atomic_write\n"
        "with atomic_write(sys.argv[1], 'wb') as f:\n"
        "    f.write(b'x' * 1000); f.flush()\n"
        "    os._exit(9)\n"
    )
    target = tmp_path / "data.bin"
    res = subprocess.run([sys.executable, "-c", code, str(target)], timeout=60)
    assert res.returncode == 9
    assert not target.exists()
    left = _names(tmp_path)
    assert len(left) == 1 and left[0].startswith(".data.bin.") and ".tmp" in left[0]


def test_atomic_path_for_writers_that_take_a_name(tmp_path: Path) -> None:
    target = tmp_path / "idx.npy"
    with atomic_path(target, suffix=".npy") as tmp:
        assert tmp.endswith(".npy") and os.path.dirname(tmp) == str(tmp_path)
        np.save(tmp, np.arange(3))
    assert np.load(target).tolist() == [0, 1, 2]
    with pytest.raises(ValueError):
        with atomic_path(tmp_path / "other.npy", suffix=".npy") as tmp:
            np.save(tmp, np.arange(3))
            raise ValueError("compiler failed")
    assert _names(tmp_path) == ["idx.npy"]


def test_atomic_file_commit_and_discard(tmp_path: Path) -> None:
    out = AtomicFile(tmp_path / "a.bin", "wb")
    out.write(b"abc")
    assert not (tmp_path / "a.bin").exists()
    out.commit()
    assert (tmp_path / "a.bin").read_bytes() == b"abc"
    out = AtomicFile(tmp_path / "b.bin", "wb")
    out.write(b"abc")
    out.discard()
    assert _names(tmp_path) == ["a.bin"]
    with pytest.raises(ValueError, match="from scratch"):
        AtomicFile(tmp_path / "c.bin", "ab")


def test_held_lock_times_out_naming_file_and_holder(tmp_path: Path) -> None:
    lock = tmp_path / "build.lock"
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time\n"
            "from megatron.common.files import file_lock\n"
            "with file_lock(sys.argv[1], 5):\n"
            "    print('held', flush=True); time.sleep(60)\n",
            str(lock),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        t0 = time.monotonic()
        with pytest.raises(LockTimeout) as err:
            with file_lock(lock, timeout_s=0.5):
                pass
        assert 0.5 <= time.monotonic() - t0 < 5
        message = str(err.value)
        assert str(lock) in message and f"pid {holder.pid}" in message
        assert isinstance(err.value, TimeoutError)
    finally:
        holder.kill()
        holder.wait()
    # The holder died without releasing anything by hand: the kernel dropped its lock.
    with file_lock(lock, timeout_s=2):
        pass


def test_lock_released_after_use_and_on_error(tmp_path: Path) -> None:
    lock = tmp_path / ".build.lock"
    with file_lock(lock, timeout_s=1):
        assert f"pid {os.getpid()}" in lock.read_text()
        with pytest.raises(LockTimeout):  # a second descriptor, even in this process, waits
            with file_lock(lock, timeout_s=0.2):
                pass
    assert lock.read_text() == ""  # no stale holder line
    with pytest.raises(RuntimeError):
        with file_lock(lock, timeout_s=1):
            raise RuntimeError("builder failed")
    with file_lock(lock, timeout_s=0.2):  # free again right away
        pass
