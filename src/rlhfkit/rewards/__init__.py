"""Layer 7, rewards: reward models, Python functions and their weighted mixture (`mix`), the simulated
annotators' panel and gold preference (`panel`), and the reward model that keeps learning from rankings
during RL (`online`).

`from rlhfkit.rewards import function_scorer` (the names of `mix`, this package's former single module)
keeps working.
"""

import importlib
from typing import Any


def __getattr__(name: str) -> Any:
    """The names of `mix` (this package was the module `rlhfkit.rewards`)."""
    if name.startswith("__"):
        raise AttributeError(name)
    module = importlib.import_module("rlhfkit.rewards.mix")  # `from . import` would ask this hook
    try:
        return getattr(module, name)
    except AttributeError:
        raise AttributeError(f"module 'rlhfkit.rewards' has no attribute {name!r}") from None
