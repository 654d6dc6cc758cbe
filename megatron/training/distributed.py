"""Process-group setup that works under the DeepSpeed launcher and as a plain `python train.py`."""

from __future__ import annotations

import logging
import os
import socket

import torch

from megatron.config.schema import LauncherConfig
from megatron.launch.environment import map_scheduler_env

log = logging.getLogger("megatron")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed(launcher: LauncherConfig | None = None) -> tuple[int, int, torch.device]:
    """(rank, world_size, device). Without a launcher this becomes a 1-process group.

    Ranks come from the launcher (RANK set by deepy.py / torchrun), or from srun / mpirun
    variables (megatron/launch/environment.py); `launcher` gives master_port, master_addr and
    rank_source for the latter.
    """
    import deepspeed  # heavy: imported only when a process group is made

    source = map_scheduler_env(os.environ, launcher)
    if source in ("slurm", "mpi") and os.environ["RANK"] == "0":
        log.info(
            "ranks from %s: world %s, rendezvous %s:%s",
            source,
            os.environ["WORLD_SIZE"],
            os.environ["MASTER_ADDR"],
            os.environ["MASTER_PORT"],
        )
    if "RANK" not in os.environ:
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        # srun --gpus-per-task / --gpu-bind can leave each task exactly one visible GPU.
        index = local_rank % torch.cuda.device_count()
        torch.cuda.set_device(index)
        device, backend = torch.device("cuda", index), "nccl"
    else:
        device, backend = torch.device("cpu"), "gloo"
        _limit_cpu_threads()
        _skip_shm_comm_op()
    deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False)
    return torch.distributed.get_rank(), torch.distributed.get_world_size(), device


def _skip_shm_comm_op() -> None:
    """Keep DeepSpeed from building and starting its CPU shared-memory all-reduce op.

    The op only serves `inference_all_reduce`, which training never calls, yet every CPU rank
    JIT-compiles it (about a minute on first use) and each rank leaves a ~67 MB
    /dev/shm/deepspeed_allreduce_buffer_* behind per rendezvous port (tens of GB after many
    runs). DeepSpeed consults `deepspeed.ops.__compatible_ops__` before loading it.
    """
    import deepspeed.ops  # heavy, as above

    compatible = getattr(deepspeed.ops, "__compatible_ops__", None)
    if isinstance(compatible, dict):
        compatible["deepspeed_shm_comm"] = False


def _limit_cpu_threads() -> None:
    # Several CPU ranks on one host must share the cores, not each grab all of them.
    if "OMP_NUM_THREADS" in os.environ:
        return
    local = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("LOCAL_SIZE", "1")))
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(1, local)))
