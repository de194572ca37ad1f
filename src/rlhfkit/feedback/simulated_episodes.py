"""Simulated feedback on agent episodes: local policies play K episodes of each of a sample of an
environment's train tasks (K / P each of P policies: a group can hold the SFT policy's episodes beside those
of a policy RL trained on the task reward alone), and a panel of simulated annotators ranks each group by a
gold preference over episodes with label noise; written as trajectory rankings (`data.trajectories`), the
file `rlhfkit rm` reads, with each episode's tokens exactly as the sampler produced them (prompt_ids,
completion_ids, loss_mask: what the reward model reads, never re-tokenised text). The episodes stage of
`rlhfkit pipeline --env` (`rlhfkit.agent_pipeline`), as the answer pipeline's feedback stage is for answers.

Sampling is `feedback prepare --env`'s (`episode_prepare.sample_episodes`: the task list repeated K times in
batches, one seeded generator), so the same seed gives the same episodes. An annotator (the tasks are dealt
round-robin) ranks by the gold and swaps each adjacent pair of levels with `flip_prob`
(`rewards.panel.Annotator`); ties stay ties. Written to OUT: rankings.jsonl and feedback.json (counts, the
labels' agreement with the gold's own order, the sampled episodes' value metrics and end reasons).
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

from rlhfkit.agents.env import Task
from rlhfkit.agents.episode import AgentLimits, Episode
from rlhfkit.agents.registry import load_environment
from rlhfkit.config import setting
from rlhfkit.console import console
from rlhfkit.data.chat_tools import tool_schemas
from rlhfkit.errors import ConfigError
from rlhfkit.evaluation.agent_eval import value_metrics
from rlhfkit.feedback.agreement import pair_agreement
from rlhfkit.feedback.episode_prepare import EpisodePrepareConfig, sample_episodes, split_prompt
from rlhfkit.feedback.export import ranking_json
from rlhfkit.fileio import write_atomic
from rlhfkit.rewards.panel import gold_ranks, load_gold, make_panel
from rlhfkit.rollout.engine import SamplingConfig


@dataclass
class EpisodesConfig:
    """Simulated feedback on episodes: K episodes per train task from the pipeline's policies, ranked by a
    panel."""

    tasks: int = setting(48, ge=1)
    """Train tasks whose episodes are ranked (a seeded sample of the environment's train split)."""
    k: int = setting(4, ge=2)
    """Episodes per task (identical ones are merged; the panel ranks the rest, ties allowed)."""
    sampling: SamplingConfig = field(default_factory=lambda: SamplingConfig(temperature=0.8))
    """How turns are sampled (`max_new_tokens` comes from `agent`); the RL runs' temperature, so the reward
    model learns from episodes like the ones it scores during RL."""
    batch_size: int = setting(32, ge=1)
    """Episodes run together (each decoding step serves the whole batch)."""
    annotators: int = setting(4, ge=1)
    """Size of the simulated panel; tasks are dealt round-robin."""
    flip_prob: float = setting(0.25, ge=0, le=0.5)
    """Each annotator swaps each adjacent pair of levels of its ranking with this probability (AlpacaFarm:
    0.25)."""


def rank_episodes(
    cfg: EpisodesConfig,
    env: str,
    tasks: list[Task],
    runs: list[list[Episode]],
    tools: list[dict[str, Any]] | None,
    gold: Callable[..., float],
    seed: int,
) -> tuple[list[str], dict[str, Any]]:
    """The panel's ranking of each task's episodes as trajectory-ranking rows (JSONL lines, with the
    sampler's tokens), and statistics. Episodes that never took a turn are dropped and identical ones
    merged; a task left with fewer than two, or whose gold ties them all, is skipped."""
    panel = make_panel(cfg.annotators, cfg.flip_prob, seed)
    lines, skipped, agree, compared, golds = [], 0, 0, 0, []
    for t, (task, episodes) in enumerate(zip(tasks, runs, strict=True)):
        kept: dict[str, tuple[Episode, list[dict[str, Any]], list[dict[str, Any]]]] = {}
        for e in episodes:
            parts = split_prompt(e)
            if parts is not None and (not kept or parts[0] == next(iter(kept.values()))[1]):
                kept.setdefault(json.dumps(parts[1], sort_keys=True), (e, *parts))
        group = list(kept.values())
        scores = [float(gold(task, e)) for e, _, _ in group]
        golds += scores
        levels = gold_ranks(scores)
        if len(group) < 2 or len(set(levels)) < 2:  # nothing to rank
            skipped += 1
            continue
        annotator = panel[t % len(panel)]
        ranks = annotator.rank(scores)  # flips swap whole levels: still at least two
        a, c = pair_agreement(ranks, levels)
        agree, compared = agree + a, compared + c
        rows = [{"messages": after, "prompt_ids": e.prompt_ids, "completion_ids": e.completion_ids,
                 "loss_mask": e.loss_mask} for e, _, after in group]  # fmt: skip
        row = {"prompt": group[0][1], "tools": tools, "episodes": rows, "ranking": ranking_json(ranks),
               "task_id": task.id, "env": env, "annotator": annotator.name,
               "gold": [round(s, 4) for s in scores]}  # fmt: skip
        lines.append(json.dumps(row, ensure_ascii=False) + "\n")
    sampled = [e for episodes in runs for e in episodes]
    stats = {
        "items": len(lines),
        "tasks_skipped": skipped,
        "episodes": len(sampled),
        "mean_gold": sum(golds) / max(len(golds), 1),
        "label_agreement_with_gold": agree / max(compared, 1),
        "metrics": {k: v["mean"] for k, v in value_metrics([e.info for e in sampled]).items()},
        "reasons": {r: sum(e.reason == r for e in sampled) for r in sorted({e.reason for e in sampled})},
    }
    return lines, stats


def sample_groups(
    cfg: EpisodesConfig,
    env: str,
    env_settings: Mapping[str, Any],
    policies: Sequence[str],
    agent: AgentLimits,
    seed: int,
) -> tuple[list[Task], list[list[Episode]], list[dict[str, Any]] | None]:
    """(the sampled train tasks, each one's K episodes, the tools' schemas): the same seed, the same ones.
    The K episodes of a task come from `policies` in turn, K / len(policies) each (the first ones play
    the remainder), each policy sampled with the same seed."""
    if not 1 <= len(policies) <= cfg.k:
        raise ConfigError(f"episodes: {len(policies)} policies cannot share episodes.k={cfg.k} episodes")
    make_env = partial(load_environment, env, **env_settings)
    probe = make_env()
    train, tools = probe.tasks("train"), tool_schemas(probe.tools()) or None
    probe.close()
    tasks = random.Random(seed).sample(train, min(cfg.tasks, len(train)))
    groups: list[list[Episode]] = [[] for _ in tasks]
    for i, policy in enumerate(policies):
        k = cfg.k // len(policies) + (i < cfg.k % len(policies))
        sampling = EpisodePrepareConfig(
            env=env, db="", policy=policy, env_settings=dict(env_settings), k=k, agent=agent,
            sampling=cfg.sampling, seed=seed, batch_size=cfg.batch_size,
        )  # fmt: skip
        for group, episodes in zip(groups, sample_episodes(sampling, make_env, tasks), strict=True):
            group += episodes
    return tasks, groups, tools


def simulate_feedback(
    cfg: EpisodesConfig,
    env: str,
    env_settings: Mapping[str, Any],
    policies: Sequence[str],
    agent: AgentLimits,
    gold: str,
    seed: int,
    out: Path,
) -> dict[str, Any]:
    """Sample, rank and write OUT/rankings.jsonl and OUT/feedback.json (see the module docstring); returns
    the statistics. `gold` is a `module:function` called as gold(task, episode)."""
    tasks, runs, tools = sample_groups(cfg, env, env_settings, policies, agent, seed)
    lines, stats = rank_episodes(cfg, env, tasks, runs, tools, load_gold(gold), seed)
    if not lines:
        raise ConfigError(
            "episodes: no task got two episodes the gold tells apart; raise episodes.tasks, episodes.k or "
            "episodes.sampling.temperature"
        )
    write_atomic(out / "rankings.jsonl", "".join(lines))
    write_atomic(out / "feedback.json", json.dumps(stats, indent=2))
    console.print(
        f"episodes: {stats['items']} ranked groups of {stats['episodes']} episodes; labels agree with the "
        f"gold on {stats['label_agreement_with_gold']:.1%} of pairs; {stats['metrics']}"
    )
    return stats
