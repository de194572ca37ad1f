"""Trajectory rankings: a ranked group of whole agent episodes on one task, the record in which people's and
judges' rankings of episodes are kept (the feedback app's export) and from which the reward model learns.

    {"prompt": [{"role": "system", ...}, {"role": "user", ...}],          the task's opening messages
     "tools": [{"type": "function", "function": {"name": ..., ...}}],     optional: the tools the agent had
     "episodes": [
       {"messages": [{"role": "assistant", "content": "", "tool_calls": [{"id": "call_1_0",
                        "type": "function", "function": {"name": "refund", "arguments": "{...}"}}]},
                     {"role": "tool", "tool_call_id": "call_1_0", "content": "refused: over the limit"},
                     {"role": "assistant", "content": "Your refund is on its way."}],
        "prompt_ids": [...], "completion_ids": [...], "loss_mask": [...],   optional: the sampler's tokens
        "flags": [1]},                                                      optional: turns that went wrong
       ...],
     "ranking": [1, [0, 2]],                                                best to worst, ties nested
     "task_id": "refund-3", "env": "support"}                               optional, kept for reports

An episode's messages are everything after the prompt, as `agents.episode` records them (OpenAI form:
assistant turns with `tool_calls`, tool results with `tool_call_id`, user turns of a simulated customer or
a game's monthly report); it holds at least one assistant turn. `flags` are 0-based indices of its
assistant turns ("this turn is where it went wrong"). The three token lists go together: the episode's
first prompt, everything after it, and 1 on the model's own tokens (0 on observations). When present they
are what the reward model reads (token in, token out: the ids the policy sampled, never re-tokenised text);
otherwise the episode is rendered with the chat template and the tools (`data.chat_tools`).

Checked in order: prompt, tools, episodes (each: messages, tokens, flags; no two alike), ranking; the first
bad field stops the load naming file:line:field. A preference file may mix pairs, rankings of answers and
trajectory rankings (a row with `episodes`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from rlhfkit.data.checks import (
    Source,
    check_messages,
    check_unicode,
    fail,
    parse_ranks,
    require,
    require_string,
)
from rlhfkit.data.files import Row, type_name

EPISODE_ROLES = ("assistant", "tool", "user")
TOKEN_FIELDS = ("prompt_ids", "completion_ids", "loss_mask")


@dataclass(frozen=True)
class EpisodeTokens:
    """An episode's tokens as the sampler produced them."""

    prompt_ids: tuple[int, ...]
    completion_ids: tuple[int, ...]
    loss_mask: tuple[int, ...]  # 1 on the model's tokens, 0 on observations; same length as completion_ids


@dataclass(frozen=True)
class TrajectoryEpisode:
    messages: tuple[dict[str, Any], ...]  # after the prompt: assistant, tool and user turns
    tokens: EpisodeTokens | None
    flags: tuple[int, ...]  # indices of the assistant turns flagged as where it went wrong

    @property
    def assistant_turns(self) -> int:
        return sum(m["role"] == "assistant" for m in self.messages)


@dataclass(frozen=True)
class TrajectoryRecord:
    """K >= 2 episodes of one task and their rank levels (0 = best; ties share a level)."""

    prompt: list[dict[str, str]]
    tools: list[dict[str, Any]] | None
    episodes: tuple[TrajectoryEpisode, ...]
    ranks: tuple[int, ...]
    source: Source
    task_id: str = ""
    env: str = ""

    def pairs(self) -> list[tuple[int, int]]:
        """All (better, worse) episode index pairs with different levels."""
        n = len(self.ranks)
        return [(i, j) for i in range(n) for j in range(n) if self.ranks[i] < self.ranks[j]]

    def conversation(self, index: int) -> list[dict[str, Any]]:
        """Prompt and episode `index` as one conversation (OpenAI messages)."""
        return [*self.prompt, *(dict(m) for m in self.episodes[index].messages)]


# ------------------------------------------------------------------------------------ validation
def _prompt(row: Row, src: Source) -> list[dict[str, str]]:
    value = require(row, "prompt", src)
    if not isinstance(value, list):
        fail(src, "prompt", f"must be a list of messages (the task's opening turns), got {type_name(value)}")
    messages = check_messages(value, "prompt", src)
    if messages[-1]["role"] != "user":
        fail(src, "prompt", f"must end with a user turn (last role is '{messages[-1]['role']}')")
    return messages


def _tools(row: Row, src: Source) -> list[dict[str, Any]] | None:
    value = row.get("tools")
    if value is None:
        return None
    if not isinstance(value, list):
        fail(src, "tools", f"must be a list of tool schemas, got {type_name(value)}")
    for i, tool in enumerate(value):
        function = tool.get("function") if isinstance(tool, dict) else None
        name = function.get("name") if isinstance(function, dict) else None
        if not isinstance(name, str) or not name:
            fail(src, f"tools[{i}]", 'must be {"type": "function", "function": {"name": ..., ...}}')
    return value or None


def _tool_calls(value: Any, where: str, src: Source) -> list[dict[str, Any]]:
    if not isinstance(value, list):
        fail(src, where, f"must be a list of tool calls, got {type_name(value)}")
    calls = []
    for i, call in enumerate(value):
        at = f"{where}[{i}]"
        function = call.get("function") if isinstance(call, dict) else None
        if not isinstance(function, dict):
            fail(src, at, 'must be {"id": ..., "function": {"name": ..., "arguments": ...}}')
        name = require_string(function, "name", f"{at}.function", src)
        if not name:
            fail(src, f"{at}.function.name", "is empty")
        arguments = function.get("arguments", "{}")
        if isinstance(arguments, dict):  # an object is accepted and kept as OpenAI's JSON text
            arguments = json.dumps(arguments, ensure_ascii=False)
        elif not isinstance(arguments, str):
            message = f"must be JSON text or an object, got {type_name(arguments)}"
            fail(src, f"{at}.function.arguments", message)
        call_id = call.get("id", f"call_{i}")
        if not isinstance(call_id, str):
            fail(src, f"{at}.id", f"must be a string, got {type_name(call_id)}")
        calls.append({"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}})
    return calls


def _episode_messages(value: Any, where: str, src: Source) -> tuple[dict[str, Any], ...]:
    if not isinstance(value, list):
        fail(src, where, f"must be a list of messages, got {type_name(value)}")
    if not value:
        fail(src, where, "is empty")
    messages: list[dict[str, Any]] = []
    for i, message in enumerate(value):
        at = f"{where}[{i}]"
        if not isinstance(message, dict):
            fail(src, at, f"must be a message object, got {type_name(message)}")
        role = require_string(message, "role", at, src)
        if role not in EPISODE_ROLES:
            fail(src, f"{at}.role", f"role '{role}' is not one of {', '.join(EPISODE_ROLES)} in an episode")
        content = message.get("content") or ""  # an assistant turn that only calls tools has none
        if not isinstance(content, str):
            fail(src, f"{at}.content", f"must be a string, got {type_name(content)}")
        out: dict[str, Any] = {"role": role, "content": check_unicode(content, f"{at}.content", src)}
        if role == "assistant" and message.get("tool_calls"):
            out["tool_calls"] = _tool_calls(message["tool_calls"], f"{at}.tool_calls", src)
        for key in ("tool_call_id", "name") if role == "tool" else ():
            if key in message:
                out[key] = require_string(message, key, at, src)
        messages.append(out)
    if messages[0]["role"] != "assistant":
        fail(src, f"{where}[0].role", f"an episode starts with the agent's turn, got '{messages[0]['role']}'")
    return tuple(messages)


def _ids(value: Any, where: str, src: Source, allowed: tuple[int, ...] | None = None) -> tuple[int, ...]:
    if not isinstance(value, list) or not value:
        fail(src, where, f"must be a non-empty list of token ids, got {type_name(value)}")
    for i, item in enumerate(value):
        if isinstance(item, bool) or not isinstance(item, int) or item < 0:
            fail(src, f"{where}[{i}]", f"must be a non-negative integer, got {item!r}")
        if allowed is not None and item not in allowed:
            fail(src, f"{where}[{i}]", f"must be 0 or 1, got {item}")
    return tuple(value)


def _tokens(item: Row, where: str, src: Source) -> EpisodeTokens | None:
    present = [key for key in TOKEN_FIELDS if key in item]
    if not present:
        return None
    if len(present) < len(TOKEN_FIELDS):
        missing = next(key for key in TOKEN_FIELDS if key not in item)
        message = f"is missing (the token fields {', '.join(TOKEN_FIELDS)} go together)"
        fail(src, f"{where}.{missing}", message)
    prompt = _ids(item["prompt_ids"], f"{where}.prompt_ids", src)
    completion = _ids(item["completion_ids"], f"{where}.completion_ids", src)
    mask = _ids(item["loss_mask"], f"{where}.loss_mask", src, allowed=(0, 1))
    if len(mask) != len(completion):
        message = f"has {len(mask)} entries for {len(completion)} completion_ids"
        fail(src, f"{where}.loss_mask", message)
    if not any(mask):
        fail(src, f"{where}.loss_mask", "marks no token as the model's")
    return EpisodeTokens(prompt, completion, mask)


def _flags(item: Row, turns: int, where: str, src: Source) -> tuple[int, ...]:
    value = item.get("flags", [])
    if not isinstance(value, list):
        fail(src, f"{where}.flags", f"must be a list of assistant-turn indices, got {type_name(value)}")
    for i, flag in enumerate(value):
        if isinstance(flag, bool) or not isinstance(flag, int):
            fail(src, f"{where}.flags[{i}]", f"must be an assistant-turn index, got {type_name(flag)}")
        if not 0 <= flag < turns:
            fail(src, f"{where}.flags[{i}]", f"turn {flag} out of range for {turns} assistant turn(s)")
        if flag in value[:i]:
            fail(src, f"{where}.flags[{i}]", f"turn {flag} appears twice")
    return tuple(sorted(value))


def _episode(item: Any, where: str, src: Source) -> TrajectoryEpisode:
    if not isinstance(item, dict):
        fail(src, where, f"must be an episode object with 'messages', got {type_name(item)}")
    if "messages" not in item:
        fail(src, f"{where}.messages", "is missing")
    messages = _episode_messages(item["messages"], f"{where}.messages", src)
    turns = sum(m["role"] == "assistant" for m in messages)
    return TrajectoryEpisode(messages, _tokens(item, where, src), _flags(item, turns, where, src))


def trajectory_record(row: Row, src: Source) -> TrajectoryRecord:
    """Validate one trajectory ranking row (see the module docstring)."""
    for key in ("chosen", "rejected", "margin", "completions"):
        if key in row:
            fail(src, key, "cannot be combined with 'episodes'")
    prompt = _prompt(row, src)
    tools = _tools(row, src)
    value = row["episodes"]
    if not isinstance(value, list):
        fail(src, "episodes", f"must be a list of episodes, got {type_name(value)}")
    if len(value) < 2:
        fail(src, "episodes", f"needs at least 2 episodes, got {len(value)}")
    episodes: list[TrajectoryEpisode] = []
    for i, item in enumerate(value):
        episode = _episode(item, f"episodes[{i}]", src)
        seen = (episode.messages, episode.tokens)
        same = [j for j, e in enumerate(episodes) if (e.messages, e.tokens) == seen]
        if same:
            fail(src, f"episodes[{i}]", f"is identical to 'episodes[{same[0]}]'")
        episodes.append(episode)
    ranks = parse_ranks(require(row, "ranking", src), len(episodes), src, noun="episode")
    meta = {key: str(row.get(key) or "") for key in ("task_id", "env")}
    return TrajectoryRecord(prompt, tools, tuple(episodes), ranks, src, **meta)
