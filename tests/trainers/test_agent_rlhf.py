"""RLHF for agents on the tiny model: multi-turn GRPO against a reward model trained on rankings of whole
episodes (the environment's return weighted 0) moves the behaviour the rankings prefer; reward functions
see the episodes; online feedback ranks groups of episodes and the reward model learns from them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from tests.conftest import write_jsonl
from tests.helpers import rm_config

from rlhfkit.agents.env import Environment, StepResult, Task
from rlhfkit.agents.episode import AgentLimits, run_episodes
from rlhfkit.config import load_config
from rlhfkit.models.loading import load_causal_lm
from rlhfkit.rewards.panel import gold_ranks
from rlhfkit.rollout import RolloutEngine, SamplingConfig
from rlhfkit.trainers.grpo import GRPOConfig, run_grpo
from rlhfkit.trainers.rm import run_rm

pytestmark = pytest.mark.usefixtures("one_thread")


class EEnv(Environment):
    """Two turns, the first answered by a tool result; the return is the number of "e" the model wrote:
    the planted behaviour, which the rankings below prefer and the trainer never sees as a reward."""

    name = "e"

    def __init__(self, n: int = 8) -> None:
        self.n = n

    def tasks(self, split):
        return [Task(f"{split}-{i}", f"Write {i}.") for i in range(self.n)]

    def reset(self, task):
        self.written, self.turn = "", 0
        return [{"role": "user", "content": task.prompt}]

    def step(self, message):
        self.written += message["content"]
        self.turn += 1
        if self.turn < 2:
            return StepResult([{"role": "tool", "name": "again", "content": "Once more."}])
        return StepResult(
            [], reward=float(self.written.count("e")), done=True, info={"e": self.written.count("e")}
        )


def e_count(task, episode) -> float:
    """The gold over whole episodes: how many "e" the agent wrote in all its turns."""
    return float(sum(m["content"].count("e") for m in episode.messages if m["role"] == "assistant"))


def episode_words(prompts, completions, task, episode) -> list[float]:
    """A reward function of the episode: its turns, and whether the prompt reached it as the task's."""
    assert all(t.prompt == p for t, p in zip(task, prompts, strict=True))
    return [float(e.turns) for e in episode]


SAMPLING = SamplingConfig(temperature=1.0)
LIMITS = AgentLimits(max_turns=3, max_tokens=200, max_new_tokens=8)


def rankings_of_own_episodes(model: Path, n_tasks: int, k: int, seed: int) -> list[dict]:
    """Trajectory rankings of the policy's own episodes by `e_count`, with the sampler's tokens."""
    policy, tokenizer = load_causal_lm(str(model))
    engine = RolloutEngine(policy, tokenizer)
    tasks = [t for t in EEnv(n_tasks).tasks("train") for _ in range(k)]
    episodes = run_episodes(engine, EEnv, tasks, SAMPLING, LIMITS, torch.Generator().manual_seed(seed))
    rows = []
    for g in range(n_tasks):
        group = episodes[g * k : (g + 1) * k]
        ranks = gold_ranks([e_count(None, e) for e in group])
        if len(set(ranks)) < 2 or len({tuple(e.completion_ids) for e in group}) < k:
            continue
        levels = [[i for i, r in enumerate(ranks) if r == level] for level in sorted(set(ranks))]
        first = next(i for i, m in enumerate(group[0].messages) if m["role"] == "assistant")
        rows.append({
            "prompt": group[0].messages[:first],
            "episodes": [{"messages": e.messages[first:], "prompt_ids": e.prompt_ids,
                          "completion_ids": e.completion_ids, "loss_mask": e.loss_mask} for e in group],
            "ranking": levels,
        })  # fmt: skip
    return rows


def grpo(model: Path, out: Path, *sets: str) -> GRPOConfig:
    base = [
        f"policy={model}", f"output={out}", "env=tests.trainers.test_agent_rlhf:EEnv",
        "sampling.temperature=1.0",
        "agent.max_new_tokens=8", "agent.max_turns=3", "agent.max_tokens=200", "prompts_per_step=8",
        "num_generations=4", "sample_every=0", "train.save_every=0",
    ]  # fmt: skip
    return load_config(GRPOConfig, None, base + list(sets))


def train_rows(out: Path) -> list[dict]:
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if '"train"' in x]


def test_reward_functions_see_episodes_and_the_env_return_is_one_weighted_component(
    tiny_model: Path, tmp_path
):
    out = tmp_path / "mix"
    run_grpo(
        grpo(
            tiny_model,
            out,
            "reward_fn=tests.trainers.test_agent_rlhf:episode_words",
            "reward_weights=[0.5,0]",
            "train.max_steps=2",
            "gold=tests.trainers.test_agent_rlhf:e_count",
        )
    )
    for row in train_rows(out):
        assert row["reward_episode_words"] == 2.0  # every episode took its two turns
        assert row["score"] == pytest.approx(0.5 * 2.0)  # the env's return, weighted 0, is left out
        assert row["reward_env"] == pytest.approx(row["gold"])  # ... but logged: the return is the gold here


@pytest.mark.slow
def test_grpo_env_with_a_trajectory_reward_model_moves_the_planted_behaviour(
    tiny_model: Path, tmp_path: Path
):
    rows = rankings_of_own_episodes(tiny_model, n_tasks=96, k=4, seed=0)
    assert len(rows) >= 40
    rm_dir = tmp_path / "rm"
    run_rm(rm_config(tiny_model, write_jsonl(tmp_path / "episodes.jsonl", rows), rm_dir, "train.lr=3e-3",
                     "train.epochs=4", "data.eval_fraction=0.2", "data.max_length=256"))  # fmt: skip
    out = tmp_path / "rl"
    run_grpo(grpo(tiny_model, out, f"reward={rm_dir}", "reward_weights=[1,0]", "train.max_steps=16",
                  "train.lr=1e-2"))  # fmt: skip
    log = train_rows(out)
    first = sum(r["reward_env"] for r in log[:3]) / 3
    last = sum(r["reward_env"] for r in log[-3:]) / 3
    assert last > first + 1.0, (
        first,
        last,
        [r["reward_env"] for r in log],
    )  # more "e", never rewarded directly


@pytest.mark.slow
def test_online_feedback_ranks_groups_of_episodes_and_the_reward_model_learns(
    tiny_model: Path, tmp_path: Path
):
    """The labeler is a gold over whole episodes, `e_count(task, episode)`; the reward model learns from
    its rankings of each group as the run goes: agreement with the labeler's own order rises."""
    from tests.helpers import reward_model

    rm_dir = reward_model(tiny_model, tmp_path / "rm0")
    out = tmp_path / "online"
    run_grpo(grpo(tiny_model, out, f"reward={rm_dir}", "reward_weights=[1,0]", "train.max_steps=24",
                  "online_feedback.labeler=tests.trainers.test_agent_rlhf:e_count", "online_feedback.lr=3e-3",
                  "online_feedback.flip_prob=0", "train.lr=1e-3"))  # fmt: skip
    log = [r for r in train_rows(out) if r["rm_online_pairs"] > 0]
    start = sum(r["rm_online_label_accuracy"] for r in log[:4]) / 4
    end = sum(r["rm_online_label_accuracy"] for r in log[-6:]) / 6
    assert end > max(start + 0.1, 0.6), (start, end)  # measured: 0.44 -> 0.66
    assert (out / "reward_model" / "config.json").is_file()
