"""Environments by name: the bundled ones ("calc", "db", "os") or a user's `module:Class`.

env = load_environment("db", query_timeout=1.0)
env = load_environment("my_envs:Inventory")  # a class deriving from agents.env.Environment
"""

from __future__ import annotations

import importlib
from typing import Any

from rlhfkit.agents.env import Environment
from rlhfkit.config import import_spec
from rlhfkit.errors import ConfigError

BUNDLED = {
    "calc": "rlhfkit.agents.calc:CalcEnvironment",
    "db": "rlhfkit.agents.db:DBEnvironment",
    "os": "rlhfkit.agents.os_env:OSEnvironment",
}


def load_environment(spec: str, **settings: Any) -> Environment:
    """A new environment: `spec` is a bundled name or `module:Class`; `settings` go to its constructor."""
    if spec in BUNDLED:
        module, _, attr = BUNDLED[spec].partition(":")
        cls = getattr(importlib.import_module(module), attr)
    elif ":" in spec:
        cls = import_spec(spec, "environment")
    else:
        known = ", ".join(BUNDLED)
        raise ConfigError(
            f"environment {spec!r} is unknown: use one of {known}, or module:Class for your own"
        )
    if not (isinstance(cls, type) and issubclass(cls, Environment)):
        raise ConfigError(f"environment {spec!r} is not a subclass of rlhfkit.agents.env.Environment")
    try:
        return cls(**settings)
    except TypeError as exc:
        raise ConfigError(f"environment {spec!r}: bad settings {sorted(settings)}: {exc}") from None
