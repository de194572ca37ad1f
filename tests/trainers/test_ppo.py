"""PPO on a tiny model: the rollout log-probs equal the training forward (ratio 1), and it learns."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from tests.helpers import ppo_config, ppo_count_target, ppo_prompts_file

from rlhfkit.rewards.mix import function_scorer
from rlhfkit.trainers.ppo import run_ppo


@pytest.mark.slow
def test_ppo_raises_programmatic_reward_with_bounded_kl(tiny_model: Path, tmp_path: Path):
    out = tmp_path / "ppo"
    cfg = ppo_config(
        tiny_model, ppo_prompts_file(tmp_path), out, "train.max_steps=25", "train.lr=1e-3", "kl_coef=0.1"
    )
    run_ppo(cfg, function_scorer(ppo_count_target))
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if '"train"' in x]
    assert len(rows) == 25
    # the first minibatch of every iteration sees the rollout's own log-probs: ratio exactly 1
    assert all(abs(r["ratio_first_minibatch"] - 1.0) < 1e-4 for r in rows)
    first = sum(r["score"] for r in rows[:3]) / 3
    last = sum(r["score"] for r in rows[-3:]) / 3
    # The random tiny model writes "a" in about 1 of 100 characters: ~0.2 per answer of <= 16 tokens.
    # 2.5 per answer is > 10x chance on a mean over 3 x 32 answers: learning, not sampling noise.
    assert first < 0.5 and last > 2.5, (first, last)
    # The KL penalty (beta 0.1) keeps the policy near the reference: under 1 nat per answer token.
    assert rows[-1]["kl"] < 16.0, rows[-1]["kl"]
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)  # the policy is a plain transformers model


def test_rollout_logprobs_equal_training_forward(tiny_model: Path):
    from rlhfkit.models.loading import eos_token_ids, load_causal_lm
    from rlhfkit.models.prefix import SharedPromptBatch, completion_logprobs
    from rlhfkit.rollout import RolloutEngine, SamplingConfig

    model, tokenizer = load_causal_lm(str(tiny_model))
    engine = RolloutEngine(model, tokenizer, eos_token_ids(tokenizer, model))
    prompts = [tokenizer("Hello there")["input_ids"], tokenizer("Hi")["input_ids"]]
    for temperature in (1.0, 0.7):
        rollout = engine.generate(prompts, SamplingConfig(12, temperature), torch.Generator().manual_seed(3))
        lp, _ = completion_logprobs(
            model, SharedPromptBatch.from_rollout(rollout, tokenizer.pad_token_id), temperature
        )
        mask = rollout.completion_mask.bool()
        torch.testing.assert_close(lp[mask], rollout.logprobs[mask], atol=1e-5, rtol=0)


@pytest.mark.slow
def test_ppo_resume_equals_uninterrupted(tiny_model: Path, tmp_path: Path):
    from safetensors.torch import load_file

    from rlhfkit.data.records import load_prompts
    from rlhfkit.trainers.ppo import PPOTrainer

    prompts = ppo_prompts_file(tmp_path)
    sets = ["train.max_steps=4", "train.lr=1e-3", "rollout_batch=8", "sampling.max_new_tokens=8",
            "ppo_epochs=2", "minibatches=2", "kl_target=1.0", "kl_horizon=100"]  # fmt: skip
    scorer = function_scorer(ppo_count_target)
    run_ppo(ppo_config(tiny_model, prompts, tmp_path / "a", *sets), scorer)

    class Stop(Exception):
        pass

    def crash(loop, metrics):
        if loop.step == 3:
            raise Stop

    cfg = ppo_config(tiny_model, prompts, tmp_path / "b", *sets, "train.save_every=2")
    trainer = PPOTrainer(cfg, load_prompts(prompts), scorer)
    trainer.callbacks.append(crash)
    with pytest.raises(Stop):
        trainer.run()
    run_ppo(cfg, scorer)  # resumes at iteration 2: weights, optimizer, sampling RNG, adaptive KL state
    for name in ("model.safetensors", "value/model.safetensors"):
        a, b = load_file(str(tmp_path / "a" / name)), load_file(str(tmp_path / "b" / name))
        assert max(float((a[k] - b[k]).abs().max()) for k in a) <= 1e-6, name
    rows_a = [json.loads(x) for x in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    rows_b = [json.loads(x) for x in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert [r["kl_coef"] for r in rows_a] == [r["kl_coef"] for r in rows_b]  # controller state restored
    assert rows_a[0]["kl_coef"] != rows_a[-1]["kl_coef"]  # and it did adapt


def test_ppo_with_lora_uses_the_adapter_free_policy_as_reference(tiny_model: Path, tmp_path: Path):
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    out = tmp_path / "lora"
    sets = [
        "train.max_steps=2",
        "train.lr=1e-2",
        "rollout_batch=8",
        "sampling.max_new_tokens=8",
        "lora.enabled=true",
    ]
    run_ppo(ppo_config(tiny_model, ppo_prompts_file(tmp_path), out, *sets), function_scorer(ppo_count_target))
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    # iteration 1: the policy is still the reference (LoRA B starts at 0), up to float summation order
    assert abs(rows[0]["kl"]) < 1e-4
    assert abs(rows[1]["kl"]) > 1e-2  # after one update the adapters moved the policy away from it
    policy = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    base = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    pairs = zip(policy.parameters(), base.parameters(), strict=True)
    assert max(float((a - b).abs().max()) for a, b in pairs) > 0  # the adapters were merged in
    AutoModelForSequenceClassification.from_pretrained(out / "value", dtype=torch.float32)


def test_value_model_from_a_reward_model_starts_on_the_normalised_reward_scale(tiny_model: Path):
    from rlhfkit.models.loading import SCALE_KEY, SHIFT_KEY, build_reward_model
    from rlhfkit.models.prefix import SharedPromptBatch
    from rlhfkit.trainers.ppo import token_values

    value, _ = build_reward_model(str(tiny_model))
    batch = SharedPromptBatch.build([[5, 6]], [[7, 8, 9]], 0)
    raw = token_values(value, batch)  # (1, 3): no normalisation stored, so the head's raw output
    setattr(value.config, SHIFT_KEY, 2.0)
    setattr(value.config, SCALE_KEY, 4.0)
    torch.testing.assert_close(token_values(value, batch), (raw - 2.0) / 4.0)
