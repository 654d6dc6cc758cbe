"""The config's sources (YAML files, --set overrides) as gathered on the launching host.

The launcher reads every YAML once and hands the parsed sources to each rank, so all ranks
build the same config even when a compute node cannot see the files. Three carriers
(docs/launch.md):
- a JSON file, `train.py --config-file PATH` (deepy.py writes it atomically, by default in
  `<save>/launch/`): the command line stays readable; every rank must see the file;
- an environment variable, `train.py --config-env PYTHON_SEPNEOX_CONFIG`: DeepSpeed's runner
  forwards `PYTHON*` variables to every node (pdsh `export`, mpirun `-x` / `-genv`) and srun
  passes the environment on, so no shared file system is needed;
- `train.py --config-b64 BLOB`, the same encoding as the variable, on the command line.
"""

from __future__ import annotations

import base64
import json
import os
import socket
import time
from pathlib import Path
from typing import Any

import yaml

from megatron.common.files import atomic_write_text
from megatron.config.loader import ConfigError, read_yaml

Sources = list[tuple[str, dict]]

# DeepSpeed's runner exports variables whose names start with PYTHON (its EXPORT_ENVS) to the
# ranks of every multi-node launcher; Python itself ignores this name.
CONFIG_ENV = "PYTHON_SEPNEOX_CONFIG"
FORMAT = 1


def parse_set(items: list[str]) -> dict[str, Any]:
    """--set key=value pairs; values are parsed as YAML scalars (numbers, booleans, lists)."""
    out: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"--set expects key=value, got {item!r}")
        key, value = item.split("=", 1)
        out[key] = yaml.safe_load(value)
    return out


def _payload(sources: Sources, raw: dict[str, str]) -> dict[str, Any]:
    return {"format": FORMAT, "sources": sources, "raw": raw}


def _unpack(payload: dict[str, Any], where: str) -> tuple[Sources, dict[str, str]]:
    if not isinstance(payload, dict) or "sources" not in payload or "raw" not in payload:
        raise ConfigError(f"{where}: not a config written by deepy.py (no sources / raw)")
    if payload.get("format", FORMAT) != FORMAT:
        raise ConfigError(f"{where}: config format {payload['format']}, this code reads {FORMAT}")
    return [tuple(s) for s in payload["sources"]], payload["raw"]


def encode_sources(sources: Sources, raw: dict[str, str]) -> str:
    """One shell-safe token (URL-safe base64 of the JSON) for a variable or `--config-b64`."""
    payload = json.dumps(_payload(sources, raw), separators=(",", ":"))
    return base64.urlsafe_b64encode(payload.encode()).decode()


def decode_sources(blob: str, where: str = "--config-b64") -> tuple[Sources, dict[str, str]]:
    try:
        payload = json.loads(base64.urlsafe_b64decode(blob.encode()).decode())
    except ValueError as exc:
        raise ConfigError(f"{where}: cannot decode the serialized config: {exc}") from exc
    return _unpack(payload, where)


def write_sources_file(path: str | os.PathLike, sources: Sources, raw: dict[str, str]) -> str:
    """Write the sources as readable JSON, atomically (a rank never reads half a file)."""
    path = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    payload = _payload(sources, raw)
    stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    payload["written_by"] = f"deepy.py on {socket.gethostname()} at {stamp}"
    atomic_write_text(path, json.dumps(payload, indent=1) + "\n")
    return path


def read_sources_file(path: str) -> tuple[Sources, dict[str, str]]:
    if not os.path.isfile(path):
        raise ConfigError(
            f"--config-file {path} not found on host {socket.gethostname()}: deepy.py wrote it "
            "on the launching host; give deepy.py a --config-dir on a file system every node "
            f"shares, or pass the config in the environment (deepy.py --config-via env)"
        )
    try:
        payload = json.loads(Path(path).read_text())
    except ValueError as exc:
        raise ConfigError(f"--config-file {path}: not valid JSON: {exc}") from exc
    return _unpack(payload, path)


def read_sources_env(name: str = CONFIG_ENV) -> tuple[Sources, dict[str, str]]:
    blob = os.environ.get(name)
    if not blob:
        raise ConfigError(
            f"--config-env {name}: the variable is not set on host {socket.gethostname()}; "
            "the launcher did not forward it (DeepSpeed's runner forwards PYTHON* variables; "
            "with srun keep --export=ALL)"
        )
    return decode_sources(blob, where=f"${name}")


def launch_sources(
    config_file: str | None = None, config_env: str | None = None, config_b64: str | None = None
) -> tuple[Sources, dict[str, str]] | None:
    """The sources deepy.py handed this rank, by whichever carrier it used; None if none."""
    if config_file:
        return read_sources_file(config_file)
    if config_env:
        return read_sources_env(config_env)
    if config_b64:
        return decode_sources(config_b64)
    return None


def gather_sources(paths: list[str], overrides: list[str]) -> tuple[Sources, dict[str, str]]:
    sources: Sources = [(p, read_yaml(p)) for p in paths]
    raw = {p: Path(p).read_text() for p in paths}
    if overrides:
        sources.append(("overrides", parse_set(overrides)))
    return sources, raw
