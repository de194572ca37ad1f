"""Environments whose agent acts through tools: schemas from plain functions, guarded calls, and the one
rendering of an episode as chat turns.

A tool is a Python function with type hints and a Google-style docstring (`tool_schema` derives the OpenAI
JSON schema from them with `transformers.utils.get_json_schema`). `ToolEnvironment.step` answers each
assistant turn: every tool call becomes one observation

    {"role": "tool", "name": "calculator", "content": "42"}

and a turn without calls is the final answer, checked by the subclass (`check` -> reward in [0, 1]). A call
never crashes the episode: an unknown tool, arguments that are not a JSON object, a missing, unexpected or
mistyped argument, a tool that raises and a tool that runs past `tool_timeout` seconds each come back as an
observation starting with "error: ". A tool's output longer than `max_output_chars` is cut, with a marker.

The time limit runs the tool in a daemon thread: a tool stuck forever is abandoned, not killed (a thread
cannot be). The bundled tools bound their own work (the calculator's sizes, SQLite's progress handler, the
sandbox's process timeout), so the thread limit is the last guard, not the usual one.

`chat_messages` turns an episode (reset's messages, assistant turns with `ToolCall`s, tool observations) into
the plain system/user/assistant turns a chat template without tool support renders, exactly as
`rlhfkit serve` does (`chat_tools.fallback_messages`): the tool schemas are appended to the system message,
calls are written as ``<tool_call>`` blocks and tool results become a user turn of ``<tool_response>``
blocks. The SFT demonstrations are written with it, so they look like what the model sees in an episode.
"""

from __future__ import annotations

import inspect
import json
import threading
import typing
from abc import abstractmethod
from collections.abc import Callable
from typing import Any, ClassVar

from rlhfkit.agents.env import Environment, Message, StepResult, Task
from rlhfkit.data.chat_tools import fallback_messages, tool_schemas
from rlhfkit.data.toolcalls import ToolCall
from rlhfkit.errors import ConfigError

ERROR = "error: "


def tool_schema(fn: Callable[..., Any]) -> dict[str, Any]:
    """The OpenAI tool schema of `fn` ({"type": "function", "function": {name, description, parameters}})."""
    try:
        return tool_schemas([fn])[0]
    except Exception as exc:  # TypeHintParsingException, DocstringParsingException
        name = getattr(fn, "__name__", repr(fn))
        raise ConfigError(
            f"tool {name}: {exc} (a tool needs a type hint on every argument and a Google-style docstring "
            "with a description and an Args: section)"
        ) from None


def truncate(text: str, limit: int) -> str:
    """`text` cut to `limit` characters, with a marker saying how much was left out."""
    if len(text) <= limit:
        return text
    return f"{text[:limit]}\n... [output truncated: {len(text) - limit} more characters]"


def as_call(call: Any) -> ToolCall:
    """A `ToolCall`, also from OpenAI's {"function": {"name", "arguments"}} form."""
    if isinstance(call, ToolCall):
        return call
    function = call.get("function", call)
    arguments = function.get("arguments", "{}")
    return ToolCall(
        str(function.get("name", "")), arguments if isinstance(arguments, str) else json.dumps(arguments)
    )


def wrong_type(fn: Callable[..., Any], arguments: dict[str, Any]) -> str | None:
    """Why an argument does not have its hinted type (str, int, float, bool), or None."""
    try:
        hints = typing.get_type_hints(fn)
    except Exception:
        return None
    names = {str: "a string", int: "an integer", float: "a number", bool: "true or false"}
    for key, value in arguments.items():
        hint = hints.get(key)
        if hint not in names:
            continue
        ok = isinstance(value, hint) and not (hint is not bool and isinstance(value, bool))
        if hint is float and isinstance(value, int) and not isinstance(value, bool):
            ok = True
        if not ok:
            return f"argument '{key}' must be {names[hint]}, not {json.dumps(value)}"
    return None


class ToolEnvironment(Environment):
    """An environment answered by tool calls and checked on the final answer (see the module docstring).

    A subclass defines `tools()`, `tasks(split)`, `instructions(task)` (the system message) and
    `check(task, answer)`; it may extend `reset` (set up files, a database) and `close`."""

    default_tool_timeout: ClassVar[float] = 5.0
    """Seconds a tool call may run when the constructor is not told (the OS environment allows more)."""

    def __init__(self, tool_timeout: float | None = None, max_output_chars: int = 2000) -> None:
        self.tool_timeout = float(tool_timeout if tool_timeout is not None else self.default_tool_timeout)
        self.max_output_chars = int(max_output_chars)
        if self.tool_timeout <= 0 or self.max_output_chars <= 0:
            raise ConfigError(f"{self.name}: tool_timeout and max_output_chars must be positive")
        self.task: Task | None = None
        self.table = {fn.__name__: fn for fn in self.tools()}

    def tool_schemas(self) -> list[dict[str, Any]]:
        """The JSON schemas of the tools, as a chat template or the tool-list system prompt takes them."""
        return [tool_schema(fn) for fn in self.tools()]

    @abstractmethod
    def instructions(self, task: Task) -> str:
        """The system message: what the agent is, what it may do, how to give the final answer."""

    @abstractmethod
    def check(self, task: Task, answer: str) -> float:
        """The reward of a final answer, in [0, 1] (1 is correct)."""

    def reset(self, task: Task) -> list[Message]:
        self.task = task
        return [
            {"role": "system", "content": self.instructions(task)},
            {"role": "user", "content": task.prompt},
        ]

    def step(self, message: Message) -> StepResult:
        if self.task is None:
            raise RuntimeError(f"{self.name}: step() before reset()")
        calls = [as_call(c) for c in message.get("tool_calls") or []]
        if not calls:
            reward = min(1.0, max(0.0, float(self.check(self.task, message.get("content") or ""))))
            return StepResult([], reward, done=True, info={"reason": "answer", "correct": reward >= 1.0})
        observations = [{"role": "tool", "name": c.name, "content": self.call_tool(c)} for c in calls]
        errors = sum(o["content"].startswith(ERROR) for o in observations)
        return StepResult(observations, 0.0, done=False, info={"reason": "tool", "tool_errors": errors})

    def call_tool(self, call: ToolCall) -> str:
        """The text a call returns: the tool's result, or an "error: ..." line; never raises."""
        fn = self.table.get(call.name)
        if fn is None:
            return f"{ERROR}unknown tool '{call.name}'; the tools are: {', '.join(self.table)}"
        try:
            arguments = json.loads(call.arguments or "{}")
        except ValueError as exc:
            return f"{ERROR}the arguments of {call.name} are not valid JSON: {exc}"
        if not isinstance(arguments, dict):
            return f"{ERROR}the arguments of {call.name} must be a JSON object, not {call.arguments}"
        try:
            inspect.signature(fn).bind(**arguments)
        except TypeError as exc:
            return f"{ERROR}bad arguments for {call.name}: {exc}"
        problem = wrong_type(fn, arguments)
        if problem:
            return f"{ERROR}bad arguments for {call.name}: {problem}"
        return truncate(self.run_with_timeout(call.name, fn, arguments), self.max_output_chars)

    def run_with_timeout(self, name: str, fn: Callable[..., Any], arguments: dict[str, Any]) -> str:
        box: dict[str, Any] = {}

        def target() -> None:
            try:
                box["result"] = fn(**arguments)
            except Exception as exc:
                box["error"] = exc

        worker = threading.Thread(target=target, name=f"tool-{name}", daemon=True)
        worker.start()
        worker.join(self.tool_timeout)
        if worker.is_alive():
            return f"{ERROR}tool {name} timed out after {self.tool_timeout:g} s"
        if "error" in box:
            exc = box["error"]
            return f"{ERROR}tool {name} failed: {type(exc).__name__}: {exc}"
        return str(box.get("result"))


def chat_messages(messages: list[Message], tools: list[dict[str, Any]] | None) -> list[Message]:
    """An episode's messages as plain system/user/assistant turns (see the module docstring).

    Assistant turns may carry `tool_calls` as `ToolCall`s or in OpenAI's form; observations are
    {"role": "tool", "content": ...}. `tools` are the JSON schemas (`ToolEnvironment.tool_schemas()`)."""
    openai = []
    for m in messages:
        if m.get("role") == "assistant" and m.get("tool_calls"):
            calls = [as_call(c) for c in m["tool_calls"]]
            m = {
                **m,
                "tool_calls": [
                    {"type": "function", "function": {"name": c.name, "arguments": c.arguments}}
                    for c in calls
                ],
            }
        openai.append(m)
    return fallback_messages(openai, tools)
