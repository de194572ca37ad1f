"""One LLM client for every part of rlhfkit that needs "an LLM" (evaluation judges, agents, OPRO).

    from rlhfkit.llm import load_llm
    llm = load_llm("runs/ppo")                       # a local model: the rollout engine, in process
    [[reply]] = llm.chat([[{"role": "user", "content": "Hi!"}]], SamplingConfig(max_new_tokens=32))
    reply.text, reply.finish_reason                  # "...", "stop" or "length"

`chat` takes a batch of conversations and returns `n` completions for each, in order. A local model samples
the whole batch through `RolloutEngine.sample_texts` (batched, KV cache, the Llama fast path), seeded, so
the same seed gives the same answers; the texts are decoded by `RolloutEngine.decode`, as everywhere.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from rlhfkit.rollout.engine import SamplingConfig

Message = dict[str, Any]


@dataclass(frozen=True)
class Completion:
    """One generated answer."""

    text: str
    tokens: int  # generated tokens, EOS included
    finish_reason: str  # "stop": the model ended it; "length": cut at max_new_tokens


class LLM(Protocol):
    """What rlhfkit asks of a language model."""

    name: str

    def chat(
        self,
        conversations: Sequence[Sequence[Message]],
        sampling: SamplingConfig,
        n: int = 1,
        seed: int | None = None,
    ) -> list[list[Completion]]:
        """`n` completions for each conversation (its next assistant turn), in input order."""
        ...


class LocalLLM:
    """A model rlhfkit loads itself (directory, registered name), sampled with the rollout engine."""

    def __init__(self, model: str, batch_size: int = 32, trust_remote_code: bool = False) -> None:
        from rlhfkit.models import load_causal_lm
        from rlhfkit.rollout import RolloutEngine

        policy, tokenizer = load_causal_lm(model, trust_remote_code=trust_remote_code)
        policy.requires_grad_(False).eval()
        self.name = model
        self.engine = RolloutEngine(policy, tokenizer)
        self.tokenizer = tokenizer
        self.batch_size = batch_size

    def chat(
        self,
        conversations: Sequence[Sequence[Message]],
        sampling: SamplingConfig,
        n: int = 1,
        seed: int | None = None,
    ) -> list[list[Completion]]:
        from rlhfkit.encoding import prompt_ids

        if n < 1:
            raise ValueError(f"n must be at least 1, got {n}")
        prompts = [prompt_ids(self.tokenizer, list(messages)) for messages in conversations]
        rows = [p for p in prompts for _ in range(n)]  # the n samples of a conversation side by side
        generator = torch.Generator().manual_seed(seed if seed is not None else torch.seed() % 2**63)
        generation = self.engine.sample_texts(rows, sampling, generator, self.batch_size)
        tokens = [int(t) for r in generation.rollouts for t in r.lengths]
        ended = [bool(e) for r in generation.rollouts for e in r.ended]
        flat = [
            Completion(text, count, "stop" if stop else "length")
            for text, count, stop in zip(generation.texts, tokens, ended, strict=True)
        ]
        return [flat[i * n : (i + 1) * n] for i in range(len(conversations))]


def load_llm(spec: str, **kwargs: Any) -> LLM:
    """The LLM a setting names: a local model directory or registered name."""
    return LocalLLM(spec, **kwargs)
