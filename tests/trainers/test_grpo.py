"""GRPO and RLOO on a tiny model: they learn a verifiable reward, and their switches do what they say."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from tests.helpers import constant, count_target, grpo_config, grpo_prompts_file

from rlhfkit.models.prefix import SharedPromptBatch, completion_logprobs
from rlhfkit.rewards.mix import RewardComponent, RewardMix, function_scorer
from rlhfkit.trainers.grpo import GRPOConfig, GRPOTrainer, RLOOConfig, run_grpo
from rlhfkit.training.experience import Experience


def train_rows(out: Path) -> list[dict]:
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if '"train"' in x]


@pytest.mark.slow
@pytest.mark.parametrize("cls", [GRPOConfig, RLOOConfig])
def test_critic_free_rl_raises_a_verifiable_reward(cls: type[GRPOConfig], tiny_model: Path, tmp_path: Path):
    out = tmp_path / "run"
    cfg = grpo_config(
        cls, tiny_model, grpo_prompts_file(tmp_path), out, "train.max_steps=20", "train.lr=1e-2"
    )
    run_grpo(cfg)
    rows = train_rows(out)
    assert len(rows) == 20
    # one update per rollout batch: the old log-probs are the sampler's, so the ratio is exactly 1
    assert all(abs(r["ratio_first_minibatch"] - 1.0) < 1e-4 for r in rows)
    first = sum(r["score"] for r in rows[:3]) / 3
    last = sum(r["score"] for r in rows[-3:]) / 3
    # The random tiny model writes a given letter in ~1 of 100 characters: ~0.2 per 16-token answer.
    # 2.0 per answer, on a mean over 3 x 32 answers, is ~10x chance: the policy learned the rule (with
    # each prompt's own target letter coming from its `target` field).
    assert first < 0.6 and last > 2.0, (first, last)
    assert rows[-1]["kl"] > 0.1  # it had to move away from the reference to get there
    if cls is RLOOConfig:  # the KL penalty is folded into the reward: total = score - beta x KL
        for r in rows:
            assert r["total_reward"] == pytest.approx(r["score_used"] - 0.05 * r["kl"], abs=1e-4)
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)  # a plain transformers model


def test_beta_zero_loads_no_reference(tiny_model: Path, tmp_path: Path):
    from rlhfkit.data.records import load_prompts

    prompts = grpo_prompts_file(tmp_path)
    cfg = grpo_config(GRPOConfig, tiny_model, prompts, tmp_path / "b0", "beta=0", "train.max_steps=1")
    trainer = GRPOTrainer(cfg, load_prompts(prompts), function_scorer(constant))
    assert trainer.reference is None and not trainer.need_reference

    def no_reference_pass(*args):
        raise AssertionError("beta = 0 must not run a reference pass")

    trainer.reference_logprobs = no_reference_pass
    trainer.run()
    assert "kl" not in train_rows(tmp_path / "b0")[0]


def test_equal_rewards_give_no_update_with_dynamic_sampling(tiny_model: Path, tmp_path: Path, capsys):
    from safetensors.torch import load_file

    out = tmp_path / "flat"
    sets = [
        "reward_fn=tests.helpers:constant",
        "dynamic_sampling=true",
        "train.max_steps=2",
        "train.lr=1e-2",
    ]
    run_grpo(grpo_config(GRPOConfig, tiny_model, grpo_prompts_file(tmp_path), out, *sets))
    rows = train_rows(out)
    assert [r["skipped"] for r in rows] == [1.0, 1.0]
    assert all(r["zero_variance_groups"] == 1.0 for r in rows)
    assert "grpo step 2/2 skipped (no group to learn from)" in capsys.readouterr().err  # not "loss nan"
    before, after = (
        load_file(str(tiny_model / "model.safetensors")),
        load_file(str(out / "model.safetensors")),
    )
    assert all(torch.equal(before[k], after[k]) for k in before)  # no optimizer step was taken


def test_masked_truncated_answers_carry_no_gradient(tiny_model: Path, tmp_path: Path):
    """With 4-token answers few rows reach EOS: mask_truncated zeroes exactly the others."""
    from rlhfkit.data.records import load_prompts

    prompts = grpo_prompts_file(tmp_path)
    sets = ["sampling.max_new_tokens=4", "mask_truncated=true", "train.max_steps=1"]
    cfg = grpo_config(GRPOConfig, tiny_model, prompts, tmp_path / "trunc", *sets)
    trainer = GRPOTrainer(cfg, load_prompts(prompts), function_scorer(count_target))
    experience, stats = trainer.make_experience(trainer.sample(trainer.batch_indices(0)))
    assert experience is not None
    lost = int((experience.completion_mask.sum(-1) == 0).sum())
    rows = experience.rows
    assert lost == round((1.0 - stats["eos_rate"]) * rows) and lost > 0
    zeroed = dataclasses.replace(experience, completion_mask=torch.zeros((rows, 4)))
    loss, _ = trainer.grpo_loss(trainer.policy, zeroed)
    loss.backward()
    assert float(loss.detach()) == 0.0
    assert all(p.grad is None or not p.grad.any() for p in trainer.policy.parameters())


@pytest.mark.parametrize(("loss_type", "expected"), [("dapo", 7.0), ("grpo", 2.0), ("dr_grpo", 2.0)])
def test_loss_is_summed_over_the_items_its_aggregation_averages(
    loss_type: str, expected: float, tiny_model: Path, tmp_path: Path
):
    """The loop divides by `num_items`: tokens for "dapo", sequences for "grpo" and "dr_grpo"."""
    from rlhfkit.data.records import load_prompts

    prompts = grpo_prompts_file(tmp_path)
    cfg = grpo_config(
        GRPOConfig, tiny_model, prompts, tmp_path / loss_type, f"loss_type={loss_type}", "beta=0"
    )
    trainer = GRPOTrainer(cfg, load_prompts(prompts), function_scorer(count_target))
    batch = SharedPromptBatch.build([[5, 6]] * 2, [[7, 8, 9, 10]] * 2, 0)  # 2-token prompts, 4-token answers
    lmask = torch.tensor([[1.0, 1.0, 1.0, 1.0], [1.0, 1.0, 1.0, 0.0]])  # 4 + 3 answer tokens
    with torch.no_grad():
        old, _ = completion_logprobs(trainer.policy, batch, 1.0)
    mb = Experience(batch, lmask, old, torch.tensor([1.0, -1.0]))
    loss_sum, sums = trainer.grpo_loss(trainer.policy, mb)
    # ratio 1 everywhere: per-token loss is -A; the ratio sum is one per counted item
    assert float(sums["ratio_mean"]) == pytest.approx(expected, abs=1e-5)
    per_item = {"dapo": (-4 + 3) / 7, "grpo": (-1 + 1) / 2, "dr_grpo": (-4 + 3) / (2 * 16)}[loss_type]
    assert float(loss_sum) == pytest.approx(per_item * expected, abs=1e-5)


def test_reward_mix_weights_and_logs_each_component(tiny_model: Path, tmp_path: Path):
    out = tmp_path / "mix"
    mix = RewardMix(
        [
            RewardComponent("letters", 2.0, function_scorer(count_target)),
            RewardComponent("flat", -0.5, function_scorer(constant)),
        ]
    )
    cfg = grpo_config(GRPOConfig, tiny_model, grpo_prompts_file(tmp_path), out, "train.max_steps=1")
    run_grpo(cfg, mix)
    (row,) = train_rows(out)
    assert row["score"] == pytest.approx(2.0 * row["reward_letters"] - 0.5 * row["reward_flat"], abs=1e-4)
    assert row["reward_flat"] == 1.0


def test_reward_weights_must_match_components(tmp_path: Path):
    from rlhfkit.errors import ConfigError

    with pytest.raises(ConfigError, match="reward_weights has 2 entries for 1 reward components"):
        RewardMix.from_specs([], ["tests.helpers:constant"], [1.0, 2.0])
    with pytest.raises(ConfigError, match="RL needs a reward"):
        RewardMix.from_specs([], [])


def test_cli_grpo_bad_prompt_names_the_line(tiny_model: Path, tmp_path: Path):
    from typer.testing import CliRunner

    from rlhfkit.cli import app

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "ok"}\n{"question": "no prompt"}\n')
    out = tmp_path / "never"
    result = CliRunner().invoke(
        app,
        ["grpo", "--policy", str(tiny_model), "--prompts", str(bad), "--output", str(out),
         "--reward-fn", "tests.helpers:constant"],
    )  # fmt: skip
    assert result.exit_code == 2
    assert "bad.jsonl:2" in result.output and "prompt" in result.output
    assert not out.exists()


def test_a_registered_advantage_estimator_is_one_function_and_a_line(tiny_model: Path, tmp_path: Path):
    """`losses.register_advantage` adds an estimator the `advantage` setting can name; an unknown name is a
    one-line configuration error listing the known ones."""
    from rlhfkit import losses
    from rlhfkit.data.records import load_prompts
    from rlhfkit.errors import ConfigError

    @losses.register_advantage("mean_baseline")
    def mean_baseline(rewards: torch.Tensor, group_size: int, **_) -> tuple[torch.Tensor, torch.Tensor]:
        grouped = rewards.view(-1, group_size)  # (B/G, G)
        centred = grouped - grouped.mean(dim=1, keepdim=True)
        return centred.reshape(-1), (centred == 0).all(dim=1)

    prompts = grpo_prompts_file(tmp_path)
    try:
        cfg = grpo_config(
            GRPOConfig, tiny_model, prompts, tmp_path / "mb", "advantage=mean_baseline", "beta=0"
        )
        trainer = GRPOTrainer(cfg, load_prompts(prompts), function_scorer(count_target))
        samples = trainer.sample(trainer.batch_indices(0))
        experience, _ = trainer.make_experience(samples)
        assert experience is not None
        grouped = samples.scores.view(-1, 4)
        torch.testing.assert_close(
            experience.advantages, (grouped - grouped.mean(1, keepdim=True)).reshape(-1)
        )
    finally:
        del losses.ADVANTAGE_ESTIMATORS["mean_baseline"]
    bad = grpo_config(GRPOConfig, tiny_model, prompts, tmp_path / "bad", "advantage=nope")
    with pytest.raises(ConfigError, match=r"advantage='nope' is not a known estimator \(grpo, rloo\)"):
        GRPOTrainer(bad, load_prompts(prompts), function_scorer(count_target))
