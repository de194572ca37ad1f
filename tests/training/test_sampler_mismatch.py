"""Sampler / trainer mismatch in the RL trainers: measured every iteration and corrected by truncated
importance weights when the trainer's forward differs from the sampler's (bf16 autocast here, on the CPU)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from tests.conftest import write_jsonl

from rlhfkit import losses
from rlhfkit.config import load_config
from rlhfkit.data.records import load_prompts
from rlhfkit.rewards.mix import function_scorer
from rlhfkit.trainers.grpo import GRPOConfig, GRPOTrainer, run_grpo
from rlhfkit.trainers.ppo import PPOConfig, run_ppo


def letter_a(prompts: list[str], completions: list[str], **fields) -> list[float]:
    return [c.count("a") / 4 for c in completions]


def setup(tmp_path: Path, model: Path, cls: type, *sets: str):
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"prompt": f"Write {i}."} for i in range(8)])
    base = [
        f"policy={model}", f"prompts={prompts}", f"output={tmp_path / 'out'}", "sampling.max_new_tokens=12",
        "sampling.temperature=1.0", "sample_every=0", "train.save_every=0", "train.max_steps=2",
        "reward_fn=tests.training.test_sampler_mismatch:letter_a",
    ]  # fmt: skip
    if cls is GRPOConfig:
        base += ["prompts_per_step=4", "num_generations=2"]
    return load_config(cls, None, base + list(sets)), prompts


def rows(out: Path) -> list[dict]:
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if '"train"' in x]


def test_fp32_cpu_keeps_the_samplers_logprobs_and_measures_nothing(tiny_model: Path, tmp_path: Path):
    cfg, prompts = setup(tmp_path, tiny_model, GRPOConfig)
    trainer = GRPOTrainer(cfg, load_prompts(prompts), function_scorer(letter_a))
    assert not trainer.recompute_old
    samples = trainer.sample(trainer.batch_indices(0))
    old, weights, stats = trainer.old_logprobs(samples)
    assert weights is None and stats == {}
    assert torch.equal(old, samples.rollout.logprobs * samples.completion_mask)


def test_trainer_logprobs_on_fp32_agree_with_the_sampler(tiny_model: Path, tmp_path: Path):
    """Forced on a float32 run, the trainer's forward equals the sampler's to float precision: the weights
    are 1 and nothing is truncated."""
    cfg, prompts = setup(tmp_path, tiny_model, GRPOConfig, "old_logprobs=trainer")
    trainer = GRPOTrainer(cfg, load_prompts(prompts), function_scorer(letter_a))
    samples = trainer.sample(trainer.batch_indices(0))
    _, weights, stats = trainer.old_logprobs(samples)
    assert weights is not None
    assert stats["mismatch_logprob_abs_max"] < 1e-4 and stats["is_truncated_frac"] == 0.0
    mask = samples.completion_mask.bool()
    torch.testing.assert_close(weights[mask], torch.ones(int(mask.sum())), atol=1e-4, rtol=0)


def test_bf16_trainer_measures_the_mismatch_and_weights_each_token(tiny_model: Path, tmp_path: Path):
    """Under bf16 autocast the update's forward differs from the float32 sampler: old log-probs come from the
    trainer, the weights are min(exp(trainer - sampler), cap) on real tokens and 0 elsewhere, and the loss
    uses them (the policy loss is linear in them)."""
    cfg, prompts = setup(tmp_path, tiny_model, GRPOConfig, "train.precision=bf16", "tis_cap=1.0001", "beta=0")
    trainer = GRPOTrainer(cfg, load_prompts(prompts), function_scorer(letter_a))
    assert trainer.recompute_old
    samples = trainer.sample(trainer.batch_indices(0))
    sampler = samples.rollout.logprobs * samples.completion_mask
    old, weights, stats = trainer.old_logprobs(samples)
    assert weights is not None
    mask = samples.completion_mask
    delta = (old - sampler)[mask.bool()]
    assert stats["mismatch_logprob_abs_mean"] == pytest.approx(float(delta.abs().mean()), rel=1e-5)
    assert stats["mismatch_logprob_abs_max"] > 1e-3  # bf16 logits: far above float32's ~1e-6
    expected = torch.where(mask.bool(), torch.exp(old - sampler).clamp(max=1.0001), 0.0)
    torch.testing.assert_close(weights, expected)
    assert 0 < stats["is_truncated_frac"] < 1  # a cap this close to 1 truncates some tokens, not all
    experience, _ = trainer.make_experience(samples)
    assert experience is not None and experience.is_weights is not None
    (mb,) = experience.minibatches(experience.rows, per_token=True)
    mb = dataclasses.replace(mb, advantages=torch.ones(mb.rows))  # every row counts (groups may tie)
    doubled = dataclasses.replace(mb, is_weights=2 * experience.is_weights)
    with torch.no_grad():
        once, _ = trainer.grpo_loss(trainer.policy, mb)
        twice, _ = trainer.grpo_loss(trainer.policy, doubled)
    assert float(once) != 0.0 and float(twice) == pytest.approx(2 * float(once), rel=1e-4)  # w scales l_t


@pytest.mark.parametrize("cls", [GRPOConfig, PPOConfig])
def test_bf16_runs_log_the_mismatch_and_start_at_ratio_one(cls: type, tiny_model: Path, tmp_path: Path):
    """A bf16 run logs the mismatch every iteration; with the trainer's old log-probs the first minibatch's
    ratio is 1 (the same forward), where the sampler's would be off by the mismatch."""
    cfg, _ = setup(tmp_path, tiny_model, cls, "train.precision=bf16")
    (run_grpo if cls is GRPOConfig else run_ppo)(cfg)
    got = rows(tmp_path / "out")
    assert len(got) == 2
    for row in got:
        assert (
            row["mismatch_logprob_abs_mean"] > 0
            and row["mismatch_logprob_abs_max"] >= row["mismatch_logprob_abs_mean"]
        )
        assert abs(row["ratio_first_minibatch"] - 1.0) < 1e-2
        assert "is_weight_mean" in row


def test_truncated_weights_by_hand():
    old = torch.tensor([[0.0, -1.0, -2.0]])
    sampler = torch.tensor([[0.0, -2.0, -1.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    w, m = losses.truncated_is_weights(old, sampler, mask, cap=2.0)
    # exp(0) = 1; exp(1) = 2.718 -> capped at 2; masked -> 0
    torch.testing.assert_close(w, torch.tensor([[1.0, 2.0, 0.0]]))
    assert float(m["is_truncated_frac"]) == pytest.approx(0.5)
