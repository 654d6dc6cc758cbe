"""Slurm: compact nodelists, per-task rank variables, and the srun command deepy.py runs.

Two ways to run under Slurm, both without SSH:
- `srun python train.py cfg.yml` (one task per GPU) from an sbatch script: every task maps
  SLURM_PROCID / SLURM_LOCALID / SLURM_NTASKS onto RANK / LOCAL_RANK / WORLD_SIZE itself;
- `python deepy.py train.py cfg.yml` with `launcher: slurm`: deepy.py builds that srun line.
"""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys
from collections.abc import Mapping

from megatron.config.schema import LauncherConfig

# srun sets the STEP variables; the JOB ones come from sbatch/salloc and may cover more nodes
# than the step uses, so the step's view wins.
NODELIST_VARS = ("SLURM_STEP_NODELIST", "SLURM_JOB_NODELIST", "SLURM_NODELIST")
TASKS_PER_NODE_VARS = ("SLURM_STEP_TASKS_PER_NODE", "SLURM_TASKS_PER_NODE")


def _split_top_level(spec: str) -> list[str]:
    """Split on commas outside brackets: 'a[1,3],b' -> ['a[1,3]', 'b']."""
    items, depth, start = [], 0, 0
    for i, ch in enumerate(spec):
        if ch == "[":
            depth += 1
            if depth > 1:
                raise ValueError(f"nested '[' in Slurm nodelist {spec!r}")
        elif ch == "]":
            depth -= 1
            if depth < 0:
                raise ValueError(f"unbalanced ']' in Slurm nodelist {spec!r}")
        elif ch == "," and depth == 0:
            items.append(spec[start:i])
            start = i + 1
    if depth:
        raise ValueError(f"unbalanced '[' in Slurm nodelist {spec!r}")
    items.append(spec[start:])
    return [item.strip() for item in items if item.strip()]


def _expand_range(part: str, spec: str) -> list[str]:
    """'01-03' -> ['01', '02', '03'] (the lower bound's width is kept); '7' -> ['7']."""
    if "-" not in part:
        if not part:
            raise ValueError(f"empty range in Slurm nodelist {spec!r}")
        return [part]
    lo, hi = part.split("-", 1)
    if not (lo.isdigit() and hi.isdigit()) or int(hi) < int(lo):
        raise ValueError(f"bad range {part!r} in Slurm nodelist {spec!r}")
    return [f"{i:0{len(lo)}d}" for i in range(int(lo), int(hi) + 1)]


def _expand_item(item: str, spec: str) -> list[str]:
    """One host expression; several bracket groups form a product: 'r[1-2]n[1-2]' -> 4 hosts."""
    m = re.search(r"\[([^\]]*)\]", item)
    if m is None:
        return [item]
    values = [v for part in m.group(1).split(",") for v in _expand_range(part.strip(), spec)]
    tails = _expand_item(item[m.end() :], spec)
    return [item[: m.start()] + v + t for v in values for t in tails]


def expand_nodelist(spec: str) -> list[str]:
    """Expand Slurm's compact hostlist syntax ('node[01-03,07],gpu5') into host names, in order."""
    hosts = [h for item in _split_top_level(spec) for h in _expand_item(item, spec)]
    if not hosts:
        raise ValueError(f"empty Slurm nodelist {spec!r}")
    return hosts


def hostnames(spec: str) -> list[str]:
    """Hosts of a nodelist: `scontrol show hostnames` when installed (it knows every syntax
    extension), else our parser."""
    if shutil.which("scontrol"):
        try:
            out = subprocess.run(
                ["scontrol", "show", "hostnames", spec],
                capture_output=True,
                text=True,
                check=True,
                timeout=30,
            ).stdout.split()
            if out:
                return out
        except (OSError, subprocess.SubprocessError):
            pass  # e.g. no slurm.conf on this host: the local parser still works
    return expand_nodelist(spec)


def expand_tasks_per_node(spec: str) -> list[int]:
    """SLURM_TASKS_PER_NODE syntax: '2(x3),1' -> [2, 2, 2, 1]."""
    counts: list[int] = []
    for item in spec.split(","):
        m = re.fullmatch(r"\s*(\d+)(?:\(x(\d+)\))?\s*", item)
        if m is None:
            raise ValueError(f"bad tasks-per-node value {spec!r}")
        counts += [int(m.group(1))] * int(m.group(2) or 1)
    return counts


def _first(env: Mapping[str, str], names: tuple[str, ...]) -> str | None:
    return next((env[n] for n in names if env.get(n)), None)


def local_world_size(env: Mapping[str, str]) -> int:
    """Tasks on this task's node (node counts may differ, so index by SLURM_NODEID)."""
    spec = _first(env, TASKS_PER_NODE_VARS)
    if spec:
        counts = expand_tasks_per_node(spec)
        node = int(env.get("SLURM_NODEID", "0"))
        if 0 <= node < len(counts):
            return counts[node]
    per_node = env.get("SLURM_NTASKS_PER_NODE")
    return int(per_node.split("(")[0]) if per_node else 1


def rank_env(env: Mapping[str, str]) -> dict[str, str]:
    """RANK / LOCAL_RANK / WORLD_SIZE / LOCAL_WORLD_SIZE and a MASTER_ADDR guess for one task."""
    if "SLURM_PROCID" not in env:
        raise RuntimeError(
            "Slurm ranks requested but SLURM_PROCID is not set: start train.py with srun "
            "(one task per GPU), or use deepy.py"
        )
    world = env.get("SLURM_NTASKS") or env.get("SLURM_NPROCS")
    if not world:
        raise RuntimeError("SLURM_PROCID is set but SLURM_NTASKS is not: run train.py via srun")
    out = {
        "RANK": env["SLURM_PROCID"],
        "LOCAL_RANK": env.get("SLURM_LOCALID", "0"),
        "WORLD_SIZE": world,
        "LOCAL_WORLD_SIZE": str(local_world_size(env)),
    }
    nodelist = _first(env, NODELIST_VARS)
    if nodelist:
        # Block distribution (srun's default) puts task 0 on the first host of the step.
        out["MASTER_ADDR"] = hostnames(nodelist)[0]
    elif out["WORLD_SIZE"] == out["LOCAL_WORLD_SIZE"]:
        out["MASTER_ADDR"] = "127.0.0.1"
    return out


def srun_command(
    lc: LauncherConfig, procs_per_node: int | None, script: str, script_args: list[str]
) -> list[str]:
    """srun line for `launcher: slurm`: one task per GPU; train.py maps SLURM_* itself."""
    cmd = ["srun"]
    if lc.num_nodes > 0:
        cmd.append(f"--nodes={lc.num_nodes}")
    if procs_per_node:
        cmd.append(f"--ntasks-per-node={procs_per_node}")
        if lc.num_nodes > 0:
            cmd.append(f"--ntasks={lc.num_nodes * procs_per_node}")
    if lc.include:
        cmd.append(f"--nodelist={lc.include.replace('@', ',')}")
    if lc.exclude:
        cmd.append(f"--exclude={lc.exclude.replace('@', ',')}")
    # One failed rank must end the step, not leave the others blocked in a collective.
    cmd.append("--kill-on-bad-exit=1")
    cmd += shlex.split(lc.launcher_args or "")
    return cmd + [sys.executable, "-u", script, *script_args]
