"""Launcher-section validation: pure config checks, run by validate() in megatron.config.validate.

Every rank validates too, so nothing here may read files or the environment (a compute node
need not have the hostfile); deepy.py checks the hostfile and installed programs itself.
"""

from __future__ import annotations

from megatron.config.checks import field_errors
from megatron.config.schema import LauncherConfig

# Started through mpirun by the DeepSpeed runner, which can express neither slot ids nor
# include/exclude for these.
MPI_LAUNCHERS = ("openmpi", "mpich", "mvapich", "impi")


def _field_errors(lc: LauncherConfig, errors: list[str]) -> None:
    errors += field_errors(lc)  # launcher, rank_source (deepy.py calls this on its own too)
    if lc.num_nodes == 0 or lc.num_nodes < -1:
        errors.append(f"num_nodes must be >= 1 or -1 (all), got {lc.num_nodes}")


def _filter_errors(lc: LauncherConfig, errors: list[str]) -> None:
    if lc.include and lc.exclude:
        errors.append("include and exclude are mutually exclusive")
    if not (lc.include or lc.exclude):
        return
    if lc.launcher != "slurm" and (lc.num_nodes != -1 or lc.num_gpus is not None):
        # DeepSpeed's runner refuses the mix; srun's --nodes/--exclude combine fine.
        errors.append(
            "include/exclude select hosts and slots themselves: drop num_nodes / num_gpus "
            f"(got num_nodes {lc.num_nodes}, num_gpus {lc.num_gpus})"
        )
    if lc.launcher == "slurm":
        if ":" in (lc.include or "") + (lc.exclude or ""):
            errors.append(
                "launcher slurm takes whole hosts in include/exclude (srun cannot pick slots)"
            )
    elif not lc.hostfile:
        errors.append("include/exclude select from a hostfile: set hostfile")
    elif lc.launcher in MPI_LAUNCHERS and ":" in (lc.include or "") + (lc.exclude or ""):
        errors.append(f"launcher {lc.launcher} (mpirun) cannot pick slots: filter whole hosts")


def _node_rank_errors(lc: LauncherConfig, errors: list[str]) -> None:
    if lc.no_ssh and lc.node_rank is None:
        errors.append("no_ssh needs node_rank: run `deepy.py ... --node-rank K` on every node")
    if lc.node_rank is None:
        return
    if lc.node_rank < 0:
        errors.append(f"node_rank must be >= 0, got {lc.node_rank}")
    elif lc.num_nodes > 0 and lc.node_rank >= lc.num_nodes:
        errors.append(f"node_rank {lc.node_rank} out of range for num_nodes {lc.num_nodes}")
    if lc.num_nodes == -1 and not lc.hostfile:
        errors.append("node_rank needs num_nodes (or a hostfile listing the nodes in order)")
    if not lc.master_addr:
        errors.append(
            "node_rank (no-SSH per-node launch) needs master_addr: the address of node 0, "
            "reachable from every node"
        )
    if lc.launcher != "pdsh":
        errors.append(
            f"node_rank starts this node's ranks itself; launcher {lc.launcher} would start "
            "them all (drop node_rank, or use the default launcher pdsh)"
        )


def validate_launcher(lc: LauncherConfig, errors: list[str]) -> None:
    """Append one message per problem with the launcher section."""
    _field_errors(lc, errors)
    _filter_errors(lc, errors)
    _node_rank_errors(lc, errors)
    if lc.launcher == "slurm" and lc.hostfile:
        errors.append("launcher slurm takes its hosts from the Slurm allocation: drop hostfile")
