"""Per-field checks of the config: the one place enumerations and numeric ranges are checked.

A field whose annotation is a `typing.Literal` (optionally `| None`) accepts exactly the listed
values. A field declared with a range (`_f(..., ge=1)`, `gt`, `le`, `lt` in its metadata)
accepts numbers inside it; None (an unset optional key) is always accepted. `validate()`
checks every section with `field_errors`, whether the config came from YAML or was built in
code, and reports these with every other problem at once; the key reference shows each
field's allowed values (`describe_allowed`).
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from typing import Any

_BOUNDS = (("gt", ">", "("), ("ge", ">=", "["), ("lt", "<", ")"), ("le", "<=", "]"))


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


def _in_range(value: float, meta: typing.Mapping[str, Any]) -> bool:
    checks = {
        "gt": lambda b: value > b,
        "ge": lambda b: value >= b,
        "lt": lambda b: value < b,
        "le": lambda b: value <= b,
    }
    return all(checks[k](meta[k]) for k, _, _ in _BOUNDS if k in meta)


def describe_range(meta: typing.Mapping[str, Any]) -> str | None:
    """'>= 1', 'in (0, 1]' ... for a field's range metadata; None without one."""
    low = [(k, sym, br) for k, sym, br in _BOUNDS[:2] if k in meta]
    high = [(k, sym, br) for k, sym, br in _BOUNDS[2:] if k in meta]
    if low and high:
        (lk, _, lb), (hk, _, hb) = low[0], high[0]
        return f"in {lb}{meta[lk]}, {meta[hk]}{hb}"
    if low or high:
        k, sym, _ = (low or high)[0]
        return f"{sym} {meta[k]}"
    return None


def describe_allowed(f: dataclasses.Field, annotation: Any) -> str:
    """What the key reference shows in its 'allowed' column."""
    values = literal_values(annotation)
    if values is not None:
        return ", ".join(str(v) for v in values if v is not None)
    return describe_range(f.metadata) or ""


def _choice_error(f: dataclasses.Field, value: Any, allowed: tuple[Any, ...]) -> str | None:
    if value in allowed:
        return None
    shown = ", ".join(str(a) for a in allowed if a is not None)
    return f"{f.name} = {value!r}: must be one of {shown}"


def _range_error(f: dataclasses.Field, value: Any) -> str | None:
    if isinstance(value, float) and not math.isfinite(value):  # .inf / .nan pass every bound
        return f"{f.name} must be a finite number, got {value}"
    rng = describe_range(f.metadata)
    if rng is None or value is None or isinstance(value, bool):
        return None
    if isinstance(value, (int, float)) and not _in_range(value, f.metadata):
        return f"{f.name} must be {rng}, got {value}"
    return None


def section_errors(section: Any) -> tuple[list[str], list[str]]:
    """(enumeration errors, range errors) of a dataclass instance's fields. Range errors are
    kept apart: cross-field arithmetic over such a section must be skipped."""
    hints = typing.get_type_hints(type(section))
    choices, ranges = [], []
    for f in dataclasses.fields(section):
        value, allowed = getattr(section, f.name), literal_values(hints[f.name])
        if allowed is not None:
            choices.append(_choice_error(f, value, allowed))
        else:
            ranges.append(_range_error(f, value))
    return [e for e in choices if e], [e for e in ranges if e]


def field_errors(section: Any) -> list[str]:
    """Messages for every field of a dataclass instance outside its enumeration or range."""
    choices, ranges = section_errors(section)
    return choices + ranges
