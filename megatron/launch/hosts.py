"""Hostfiles: resolve the hosts and slots a launch will use, exactly as DeepSpeed's runner will.

Resolving before launch gives the real world size for validation and clear errors (unknown
host in include, node_rank past the last host) instead of a failure inside the runner.
"""

from __future__ import annotations

import collections
import os
from pathlib import Path

from megatron.config.loader import ConfigError
from megatron.config.schema import LauncherConfig

Pool = dict[str, list[int]]  # host -> slot ids, in hostfile order


def read_hostfile(path: str) -> dict[str, int]:
    """host -> slots of a DeepSpeed/MPI-style hostfile ('host slots=N', '#' comments)."""
    if not os.path.isfile(path):
        raise ConfigError(f"hostfile {path!r} does not exist")
    # The runner's own parser; deepspeed is imported only when a hostfile is used.
    from deepspeed.launcher.runner import _parse_hostfile

    try:
        return dict(_parse_hostfile(Path(path).read_text().splitlines()))
    except ValueError as exc:
        raise ConfigError(f"hostfile {path}: {exc}") from exc


def resolve_pool(lc: LauncherConfig, hosts: dict[str, int]) -> Pool:
    """Apply include/exclude or num_nodes/num_gpus to the hostfile's hosts, like the runner."""
    from deepspeed.launcher.runner import (
        apply_num_nodes_and_gpus,
        parse_inclusion_exclusion,
    )

    try:
        pool = parse_inclusion_exclusion(
            collections.OrderedDict(hosts), lc.include or "", lc.exclude or ""
        )
    except ValueError as exc:
        raise ConfigError(f"include/exclude {lc.include or lc.exclude!r}: {exc}") from exc
    pool = apply_num_nodes_and_gpus(pool, lc.num_nodes, lc.num_gpus or -1)
    if not pool:
        raise ConfigError(f"no hosts left in {lc.hostfile} after include/exclude/num_nodes")
    if lc.num_nodes > len(hosts):
        raise ConfigError(f"num_nodes {lc.num_nodes} but hostfile {lc.hostfile} lists {len(hosts)}")
    return {h: list(s) for h, s in pool.items()}


def render_hostfile(slots: dict[str, int]) -> str:
    return "".join(f"{host} slots={n}\n" for host, n in slots.items())


def placeholder_hosts(num_nodes: int, procs_per_node: int) -> dict[str, int]:
    """Hosts for a no-SSH launch without a hostfile. The runner only needs the node count and
    slots per node (each node starts its own ranks), so the names are never resolved."""
    return {f"node{i}": procs_per_node for i in range(num_nodes)}


def world_size(pool: Pool) -> int:
    return sum(len(slots) for slots in pool.values())
