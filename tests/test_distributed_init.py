"""init_distributed on CPU: a one-process gloo group without DeepSpeed's shm comm op."""

from __future__ import annotations

import os
import subprocess
import sys

CODE = """
import os
from megatron.training.distributed import init_distributed
import deepspeed.comm.comm as comm
rank, world, device = init_distributed(None)
print(rank, world, device.type, comm.cdb.shm_comm_op is None)
"""


def test_cpu_init_skips_the_shared_memory_comm_op() -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env["CUDA_VISIBLE_DEVICES"] = ""
    out = subprocess.run(
        [sys.executable, "-c", CODE], env=env, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr[-2000:]
    # The op (only used for inference all-reduce) would JIT-build and leave a /dev/shm buffer.
    assert out.stdout.strip().splitlines()[-1] == "0 1 cpu True"
