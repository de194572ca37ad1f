"""RL experience: what a sampler produces and what every on-policy trainer (PPO, GRPO, RLOO) consumes.

One iteration of any on-policy trainer reads as one story (`RLTrainer.train_step`):

    samples    = trainer.sample(indices)        # a Sampler: answers, or multi-turn episodes; scored
    experience = trainer.make_experience(...)   # old / reference log-probs, advantages: an `Experience`
    for mb in experience.minibatches(...):      # the loop's `optimize`: loss -> backward -> step
        ...

A sampler is a callable `(rows, generator) -> Generation`: it samples the rows (prompt indices, each
repeated `group` times) and returns the rollout with the mask of the tokens the policy is trained on, the
texts, and, when it scores its own samples (an environment's returns), the rewards. `AnswerSampler` samples
one answer per row with the rollout engine; `EpisodeSampler` runs multi-turn episodes (`agents.episode`),
whose loss mask covers the model's own tokens and not the observations between its turns. What the two
share (the reward mixture, `no_eos_score`, statistics, the shared-prompt batch) lives in the trainer, once.

`Experience` is a typed batch: the same fields for every trainer (PPO adds `old_values` and `returns`), so
a loss reads `mb.old_logprobs`, never a key that differs by trainer, and a new trainer selects rows and
cuts minibatches with the methods here.

Shapes: B rows, P prompt tokens (left-padded), T answer (episode) tokens.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from rlhfkit.agents.env import Environment
from rlhfkit.agents.episode import AgentLimits, Episode, episode_batch, run_episodes, transcript
from rlhfkit.data.encoding import chat_prompt_text
from rlhfkit.errors import ConfigError, NonFiniteRewardError
from rlhfkit.models.prefix import SharedPromptBatch
from rlhfkit.rollout import Rollout, RolloutEngine, SamplingConfig


@dataclass
class Generation:
    """What a sampler returns for B rows (CPU tensors; the trainer moves them to its device)."""

    rollout: Rollout
    completion_mask: torch.Tensor  # (B, T) float: 1 on the tokens the policy is trained on
    prompts: list[str]  # display text of each row's prompt
    completions: list[str]  # decoded answers, or episode transcripts
    records: list[Any]  # what reward functions read their fields from: prompt records, `EpisodeRecord`s
    stats: dict[str, float]  # what only this kind of sample has (turns, end reasons, answer length)
    rewards: torch.Tensor | None = None  # (B,) when the sampler scores its own samples (episode returns)


Sampler = Callable[[list[int], torch.Generator], Generation]


@dataclass
class Samples:
    """One scored batch of B rows, in groups of `group` consecutive rows with the same prompt."""

    rollout: Rollout
    shared: SharedPromptBatch  # the same rows with each distinct prompt once, for the forward passes
    completion_mask: torch.Tensor  # (B, T) float: the tokens the policy is trained on
    records: list[Any]
    prompts: list[str]
    completions: list[str]
    scores: torch.Tensor  # (B,) the reward used (after no_eos_score)
    stats: dict[str, float]
    gold: list[float] | None = None  # the watched `gold` score of each row, when the run has one


@dataclass
class Experience:
    """The policy update's batch: B rows of one iteration, every tensor on the run's device.

    `advantages` is (B,) for outcome advantages (GRPO, RLOO: one per answer, broadcast over its tokens) or
    (B, T) per token (PPO's GAE). `num_items` is the loop's loss normaliser share of a minibatch (tokens or
    rows, as the loss aggregates); `minibatches` sets it."""

    batch: SharedPromptBatch
    completion_mask: torch.Tensor  # (B, T) float: tokens in the loss
    old_logprobs: torch.Tensor  # (B, T) log pi_old of the sampled tokens (the sampler's), 0 on padding
    advantages: torch.Tensor  # (B,) or (B, T)
    ref_logprobs: torch.Tensor | None = None  # (B, T) when the loss holds a KL term to the reference
    old_values: torch.Tensor | None = None  # (B, T) the critic's values at sampling time (PPO)
    returns: torch.Tensor | None = None  # (B, T) the critic's targets (PPO)
    is_weights: torch.Tensor | None = None  # (B, T) truncated importance weights pi_old / pi_sampler
    num_items: float = 0.0
    per_token: bool = False  # the loss normaliser counts tokens (else rows)

    @property
    def rows(self) -> int:
        return self.batch.rows

    def select(self, rows: torch.Tensor, batch: SharedPromptBatch | None = None) -> Experience:
        """The experience of `rows` (B',); `batch` when the caller already has `self.batch.select(rows)`."""
        tensors: dict[str, Any] = {
            f.name: value[rows]
            for f in dataclasses.fields(self)
            if isinstance(value := getattr(self, f.name), torch.Tensor)
        }
        return dataclasses.replace(self, batch=batch or self.batch.select(rows), **tensors)

    def minibatches(self, size: int, per_token: bool, order: torch.Tensor | None = None) -> list[Experience]:
        """Minibatches of `size` rows (the last may be smaller): consecutive rows, or the rows in `order`
        (a permutation: PPO's shuffled minibatches). A single minibatch of all rows in their order is the
        experience itself. `per_token`: the loss normaliser counts tokens, otherwise rows."""
        if order is None and size >= self.rows:
            parts = [self]
        elif order is None:
            parts = [
                self.select(torch.arange(lo, min(lo + size, self.rows))) for lo in range(0, self.rows, size)
            ]
        else:
            parts = [self.select(order[lo : lo + size]) for lo in range(0, len(order), size)]
        count = (lambda mb: float(mb.completion_mask.sum())) if per_token else (lambda mb: float(mb.rows))
        return [dataclasses.replace(mb, num_items=count(mb), per_token=per_token) for mb in parts]

    def shard(self, rank: int, world: int) -> Experience:
        """Process `rank`'s contiguous share of the rows of a minibatch that every one of `world` processes
        holds whole (sharded training samples the iteration alike everywhere and splits only the update, so
        the run is the same on any number of processes), with its share of the loss normaliser."""
        lo, hi = rank * self.rows // world, (rank + 1) * self.rows // world
        if hi <= lo:
            raise ConfigError(
                f"a minibatch of {self.rows} rows cannot be split over {world} processes: raise the rows of "
                "each update (prompts_per_step, rollout_batch, micro_batch)"
            )
        part = self.select(torch.arange(lo, hi))
        items = float(part.completion_mask.sum()) if self.per_token else float(part.rows)
        return dataclasses.replace(part, num_items=items)


@dataclass
class AnswerSampler:
    """One answer per row from the rollout engine (single-turn RL); the trainer scores them."""

    engine: RolloutEngine
    prompt_ids: Sequence[list[int]]  # token ids of every prompt record
    records: Sequence[Any]
    sampling: SamplingConfig

    def __call__(self, rows: list[int], generator: torch.Generator) -> Generation:
        generation = self.engine.sample_texts([self.prompt_ids[i] for i in rows], self.sampling, generator)
        rollout = generation.rollout
        records = [self.records[i] for i in rows]
        return Generation(
            rollout, rollout.completion_mask.float(), [chat_prompt_text(r.prompt) for r in records],
            generation.texts, records, {"answer_length": float(rollout.lengths.float().mean())},
        )  # fmt: skip


@dataclass(frozen=True)
class EpisodeRecord:
    """What a reward function, the watched gold and an online labeler see of one episode: its task and the
    episode itself (`fields`, passed to a reward function as the keyword lists `task` and `episode`)."""

    task: Any
    episode: Episode

    @property
    def prompt(self) -> str:
        return self.task.prompt

    @property
    def fields(self) -> dict[str, Any]:
        return {"task": self.task, "episode": self.episode}


@dataclass
class EpisodeSampler:
    """One multi-turn episode per row (`agents.episode`); its return is its reward unless the trainer mixes
    in reward models and functions (they read the episodes from the `EpisodeRecord`s)."""

    engine: RolloutEngine
    make_env: Callable[[], Environment]
    tasks: Sequence[Any]
    sampling: SamplingConfig
    limits: AgentLimits
    env_name: str = "env"

    def __call__(self, rows: list[int], generator: torch.Generator) -> Generation:
        tasks = [self.tasks[i] for i in rows]
        episodes = run_episodes(self.engine, self.make_env, tasks, self.sampling, self.limits, generator)
        rewards = torch.tensor([e.reward for e in episodes], dtype=torch.float32)  # (B,)
        if not bool(torch.isfinite(rewards).all()):
            bad = next(e for e in episodes if not torch.isfinite(torch.tensor(e.reward)))
            raise NonFiniteRewardError(f"env {self.env_name}: task {bad.task_id} returned {bad.reward}")
        rollout, loss_mask = episode_batch(episodes, self.engine.pad_token_id)  # (B, T) each
        n = len(episodes)
        stats = {
            "turns": sum(e.turns for e in episodes) / n,
            "episode_tokens": sum(e.tokens for e in episodes) / n,
            "answer_length": float(loss_mask.sum()) / n,
        }
        for reason in sorted({e.reason for e in episodes}):
            stats[f"end_{reason}"] = sum(e.reason == reason for e in episodes) / n
        prompts = [t.prompt for t in tasks]
        completions = [transcript(e.messages) for e in episodes]
        records = [EpisodeRecord(t, e) for t, e in zip(tasks, episodes, strict=True)]
        return Generation(rollout, loss_mask, prompts, completions, records, stats, rewards)
