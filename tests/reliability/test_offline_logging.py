"""Issue 22 (WEAK, security): wandb in offline mode (the default) makes no network lookup.
wandb's analytics read its process-wide settings, not init's `mode`, and resolved its server
when the process exited after an offline run. Checked in a child process (wandb starts a
service and threads) with an audit hook that records every name lookup until its exit."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import run_cli

pytest.importorskip("wandb")

OFFLINE_RUN = """
import atexit, sys
lookups = []
# Registered first, so it runs last: wandb's own exit hooks (where the lookup happened) first.
atexit.register(lambda: print("lookups:", sorted(set(lookups)), flush=True))
def hook(event, args):
    if event in ("socket.getaddrinfo", "socket.gethostbyname", "socket.gethostbyaddr"):
        lookups.append(str(args[0]))
sys.addaudithook(hook)
from megatron.config.schema import LoggingConfig
from megatron.training.metrics import MetricsWriter
writer = MetricsWriter(LoggingConfig(use_wandb=True, wandb_dir=sys.argv[1]), 0, {}, None)
writer.scalars({"train/loss": 1.0}, 1)
writer.close()
"""


def test_offline_wandb_makes_no_network_lookup(tmp_path: Path) -> None:
    out = run_cli(["-c", OFFLINE_RUN, str(tmp_path)], timeout=120)  # fails on a non-zero exit
    assert "lookups: []" in out.stdout, out.stdout[-2000:]
    assert list(tmp_path.glob("wandb/offline-run-*")), "no offline run written"
