"""Typed configuration: schema, YAML loading with aliases, validation, derived values."""

from megatron.config.loader import ConfigError, config_to_dict, load_config
from megatron.config.schema import Config
from megatron.config.validate import finalize, validate

__all__ = ["Config", "ConfigError", "config_to_dict", "finalize", "load_config", "validate"]
