"""What the on-policy RL trainers (PPO, GRPO, RLOO) share: settings, sampling, scoring, reference log-probs.

One iteration of any of them starts the same way:
 1. pick the iteration's prompts (a seeded epoch order, so a resumed run sees the same prompts), repeat
    each `group` times (GRPO/RLOO groups; PPO uses 1) and sample answers with the rollout engine, keeping
    the per-token log-probs of logits / temperature (the "old" log-probs of the first update);
 2. decode the answers (`RolloutEngine.decode`: special tokens dropped, whitespace stripped) and score
    them with the reward mixture: reward models and Python functions with weights, each component logged
    on its own; answers that never reach EOS may get `no_eos_score`;
 3. the reference log-probs (the frozen start policy; with LoRA the policy with its adapters disabled, so
    no second copy of the weights is held).
What differs (advantages, losses, the critic) lives in each trainer.

`gold` names a function that only watches: the mean gold score of each iteration's rollouts is logged as
`gold` (for the over-optimisation curve of the report), never used as a reward.

Shapes: B rollouts, P prompt tokens (left-padded), T answer tokens, V vocabulary.
"""

from __future__ import annotations

import contextlib
import json
import time
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import torch

from rlhfkit import losses
from rlhfkit.config import setting
from rlhfkit.console import console
from rlhfkit.data.encoding import checked_prompt_ids, prompt_ids
from rlhfkit.data.records import PromptRecord, load_prompts, resolve_data_path
from rlhfkit.device import resolve_runtime
from rlhfkit.errors import HealthError, NonFiniteRewardError
from rlhfkit.fileio import write_atomic
from rlhfkit.models.loading import DEFAULT_MODEL, load_causal_lm, load_tokenizer
from rlhfkit.models.prefix import SharedPromptBatch, completion_logprobs
from rlhfkit.rewards.mix import RewardComponent, RewardMix, Scorer
from rlhfkit.rollout import Rollout, RolloutEngine, SamplingConfig
from rlhfkit.rollout.engine import SAMPLING_RENAMED
from rlhfkit.training.checkpoint import latest_checkpoint
from rlhfkit.training.experience import AnswerSampler, EpisodeRecord, Generation, Sampler, Samples
from rlhfkit.training.health import HEALTH_FILE, HealthMonitor, repeat_share
from rlhfkit.training.loop import TrainLoop
from rlhfkit.training.settings import EpochStream, StageConfig, TrainConfig, set_seed


@dataclass
class RLConfig(StageConfig):
    """Settings every on-policy trainer has."""

    policy: str = DEFAULT_MODEL
    """Policy to optimise; also the frozen reference model (normally the SFT model)."""
    reward: list[str] = field(default_factory=list)
    """Reward model directories (from `rlhfkit rm`)."""
    reward_fn: list[str] = field(default_factory=list)
    """Python reward functions `module:function(prompts, completions, **fields) -> list[float]`; with an
    environment the fields are `task` and `episode` (lists of `agents.env.Task`, `agents.episode.Episode`)."""
    reward_weights: list[float] = field(default_factory=list)
    """One weight per reward component, reward models first, then functions, then (with an environment)
    its return (empty: all 1)."""
    gold: str | None = None
    """Watch only: log the mean score of this `module:function` (or "default", the simulated annotators'
    gold preference) over each iteration's rollouts as `gold`. Never a training signal."""
    prompts: str = "bundled:prompts.jsonl"
    """RL prompts: {"prompt": ...} records; extra fields go to reward functions."""
    output: str = "runs/rl"
    """Output directory: the final policy (transformers format), metrics, checkpoints."""
    max_prompt_length: int = setting(256, ge=1)
    """Prompts longer than this (in tokens) are an error naming the record."""
    sampling: SamplingConfig = field(default_factory=lambda: SamplingConfig(temperature=0.7))
    """How answers are sampled (`sampling.max_new_tokens`, `.temperature`, `.top_p`, `.top_k`)."""
    no_eos_score: float | None = None
    """Score given to answers that never reach EOS (None: keep the reward's score)."""
    old_logprobs: Literal["auto", "sampler", "trainer"] = "auto"
    """Where the update's old log-probs (pi_old) come from: "sampler", the rollout's own (exact when the
    sampler computes what the trainer's forward does); "trainer", a no-grad forward of the policy before
    the update, which measures the sampler / trainer mismatch (`mismatch_*` metrics) and weights each
    token's loss by the truncated importance ratio (`tis_cap`); "auto": the trainer's whenever the two
    differ by design (train.precision bf16, or a GPU sampler with its own kernels), the sampler's on a
    float32 CPU run."""
    tis_cap: float = setting(2.0, ge=0)
    """Truncation C of the importance weights min(pi_old / pi_sampler, C) when old log-probs come from the
    trainer (Yao et al. 2025; `losses.mismatch`); 0: measure the mismatch, weight nothing."""
    sample_every: int = setting(10, ge=0)
    """Append sample answers to samples.jsonl every N iterations (0: never)."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """The shared loop: `max_steps` = RL iterations; LoRA adapters also go on the value model."""

    RENAMED: ClassVar[dict[str, str]] = SAMPLING_RENAMED


def load_rl_prompts(cfg: RLConfig) -> list[PromptRecord]:
    """The prompt records, each checked to fit in `max_prompt_length` (characters first, then tokens)
    before anything is written; errors name file:line."""
    records = load_prompts(resolve_data_path(cfg.prompts))
    tokenizer = load_tokenizer(cfg.policy, trust_remote_code=cfg.trust_remote_code)
    for rec in records:
        checked_prompt_ids(tokenizer, rec, cfg.max_prompt_length, "max_prompt_length")
    return records


def as_reward_mix(reward: RewardMix | Scorer) -> RewardMix:
    return reward if isinstance(reward, RewardMix) else RewardMix([RewardComponent("reward", 1.0, reward)])


def reward_mix(cfg: RLConfig) -> RewardMix:
    """The reward components; reward models frozen on the run's device, in its inference precision."""
    return RewardMix.from_specs(cfg.reward, cfg.reward_fn, cfg.reward_weights, resolve_runtime(cfg.train))


class RLTrainer(TrainLoop):
    """The shared half of PPO, GRPO and RLOO; subclasses build the trainable module and the update."""

    stage: RLConfig

    group = 1  # answers sampled per prompt
    supports_sharding = False  # the rollout engine samples from whole weights
    positive_loss = False  # surrogate losses: their size says nothing about divergence
    watch_zero_gradients = False

    def __init__(
        self,
        cfg: RLConfig,
        records: list[PromptRecord],
        reward: RewardMix | Scorer | None,
        need_reference: bool,
    ) -> None:
        """`reward` None: the trainer scores its samples itself (multi-turn episodes: their returns)."""
        set_seed(cfg.train.seed)
        self.stage = cfg
        self.runtime = resolve_runtime(cfg.train)
        policy, tokenizer = load_causal_lm(
            cfg.policy, lora=cfg.lora, trust_remote_code=cfg.trust_remote_code, runtime=self.runtime,
            gradient_checkpointing=cfg.train.gradient_checkpointing,
        )  # fmt: skip
        self.reference = None
        if need_reference and not cfg.lora.enabled:  # with LoRA: the policy with its adapters disabled
            self.reference, _ = load_causal_lm(
                cfg.policy, trust_remote_code=cfg.trust_remote_code, runtime=self.runtime, frozen=True
            )
        self.need_reference = need_reference
        self.policy, self.tokenizer = policy, tokenizer
        super().__init__(cfg.train, self.build_model(policy), cfg.output, cfg)
        self.records = records
        self.prompt_ids = [prompt_ids(tokenizer, r.prompt) for r in records]
        self.reward = as_reward_mix(reward) if reward is not None else None
        self.rollout_engine = RolloutEngine(policy, tokenizer)
        self.sampler = self.make_sampler()
        self.health = HealthMonitor(cfg.train.health)
        mode = cfg.old_logprobs
        exact = self.runtime.precision == "fp32" and self.runtime.device.type == "cpu"
        self.recompute_old = mode == "trainer" or (mode == "auto" and not exact)
        # sharded (FSDP2), every process samples the whole batch alike and trains on its share of each update
        self.sampling_rank: int = 0 if self.fsdp2 else self.rank
        self.sampling_ranks: int = 1 if self.fsdp2 else self.world
        # a CPU generator whatever the device: its state checkpoints the same everywhere (the engine draws
        # its uniforms from it and moves them to the logits' device)
        self.generator = torch.Generator().manual_seed(cfg.train.seed + 1_000_003 * self.sampling_rank)
        self.gold_fn = None
        if cfg.gold:
            from rlhfkit.rewards.panel import load_gold

            self.gold_fn = load_gold(cfg.gold)

    def build_model(self, policy: torch.nn.Module) -> torch.nn.Module:
        """The module the optimizer trains and the checkpoint holds (PPO adds its value model)."""
        return policy

    def prompts_per_step(self) -> int:
        raise NotImplementedError

    def make_stream(self) -> EpochStream:
        return EpochStream([0] * len(self.records), self.prompts_per_step(), self.cfg.seed)

    def total_steps(self) -> int:
        return self.cfg.max_steps

    def extra_state(self) -> dict[str, Any]:
        return {"generator": self.generator.get_state(), "health": self.health.state_dict()}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        self.generator.set_state(state["generator"])
        if "health" in state:  # checkpoints written before the health checks existed have none
            self.health.load_state_dict(state["health"])

    def iteration(self, step: int) -> dict[str, float]:
        """One RL iteration: sample -> experience -> update(s) -> metrics (each trainer's own)."""
        raise NotImplementedError

    def train_step(self, step: int) -> dict[str, float]:
        """An iteration, then the health checks on its metrics (`rlhfkit.training.health`)."""
        metrics = self.iteration(step)
        if self.cfg.health.enabled:
            self.judge_health(metrics)
        return metrics

    def judge_health(self, metrics: dict[str, float]) -> None:
        """Mark the checks that fire in `metrics`; warn once per check, or stop (`train.health.action`)."""
        fired = self.health.check(metrics)
        for name in fired:
            metrics[f"health_{name}"] = 1.0
        iteration = self.step + 1
        stop = self.cfg.health.action == "stop" and bool(fired)
        if self.world > 1:  # every process stops together (their samples, hence metrics, differ)
            stop = self._reduce(float(stop)) > 0
        if stop:
            kept = latest_checkpoint(self.output_dir / "checkpoints")
            if kept is None:
                where = "no checkpoint was written yet; start again in a new --output with other settings"
            else:
                where = (
                    f"the last good checkpoint is {kept}; continue from it with other settings: the same "
                    "command with --resume-with-changes --set train.lr=... (or train.health.*)"
                )
            what = "; ".join(f"{name}: {text}" for name, text in fired.items()) or "another process's check"
            raise HealthError(
                f"RL health stopped the run at iteration {iteration}: {what}; this iteration was not saved "
                f"and {where} (train.health.action=warn only warns)"
            )
        for name in self.health.record(iteration, fired):
            if self.is_main:
                console.print(
                    f"[yellow]warning[/]: RL health ({name}) at iteration {iteration}: {fired[name]}"
                )
        if self.is_main:
            write_atomic(self.output_dir / HEALTH_FILE, json.dumps(self.health.summary(), indent=1))

    def batch_indices(self, step: int) -> list[int]:
        """Prompt indices of iteration `step`, this process's share."""
        if not hasattr(self, "_stream"):
            self._stream = self.make_stream()
        return self._stream.batch(step)[self.sampling_rank :: self.sampling_ranks]

    def make_sampler(self) -> Sampler:
        """What samples an iteration's rows: one answer each (episodes: `GRPOTrainer` with `env`)."""
        return AnswerSampler(self.rollout_engine, self.prompt_ids, self.records, self.stage.sampling)

    @torch.no_grad()
    def sample(self, indices: list[int]) -> Samples:
        """Sample each prompt `group` times (consecutive rows) and score every row: the sampler's own rewards
        (episode returns) or the reward mixture; answers that never reach EOS may get `no_eos_score`."""
        rows = [i for i in indices for _ in range(self.group)]
        t0 = time.perf_counter()
        # on a GPU the sampler runs in the run's precision (bf16 KV cache and graphs: half the bytes a token);
        # the CPU samples in float32, where bf16 matmuls are far slower; `old_logprobs` corrects either
        with self.autocast() if self.device.type == "cuda" else contextlib.nullcontext():
            gen = self.sampler(rows, self.generator)
        rollout, mask = self.to_device(gen.rollout), self.to_device(gen.completion_mask)  # (B, T) each
        t1 = time.perf_counter()
        parts: dict[str, torch.Tensor] = {}
        if self.reward is not None:  # with an environment, its return is one of the mixture's components
            raw, parts = self.score(gen.prompts, gen.completions, rollout, gen.records)  # (B,), {name: (B,)}
        else:
            assert gen.rewards is not None, "a trainer without a reward mix needs a sampler that scores"
            raw = gen.rewards  # (B,)
        scores = raw.float().to(self.device)  # (B,)
        if self.stage.no_eos_score is not None:
            scores = torch.where(
                rollout.ended, scores, torch.full_like(scores, self.stage.no_eos_score)
            )  # (B,)
        n_tokens = float(mask.sum())
        h = self.cfg.health
        stats = {
            "score": float(raw.mean()),
            "score_used": float(scores.mean()),
            **gen.stats,
            "eos_rate": float(rollout.ended.float().mean()),
            "repeat_share": repeat_share(rollout.completion_ids, mask, h.repeat_ngram, h.repeat_count),
            "rollout_tokens_per_s": n_tokens / max(t1 - t0, 1e-9),
            "seconds_rollout": t1 - t0,
        }
        if len(parts) > 1:
            stats.update({f"reward_{name}": float(v.mean()) for name, v in parts.items()})
        gold = None
        if self.gold_fn is not None:
            gold = self.gold_scores(gen)
            stats["gold"] = sum(gold) / len(gold)
        stats["seconds_scoring"] = time.perf_counter() - t1
        self.tokens_seen += int(n_tokens)
        if self.stage.sample_every and self.step % self.stage.sample_every == 0 and self.is_main:
            self.log_samples(gen.prompts, gen.completions, scores)
        shared = self.to_device(SharedPromptBatch.from_rollout(rollout, self.rollout_engine.pad_token_id))
        return Samples(rollout, shared, mask, gen.records, gen.prompts, gen.completions, scores, stats, gold)

    def gold_scores(self, gen: Generation) -> list[float]:
        """The watched gold of each row: `gold(prompt, answer)`, or for an episode `gold(task, episode)`."""
        assert self.gold_fn is not None
        if gen.records and isinstance(gen.records[0], EpisodeRecord):
            return [float(self.gold_fn(r.task, r.episode)) for r in gen.records]
        return [float(self.gold_fn(p, c)) for p, c in zip(gen.prompts, gen.completions, strict=True)]

    def score(
        self, prompts: list[str], completions: list[str], rollout: Rollout, records: list[PromptRecord]
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The reward mixture's total (B,) and components; a non-finite reward stops the run naming the
        last good checkpoint, before anything is trained on."""
        assert self.reward is not None
        try:
            return self.reward(prompts, completions, rollout, records)
        except NonFiniteRewardError as exc:
            kept = latest_checkpoint(self.output_dir / "checkpoints")
            where = f"the last good checkpoint {kept} is kept" if kept else "no checkpoint was written yet"
            raise NonFiniteRewardError(
                f"{exc}; iteration {self.step + 1} was not trained on and {where}"
            ) from None

    @torch.no_grad()
    def reference_logprobs(self, batch: SharedPromptBatch, rows: int = 0) -> torch.Tensor:
        """log pi_ref of each answer token (B, T), zero on padding: the frozen reference (bf16 weights under
        bf16 precision), or with LoRA the policy itself with its adapters disabled (no second copy).
        `rows` > 0 runs that many rows per forward pass (long multi-turn episodes), same values."""
        if self.reference is not None:  # already in the inference dtype: no autocast
            return self.forward_logprobs(self.reference, batch, rows, autocast=False)
        with self.policy.disable_adapter():
            return self.forward_logprobs(self.policy, batch, rows)

    @torch.no_grad()
    def forward_logprobs(
        self, model: torch.nn.Module, batch: SharedPromptBatch, rows: int = 0, autocast: bool = True
    ) -> torch.Tensor:
        """log p of each answer token (B, T) under `model` (and the run's autocast), float32, zero on
        padding; `rows` > 0 runs that many rows per forward pass, same values."""
        if 0 < rows < batch.rows:
            parts = [
                self.forward_logprobs(
                    model, batch.select(torch.arange(lo, min(lo + rows, batch.rows))), 0, autocast
                )
                for lo in range(0, batch.rows, rows)
            ]
            return torch.cat(parts)  # (B, T)
        with self.autocast() if autocast else contextlib.nullcontext():
            lp, _ = completion_logprobs(model, batch, self.stage.sampling.temperature, entropy=False)
        return lp.float()  # (B, T)

    @torch.no_grad()
    def old_logprobs(
        self, samples: Samples, rows: int = 0
    ) -> tuple[torch.Tensor, torch.Tensor | None, dict[str, float]]:
        """(old log-probs (B, T), truncated importance weights (B, T) or None, mismatch metrics).

        The sampler's log-probs, or (`old_logprobs`, see RLConfig) the policy's own forward before the
        update: then `mismatch_logprob_abs_mean` / `_max` and `mismatch_kl` say how far the sampler was
        from the trainer, and each token is weighted by min(exp(log pi_old - log pi_sampler), tis_cap)."""
        mask = samples.completion_mask  # (B, T)
        sampler = samples.rollout.logprobs * mask  # (B, T)
        if not self.recompute_old:
            return sampler, None, {}
        trainer = self.forward_logprobs(self.policy, samples.shared, rows) * mask  # (B, T)
        m = losses.logprob_mismatch(sampler, trainer, mask)
        stats = {
            "mismatch_logprob_abs_mean": float(m["abs_diff_mean"]),
            "mismatch_logprob_abs_max": float(m["abs_diff_max"]),
            "mismatch_kl": float(m["kl"]),
        }
        weights = None
        if self.stage.tis_cap > 0:
            weights, w = losses.truncated_is_weights(trainer, sampler, mask, self.stage.tis_cap)  # (B, T)
            stats.update({key: float(value) for key, value in w.items()})
        return trainer, weights, stats

    def log_samples(self, prompts: list[str], completions: list[str], scores: torch.Tensor) -> None:
        with open(self.output_dir / "samples.jsonl", "a", encoding="utf-8") as fh:
            for p, c, s in list(zip(prompts, completions, scores.tolist(), strict=True))[:4]:
                fh.write(json.dumps({"step": self.step, "prompt": p, "completion": c, "score": s}) + "\n")
