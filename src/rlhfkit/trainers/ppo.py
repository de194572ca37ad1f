"""Step C: PPO against a reward, with a per-token KL penalty to the frozen reference (SFT) model.

    rlhfkit ppo --policy runs/sft --reward runs/rm --prompts prompts.jsonl --output runs/ppo

One iteration (Ziegler et al. 2019; Stiennon et al. 2020; "The N+ implementation details of RLHF with
PPO", Huang et al. 2024, whose defaults we take):
 1. rollout: sample one answer per prompt with the rollout engine (KV cache), keeping the per-token
    log-probs of logits / temperature: these are `old_logprobs`, so the first minibatch has ratio 1;
 2. scoring: the reward model's score at the last real token (answers that never reach EOS get
    `no_eos_score` instead, -1 by default as in N+), the reference log-probs and the values;
 3. rewards_t = -kl_coef * KL_t, plus the score at the last real token; GAE (gamma, lambda) gives
    advantages and returns; advantages are whitened over the batch (rewards optionally);
 4. `ppo_epochs` passes over `minibatches` shuffled minibatches: clipped policy loss + vf_coef x clipped
    value loss, one optimizer step each (policy and value model share one AdamW);
 5. the KL coefficient is updated (fixed, or adaptive towards `kl_target`; its state is checkpointed).

Everything after the first EOS is masked (the engine pads it). Dropout is off in every model. The value
model is initialised from the reward model (N+), or from the policy when only a reward function is given.
With LoRA, the reference is the policy with its adapters disabled, so no second copy is held in memory.

Shapes: B rollouts, P prompt tokens (left-padded), T answer tokens, C hidden size, V vocabulary.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from rlhfkit import losses
from rlhfkit.config import setting
from rlhfkit.data.records import PromptRecord
from rlhfkit.models.loading import build_reward_model, normalization, save_model, unwrap
from rlhfkit.models.prefix import (
    SharedPromptBatch,
    answer_predictors,
    completion_logprobs,
    shared_prompt_forward,
)
from rlhfkit.rewards.mix import RewardMix, Scorer
from rlhfkit.trainers.rl import RLConfig, RLTrainer, load_rl_prompts, reward_mix
from rlhfkit.training.experience import Experience, Samples
from rlhfkit.training.settings import TrainConfig


@dataclass
class PPOConfig(RLConfig):
    """Settings of `rlhfkit ppo` (the shared ones are documented in `RLConfig`)."""

    value_model: str | None = None
    """Initial value model (default: the first reward model; the policy when only functions are given)."""
    rollout_batch: int = setting(16, ge=1)
    """Prompts (= answers) per PPO iteration."""
    ppo_epochs: int = setting(4, ge=1)
    """Passes over each rollout batch."""
    minibatches: int = setting(1, ge=1)
    """Minibatches per pass (one optimizer step each)."""
    kl_coef: float = setting(0.05, ge=0)
    """Initial KL penalty coefficient beta."""
    kl_estimator: Literal["k1", "k3"] = "k1"
    """Per-token KL estimator in the reward (k1 = log pi/pi_ref; k3 = always-positive variant)."""
    kl_target: float | None = setting(None, gt=0)
    """Adaptive KL (Ziegler et al.): steer the sequence KL towards this value (None: fixed beta)."""
    kl_horizon: int = setting(10000, ge=1)
    """Adaptive KL horizon in rollouts."""
    gamma: float = setting(1.0, ge=0, le=1)
    """Discount."""
    lam: float = setting(0.95, ge=0, le=1)
    """GAE lambda."""
    cliprange: float = setting(0.2, gt=0)
    """Policy ratio clip epsilon."""
    cliprange_value: float = setting(0.2, gt=0)
    """Value clip range."""
    vf_coef: float = setting(0.1, ge=0)
    """Weight of the value loss."""
    whiten_rewards: bool = False
    """Whiten the per-token rewards (before GAE) over the batch."""
    no_eos_score: float | None = -1.0
    """Score given to answers that never reach EOS (None: keep the reward's score)."""
    output: str = "runs/ppo"
    """Output directory: the final policy (transformers format), value/, metrics, checkpoints."""
    train: TrainConfig = field(
        default_factory=lambda: TrainConfig(
            lr=3e-6, max_steps=20, batch_size=16, scheduler="constant", save_every=5
        )
    )
    """The shared loop: `max_steps` = PPO iterations; lr and betas for policy and value."""


class PolicyAndValue(torch.nn.Module):
    """The trainable pair, so one optimizer and one checkpoint cover both."""

    def __init__(self, policy: torch.nn.Module, value: torch.nn.Module) -> None:
        super().__init__()
        self.policy = policy
        self.value = value


def token_values(value_model: Any, batch: SharedPromptBatch) -> torch.Tensor:
    """V(s_t) for every answer position t: the value head on the hidden state that predicts token t. (B, T)
    Each distinct prompt runs once (`prefix.shared_prompt_forward`).

    A value model initialised from a reward model starts on the reward's normalised scale: the head's raw
    output goes through the same (raw - shift) / scale as the rewards (the Llama head has no bias to fold
    the shift into). Without it the initial values are off by the shift on every token, and the GAE
    advantages are noise until the critic has caught up."""
    base = unwrap(value_model)
    decoder = getattr(base, base.base_model_prefix)
    last_prompt, answers = shared_prompt_forward(decoder, batch)  # (B, C), (B, T, C)
    shift, scale = normalization(base.config)
    return (base.score(answer_predictors(last_prompt, answers)).squeeze(-1) - shift) / scale  # (B, T)


class PPOTrainer(RLTrainer):
    name = "ppo"
    stage: PPOConfig

    def __init__(self, cfg: PPOConfig, records: list[PromptRecord], reward: RewardMix | Scorer) -> None:
        self.stage = cfg
        super().__init__(cfg, records, reward, need_reference=True)
        self.kl_ctl = losses.make_kl_controller(cfg.kl_coef, cfg.kl_target, cfg.kl_horizon)

    def build_model(self, policy: torch.nn.Module) -> PolicyAndValue:
        cfg = self.stage
        value_source = cfg.value_model or (cfg.reward[0] if cfg.reward else cfg.policy)
        # a sequence classifier (head kept from a reward model, new head from a causal LM); with LoRA its
        # head is trained in full, and the reference is the policy with its adapters disabled
        value, _ = build_reward_model(
            value_source, lora=cfg.lora, trust_remote_code=cfg.trust_remote_code, runtime=self.runtime,
            gradient_checkpointing=cfg.train.gradient_checkpointing,
        )  # fmt: skip
        self.value = value
        return PolicyAndValue(policy, value)

    def prompts_per_step(self) -> int:
        return self.stage.rollout_batch

    def total_updates(self) -> int:
        return self.cfg.max_steps * self.stage.ppo_epochs * self.stage.minibatches

    def extra_state(self) -> dict[str, Any]:
        return {**super().extra_state(), "kl_ctl": self.kl_ctl.state_dict()}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        super().load_extra_state(state)
        self.kl_ctl.load_state_dict(state["kl_ctl"])

    @torch.no_grad()
    def make_experience(self, samples: Samples) -> tuple[Experience, dict[str, float]]:
        """Reference log-probs and values, KL-penalised per-token rewards, GAE advantages and returns."""
        t1 = time.perf_counter()
        cmask, batch = samples.completion_mask, samples.shared  # (B, T)
        ref_logprobs = self.reference_logprobs(batch)  # (B, T)
        with self.autocast():
            values = token_values(self.value, batch).float() * cmask  # (B, T)
        logprobs, is_weights, mismatch = self.old_logprobs(samples)  # (B, T) each
        scores = samples.scores  # (B,)
        rewards, kl = losses.kl_penalized_rewards(
            scores, logprobs, ref_logprobs, cmask, self.kl_ctl.value, self.stage.kl_estimator
        )  # (B, T) each
        if self.stage.whiten_rewards:
            rewards = losses.masked_whiten(rewards, cmask, shift_mean=False)  # (B, T)
        advantages, returns = losses.compute_gae(rewards, values, cmask, self.stage.gamma, self.stage.lam)
        advantages = losses.masked_whiten(advantages, cmask)  # (B, T)
        seq_kl = (kl * cmask).sum(-1)  # (B,)
        experience = Experience(
            batch, cmask, logprobs, advantages, old_values=values, returns=returns, is_weights=is_weights
        )
        stats = {
            **samples.stats,
            **mismatch,
            "kl": float(seq_kl.mean()),
            "non_score_reward": float(-self.kl_ctl.value * seq_kl.mean()),
            "total_reward": float((scores - self.kl_ctl.value * seq_kl).mean()),
            "kl_coef": float(self.kl_ctl.value),
        }
        stats["seconds_scoring"] += time.perf_counter() - t1
        return experience, stats

    def ppo_loss(self, model: PolicyAndValue, mb: Experience) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Clipped policy loss + vf_coef x clipped value loss of one minibatch, as a sum over its tokens."""
        assert mb.old_values is not None and mb.returns is not None
        cmask = mb.completion_mask  # (B, T)
        logprobs, entropy = completion_logprobs(
            model.policy, mb.batch, self.stage.sampling.temperature
        )  # (B, T)
        values = token_values(model.value, mb.batch)  # (B, T)
        assert entropy is not None
        pg_loss, pg_metrics = losses.policy_loss(
            logprobs,
            mb.old_logprobs,
            mb.advantages,
            cmask,
            clip_low=self.stage.cliprange,
            is_weights=mb.is_weights,
        )
        vf_loss, vf_metrics = losses.value_loss(
            values, mb.old_values, mb.returns, cmask, clip_range=self.stage.cliprange_value
        )
        n = cmask.sum()
        loss_sum = (pg_loss + self.stage.vf_coef * vf_loss) * n  # token means -> token sums for the loop
        sums = {
            "policy_loss": pg_loss.detach() * n,
            "value_loss": vf_loss.detach() * n,
            "entropy": (entropy * cmask).sum(),
            "clip_frac": pg_metrics["clip_frac"] * n,
            "approx_kl": pg_metrics["approx_kl"] * n,
            "ratio_mean": pg_metrics["ratio_mean"] * n,
            "vf_clip_frac": vf_metrics["vf_clip_frac"] * n,
        }
        return loss_sum, sums

    def iteration(self, step: int) -> dict[str, float]:
        """sample -> experience -> `ppo_epochs` x shuffled minibatches, one optimizer step each -> metrics."""
        with self.full_weights():  # sharded: gathered once for sampling, reference and value passes
            samples = self.sample(self.batch_indices(step))
            experience, stats = self.make_experience(samples)
        t0 = time.perf_counter()
        self.policy.train()
        size = max(1, experience.rows // self.stage.minibatches)
        totals: dict[str, float] = {}
        first: dict[str, float] = {}
        for epoch in range(self.stage.ppo_epochs):
            order = torch.randperm(experience.rows, generator=self.generator)[: size * self.stage.minibatches]
            for k, mb in enumerate(experience.minibatches(size, per_token=True, order=order)):
                metrics = self.optimize([mb], self.ppo_loss)
                if epoch == 0 and k == 0:
                    first = metrics
                for key, value in metrics.items():
                    totals[key] = totals.get(key, 0.0) + value
        updates = self.stage.ppo_epochs * self.stage.minibatches
        out = {key: value / updates for key, value in totals.items()}
        out["ratio_first_minibatch"] = first["ratio_mean"]
        with torch.no_grad():
            assert experience.old_values is not None and experience.returns is not None
            out["explained_variance"] = float(
                losses.explained_variance(
                    experience.old_values, experience.returns, experience.completion_mask
                )
            )
        out.update(stats)
        out["seconds_training"] = time.perf_counter() - t0
        self.kl_ctl.update(stats["kl"], experience.rows * self.sampling_ranks)
        return out

    def save_final(self) -> None:
        save_model(self.policy, self.tokenizer, self.output_dir, self.final_state("policy."))
        save_model(self.value, self.tokenizer, self.output_dir / "value", self.final_state("value."))


def run_ppo(cfg: PPOConfig, reward: RewardMix | Scorer | None = None) -> dict[str, float]:
    """Validate the prompts and the reward before anything is written, then train."""
    records = load_rl_prompts(cfg)
    return PPOTrainer(cfg, records, reward or reward_mix(cfg)).run()
