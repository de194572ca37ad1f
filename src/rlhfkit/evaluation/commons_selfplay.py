"""Self-play on `commons`: every seat of every lake is the policy, batched a month at a time (evaluation).

    from rlhfkit.chat.llm import load_llm
    games = self_play(load_llm("runs/rlhf"), CommonsEnvironment().tasks("test")[:50], SamplingConfig(...))
    summarize_games(games)  # survival rate, over-use, equality, total catch, each with a 95% interval

Each month, the next turn of every seat of every lake still running is asked for in one `LLM.chat` call
(a local model: one batched `RolloutEngine` sampling; an endpoint: concurrent requests), with the fish
tool's schema. A seat reads exactly what the one-seat environment shows its learning seat
(`CommonsEnvironment.instructions`, `month_text`, `answer`), so one policy plays both; its turn is read as
there (`commons.read_turn`: the first fish call counts, no call is a catch of 0). The scripted characters of
a task are ignored: only its lake (fishers, capacity, stock, regrowth, threshold, months) is played.

A seat's conversation grows a month at a time, so a local model must fit `months` turns in its context (the
caller's `sampling.max_new_tokens` bounds each turn); it keeps each seat's KV cache from month to month, so
a month costs its new tokens, not the season so far. A call that fails raises (no partial results).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

from rlhfkit.agents.commons import CommonsEnvironment, read_turn
from rlhfkit.agents.commons_lake import Fishery
from rlhfkit.agents.env import Message, Task
from rlhfkit.agents.episode import Episode, assistant_message, link_results
from rlhfkit.chat.llm import LLM, Completion
from rlhfkit.evaluation.agent_eval import value_metrics
from rlhfkit.evaluation.evaluate import win_rate
from rlhfkit.rollout.engine import SamplingConfig

OWN = ("own_catch", "own_over_use")
"""Per-seat metrics: a game's metrics are the seats' others, the same for every seat."""


@dataclass
class Game:
    """One lake played in self-play: every seat's episode (its messages, return, last info) and the lake's
    metrics at the end (`info`: reason, metrics without the per-seat ones, catches)."""

    task_id: str
    seats: list[Episode]
    info: dict[str, Any]


class Table:
    """A lake while it is played: the fishery and each seat's conversation and return."""

    def __init__(self, env: CommonsEnvironment, task: Task) -> None:
        self.env, self.task = env, task
        self.fishery = Fishery.from_task(task)
        n = self.fishery.n
        self.messages: list[list[Message]] = [
            [{"role": "system", "content": env.instructions(task, i)},
             {"role": "user", "content": env.month_text(self.fishery, i)}]
            for i in range(n)
        ]  # fmt: skip
        self.rewards, self.tokens = [0.0] * n, [0] * n
        self.infos: list[dict[str, Any]] = [{} for _ in range(n)]

    def play(self, replies: Sequence[Completion]) -> None:
        """One month: every seat's reply is read, the month is played, each seat gets its outcome."""
        turns = [read_turn({"content": r.text, "tool_calls": list(r.tool_calls)}) for r in replies]
        month = self.fishery.play([t.tons for t in turns], [t.message for t in turns])
        for seat, (reply, turn) in enumerate(zip(replies, turns, strict=True)):
            message = assistant_message(reply.text, reply.tool_calls, month.number)
            result = self.env.answer(self.fishery, seat, turn, month)
            self.messages[seat] += [
                message,
                *link_results(list(result.observations), message.get("tool_calls") or []),
            ]
            self.rewards[seat] += result.reward
            self.tokens[seat] += reply.tokens
            self.infos[seat] = dict(result.info)

    def game(self) -> Game:
        turns = len(self.fishery.history)
        seats = [
            Episode(self.task.id, self.messages[i], [], [], [], [], self.rewards[i], turns,
                    self.infos[i].get("reason", ""), None, self.infos[i], self.tokens[i])
            for i in range(self.fishery.n)
        ]  # fmt: skip
        metrics = {k: v for k, v in self.fishery.metrics(0).items() if k not in OWN}
        info = {
            "reason": self.infos[0].get("reason", ""),
            "metrics": metrics,
            "catches": self.fishery.totals(),
        }
        return Game(self.task.id, seats, info)


def self_play(
    llm: LLM,
    tasks: Sequence[Task],
    sampling: SamplingConfig,
    seed: int | None = 0,
    env: CommonsEnvironment | None = None,
) -> list[Game]:
    """Play every task's lake with `llm` in every seat (see the module docstring): one `llm.chat` call per
    month for all seats of all lakes still running, seeded `seed + month` (None: unseeded). Each seat is a
    keyed conversation, so a local model prefills only the month's new tokens (`LLM.chat`'s `keys`)."""
    env = env or CommonsEnvironment()
    tools = env.tool_schemas()
    config = replace(sampling, stop_at_eos=True)
    tables = [Table(env, task) for task in tasks]
    month = 0
    try:
        while running := [(k, t) for k, t in enumerate(tables) if not t.fishery.over]:
            seats = [(k, t, i) for k, t in running for i in range(t.fishery.n)]
            month_seed = None if seed is None else seed + month
            conversations = [t.messages[i] for _, t, i in seats]
            keys = [(k, i) for k, _, i in seats]  # a seat's conversation goes on: its cache is kept
            replies = [r[0] for r in llm.chat(conversations, config, 1, month_seed, tools=tools, keys=keys)]
            at = 0
            for k, table in running:
                table.play(replies[at : at + table.fishery.n])
                at += table.fishery.n
                if table.fishery.over:
                    llm.forget([(k, i) for i in range(table.fishery.n)])
            month += 1
    finally:
        llm.forget([(k, i) for k, t in enumerate(tables) for i in range(t.fishery.n)])
    return [t.game() for t in tables]


def summarize_games(games: Sequence[Game], confidence: float = 0.95) -> dict[str, Any]:
    """Over games (lakes, each counted once): the survival rate with its interval (`evaluate.win_rate`) and
    each lake metric's mean with its interval (`agents.evaluate.value_metrics`)."""
    if not games:
        raise ValueError("summarize_games needs at least one game")
    survival = win_rate([g.info["metrics"]["survived"] for g in games], confidence)
    metrics = value_metrics([g.info for g in games], confidence)
    return {"games": len(games), "survival_rate": survival.rate, "survival_low": survival.low,
            "survival_high": survival.high, "metrics": metrics}  # fmt: skip
