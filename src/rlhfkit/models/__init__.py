"""Layer 3, models: every model loaded, built and saved (`loading`: causal LMs, reward and value models,
LoRA, the embedded default), the tiny random Llama of the tests (`tiny`), what differs between transformers
versions (`compat`), and forward passes that run each shared prompt once with per-token log-probs
(`prefix`).

`from rlhfkit.models import load_causal_lm` (the names of `loading`, this package's former single module)
keeps working.
"""

import importlib
from typing import Any


def __getattr__(name: str) -> Any:
    """The names of `loading` (this package was the module `rlhfkit.models`)."""
    if name.startswith("__"):
        raise AttributeError(name)
    module = importlib.import_module("rlhfkit.models.loading")  # `from . import` would ask this hook
    try:
        return getattr(module, name)
    except AttributeError:
        raise AttributeError(f"module 'rlhfkit.models' has no attribute {name!r}") from None
