"""Episode items: K agent episodes of one task, ranked (with ties) and flagged turn by turn by people.

An episode item is a row of ``items`` (its ``prompt``: the task's opening messages, as `env.reset` gave them)
with one row of ``episode_items`` (the tools, the task id, the environment) and K rows of ``episodes`` (the
messages after the prompt, the sampler's tokens when a local policy acted, the environment's outcome, and the
model, which is never sent to a browser). The tables are in `store`; this module writes and reads them,
turns an episode into what the ranking page shows, and reads the page's flags back.

A flag says "this assistant turn is where the episode went wrong". Flags are kept per stored position as
0-based indices of the episode's assistant turns, the form `rlhfkit.data.trajectories` exports.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from starlette.datastructures import FormData

from rlhfkit.feedback.store import start_project, transaction

DEFAULT_EPISODE_GUIDELINES = (
    "Each episode is an agent working on the task shown, turn by turn: what it said, the tools it called "
    "and what they returned. Rank the episodes from best to worst by how the agent behaved, not only by "
    "whether it got the task done: was it honest with the user, did it stay within what it was allowed to "
    "do, did it avoid harmful or destructive actions, did it use the tools sensibly. Give episodes of the "
    'same quality the same rank (a tie). Tick "went wrong here" on the assistant turn where an episode '
    "first went wrong (any episode, ranked high or low). If every episode is unacceptable, choose "
    '"All bad"; if you cannot judge the task, skip it.'
)
LETTERS = "ABCDEFGHIJ"  # how the page names the episodes it shows (K is at most 10)
LONG_OUTPUT_CHARS = 400  # a tool or observation output longer than this (or LONG_OUTPUT_LINES) is collapsed
LONG_OUTPUT_LINES = 8
STOPPED = {
    "max_turns": "the turn limit",
    "max_tokens": "the length limit",
    "env_error": "an environment error",
    "llm_error": "a server error",
}
"""End reasons that are not the agent's own doing, as the page names them (so a person does not blame it)."""


@dataclass(frozen=True)
class StoredEpisode:
    position: int
    messages: list[dict[str, Any]]  # after the prompt: assistant, tool and user turns
    tokens: dict[str, list[int]] | None  # prompt_ids, completion_ids, loss_mask (None: an endpoint acted)
    outcome: dict[str, Any]  # the environment's return ("reward"), the end "reason", the "turns"
    model: str

    @property
    def assistant_turns(self) -> int:
        return sum(m.get("role") == "assistant" for m in self.messages)


@dataclass(frozen=True)
class EpisodeItem:
    id: int
    prompt: list[dict[str, Any]]  # the task's opening messages
    tools: list[dict[str, Any]] | None
    task_id: str
    env: str
    episodes: tuple[StoredEpisode, ...]  # in position order


@dataclass(frozen=True)
class NewEpisodeItem:
    """What `feedback prepare --env` stores for one task (positions follow the list)."""

    prompt: list[dict[str, Any]]
    tools: list[dict[str, Any]] | None
    task_id: str
    env: str
    episodes: list[tuple[list[dict[str, Any]], dict[str, list[int]] | None, dict[str, Any], str]]
    """(messages after the prompt, tokens or None, outcome, model) per episode."""


# ------------------------------------------------------------------------------------ storage
def create_episode_project(
    conn: sqlite3.Connection,
    items: Sequence[NewEpisodeItem],
    n_overlap: int,
    guidelines: str = DEFAULT_EPISODE_GUIDELINES,
) -> None:
    """Store the episode items in one transaction; a database that already holds items is refused."""
    with transaction(conn):
        start_project(conn, n_overlap, guidelines)
        for item in items:
            item_id = conn.execute(
                "INSERT INTO items (prompt) VALUES (?)", (json.dumps(item.prompt),)
            ).lastrowid
            conn.execute(
                "INSERT INTO episode_items (item_id, tools, task_id, env) VALUES (?, ?, ?, ?)",
                (item_id, None if item.tools is None else json.dumps(item.tools), item.task_id, item.env),
            )
            conn.executemany(
                "INSERT INTO episodes (item_id, position, messages, tokens, outcome, model) "
                "VALUES (?, ?, ?, ?, ?, ?)",
                [
                    (item_id, pos, json.dumps(messages), None if tokens is None else json.dumps(tokens),
                     json.dumps(outcome), model)
                    for pos, (messages, tokens, outcome, model) in enumerate(item.episodes)
                ],
            )  # fmt: skip


def load_episode_item(conn: sqlite3.Connection, item_id: int) -> EpisodeItem | None:
    """The episode item `item_id`, or None when it is not one (an answers item, or no such item)."""
    row = conn.execute(
        "SELECT i.prompt, e.tools, e.task_id, e.env FROM items i JOIN episode_items e ON e.item_id = i.id "
        "WHERE i.id = ?",
        (item_id,),
    ).fetchone()
    if row is None:
        return None
    episodes = conn.execute(
        "SELECT position, messages, tokens, outcome, model FROM episodes WHERE item_id = ? ORDER BY position",
        (item_id,),
    ).fetchall()
    return EpisodeItem(
        item_id, json.loads(row[0]), json.loads(row[1]) if row[1] else None, row[2], row[3],
        tuple(StoredEpisode(p, json.loads(m), json.loads(t) if t else None, json.loads(o), model)
              for p, m, t, o, model in episodes),
    )  # fmt: skip


def episode_items(conn: sqlite3.Connection) -> dict[int, EpisodeItem]:
    """Every episode item by id (empty for a project of answers)."""
    ids = [r[0] for r in conn.execute("SELECT item_id FROM episode_items ORDER BY item_id")]
    return {i: item for i in ids if (item := load_episode_item(conn, i)) is not None}


# ------------------------------------------------------------------------------------ the page
def episode_turns(episode: StoredEpisode) -> list[dict[str, Any]]:
    """The episode as the page shows it: one entry per message, assistant turns numbered (`turn`, the index
    a flag names), their tool calls as (name, arguments), long outputs marked to be collapsed."""
    out: list[dict[str, Any]] = []
    turn = 0
    for m in episode.messages:
        content = m.get("content") or ""
        entry: dict[str, Any] = {"role": m.get("role", ""), "content": content, "turn": None, "calls": []}
        if entry["role"] == "assistant":
            entry["turn"], turn = turn, turn + 1
            entry["calls"] = [
                {"name": c["function"]["name"], "arguments": c["function"].get("arguments", "")}
                for c in m.get("tool_calls") or []
            ]
        else:
            entry["name"] = m.get("name") or ""
            entry["long"] = len(content) > LONG_OUTPUT_CHARS or content.count("\n") >= LONG_OUTPUT_LINES
            first = content.split("\n", 1)[0]
            entry["preview"] = first[:120] + ("…" if len(first) > 120 else "")
        out.append(entry)
    return out


def page_episodes(item: EpisodeItem, order: list[int]) -> list[dict[str, Any]]:
    """The episodes in display order, each with its slot, letter, turns and how it was stopped (when not by
    the agent). Nothing about the model is included."""
    return [
        {
            "slot": slot,
            "letter": LETTERS[slot],
            "turns": episode_turns(item.episodes[position]),
            "stopped": STOPPED.get(str(item.episodes[position].outcome.get("reason", ""))),
        }
        for slot, position in enumerate(order)
    ]


def tool_names(item: EpisodeItem) -> list[dict[str, str]]:
    """The tools the agent had: name and description, for the page."""
    return [
        {"name": str(t["function"].get("name", "")), "description": str(t["function"].get("description", ""))}
        for t in item.tools or []
        if isinstance(t.get("function"), dict)
    ]


def parse_flags(form: FormData, order: list[int], item: EpisodeItem) -> list[list[int]]:
    """The flagged assistant turns of each stored position from the form's ``flag_{slot}`` checkboxes (value:
    the turn index); ValueError with a message for the labeller on a turn the episode does not have."""
    flags: list[list[int]] = [[] for _ in order]
    for slot, position in enumerate(order):
        turns = item.episodes[position].assistant_turns
        for value in form.getlist(f"flag_{slot}"):
            text = str(value)
            if not text.isdigit() or int(text) >= turns:
                raise ValueError(f"episode {LETTERS[slot]} has no assistant turn {text!r} to flag")
            flags[position].append(int(text))
        flags[position] = sorted(set(flags[position]))
    return flags
