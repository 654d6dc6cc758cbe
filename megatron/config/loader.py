"""YAML -> typed Config: merging, NeoX/SepLLM aliases, and closest-key error messages."""

from __future__ import annotations

import dataclasses
import difflib
import functools
import types
import typing
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import yaml

from megatron.config.checks import literal_values
from megatron.config.neox import NEOX_ALIASES
from megatron.config.schema import SECTIONS, Config
from megatron.sepllm.aliases import SEPLLM_ALIASES, apply_sepllm_aliases, lookup_alias


class ConfigError(ValueError):
    """A configuration problem found before any work starts."""


class UnknownKeyError(ConfigError):
    """A YAML key that is neither a config field nor an accepted alias."""


def _norm(key: str) -> str:
    return key.replace("-", "_")


@functools.cache
def field_index() -> dict[str, tuple[str, dataclasses.Field]]:
    """Flat key -> (section, dataclass field), over every section of Config."""
    index: dict[str, tuple[str, dataclasses.Field]] = {}
    for section in SECTIONS:
        cls = _section_class(section)
        for f in dataclasses.fields(cls):
            assert f.name not in index, f"duplicate config key {f.name}"
            index[f.name] = (section, f)
    return index


def _section_class(section: str) -> type:
    hints = typing.get_type_hints(Config)
    return hints[section]


def _aliases() -> dict[str, Callable[[Any], dict[str, Any]]]:
    return {**NEOX_ALIASES, **SEPLLM_ALIASES}


def _suggest(key: str, candidates: Iterable[str]) -> str:
    close = difflib.get_close_matches(key, list(candidates), n=1, cutoff=0.5)
    return f"; did you mean '{close[0]}'?" if close else ""


def _resolve(raw_key: str, value: Any, origin: str, section: str | None) -> list[tuple[str, Any]]:
    """One YAML key -> [(field name, value)]: a field (of `section` when nested) or an alias."""
    index, aliases = field_index(), _aliases()
    key = _norm(raw_key)
    if key in index and (section is None or index[key][0] == section):
        return [(key, value)]
    fn = aliases.get(raw_key, aliases.get(key))
    if fn is not None:
        try:
            return list(fn(value).items())
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"{origin}: {exc}") from exc
    if section is not None:
        fields = [n for n, (s, _) in index.items() if s == section]
        raise UnknownKeyError(
            f"{origin}: unknown key '{raw_key}' in section '{section}'" + _suggest(key, fields)
        )
    raise UnknownKeyError(
        f"{origin}: unknown key '{raw_key}'" + _suggest(key, [*index, *aliases, *SECTIONS])
    )


def _is_section_block(key: str, value: Any) -> bool:
    if key not in SECTIONS or not isinstance(value, dict):
        return False
    # `optimizer:` is both our section and NeoX's {type, params} block: fields decide.
    return key not in NEOX_ALIASES or all(_norm(str(k)) in field_index() for k in value)


def _translate_sepllm(
    items: list[tuple[str, Any, str, str | None]], source: str
) -> list[tuple[str, Any, str, str | None]]:
    """Original SepLLM keys are translated together: some only mean something in combination
    (both mode flags false = SepLLM mode; per-layer lists ignored unless their flag is on)."""
    originals = {k: v for k, v, _, sec in items if sec in (None, "sepllm") and lookup_alias(k)}
    if not originals:
        return items
    try:
        translated = apply_sepllm_aliases(originals)
    except ValueError as exc:
        raise ConfigError(f"{source}: {exc}") from exc
    rest = [it for it in items if it[0] not in originals]
    return rest + [(k, v, f"{source}:sepllm[{k}]", "sepllm") for k, v in translated.items()]


def flatten(raw: dict[str, Any], source: str) -> dict[str, tuple[Any, str]]:
    """Resolve one YAML mapping into {field name: (value, where it came from)}."""
    out: dict[str, tuple[Any, str]] = {}
    items: list[tuple[str, Any, str, str | None]] = []
    for raw_key, value in raw.items():
        key = _norm(str(raw_key))
        if _is_section_block(key, value):
            items += [(str(k), v, f"{source}:{key}.{k}", key) for k, v in value.items()]
        else:
            items.append((str(raw_key), value, f"{source}:{raw_key}", None))
    unknown: list[str] = []
    for raw_key, value, origin, section in _translate_sepllm(items, source):
        try:
            resolved_items = _resolve(raw_key, value, origin, section)
        except UnknownKeyError as exc:  # collect them all: a ported config has several
            unknown.append(str(exc))
            continue
        for name, resolved in resolved_items:
            if name in out and out[name][0] != resolved:
                joined = _join_blocks(name, out[name][0], resolved)
                if joined is None:
                    raise ConfigError(
                        f"{source}: '{name}' is set twice with different values "
                        f"({out[name][1]} = {out[name][0]!r}, {origin} = {resolved!r})"
                    )
                resolved = joined
            out[name] = (resolved, origin)
    if len(unknown) == 1:
        raise UnknownKeyError(unknown[0])
    if unknown:
        raise UnknownKeyError(f"{len(unknown)} unknown keys:\n  - " + "\n  - ".join(unknown))
    return out


# Blocks several keys may fill (NeoX's data_types / deepspeed_extra_args and our
# deepspeed_extra all go to DeepSpeed's config): joined entry by entry.
JOINED_BLOCKS = ("deepspeed_extra",)


def _join_blocks(name: str, old: Any, new: Any) -> dict[str, Any] | None:
    """old and new merged when `name` is a joined block and no entry differs, else None."""
    if name not in JOINED_BLOCKS or not (isinstance(old, dict) and isinstance(new, dict)):
        return None
    if any(k in old and old[k] != v for k, v in new.items()):
        return None
    return {**old, **new}


def _coerce(value: Any, annotation: Any, name: str) -> Any:
    """Check/convert a YAML value against the field's type annotation."""
    if literal_values(annotation) is not None:
        return value  # validate() checks enumerations, together with every other problem
    tp = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if tp in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(value, inner[0], name)
    if annotation is Any:
        return value
    if tp is list:
        if not isinstance(value, (list, tuple)):
            value = [value]
        return [_coerce(v, args[0], name) for v in value] if args else list(value)
    if tp is dict or annotation is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"'{name}' must be a mapping, got {value!r}")
        return dict(value)
    if annotation is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"'{name}' must be true or false, got {value!r}")
    if annotation is int:
        if isinstance(value, bool) or not (isinstance(value, int) or _is_int_float(value)):
            raise ConfigError(f"'{name}' must be an integer, got {value!r}")
        return int(value)
    if annotation is float:
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"'{name}' must be a number, got {value!r}") from None
    if annotation is str:
        if not isinstance(value, (str, int, float)):
            raise ConfigError(f"'{name}' must be a string, got {value!r}")
        return str(value)
    return value


def _is_int_float(value: Any) -> bool:
    return isinstance(value, float) and value.is_integer()


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses a key written twice in one mapping (PyYAML keeps the last)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: dict[Any, yaml.Mark] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                first = seen[key]
                raise yaml.constructor.ConstructorError(
                    None,
                    None,
                    f"key '{key}' is set twice in one mapping (first on line {first.line + 1}); "
                    "remove one",
                    key_node.start_mark,
                )
            seen[key] = key_node.start_mark
        return super().construct_mapping(node, deep=deep)


def read_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml.load(path.read_text(), Loader=_StrictLoader) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: invalid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping of keys, got {type(data).__name__}")
    return data


def merge_sources(sources: list[tuple[str, dict[str, Any]]]) -> dict[str, tuple[Any, str]]:
    """Merge files; as in NeoX a key set in two files is an error (nothing silently overridden).

    A source named "overrides" (command-line --set values) may override anything.
    """
    merged: dict[str, tuple[Any, str]] = {}
    unknown: list[str] = []
    for name, raw in sources:
        try:
            flat = flatten(raw, name)
        except UnknownKeyError as exc:  # report the unknown keys of every file together
            unknown.append(str(exc))
            continue
        for key, (value, origin) in flat.items():
            joined = _join_blocks(key, merged[key][0], value) if key in merged else None
            if joined is not None:
                value = joined
            elif key in merged and name != "overrides":
                raise ConfigError(
                    f"'{key}' is defined twice: {merged[key][1]} and {origin}; "
                    "remove one (use --set key=value to override from the command line)"
                )
            merged[key] = (value, origin)
    if unknown:
        raise UnknownKeyError("\n".join(unknown))
    return merged


def build_config(values: dict[str, tuple[Any, str]]) -> Config:
    index = field_index()
    hints = {s: typing.get_type_hints(_section_class(s)) for s in SECTIONS}
    cfg = Config()
    for name, (value, origin) in values.items():
        section, _ = index[name]
        try:
            coerced = _coerce(value, hints[section][name], name)
        except ConfigError as exc:
            raise ConfigError(f"{origin}: {exc}") from None
        setattr(getattr(cfg, section), name, coerced)
    return cfg


def load_config(paths: list[str | Path], overrides: dict[str, Any] | None = None) -> Config:
    """Read, merge and type-check YAML files; `overrides` (flat keys) apply last."""
    sources = [(str(p), read_yaml(p)) for p in paths]
    if overrides:
        sources.append(("overrides", overrides))
    return build_config(merge_sources(sources))


def config_to_dict(cfg: Config) -> dict[str, Any]:
    """Nested plain-dict form (YAML-serialisable), sections only.

    After `finalize` the training section carries the resolved batch triple (all three keys),
    so a saved config reproduces the run's batch exactly.
    """
    out = {s: dataclasses.asdict(getattr(cfg, s)) for s in SECTIONS}
    if cfg.derived is not None:
        out["training"].update(
            train_micro_batch_size_per_gpu=cfg.derived.micro_batch,
            gradient_accumulation_steps=cfg.derived.grad_accum,
            train_batch_size=cfg.derived.global_batch,
        )
    return out
