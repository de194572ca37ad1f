"""Environments by name: `load_environment("calc")` for a bundled one, `load_environment("pkg.mod:Class")`
for a user's own. Each call makes a new object (one object serves one episode at a time, `agents.env`)."""

from __future__ import annotations

from typing import Any

from rlhfkit.agents.env import Environment
from rlhfkit.config import import_spec
from rlhfkit.errors import ConfigError

ENVIRONMENTS: dict[str, str] = {}
"""Bundled environments: name -> "module:Class"."""


def load_environment(spec: str, **settings: Any) -> Environment:
    """A new environment: a bundled name or `module:Class`, built with `settings` as keyword arguments."""
    target = ENVIRONMENTS.get(spec, spec)
    if ":" not in target:
        known = ", ".join(sorted(ENVIRONMENTS)) or "none bundled"
        raise ConfigError(f"env {spec!r}: not a bundled environment ({known}) nor module:Class")
    cls = import_spec(target, "env")
    if not (isinstance(cls, type) and issubclass(cls, Environment)):
        raise ConfigError(f"env {spec!r}: {target} is not an rlhfkit.agents.Environment subclass")
    try:
        return cls(**settings)
    except TypeError as exc:
        raise ConfigError(f"env {spec!r}: bad env_settings {sorted(settings)}: {exc}") from None
