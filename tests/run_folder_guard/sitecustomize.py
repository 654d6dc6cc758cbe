"""The run-folder guard for test subprocesses: tests must never read or write the user's run
folders (checkpoints/, data/, runs/, hf/, ckpts/, outputs/ under the repository root).

tests/conftest.py puts this directory first on PYTHONPATH, so every Python process a test
starts (train.py, deepy.py and the ranks DeepSpeed spawns) imports this file at start-up and
installs an audit hook (PEP 578: the only way to see every `open`, including torch.load's and
numpy's) that records a touched path in the log the parent checks after each test, and makes
the access fail. Outside a test run (no SEPNEOX_TEST_GUARD_ROOTS) it does nothing.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable

ROOTS_ENV = "SEPNEOX_TEST_GUARD_ROOTS"
LOG_ENV = "SEPNEOX_TEST_GUARD_LOG"
# Audit events whose first argument (two for renames and links) is a path.
EVENTS = {
    "open": 1, "os.listdir": 1, "os.scandir": 1, "os.mkdir": 1, "os.remove": 1, "os.rmdir": 1,
    "os.rename": 2, "os.link": 2, "os.symlink": 2, "os.chmod": 1, "os.utime": 1,
    "shutil.rmtree": 1, "shutil.copyfile": 2, "shutil.copytree": 2,
}  # fmt: skip


def _relative_to_a_dir_fd(event: str, args: tuple) -> bool:
    """Whether relative paths in the event name entries of an open directory (shutil.rmtree
    and os.fwalk work so), not of the working directory: their place is unknown, skip them.
    os.open's event (mode None) does not say whether it had a dir_fd, so it counts as one."""
    if event == "open":
        return args[1] is None
    if event == "shutil.rmtree":
        return args[1] is not None
    # the os.* events end with dir_fd, -1 when there is none
    last = args[-1] if event.startswith("os.") else None
    return isinstance(last, int) and last >= 0


def touched(event: str, args: tuple, roots: tuple[str, ...]) -> str | None:
    """The guarded path an audit event touches, or None."""
    dir_fd = _relative_to_a_dir_fd(event, args)
    for arg in args[: EVENTS.get(event, 0)]:
        if isinstance(arg, int) or arg is None:
            continue
        try:
            path = os.fsdecode(arg)
        except TypeError:
            continue
        if dir_fd and not os.path.isabs(path):
            continue
        path = os.path.abspath(path)
        if any(path == r or path.startswith(r + os.sep) for r in roots):
            return path
    return None


def make_hook(roots: tuple[str, ...], report: Callable[[str], None]):
    def hook(event: str, args: tuple) -> None:
        if event in EVENTS:
            path = touched(event, args, roots)
            if path is not None:
                report(f"{event} {path}")
                raise PermissionError(f"test guard: a test touched the user's run folder: {path}")

    return hook


def _append(log: str, line: str) -> None:
    # os.open, not open(): the hook must not depend on the machinery it watches.
    fd = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, f"pid {os.getpid()}: {line}\n".encode())
    finally:
        os.close(fd)


def _install_from_env() -> None:
    roots = tuple(r for r in os.environ.get(ROOTS_ENV, "").split(os.pathsep) if r)
    log = os.environ.get(LOG_ENV)
    if roots and log:
        sys.addaudithook(make_hook(roots, lambda line: _append(log, line)))


_install_from_env()
