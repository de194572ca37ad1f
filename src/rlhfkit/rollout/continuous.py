"""Continuous batching over the rollout engine: rows join a running batch between decode steps and leave
when they end, so requests that arrive at different times share every decode step (what the server does).

    batch = DecodeBatch(engine)
    batch.add(["a"], [prompt_ids], [SamplingConfig(max_new_tokens=32)], [torch.Generator().manual_seed(0)])
    tokens, logprobs = batch.sample()        # (b,) one token per running row, in `batch.keys` order
    batch.advance(tokens, keep)              # feed the kept rows their token; the others leave

Each row has its own `SamplingConfig` and `torch.Generator` and is sampled with the engine's own
`sample_tokens`, so its tokens depend on its prompt, settings and generator, not on the rows around it (up to
the float rounding of batched matmuls). Joining uses the backends' ``extend``: the newcomers are prefilled
together, alone, and their cache is right-aligned with the running one on the next slot (the shorter side
padded on the left and masked, as left-padded prompts are); leaving uses ``select`` and then ``trim`` drops
the leading slots nobody attends to any more. Shape letters as in `rlhfkit.rollout.engine`.

Where this departs from vLLM: no paged KV cache (the cache is one dense tensor per layer, copied when rows
join: cheap next to a decode step at this scale) and no chunked prefill (a long prompt holds the decode of
the running rows for one prefill). A generic-path model whose cache is not plain (sliding windows) cannot
take newcomers while rows run: `add` returns False and they wait for the batch to empty.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence

import torch

from rlhfkit.data.encoding import left_pad
from rlhfkit.rollout.engine import RolloutEngine, SamplingConfig, sample_tokens


class DecodeBatch:
    """The running rows of one model (in eval mode): their keys (the caller's names), settings, generators
    and next-token logits. Not thread-safe: one thread steps it."""

    def __init__(self, engine: RolloutEngine) -> None:
        self.engine = engine
        self.backend = engine.backend()
        self.keys: list[Hashable] = []
        self.configs: list[SamplingConfig] = []
        self.generators: list[torch.Generator | None] = []
        self.left: list[int] = []  # tokens each row may still sample (its cache has room for them)
        self.logits: torch.Tensor | None = None  # (b, V) float: the next-token logits of each row

    def __len__(self) -> int:
        return len(self.keys)

    @torch.inference_mode()
    def add(
        self,
        keys: Sequence[Hashable],
        prompts: Sequence[list[int]],
        configs: Sequence[SamplingConfig],
        generators: Sequence[torch.Generator | None],
    ) -> bool:
        """Prefill new rows and add them after the running ones; False (nothing added) if the backend
        cannot join rows to a running batch."""
        if not prompts or any(len(p) == 0 for p in prompts):
            raise ValueError("add needs at least one prompt and every prompt needs a token")
        ids, mask = left_pad(list(prompts), self.engine.pad_token_id)  # (b_new, P)
        n_new = max(c.max_new_tokens for c in configs)
        if self.keys:
            logits = self.backend.extend(list(prompts), ids, mask, n_new)  # (b_new, V)
            if logits is None:
                return False
            assert self.logits is not None  # running rows have their next-token logits
            self.logits = torch.cat([self.logits, logits])  # (b + b_new, V)
        else:
            self.logits = self.backend.start(list(prompts), ids, mask, n_new)  # (b_new, V)
        self.keys += keys
        self.configs += configs
        self.generators += generators
        self.left += [c.max_new_tokens for c in configs]
        return True

    def sample(self) -> tuple[torch.Tensor, torch.Tensor]:
        """One token per running row (b,) and its log-prob (b,) under logits / temperature (the engine's
        convention), each row with its own settings and generator."""
        assert self.logits is not None, "sample needs running rows"
        tokens, logprobs = [], []
        for i, (config, generator) in enumerate(zip(self.configs, self.generators, strict=True)):
            token, logprob = sample_tokens(self.logits[i : i + 1], config, generator)  # (1,), (1,)
            tokens.append(token)
            logprobs.append(logprob)
        return torch.cat(tokens), torch.cat(logprobs)

    @torch.inference_mode()
    def advance(self, tokens: torch.Tensor, keep: Sequence[bool]) -> None:
        """Feed each kept row its sampled token (b,) and compute its next logits; the other rows leave. A row
        that sampled its `max_new_tokens` must leave (its cache has no room for more)."""
        self.left = [n - 1 for n in self.left]
        if any(k and n <= 0 for k, n in zip(keep, self.left, strict=True)):
            raise ValueError("a row that sampled its max_new_tokens cannot stay in the batch")
        rows = [i for i, k in enumerate(keep) if k]
        self._select(rows)
        if self.keys:
            self.logits = self.backend.step(tokens[rows])  # (b', V)

    def remove(self, keys: Sequence[Hashable]) -> None:
        """Take rows out of the batch without a step (a cancelled request)."""
        gone = set(keys)
        self._select([i for i, k in enumerate(self.keys) if k not in gone])

    def _select(self, rows: list[int]) -> None:
        if len(rows) == len(self.keys):
            return
        self.keys = [self.keys[i] for i in rows]
        self.configs = [self.configs[i] for i in rows]
        self.generators = [self.generators[i] for i in rows]
        self.left = [self.left[i] for i in rows]
        if not rows:
            self.backend.release()
            self.logits = None
            return
        keep = torch.tensor(rows)  # (b',)
        if not self.backend.select(keep):
            raise RuntimeError(f"the cache of {type(self.engine.model).__name__} cannot drop rows")
        self.backend.trim()
        assert self.logits is not None
        self.logits = self.logits[keep]  # (b', V)
