"""deepy.py: hostfile handling and the launch command for each mode (--dry-run, no processes)."""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import Any

import pytest
import yaml

from megatron.config import ConfigError
from megatron.config.schema import LauncherConfig
from megatron.config.sources import decode_sources
from megatron.launch import deepy, hosts
from tests.conftest import run_cli

TRAIN = {
    "num_layers": 2,
    "hidden_size": 64,
    "num_attention_heads": 4,
    "seq_length": 32,
    "train_micro_batch_size_per_gpu": 2,
    "train_iters": 2,
    "data_path": "data/x",
    "master_port": 29612,
}


@pytest.fixture
def hostfile(tmp_path: Path) -> str:
    path = tmp_path / "hostfile"
    path.write_text("# two workers\nworker-0 slots=2\nworker-1 slots=2\n\nworker-2 slots=2\n")
    return str(path)


def dry_run(tmp_path: Path, capsys: pytest.CaptureFixture, *flags: str, **keys: Any) -> str:
    """The command deepy.py prints for TRAIN + keys; fails on a non-zero exit."""
    cfg = tmp_path / "c.yml"
    cfg.write_text(yaml.safe_dump({**TRAIN, **keys}))
    code = deepy.main(["train.py", str(cfg), "--dry-run", *flags])
    out, err = capsys.readouterr()
    assert code == 0, err
    return out


def dry_run_error(tmp_path: Path, capsys: pytest.CaptureFixture, *flags: str, **keys: Any) -> str:
    cfg = tmp_path / "c.yml"
    cfg.write_text(yaml.safe_dump({**TRAIN, **keys}))
    assert deepy.main(["train.py", str(cfg), "--dry-run", *flags]) == 2
    return capsys.readouterr().err


def test_read_hostfile(hostfile: str, tmp_path: Path) -> None:
    assert hosts.read_hostfile(hostfile) == {"worker-0": 2, "worker-1": 2, "worker-2": 2}
    with pytest.raises(ConfigError, match="does not exist"):
        hosts.read_hostfile(str(tmp_path / "missing"))
    bad = tmp_path / "bad"
    bad.write_text("worker-0 gpus=2\n")
    with pytest.raises(ConfigError, match="bad entry"):
        hosts.read_hostfile(str(bad))


@pytest.mark.parametrize(
    ("kw", "pool"),
    [
        ({}, {"worker-0": [0, 1], "worker-1": [0, 1], "worker-2": [0, 1]}),
        ({"num_nodes": 2, "num_gpus": 1}, {"worker-0": [0], "worker-1": [0]}),
        ({"include": "worker-1@worker-2:1"}, {"worker-1": [0, 1], "worker-2": [1]}),
        ({"exclude": "worker-0@worker-2:0"}, {"worker-1": [0, 1], "worker-2": [1]}),
    ],
)
def test_resolve_pool(hostfile: str, kw: dict[str, Any], pool: dict[str, list[int]]) -> None:
    lc = LauncherConfig(hostfile=hostfile, **kw)
    assert hosts.resolve_pool(lc, hosts.read_hostfile(hostfile)) == pool


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        ({"include": "worker-9"}, "not found in hostfile"),
        ({"include": "worker-0:5"}, "No slot '5'"),
        ({"num_nodes": 4}, "lists 3"),
    ],
)
def test_resolve_pool_errors(hostfile: str, kw: dict[str, Any], message: str) -> None:
    lc = LauncherConfig(hostfile=hostfile, **kw)
    with pytest.raises(ConfigError, match=message):
        hosts.resolve_pool(lc, hosts.read_hostfile(hostfile))


def test_single_node(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = dry_run(tmp_path, capsys, "--num-gpus", "2")
    assert out.strip() == (
        "deepspeed --num_gpus 2 --master_port 29612 train.py --config-b64 '<config>'"
    )


def test_pdsh_hostfile(tmp_path: Path, capsys: pytest.CaptureFixture, hostfile: str) -> None:
    out = dry_run(tmp_path, capsys, hostfile=hostfile, num_nodes=2, master_addr="worker-0")
    assert shlex.split(out)[:12] == [
        "deepspeed",
        "--hostfile",
        hostfile,
        "--launcher",
        "pdsh",
        "--num_nodes",
        "2",
        "--master_addr",
        "worker-0",
        "--master_port",
        "29612",
        "train.py",
    ]
    out = dry_run(tmp_path, capsys, hostfile=hostfile, include="worker-1:0,1@worker-2")
    assert "--include worker-1:0,1@worker-2 --master_port" in out and "--num_nodes" not in out


def test_world_size_from_hostfile_is_validated(
    tmp_path: Path, capsys: pytest.CaptureFixture, hostfile: str
) -> None:
    # 3 hosts x 2 slots = 6 ranks; a 4-sample batch cannot be split over them.
    err = dry_run_error(tmp_path, capsys, hostfile=hostfile, train_batch_size=4)
    assert "data-parallel size 6" in err
    dry_run(tmp_path, capsys, hostfile=hostfile, train_batch_size=12)


def test_openmpi_gets_a_trimmed_hostfile(
    tmp_path: Path, capsys: pytest.CaptureFixture, hostfile: str
) -> None:
    out = dry_run(
        tmp_path,
        capsys,
        hostfile=hostfile,
        launcher="openmpi",
        num_nodes=2,
        num_gpus=1,
        master_addr="10.0.0.1",
        launcher_args="--mca btl_tcp_if_include ib0",
    )
    cmd, listing = out.split("\n", 1)
    assert "--hostfile '<hostfile>' --launcher openmpi --launcher_args" in cmd
    assert "'--mca btl_tcp_if_include ib0 -x MASTER_ADDR=10.0.0.1 -x MASTER_PORT=29612'" in cmd
    assert "--num_nodes" not in cmd and "--num_gpus" not in cmd  # the runner refuses them
    assert listing.split() == ["<hostfile>:", "worker-0", "slots=1", "worker-1", "slots=1"]


def test_no_ssh_node_rank_without_hostfile(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    flags = ("--node-rank", "1", "--num-nodes", "2", "--num-gpus", "3")
    out = dry_run(tmp_path, capsys, *flags, "--master-addr", "10.0.0.1")
    assert out.strip() == (
        "deepspeed --hostfile '<hostfile>' --no_ssh --node_rank 1 --master_addr 10.0.0.1 "
        "--master_port 29612 train.py --config-b64 '<config>'\n"
        "<hostfile>:\nnode0 slots=3\nnode1 slots=3"
    )


def test_no_ssh_node_rank_with_hostfile(
    tmp_path: Path, capsys: pytest.CaptureFixture, hostfile: str
) -> None:
    keys = {"hostfile": hostfile, "master_addr": "worker-0"}
    out = dry_run(tmp_path, capsys, "--node-rank", "2", **keys)
    assert f"--hostfile {hostfile} --no_ssh --node_rank 2 --master_addr worker-0" in out
    err = dry_run_error(tmp_path, capsys, "--node-rank", "3", **keys)
    assert "node_rank 3 out of range: the job has 3 nodes" in err


def test_node_rank_is_not_sent_to_ranks(
    tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    launched: list[deepy.LaunchPlan] = []
    monkeypatch.setattr(deepy, "execute", lambda plan: launched.append(plan) or 0)
    cfg = tmp_path / "c.yml"
    cfg.write_text(yaml.safe_dump({**TRAIN, "num_nodes": 2, "master_addr": "127.0.0.1"}))
    assert deepy.main(["train.py", str(cfg), "--node-rank", "1", "--set", "seed=3"]) == 0
    (plan,) = launched
    assert plan.world_size == 2 and plan.argv[plan.argv.index("--node_rank") + 1] == "1"
    sources, _ = decode_sources(plan.argv[-1])
    # Every node sends the same config: node_rank stays out, --set overrides go in.
    assert dict(sources)["overrides"] == {"seed": 3}


def test_slurm_srun_command(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = dry_run(tmp_path, capsys, launcher="slurm", num_nodes=2, num_gpus=4, exclude="bad1")
    # srun takes the hosts from the allocation; --nodes and --exclude combine.
    argv = shlex.split(out)
    assert argv[:6] == [
        "srun",
        "--nodes=2",
        "--ntasks-per-node=4",
        "--ntasks=8",
        "--exclude=bad1",
        "--kill-on-bad-exit=1",
    ]
    assert argv[-3:] == ["train.py", "--config-b64", "<config>"]


@pytest.mark.parametrize(
    ("flags", "keys", "message"),
    [
        ((), {"num_nodes": 2}, "needs a hostfile"),
        (("--node-rank", "0", "--num-nodes", "2"), {}, "needs master_addr"),
        (("--launcher", "torque"), {}, "launcher = 'torque'"),
        ((), {"hostfile": "/nonexistent/hostfile"}, "does not exist"),
    ],
)
def test_clear_errors_before_launch(
    tmp_path: Path, capsys: pytest.CaptureFixture, flags: tuple, keys: dict, message: str
) -> None:
    assert message in dry_run_error(tmp_path, capsys, *flags, **keys)


def test_preflight_names_missing_programs(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(deepy.shutil, "which", lambda name: None)
    plan = deepy.LaunchPlan("deepspeed", [], 4, needs=["pdsh"])
    with pytest.raises(ConfigError, match="on every node"):
        deepy.preflight(plan)
    with pytest.raises(ConfigError, match="Slurm allocation"):
        deepy.preflight(deepy.LaunchPlan("srun", [], 4, needs=["srun"]))


def test_hostfile_written_for_the_launch_only() -> None:
    plan = deepy.LaunchPlan("deepspeed", ["--hostfile", deepy.HOSTFILE, "x"], 2, "n0 slots=2\n")
    with deepy.materialized(plan) as argv:
        path = Path(argv[1])
        assert path.read_text() == "n0 slots=2\n" and argv[2] == "x"
    assert not path.exists()


def test_cli_dry_run(tmp_path: Path) -> None:
    cfg = tmp_path / "c.yml"
    cfg.write_text(yaml.safe_dump(TRAIN))
    out = run_cli(["deepy.py", "train.py", str(cfg), "--dry-run", "--num-gpus", "2"], timeout=120)
    assert "deepspeed --num_gpus 2 --master_port 29612 train.py" in out.stdout


def test_print_config_for_sbatch(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    cfg = tmp_path / "c.yml"
    cfg.write_text(yaml.safe_dump(TRAIN))
    assert deepy.main(["train.py", str(cfg), "--print-config", "--launcher", "slurm"]) == 0
    sources, raw = decode_sources(capsys.readouterr().out.strip())
    assert dict(sources)["overrides"] == {"launcher": "slurm"} and str(cfg) in raw
