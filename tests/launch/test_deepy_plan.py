"""deepy.py: hostfile handling and the launch command for each mode (--dry-run, no processes)."""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path
from typing import Any

import pytest
import yaml

from megatron.config import ConfigError
from megatron.config.schema import LauncherConfig
from megatron.config.sources import (
    CONFIG_ENV,
    decode_sources,
    launch_sources,
    read_sources_env,
    read_sources_file,
)
from megatron.launch import deepy, hosts
from megatron.training.main import parse_args as train_parse_args
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


# --dry-run shows the config file a launch writes as a placeholder (it writes nothing).
CONFIG_FILE = "'<config-file>'"
CONFIG_NOTE = (
    r"<config-file>: written at launch as /\S+/config-<time>-<host>-<pid>\.json "
    r"\(not by --dry-run\)"
)


def test_single_node(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = dry_run(tmp_path, capsys, "--num-gpus", "2", "--config-dir", str(tmp_path / "cfgs"))
    # A readable command: the config travels in a file, not as a blob on the command line.
    assert re.fullmatch(
        "deepspeed --num_gpus 2 --master_port 29612 train.py --config-file '<config-file>'\n"
        "<config-file>: written at launch as "
        + re.escape(str(tmp_path / "cfgs"))
        + r"/config-<time>-<host>-<pid>\.json \(not by --dry-run\)",
        out.strip(),
    ), out
    assert not (tmp_path / "cfgs").exists()  # --dry-run writes nothing


def test_pdsh_hostfile(tmp_path: Path, capsys: pytest.CaptureFixture, hostfile: str) -> None:
    out = dry_run(tmp_path, capsys, hostfile=hostfile, num_nodes=2, master_addr="worker-0")
    # Other nodes may not share a file system: the config rides in a PYTHON* variable, which
    # DeepSpeed's runner exports to every node.
    assert shlex.split(out)[-2:] == ["--config-env", CONFIG_ENV]
    assert shlex.split(out)[:13] == [
        f"{CONFIG_ENV}=<config>",
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
    # deepy.py runs on every node, so each node writes its own file: no shared file system.
    assert re.fullmatch(
        "deepspeed --hostfile '<hostfile>' --no_ssh --node_rank 1 --master_addr 10.0.0.1 "
        "--master_port 29612 train.py --config-file " + CONFIG_FILE + "\n"
        "<hostfile>:\nnode0 slots=3\nnode1 slots=3\n" + CONFIG_NOTE,
        out.strip(),
    ), out


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
    launched: list[tuple[deepy.LaunchPlan, Any]] = []
    # The config file exists while the launch runs (deepy.py removes it afterwards).
    read = lambda plan: launched.append((plan, read_sources_file(plan.argv[-1]))) or 0  # noqa: E731
    monkeypatch.setattr(deepy, "execute", read)
    cfg = tmp_path / "c.yml"
    cfg.write_text(yaml.safe_dump({**TRAIN, "num_nodes": 2, "master_addr": "127.0.0.1"}))
    flags = ["--node-rank", "1", "--set", "seed=3", "--config-dir", str(tmp_path)]
    assert deepy.main(["train.py", str(cfg), *flags]) == 0
    ((plan, (sources, _)),) = launched
    assert plan.world_size == 2 and plan.argv[plan.argv.index("--node_rank") + 1] == "1"
    assert plan.argv[-2] == "--config-file" and not plan.env
    # Every node sends the same config: node_rank stays out, --set overrides go in.
    assert dict(sources)["overrides"] == {"seed": 3}


def test_slurm_srun_command(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = dry_run(tmp_path, capsys, launcher="slurm", num_nodes=2, num_gpus=4, exclude="bad1")
    # srun takes the hosts from the allocation; --nodes and --exclude combine.
    argv = shlex.split(out)
    assert argv.pop(0) == f"{CONFIG_ENV}=<config>"  # srun hands its environment to the tasks
    assert argv[:6] == [
        "srun",
        "--nodes=2",
        "--ntasks-per-node=4",
        "--ntasks=8",
        "--exclude=bad1",
        "--kill-on-bad-exit=1",
    ]
    assert argv[-3:] == ["train.py", "--config-env", CONFIG_ENV]


@pytest.mark.parametrize(
    ("flags", "keys", "message"),
    [
        ((), {"num_nodes": 2}, "needs a hostfile"),
        (("--node-rank", "0", "--num-nodes", "2"), {}, "needs master_addr"),
        (("--launcher", "torque"), {}, "launcher = 'torque'"),
        ((), {"hostfile": "/nonexistent/hostfile", "num_nodes": 2}, "does not exist"),
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


def _launch(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, *flags: str, at_launch=None, **keys: Any
):
    """deepy.main up to the launch; returns (plan, config path). `at_launch(plan)` runs while
    the launch would (the config file exists then; deepy.py removes it afterwards)."""
    launched: list[deepy.LaunchPlan] = []

    def execute(plan: deepy.LaunchPlan) -> int:
        launched.append(plan)
        if at_launch is not None:
            at_launch(plan)
        return 0

    monkeypatch.setattr(deepy, "execute", execute)
    cfg = tmp_path / "c.yml"
    cfg.write_text(yaml.safe_dump({**TRAIN, **keys}))
    assert deepy.main(["train.py", str(cfg), *flags]) == 0
    return launched[0], cfg


def test_config_file_next_to_the_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    save = tmp_path / "ckpt"
    seen: dict[str, Any] = {}

    def at_launch(plan: deepy.LaunchPlan) -> None:
        path = Path(plan.argv[-1])
        seen["payload"] = json.loads(path.read_text())  # readable JSON, written atomically
        seen["listing"] = [p.name for p in path.parent.iterdir()]
        # What train.py on a rank reads back: the same sources and raw YAML text.
        args = train_parse_args(plan.argv[plan.argv.index("train.py") + 1 :])
        seen["read"] = launch_sources(args.config_file, args.config_env, args.config_b64)

    plan, cfg = _launch(
        tmp_path, monkeypatch, "--set", "seed=5", at_launch=at_launch, save=str(save)
    )
    path = Path(plan.argv[-1])
    assert plan.argv[-2] == "--config-file" and path.parent == save / "launch"
    payload = seen["payload"]
    assert payload["format"] == 1 and "deepy.py on " in payload["written_by"]
    assert seen["listing"] == [path.name]  # no temporary left
    sources, raw = seen["read"]
    assert dict(sources)["overrides"] == {"seed": 5} and raw == {str(cfg): cfg.read_text()}
    assert not path.parent.exists()  # removed when the launch ended


def test_config_via_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    plan, cfg = _launch(tmp_path, monkeypatch, "--config-via", "env", "--num-gpus", "2")
    assert plan.argv[-2:] == ["--config-env", CONFIG_ENV] and len(plan.env[CONFIG_ENV]) > 200
    monkeypatch.setenv(CONFIG_ENV, plan.env[CONFIG_ENV])
    sources, raw = read_sources_env()
    assert str(cfg) in raw and dict(sources)[str(cfg)]["seq_length"] == 32
    monkeypatch.delenv(CONFIG_ENV)
    with pytest.raises(ConfigError, match="did not forward it"):
        read_sources_env()


def test_config_via_file_on_many_nodes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, hostfile: str
) -> None:
    monkeypatch.setattr(deepy, "preflight", lambda plan: None)  # no pdsh needed here
    shared = tmp_path / "shared"
    flags = ("--config-via", "file", "--config-dir", str(shared))
    plan, _ = _launch(tmp_path, monkeypatch, *flags, hostfile=hostfile, master_addr="worker-0")
    assert plan.remote and not plan.env and Path(plan.argv[-1]).parent == shared
    assert "<config>" not in deepy.describe(plan)


def test_missing_config_file_says_what_to_do(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="--config-via env"):
        read_sources_file(str(tmp_path / "nowhere.json"))
    bad = tmp_path / "bad.json"
    bad.write_text('{"something": 1}')
    with pytest.raises(ConfigError, match="not a config written by deepy.py"):
        read_sources_file(str(bad))


def test_train_takes_yaml_or_launch_config_not_both(tmp_path: Path) -> None:
    assert train_parse_args(["a.yml", "--set", "x=1"]).configs == ["a.yml"]
    assert train_parse_args(["--config-file", "c.json"]).config_file == "c.json"
    with pytest.raises(SystemExit):
        train_parse_args(["a.yml", "--config-file", "c.json"])
    with pytest.raises(SystemExit):
        train_parse_args(["--config-file", "c.json", "--config-env", CONFIG_ENV])


def test_dry_run_stdout_holds_only_the_command(
    tmp_path: Path, capsys: pytest.CaptureFixture, hostfile: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Case 17 of the reliability issue: a library logging to a handler bound to stdout (as
    DeepSpeed's logger is, whenever deepspeed was first imported) must not reach the output."""
    import logging
    import sys

    noisy = logging.getLogger("tests.noisy_library")
    handler = logging.StreamHandler(sys.stdout)  # bound now, like DeepSpeed's at import
    noisy.addHandler(handler)
    real_read = hosts.read_hostfile

    def read(path: str) -> dict[str, int]:
        noisy.warning("Setting accelerator to CPU")
        print("a stray print")
        return real_read(path)

    monkeypatch.setattr(hosts, "read_hostfile", read)
    try:
        out = dry_run(tmp_path, capsys, hostfile=hostfile, launcher="openmpi", num_nodes=1)
    finally:
        noisy.removeHandler(handler)
    assert out.startswith("deepspeed --hostfile"), out
    assert handler.stream is sys.stdout  # restored afterwards


def test_dry_run_of_a_model_parallel_config_plans_tp_x_pp_processes(
    tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A NeoX user's TP=2 x PP=2 config on a host without GPUs: the plan a GPU node would run,
    # not "world size 1 is not divisible"; a real launch still needs the process count.
    monkeypatch.setattr(deepy.torch.cuda, "is_available", lambda: False)
    out = dry_run(tmp_path, capsys, model_parallel_size=2, pipe_parallel_size=2, num_layers=4)
    assert out.startswith("deepspeed --num_gpus 4 "), out
    out = dry_run(tmp_path, capsys, "--num-gpus", "8", model_parallel_size=2, num_layers=4)
    assert out.startswith("deepspeed --num_gpus 8 "), out  # an explicit count wins
    err = dry_run_error(tmp_path, capsys, "--num-gpus", "3", model_parallel_size=2, num_layers=4)
    assert "world size 3 is not divisible by TP x PP = 2" in err
