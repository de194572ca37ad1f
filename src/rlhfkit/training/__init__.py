"""Layer 6, training: what every trainer runs on. The run's settings, seeding, schedule and data order
(`settings`), the one training loop (`loop`), the guards every optimizer step goes through (`guard`),
atomic checkpoints (`checkpoint`), RL health checks (`health`) and RL experience with its samplers
(`experience`).

`from rlhfkit.training import TrainConfig` (the names of `settings`, this package's former single module)
keeps working.
"""

import importlib
from typing import Any


def __getattr__(name: str) -> Any:
    """The names of `settings` (this package was the module `rlhfkit.training`)."""
    if name.startswith("__"):
        raise AttributeError(name)
    module = importlib.import_module("rlhfkit.training.settings")  # `from . import` would ask this hook
    try:
        return getattr(module, name)
    except AttributeError:
        raise AttributeError(f"module 'rlhfkit.training' has no attribute {name!r}") from None
