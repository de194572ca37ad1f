"""Tool calls: the parser (rlhfkit.toolcalls) on well-formed, malformed and unfinished blocks, the
streaming reader agreeing with it however the text is cut, and the prompt rendering of tools (serve.tools)
through a template without tool support (the documented fallback) and one with it."""

from __future__ import annotations

import random

import pytest

from rlhfkit.toolcalls import ToolCall, ToolCallStream, parse_tool_calls

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
