"""`rlhfkit feedback prepare --env`: sample K episodes per task of an environment and store them as a
labelling project of episode items (`feedback.episodes`), the way `prepare` stores K answers per prompt.

    rlhfkit feedback prepare --env support --policy runs/agent --k 4 --set limit=50 --db fb.sqlite
    rlhfkit feedback prepare --env calc --endpoint http://127.0.0.1:8000/v1 --k 4 --db fb.sqlite

A local policy (`--policy`) acts through `agents.episode.run_episodes`: the task list repeated K times in
batches of `batch_size` episodes, one seeded generator, so the same seed gives the same episodes, and each
episode keeps its tokens exactly as sampled (prompt_ids, completion_ids, loss_mask: what a reward model over
episodes reads). An endpoint (`--endpoint`) acts through `evaluation.agent_eval.chat_episodes` (text in,
text out: no tokens), in the same batches; episode number i is asked with seed `seed + i`, so a server that
honours seeds gives K different episodes of a task, reproducibly.

The prompt of an episode is its messages before the first assistant turn (`env.reset`'s); the K episodes
of a task share it. Episodes that never took a turn (the environment failed at reset, the prompt is
longer than `agent.max_tokens`) are dropped, identical ones (same messages) merged, and a task left with
fewer than two is not stored; the counts are reported. Each stored task is checked to be a valid trajectory
record (`data.trajectories`), so every label exports to a file `rlhfkit rm` reads. The database is made
and written in one transaction after sampling, so a failed or interrupted run leaves no half-made project
(and no new file).
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Literal

from rlhfkit.agents.env import Environment, Task
from rlhfkit.agents.episode import AgentLimits, Episode
from rlhfkit.config import setting
from rlhfkit.errors import ConfigError, DataError, RlhfkitError
from rlhfkit.feedback.episodes import DEFAULT_EPISODE_GUIDELINES, NewEpisodeItem
from rlhfkit.feedback.prepare import MAX_K
from rlhfkit.rollout.engine import SamplingConfig


@dataclass
class EpisodePrepareConfig:
    """Settings of `rlhfkit feedback prepare --env` (options, or `--set key=value`)."""

    env: str
    """Environment: a bundled name (calc, support, commons, os, db) or `module:Class`."""
    db: str
    """SQLite file to create (refused if it already holds a project)."""
    policy: str | None = None
    """Local model that acts (a directory or registered name); or give `endpoint`."""
    endpoint: str | None = None
    """OpenAI-compatible server (its /v1 URL) that acts; or give `policy`."""
    env_settings: dict[str, Any] = field(default_factory=dict)
    """Keyword arguments of the environment (`--set env_settings.KEY=VALUE`)."""
    split: Literal["train", "test"] = "train"
    """Which of the environment's task lists to sample."""
    limit: int = setting(0, ge=0)
    """The first N tasks of the split (0: all)."""
    k: int = setting(4, ge=2, le=MAX_K)
    """Episodes sampled per task (2 to 10)."""
    overlap: int = setting(2, ge=1)
    """N: annotators who label each item."""
    agent: AgentLimits = field(default_factory=AgentLimits)
    """Episode limits: turns, tokens per episode, tokens per turn."""
    sampling: SamplingConfig = field(default_factory=lambda: SamplingConfig(temperature=0.8))
    """How turns are sampled (temperature 0 would make the K episodes identical; `max_new_tokens` comes
    from `agent`)."""
    seed: int = setting(0, ge=0)
    """Sampling seed: the same seed gives the same episodes (an endpoint: if it honours seeds)."""
    batch_size: int = setting(16, ge=1)
    """Episodes run together."""
    guidelines: str | None = None
    """Text file with the labelling guidelines (default: a short text on judging agents' behaviour)."""
    trust_remote_code: bool = False
    """Let transformers run the local policy's own code."""


def check(cfg: EpisodePrepareConfig) -> None:
    if (cfg.policy is None) == (cfg.endpoint is None):
        raise ConfigError("feedback prepare --env needs one model that acts: --policy DIR or --endpoint URL")
    if cfg.endpoint is not None and not cfg.endpoint.startswith(("http://", "https://")):
        raise ConfigError(
            f"--endpoint {cfg.endpoint}: expected the http(s) URL of an OpenAI-compatible server"
        )
    if cfg.policy is not None and cfg.policy.startswith(("/", ".", "~")) and not Path(cfg.policy).exists():
        raise ConfigError(f"--policy {cfg.policy}: no such model directory")
    if cfg.sampling.temperature <= 0:
        raise ConfigError("--temperature must be > 0: greedy decoding gives K identical episodes")


def env_tasks(cfg: EpisodePrepareConfig) -> tuple[Callable[[], Environment], list[Task], list[dict] | None]:
    """The environment maker, the tasks to sample (the split's first `limit`) and the tool schemas."""
    from rlhfkit.agents.registry import load_environment
    from rlhfkit.data.chat_tools import tool_schemas

    make_env = partial(load_environment, cfg.env, **cfg.env_settings)
    env = make_env()
    try:
        tasks = list(env.tasks(cfg.split))
        tools = tool_schemas(env.tools()) or None
    finally:
        env.close()
    if not tasks:
        raise ConfigError(f"env {cfg.env}: no {cfg.split} tasks")
    return make_env, tasks[: cfg.limit] if cfg.limit else tasks, tools


def sample_episodes(
    cfg: EpisodePrepareConfig, make_env: Callable[[], Environment], tasks: list[Task]
) -> list[list[Episode]]:
    """K episodes of each task (see the module docstring), with a progress bar."""
    from rlhfkit.console import progress

    run = local_runner(cfg, cfg.policy) if cfg.policy is not None else endpoint_runner(cfg, str(cfg.endpoint))
    runs: list[list[Episode]] = [[] for _ in tasks]
    jobs = [t for t in range(len(tasks)) for _ in range(cfg.k)]  # the task index of each episode
    with progress() as bar:
        shown = bar.add_task(f"feedback: episodes of {cfg.env}", total=len(jobs), status="")
        for lo in range(0, len(jobs), cfg.batch_size):
            chunk = jobs[lo : lo + cfg.batch_size]
            for t, episode in zip(chunk, run(make_env, [tasks[t] for t in chunk], lo), strict=True):
                runs[t].append(episode)
            bar.update(shown, advance=len(chunk))
    return runs


Runner = Callable[[Callable[[], Environment], list[Task], int], list[Episode]]
"""(make_env, tasks, index of the first episode) -> one episode per task."""


def local_runner(cfg: EpisodePrepareConfig, policy: str) -> Runner:
    """`agent-eval`'s local runner (the model loaded once, one seeded generator) with these settings."""
    from rlhfkit.evaluation.agent_eval import AgentEvalConfig
    from rlhfkit.evaluation.agent_eval import local_runner as eval_runner

    settings = AgentEvalConfig(
        policy=[policy], agent=cfg.agent, sampling=cfg.sampling, seed=cfg.seed,
        trust_remote_code=cfg.trust_remote_code,
    )  # fmt: skip
    run = eval_runner(settings, policy)
    return lambda make_env, tasks, first: run(make_env, tasks)


def endpoint_runner(cfg: EpisodePrepareConfig, url: str) -> Runner:
    """Episodes over the chat API; episode number i asks with seed `cfg.seed + i` (`EndpointLLM.chat` adds
    the conversation's index in a call to the seed it is given)."""
    from rlhfkit.chat.llm import EndpointLLM
    from rlhfkit.evaluation.agent_eval import chat_episodes

    llm = EndpointLLM(url)
    return lambda make_env, tasks, first: chat_episodes(
        llm, make_env, tasks, cfg.sampling, cfg.agent, cfg.seed + first
    )


def split_prompt(episode: Episode) -> tuple[list[dict[str, Any]], list[dict[str, Any]]] | None:
    """(prompt, the messages after it) of an episode; None if the agent never took a turn."""
    first = next((i for i, m in enumerate(episode.messages) if m.get("role") == "assistant"), None)
    if first is None:
        return None
    return episode.messages[:first], episode.messages[first:]


def task_item(
    cfg: EpisodePrepareConfig, task: Task, episodes: Sequence[Episode], tools: list[dict] | None
) -> tuple[NewEpisodeItem | None, Counter[str]]:
    """The task's distinct episodes as an item (None when fewer than two), and the reasons of the episodes
    that never took a turn (to explain an empty project)."""
    never: Counter[str] = Counter()
    prompt: list[dict[str, Any]] | None = None
    kept: dict[str, tuple[list[dict[str, Any]], dict[str, list[int]] | None, dict[str, Any], str]] = {}
    for episode in episodes:
        parts = split_prompt(episode)
        if parts is None:
            never[episode.reason or "no turn"] += 1
            continue
        if prompt is None:
            prompt = parts[0]
        if parts[0] != prompt:  # an environment whose reset differs between runs: keep the first prompt's
            continue
        tokens = None
        if episode.prompt_ids and episode.completion_ids:
            tokens = {"prompt_ids": list(episode.prompt_ids), "completion_ids": list(episode.completion_ids),
                      "loss_mask": list(episode.loss_mask)}  # fmt: skip
        outcome = {"reward": episode.reward, "reason": episode.reason, "turns": episode.turns}
        kept.setdefault(json.dumps(parts[1], sort_keys=True), (parts[1], tokens, outcome, model_name(cfg)))
    if prompt is None or len(kept) < 2:
        return None, never
    return NewEpisodeItem(prompt, tools, task.id, cfg.env, list(kept.values())), never


def model_name(cfg: EpisodePrepareConfig) -> str:
    return str(cfg.policy if cfg.policy is not None else cfg.endpoint)


def check_record(item: NewEpisodeItem) -> None:
    """Refuse a task whose episodes would not export as a valid trajectory record (e.g. an environment
    whose observations use a role the format does not allow), before anything is written."""
    from rlhfkit.data.checks import Source
    from rlhfkit.data.trajectories import trajectory_record

    episodes = [{"messages": m, **(t or {})} for m, t, _, _ in item.episodes]
    row = {
        "prompt": item.prompt,
        "tools": item.tools,
        "episodes": episodes,
        "ranking": list(range(len(episodes))),
    }
    try:
        trajectory_record(row, Source(f"env {item.env}", 0))
    except DataError as exc:
        raise RlhfkitError(
            f"env {item.env}, task {item.task_id}: its episodes do not make a trajectory record: "
            f"field '{exc.field}': {exc.message}"
        ) from None


def run_episode_prepare(cfg: EpisodePrepareConfig) -> dict[str, int]:
    """Check the settings, sample, store; returns counts (items stored, tasks dropped, episodes stored)."""
    from rlhfkit.feedback.episodes import create_episode_project
    from rlhfkit.feedback.store import open_db

    check(cfg)
    guidelines = DEFAULT_EPISODE_GUIDELINES
    if cfg.guidelines is not None:
        try:
            guidelines = Path(cfg.guidelines).read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise RlhfkitError(f"{cfg.guidelines}: cannot read the guidelines ({exc.strerror})") from None
    make_env, tasks, tools = env_tasks(cfg)  # a bad env name fails before the database or a model
    if Path(cfg.db).exists():  # fail before sampling, not after; a new file is made only to be written
        conn = open_db(cfg.db)
        held = conn.execute("SELECT count(*) FROM items").fetchone()[0]
        conn.close()
        if held:
            raise RlhfkitError(f"{cfg.db} already holds a labelling project; use a new --db file")
    never: Counter[str] = Counter()
    items = []
    for task, episodes in zip(tasks, sample_episodes(cfg, make_env, tasks), strict=True):
        item, unstarted = task_item(cfg, task, episodes, tools)
        never += unstarted
        if item is not None:
            check_record(item)
            items.append(item)
    if not items:
        why = (
            f" ({', '.join(f'{n} {r}' for r, n in never.items())} episodes never took a turn)"
            if never
            else ""
        )
        raise RlhfkitError(
            f"no task got two distinct episodes{why}; raise --temperature, agent.max_tokens or --k"
        )
    conn = open_db(cfg.db, create=True)
    try:
        create_episode_project(conn, items, cfg.overlap, guidelines)  # refuses a project made meanwhile
    finally:
        conn.close()
    return {
        "items": len(items),
        "dropped": len(tasks) - len(items),
        "episodes": sum(len(i.episodes) for i in items),
    }
