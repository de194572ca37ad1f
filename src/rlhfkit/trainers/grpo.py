"""Step C without a critic: GRPO (and its DAPO / Dr. GRPO variants) and RLOO.

    rlhfkit grpo --policy runs/sft --reward runs/rm --prompts prompts.jsonl --output runs/grpo
    rlhfkit rloo --policy runs/sft --reward-fn my_rewards:exact_match --prompts math.jsonl --output runs/rloo

One iteration (papers.md section 3):
 1. `prompts_per_step` prompts, each sampled `num_generations` = G times (one group per prompt); the
    engine's per-token log-probs are the old log-probs, so no separate old-policy pass is needed;
 2. every answer is scored by the reward mixture (reward models and functions, with weights);
 3. advantages, one per answer:
      GRPO (Shao et al. 2024):  A_i = (r_i - mean_group) / std   (std of the group, of the batch, or none)
      RLOO (Ahmadian et al. 2024): A_i = r_i - mean of the other G - 1 rewards of the group, where the
        reward already holds the KL penalty: r_i = score_i - beta * sum_t (log pi_old - log pi_ref)
    `dynamic_sampling` drops the groups whose rewards are all equal (DAPO; their advantages are 0, so they
    would only dilute the loss; we do not resample to refill the batch);
 4. `num_iterations` updates on the batch, each: clipped ratio loss with separate low/high clip (DAPO's
    clip-higher), for GRPO plus beta x the k3 estimate of KL(pi || pi_ref) per token inside the loss,
    aggregated per sequence ("grpo"), per token over the batch ("dapo") or by a constant length
    ("dr_grpo", Liu et al. 2025). `mask_truncated` removes answers that never reached EOS from the loss.
With beta = 0 no reference model is loaded and no reference pass is run.

Multi-turn (`env`): the prompts are an environment's train tasks and a group is G episodes of one
task (`agents.episode`: the model acts through tools over several turns); the reward is the episode's
return, or a mixture of it with reward models trained on people's rankings of episodes and functions of
the episode (`reward_weights`, the return last: RLHF for agents). Advantages are as above, one per episode;
the policy loss and the KL to the reference count only the model's own tokens (the loss mask), never the
observations between its turns.

    rlhfkit grpo --policy runs/sft --env my_envs:Calculator --set agent.max_turns=4 --output runs/agent
    rlhfkit grpo --policy runs/sft --env support --reward runs/episode-rm --set reward_weights=[1,0] ...

Shapes: B = prompts x G rollouts, P prompt tokens, T answer tokens.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Literal

import torch

from rlhfkit import losses
from rlhfkit.agents.episode import AgentLimits
from rlhfkit.agents.registry import load_environment
from rlhfkit.config import setting
from rlhfkit.data.records import PromptRecord
from rlhfkit.device import resolve_runtime
from rlhfkit.errors import ConfigError
from rlhfkit.models.loading import context_length, save_model
from rlhfkit.models.prefix import completion_logprobs
from rlhfkit.rewards.mix import RewardComponent, RewardMix, Scorer
from rlhfkit.rewards.online import OnlineFeedbackConfig, OnlineRewardModel
from rlhfkit.trainers.rl import RLConfig, RLTrainer, load_rl_prompts, reward_mix
from rlhfkit.training.experience import EpisodeRecord, EpisodeSampler, Experience, Sampler, Samples
from rlhfkit.training.settings import TrainConfig

AGGREGATION: dict[str, losses.Aggregation] = {"grpo": "sequence", "dapo": "token", "dr_grpo": "constant"}
EPISODE_MICRO_BATCH = 8  # episodes per forward pass with `env` when micro_batch is 0
ONLINE_RM_DIR = "reward_model"  # the reward model at the end of a run with online feedback


@dataclass
class GRPOConfig(RLConfig):
    """Settings of `rlhfkit grpo` (the shared ones are documented in `RLConfig`)."""

    prompts_per_step: int = setting(8, ge=1)
    """Prompts per iteration; each is answered `num_generations` times."""
    num_generations: int = setting(4, ge=2)
    """G, the group size."""
    advantage: str = "grpo"
    """Outcome advantage estimator by name (`losses.ADVANTAGE_ESTIMATORS`): "grpo" group-normalised, "rloo"
    the leave-one-out baseline with the KL in the reward, or one added by `losses.register_advantage`."""
    scale_rewards: Literal["group", "batch", "none"] = "group"
    """GRPO: divide the centred rewards by the group's std, the batch's std, or nothing (Dr. GRPO)."""
    beta: float = setting(0.04, ge=0)
    """KL coefficient: GRPO puts beta x k3 inside the loss, RLOO subtracts beta x sum_t k1 from the reward.
    0: no reference model at all."""
    loss_type: Literal["grpo", "dapo", "dr_grpo"] = "dapo"
    """Loss aggregation: mean per sequence then over sequences, mean over all tokens, or sum / (B x
    max_new_tokens)."""
    clip_low: float = setting(0.2, gt=0, lt=1)
    """Lower ratio clip epsilon."""
    clip_high: float = setting(0.2, gt=0)
    """Upper ratio clip epsilon (DAPO's clip-higher: 0.28)."""
    num_iterations: int = setting(1, ge=1)
    """Updates per rollout batch (mu); the first has ratio 1, the later ones use importance ratios."""
    micro_batch: int = setting(0, ge=0)
    """Rollouts per forward pass within an update (gradient accumulation) and in the reference pass; 0: all
    at once, or with `env` EPISODE_MICRO_BATCH episodes (long multi-turn sequences: memory, not speed)."""
    mask_truncated: bool = False
    """Leave answers that never reached EOS out of the loss."""
    dynamic_sampling: bool = False
    """Drop groups whose rewards are all equal (DAPO)."""
    env: str | None = None
    """Multi-turn RL in an environment (a bundled name or `module:Class`): its train tasks are the prompts
    (`prompts` is not used) and its episode return is the reward, alone or mixed with reward models over
    episodes (trajectory reward models: `rlhfkit rm` on trajectory rankings) and functions of the episode,
    weighted by `reward_weights` (the env's return last; weight 0 leaves it out of the reward)."""
    env_settings: dict[str, Any] = field(default_factory=dict)
    """Keyword arguments of the environment (`--set env_settings.KEY=VALUE`)."""
    online_feedback: OnlineFeedbackConfig = field(default_factory=OnlineFeedbackConfig)
    """Rank each group with `online_feedback.labeler` and train the (one) reward model on those rankings as
    the run goes (`rlhfkit.rewards.online`); off unless a labeler is named."""
    agent: AgentLimits = field(default_factory=AgentLimits)
    """Episode limits with `env`: turns, tokens per episode, tokens per turn (the last replaces
    `sampling.max_new_tokens`; the rest of `sampling` applies to every turn)."""
    output: str = "runs/grpo"
    """Output directory: the final policy (transformers format), metrics, checkpoints."""
    train: TrainConfig = field(
        default_factory=lambda: TrainConfig(lr=1e-6, max_steps=50, scheduler="constant", save_every=10)
    )
    """The shared loop: `max_steps` = iterations."""


@dataclass
class RLOOConfig(GRPOConfig):
    """Settings of `rlhfkit rloo`: GRPOConfig with the leave-one-out baseline and the KL in the reward."""

    advantage: str = "rloo"
    """The leave-one-out baseline (RLOO), or any estimator `GRPOConfig.advantage` takes."""
    beta: float = setting(0.05, ge=0)
    """KL coefficient, subtracted from each answer's reward as beta x sum_t (log pi - log pi_ref)."""
    output: str = "runs/rloo"
    """Output directory: the final policy (transformers format), metrics, checkpoints."""


class GRPOTrainer(RLTrainer):
    name = "grpo"
    stage: GRPOConfig

    def __init__(
        self, cfg: GRPOConfig, records: list[PromptRecord], reward: RewardMix | Scorer | None
    ) -> None:
        if cfg.num_generations < 2:
            raise ConfigError(f"num_generations must be >= 2 for group baselines, got {cfg.num_generations}")
        if cfg.num_iterations < 1:
            raise ConfigError(f"num_iterations must be >= 1, got {cfg.num_iterations}")
        if cfg.advantage not in losses.ADVANTAGE_ESTIMATORS:
            known = ", ".join(sorted(losses.ADVANTAGE_ESTIMATORS))
            raise ConfigError(
                f"advantage={cfg.advantage!r} is not a known estimator ({known}); "
                "register one with rlhfkit.losses.register_advantage"
            )
        if reward is None and not cfg.env and not cfg.online_feedback.labeler:
            raise ConfigError("RL needs a reward: --reward DIR, --reward-fn module:function or --env ENV")
        self.stage = cfg
        self.group = cfg.num_generations
        self.name = cfg.advantage
        self.online = None
        if cfg.online_feedback.labeler:
            self.online = OnlineRewardModel(
                cfg.online_feedback,
                cfg.reward[0],
                resolve_runtime(cfg.train),
                cfg.train.seed,
                cfg.trust_remote_code,
            )
        reward = self.reward_mixture(cfg, reward)
        super().__init__(cfg, records, reward, need_reference=cfg.beta > 0)
        if self.online is not None and self.world > 1:
            raise ConfigError("online_feedback runs in one process (each would train its own reward model)")
        if cfg.env and cfg.agent.max_tokens > (context := context_length(self.policy)):
            raise ConfigError(
                f"agent.max_tokens={cfg.agent.max_tokens} exceeds the model's context ({context})"
            )
        # the longest answer, for the "dr_grpo" constant aggregation
        self.max_len = cfg.agent.max_tokens if cfg.env else cfg.sampling.max_new_tokens
        self.micro_batch = cfg.micro_batch or (EPISODE_MICRO_BATCH if cfg.env else 0)
        self.kl_in_reward = cfg.advantage == "rloo"  # RLOO: the KL penalty is part of each answer's reward

    def reward_mixture(self, cfg: GRPOConfig, given: RewardMix | Scorer | None) -> RewardMix | Scorer | None:
        """The reward: `given`, or the online reward model and reward functions, and with `env` its return as
        the last component ("env", weighted like the others by `reward_weights`, possibly 0). None when the
        environment's return alone is the reward (the sampler's own scores)."""
        if not cfg.env and self.online is None:
            return given
        n = len(cfg.reward) + len(cfg.reward_fn) + (1 if cfg.env else 0)
        if cfg.reward_weights and len(cfg.reward_weights) != n:
            order = "reward models first, then reward functions" + (
                ", then the env's return" if cfg.env else ""
            )
            raise ConfigError(
                f"reward_weights has {len(cfg.reward_weights)} entries for {n} reward components ({order})"
            )
        weights = list(cfg.reward_weights) or [1.0] * n
        components: list[RewardComponent] = []
        if self.online is not None:  # the one reward model, learning as the run goes
            components.append(self.online.component(weights[0]))
            if cfg.reward_fn:
                functions = RewardMix.from_specs([], cfg.reward_fn, weights[1 : 1 + len(cfg.reward_fn)])
                components += functions.components
        elif cfg.reward or cfg.reward_fn:  # with env (without, `given` is this mixture)
            runtime = resolve_runtime(cfg.train)
            models = RewardMix.from_specs(cfg.reward, cfg.reward_fn, weights[: n - 1], runtime)
            components += models.components
        if not cfg.env:
            return RewardMix(components)
        if not components and weights[-1] == 1.0:
            return None

        def env_return(
            prompts: list[str], completions: list[str], rollout: Any, records: list[Any]
        ) -> torch.Tensor:
            # (B,) on the CPU in float32, as every scorer returns its scores (the trainer moves them)
            return torch.tensor([r.episode.reward for r in records], dtype=torch.float32)

        components.append(RewardComponent("env", weights[-1], env_return, source=f"env {cfg.env}"))
        return RewardMix(components)

    def prompts_per_step(self) -> int:
        return self.stage.prompts_per_step

    def total_updates(self) -> int:
        return self.cfg.max_steps * self.stage.num_iterations

    def make_sampler(self) -> Sampler:
        """Answers to the prompts, or with `env` episodes of the environment's tasks."""
        cfg = self.stage
        if not cfg.env:
            return super().make_sampler()
        make_env = partial(load_environment, cfg.env, **cfg.env_settings)
        return EpisodeSampler(self.rollout_engine, make_env, self.records, cfg.sampling, cfg.agent, cfg.env)

    @torch.no_grad()
    def make_experience(self, samples: Samples) -> tuple[Experience | None, dict[str, float]]:
        """Reference log-probs, the KL, group advantages; None when every group was dropped."""
        cfg = self.stage
        t1 = time.perf_counter()
        rollout, cmask, scores = samples.rollout, samples.completion_mask, samples.scores  # (B, T) x2, (B,)
        old_logprobs, is_weights, mismatch = self.old_logprobs(samples, self.micro_batch)  # (B, T) each
        stats = {**samples.stats, **mismatch}
        ref_logprobs = None
        rewards = scores  # (B,)
        if self.need_reference:
            ref_logprobs = self.reference_logprobs(samples.shared, self.micro_batch)  # (B, T)
            seq_kl = (losses.kl_estimate(old_logprobs, ref_logprobs, "k1") * cmask).sum(-1)  # (B,)
            stats["kl"] = float(seq_kl.mean())
            if self.kl_in_reward:
                rewards = scores - cfg.beta * seq_kl  # (B,)
        advantages, zero_var = losses.outcome_advantages(
            cfg.advantage, rewards, self.group, scale=cfg.scale_rewards
        )  # (B,), (B/G,)
        stats.update(
            total_reward=float(rewards.mean()),
            reward_std_in_group=float(rewards.view(-1, self.group).std(dim=1).mean()),
            zero_variance_groups=float(zero_var.float().mean()),
        )
        keep = torch.ones(len(rewards), dtype=torch.bool, device=rewards.device)  # (B,)
        if cfg.dynamic_sampling:
            keep = (~zero_var).repeat_interleave(self.group)  # (B,)
        loss_mask = cmask * keep[:, None]  # (B, T)
        if cfg.mask_truncated:
            loss_mask = loss_mask * rollout.ended[:, None]  # (B, T)
        stats["seconds_scoring"] += time.perf_counter() - t1
        if self.online is not None:  # the rewards above are the reward model's before it learns from these
            t2 = time.perf_counter()
            # the pipeline's labeler is its watched gold: reuse those scores (an LLM judge is not cheap)
            known = samples.gold if cfg.online_feedback.labeler == self.stage.gold else None
            if known is None and samples.records and isinstance(samples.records[0], EpisodeRecord):
                known = [
                    float(self.online.labeler(r.task, r.episode)) for r in samples.records
                ]  # (task, episode)
            update = self.online.update(
                self.step, samples.shared, samples.prompts, samples.completions, self.group, known
            )
            stats.update(update)
            stats["seconds_rm_update"] = time.perf_counter() - t2
        rows = keep.nonzero().squeeze(1)  # (B',)
        if len(rows) == 0:
            return None, stats
        experience = Experience(
            samples.shared, loss_mask, old_logprobs, advantages,
            None if self.kl_in_reward else ref_logprobs, is_weights=is_weights,
        )  # fmt: skip
        batch = samples.shared if len(rows) == len(keep) else samples.shared.select(rows)
        return experience.select(rows, batch), stats

    def grpo_loss(self, model: Any, mb: Experience) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Clipped policy loss (+ beta x k3 KL) of one micro-batch, scaled to a sum over the items the
        aggregation averages over (tokens for "dapo", sequences otherwise), as the loop expects."""
        cfg = self.stage
        lmask = mb.completion_mask  # (B, T)
        logprobs, entropy = completion_logprobs(model, mb.batch, cfg.sampling.temperature)  # (B, T)
        assert entropy is not None
        agg = AGGREGATION[cfg.loss_type]
        max_len = self.max_len
        pg, m = losses.policy_loss(
            logprobs, mb.old_logprobs, mb.advantages, lmask, cfg.clip_low, cfg.clip_high, agg, max_len,
            is_weights=mb.is_weights,
        )  # fmt: skip
        count = lmask.sum() if agg == "token" else lmask.new_tensor(float(mb.rows))
        loss = pg
        sums = {key: m[key] * count for key in ("clip_frac", "approx_kl", "ratio_mean")}
        if mb.ref_logprobs is not None:
            k3 = losses.kl_estimate(logprobs, mb.ref_logprobs, "k3")  # (B, T)
            kl = losses.aggregate_loss(k3, lmask, agg, max_len)
            loss = loss + cfg.beta * kl
            sums["kl_loss"] = kl.detach() * count
        sums["policy_loss"] = pg.detach() * count
        sums["entropy"] = losses.masked_mean(entropy, lmask) * count
        return loss * count, sums

    def iteration(self, step: int) -> dict[str, float]:
        """sample -> experience -> `num_iterations` passes over its micro-batches -> metrics."""
        with self.full_weights():  # sharded: gathered once for sampling and the reference pass
            samples = self.sample(self.batch_indices(step))
            experience, stats = self.make_experience(samples)
        t0 = time.perf_counter()
        out: dict[str, float] = {"skipped": 0.0}
        if experience is None:  # every group had equal rewards: nothing to learn from
            out["skipped"] = 1.0
        else:
            self.policy.train()
            per_token = AGGREGATION[self.stage.loss_type] == "token"
            batches = experience.minibatches(self.micro_batch or experience.rows, per_token)
            totals: dict[str, float] = {}
            for it in range(self.stage.num_iterations):
                metrics = self.optimize(batches, self.grpo_loss)
                if it == 0:
                    out["ratio_first_minibatch"] = metrics["ratio_mean"]
                for key, value in metrics.items():
                    totals[key] = totals.get(key, 0.0) + value / self.stage.num_iterations
            out.update(totals)
        out.update(stats)
        out["seconds_training"] = time.perf_counter() - t0
        return out

    def extra_state(self) -> dict[str, Any]:
        state = super().extra_state()
        if self.online is not None:
            state["online_rm"] = self.online.state_dict()
        return state

    def load_extra_state(self, state: dict[str, Any]) -> None:
        super().load_extra_state(state)
        if self.online is not None:
            self.online.load_state_dict(state["online_rm"])

    def save_final(self) -> None:
        save_model(self.policy, self.tokenizer, self.output_dir, self.final_state())
        if self.online is not None:
            self.online.save(self.output_dir / ONLINE_RM_DIR)


def run_grpo(cfg: GRPOConfig, reward: RewardMix | Scorer | None = None) -> dict[str, float]:
    """Validate the prompts and the reward before anything is written, then train (GRPO or RLOO); with
    `env`, the environment's train tasks, its episode returns mixed with any reward models and functions."""
    if cfg.online_feedback.labeler:
        if reward is not None or len(cfg.reward) != 1:
            raise ConfigError(
                "online_feedback trains one reward model: give exactly one --reward DIR "
                f"(got {len(cfg.reward)})"
            )
        from rlhfkit.rewards.panel import load_gold

        load_gold(cfg.online_feedback.labeler)  # a wrong labeler is an error before anything is loaded
    if cfg.env is not None:
        if reward is not None:
            raise ConfigError(
                f"env {cfg.env}: give reward models and functions as settings (reward, reward_fn)"
            )
        env = load_environment(cfg.env, **cfg.env_settings)
        tasks = env.tasks("train")
        env.close()
        if not tasks:
            raise ConfigError(f"env {cfg.env}: no train tasks")
        return GRPOTrainer(cfg, tasks, None).run()  # type: ignore[arg-type] # a Task has a .prompt too
    records = load_rl_prompts(cfg)
    if cfg.online_feedback.labeler:
        return GRPOTrainer(cfg, records, None).run()
    return GRPOTrainer(cfg, records, reward or reward_mix(cfg)).run()


run_rloo = run_grpo  # RLOOConfig carries the difference
