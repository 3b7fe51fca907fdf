"""Typed YAML configuration: frozen dataclasses with defaults in one place (:mod:`.schema`), and a
loader that merges ``extends:`` chains and validates every key before any model loads (:mod:`.loader`)."""

from src.config.loader import ConfigError, load_config
from src.config.schema import Config

__all__ = ["Config", "ConfigError", "load_config"]
