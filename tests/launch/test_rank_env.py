"""Slurm nodelists, scheduler / MPI variables -> RANK & co., and launcher-section validation."""

from __future__ import annotations

import logging
import os
import stat
from pathlib import Path
from typing import Any

import pytest

from megatron.config import ConfigError, validate
from megatron.config.launcher import validate_launcher
from megatron.config.loader import build_config, merge_sources
from megatron.config.schema import LauncherConfig
from megatron.launch import mpi, slurm
from megatron.launch.environment import map_scheduler_env


@pytest.mark.parametrize(
    ("spec", "hosts"),
    [
        ("localhost", ["localhost"]),
        ("node[01-03,07]", ["node01", "node02", "node03", "node07"]),
        ("gpu5,node[8-10]", ["gpu5", "node8", "node9", "node10"]),
        ("n[098-101]", ["n098", "n099", "n100", "n101"]),
        ("rack[1-2]-n[1,3]", ["rack1-n1", "rack1-n3", "rack2-n1", "rack2-n3"]),
        ("a[1-2].ib,b", ["a1.ib", "a2.ib", "b"]),
    ],
)
def test_expand_nodelist(spec: str, hosts: list[str]) -> None:
    assert slurm.expand_nodelist(spec) == hosts


@pytest.mark.parametrize("spec", ["node[1-", "node]1[", "node[3-1]", "node[a-b]", "", "n[1,,2]"])
def test_bad_nodelist_is_an_error(spec: str) -> None:
    with pytest.raises(ValueError, match="nodelist"):
        slurm.expand_nodelist(spec)


def test_hostnames_prefers_scontrol(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake = tmp_path / "scontrol"
    fake.write_text('#!/bin/sh\necho "from-scontrol-1"\necho "from-scontrol-2"\n')
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    assert slurm.hostnames("x[1-2]") == ["from-scontrol-1", "from-scontrol-2"]
    fake.write_text("#!/bin/sh\nexit 1\n")  # e.g. no slurm.conf here: fall back to the parser
    assert slurm.hostnames("x[1-2]") == ["x1", "x2"]


def test_tasks_per_node() -> None:
    assert slurm.expand_tasks_per_node("2(x3),1") == [2, 2, 2, 1]
    assert slurm.expand_tasks_per_node("4") == [4]
    with pytest.raises(ValueError, match="tasks-per-node"):
        slurm.expand_tasks_per_node("2(3)")


SLURM_TASK = {
    "SLURM_JOB_ID": "42",
    "SLURM_PROCID": "5",
    "SLURM_LOCALID": "1",
    "SLURM_NTASKS": "6",
    "SLURM_NODEID": "2",
    "SLURM_STEP_TASKS_PER_NODE": "2(x2),3",
    "SLURM_JOB_NODELIST": "big[1-9]",
    "SLURM_STEP_NODELIST": "gpu[07-09]",
}


def launcher(**kw: Any) -> LauncherConfig:
    return LauncherConfig(**kw)


def test_slurm_task_mapping() -> None:
    env = dict(SLURM_TASK)
    assert map_scheduler_env(env, launcher(launcher="slurm", master_port=1234)) == "slurm"
    assert (env["RANK"], env["LOCAL_RANK"], env["WORLD_SIZE"]) == ("5", "1", "6")
    assert env["LOCAL_WORLD_SIZE"] == "3"  # node 2 of '2(x2),3'
    assert (env["MASTER_ADDR"], env["MASTER_PORT"]) == ("gpu07", "1234")  # the step's first host


def test_slurm_addresses_config_and_env_win() -> None:
    env = dict(SLURM_TASK)
    map_scheduler_env(env, launcher(rank_source="slurm", master_addr="10.0.0.9"))
    assert (env["MASTER_ADDR"], env["MASTER_PORT"]) == ("10.0.0.9", "29500")
    env = {**SLURM_TASK, "MASTER_ADDR": "head", "MASTER_PORT": "7"}
    map_scheduler_env(env, launcher(launcher="slurm", master_addr="ignored", master_port=9))
    assert (env["MASTER_ADDR"], env["MASTER_PORT"]) == ("head", "7")


def test_slurm_single_node_without_nodelist() -> None:
    env = {"SLURM_PROCID": "0", "SLURM_NTASKS": "2", "SLURM_TASKS_PER_NODE": "2"}
    map_scheduler_env(env, launcher(launcher="slurm"))
    assert (env["LOCAL_RANK"], env["MASTER_ADDR"]) == ("0", "127.0.0.1")
    env = {"SLURM_PROCID": "0", "SLURM_NTASKS": "4", "SLURM_TASKS_PER_NODE": "2(x2)"}
    with pytest.raises(RuntimeError, match="master_addr"):
        map_scheduler_env(env, launcher(launcher="slurm"))


def test_slurm_needs_srun_variables() -> None:
    with pytest.raises(RuntimeError, match="srun"):
        map_scheduler_env({"SLURM_JOB_ID": "1"}, launcher(rank_source="slurm"))


def test_slurm_not_used_unless_asked(caplog: pytest.LogCaptureFixture) -> None:
    env = dict(SLURM_TASK)
    with caplog.at_level(logging.WARNING, logger="megatron"):
        assert map_scheduler_env(env, launcher()) == "none"
    assert "RANK" not in env and "launcher: slurm" in caplog.text


def test_launcher_rank_wins() -> None:
    env = {**SLURM_TASK, "RANK": "3", "OMPI_COMM_WORLD_RANK": "0", "OMPI_COMM_WORLD_SIZE": "2"}
    assert map_scheduler_env(env, launcher(launcher="slurm", master_port=77)) == "launcher"
    assert (env["RANK"], env["MASTER_PORT"]) == ("3", "77")


OMPI = {
    "OMPI_COMM_WORLD_RANK": "3",
    "OMPI_COMM_WORLD_LOCAL_RANK": "1",
    "OMPI_COMM_WORLD_SIZE": "4",
    "OMPI_COMM_WORLD_LOCAL_SIZE": "2",
}
HYDRA = {"PMI_RANK": "1", "PMI_SIZE": "2", "MPI_LOCALRANKID": "1", "MPI_LOCALNRANKS": "2"}


@pytest.fixture
def no_mpi4py(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(mpi, "_import_mpi", lambda: None)


def test_open_mpi_variables(no_mpi4py: None) -> None:
    env = {**OMPI, "MASTER_ADDR": "node0"}
    assert map_scheduler_env(env, launcher(master_port=555)) == "mpi"
    got = [env[k] for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE")]
    assert got == ["3", "1", "4", "2"]
    assert (env["MASTER_ADDR"], env["MASTER_PORT"]) == ("node0", "555")


def test_mpich_variables_single_node(no_mpi4py: None) -> None:
    env = dict(HYDRA)
    map_scheduler_env(env, launcher())
    assert (env["RANK"], env["LOCAL_RANK"], env["MASTER_ADDR"]) == ("1", "1", "127.0.0.1")


def test_multi_node_mpi_needs_an_address(no_mpi4py: None) -> None:
    with pytest.raises(RuntimeError, match="MASTER_ADDR"):
        map_scheduler_env(dict(OMPI), launcher())
    env = dict(OMPI)
    map_scheduler_env(env, launcher(master_addr="10.1.1.1"))
    assert env["MASTER_ADDR"] == "10.1.1.1"


def test_forced_mpi_without_mpi_is_an_error(no_mpi4py: None) -> None:
    with pytest.raises(RuntimeError, match="mpirun"):
        map_scheduler_env({}, launcher(rank_source="mpi"))


class FakeComm:
    """COMM_WORLD of a 4-rank, 2-node job as seen from `rank`; records the broadcast."""

    def __init__(self, rank: int, size: int = 4, local: tuple[int, int] | None = None) -> None:
        self.rank, self.size, self.local, self.sent = rank, size, local, None

    def Get_rank(self) -> int:
        return self.rank

    def Get_size(self) -> int:
        return self.size

    def Split_type(self, kind: int) -> FakeComm:
        local_rank, local_size = self.local or (self.rank % 2, 2)
        return FakeComm(local_rank, local_size)

    def Free(self) -> None:
        pass

    def bcast(self, value: str | None, root: int) -> str:
        self.sent = value
        return "addr-of-rank-0" if self.rank else value


def fake_mpi(comm: FakeComm) -> Any:
    return type("MPI", (), {"COMM_WORLD": comm, "COMM_TYPE_SHARED": 0})


def test_mpi4py_ranks_and_broadcast(monkeypatch: pytest.MonkeyPatch) -> None:
    root = FakeComm(0)
    monkeypatch.setattr(mpi, "_import_mpi", lambda: fake_mpi(root))
    monkeypatch.setattr(mpi, "host_address", lambda: "10.2.0.1")
    env: dict[str, str] = {"OMPI_COMM_WORLD_RANK": "0", "OMPI_COMM_WORLD_SIZE": "4"}
    map_scheduler_env(env, launcher())
    assert root.sent == "10.2.0.1" and env["MASTER_ADDR"] == "10.2.0.1"
    other = FakeComm(3)
    monkeypatch.setattr(mpi, "_import_mpi", lambda: fake_mpi(other))
    env = {"PMI_RANK": "3", "PMI_SIZE": "4"}
    map_scheduler_env(env, launcher())
    assert (env["RANK"], env["LOCAL_RANK"], env["LOCAL_WORLD_SIZE"]) == ("3", "1", "2")
    assert env["MASTER_ADDR"] == "addr-of-rank-0"  # never its own guess


def test_mpi4py_single_node_uses_loopback(monkeypatch: pytest.MonkeyPatch) -> None:
    root = FakeComm(0, size=2, local=(0, 2))
    monkeypatch.setattr(mpi, "_import_mpi", lambda: fake_mpi(root))
    env = {"OMPI_COMM_WORLD_RANK": "0", "OMPI_COMM_WORLD_SIZE": "2"}
    map_scheduler_env(env, launcher())
    assert root.sent == "127.0.0.1"


def test_host_address_is_a_string() -> None:
    assert mpi.host_address()


def errors_of(**kw: Any) -> str:
    errors: list[str] = []
    validate_launcher(LauncherConfig(**kw), errors)
    return "\n".join(errors)


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        ({"launcher": "ssh"}, "launcher = 'ssh'"),
        ({"rank_source": "pmi"}, "rank_source = 'pmi'"),
        ({"num_gpus": 0}, "num_gpus must be >= 1"),
        ({"num_nodes": 0}, "num_nodes must be >= 1 or -1"),
        ({"master_port": 70000}, "master_port"),
        ({"hostfile": "h", "include": "a", "exclude": "b"}, "mutually exclusive"),
        ({"hostfile": "h", "include": "a", "num_nodes": 2}, "drop num_nodes / num_gpus"),
        ({"include": "a"}, "set hostfile"),
        ({"hostfile": "h", "launcher": "openmpi", "exclude": "a:1"}, "cannot pick slots"),
        ({"launcher": "slurm", "include": "a:0"}, "srun cannot pick slots"),
        ({"launcher": "slurm", "hostfile": "h"}, "drop hostfile"),
        ({"no_ssh": True}, "no_ssh needs node_rank"),
        ({"node_rank": 2, "num_nodes": 2, "master_addr": "a"}, "out of range for num_nodes 2"),
        ({"node_rank": -1, "num_nodes": 2, "master_addr": "a"}, "node_rank must be >= 0"),
        ({"node_rank": 0, "master_addr": "a"}, "node_rank needs num_nodes"),
        ({"node_rank": 0, "num_nodes": 2}, "needs master_addr"),
        (
            {"node_rank": 0, "num_nodes": 2, "master_addr": "a", "launcher": "slurm"},
            "drop node_rank",
        ),
    ],
)
def test_launcher_errors(kw: dict[str, Any], message: str) -> None:
    assert message in errors_of(**kw)


@pytest.mark.parametrize(
    "kw",
    [
        {},
        {"hostfile": "h", "include": "a@b:0,1"},
        {"hostfile": "h", "num_nodes": 2, "num_gpus": 4, "launcher": "openmpi"},
        {"node_rank": 1, "num_nodes": 2, "master_addr": "a", "no_ssh": True},
        {"launcher": "slurm", "exclude": "bad1@bad2", "rank_source": "slurm"},
    ],
)
def test_launcher_ok(kw: dict[str, Any]) -> None:
    assert errors_of(**kw) == ""


def test_validate_reports_launcher_errors() -> None:
    base = {"train_micro_batch_size_per_gpu": 1, "data_path": "x", "launcher": "torque"}
    cfg = build_config(merge_sources([("t", base)]))
    with pytest.raises(ConfigError, match="launcher = 'torque'"):
        validate(cfg)
