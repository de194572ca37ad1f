"""Rows that keep their KV cache between generate calls: a multi-turn episode appends the observation tokens
to its cache and decodes on, instead of prefilling its whole history again every turn.

    caches = TurnCaches(engine)
    rollout = caches.generate(keys, [prompt + history for ...], sampling, generator)  # as engine.generate
    caches.drop(finished_keys)

`generate` takes each row's whole token sequence, as `RolloutEngine.generate` does, with a key per row
(an episode). The cache kept for a key holds the keys and values of a token sequence: the row's input and
what it sampled, but the last sampled token (never fed to the model). The next call with that key reuses
the longest common prefix of the kept sequence and the new one (a prefix cache of one entry per key; the
whole cache, in an episode, where the new sequence is the old one plus the model's turn and the observation)
and prefills only the rest. The rows' new tokens are prefilled together, one batched forward for all rows
that start a turn (the backends' ``resume``), and the batch then decodes with the engine's own loop
(`RolloutEngine.sample`): the same uniforms, drawn the same way, as `generate` over the whole sequences, so
a seed gives the same tokens, and log-probs equal up to the float rounding of computing a history's keys
once at decode and not again in a prefill. Rows that have no kept cache (the first turn) go through the
backend's ``start``, exactly as in `generate`.

Where this departs from vLLM's prefix caching: no hashed blocks shared across requests; one dense cache per
key, copied out of the batch when its row leaves (``export``: the real slots only, so no hole survives a
turn) and into the next batch (``resume``): two copies a turn, cheap next to a decode step at this scale.
Backends that keep caches: the CPU Llama fast path and the generic HF path (plain caches; a sliding-window
cache declines and its rows are prefilled). The static-cache GPU backends (``cuda_static``, ``hf_static``)
do not: with them `generate` is `RolloutEngine.generate` over the whole sequences (``keeps`` is False).
Shape letters as in `rlhfkit.rollout.engine`.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from rlhfkit.data.encoding import common_prefix_len, left_pad
from rlhfkit.rollout.engine import Rollout, RolloutEngine, SamplingConfig

KEEPING_BACKENDS = ("llama_cpu", "generic")
"""The rollout backends that can take a row's cache out of a batch and put it into another one."""


@dataclass
class KeptCache:
    """A row's cache between calls: the keys and values (2, layers, Hk, n, hd) of `tokens` (n of them)."""

    tokens: list[int]
    kv: torch.Tensor


class _Exporting:
    """The backend of one `TurnCaches.generate` call: it passes every call on, and copies each row's cache out
    (``export``) before the row leaves the batch (``select``) or the batch ends (``release``)."""

    def __init__(self, backend: Any, rows: int) -> None:
        self.backend = backend
        self.rows = list(range(rows))  # the original row of each running row
        self.out: dict[int, torch.Tensor] = {}  # original row -> its cache (2, layers, Hk, n, hd)
        self.running = False  # a batch was started: there are caches to export

    def start(self, *args: Any) -> torch.Tensor:
        logits = self.backend.start(*args)
        self.running = True
        return logits

    def resume(self, *args: Any) -> torch.Tensor:
        logits = self.backend.resume(*args)
        self.running = True
        return logits

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.backend.step(tokens)

    def select(self, keep: torch.Tensor) -> bool:
        kept = set(keep.tolist())
        self._export([i for i in range(len(self.rows)) if i not in kept])
        if not self.backend.select(keep):
            return False  # the rows stay; they are exported again at the end (the same slots, and more)
        self.rows = [self.rows[i] for i in keep.tolist()]
        return True

    def release(self) -> None:
        try:
            if self.running:
                self._export(list(range(len(self.rows))))
        finally:
            self.backend.release()

    def _export(self, positions: list[int]) -> None:
        caches = self.backend.export(positions) if positions else []
        if caches is None:  # a cache that cannot be cut by slot (sliding windows): nothing is kept
            return
        for p, kv in zip(positions, caches, strict=True):
            self.out[self.rows[p]] = kv


class TurnCaches:
    """One engine's kept caches, by key; see the module docstring. Not to be used while the engine's
    `generate` runs (the CPU fast path's backend is the engine's own)."""

    def __init__(self, engine: RolloutEngine, keep: bool = True) -> None:
        self.engine = engine
        self.keeps = keep and engine.backend_name in KEEPING_BACKENDS
        """False: `generate` is `engine.generate` over the whole sequences (nothing is kept)."""
        self.backend = engine.backend() if self.keeps else None
        self.kept: dict[Hashable, KeptCache] = {}

    def __len__(self) -> int:
        return len(self.kept)

    def drop(self, keys: Sequence[Hashable]) -> None:
        """Forget the caches of `keys` (finished episodes): their memory goes back."""
        for key in keys:
            self.kept.pop(key, None)

    @torch.no_grad()
    def generate(
        self,
        keys: Sequence[Hashable],
        sequences: list[list[int]],
        config: SamplingConfig,
        generator: torch.Generator | None = None,
    ) -> Rollout:
        """`RolloutEngine.generate` of `sequences` (one per key, each key once), from each key's kept cache
        where it holds a prefix of the sequence. The rollout's prompt is what was prefilled: each row's tokens
        after its cached prefix, left-padded. The caches of these keys are then those of this call."""
        if len(set(keys)) != len(keys) or len(keys) != len(sequences):
            raise ValueError("generate needs one distinct key per sequence")
        if not sequences or any(len(s) == 0 for s in sequences):
            raise ValueError("generate needs at least one sequence and every sequence needs a token")
        if not self.keeps:
            return self.engine.generate(sequences, config, generator)
        caches: list[torch.Tensor | None] = []
        new: list[list[int]] = []
        for key, seq in zip(keys, sequences, strict=True):
            kept = self.kept.pop(key, None)
            n = 0 if kept is None else min(common_prefix_len([kept.tokens, seq]), len(seq) - 1)
            caches.append(kept.kv[:, :, :, :n] if kept is not None and n else None)  # (2, layers, Hk, n, hd)
            new.append(seq[n:])
        ids, mask = left_pad(new, self.engine.pad_token_id)  # (B, L)
        t = config.max_new_tokens

        def begin(backend: Any) -> torch.Tensor:
            if all(c is None for c in caches):
                return backend.start(new, ids, mask, t)  # (B, V)
            logits = backend.resume(caches, new, t)  # (B, V)
            caches.clear()  # the old caches are in the batch now: their memory goes back
            return logits

        exporting = _Exporting(self.backend, len(sequences))
        rollout = Rollout(ids, mask, *self.engine.sample(exporting, begin, len(sequences), config, generator))
        for r, (key, seq) in enumerate(zip(keys, sequences, strict=True)):
            m = int(rollout.lengths[r])
            n = len(seq) + m - 1  # the row's input and its tokens but the last: what its cache holds
            kv = exporting.out.get(r)
            if m and kv is not None and kv.shape[3] >= n:
                tokens = seq + rollout.completion_ids[r, : m - 1].tolist()
                self.kept[key] = KeptCache(tokens, kv[:, :, :, :n])
        return rollout
