"""deepy.py: validate the config once, prepare bundled data, then start the ranks.

Every rank receives the same config sources (parsed YAMLs and overrides, not paths), so nodes
need not share the YAML files: as a JSON file (`train.py --config-file PATH`, written
atomically to `<save>/launch/` or --config-dir) when every rank starts on this host, else in
the environment (`--config-env PYTHON_SEPNEOX_CONFIG`, which DeepSpeed's runner and srun
forward to every node); `--config-via` forces either. How the ranks start (docs/launch.md):
- one node: DeepSpeed's runner, `--num_gpus N` local processes;
- hostfile: DeepSpeed's runner over pdsh (ssh) or mpirun (openmpi, mpich, mvapich, impi);
- `--node-rank K` on every node: DeepSpeed's runner with --no_ssh starts this node's ranks;
- `launcher: slurm`: srun, one task per GPU; train.py reads SLURM_* itself.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import logging
import os
import shlex
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from megatron.common.accelerator import pin_cpu_accelerator
from megatron.config.launcher import MPI_LAUNCHERS, validate_launcher
from megatron.config.loader import ConfigError, build_config, merge_sources
from megatron.config.schema import Config, LauncherConfig, ParallelConfig
from megatron.config.sources import (
    CONFIG_ENV,
    Sources,
    encode_sources,
    gather_sources,
    write_sources_file,
)
from megatron.config.validate import validate
from megatron.data.bundled import prepare_bundled_data
from megatron.launch import hosts, slurm

log = logging.getLogger("megatron")

# Where ranks report a fatal error (= main.ERRORS_ENV; launch must not import training).
ERRORS_ENV = "PYTHON_SEPNEOX_ERRORS"
# "<host> <pid>" of this process: local ranks stop when it is gone (= main.LAUNCHER_ENV).
LAUNCHER_ENV = "PYTHON_SEPNEOX_LAUNCHER"
HOSTFILE = "<hostfile>"  # stands for a hostfile deepy.py writes just before launching
CONFIG_ARGS = "<config-args>"  # stands for train.py's --config-file / --config-env arguments


@dataclass
class LaunchPlan:
    program: str  # "deepspeed" (deepspeed.launcher.runner arguments) or "srun" (a command)
    argv: list[str]
    world_size: int | None  # when knowable before launch
    hostfile_text: str | None = None  # contents for HOSTFILE, when argv uses it
    needs: list[str] = field(default_factory=list)  # programs that must be installed
    remote: bool = False  # ranks start on other hosts (pdsh, mpirun or srun over nodes)
    env: dict[str, str] = field(default_factory=dict)  # set for the launcher and the ranks


def procs_per_node(lc: LauncherConfig) -> int:
    if lc.num_gpus is not None:
        return lc.num_gpus
    return torch.cuda.device_count() if torch.cuda.is_available() else 1


def _common_args(lc: LauncherConfig) -> list[str]:
    args = ["--master_addr", lc.master_addr] if lc.master_addr else []
    args += ["--master_port", str(lc.master_port)]
    if lc.force_multi:
        args.append("--force_multi")
    if lc.no_ssh_check:
        args.append("--no_ssh_check")
    return args


def _filter_args(lc: LauncherConfig) -> list[str]:
    """include/exclude, or num_nodes/num_gpus: the runner accepts only one of the two kinds."""
    if lc.include:
        return ["--include", lc.include]
    if lc.exclude:
        return ["--exclude", lc.exclude]
    args = ["--num_nodes", str(lc.num_nodes)] if lc.num_nodes > 0 else []
    return args + (["--num_gpus", str(lc.num_gpus)] if lc.num_gpus else [])


def _no_ssh_plan(lc: LauncherConfig) -> LaunchPlan:
    """This node only: the runner's --no_ssh --node_rank K starts the local slots of host K."""
    assert lc.node_rank is not None
    if lc.hostfile:
        pool = hosts.resolve_pool(lc, hosts.read_hostfile(lc.hostfile))
        args, text = ["--hostfile", lc.hostfile, *_filter_args(lc)], None
    else:
        slots = hosts.placeholder_hosts(lc.num_nodes, procs_per_node(lc))
        pool = {h: list(range(n)) for h, n in slots.items()}
        args, text = ["--hostfile", HOSTFILE], hosts.render_hostfile(slots)
    if lc.node_rank >= len(pool):
        raise ConfigError(f"node_rank {lc.node_rank} out of range: the job has {len(pool)} nodes")
    args += ["--no_ssh", "--node_rank", str(lc.node_rank), *_common_args(lc)]
    return LaunchPlan("deepspeed", args, hosts.world_size(pool), text)


def _hostfile_plan(lc: LauncherConfig) -> LaunchPlan:
    assert lc.hostfile
    pool = hosts.resolve_pool(lc, hosts.read_hostfile(lc.hostfile))
    args = ["--launcher", lc.launcher]
    multi = len(pool) > 1 or lc.force_multi
    if lc.launcher in MPI_LAUNCHERS:
        # The runner refuses filters for mpirun, and mpirun cannot pick slot ids; so hand it a
        # hostfile of the resolved hosts with their slot counts.
        for host, slots in pool.items():
            if slots != list(range(len(slots))):
                raise ConfigError(f"launcher {lc.launcher} cannot use slots {slots} of {host}")
        text = hosts.render_hostfile({h: len(s) for h, s in pool.items()})
        args = ["--hostfile", HOSTFILE, *args]
        if lc.launcher == "openmpi" and lc.master_addr:
            # mpirun does not forward these by itself (MPICH's runner does).
            extra = f"-x MASTER_ADDR={lc.master_addr} -x MASTER_PORT={lc.master_port}"
            lc_args = f"{lc.launcher_args or ''} {extra}".strip()
        else:
            lc_args = lc.launcher_args or ""
        needs = ["mpirun"] if multi else []
    else:
        args = ["--hostfile", lc.hostfile, *args, *_filter_args(lc)]
        text, lc_args, needs = None, lc.launcher_args or "", ["pdsh"] if multi else []
    if lc_args:
        args += ["--launcher_args", lc_args]
    plan = LaunchPlan("deepspeed", args + _common_args(lc), hosts.world_size(pool), text, needs)
    plan.remote = multi
    return plan


def _slurm_plan(lc: LauncherConfig, script: str, script_args: list[str]) -> LaunchPlan:
    per_node = lc.num_gpus or (torch.cuda.device_count() if torch.cuda.is_available() else None)
    world = lc.num_nodes * per_node if lc.num_nodes > 0 and per_node else None
    if world is None and os.environ.get("SLURM_NTASKS"):  # inside sbatch: the allocation's
        world = int(os.environ["SLURM_NTASKS"])
    cmd = slurm.srun_command(lc, per_node, script, script_args)
    return LaunchPlan("srun", cmd, world, needs=["srun"], remote=True)


def build_plan(lc: LauncherConfig, script: str, script_args: list[str]) -> LaunchPlan:
    """How to start every rank for this launcher section (after validate())."""
    if lc.launcher == "slurm":
        return _slurm_plan(lc, script, script_args)
    if lc.node_rank is not None:
        plan = _no_ssh_plan(lc)
    elif lc.hostfile:
        plan = _hostfile_plan(lc)
    else:
        # No hostfile: one node, so the process count must be explicit (a CPU host has no GPUs
        # for the runner to count).
        if lc.num_nodes > 1:
            raise ConfigError(
                f"num_nodes {lc.num_nodes} needs a hostfile (pdsh / MPI launchers), "
                "--node-rank K on every node (no SSH), or launcher: slurm"
            )
        n = procs_per_node(lc)
        plan = LaunchPlan("deepspeed", ["--num_gpus", str(n), *_common_args(lc)], n)
    plan.argv += [script, *script_args]
    return plan


def describe(plan: LaunchPlan) -> str:
    """The command, shell-quoted, with a serialized config (variable or argument) shortened."""
    argv = [a if len(a) < 200 else "<config>" for a in plan.argv]
    env = [f"{k}={v if len(v) < 200 else '<config>'}" for k, v in plan.env.items()]
    text = shlex.join([*env, *(["deepspeed", *argv] if plan.program == "deepspeed" else argv)])
    if plan.hostfile_text:
        text += f"\n{HOSTFILE}:\n{plan.hostfile_text.rstrip()}"
    return text


def preflight(plan: LaunchPlan) -> None:
    """Fail before launching when a program the plan runs is not installed here."""
    for program in plan.needs:
        if shutil.which(program) is None:
            hint = {
                "pdsh": "install pdsh, or run `deepy.py ... --node-rank K` on every node",
                "srun": "run inside a Slurm allocation (sbatch / salloc)",
                "mpirun": "install Open MPI or MPICH (mpirun) on this node",
            }[program]
            raise ConfigError(f"{program} not found on PATH: {hint}")


def check_master_port(plan: LaunchPlan, lc: LauncherConfig) -> None:
    """When rank 0 starts on this host, its rendezvous port must be free here: a busy port
    used to surface only after the corpus build, as a rank-side EADDRINUSE traceback."""
    if plan.remote or plan.program != "deepspeed" or (lc.node_rank or 0) != 0:
        return  # rank 0 (the rendezvous) runs on another host, or srun picks where
    if lc.master_addr not in (None, "", "localhost", "127.0.0.1", socket.gethostname()):
        return
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as torch's TCPStore does
        try:
            s.bind(("", lc.master_port))
        except OSError as exc:
            raise ConfigError(
                f"master_port {lc.master_port} is in use on this host ({exc.strerror}), "
                "probably by another run; pick a free one with --master-port N or "
                "`master_port: N`"
            ) from exc


@contextlib.contextmanager
def materialized(plan: LaunchPlan) -> Iterator[list[str]]:
    """plan.argv with HOSTFILE replaced by a real file, removed after the launch."""
    if plan.hostfile_text is None:
        yield plan.argv
        return
    fd, path = tempfile.mkstemp(prefix="deepy-hostfile-", suffix=".txt")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(plan.hostfile_text)
        yield [path if a == HOSTFILE else a for a in plan.argv]
    finally:
        os.unlink(path)


def execute(plan: LaunchPlan) -> int:
    # The runner copies this process's environment to local ranks and exports PYTHON*
    # variables to remote ones; srun passes it on (--export=ALL is its default).
    os.environ.update(plan.env)
    with tempfile.TemporaryDirectory(prefix="deepy-errors-") as errors:
        os.environ[ERRORS_ENV] = errors  # PYTHON*: exported to the ranks like the config
        os.environ[LAUNCHER_ENV] = f"{socket.gethostname()} {os.getpid()}"
        with materialized(plan) as argv, forwarded_signals() as received:
            if plan.program == "srun":
                code = subprocess.call(argv)
            else:
                code = _run_deepspeed(argv, quiet=not plan.remote)
        os.environ.pop(ERRORS_ENV, None)
        os.environ.pop(LAUNCHER_ENV, None)
        if code and not received:
            report_rank_errors(errors, code)
    # Interrupted: exit like the signal (128 + number) whatever the runner returned.
    return 128 + received[0] if received else code


def report_rank_errors(directory: str, code: int) -> None:
    """Repeat each failed rank's error last: the launcher logs its own lines (the rank
    command, `exits with return code`) after the traceback, burying the real error."""
    reports = sorted(os.listdir(directory))
    lines = [f"deepy.py: training failed (exit {code})"]
    for name in reports:
        with open(os.path.join(directory, name), encoding="utf-8") as f:
            text = f.read().strip().replace("\n", "\n    ")
        lines.append(f"  {name.removesuffix('.txt')}: {text}")
    if not reports:
        lines.append("  (no rank reported an error: see the output above, e.g. a killed rank)")
    print("\n".join(lines), file=sys.stderr, flush=True)


class _NoHostfileNote(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Unable to find hostfile")


def _run_deepspeed(argv: list[str], quiet: bool) -> int:
    """quiet (ranks on this host only): the runner's and its launcher's INFO bookkeeping
    (world info, the spawned command, CUDA_VISIBLE_DEVICES) and the runner's warning that a
    one-node run has no hostfile repeat what deepy.py printed; errors still show. Over other
    hosts, their `cmd = ...` line is worth keeping."""
    from deepspeed.launcher.runner import main as ds_main
    from deepspeed.utils import logger as ds_logger

    note = _NoHostfileNote()
    if quiet:
        argv = ["--log_level=warning", *argv]
        ds_logger.addFilter(note)
    try:
        ds_main(argv)
    except SystemExit as exc:  # the runner exits with the failed rank's code
        return exc.code if isinstance(exc.code, int) else 1
    finally:
        ds_logger.removeFilter(note)
    return 0


STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


@contextlib.contextmanager
def forwarded_signals() -> Iterator[list[int]]:
    """Pass SIGTERM / SIGINT / SIGHUP on to the launcher's processes instead of dying.

    DeepSpeed's local runner installs no handler, so a signal killed deepy.py and orphaned
    its child (the per-node launcher) and the ranks, which went on training and writing
    checkpoints. Here the signal is forwarded to every child of this process (the runner's
    launcher, srun or mpirun, which stop their ranks) and deepy.py keeps waiting for them, so
    it exits only when they have; the list yielded holds the signals received.
    """
    import psutil  # a DeepSpeed dependency

    received: list[int] = []

    def forward(signum: int, frame: object) -> None:
        received.append(signum)
        log.warning("deepy.py: %s received, passing it to the ranks", signal.Signals(signum).name)
        for child in psutil.Process().children():
            with contextlib.suppress(psutil.Error):
                child.send_signal(signum)

    previous = {s: signal.signal(s, forward) for s in STOP_SIGNALS}
    try:
        yield received
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="deepy.py", description="Launch training: deepy.py train.py a.yml [b.yml ...]"
    )
    p.add_argument("script", help="the per-rank script, normally train.py")
    p.add_argument("configs", nargs="+", help="YAML config files, merged in order")
    p.add_argument(
        "-d",
        "--conf_dir",
        "--conf-dir",
        default=None,
        help="directory the config names are relative to (NeoX's form: "
        "`deepy.py train.py -d configs 125M.yml local_setup.yml`)",
    )
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config key (repeatable), e.g. --set train_iters=10",
    )
    for name, kind, text in (
        ("num_gpus", int, "processes per node"),
        ("num_nodes", int, "nodes in the job"),
        ("master_addr", str, "address of node 0"),
        ("master_port", int, "rendezvous port"),
        ("hostfile", str, "DeepSpeed hostfile"),
        ("launcher", str, "pdsh, openmpi, mpich, mvapich, impi or slurm"),
    ):
        flag = name.replace("_", "-")
        p.add_argument(f"--{flag}", f"--{name}", type=kind, help=f"{text} (= --set {name}=...)")
    p.add_argument(
        "--node-rank",
        "--node_rank",
        type=int,
        default=None,
        help="no-SSH mode: start only node K's ranks (run once per node, K = 0..num_nodes-1)",
    )
    p.add_argument("--dry-run", action="store_true", help="print the launch command only")
    p.add_argument(
        "--config-via",
        choices=("auto", "file", "env"),
        default="auto",
        help="how the ranks get the config: a JSON file (train.py --config-file) or the "
        f"variable {CONFIG_ENV} (--config-env); auto: file when every rank starts on this "
        "host, env when they start on other nodes (no shared file system needed)",
    )
    p.add_argument(
        "--config-dir",
        default=None,
        help="where --config-via file writes config-<time>-<host>-<pid>.json (default: "
        "<save>/launch when `save` is set, else the temp directory); must be visible to "
        "every rank",
    )
    p.add_argument(
        "--print-config",
        action="store_true",
        help=f"validate, then print only the serialized config, for {CONFIG_ENV}=... with "
        "`train.py --config-env` (or `train.py --config-b64`) in an sbatch script that runs "
        "srun itself",
    )
    args = p.parse_args(argv)
    if args.conf_dir:
        args.configs = [os.path.join(args.conf_dir, c) for c in args.configs]
    return args


def config_dir(cfg: Config, requested: str | None, create: bool = True) -> str:
    if requested:
        return os.path.abspath(requested)
    if cfg.checkpoint.save:
        return os.path.join(os.path.abspath(cfg.checkpoint.save), "launch")
    if not create:
        return os.path.join(tempfile.gettempdir(), f"deepy-{os.getuid()}")
    return private_temp_dir()


def private_temp_dir() -> str:
    """`<tmp>/deepy-<uid>`, created mode 0700. Anything else found there (a symlink another
    user planted, another owner, open permissions) is not written through: a fresh private
    `mkdtemp` directory is used instead."""
    path = os.path.join(tempfile.gettempdir(), f"deepy-{os.getuid()}")
    with contextlib.suppress(FileExistsError):
        os.mkdir(path, 0o700)
    st = os.lstat(path)
    if stat.S_ISDIR(st.st_mode) and st.st_uid == os.getuid() and not st.st_mode & 0o077:
        return path
    fresh = tempfile.mkdtemp(prefix=f"deepy-{os.getuid()}-")
    log.warning("deepy.py: %s is not a private directory of this user; using %s", path, fresh)
    return fresh


def config_file_name() -> str:
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    return f"config-{stamp}-{socket.gethostname()}-{os.getpid()}.json"


def pass_config(
    plan: LaunchPlan, via: str, sources: Sources, raw: dict[str, str], directory: str
) -> str | None:
    """Put train.py's config arguments into plan.argv (and the variable into plan.env);
    returns the file to write before launching, if any."""
    if via == "auto":
        via = "env" if plan.remote else "file"
    path = None
    if via == "file":
        path = os.path.join(directory, config_file_name())
        args = ["--config-file", path]
    else:
        plan.env[CONFIG_ENV] = encode_sources(sources, raw)
        args = ["--config-env", CONFIG_ENV]
    plan.argv = [x for a in plan.argv for x in (args if a == CONFIG_ARGS else [a])]
    return path


def _overrides(args: argparse.Namespace) -> list[str]:
    keys = ("num_gpus", "num_nodes", "master_addr", "master_port", "hostfile", "launcher")
    return args.set + [f"{k}={getattr(args, k)}" for k in keys if getattr(args, k) is not None]


@contextlib.contextmanager
def library_output_to_stderr() -> Iterator[None]:
    """While the plan is built, anything a library prints goes to stderr, not stdout.

    `--dry-run` / `--print-config` output is parsed by scripts and tests, so stdout must hold
    only that. DeepSpeed logs "Setting accelerator to CPU" to a handler bound to sys.stdout,
    bound when deepspeed was first imported (possibly long before this call): redirect
    sys.stdout for new handlers and re-point existing stdout stream handlers for the block.
    """
    stdouts = {id(sys.stdout), id(sys.__stdout__)}
    moved = []
    for logger in [logging.getLogger(), *logging.Logger.manager.loggerDict.values()]:
        for h in getattr(logger, "handlers", []):
            if type(h) is logging.StreamHandler and (
                id(h.stream) in stdouts or getattr(h.stream, "name", "") == "<stdout>"
            ):
                moved.append((h, h.stream))
                h.setStream(sys.stderr)
    try:
        with contextlib.redirect_stdout(sys.stderr):
            yield
    finally:
        for h, stream in moved:
            h.setStream(stream)


# Inference entry points run in one process and read their own YAML keys (generation settings
# are not training config), so deepy.py hands them the files unchanged, as NeoX users call them:
# `python deepy.py generate.py model.yml text_generation.yml`, `python deepy.py eval.py
# model.yml --eval_tasks shakespeare_lambada`.
SINGLE_PROCESS_SCRIPTS = ("generate.py", "eval.py")


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    pin_cpu_accelerator(os.environ)  # before DeepSpeed is imported here or in a child
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0].endswith((".yml", ".yaml")):
        print(
            f"deepy.py: the first argument is the script to run on every rank, got the config "
            f"{argv[0]}: python deepy.py train.py {' '.join(argv)}",
            file=sys.stderr,
        )
        return 2
    if argv and os.path.basename(argv[0]) in SINGLE_PROCESS_SCRIPTS:
        log.info("%s runs in one process: python %s", argv[0], " ".join(argv))
        return subprocess.call([sys.executable, *argv])
    args = parse_args(argv)
    try:
        with library_output_to_stderr():
            plan, cfg, sources, raw = _prepare(args)
    except ConfigError as exc:
        print(f"deepy.py: {exc}", file=sys.stderr)
        return 2
    if args.print_config:
        print(encode_sources(sources, raw))
        return 0
    # --dry-run creates nothing, not even the private temporary directory: it names it.
    directory = config_dir(cfg, args.config_dir, create=not args.dry_run)
    path = pass_config(plan, args.config_via, sources, raw, directory)
    if args.dry_run:
        print(describe_dry_run(plan, path, directory))
        return 0
    if path is not None:
        try:
            write_sources_file(path, sources, raw)
        except OSError as exc:  # e.g. `save` is a file or read-only: the pre-flight's wording
            print(
                f"deepy.py: cannot write the launch config {path} (save = {cfg.checkpoint.save}"
                f"): {exc.strerror} ({errno.errorcode.get(exc.errno or 0, '?')}); give a "
                "writable save directory, or --config-dir",
                file=sys.stderr,
            )
            return 2
    log.info("%s", describe(plan))
    try:
        return execute(plan)
    finally:
        if path is not None:
            remove_launch_file(path)


def remove_launch_file(path: str) -> None:
    """The ranks read the config file once, at start-up, and every checkpoint keeps the
    resolved config.yml and the YAMLs: no launch leaves its file (or an empty folder) behind."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
    with contextlib.suppress(OSError):  # not empty: another launch's file is still there
        os.rmdir(os.path.dirname(path))


CONFIG_FILE = "<config-file>"  # stands for the file a real launch writes (--dry-run writes none)


def describe_dry_run(plan: LaunchPlan, path: str | None, directory: str) -> str:
    """The command with the config file a real launch would write shown as a placeholder:
    --dry-run writes nothing, so it must not print a path that will not exist."""
    if path is None:
        return describe(plan)
    shown = LaunchPlan(
        **{**plan.__dict__, "argv": [CONFIG_FILE if a == path else a for a in plan.argv]}
    )
    return (
        f"{describe(shown)}\n{CONFIG_FILE}: written at launch as "
        f"{os.path.join(directory, 'config-<time>-<host>-<pid>.json')} (not by --dry-run)"
    )


def missing_programs(plan: LaunchPlan) -> None:
    """--dry-run: say which program a real launch needs and this host lacks (a warning: the
    dry run may be made on another machine than the launch)."""
    try:
        preflight(plan)
    except ConfigError as exc:
        log.warning("deepy.py: warning: a real launch from this host would fail: %s", exc)


def drop_missing_hostfile(lc: LauncherConfig) -> None:
    """A hostfile that does not exist on a single-node launch: run on this node, with a
    warning, as DeepSpeed's runner does (NeoX's 125M.yml names `hostfile: /mock_path`)."""
    single = lc.num_nodes in (-1, 1) and lc.node_rank is None and not (lc.include or lc.exclude)
    if lc.hostfile and not os.path.exists(lc.hostfile) and single and lc.launcher != "slurm":
        log.warning(
            "deepy.py: hostfile %s not found: proceeding with local resources only (as "
            "DeepSpeed's runner does)",
            lc.hostfile,
        )
        lc.hostfile = None


def plan_model_parallel_processes(lc: LauncherConfig, par: ParallelConfig) -> None:
    """A dry run of a model-parallel config on a one-node host without GPUs plans TP x PP
    processes (what a GPU node would start) instead of refusing a world size of 1."""
    local = lc.launcher != "slurm" and not lc.hostfile and lc.node_rank is None
    need = par.model_parallel_size * max(par.pipe_parallel_size, 1)
    if lc.num_gpus is not None or not local or need == 1 or torch.cuda.is_available():
        return
    lc.num_gpus = need
    log.info(
        "dry run: no GPU on this host, planning %d processes (TP x PP); a real launch here "
        "needs --num-gpus %d",
        need,
        need,
    )


def _prepare(args: argparse.Namespace) -> tuple[LaunchPlan, Config, Sources, dict[str, str]]:
    """Read and validate the config, build the plan, and (for a real launch) pre-flight."""
    sources, raw = gather_sources(args.configs, _overrides(args))
    cfg: Config = build_config(merge_sources(sources))
    if args.node_rank is not None:
        # Not put into the sources: every rank keeps an identical config on every node.
        cfg.launcher.node_rank = args.node_rank
    drop_missing_hostfile(cfg.launcher)
    errors: list[str] = []
    validate_launcher(cfg.launcher, errors)  # first: build_plan relies on it
    if errors:
        raise ConfigError("invalid configuration:\n  - " + "\n  - ".join(errors))
    if args.dry_run:
        plan_model_parallel_processes(cfg.launcher, cfg.parallel)
    plan = build_plan(cfg.launcher, args.script, [CONFIG_ARGS])
    validate(cfg, plan.world_size or 1)
    if args.dry_run:
        missing_programs(plan)
    if not (args.dry_run or args.print_config):
        preflight(plan)
        check_master_port(plan, cfg.launcher)  # before the (slow) corpus build, not after
        prepare_bundled_data(cfg)  # once per node, before any rank starts
    return plan, cfg, sources, raw
