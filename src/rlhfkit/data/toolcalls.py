"""Tool calls in model text: the ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>`` blocks of the
Hermes / Qwen2.5 format, which is also the format `rlhfkit serve` asks a model for when its chat template
has no tool support. The server and the agents read calls with `parse_tool_calls`; a stream is read with
`ToolCallStream`, which gives the same content and calls as `parse_tool_calls` on the whole text.

    content, calls = parse_tool_calls('On it.<tool_call>{"name": "f", "arguments": {"x": 1}}</tool_call>')
    # content == "On it.", calls == [ToolCall(name="f", arguments='{"x": 1}')]

A block whose body is not a JSON object with a string "name" and an object "arguments" (or "parameters",
Llama 3's word; a JSON string holding an object is accepted too) stays in the content exactly as written:
a malformed call is never an error. A block left open at the end of the text (the model stopped, or hit
its token limit) is read all the same. The content is what is left, surrounding whitespace stripped.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

OPEN, CLOSE = "<tool_call>", "</tool_call>"


@dataclass(frozen=True)
class ToolCall:
    """One call: the tool's name and its arguments as a JSON object text (OpenAI's form)."""

    name: str
    arguments: str


def parse_call(body: str) -> ToolCall | None:
    """The call a block's body holds, or None if it is not a well-formed call."""
    try:
        value = json.loads(body)
    except ValueError:
        return None
    if not isinstance(value, dict) or not isinstance(value.get("name"), str) or not value["name"]:
        return None
    arguments = value.get("arguments", value.get("parameters", {}))
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except ValueError:
            return None
    if not isinstance(arguments, dict):
        return None
    return ToolCall(value["name"], json.dumps(arguments, ensure_ascii=False))


def parse_tool_calls(text: str) -> tuple[str, list[ToolCall]]:
    """(content, calls) of a model's text: the well-formed blocks become calls, everything else content."""
    stream = ToolCallStream()
    events = stream.feed(text) + stream.finish()
    content = "".join(e for e in events if isinstance(e, str))
    return content, [e for e in events if isinstance(e, ToolCall)]


class ToolCallStream:
    """Reads a growing text: `feed` a piece and get the content pieces (str) and calls (ToolCall) that are
    certain so far; `finish` at the end. Text that may be the start of a ``<tool_call>`` tag, a block not
    yet closed, and whitespace that may turn out to be trailing are held back until they are decided."""

    def __init__(self) -> None:
        self.buffer = ""  # undecided text: a partial tag, an open block, or whitespace
        self.inside = False  # the buffer holds an open block's body
        self.started = False  # content was given out (leading whitespace is dropped before that)
        self.space = ""  # whitespace after the last content given out: kept only if more content follows

    def feed(self, piece: str) -> list[str | ToolCall]:
        self.buffer += piece
        events: list[str | ToolCall] = []
        while True:
            if self.inside:
                end = self.buffer.find(CLOSE)
                if end < 0:
                    return events
                self._block(self.buffer[:end], closed=True, events=events)
                self.buffer = self.buffer[end + len(CLOSE) :]
                self.inside = False
                continue
            start = self.buffer.find(OPEN)
            if start >= 0:
                self._content(self.buffer[:start], events, final=False)
                self.buffer = self.buffer[start + len(OPEN) :]
                self.inside = True
                continue
            keep = next((n for n in range(len(OPEN) - 1, 0, -1) if self.buffer.endswith(OPEN[:n])), 0)
            cut = len(self.buffer) - keep
            self._content(self.buffer[:cut], events, final=False)
            self.buffer = self.buffer[cut:]
            return events

    def finish(self) -> list[str | ToolCall]:
        """The rest: an open block is read as if closed; held-back text is content (trailing space
        dropped)."""
        events: list[str | ToolCall] = []
        if self.inside:
            self._block(self.buffer, closed=False, events=events)
        else:
            self._content(self.buffer, events, final=True)
        self.buffer, self.inside = "", False
        return events

    def _block(self, body: str, closed: bool, events: list[str | ToolCall]) -> None:
        call = parse_call(body)
        if call is not None:
            events.append(call)
        else:
            self._content(OPEN + body + (CLOSE if closed else ""), events, final=not closed)

    def _content(self, text: str, events: list[str | ToolCall], final: bool) -> None:
        """Give out `text` after the whitespace held before it; hold its own trailing whitespace back."""
        pending = self.space + text
        if not self.started:
            pending = pending.lstrip()
        body = pending.rstrip()
        self.space = "" if final else pending[len(body) :]
        if body:
            events.append(body)
            self.started = True
