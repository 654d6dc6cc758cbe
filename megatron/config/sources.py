"""The config's sources (YAML files, --set overrides) as gathered on the launching host.

The launcher reads every YAML once and hands the parsed sources to each rank, so all ranks
build the same config even when a compute node cannot see the files.
"""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

from megatron.config.loader import ConfigError, read_yaml

Sources = list[tuple[str, dict]]


def parse_set(items: list[str]) -> dict[str, Any]:
    """--set key=value pairs; values are parsed as YAML scalars (numbers, booleans, lists)."""
    import yaml  # noqa: PLC0415

    out: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"--set expects key=value, got {item!r}")
        key, value = item.split("=", 1)
        out[key] = yaml.safe_load(value)
    return out


def encode_sources(sources: Sources, raw: dict[str, str]) -> str:
    payload = json.dumps({"sources": sources, "raw": raw})
    return base64.urlsafe_b64encode(payload.encode()).decode()


def decode_sources(blob: str) -> tuple[Sources, dict[str, str]]:
    payload = json.loads(base64.urlsafe_b64decode(blob.encode()).decode())
    return [tuple(s) for s in payload["sources"]], payload["raw"]


def gather_sources(paths: list[str], overrides: list[str]) -> tuple[Sources, dict[str, str]]:
    sources: Sources = [(p, read_yaml(p)) for p in paths]
    raw = {p: Path(p).read_text() for p in paths}
    if overrides:
        sources.append(("overrides", parse_set(overrides)))
    return sources, raw
