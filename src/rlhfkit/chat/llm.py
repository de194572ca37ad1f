"""One LLM client for every part of rlhfkit that needs "an LLM" (evaluation judges, agents, OPRO).

    from rlhfkit.chat.llm import load_llm
    llm = load_llm("runs/ppo")                       # a local model: the rollout engine, in process
    [[reply]] = llm.chat([[{"role": "user", "content": "Hi!"}]], SamplingConfig(max_new_tokens=32))
    reply.text, reply.finish_reason                  # "...", "stop" or "length"

    llm = load_llm("http://127.0.0.1:8000/v1")      # any OpenAI-compatible server (`rlhfkit serve`, vLLM)

`chat` takes a batch of conversations and returns `n` completions for each, in order. A local model samples
the whole batch through `RolloutEngine.sample_texts` (batched, KV cache, the Llama fast path), seeded, so
the same seed gives the same answers; the texts are decoded by `RolloutEngine.decode`, as everywhere.

An endpoint (`EndpointLLM`) gets one request per conversation, sent concurrently so the server batches
them: `n`, `temperature`, `top_p`, `max_tokens` from the SamplingConfig (`top_k` and `ignore_eos` as vLLM's
extensions, sent only when set), and `seed + i` for conversation i, so a seeded call is reproducible on a
server that honours seeds. With `tools` (OpenAI schemas) a local model sees them as `rlhfkit serve` renders
them (`chat_tools`) and an endpoint gets them as `tools=`; a completion carries the calls it made
(`Completion.tool_calls`, its text is then the content outside them). Finish reasons other than "length"
("tool_calls", "content_filter") count as "stop". Busy (429) and failing (5xx, connection) servers are
retried with backoff, honouring Retry-After; anything else is a one-line RlhfkitError with the server's
message.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from rlhfkit.data.toolcalls import ToolCall, parse_tool_calls
from rlhfkit.errors import RlhfkitError
from rlhfkit.rollout.engine import SamplingConfig

Message = dict[str, Any]


@dataclass(frozen=True)
class Completion:
    """One generated answer."""

    text: str
    tokens: int  # generated tokens, EOS included
    finish_reason: str  # "stop": the model ended it; "length": cut at max_new_tokens
    tool_calls: tuple[ToolCall, ...] = ()  # the calls it made (only when asked with tools)


class LLM(Protocol):
    """What rlhfkit asks of a language model."""

    name: str

    def chat(
        self,
        conversations: Sequence[Sequence[Message]],
        sampling: SamplingConfig,
        n: int = 1,
        seed: int | None = None,
        tools: list[Message] | None = None,
        keys: Sequence[Hashable] | None = None,
    ) -> list[list[Completion]]:
        """`n` completions for each conversation (its next assistant turn), in input order; with `tools`
        (OpenAI schemas) the model may call them. `keys` (one per conversation, `n` 1) name conversations
        that continue over calls: a local model keeps each one's KV cache until `forget`."""
        ...

    def forget(self, keys: Sequence[Hashable]) -> None:
        """Free what is kept for these conversations (they are over)."""
        ...


class LocalLLM:
    """A model rlhfkit loads itself (directory, registered name), sampled with the rollout engine."""

    def __init__(
        self, model: str, batch_size: int = 32, trust_remote_code: bool = False, keep_cache: bool = True
    ) -> None:
        from rlhfkit.models.loading import load_causal_lm
        from rlhfkit.rollout import RolloutEngine
        from rlhfkit.rollout.turns import TurnCaches

        policy, tokenizer = load_causal_lm(model, trust_remote_code=trust_remote_code)
        policy.requires_grad_(False).eval()
        self.name = model
        self.engine = RolloutEngine(policy, tokenizer)
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.caches = TurnCaches(self.engine, keep=keep_cache)  # by conversation key (`chat(keys=...)`)

    def chat(
        self,
        conversations: Sequence[Sequence[Message]],
        sampling: SamplingConfig,
        n: int = 1,
        seed: int | None = None,
        tools: list[Message] | None = None,
        keys: Sequence[Hashable] | None = None,
    ) -> list[list[Completion]]:
        from dataclasses import replace

        from rlhfkit.data.chat_tools import chat_prompt_ids
        from rlhfkit.data.encoding import prompt_ids

        if tools is None:
            prompts = [prompt_ids(self.tokenizer, list(messages)) for messages in conversations]
            return self.complete(prompts, sampling, n, seed, keys=keys)
        prompts = [chat_prompt_ids(self.tokenizer, list(messages), tools) for messages in conversations]
        out = []
        for answers in self.complete(prompts, sampling, n, seed, keys=keys):
            parsed = [parse_tool_calls(a.text) for a in answers]
            out.append(
                [
                    replace(a, text=text, tool_calls=tuple(calls))
                    for a, (text, calls) in zip(answers, parsed, strict=True)
                ]
            )
        return out

    def complete(
        self,
        prompts: Sequence[list[int]],
        sampling: SamplingConfig,
        n: int = 1,
        seed: int | None = None,
        label: str | None = None,
        keys: Sequence[Hashable] | None = None,
    ) -> list[list[Completion]]:
        """`n` completions of each token-id prompt, in order (`chat` after the chat template; `rlhfkit
        generate`), with a progress bar named `label` (None: none). With `keys` each prompt continues the
        key's earlier one (`rollout.turns.TurnCaches`: only the tokens after the kept prefix are prefilled),
        in the same batches and with the same draws as without, so a seed gives the same answers."""
        if n < 1:
            raise ValueError(f"n must be at least 1, got {n}")
        rows = [p for p in prompts for _ in range(n)]  # the n samples of a prompt side by side
        generator = torch.Generator().manual_seed(seed if seed is not None else torch.seed() % 2**63)
        if keys is not None and (n != 1 or len(keys) != len(prompts)):
            raise ValueError("chat with keys takes one key per conversation and n=1")
        generation = self.engine.sample_texts(
            rows, sampling, generator, self.batch_size, label, self.caches if keys else None, keys
        )
        tokens = [int(t) for r in generation.rollouts for t in r.lengths]
        ended = [bool(e) for r in generation.rollouts for e in r.ended]
        flat = [
            Completion(text, count, "stop" if stop else "length")
            for text, count, stop in zip(generation.texts, tokens, ended, strict=True)
        ]
        return [flat[i * n : (i + 1) * n] for i in range(len(prompts))]

    def forget(self, keys: Sequence[Hashable]) -> None:
        self.caches.drop(keys)


class EndpointLLM:
    """An OpenAI-compatible server at `url` (its /v1 base). `model` defaults to the one model it lists; the
    key to the `RLHFKIT_API_KEY` or `OPENAI_API_KEY` environment variable."""

    def __init__(
        self,
        url: str,
        model: str | None = None,
        api_key: str | None = None,
        concurrency: int = 16,
        timeout: float = 600.0,
        retries: int = 5,
    ) -> None:
        import os

        import httpx

        self.url = url.rstrip("/")
        key = api_key or os.environ.get("RLHFKIT_API_KEY") or os.environ.get("OPENAI_API_KEY")
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        self.client = httpx.Client(base_url=self.url, headers=headers, timeout=timeout)
        self.concurrency, self.retries = concurrency, retries
        if model is None:
            listed = [m["id"] for m in self._call("GET", "/models")["data"]]
            if len(listed) != 1:
                raise RlhfkitError(f"{self.url} serves {len(listed)} models ({', '.join(listed)}); name one")
            model = listed[0]
        self.model = model
        self.name = f"{self.url}#{model}"

    def chat(
        self,
        conversations: Sequence[Sequence[Message]],
        sampling: SamplingConfig,
        n: int = 1,
        seed: int | None = None,
        tools: list[Message] | None = None,
        keys: Sequence[Hashable] | None = None,
    ) -> list[list[Completion]]:
        """As `LLM.chat`; `keys` are not sent (the server reuses a conversation's prefix if it can)."""
        from concurrent.futures import ThreadPoolExecutor

        if n < 1:
            raise ValueError(f"n must be at least 1, got {n}")
        body: dict[str, Any] = {
            "model": self.model, "n": n, "max_tokens": sampling.max_new_tokens,
            "temperature": sampling.temperature, "top_p": sampling.top_p,
        }  # fmt: skip
        if n > 1:
            body["logprobs"] = True  # per-choice token counts (usage has only the request's total)
        if sampling.top_k:
            body["top_k"] = sampling.top_k
        if not sampling.stop_at_eos:
            body["ignore_eos"] = True
        if tools:
            body["tools"] = tools

        def one(i: int) -> list[Completion]:
            request = {**body, "messages": list(conversations[i])}
            if seed is not None:
                request["seed"] = seed + i
            return self._completions(self._call("POST", "/chat/completions", request), n)

        with ThreadPoolExecutor(max_workers=max(1, min(self.concurrency, len(conversations)))) as pool:
            return list(pool.map(one, range(len(conversations))))

    def forget(self, keys: Sequence[Hashable]) -> None:
        """Nothing is kept here."""

    @staticmethod
    def _completions(reply: dict[str, Any], n: int) -> list[Completion]:
        choices = sorted(reply["choices"], key=lambda c: c["index"])
        out = []
        for c in choices:
            logprobs = (c.get("logprobs") or {}).get("content")
            tokens = (
                len(logprobs) if n > 1 and logprobs is not None else reply["usage"]["completion_tokens"] // n
            )
            reason = "length" if c.get("finish_reason") == "length" else "stop"
            calls = tuple(
                ToolCall(t["function"]["name"], t["function"]["arguments"])
                for t in c["message"].get("tool_calls") or []
            )
            out.append(Completion(c["message"].get("content") or "", tokens, reason, calls))
        return out

    def _call(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        import time

        import httpx

        for attempt in range(self.retries + 1):
            wait = min(2.0**attempt, 30.0)
            try:
                reply = self.client.request(method, path, json=body)
            except httpx.TransportError as exc:
                if attempt == self.retries:
                    raise RlhfkitError(f"cannot reach {self.url}{path}: {exc}") from None
                time.sleep(wait)
                continue
            if (reply.status_code == 429 or reply.status_code >= 500) and attempt < self.retries:
                retry_after = reply.headers.get("retry-after", "")
                time.sleep(float(retry_after) if retry_after.isdigit() else wait)
                continue
            if reply.status_code != 200:
                try:
                    message = reply.json()["error"]["message"]
                except (ValueError, KeyError, TypeError):
                    message = reply.text[:200]
                raise RlhfkitError(f"{self.url}{path}: HTTP {reply.status_code}: {message}")
            return reply.json()
        raise AssertionError("unreachable")


def load_llm(spec: str, **kwargs: Any) -> LLM:
    """The LLM a setting names: an http(s) URL of an OpenAI-compatible server (`EndpointLLM`), or a local
    model directory or registered name (`LocalLLM`)."""
    if spec.startswith(("http://", "https://")):
        return EndpointLLM(spec, **kwargs)
    return LocalLLM(spec, **kwargs)
