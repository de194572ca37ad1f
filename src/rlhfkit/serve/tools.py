"""From a chat request to prompt tokens: messages, tools and tool choice rendered for the model.

* A chat template that renders tools itself (its source mentions ``tools``: Qwen2.5, Hermes, Llama 3.1) gets
  them through ``apply_chat_template(tools=...)``, with the history's tool calls (arguments as objects) and
  tool results as it expects them.
* Any other template (SmolLM2's, the tiny test model's) gets the documented fallback, the Hermes format:
  a system message (the request's own first system message, extended) that lists the tools as JSON schema
  and asks for ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>`` blocks; earlier assistant calls
  are written back as such blocks and tool results become a user turn of ``<tool_response>`` blocks (the
  plain user/assistant alternation every template accepts).

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

from rlhfkit.encoding import prompt_ids
from rlhfkit.toolcalls import CLOSE, OPEN

Message = dict[str, Any]

FALLBACK = (
    "You can call these tools (JSON schema):\n{schemas}\n\n"
    "To call a tool, answer with one block per call, each holding a JSON object with the tool's name and "
    'arguments:\n<tool_call>\n{{"name": "<tool name>", "arguments": {{<arguments>}}}}\n</tool_call>'
)


@dataclass(frozen=True)
class Rendered:
    """A chat prompt ready to sample: its tokens, the text the answer is forced to start with, and whether
    tool calls are read from the answer."""

    ids: list[int]
    prefix: str = ""
    read_calls: bool = False


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
    native = template_supports_tools(tokenizer)
    try:
        if native:
            ids = prompt_ids(tokenizer, native_messages(messages), tools)
        else:
            ids = prompt_ids(tokenizer, fallback_messages(messages, tools))
    except Exception as exc:  # jinja's TemplateError and the template's own raise_exception
        raise ValueError(f"the model's chat template cannot render these messages: {exc}") from None
    prefix = forced_prefix(tool_choice) if tools else ""
    if prefix:
        ids = ids + list(tokenizer(prefix, add_special_tokens=False)["input_ids"])
    return Rendered(ids, prefix, read_calls=bool(tools))
