"""Layer 2, data: files read row by row (`files`), validated records and their settings (`records`),
tokenisation, padding and chat templates (`encoding`), tools and tool results rendered for a chat template
(`chat_tools`) and the one tool-call parser (`toolcalls`, which imports nothing of rlhfkit).

`from rlhfkit.data import load_prompts` (the names of `records`, this package's former single module)
keeps working.
"""

import importlib
from typing import Any


def __getattr__(name: str) -> Any:
    """The names of `records` (this package was the module `rlhfkit.data`)."""
    if name.startswith("__"):
        raise AttributeError(name)
    module = importlib.import_module("rlhfkit.data.records")  # `from . import` would ask this hook
    try:
        return getattr(module, name)
    except AttributeError:
        raise AttributeError(f"module 'rlhfkit.data' has no attribute {name!r}") from None
