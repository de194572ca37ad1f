"""The environment protocol: what an agent acts in.

An environment hands out tasks, opens an episode on one (`reset` -> the chat messages the model sees
first) and answers each assistant turn (`step` -> observation messages, reward, done). Tools are plain
Python functions with type hints and a Google-style docstring; their JSON schema is derived from those.

    class Echo(Environment):
        name = "echo"

        def tasks(self, split):
            return [Task(id=f"{split}-0", prompt="Say hi.", data={"answer": "hi"})]

        def reset(self, task):
            self.task = task
            return [{"role": "user", "content": task.prompt}]

        def step(self, message):
            done_reward = float(message["content"].strip().lower() == self.task.data["answer"])
            return StepResult(observations=[], reward=done_reward, done=True)

The assistant message given to `step` is {"role": "assistant", "content": str, "tool_calls": [...]}:
content is the model's text outside tool-call blocks, tool_calls are `rlhfkit.data.toolcalls.ToolCall`s (name,
arguments as JSON text), parsed by the episode runner with `toolcalls.parse_tool_calls`, the one parser.
Observation messages are chat messages, normally {"role": "tool", "name": ..., "content": ...}.

One environment object serves one episode at a time (`reset` starts a new one); the episode runner makes
one object per concurrent episode. A user's environment is `module:Class` in a config.
"""

from __future__ import annotations

import random
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

Message = dict[str, Any]
Split = Literal["train", "test"]


@dataclass(frozen=True)
class Task:
    """One task: a stable id, the user's request, and what the environment needs to run and check it."""

    id: str
    prompt: str
    data: dict[str, Any] = field(default_factory=dict)


@dataclass
class StepResult:
    """An environment's answer to one assistant turn."""

    observations: list[Message]
    """Messages appended after the assistant's turn (tool results); empty when the episode is done."""
    reward: float = 0.0
    """Reward of this step; an episode's return is the sum (bundled environments reward only the end)."""
    done: bool = False
    """The episode is over (the agent answered, or the environment ended it)."""
    info: dict[str, Any] = field(default_factory=dict)
    """Anything to log; `reason` says why an episode ended ("answer", "error", ...)."""


class Environment(ABC):
    """Base class of every environment (see the module docstring)."""

    name: ClassVar[str] = ""

    def tools(self) -> list[Callable[..., Any]]:
        """The tools the agent may call (none by default)."""
        return []

    @abstractmethod
    def tasks(self, split: Split) -> list[Task]:
        """The tasks of a split: "train" for RL and demonstrations, "test" held out for evaluation."""

    @abstractmethod
    def reset(self, task: Task) -> list[Message]:
        """Start an episode on `task`: the first messages the model sees (system and user)."""

    @abstractmethod
    def step(self, message: Message) -> StepResult:
        """Answer one assistant turn."""

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release what the episode holds (temporary files, processes)."""


def generated_split(
    name: str,
    split: Split,
    size: dict[str, int],
    draw: Callable[[random.Random], tuple[str, dict[str, Any]]],
    key: Callable[[str, dict[str, Any]], str],
) -> tuple[Task, ...]:
    """The tasks of a generated split, the same on every call and machine: `draw` makes (prompt, data) from
    `random.Random(f"{name}:{split}:{seed}")` for seed 0, 1, ...; a task whose `key` was seen is dropped, and
    a train task whose key is a test task's too, so the splits are disjoint. Ids: f"{name}-{split}-{i}"."""
    test_keys = {key(*draw(random.Random(f"{name}:test:{i}"))) for i in range(size["test"])}
    tasks: list[Task] = []
    seen: set[str] = set()
    seed = 0
    while len(tasks) < size[split]:
        prompt, data = draw(random.Random(f"{name}:{split}:{seed}"))
        seed += 1
        k = key(prompt, data)
        if k in seen or (split == "train" and k in test_keys):
            continue
        seen.add(k)
        tasks.append(Task(id=f"{name}-{split}-{len(tasks)}", prompt=prompt, data=data))
    return tuple(tasks)
