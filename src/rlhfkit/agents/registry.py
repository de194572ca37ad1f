"""Environments by name: the bundled ones ("calc", "db", "os") or a user's `module:Class`. Each call makes a
new object (one object serves one episode at a time, `agents.env`).

    env = load_environment("db", query_timeout=1.0)
    env = load_environment("my_envs:Inventory")  # a class deriving from agents.env.Environment
"""

from __future__ import annotations

from typing import Any

from rlhfkit.agents.env import Environment
from rlhfkit.config import import_spec
from rlhfkit.errors import ConfigError

ENVIRONMENTS: dict[str, str] = {
    "calc": "rlhfkit.agents.calc:CalcEnvironment",
    "db": "rlhfkit.agents.db:DBEnvironment",
    "os": "rlhfkit.agents.os_env:OSEnvironment",
    "commons": "rlhfkit.agents.commons:CommonsEnvironment",
    "support": "rlhfkit.agents.support:SupportEnvironment",
}
"""Bundled environments: name -> "module:Class"."""


def load_environment(spec: str, **settings: Any) -> Environment:
    """A new environment: a bundled name or `module:Class`, built with `settings` as keyword arguments."""
    target = ENVIRONMENTS.get(spec, spec)
    if ":" not in target:
        raise ConfigError(
            f"environment {spec!r} is unknown: use one of {', '.join(ENVIRONMENTS)}, or module:Class for "
            "your own (not a bundled environment)"
        )
    cls = import_spec(target, "environment")
    if not (isinstance(cls, type) and issubclass(cls, Environment)):
        raise ConfigError(f"environment {spec!r} is not a subclass of rlhfkit.agents.env.Environment")
    try:
        return cls(**settings)
    except TypeError as exc:
        raise ConfigError(f"environment {spec!r}: bad env_settings {sorted(settings)}: {exc}") from None
