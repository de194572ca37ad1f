"""Multi-turn GRPO / RLOO on the tiny model in a small environment written here: it learns, its loss and
gradient are the masked computation done by hand, and a killed run resumes to the same weights."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from rlhfkit.agents.env import Environment, StepResult, Task
from rlhfkit.config import load_config
from rlhfkit.errors import ConfigError
from rlhfkit.trainers.grpo import GRPOConfig, GRPOTrainer, RLOOConfig, run_grpo

pytestmark = pytest.mark.usefixtures("one_thread")


class LetterEnv(Environment):
    """Two turns: the first gets "Once more." back (as a tool result), the second ends the episode. The
    return is the count of the task's letter in everything the model wrote (a verifiable reward)."""

    name = "letters"

    def __init__(self, n: int = 8, turns: int = 2) -> None:
        self.n, self.turns = n, turns

    def tasks(self, split):
        return [Task(f"{split}-{i}", f"Write {i}.", {"letter": "a" if i % 2 else "e"}) for i in range(self.n)]

    def reset(self, task):
        self.task, self.written, self.taken = task, "", 0
        return [{"role": "user", "content": task.prompt}]

    def step(self, message):
        self.written += message["content"]
        self.taken += 1
        if self.taken < self.turns:
            return StepResult([{"role": "tool", "name": "again", "content": "Once more."}])
        return StepResult([], reward=float(self.written.count(self.task.data["letter"])), done=True)


def config(cls: type[GRPOConfig], model: Path, out: Path, *sets: str) -> GRPOConfig:
    base = [
        f"policy={model}", f"output={out}", "env=tests.trainers.test_agent_rl:LetterEnv",
        "sampling.temperature=1.0",
        "agent.max_new_tokens=8", "agent.max_turns=3", "agent.max_tokens=200", "prompts_per_step=8",
        "num_generations=4", "sample_every=0", "train.save_every=0",
    ]  # fmt: skip
    return load_config(cls, None, base + list(sets))


def train_rows(out: Path) -> list[dict]:
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if '"train"' in x]


@pytest.mark.slow
@pytest.mark.parametrize("cls", [GRPOConfig, RLOOConfig])
def test_multi_turn_rl_raises_an_episode_reward(cls: type[GRPOConfig], tiny_model: Path, tmp_path: Path):
    out = tmp_path / "run"
    run_grpo(config(cls, tiny_model, out, "train.max_steps=20", "train.lr=1e-2", "sample_every=5"))
    rows = train_rows(out)
    assert len(rows) == 20
    assert all(r["turns"] == 2 and r["end_answer"] == 1.0 for r in rows)  # every episode took both turns
    assert all(abs(r["ratio_first_minibatch"] - 1.0) < 1e-4 for r in rows)  # token in, token out
    first = sum(r["score"] for r in rows[:3]) / 3
    last = sum(r["score"] for r in rows[-3:]) / 3
    # ~1 in 100 random characters is a given letter: ~0.16 per 16 model tokens; 2.0 is >10x chance
    assert first < 0.6 and last > 2.0, (first, last)
    sample = json.loads((out / "samples.jsonl").read_text().splitlines()[0])
    assert sample["completion"].count("[assistant]") == 2 and "[tool] Once more." in sample["completion"]


def test_masked_loss_and_gradient_equal_a_hand_computation(tiny_model: Path, tmp_path: Path):
    """One group of 2 episodes: GRPO advantages are +-1/sqrt(2) x sign; the "dapo" loss is
    -sum_t m_t A_i ratio_t / sum_t m_t over the model's tokens only; its gradient equals that of a plain
    forward over the whole sequences with the same mask (observation tokens carry none)."""
    sets = ["prompts_per_step=1", "num_generations=2", "beta=0.1", "train.max_steps=1"]
    cfg = config(GRPOConfig, tiny_model, tmp_path / "h", *sets)
    trainer = GRPOTrainer(cfg, LetterEnv().tasks("train"), None)
    for seed in range(50):  # a group whose two returns differ
        trainer.generator.manual_seed(seed)
        samples = trainer.sample([1])
        if samples.scores[0] != samples.scores[1]:
            break
    rewards = samples.scores
    assert rewards[0] != rewards[1]
    trainer.generator.manual_seed(seed)  # the same episodes again, through the trainer's own path
    experience, _ = trainer.make_experience(trainer.sample([1]))
    assert experience is not None
    a = experience.advantages
    # group-normalised: (r - mean) / (std + 1e-4), std with ddof 1: +-1/sqrt(2) for 2 distinct values
    torch.testing.assert_close(a, (rewards - rewards.mean()) / (rewards.std() + 1e-4))
    assert abs(float(a.abs()[0]) - 2**-0.5) < 1e-3 and float(a.sum()) == pytest.approx(0.0, abs=1e-6)
    lmask = experience.completion_mask
    rollout = samples.rollout
    assert torch.equal(lmask, samples.completion_mask) and bool(
        (rollout.completion_mask.bool() & (lmask == 0)).any()
    )
    n = experience.rows
    (mb,) = experience.minibatches(n, per_token=True)
    assert mb.num_items == float(lmask.sum())
    trainer.policy.zero_grad()
    loss_sum, sums = trainer.grpo_loss(trainer.policy, mb)
    (loss_sum / mb.num_items).backward()
    got = {k: p.grad.clone() for k, p in trainer.policy.named_parameters()}
    # by hand: one plain forward over prompt + episode, log-probs of the episode tokens
    trainer.policy.zero_grad()
    ids, attn = rollout.input_ids, rollout.attention_mask  # (B, P + T)
    pos = (attn.cumsum(-1) - 1).clamp(min=0)
    logits = trainer.policy(
        input_ids=ids, attention_mask=attn, position_ids=pos
    ).logits.float()  # (B, P+T, V)
    p = rollout.prompt_ids.shape[1]
    lp = torch.log_softmax(logits[:, p - 1 : -1], -1).gather(-1, rollout.completion_ids[..., None])[..., 0]
    old, ref = experience.old_logprobs, experience.ref_logprobs  # (B, T)
    assert ref is not None
    ratio = torch.exp(lp - old)  # 1 at the sampled policy
    k3 = torch.exp(ref - lp) - (ref - lp) - 1
    per_token = -a[:, None] * ratio + 0.1 * k3
    loss = (per_token * lmask).sum() / lmask.sum()
    loss.backward()
    assert float(loss_sum.detach() / mb.num_items) == pytest.approx(float(loss.detach()), abs=1e-5)
    for k, param in trainer.policy.named_parameters():
        torch.testing.assert_close(got[k], param.grad, atol=2e-6, rtol=1e-4)
    assert n == 2 and float(sums["ratio_mean"]) == pytest.approx(float(lmask.sum()), abs=1e-3)


def test_micro_batches_of_episodes_give_the_same_values_and_update(tiny_model: Path, tmp_path: Path):
    """Long episodes run a few rows per forward pass (memory): the reference log-probs and one update's
    weights are those of a single pass over the batch, to float precision; 0 means 8 episodes with env."""
    from rlhfkit.trainers.grpo import EPISODE_MICRO_BATCH

    sets = ["prompts_per_step=4", "num_generations=4", "beta=0.1", "train.max_steps=1", "train.lr=1e-3"]
    weights = []
    for size in (0, 3, 16):
        cfg = config(GRPOConfig, tiny_model, tmp_path / f"m{size}", *sets, f"micro_batch={size}")
        trainer = GRPOTrainer(cfg, LetterEnv().tasks("train"), None)
        assert trainer.micro_batch == (size or EPISODE_MICRO_BATCH)
        trainer.generator.manual_seed(0)
        samples = trainer.sample([0, 1, 2, 3])
        whole = trainer.reference_logprobs(samples.shared)  # (16, T)
        parts = trainer.reference_logprobs(samples.shared, 3)
        torch.testing.assert_close(parts, whole, atol=1e-5, rtol=0)
        trainer.generator.manual_seed(0)
        metrics = trainer.train_step(0)
        assert metrics["skipped"] == 0.0
        weights.append({k: p.detach().clone() for k, p in trainer.policy.named_parameters()})
    for other in weights[1:]:
        for k, w in weights[0].items():
            torch.testing.assert_close(other[k], w, atol=1e-5, rtol=0)  # 1% of one Adam step (lr)
    fresh = GRPOTrainer(config(GRPOConfig, tiny_model, tmp_path / "f", *sets), LetterEnv().tasks("t"), None)
    start = dict(fresh.policy.named_parameters())
    assert any(not torch.equal(w, start[k]) for k, w in weights[0].items())  # the update moved the weights


def test_resume_equals_uninterrupted(tiny_model: Path, tmp_path: Path):
    from safetensors.torch import load_file

    sets = ["train.max_steps=4", "train.lr=1e-3", "prompts_per_step=2", "num_generations=2", "sample_every=1"]
    run_grpo(config(RLOOConfig, tiny_model, tmp_path / "a", *sets))

    class Stop(Exception):
        pass

    def crash(loop, metrics):
        if loop.step == 3:
            raise Stop

    cfg = config(RLOOConfig, tiny_model, tmp_path / "b", *sets, "train.save_every=2")
    trainer = GRPOTrainer(cfg, LetterEnv().tasks("train"), None)
    trainer.callbacks.append(crash)
    with pytest.raises(Stop):
        trainer.run()
    run_grpo(cfg)  # resumes at iteration 2: weights, optimizer, the episodes' sampling RNG, the task order
    a, b = (
        load_file(str(tmp_path / "a" / "model.safetensors")),
        load_file(str(tmp_path / "b" / "model.safetensors")),
    )
    assert max(float((a[k] - b[k]).abs().max()) for k in a) <= 1e-6
    rows_a, rows_b = train_rows(tmp_path / "a"), train_rows(tmp_path / "b")
    assert [r["score"] for r in rows_a] == [r["score"] for r in rows_b]
    assert [r["kl"] for r in rows_a] == [r["kl"] for r in rows_b]
    assert rows_a[-1]["kl"] != 0  # it did move away from the reference


def test_env_settings_and_bad_env_configs(tiny_model: Path, tmp_path: Path):
    expected = r"reward_weights has 1 entries for 2 reward components \(.*, then the env's return\)"
    with pytest.raises(ConfigError, match=expected):
        run_grpo(
            config(
                GRPOConfig,
                tiny_model,
                tmp_path / "x",
                "reward_fn=tests.helpers:constant",
                "reward_weights=[1]",
            )
        )
    with pytest.raises(ConfigError, match="no train tasks"):
        run_grpo(config(GRPOConfig, tiny_model, tmp_path / "y", "env_settings.n=0"))
    with pytest.raises(ConfigError, match="exceeds the model's context"):
        run_grpo(config(GRPOConfig, tiny_model, tmp_path / "z", "agent.max_tokens=5000"))
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists() and not (tmp_path / "z").exists()


def test_cli_grpo_env_trains_and_ppo_refuses_env(tiny_model: Path, tmp_path: Path):
    from typer.testing import CliRunner

    from rlhfkit.cli import app

    out = tmp_path / "cli"
    sets = ["train.max_steps=1", "prompts_per_step=2", "num_generations=2", "agent.max_new_tokens=6",
            "agent.max_tokens=200", "env_settings.turns=3"]  # fmt: skip
    args = [
        "rloo",
        "--policy",
        str(tiny_model),
        "--env",
        "tests.trainers.test_agent_rl:LetterEnv",
        "--output",
        str(out),
    ]
    result = CliRunner().invoke(app, args + [x for s in sets for x in ("--set", s)])
    assert result.exit_code == 0, result.output
    [row] = train_rows(out)
    assert row["turns"] == 3 and row["end_answer"] == 1.0 and row["episode_tokens"] > row["answer_length"]
    result = CliRunner().invoke(
        app, ["ppo", "--policy", str(tiny_model), "--env", "x:Y", "--output", str(out)]
    )
    assert result.exit_code == 2 and "env" in result.output
