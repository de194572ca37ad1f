"""Batched sampling with a KV cache and per-token log-probs: the hot path of RL.

`engine` holds the `RolloutEngine` (sampling, `sample_texts`, `choose_backend`); each backend has a module of
its own beside it (`generic`: the HF forward with a DynamicCache; `llama_cpu`: the float32 Llama fast path on
the CPU; `cuda`: the static-cache CUDA-graph path; `hf_static`: the HF StaticCache fallback). `continuous`
joins rows to a running batch (the server); `turns` keeps rows' caches between calls (multi-turn episodes).
"""

from rlhfkit.data.encoding import left_pad, position_ids_from_mask
from rlhfkit.rollout.cuda import StaticCacheBackend, static_backend_supported
from rlhfkit.rollout.engine import (
    BACKENDS,
    Generation,
    Rollout,
    RolloutEngine,
    SamplingConfig,
    choose_backend,
)
from rlhfkit.rollout.llama_cpu import llama_fast_path_supported

__all__ = [
    "BACKENDS",
    "Generation",
    "Rollout",
    "RolloutEngine",
    "SamplingConfig",
    "StaticCacheBackend",
    "choose_backend",
    "left_pad",
    "llama_fast_path_supported",
    "position_ids_from_mask",
    "static_backend_supported",
]
