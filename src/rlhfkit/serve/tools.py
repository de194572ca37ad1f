"""From a chat request to prompt tokens: messages, tools and tool choice rendered for the model.

How tools and tool results are rendered (natively, or in the documented Hermes fallback) is
`rlhfkit.data.chat_tools`, shared with the agents; this module adds the request's `tool_choice`.

``tool_choice``: "auto" (the default with tools) renders the tools and reads calls from the answer; "none"
renders no tools and reads no calls. "required" and a named function are forced the way we can without
constrained decoding: the answer is made to start with ``<tool_call>{"name": "`` (plus the name and
``", "arguments": `` for a named function). A weak model can still write a malformed call; it then comes
back as content (vLLM guarantees valid JSON with guided decoding; we do not).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from rlhfkit.data.chat_tools import (
    chat_prompt_ids,
    fallback_messages,
    native_messages,
    template_supports_tools,
)
from rlhfkit.data.toolcalls import OPEN

__all__ = [
    "Rendered",
    "fallback_messages",
    "forced_prefix",
    "native_messages",
    "render_chat",
    "template_supports_tools",
]

Message = dict[str, Any]


@dataclass(frozen=True)
class Rendered:
    """A chat prompt ready to sample: its tokens, the text the answer is forced to start with, and whether
    tool calls are read from the answer."""

    ids: list[int]
    prefix: str = ""
    read_calls: bool = False


def forced_prefix(tool_choice: Any) -> str:
    """What the answer must start with under `tool_choice` ("" for auto and none)."""
    if tool_choice == "required":
        return f'{OPEN}\n{{"name": "'
    if isinstance(tool_choice, dict):
        return f'{OPEN}\n{{"name": {json.dumps(tool_choice["function"]["name"])}, "arguments": '
    return ""


def render_chat(
    tokenizer: Any, messages: list[Message], tools: list[Message] | None, tool_choice: Any
) -> Rendered:
    """Prompt tokens of a validated chat request; ValueError (for a 400) when the template refuses it."""
    if tool_choice == "none":
        tools = None
    try:
        ids = chat_prompt_ids(tokenizer, messages, tools)
    except Exception as exc:  # jinja's TemplateError and the template's own raise_exception
        raise ValueError(f"the model's chat template cannot render these messages: {exc}") from None
    prefix = forced_prefix(tool_choice) if tools else ""
    if prefix:
        ids = ids + list(tokenizer(prefix, add_special_tokens=False)["input_ids"])
    return Rendered(ids, prefix, read_calls=bool(tools))
