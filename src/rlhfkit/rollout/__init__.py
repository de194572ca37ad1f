"""Batched sampling with a KV cache and per-token log-probs: the hot path of RL.

`engine` holds the `RolloutEngine` (sampling, the generic HF backend, `sample_texts`); each backend that is
more than the HF forward has a module of its own beside it (`llama_cpu`: the float32 Llama fast path).
"""

from rlhfkit.encoding import left_pad, position_ids_from_mask
from rlhfkit.rollout.engine import Generation, Rollout, RolloutEngine, SamplingConfig
from rlhfkit.rollout.llama_cpu import llama_fast_path_supported

__all__ = [
    "Generation",
    "Rollout",
    "RolloutEngine",
    "SamplingConfig",
    "left_pad",
    "llama_fast_path_supported",
    "position_ids_from_mask",
]
