"""Map scheduler / MPI environments onto the torch.distributed variables (RANK, WORLD_SIZE ...)."""

from __future__ import annotations

from collections.abc import MutableMapping


def map_scheduler_env(env: MutableMapping[str, str]) -> None:
    """Fill RANK/LOCAL_RANK/WORLD_SIZE from Open MPI, MPICH/MVAPICH (PMI) or Slurm variables.

    Only used when the launcher did not set RANK itself; MASTER_ADDR must then come from the
    job script (DeepSpeed's runner or deepy.py set it for their own launches).
    """
    if "RANK" in env:
        return
    table = (
        (
            "OMPI_COMM_WORLD_RANK",
            "OMPI_COMM_WORLD_LOCAL_RANK",
            "OMPI_COMM_WORLD_SIZE",
            "OMPI_COMM_WORLD_LOCAL_SIZE",
        ),
        ("PMI_RANK", "MPI_LOCALRANKID", "PMI_SIZE", "MPI_LOCALNRANKS"),
        ("SLURM_PROCID", "SLURM_LOCALID", "SLURM_NTASKS", "SLURM_NTASKS_PER_NODE"),
    )
    for rank, local, size, local_size in table:
        if rank in env and size in env:
            env["RANK"], env["WORLD_SIZE"] = env[rank], env[size]
            env["LOCAL_RANK"] = env.get(local, "0")
            env["LOCAL_WORLD_SIZE"] = env.get(local_size, "1").split("(")[0]
            return
