"""Enumerated config keys: the one place their allowed values are checked.

A field whose annotation is a `typing.Literal` (optionally `| None`) accepts exactly the listed
values. `validate()` checks every section with `choice_errors`, whether the config came from
YAML or was built in code, and reports these with every other problem at once.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any


def literal_values(annotation: Any) -> tuple[Any, ...] | None:
    """The allowed values of a Literal annotation (None also when Optional), else None."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        args = typing.get_args(annotation)
        inner = [literal_values(a) for a in args if a is not type(None)]
        if len(inner) == 1 and inner[0] is not None:
            return (*inner[0], None) if type(None) in args else inner[0]
        return None
    if typing.get_origin(annotation) is typing.Literal:
        return typing.get_args(annotation)
    return None


def choice_error(name: str, value: Any, annotation: Any) -> str | None:
    allowed = literal_values(annotation)
    if allowed is None or value in allowed:
        return None
    shown = ", ".join(str(a) for a in allowed if a is not None)
    return f"{name} = {value!r}: must be one of {shown}"


def choice_errors(section: Any) -> list[str]:
    """Messages for every enumerated field of a dataclass instance holding a value outside it."""
    hints = typing.get_type_hints(type(section))
    errors = []
    for f in dataclasses.fields(section):
        err = choice_error(f.name, getattr(section, f.name), hints[f.name])
        if err:
            errors.append(err)
    return errors
