"""MPI launches (`mpirun -n N python train.py ...`, Open MPI or MPICH): rank discovery.

mpi4py, when importable, is the source of truth (it works for every MPI) and lets rank 0
broadcast the rendezvous address; otherwise the launcher's environment variables are read.
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Mapping
from typing import Any, NamedTuple

log = logging.getLogger("megatron")

# (rank, local rank, size, local size) per MPI family; the first whose rank and size are
# both present wins.
ENV_TABLE: tuple[tuple[str, str, str, str], ...] = (
    (
        "OMPI_COMM_WORLD_RANK",
        "OMPI_COMM_WORLD_LOCAL_RANK",
        "OMPI_COMM_WORLD_SIZE",
        "OMPI_COMM_WORLD_LOCAL_SIZE",
    ),
    ("MV2_COMM_WORLD_RANK", "MV2_COMM_WORLD_LOCAL_RANK", "MV2_COMM_WORLD_SIZE", "MV2_LOCAL_SIZE"),
    ("PMI_RANK", "MPI_LOCALRANKID", "PMI_SIZE", "MPI_LOCALNRANKS"),  # MPICH Hydra, Intel MPI
)


class Ranks(NamedTuple):
    rank: int
    local_rank: int
    world_size: int
    local_world_size: int


def launched_by_mpi(env: Mapping[str, str]) -> bool:
    """True under mpirun/mpiexec (any family in ENV_TABLE)."""
    return any(rank in env and size in env for rank, _, size, _ in ENV_TABLE)


def ranks_from_env(env: Mapping[str, str]) -> Ranks | None:
    for rank, local, size, local_size in ENV_TABLE:
        if rank in env and size in env:
            return Ranks(
                int(env[rank]),
                int(env.get(local, "0")),
                int(env[size]),
                int(env.get(local_size, "1")),
            )
    return None


def _import_mpi() -> Any | None:
    try:
        from mpi4py import MPI  # optional, and importing it initializes MPI
    except (ImportError, RuntimeError, OSError) as exc:  # not installed, or no libmpi
        log.debug("mpi4py unavailable (%s); reading MPI environment variables", exc)
        return None
    return MPI


def host_address() -> str:
    """An address of this host other ranks can reach (not loopback when avoidable)."""
    name = socket.gethostname()
    try:
        addr = socket.gethostbyname(name)
    except OSError:
        addr = ""
    if addr and not addr.startswith("127."):
        return addr
    # Debian-style /etc/hosts maps the host name to 127.0.1.1: ask the routing table instead
    # (connecting a UDP socket sends nothing).
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect(("10.254.254.254", 1))
            return s.getsockname()[0]
    except OSError:
        return name


def _rendezvous_address(known: str | None, single_node: bool) -> str | None:
    if known:
        return known
    return "127.0.0.1" if single_node else None


def discover(env: Mapping[str, str], master_addr: str | None) -> tuple[Ranks, str]:
    """(ranks, MASTER_ADDR) for this MPI process. master_addr: env / config value, if any."""
    mpi = _import_mpi()
    if mpi is not None:
        comm = mpi.COMM_WORLD
        node = comm.Split_type(mpi.COMM_TYPE_SHARED)
        ranks = Ranks(comm.Get_rank(), node.Get_rank(), comm.Get_size(), node.Get_size())
        node.Free()
        addr = None
        if ranks.rank == 0:
            single = ranks.world_size == ranks.local_world_size
            addr = _rendezvous_address(master_addr, single) or host_address()
        # Every rank takes this path, so the collective always matches up; rank 0's view wins
        # even where the environment differs per node.
        return ranks, comm.bcast(addr, root=0)
    ranks = ranks_from_env(env)
    if ranks is None:
        raise RuntimeError(
            "MPI ranks requested but neither mpi4py nor Open MPI / MPICH / MVAPICH rank "
            "variables are available: start train.py with mpirun, or pip install mpi4py"
        )
    addr = _rendezvous_address(master_addr, ranks.world_size == ranks.local_world_size)
    if addr is None:
        raise RuntimeError(
            "multi-node MPI job without mpi4py: set master_addr in the config or export "
            "MASTER_ADDR to every rank (Open MPI: mpirun -x MASTER_ADDR=<node 0>), or install "
            "mpi4py so rank 0 can broadcast it"
        )
    return ranks, addr
