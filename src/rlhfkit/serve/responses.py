"""Scheduler events to OpenAI bodies: chat completions, text completions, and their stream chunks.

One `Exchange` per HTTP request: its jobs (one per prompt), each choice's text, tool calls, log-probs and
finish reason, built from the `Delta`s as they come. A streamed answer and the same answer unstreamed are
made from the same pieces (`ToolCallStream` for the calls), so they always agree. Choice `index` runs over
the prompts' choices in order: prompt p, choice i -> p * n + i (OpenAI's order for /v1/completions).

Where this departs from OpenAI: log-probs cover every generated token, EOS included (written as the token
is, e.g. ``<|im_end|>``), so there are exactly `completion_tokens` of them; `usage.completion_tokens`
counts EOS too. A choice cut at max_tokens keeps finish_reason "length" even if it holds a tool call.
"""

from __future__ import annotations

import json
import secrets
import time
from dataclasses import dataclass, field
from typing import Any

from rlhfkit.data.toolcalls import ToolCall, ToolCallStream
from rlhfkit.serve.scheduler import Delta, Job, TokenLogprob


@dataclass
class Choice:
    index: int
    tools: ToolCallStream | None  # None: tool calls are not read
    content: list[str] = field(default_factory=list)
    calls: list[tuple[str, ToolCall]] = field(default_factory=list)  # (id, call)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finish_reason: str | None = None

    def take(self, text: str, final: bool) -> list[str | tuple[str, ToolCall]]:
        """The content pieces and (id, call)s that `text` (and, when final, the end) makes certain."""
        if self.tools is None:
            events: list[str | ToolCall] = [text] if text else []
        else:
            events = self.tools.feed(text) + (self.tools.finish() if final else [])
        out: list[str | tuple[str, ToolCall]] = []
        for event in events:
            if isinstance(event, ToolCall):
                item = (f"call_{secrets.token_hex(12)}", event)
                self.calls.append(item)
                out.append(item)
            else:
                self.content.append(event)
                out.append(event)
        return out

    @property
    def reason(self) -> str | None:
        return "tool_calls" if self.calls and self.finish_reason == "stop" else self.finish_reason


class Exchange:
    """The state of one request's answers; see the module docstring."""

    def __init__(
        self,
        kind: str,
        model: str,
        jobs: list[Job],
        prompt_tokens: int,
        read_calls: bool,
        prefixes: list[str],
    ) -> None:
        self.kind = kind  # "chat" or "text"
        self.id = ("chatcmpl-" if kind == "chat" else "cmpl-") + secrets.token_hex(12)
        self.created, self.model, self.jobs = int(time.time()), model, jobs
        self.prompt_tokens, self.completion_tokens = prompt_tokens, 0
        n = jobs[0].request.n
        self.base = {job: p * n for p, job in enumerate(jobs)}
        self.choices = [Choice(i, ToolCallStream() if read_calls else None) for i in range(n * len(jobs))]
        self.done = 0
        # text each answer starts with (a forced tool call, an echoed prompt), given out with its first delta
        self.opening = {c.index: c.take(prefixes[c.index // n], final=False) for c in self.choices}

    @property
    def finished(self) -> bool:
        return self.done == len(self.jobs)

    def apply(self, job: Job, delta: Delta) -> tuple[Choice, list[str | tuple[str, ToolCall]]]:
        choice = self.choices[self.base[job] + delta.index]
        choice.logprobs += delta.logprobs
        choice.finish_reason = delta.finish_reason
        pieces = self.opening.pop(choice.index, []) + choice.take(delta.text, delta.finish_reason is not None)
        return choice, pieces

    def usage(self) -> dict[str, int]:
        total = self.prompt_tokens + self.completion_tokens
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": total,
        }

    def _head(self, obj: str) -> dict[str, Any]:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model}

    # ---------------------------------------------------------------------------------- whole bodies
    def body(self) -> dict[str, Any]:
        if self.kind == "text":
            choices = [
                {
                    "index": c.index,
                    "text": "".join(str(p) for p in c.content),
                    "logprobs": text_logprobs(c.logprobs)
                    if self.jobs[0].request.logprobs is not None
                    else None,
                    "finish_reason": c.reason,
                }
                for c in self.choices
            ]
            return {**self._head("text_completion"), "choices": choices, "usage": self.usage()}
        choices = []
        for c in self.choices:
            content = "".join(c.content)
            message: dict[str, Any] = {"role": "assistant", "content": content or (None if c.calls else "")}
            if c.calls:
                message["tool_calls"] = [tool_call(call_id, call) for call_id, call in c.calls]
            message["refusal"] = None
            logprobs = None
            if self.jobs[0].request.logprobs is not None:
                logprobs = {"content": [chat_logprob(t) for t in c.logprobs], "refusal": None}
            choices.append(
                {"index": c.index, "message": message, "logprobs": logprobs, "finish_reason": c.reason}
            )
        return {**self._head("chat.completion"), "choices": choices, "usage": self.usage()}

    # ---------------------------------------------------------------------------------- stream chunks
    def first_chunks(self) -> list[dict[str, Any]]:
        if self.kind == "text":
            return []
        return [self._chunk(c.index, {"role": "assistant", "content": ""}, None, None) for c in self.choices]

    def chunks(self, choice: Choice, delta: Delta, pieces: list[str | tuple[str, ToolCall]]) -> list[dict]:
        """The chunks of one choice's delta: content and tool-call fragments, then its finish reason."""
        out = []
        lp = delta.logprobs if self.jobs[0].request.logprobs is not None else None
        if self.kind == "text":
            text = "".join(p for p in pieces if isinstance(p, str))
            if text or lp or delta.finish_reason:
                logprobs = text_logprobs(lp) if lp is not None else None
                out.append({**self._head("text_completion"), "choices": [
                    {"index": choice.index, "text": text, "logprobs": logprobs, "finish_reason": choice.reason
                     if delta.finish_reason else None}
                ]})  # fmt: skip
            return out
        logprobs = {"content": [chat_logprob(t) for t in lp], "refusal": None} if lp else None
        for piece in pieces:
            if isinstance(piece, str):
                out.append(self._chunk(choice.index, {"content": piece}, logprobs, None))
            else:
                k = [cid for cid, _ in choice.calls].index(piece[0])
                head = {"index": k, "id": piece[0], "type": "function",
                        "function": {"name": piece[1].name, "arguments": ""}}  # fmt: skip
                out.append(self._chunk(choice.index, {"tool_calls": [head]}, logprobs, None))
                args = {"index": k, "function": {"arguments": piece[1].arguments}}
                out.append(self._chunk(choice.index, {"tool_calls": [args]}, None, None))
            logprobs = None  # the step's log-probs go with its first chunk
        if logprobs is not None:
            out.append(self._chunk(choice.index, {}, logprobs, None))
        if delta.finish_reason:
            out.append(self._chunk(choice.index, {}, None, choice.reason))
        return out

    def usage_chunk(self) -> dict[str, Any]:
        obj = "chat.completion.chunk" if self.kind == "chat" else "text_completion"
        return {**self._head(obj), "choices": [], "usage": self.usage()}

    def _chunk(self, index: int, delta: dict, logprobs: Any, finish: str | None) -> dict[str, Any]:
        choice = {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish}
        return {**self._head("chat.completion.chunk"), "choices": [choice]}


def tool_call(call_id: str, call: ToolCall) -> dict[str, Any]:
    return {"id": call_id, "type": "function", "function": {"name": call.name, "arguments": call.arguments}}


def chat_logprob(t: TokenLogprob) -> dict[str, Any]:
    top = [{"token": s, "logprob": v, "bytes": list(s.encode())} for s, v in t.top]
    return {"token": t.token, "logprob": t.logprob, "bytes": list(t.token.encode()), "top_logprobs": top}


def text_logprobs(tokens: list[TokenLogprob]) -> dict[str, Any]:
    offsets, at = [], 0
    for t in tokens:
        offsets.append(at)
        at += len(t.token)
    return {
        "tokens": [t.token for t in tokens],
        "token_logprobs": [t.logprob for t in tokens],
        "top_logprobs": [dict(t.top) for t in tokens],
        "text_offset": offsets,
    }


def sse(obj: dict[str, Any] | str) -> str:
    """One server-sent event: `data: <json>` and a blank line."""
    return f"data: {obj if isinstance(obj, str) else json.dumps(obj, ensure_ascii=False)}\n\n"
