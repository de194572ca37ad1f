"""rlhfkit: align language models with human preferences (SFT -> reward model -> PPO/GRPO) on a CPU.

The package's folders are its layers (docs/ARCHITECTURE.md): a module imports only from its own layer or
lower ones. Modules that moved into a layer's folder keep their old import path (`MOVED`): importing
`rlhfkit.judge` gives `rlhfkit.rewards.panel`, the same module object.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import sys
from collections.abc import Callable
from types import ModuleType
from typing import Any

__version__ = "0.1.0"

MOVED: dict[str, str] = {
    "rlhfkit.runtime": "rlhfkit.allocator",
    "rlhfkit.datafiles": "rlhfkit.data.files",
    "rlhfkit.encoding": "rlhfkit.data.encoding",
    "rlhfkit.chat_tools": "rlhfkit.data.chat_tools",
    "rlhfkit.toolcalls": "rlhfkit.data.toolcalls",
    "rlhfkit.tiny": "rlhfkit.models.tiny",
    "rlhfkit.compat": "rlhfkit.models.compat",
    "rlhfkit.prefix": "rlhfkit.models.prefix",
    "rlhfkit.loop": "rlhfkit.training.loop",
    "rlhfkit.checkpoint": "rlhfkit.training.checkpoint",
    "rlhfkit.guard": "rlhfkit.training.guard",
    "rlhfkit.health": "rlhfkit.training.health",
    "rlhfkit.experience": "rlhfkit.training.experience",
    "rlhfkit.judge": "rlhfkit.rewards.panel",
    "rlhfkit.online": "rlhfkit.rewards.online",
    "rlhfkit.evaluate": "rlhfkit.evaluation.evaluate",
    "rlhfkit.report": "rlhfkit.evaluation.report",
    "rlhfkit.agents.evaluate": "rlhfkit.evaluation.agent_eval",
    "rlhfkit.agents.report": "rlhfkit.evaluation.agent_report",
    "rlhfkit.agents.commons_selfplay": "rlhfkit.evaluation.commons_selfplay",
    "rlhfkit.llm": "rlhfkit.chat.llm",
    "rlhfkit.generate": "rlhfkit.chat.generate",
}
"""Former module paths -> where the module lives now (the packages data, models, training and rewards were
modules too: their `__init__` hands out the former module's names)."""


class _Alias(importlib.abc.Loader):
    def __init__(self, target: str) -> None:
        self.target = target

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType:
        return importlib.import_module(self.target)

    def exec_module(self, module: ModuleType) -> None:
        pass  # the target module is already executed


class _MovedFinder(importlib.abc.MetaPathFinder):
    """Finds a former module path in `MOVED` and hands out the module that now lives elsewhere."""

    def find_spec(
        self, fullname: str, path: object = None, target: object = None
    ) -> importlib.machinery.ModuleSpec | None:
        new = MOVED.get(fullname)
        return None if new is None else importlib.util.spec_from_loader(fullname, _Alias(new))


def former_module(package: str, module: str) -> Callable[[str], Any]:
    """A package's `__getattr__` that hands out the names of `module`: the package was that module once
    (`rlhfkit.models` was `models.py`, now `models/loading.py`), so `from rlhfkit.models import X` works."""

    def names(name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        found = importlib.import_module(module)  # `from . import` here would ask this hook again
        try:
            return getattr(found, name)
        except AttributeError:
            raise AttributeError(f"module {package!r} has no attribute {name!r}") from None

    return names


if not any(isinstance(f, _MovedFinder) for f in sys.meta_path):
    sys.meta_path.append(_MovedFinder())
