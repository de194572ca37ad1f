"""Tool calls: the parser (rlhfkit.data.toolcalls) on well-formed, malformed and unfinished blocks, the
streaming reader agreeing with it however the text is cut, and the prompt rendering of tools (serve.tools)
through a template without tool support (the documented fallback) and one with it."""

from __future__ import annotations

import json
import random

import pytest

from rlhfkit.data.toolcalls import ToolCall, ToolCallStream, parse_tool_calls

CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'


def test_parse_well_formed_calls_and_keep_the_content():
    content, calls = parse_tool_calls(f"  Let me check.\n{CALL}\n{CALL.replace('Paris', 'Oslo')}  ")
    assert content == "Let me check."
    assert calls == [
        ToolCall("get_weather", '{"city": "Paris"}'),
        ToolCall("get_weather", '{"city": "Oslo"}'),
    ]
    # Llama 3's "parameters", arguments as a JSON string, an unclosed block at the very end
    text = (
        '<tool_call>{"name": "f", "parameters": {"a": [1, 2]}}</tool_call>'
        '<tool_call>{"name": "g", "arguments": "{\\"b\\": null}"}'
    )
    assert parse_tool_calls(text) == ("", [ToolCall("f", '{"a": [1, 2]}'), ToolCall("g", '{"b": null}')])
    assert parse_tool_calls("no calls here") == ("no calls here", [])


@pytest.mark.parametrize(
    "block",
    [
        "<tool_call>{not json}</tool_call>",
        '<tool_call>{"arguments": {}}</tool_call>',  # no name
        '<tool_call>{"name": "f", "arguments": [1]}</tool_call>',  # arguments not an object
        '<tool_call>["f"]</tool_call>',
        '<tool_call>{"name": "f", "arguments": {"x": 1}',  # cut off mid-call
    ],
)
def test_malformed_calls_stay_content(block: str):
    content, calls = parse_tool_calls(f"Hi {block}")
    assert calls == []
    assert content == f"Hi {block}"


def test_the_stream_reader_agrees_with_the_parser_however_the_text_is_cut():
    texts = [
        f"  Let me check.\n{CALL}\n  and {CALL} done.  \n",
        f"{CALL}",
        "<tool_call>{bad}</tool_call> <tool_ca",
        "a < b <tool_c and <tool_call>",
        f"x\n\n{CALL[:-5]}",
        "   ",
    ]
    rng = random.Random(0)
    for text in texts:
        whole = parse_tool_calls(text)
        for _ in range(30):
            cuts = sorted(rng.sample(range(len(text) + 1), min(len(text), rng.randint(1, 8))))
            stream = ToolCallStream()
            events = []
            for lo, hi in zip([0, *cuts], [*cuts, len(text)], strict=True):
                events += stream.feed(text[lo:hi])
            events += stream.finish()
            content = "".join(e for e in events if isinstance(e, str))
            assert (content, [e for e in events if isinstance(e, ToolCall)]) == whole, (text, cuts)


def call(call_id: str, city: str) -> dict:
    return {
        "id": call_id,
        "type": "function",
        "function": {"name": "get_weather", "arguments": f'{{"city": "{city}"}}'},
    }


TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]
HISTORY = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Weather in Paris and Oslo?"},
    {"role": "assistant", "content": None, "tool_calls": [call("c1", "Paris"), call("c2", "Oslo")]},
    {"role": "tool", "tool_call_id": "c1", "content": "sunny"},
    {"role": "tool", "tool_call_id": "c2", "content": "snow"},
]  # fmt: skip


def test_the_fallback_renders_tools_calls_and_results_as_plain_turns():
    from rlhfkit.serve.tools import fallback_messages

    out = fallback_messages(HISTORY, TOOLS)
    assert [m["role"] for m in out] == ["system", "user", "assistant", "user"]
    assert out[0]["content"].startswith("Be brief.\n\nYou can call these tools")
    assert json.dumps(TOOLS[0]) in out[0]["content"] and "<tool_call>" in out[0]["content"]
    # the history's calls as the blocks the model is asked to write; both results in one user turn
    assert parse_tool_calls(out[2]["content"]) == ("", [
        ToolCall("get_weather", '{"city": "Paris"}'), ToolCall("get_weather", '{"city": "Oslo"}'),
    ])  # fmt: skip
    assert (
        out[3]["content"]
        == "<tool_response>\nsunny\n</tool_response>\n<tool_response>\nsnow\n</tool_response>"
    )
    assert fallback_messages(HISTORY[1:2], None) == [
        {"role": "user", "content": "Weather in Paris and Oslo?"}
    ]


def test_render_chat_uses_a_tool_aware_template_and_forces_calls(tiny_model):
    from rlhfkit.models.loading import load_tokenizer
    from rlhfkit.serve.tools import render_chat

    tokenizer = load_tokenizer(str(tiny_model))
    fallback = render_chat(tokenizer, HISTORY, TOOLS, "auto")
    text = tokenizer.decode(fallback.ids)
    assert "You can call these tools" in text and "<|im_start|>tool" not in text and fallback.read_calls
    named = render_chat(
        tokenizer, HISTORY[:2], TOOLS, {"type": "function", "function": {"name": "get_weather"}}
    )
    assert tokenizer.decode(named.ids).endswith(
        'assistant\n<tool_call>\n{"name": "get_weather", "arguments": '
    )
    assert render_chat(tokenizer, HISTORY[:2], TOOLS, "none") == render_chat(
        tokenizer, HISTORY[:2], None, "auto"
    )
    # a template that renders tools itself gets them, and the calls' arguments as objects
    tokenizer.chat_template = (
        "{% for t in tools %}TOOL {{ t.function.name }};{% endfor %}{% for m in messages %}"
        "{{ m.role }}: {{ m.content }}{% for c in m.tool_calls or [] %} CALL {{ c.function.arguments.city }}"
        "{% endfor %};{% endfor %}"
    )
    native = tokenizer.decode(render_chat(tokenizer, HISTORY, TOOLS, "auto").ids)
    assert native.startswith("TOOL get_weather;system: Be brief.;") and "CALL Paris CALL Oslo" in native
    assert "tool: sunny;tool: snow;" in native
