"""`commons`, the GovSim-style fishery (issue 30): the lake's dynamics and metrics against hand-computed
seasons, the tasks, the scripted fishers, the turn protocol, the bundled demonstrations replayed, the gold
preference, episodes through both runners (the tiny model and a scripted chat model) and batched self-play."""

from __future__ import annotations

import json
import random
import re
from fractions import Fraction
from pathlib import Path

import pytest
import torch

from rlhfkit.agents.commons import (
    DEMOS,
    MAX_MESSAGE,
    CommonsEnvironment,
    demonstration,
    gold_score,
    read_turn,
    replay_metrics,
)
from rlhfkit.agents.commons_lake import (
    SIZES,
    Fishery,
    allocate,
    fisher_rng,
    gini,
    make_tasks,
    regrow,
    scripted_turn,
    sustainable_share,
    task_key,
)
from rlhfkit.agents.demos import replay
from rlhfkit.agents.env import Task
from rlhfkit.agents.episode import AgentLimits, run_episodes
from rlhfkit.agents.registry import load_environment
from rlhfkit.chat.llm import Completion
from rlhfkit.data.toolcalls import ToolCall, parse_tool_calls
from rlhfkit.evaluation.agent_eval import chat_episodes, summarize
from rlhfkit.evaluation.commons_selfplay import self_play, summarize_games
from rlhfkit.rollout import SamplingConfig

pytestmark = pytest.mark.usefixtures("one_thread")


def lake(names="ABC", capacity=60, stock=60, regrowth="2", threshold=3, months=3, **data) -> Task:
    characters = data.pop("characters", ["agent", "fair", "greedy"])
    return Task("hand", "", {"names": list(names), "seat": data.pop("seat", 0), "characters": characters,
                             "capacity": capacity, "stock": stock, "regrowth": regrowth,
                             "threshold": threshold, "months": months, "seed": 1})  # fmt: skip


def fish(tons, message="", **extra) -> dict:
    call = ToolCall("fish", json.dumps({"tons": tons, "message": message, **extra}))
    return {"role": "assistant", "content": "", "tool_calls": [call]}


# ------------------------------------------------------------------------------------------ dynamics
def test_sustainable_share_is_govsims_universalization_threshold_and_generalises():
    assert sustainable_share(100, 5, Fraction(2)) == 10 == (100 // 2) // 5
    assert [sustainable_share(s, 4, Fraction(2)) for s in (80, 7, 1, 0)] == [10, 0, 0, 0]
    assert sustainable_share(100, 5, Fraction(3, 2)) == (100 - 67) // 5  # keep ceil(100 / 1.5) = 67
    assert sustainable_share(100, 5, Fraction(3)) == (100 - 34) // 5


def test_regrowth_multiplies_what_is_left_and_caps_at_capacity():
    assert regrow(40, Fraction(2), 100) == 80
    assert regrow(60, Fraction(2), 100) == 100  # 120 capped
    assert regrow(25, Fraction(3, 2), 100) == 37  # floor(37.5)


class First:
    """A chooser that always picks the first fisher still wanting fish (hand-computable allocation)."""

    def choice(self, seq):
        return seq[0]


def test_allocation_hands_out_one_ton_at_a_time_when_wishes_exceed_the_lake():
    assert allocate([5, 3, 4], 20, First()) == [5, 3, 4]  # the wishes fit: everyone gets its wish
    assert allocate([5, 3, 4], 10, First()) == [5, 3, 2]
    assert allocate([0, 9, 9], 10, First()) == [0, 9, 1]
    draws = [allocate([30, 30, 0, 10], 50, random.Random(seed)) for seed in range(20)]
    for got in draws:
        assert (
            sum(got) == 50 and got[2] == 0 and all(g <= w for g, w in zip(got, [30, 30, 0, 10], strict=True))
        )
    assert len({tuple(g) for g in draws}) > 1  # random, ...
    assert draws[3] == allocate([30, 30, 0, 10], 50, random.Random(3))  # ... and seeded


def test_gini_and_equality_by_hand():
    assert gini([0, 0, 0, 10]) == 0.75  # 60 / (2 * 16 * 2.5)
    assert gini([5, 5, 5]) == 0.0 and gini([0, 0]) == 0.0 and gini([]) == 0.0
    assert gini([1, 3]) == pytest.approx(4 / (2 * 4 * 2))


def test_a_hand_computed_season_regrowth_cap_collapse_and_metrics():
    fishery = Fishery.from_task(lake())  # 3 fishers, capacity 60, doubles, collapse below 3 tons
    m1 = fishery.play([10, 10, 10], ["", "", ""])
    assert (m1.share, m1.left, m1.regrown, m1.collapsed) == (10, 30, 60, False)
    m2 = fishery.play([10, 20, 5], ["a", "b", "c"])
    assert (m2.share, m2.left, m2.regrown, fishery.stock) == (10, 25, 50, 50)
    assert not fishery.over
    m3 = fishery.play([20, 20, 8], ["", "", ""])  # 48 of 50: 2 tons left, below 3
    assert (m3.share, m3.left, m3.regrown, m3.collapsed) == (8, 2, 0, True)
    assert fishery.over and fishery.collapsed and fishery.stock == 0
    with pytest.raises(RuntimeError, match="over"):
        fishery.play([0, 0, 0], ["", "", ""])
    metrics = fishery.metrics(seat=0)
    assert metrics == pytest.approx({
        "survival_months": 3, "survived": 0.0, "total_catch": 113, "mean_catch": 113 / 3, "own_catch": 40,
        "equality": 1 - 108 / 678,  # sum |xi - xj| = 2 (10 + 17 + 27); 2 n^2 mean = 2 * 9 * 113 / 3
        "over_use": 3 / 9,  # month 2: 20 > 10; month 3: 20 > 8 twice (8 is not above 8)
        "own_over_use": 1 / 3, "efficiency": 113 / 90,  # 3 months x (60 - 30)
    })  # fmt: skip


def test_the_threshold_itself_survives_and_a_full_season_is_survived():
    fishery = Fishery.from_task(lake(months=2))
    assert not fishery.play([19, 19, 19], ["", "", ""]).collapsed  # exactly 3 left: not fewer than 3
    assert fishery.stock == 6
    fishery.play([0, 0, 0], ["", "", ""])
    assert fishery.over and not fishery.collapsed
    assert fishery.metrics(1)["survived"] == 1.0 and fishery.metrics(1)["survival_months"] == 2


def test_allocation_in_a_season_is_seeded_by_the_task():
    runs = []
    for _ in range(2):
        fishery = Fishery.from_task(lake())
        runs.append(fishery.play([40, 40, 40], ["", "", ""]).catches)
    assert runs[0] == runs[1] and sum(runs[0]) == 60


# ------------------------------------------------------------------------------------------ tasks
def test_tasks_are_deterministic_disjoint_and_varied():
    train, test = make_tasks("train"), make_tasks("test")
    assert (len(train), len(test)) == (SIZES["train"], SIZES["test"])
    make_tasks.cache_clear()
    assert make_tasks("train") == train and make_tasks("test") == test
    assert not {task_key(t.prompt, t.data) for t in train} & {task_key(t.prompt, t.data) for t in test}
    assert len({t.id for t in train}) == len(train)
    for key, at_least in [("capacity", 5), ("stock", 10), ("regrowth", 3), ("months", 1)]:
        assert len({t.data[key] for t in train}) >= at_least, key
    assert {len(t.data["names"]) for t in train} == {3, 4, 5, 6}
    characters = {c for t in train for c in t.data["characters"]}
    assert characters == {"agent", "fair", "greedy", "retaliating", "random"}
    assert all(t.data["characters"][t.data["seat"]] == "agent" for t in train)
    short = CommonsEnvironment(months=3).tasks("test")
    assert short[0].data == {**test[0].data, "months": 3}
    assert isinstance(load_environment("commons"), CommonsEnvironment)


# ------------------------------------------------------------------------------------------ scripted fishers
def test_each_scripted_strategy():
    task = lake(names="ABCD", capacity=100, stock=100, months=12)
    fishery = Fishery.from_task(task)  # share (100 // 2) // 4 = 12, greedy 100 // 4 = 25
    rng = random.Random(0)
    assert scripted_turn("fair", fishery, 1, rng)[0] == 12
    assert scripted_turn("greedy", fishery, 1, rng)[0] == 25
    assert scripted_turn("retaliating", fishery, 1, rng) == (
        12,
        "I keep to 12 tons as long as everyone does.",
    )
    draws = [scripted_turn("random", fishery, 1, random.Random(s))[0] for s in range(40)]
    assert min(draws) >= 0 and max(draws) <= 25 and len(set(draws)) > 5
    assert scripted_turn("random", fishery, 3, fisher_rng(task, 3)) == scripted_turn(
        "random", fishery, 3, fisher_rng(task, 3)
    )
    fishery.play([12, 30, 12, 12], ["", "", "", ""])  # B over-fishes; 34 left -> 68
    assert fishery.share() == 8 and fishery.stock // 4 == 17
    assert scripted_turn("fair", fishery, 2, rng)[0] == 8
    assert scripted_turn("retaliating", fishery, 2, rng) == (
        17,
        "B took more than their share, so I'm taking 17 tons too.",
    )
    assert scripted_turn("retaliating", fishery, 1, rng)[0] == 8  # its own over-use does not trigger it
    with pytest.raises(ValueError, match="unknown fisher character 'lazy'"):
        scripted_turn("lazy", fishery, 0, rng)


# ------------------------------------------------------------------------------------------ the environment
def test_a_hand_computed_episode_against_a_fair_and_a_greedy_fisher():
    env = CommonsEnvironment()
    opening = env.reset(lake(months=2))
    assert [m["role"] for m in opening] == ["system", "user"]
    assert opening[0]["content"].startswith("You are A, a fisher. You share a lake with B, C.")
    assert opening[1]["content"] == (
        "Month 1 of 2. The lake holds 60 tons. If each fisher catches more than 10 tons, the lake will "
        "shrink."
    )
    first = env.step(fish(10, "hello"))
    assert not first.done and first.reward == 10 / 20  # a sustainable season: 2 months x 10 tons
    [obs] = first.observations
    assert obs["role"] == "tool" and obs["name"] == "fish"
    assert obs["content"] == (
        "Month 1: you caught 10 tons; B 10, C 20. In all 40 tons were caught and 20 left; the lake regrew to "
        "40 tons.\n\nMonth 2 of 2. The lake holds 40 tons. If each fisher catches more than 6 tons, the lake "
        'will shrink.\nMessages: B: "Let\'s each keep to 10 tons so the lake can refill." C: "I\'m taking 20 '
        'tons. The fish are there to be caught."'
    )
    last = env.step(fish(6))  # fair 6, greedy 40 // 3 = 13: 15 left
    assert last.done and last.observations == [] and last.reward == 6 / 20
    assert last.info["reason"] == "season_end" and last.info["success"] is True
    assert last.info["catches"] == [16, 16, 33] and last.info["metrics"]["over_use"] == 2 / 6
    assert last.info["metrics"]["own_over_use"] == 0.0


def test_a_turn_without_a_call_or_with_bad_calls_fishes_nothing():
    env = CommonsEnvironment(hint=False)
    assert "shrink" not in env.reset(lake(months=4))[1]["content"]
    result = env.step({"role": "assistant", "content": "I think 10.", "tool_calls": []})
    [obs] = result.observations
    assert obs["role"] == "user" and obs["content"].startswith("You did not call fish, so you caught nothing")
    assert env.fishery.history[-1].wishes[0] == 0 and result.reward == 0.0
    for bad in [-3, "ten", 2.5, True]:
        assert read_turn(fish(bad)).tons == 0 and read_turn(fish(bad)).replies[0].startswith("error: tons")
    assert read_turn(fish("12")).tons == 12 and read_turn(fish(12.0)).tons == 12
    assert read_turn(fish(3, colour="red")).replies[0].startswith("error: fish takes")
    assert read_turn(fish(5, "x" * 500)).message == "x" * MAX_MESSAGE
    two = {
        "role": "assistant",
        "content": "",
        "tool_calls": [ToolCall("net", "{}"), *fish(4)["tool_calls"] * 2],
    }
    turn = read_turn(two)
    assert turn.tons == 4 and turn.main == 1 and turn.replies[0].startswith("error: unknown tool 'net'")
    assert turn.replies[2].startswith("error: only the first fish call")
    result = env.step(two)
    assert [o["role"] for o in result.observations] == ["tool"] * 3
    assert result.observations[1]["content"].startswith("Month 2: you caught 4 tons")
    other = env.step({"role": "assistant", "content": "", "tool_calls": [ToolCall("net", "{}")]})
    assert other.observations[0]["content"].startswith(
        "error: unknown tool 'net'; the only tool is fish\nYou did not"
    )


def test_grabbing_the_lake_collapses_it():
    env = CommonsEnvironment()
    env.reset(lake())
    result = env.step(fish(60))
    assert result.done and result.info["reason"] == "collapse" and result.info["success"] is False
    assert result.info["metrics"]["survival_months"] == 1 and result.info["metrics"]["own_over_use"] == 1.0


# ------------------------------------------------------------------------------------------ demonstrations
def test_every_bundled_demonstration_replays_exactly_and_is_sustainable():
    from rlhfkit.data.records import load_sft

    env = CommonsEnvironment()
    train = {t.id: t for t in env.tasks("train")}
    test_keys = {task_key(t.prompt, t.data) for t in env.tasks("test")}
    lines = DEMOS.read_text(encoding="utf-8").splitlines()
    assert len(lines) == 300
    for i, line in enumerate(lines):
        record = json.loads(line)
        task = train[record["task_id"]]
        assert task_key(task.prompt, task.data) not in test_keys
        roles = [m["role"] for m in record["messages"]]
        assert roles[:3] == ["system", "user", "assistant"] and roles[-1] == "assistant"
        rendered, _ = replay(env, task, record)
        assert rendered == record["messages"], record["task_id"]
        metrics = replay_metrics(task, record["messages"])
        assert metrics["own_over_use"] == 0.0 and metrics["own_catch"] > 0
        if i < 3:  # the file is what the environment writes today
            assert demonstration(env, task) == record
    assert len(load_sft(DEMOS)) == 300


# ------------------------------------------------------------------------------------------ gold preference
POLICIES = {
    "fair": lambda f: f.share(),
    "idle": lambda f: 0,
    "greedy": lambda f: f.stock // f.n,
    "share+1": lambda f: f.share() + 1,
    "grab": lambda f: f.stock,
    "endgame": lambda f: f.stock if f.month == f.months else f.share(),  # grabs the lake in the last month
}


def gold_of(env: CommonsEnvironment, task: Task, policy) -> float:
    messages = env.reset(task)
    while True:
        turn = fish(policy(env.fishery))
        result = env.step(turn)
        messages += [turn, *result.observations]
        if result.done:
            score = gold_score(task, messages, result.info)
            assert gold_score(task, messages) == pytest.approx(score)  # replayed without the info
            return score


def test_gold_ranks_sustainable_over_greedy_episodes():
    env = CommonsEnvironment()
    task = lake(
        names="ABCD", capacity=100, stock=100, months=12, characters=["agent", "fair", "retaliating", "fair"]
    )
    scores = {name: gold_of(env, task, policy) for name, policy in POLICIES.items()}
    assert scores["fair"] == pytest.approx(1.0)  # all fair: survived, equal, a sustainable season caught
    assert scores["fair"] > scores["idle"] > scores["endgame"] > scores["share+1"] > scores["greedy"]
    assert scores["greedy"] > scores["grab"] >= 0.0
    for task in env.tasks("test")[:40]:  # against every population: never worse than an over-fisher
        scores = {name: gold_of(env, task, policy) for name, policy in POLICIES.items()}
        assert scores["fair"] > max(scores["greedy"], scores["share+1"], scores["grab"]), task.id
        assert scores["fair"] >= scores["endgame"], task.id  # equal when the lake died before the last month


# ------------------------------------------------------------------------------------------ runners
class ScriptedLLM:
    """A chat model that fishes `share x factor` (the share read from the hint), as `<tool_call>` text parsed
    like `LocalLLM` does; it records each call's batch size."""

    name = "scripted"

    def __init__(self, factor: float = 1.0) -> None:
        self.factor, self.batches = factor, []

    def chat(self, conversations, sampling, n=1, seed=None, tools=None, keys=None):
        assert tools and tools[0]["function"]["name"] == "fish"
        assert keys is None or len(set(keys)) == len(keys) == len(conversations)
        self.batches.append(len(conversations))
        out = []
        for messages in conversations:
            share = int(re.findall(r"more than (\d+) tons?", messages[-1]["content"])[-1])
            body = json.dumps(
                {"name": "fish", "arguments": {"tons": int(share * self.factor), "message": "hi"}}
            )
            content, calls = parse_tool_calls(f"Fair.<tool_call>\n{body}\n</tool_call>")
            out.append([Completion(content, 9, "stop", tuple(calls))])
        return out

    def forget(self, keys):
        pass


def test_self_play_batches_every_seat_a_month_and_reports_the_lakes():
    tasks = CommonsEnvironment(months=4).tasks("test")[:3]
    seats = sum(len(t.data["names"]) for t in tasks)
    fair = ScriptedLLM()
    games = self_play(fair, tasks, SamplingConfig(max_new_tokens=16))
    assert fair.batches == [seats] * 4  # one call a month, every seat of every lake
    for game, task in zip(games, tasks, strict=True):
        assert game.info["reason"] == "season_end" and game.info["metrics"]["over_use"] == 0.0
        assert game.info["metrics"]["equality"] == 1.0 and len(game.seats) == len(task.data["names"])
        first, second = game.seats[0], game.seats[1]
        assert first.turns == 4 and first.reason == "season_end" and first.info["seat"] == 0
        assert first.messages[0]["content"].startswith(f"You are {task.data['names'][0]}")
        assert f'{task.data["names"][0]}: "hi"' in second.messages[3]["content"]  # read the next month
        assert first.messages[2]["tool_calls"][0]["function"]["name"] == "fish"
        assert gold_score(task, first.messages, first.info) > 0.9
    summary = summarize_games(games)
    assert summary["survival_rate"] == 1.0 and summary["metrics"]["over_use"]["mean"] == 0.0
    greedy = self_play(ScriptedLLM(factor=3.0), tasks, SamplingConfig(max_new_tokens=16))
    assert summarize_games(greedy)["metrics"]["over_use"]["mean"] == 1.0
    assert all(g.info["metrics"]["survival_months"] < 4 for g in greedy)


def test_chat_runner_parses_calls_end_to_end_and_agent_eval_reports_the_metrics():
    env = CommonsEnvironment(months=3)
    episodes = chat_episodes(ScriptedLLM(), lambda: CommonsEnvironment(months=3), env.tasks("test")[:4],
                             SamplingConfig(), AgentLimits(max_turns=12, max_tokens=10_000))  # fmt: skip
    assert all(e.turns == 3 and e.info["metrics"]["own_over_use"] == 0.0 for e in episodes)
    summary = summarize(episodes, threshold=1.0)
    assert summary["metrics"]["own_over_use"]["mean"] == 0.0 and summary["metrics"]["own_over_use"]["n"] == 4
    assert summary["metrics"]["survival_months"]["mean"] <= 3.0


def test_the_tiny_model_through_the_episode_runner_and_self_play(tiny_model: Path):
    from rlhfkit.chat.llm import LocalLLM

    llm = LocalLLM(str(tiny_model))
    env = CommonsEnvironment(months=2)
    tasks = env.tasks("test")[:2]
    limits = AgentLimits(max_turns=2, max_tokens=3000, max_new_tokens=12)
    sampling = SamplingConfig(temperature=1.0)
    episodes = run_episodes(llm.engine, lambda: CommonsEnvironment(months=2), tasks, sampling, limits,
                            torch.Generator().manual_seed(0))  # fmt: skip
    for e in episodes:  # garbage from the random model: no call, no catch, the season still ends cleanly
        assert e.error is None and e.reason in ("season_end", "collapse", "max_turns", "max_tokens")
        assert e.turns >= 1 and e.info["metrics"]["own_catch"] == 0
        assert any(m["role"] == "user" and "You did not call fish" in m["content"] for m in e.messages)
    games = self_play(llm, tasks[:1], SamplingConfig(max_new_tokens=8))
    assert games[0].info["reason"] in ("season_end", "collapse")
    assert all(s.turns == 2 and s.tokens > 0 for s in games[0].seats)


def test_self_play_keeps_each_seats_cache_and_plays_the_same_games(tiny_model: Path):
    from rlhfkit.chat.llm import LocalLLM

    tasks = CommonsEnvironment(months=3).tasks("test")[:2]
    env = CommonsEnvironment(months=3)
    sampling = SamplingConfig(max_new_tokens=8, temperature=1.0)
    kept, plain = LocalLLM(str(tiny_model)), LocalLLM(str(tiny_model), keep_cache=False)
    prefilled, generate = [], kept.caches.generate

    def recording(keys, sequences, config, generator=None):
        rollout = generate(keys, sequences, config, generator)
        prefilled.append((int(rollout.prompt_mask.sum()), sum(len(s) for s in sequences)))
        return rollout

    kept.caches.generate = recording
    games, again = self_play(kept, tasks, sampling, 0, env), self_play(plain, tasks, sampling, 0, env)
    for a, b in zip(games, again, strict=True):
        assert a.info == b.info and [s.messages for s in a.seats] == [s.messages for s in b.seats]
    assert len(prefilled) == 3 and prefilled[0][0] == prefilled[0][1]  # month 1: every token is new
    assert all(new < 0.5 * total for new, total in prefilled[1:])  # later months: the season so far is kept
    assert len(kept.caches) == 0  # every lake is over: its seats' caches are freed
