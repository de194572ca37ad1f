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
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from rlhfkit import losses
from rlhfkit.data import PromptRecord, load_prompts, resolve_data_path
from rlhfkit.encoding import chat_prompt_text, prompt_ids
from rlhfkit.errors import DataError
from rlhfkit.loop import EpochStream, TrainConfig, TrainLoop, set_seed
from rlhfkit.models import (
    DEFAULT_MODEL,
    LoraSettings,
    decoder_and_head,
    eos_token_ids,
    load_causal_lm,
    save_model,
    unwrap,
)
from rlhfkit.rollout import Rollout, RolloutEngine, SamplingConfig
from rlhfkit.trainers.rm import build_reward_model

# (prompts, completions, rollout, records) -> scores (B,)
Scorer = Callable[[list[str], list[str], Rollout, list[PromptRecord]], torch.Tensor]


@dataclass
class PPOConfig:
    """Settings of `rlhfkit ppo`."""

    policy: str = DEFAULT_MODEL
    """Policy to optimise; also the frozen reference model (normally the SFT model)."""
    reward: str | None = None
    """Reward model directory (from `rlhfkit rm`)."""
    reward_fn: str | None = None
    """Instead of a reward model: a Python function `module:function(prompts, completions, **fields)`."""
    value_model: str | None = None
    """Initial value model (default: the reward model; the policy when only `reward_fn` is given)."""
    prompts: str = "bundled:prompts.jsonl"
    """RL prompts: {"prompt": ...} records; extra fields go to reward functions."""
    output: str = "runs/ppo"
    """Output directory: the final policy (transformers format), metrics, checkpoints."""
    max_prompt_length: int = 256
    """Prompts longer than this (in tokens) are an error naming the record."""
    rollout_batch: int = 16
    """Prompts (= answers) per PPO iteration."""
    max_new_tokens: int = 64
    """Longest answer."""
    temperature: float = 0.7
    """Sampling temperature (log-probs use logits / temperature everywhere)."""
    top_p: float = 1.0
    """Nucleus sampling."""
    top_k: int = 0
    """Top-k sampling (0: off)."""
    ppo_epochs: int = 4
    """Passes over each rollout batch."""
    minibatches: int = 1
    """Minibatches per pass (one optimizer step each)."""
    kl_coef: float = 0.05
    """Initial KL penalty coefficient beta."""
    kl_estimator: Literal["k1", "k3"] = "k1"
    """Per-token KL estimator in the reward (k1 = log pi/pi_ref; k3 = always-positive variant)."""
    kl_target: float | None = None
    """Adaptive KL (Ziegler et al.): steer the sequence KL towards this value (None: fixed beta)."""
    kl_horizon: int = 10000
    """Adaptive KL horizon in rollouts."""
    gamma: float = 1.0
    """Discount."""
    lam: float = 0.95
    """GAE lambda."""
    cliprange: float = 0.2
    """Policy ratio clip epsilon."""
    cliprange_value: float = 0.2
    """Value clip range."""
    vf_coef: float = 0.1
    """Weight of the value loss."""
    whiten_rewards: bool = False
    """Whiten the per-token rewards (before GAE) over the batch."""
    no_eos_score: float | None = -1.0
    """Score given to answers that never reach EOS (None: keep the reward's score)."""
    sample_every: int = 10
    """Log sample answers every N iterations (0: never)."""
    trust_remote_code: bool = False
    """Allow model code from model directories."""
    lora: LoraSettings = field(default_factory=LoraSettings)
    """LoRA adapters for the policy and the value model."""
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


def completion_logprobs(
    model: Any, ids: torch.Tensor, mask: torch.Tensor, pos: torch.Tensor, start: int, temperature: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(log-probs, entropy) of the answer tokens ids[:, start:], both (B, T); the output layer runs only
    on the answer positions."""
    decoder, head = decoder_and_head(model)
    hidden = decoder(input_ids=ids, attention_mask=mask, position_ids=pos).last_hidden_state  # (B, P+T, C)
    logits = head(hidden[:, start - 1 : -1]) / max(temperature, 1e-7)  # (B, T, V)
    logprobs = losses.gather_logprobs(logits, ids[:, start:])  # (B, T)
    with torch.no_grad():
        entropy = losses.entropy_from_logits(logits)  # (B, T)
    return logprobs, entropy


def token_values(
    value_model: Any, ids: torch.Tensor, mask: torch.Tensor, pos: torch.Tensor, start: int
) -> torch.Tensor:
    """V(s_t) for every answer position t: the value head on the hidden state that predicts token t. (B, T)"""
    base = unwrap(value_model)
    decoder = getattr(base, base.base_model_prefix)
    hidden = decoder(input_ids=ids, attention_mask=mask, position_ids=pos).last_hidden_state  # (B, P+T, C)
    return base.score(hidden[:, start - 1 : -1]).squeeze(-1)  # (B, T)


class PPOTrainer(TrainLoop):
    name = "ppo"

    def __init__(self, cfg: PPOConfig, records: list[PromptRecord], scorer: Scorer) -> None:
        set_seed(cfg.train.seed)
        policy, tokenizer = load_causal_lm(cfg.policy, lora=cfg.lora, trust_remote_code=cfg.trust_remote_code)
        value_source = cfg.value_model or cfg.reward or cfg.policy
        # a sequence classifier (head kept from a reward model, new head from a causal LM); with LoRA its
        # head is trained in full, and the reference is the policy with its adapters disabled
        value, _ = build_reward_model(value_source, lora=cfg.lora, trust_remote_code=cfg.trust_remote_code)
        if cfg.lora.enabled:
            self.reference = None
        else:
            self.reference, _ = load_causal_lm(cfg.policy, trust_remote_code=cfg.trust_remote_code)
            self.reference.requires_grad_(False).eval()
        super().__init__(cfg.train, PolicyAndValue(policy, value), cfg.output, cfg)
        self.ppo = cfg
        self.policy, self.value, self.tokenizer = policy, value, tokenizer
        self.records = records
        self.prompt_ids = [prompt_ids(tokenizer, r.prompt) for r in records]
        self.scorer = scorer
        self.engine_rollout = RolloutEngine(policy, tokenizer, eos_token_ids(tokenizer, policy))
        self.sampling = SamplingConfig(cfg.max_new_tokens, cfg.temperature, cfg.top_p, cfg.top_k)
        self.generator = torch.Generator().manual_seed(cfg.train.seed + 1_000_003 * self.rank)
        self.kl_ctl = losses.make_kl_controller(cfg.kl_coef, cfg.kl_target, cfg.kl_horizon)
        self.stream = EpochStream([0] * len(records), cfg.rollout_batch, cfg.train.seed)

    def total_steps(self) -> int:
        return self.cfg.max_steps

    def total_updates(self) -> int:
        return self.cfg.max_steps * self.ppo.ppo_epochs * self.ppo.minibatches

    def extra_state(self) -> dict[str, Any]:
        return {"generator": self.generator.get_state(), "kl_ctl": self.kl_ctl.state_dict()}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        self.generator.set_state(state["generator"])
        self.kl_ctl.load_state_dict(state["kl_ctl"])

    def batch_indices(self, step: int) -> list[int]:
        """Prompt indices of iteration `step`, this process's share."""
        return self.stream.batch(step)[self.rank :: self.world]

    @torch.no_grad()
    def make_experience(self, indices: list[int]) -> tuple[dict[str, Any], dict[str, float], Rollout]:
        t0 = time.perf_counter()
        self.policy.eval()
        rollout = self.engine_rollout.generate(
            [self.prompt_ids[i] for i in indices], self.sampling, self.generator
        )
        t1 = time.perf_counter()
        ids, mask, pos, start = (
            rollout.input_ids,
            rollout.attention_mask,
            rollout.position_ids,
            rollout.completion_start,
        )
        cmask = rollout.completion_mask.float()  # (B, T)
        records = [self.records[i] for i in indices]
        completions = [
            self.tokenizer.decode(row[m.bool()], skip_special_tokens=True)
            for row, m in zip(rollout.completion_ids, rollout.completion_mask, strict=True)
        ]
        prompts = [chat_prompt_text(r.prompt) for r in records]
        scores = self.scorer(prompts, completions, rollout, records).float()  # (B,)
        raw_scores = scores.clone()
        if self.ppo.no_eos_score is not None:
            scores = torch.where(
                rollout.ended, scores, torch.full_like(scores, self.ppo.no_eos_score)
            )  # (B,)
        if self.reference is not None:
            ref_logprobs, _ = completion_logprobs(self.reference, ids, mask, pos, start, self.ppo.temperature)
        else:
            with self.policy.disable_adapter():
                ref_logprobs, _ = completion_logprobs(
                    self.policy, ids, mask, pos, start, self.ppo.temperature
                )
        values = token_values(self.value, ids, mask, pos, start) * cmask  # (B, T)
        t2 = time.perf_counter()
        logprobs = rollout.logprobs * cmask  # (B, T)
        ref_logprobs = ref_logprobs * cmask  # (B, T)
        rewards, kl = losses.kl_penalized_rewards(
            scores, logprobs, ref_logprobs, cmask, self.kl_ctl.value, self.ppo.kl_estimator
        )  # (B, T) each
        if self.ppo.whiten_rewards:
            rewards = losses.masked_whiten(rewards, cmask, shift_mean=False)  # (B, T)
        advantages, returns = losses.compute_gae(rewards, values, cmask, self.ppo.gamma, self.ppo.lam)
        advantages = losses.masked_whiten(advantages, cmask)  # (B, T)
        seq_kl = (kl * cmask).sum(-1)  # (B,)
        experience = {
            "input_ids": ids, "attention_mask": mask, "position_ids": pos, "start": start,
            "completion_mask": cmask, "old_logprobs": logprobs, "old_values": values,
            "advantages": advantages, "returns": returns,
        }  # fmt: skip
        stats = {
            "score": float(raw_scores.mean()),
            "score_used": float(scores.mean()),
            "kl": float(seq_kl.mean()),
            "non_score_reward": float(-self.kl_ctl.value * seq_kl.mean()),
            "total_reward": float((scores - self.kl_ctl.value * seq_kl).mean()),
            "kl_coef": float(self.kl_ctl.value),
            "answer_length": float(cmask.sum(-1).mean()),
            "eos_rate": float(rollout.ended.float().mean()),
            "rollout_tokens_per_s": float(cmask.sum()) / max(t1 - t0, 1e-9),
            "seconds_rollout": t1 - t0,
            "seconds_scoring": t2 - t1,
        }
        self.tokens_seen += int(cmask.sum())
        if self.ppo.sample_every and self.step % self.ppo.sample_every == 0 and self.is_main:
            self.log_samples(prompts, completions, scores)
        return experience, stats, rollout

    def log_samples(self, prompts: list[str], completions: list[str], scores: torch.Tensor) -> None:
        import json

        with open(self.output_dir / "samples.jsonl", "a", encoding="utf-8") as fh:
            for p, c, s in list(zip(prompts, completions, scores.tolist(), strict=True))[:4]:
                fh.write(json.dumps({"step": self.step, "prompt": p, "completion": c, "score": s}) + "\n")

    def ppo_loss(
        self, model: PolicyAndValue, mb: dict[str, Any]
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Clipped policy loss + vf_coef x clipped value loss of one minibatch, as a sum over its tokens."""
        ids, mask, pos, start, cmask = (
            mb[k] for k in ("input_ids", "attention_mask", "position_ids", "start", "completion_mask")
        )
        logprobs, entropy = completion_logprobs(model.policy, ids, mask, pos, start, self.ppo.temperature)
        values = token_values(model.value, ids, mask, pos, start)  # (B, T)
        pg_loss, pg_metrics = losses.policy_loss(
            logprobs, mb["old_logprobs"], mb["advantages"], cmask, clip_low=self.ppo.cliprange
        )
        vf_loss, vf_metrics = losses.value_loss(
            values, mb["old_values"], mb["returns"], cmask, clip_range=self.ppo.cliprange_value
        )
        n = cmask.sum()
        loss_sum = (pg_loss + self.ppo.vf_coef * vf_loss) * n  # token means -> token sums for the loop
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

    def train_step(self, step: int) -> dict[str, float]:
        experience, stats, _ = self.make_experience(self.batch_indices(step))
        t0 = time.perf_counter()
        self.policy.train()
        n_rows = experience["input_ids"].shape[0]
        size = max(1, n_rows // self.ppo.minibatches)
        totals: dict[str, float] = {}
        first: dict[str, float] = {}
        for epoch in range(self.ppo.ppo_epochs):
            order = torch.randperm(n_rows, generator=self.generator)
            for k in range(self.ppo.minibatches):
                rows = order[k * size : (k + 1) * size]
                mb = {key: (v[rows] if isinstance(v, torch.Tensor) else v) for key, v in experience.items()}
                mb["num_items"] = float(mb["completion_mask"].sum())
                metrics = self.optimize([mb], self.ppo_loss)
                if epoch == 0 and k == 0:
                    first = metrics
                for key, value in metrics.items():
                    totals[key] = totals.get(key, 0.0) + value
        updates = self.ppo.ppo_epochs * self.ppo.minibatches
        out = {key: value / updates for key, value in totals.items()}
        out["ratio_first_minibatch"] = first["ratio_mean"]
        with torch.no_grad():
            cmask = experience["completion_mask"]
            out["explained_variance"] = float(
                losses.explained_variance(experience["old_values"], experience["returns"], cmask)
            )
        out.update(stats)
        out["seconds_training"] = time.perf_counter() - t0
        self.kl_ctl.update(stats["kl"], n_rows * self.world)
        return out

    def save_final(self) -> None:
        save_model(self.policy, self.tokenizer, self.output_dir)
        save_model(self.value, self.tokenizer, self.output_dir / "value")


def load_reward_function(spec: str) -> Callable[..., list[float]]:
    """Import `module:function`; the function maps (prompts, completions, **fields) to a list of floats."""
    import importlib

    from rlhfkit.errors import ConfigError

    module_name, sep, attr = spec.partition(":")
    if not sep:
        raise ConfigError(f"reward_fn {spec!r}: expected module:function")
    try:
        fn = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise ConfigError(f"reward_fn {spec!r}: {exc}") from None
    return fn


def function_scorer(fn: Callable[..., list[float]]) -> Scorer:
    """A Scorer over a Python reward function; extra prompt fields are passed as keyword lists."""

    def score(
        prompts: list[str], completions: list[str], rollout: Rollout, records: list[PromptRecord]
    ) -> torch.Tensor:
        keys = sorted({k for r in records for k in r.fields})
        fields = {k: [r.fields.get(k) for r in records] for k in keys}
        values = fn(prompts, completions, **fields)
        if len(values) != len(prompts):
            raise ValueError(f"reward function returned {len(values)} scores for {len(prompts)} answers")
        return torch.tensor([float(v) for v in values], dtype=torch.float32)

    return score


def check_prompt_lengths(records: list[PromptRecord], tokenizer: Any, limit: int) -> None:
    for rec in records:
        n = len(prompt_ids(tokenizer, rec.prompt))
        if n > limit:
            raise DataError(
                rec.source.path,
                rec.source.line,
                "prompt",
                f"is {n} tokens, more than max_prompt_length={limit}",
            )


def make_scorer(cfg: PPOConfig) -> Scorer:
    from rlhfkit.errors import ConfigError

    if cfg.reward_fn:
        return function_scorer(load_reward_function(cfg.reward_fn))
    if cfg.reward:
        from rlhfkit.rewards import rollout_scorer

        return rollout_scorer(cfg.reward)
    raise ConfigError("ppo needs a reward: --reward DIR (a reward model) or --set reward_fn=module:function")


def run_ppo(cfg: PPOConfig, scorer: Scorer | None = None) -> dict[str, float]:
    """Validate the prompts and the reward before anything is written, then train."""
    from rlhfkit.models import load_tokenizer

    records = load_prompts(resolve_data_path(cfg.prompts))
    tokenizer = load_tokenizer(cfg.policy, trust_remote_code=cfg.trust_remote_code)
    check_prompt_lengths(records, tokenizer, cfg.max_prompt_length)
    scorer = scorer or make_scorer(cfg)
    return PPOTrainer(cfg, records, scorer).run()
