"""Map scheduler / MPI environments onto the torch.distributed variables (RANK, WORLD_SIZE ...).

DeepSpeed's launcher and torchrun set RANK themselves; this is for ranks started by something
else: `srun python train.py ...` or `mpirun -n N python train.py ...`.
"""

from __future__ import annotations

import logging
from collections.abc import MutableMapping

from megatron.config.schema import LauncherConfig
from megatron.launch import mpi, slurm

log = logging.getLogger("megatron")


def choose_source(env: MutableMapping[str, str], lc: LauncherConfig) -> str:
    """'launcher' (RANK already set), 'slurm', 'mpi' or 'none' (a single process)."""
    if "RANK" in env:
        return "launcher"
    if lc.rank_source in ("slurm", "mpi", "none"):
        return lc.rank_source
    # auto. Slurm first when asked for: srun with PMI also sets PMI_RANK.
    if lc.launcher == "slurm" and "SLURM_PROCID" in env:
        return "slurm"
    if mpi.launched_by_mpi(env):
        return "mpi"
    if int(env.get("SLURM_NTASKS", "1") or "1") > 1 and "SLURM_PROCID" in env:
        # Not mapped silently: a batch script running plain `python train.py` also has these.
        log.warning(
            "SLURM_NTASKS=%s but Slurm ranks are not used (set `launcher: slurm` or "
            "`rank_source: slurm` when starting train.py with srun); training alone",
            env["SLURM_NTASKS"],
        )
    return "none"


def map_scheduler_env(env: MutableMapping[str, str], lc: LauncherConfig | None = None) -> str:
    """Fill RANK / LOCAL_RANK / WORLD_SIZE / LOCAL_WORLD_SIZE / MASTER_ADDR / MASTER_PORT.

    Values already in the environment win, then the config (master_addr, master_port), then
    what the scheduler tells (Slurm's first host, MPI rank 0's address). Returns the source.
    """
    lc = lc or LauncherConfig()
    source = choose_source(env, lc)
    known_addr = env.get("MASTER_ADDR") or lc.master_addr
    if source == "slurm":
        found = slurm.rank_env(env)
        if known_addr:
            found["MASTER_ADDR"] = known_addr
        elif "MASTER_ADDR" not in found:
            raise RuntimeError(
                "multi-node Slurm job without SLURM_JOB_NODELIST: set master_addr in the config"
            )
    elif source == "mpi":
        ranks, addr = mpi.discover(env, known_addr)
        found = {
            "RANK": str(ranks.rank),
            "LOCAL_RANK": str(ranks.local_rank),
            "WORLD_SIZE": str(ranks.world_size),
            "LOCAL_WORLD_SIZE": str(ranks.local_world_size),
            "MASTER_ADDR": addr,
        }
    else:
        if source == "launcher":
            env.setdefault("MASTER_PORT", str(lc.master_port))
        return source
    env.update(found)
    env.setdefault("MASTER_PORT", str(lc.master_port))
    return source
