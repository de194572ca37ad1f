"""Chat messages with tools, rendered for a chat template: the one rule the server (`serve.tools`) and the
agents (`agents.episode`) share, so a model sees tools and tool results the same way in both.

* A chat template that renders tools itself (its source mentions ``tools``: Qwen2.5, Hermes, Llama 3.1) gets
  them through ``apply_chat_template(tools=...)``, with the history's tool calls (arguments as objects) and
  tool results as it expects them (`native_messages`).
* Any other template (SmolLM2's, the tiny test model's) gets the documented fallback, the Hermes format
  (`fallback_messages`): a system message (the conversation's own first system message, extended) that lists
  the tools as JSON schema and asks for ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>`` blocks;
  earlier assistant calls are written back as such blocks and tool results become a user turn of
  ``<tool_response>`` blocks (the plain user/assistant alternation every template accepts).

Messages are OpenAI's: an assistant turn's calls are ``{"id", "type": "function", "function": {"name",
"arguments"}}`` with the arguments as JSON text (`openai_tool_calls` builds them from parsed `ToolCall`s);
tools are ``{"type": "function", "function": {...}}`` schemas (`tool_schemas` derives them from Python
functions with type hints and a Google-style docstring).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from typing import Any

from rlhfkit.data.toolcalls import CLOSE, OPEN, ToolCall

Message = dict[str, Any]

FALLBACK = (
    "You can call these tools (JSON schema):\n{schemas}\n\n"
    "To call a tool, answer with one block per call, each holding a JSON object with the tool's name and "
    'arguments:\n<tool_call>\n{{"name": "<tool name>", "arguments": {{<arguments>}}}}\n</tool_call>'
)


def template_supports_tools(tokenizer: Any) -> bool:
    template = getattr(tokenizer, "chat_template", None) or ""
    return "tools" in (template if isinstance(template, str) else json.dumps(template))


def _arguments(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return text


def native_messages(messages: list[Message]) -> list[Message]:
    """The conversation as transformers' tool-aware templates expect it (call arguments as objects)."""
    out = []
    for m in messages:
        m = dict(m)
        if m.get("tool_calls"):
            m["tool_calls"] = [
                {**c, "function": {**c["function"], "arguments": _arguments(c["function"]["arguments"])}}
                for c in m["tool_calls"]
            ]
        m["content"] = m.get("content") or ""
        out.append(m)
    return out


def fallback_messages(messages: list[Message], tools: list[Message] | None) -> list[Message]:
    """The conversation in plain system/user/assistant turns (see the module docstring)."""
    out: list[Message] = []
    for m in messages:
        role, content = m["role"], m.get("content") or ""
        if role == "assistant" and m.get("tool_calls"):
            calls = [(json.dumps(c["function"]["name"]), c["function"]["arguments"]) for c in m["tool_calls"]]
            blocks = [f'{OPEN}\n{{"name": {name}, "arguments": {args}}}\n{CLOSE}' for name, args in calls]
            content = "\n".join([content, *blocks] if content else blocks)
        elif role == "tool":
            block = f"<tool_response>\n{content}\n</tool_response>"
            if out and out[-1].get("tool_results"):  # several results answer one turn of calls
                out[-1]["content"] += "\n" + block
                continue
            out.append({"role": "user", "content": block, "tool_results": True})
            continue
        out.append({"role": role, "content": content})
    if tools:
        text = FALLBACK.format(schemas="\n".join(json.dumps(t, ensure_ascii=False) for t in tools))
        if out and out[0]["role"] == "system":
            out[0]["content"] = f"{out[0]['content']}\n\n{text}"
        else:
            out.insert(0, {"role": "system", "content": text})
    return [{"role": m["role"], "content": m["content"]} for m in out]


def tool_schemas(functions: Sequence[Callable[..., Any]]) -> list[Message]:
    """OpenAI tool schemas of Python functions (type hints and a Google-style docstring, as transformers'
    `get_json_schema` reads them): name, description and parameters only (transformers adds the return
    type, which OpenAI's format has no field for and strict servers, `rlhfkit serve` included, refuse)."""
    from transformers.utils import get_json_schema

    keep = ("name", "description", "parameters")
    schemas = [get_json_schema(fn) for fn in functions]
    return [
        {"type": "function", "function": {k: s["function"][k] for k in keep if k in s["function"]}}
        for s in schemas
    ]


def openai_tool_calls(calls: Sequence[ToolCall], prefix: str = "call") -> list[Message]:
    """Parsed calls as an assistant message's `tool_calls` (ids `{prefix}_0`, `{prefix}_1`, ...)."""
    return [
        {"id": f"{prefix}_{i}", "type": "function", "function": {"name": c.name, "arguments": c.arguments}}
        for i, c in enumerate(calls)
    ]


def _template_inputs(
    tokenizer: Any, messages: list[Message], tools: list[Message] | None
) -> tuple[list[Message], dict[str, Any]]:
    """The messages and extra arguments `apply_chat_template` takes for this tokenizer (see above)."""
    if not template_supports_tools(tokenizer):
        return fallback_messages(messages, tools), {}
    return native_messages(messages), ({"tools": tools} if tools else {})


def render_messages(
    tokenizer: Any, messages: list[Message], tools: list[Message] | None, add_generation_prompt: bool = True
) -> str:
    """The conversation as the model sees it, as text (natively or in the fallback format, see above)."""
    messages, extra = _template_inputs(tokenizer, messages, tools)
    return tokenizer.apply_chat_template(
        messages, add_generation_prompt=add_generation_prompt, tokenize=False, **extra
    )


def chat_prompt_ids(tokenizer: Any, messages: list[Message], tools: list[Message] | None) -> list[int]:
    """Token ids of a conversation with tools, ready for the next assistant turn."""
    messages, extra = _template_inputs(tokenizer, messages, tools)
    encoded = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, **extra)
    return list(encoded["input_ids"] if not isinstance(encoded, list) else encoded)  # transformers 5: a dict
