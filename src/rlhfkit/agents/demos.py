"""SFT demonstrations of tool use, written from train tasks by playing the gold solution through the
environment itself, so that every tool result in them is exactly what the environment answers.

A demonstration is one chat record `{"task_id": ..., "messages": [...]}` (SFT reads `messages`, ignores the
rest) rendered by `agents.tools.chat_messages`, as the model sees an episode:

    system     the environment's instructions + the tool list and how to call (serve.tools.FALLBACK)
    user       the task
    assistant  <tool_call>\\n{"name": "calculator", "arguments": {"expression": "..."}}\\n</tool_call>
    user       <tool_response>\\n<the tool's result>\\n</tool_response>
    assistant  The answer is ...

`python scripts/make_agent_demos.py` rewrites `rlhfkit/assets/agents/{calc,db}_demos.jsonl`; `replay` plays
a demonstration back (tests check every bundled one: same tool results, final answer correct).
"""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path
from typing import Any

from rlhfkit.agents.env import Message, Task
from rlhfkit.agents.tools import ToolEnvironment, chat_messages
from rlhfkit.data.toolcalls import ToolCall, parse_tool_calls

COUNT = 300


def gold_turns(env: ToolEnvironment, task: Task) -> tuple[ToolCall, str]:
    """The gold tool call of a calc or db task, and the final answer written from the tool's result."""
    if env.name == "calc":
        call = ToolCall("calculator", json.dumps({"expression": task.data["expression"]}, ensure_ascii=False))
        return call, "The answer is {result}."
    if env.name == "db":
        call = ToolCall("sql", json.dumps({"query": task.data["sql"]}, ensure_ascii=False))
        kind = task.data["kind"]
        if kind == "list":
            return call, ", ".join(task.data["answer"])
        return call, "{value}" if kind == "number" else str(task.data["answer"])
    raise ValueError(f"no gold solution for the {env.name!r} environment")


def demonstration(env: ToolEnvironment, task: Task) -> dict[str, Any]:
    """The demonstration of `task` (see the module docstring); ValueError if its answer does not check."""
    own = getattr(env, "demonstration", None)
    if own is not None:  # an environment of several turns writes its own (agents.support)
        return own(task)
    messages = env.reset(task)
    call, template = gold_turns(env, task)
    turn: Message = {"role": "assistant", "content": "", "tool_calls": [call]}
    step = env.step(turn)
    result = step.observations[0]["content"]
    value = result.splitlines()[-1] if "\n" in result else result  # db: the single cell under the header
    final: Message = {"role": "assistant", "content": template.format(result=result, value=value)}
    end = env.step(final)
    env.close()
    if not end.info.get("correct"):
        raise ValueError(f"{task.id}: the gold solution does not check ({final['content']!r})")
    episode = [*messages, turn, *step.observations, final]
    return {"task_id": task.id, "messages": chat_messages(episode, env.tool_schemas())}


def replay(env: ToolEnvironment, task: Task, record: dict[str, Any]) -> tuple[list[Message], float]:
    """Play a demonstration's assistant turns through `env`: (the episode rendered as the record's messages
    would be, the final reward). A demonstration is faithful when the first equals `record["messages"]`."""
    episode = env.reset(task)
    reward = 0.0
    for message in record["messages"]:
        if message["role"] != "assistant":
            continue
        content, calls = parse_tool_calls(message["content"])
        turn: Message = {"role": "assistant", "content": content, "tool_calls": calls}
        result = env.step(turn)
        episode += [turn, *result.observations]
        if result.done:
            reward = result.reward
            break
    env.close()
    return chat_messages(episode, env.tool_schemas()), reward


def turn_records(record: dict[str, Any]) -> list[dict[str, Any]]:
    """One SFT record per assistant turn of a demonstration (the conversation up to and including it).

    SFT learns only a record's last assistant turn; a full demonstration would teach the final answer but
    not the tool call. Train on these records to learn both."""
    messages = record["messages"]
    return [{"messages": messages[: i + 1]} for i, m in enumerate(messages) if m["role"] == "assistant"]


def demos_path(name: str) -> Path:
    """A bundled demonstration file, e.g. demos_path("calc") -> .../rlhfkit/assets/agents/calc_demos.jsonl."""
    return Path(str(resources.files("rlhfkit") / "assets" / "agents" / f"{name}_demos.jsonl"))


def write_demos(env: ToolEnvironment, path: str | Path, count: int = COUNT) -> int:
    """Write demonstrations of the first `count` train tasks to `path` (JSONL); returns how many."""
    records = [demonstration(env, task) for task in env.tasks("train")[:count]]
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
    return len(records)
