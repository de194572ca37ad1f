"""What differs between the transformers versions rlhfkit runs on, in one place."""

from __future__ import annotations

import inspect

import torch

from rlhfkit.models.loading import unwrap


def cache_keyword(module: torch.nn.Module) -> str:
    """The forward keyword that takes a KV cache: `cache` from transformers 5.24 on, `past_key_values`
    before (5.24 still takes the old name, with a FutureWarning per call)."""
    try:
        params = inspect.signature(unwrap(module).forward).parameters
        return "cache" if "cache" in params else "past_key_values"
    except (TypeError, ValueError):
        return "past_key_values"
