"""Stop a rank whose launcher is gone.

`kill -9` of deepy.py (or of DeepSpeed's per-node launcher) leaves the ranks orphaned, still
training and writing checkpoints. `watch_launcher` watches, from a daemon thread, the
process deepy.py names (`"<host> <pid>"`, checked by pid and start time, so a reused pid does
not count as alive and a zombie counts as gone) and this process's parent (the per-node
launcher: a change of parent means it died and the rank was re-parented). When either is
gone the rank sends itself SIGTERM: the ordinary stop of a rank (between steps, a checkpoint
of the last finished step, exit 143). Ranks on other hosts than deepy.py watch only their
parent; pdsh / mpirun / srun stop them when the connection to the launching host is lost.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import threading
import time

log = logging.getLogger("megatron")

WATCH_INTERVAL_S = 1.0


def watch_launcher(spec: str | None, interval_s: float = WATCH_INTERVAL_S) -> None:
    """Start the watch (a no-op without `spec`: a rank started by hand has no launcher)."""
    import psutil  # a DeepSpeed dependency

    if not spec:
        return
    host, _, pid = spec.partition(" ")
    parent = os.getppid()
    launcher = None
    if host == socket.gethostname():
        try:
            launcher = psutil.Process(int(pid))
        except (psutil.Error, ValueError):
            _stop(f"deepy.py (pid {pid}) is gone before this rank started")
            return

    def launcher_alive() -> bool:
        if launcher is None:
            return True  # on another host: not visible from here
        with contextlib.suppress(psutil.Error):
            return launcher.is_running() and launcher.status() != psutil.STATUS_ZOMBIE
        return False

    def watch() -> None:
        while True:
            if not launcher_alive():
                return _stop(f"deepy.py (pid {pid}) is gone (killed?)")
            if os.getppid() != parent:
                return _stop(f"this rank's launcher (pid {parent}) is gone (killed?)")
            time.sleep(interval_s)

    threading.Thread(target=watch, name="launcher-watch", daemon=True).start()


def _stop(why: str) -> None:
    log.error("%s: stopping this rank", why)
    os.kill(os.getpid(), signal.SIGTERM)
