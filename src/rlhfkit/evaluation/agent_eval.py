"""`rlhfkit agent-eval`: models acting in environments, AgentBench style (Liu et al. 2023, arXiv:2308.03688).

    rlhfkit agent-eval --policy runs/agent --policy runs/sft --envs calc,db,os --set limit=50
    rlhfkit agent-eval --endpoint http://127.0.0.1:8000/v1 --envs my_envs:Calculator

Each environment's test tasks (the first `limit`) are run once per model: a local model (`--policy`) with
the token-level episode runner (`agents.episode`, batched, greedy by default), an OpenAI-compatible server
(`--endpoint`) through `llm.EndpointLLM.chat` with `tools=`, its tool calls read from the reply.

Per environment and model: the success rate with a 95% normal interval (`evaluate.win_rate` over 0/1
outcomes: a success is the last step's `info["success"]` when the environment gives it, else a return of at
least `success_threshold`), the mean return, turns and tokens, the count of each end reason, and the
environment's value metrics: each number of the last step's `info["metrics"]` averaged over the episodes,
with its 95% interval (`value_metrics`).

The overall score is AgentBench's: each environment's weight is the inverse of the mean success of the
models compared in this run, and a model's score is the mean over environments of success x weight (1.0: an
average model of this run). An environment no model solved has no weight and is left out. With a single
model every weight is 1 / its own success, so its overall score is 1.0 by construction: the report says so.

With several models, each later one is also compared with the first on the same tasks: the paired
difference of success with its 95% interval (`paired_difference`), the measure of a training step's gain.

Written to `output`: agent_eval.json (settings, per-environment results, weights, overall scores, paired),
episodes.jsonl (every episode, turn by turn, with its success and value metrics) and report.html.
"""

from __future__ import annotations

import json
import statistics
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any

import torch

from rlhfkit.agents.env import Environment, Task
from rlhfkit.agents.episode import AgentLimits, Episode, EpisodeState, run_episodes
from rlhfkit.agents.registry import load_environment
from rlhfkit.chat.llm import LLM, Completion
from rlhfkit.config import claim_run_dir, setting, to_dict
from rlhfkit.console import console, progress
from rlhfkit.errors import ConfigError, RlhfkitError
from rlhfkit.evaluation.evaluate import mean_and_stderr, win_rate
from rlhfkit.fileio import write_atomic
from rlhfkit.rollout.engine import SamplingConfig


@dataclass
class AgentEvalConfig:
    """Settings of `rlhfkit agent-eval`."""

    policy: list[str] = field(default_factory=list)
    """Local models (directories or registered names); several are compared (the overall score)."""
    endpoint: list[str] = field(default_factory=list)
    """OpenAI-compatible servers (their /v1 URL), asked through the chat API with tools."""
    envs: list[str] = field(default_factory=list)
    """Environments: bundled names or `module:Class` (`--envs calc,db,os`)."""
    env_settings: dict[str, Any] = field(default_factory=dict)
    """Keyword arguments per environment: {name: {key: value}}."""
    limit: int = setting(0, ge=0)
    """The first N test tasks of each environment (0: all)."""
    agent: AgentLimits = field(default_factory=AgentLimits)
    """Episode limits: turns, tokens per episode (an endpoint: generated tokens), tokens per turn."""
    sampling: SamplingConfig = field(default_factory=lambda: SamplingConfig(temperature=0.0))
    """How turns are sampled (greedy by default; `max_new_tokens` comes from `agent`)."""
    success_threshold: float = 1.0
    """A return at least this large is a success (when the environment's info has no "success")."""
    batch_size: int = setting(32, ge=1)
    """Episodes run together."""
    seed: int = setting(0, ge=0)
    """Sampling seed (only matters with temperature > 0)."""
    show_episodes: int = setting(5, ge=0)
    """Episodes per model and environment shown turn by turn in the report."""
    trust_remote_code: bool = False
    """Let transformers run the local models' own code."""
    output: str = "runs/agent_eval"
    """Output directory: agent_eval.json, episodes.jsonl, report.html."""


def chat_episodes(
    llm: LLM,
    make_env: Callable[[], Environment],
    tasks: Sequence[Task],
    sampling: SamplingConfig,
    limits: AgentLimits,
    seed: int | None = None,
) -> list[Episode]:
    """Episodes through `llm.chat` (text in, text out): every running episode asks for its next turn in one
    call; the tool calls come back parsed (`Completion.tool_calls`). `max_tokens` counts generated tokens
    (a chat API does not say how long the rendered prompt was); a turn cut at it ends the episode. A request
    the server refuses ends that episode with reason "llm_error" (`ask`)."""
    states: list[EpisodeState] = []
    config = replace(sampling, max_new_tokens=limits.max_new_tokens, stop_at_eos=True)
    try:
        for task in tasks:
            states.append(EpisodeState(make_env(), task))
        active = [s for s in states if s.open()]
        while active:
            by_tools: dict[str, list[EpisodeState]] = {}
            for s in active:  # one call per set of tools (normally one: the environment's)
                by_tools.setdefault(json.dumps(s.tools, sort_keys=True), []).append(s)
            for group in by_tools.values():
                for state, reply in zip(group, ask(llm, group, config, seed), strict=True):
                    if reply is None:
                        continue
                    state.tokens += reply.tokens
                    if reply.finish_reason == "length" and state.tokens >= limits.max_tokens:
                        state.turns += 1
                        state.messages.append({"role": "assistant", "content": reply.text})
                        state.end("max_tokens")
                        continue
                    state.act(reply.text, reply.tool_calls, limits.max_turns)
                    if state.reason is None and state.tokens >= limits.max_tokens:
                        state.end("max_tokens")
            active = [s for s in active if s.reason is None]
    finally:
        for s in states:
            try:
                s.env.close()
            except Exception as exc:
                s.error = s.error or f"close: {type(exc).__name__}: {exc}"
    return [s.episode() for s in states]


def ask(
    llm: LLM, group: list[EpisodeState], config: SamplingConfig, seed: int | None
) -> list[Completion | None]:
    """The next turn of each episode of `group` (one set of tools) in one call. If the call fails (a server
    refuses a request: e.g. a conversation grown past its context), each is asked alone and an episode whose
    own request fails ends with reason "llm_error" and the server's message (None in its place)."""
    tools = group[0].tools
    try:
        return [r[0] for r in llm.chat([s.messages for s in group], config, 1, seed, tools=tools)]
    except RlhfkitError as exc:
        if len(group) == 1:
            group[0].end("llm_error", str(exc))
            return [None]
    replies: list[Completion | None] = []
    for state in group:
        try:
            replies.append(llm.chat([state.messages], config, 1, seed, tools=tools)[0][0])
        except RlhfkitError as exc:
            state.end("llm_error", str(exc))
            replies.append(None)
    return replies


# ------------------------------------------------------------------------------------------ scoring
def succeeded(episode: Episode, threshold: float) -> bool:
    """The environment's own verdict (`info["success"]`) if it gives one, else return >= threshold."""
    verdict = episode.info.get("success")
    return bool(verdict) if isinstance(verdict, bool) else episode.reward >= threshold


def value_metrics(
    infos: Sequence[Mapping[str, Any]], confidence: float = 0.95
) -> dict[str, dict[str, float]]:
    """The environment's own metrics in episodes' last infos (`info["metrics"]`, {name: number}, e.g.
    `commons`' survival and over-use): for each name, its mean over the infos that report it, with the
    normal interval mean +- z s / sqrt(n), and n."""
    values: dict[str, list[float]] = {}
    for info in infos:
        for name, value in (info.get("metrics") or {}).items():
            if isinstance(value, (int, float)):
                values.setdefault(name, []).append(float(value))
    z = statistics.NormalDist().inv_cdf(0.5 + confidence / 2)
    out = {}
    for name, xs in values.items():
        mean, se = mean_and_stderr(xs)
        out[name] = {"mean": mean, "low": mean - z * se, "high": mean + z * se, "stderr": se, "n": len(xs)}
    return out


def summarize(episodes: Sequence[Episode], threshold: float) -> dict[str, Any]:
    """Success rate with its 95% interval, mean return / turns / tokens, end reasons, and the environment's
    value metrics (`value_metrics`, {} when it reports none) of one model x env."""
    outcomes = [1.0 if succeeded(e, threshold) else 0.0 for e in episodes]
    rate = win_rate(outcomes)
    n = len(episodes)
    return {
        "n": n, "successes": rate.wins, "success": rate.rate, "low": rate.low, "high": rate.high,
        "stderr": rate.stderr, "mean_reward": sum(e.reward for e in episodes) / n,
        "mean_turns": sum(e.turns for e in episodes) / n, "mean_tokens": sum(e.tokens for e in episodes) / n,
        "reasons": dict(Counter(e.reason for e in episodes).most_common()),
        "metrics": value_metrics([e.info for e in episodes]),
    }  # fmt: skip


def paired_difference(
    base: Sequence[Episode], other: Sequence[Episode], threshold: float, confidence: float = 0.95
) -> dict[str, Any]:
    """Success of `other` minus `base` on the same tasks (matched by task id): the mean of d_i in {-1, 0, 1}
    with a normal interval mean +- z s / sqrt(n) (s: sample sd of the d_i), and the tasks each one won alone.
    Tighter than comparing the two models' intervals: the tasks' difficulty cancels."""
    mine = {e.task_id: float(succeeded(e, threshold)) for e in base}
    theirs = {e.task_id: float(succeeded(e, threshold)) for e in other}
    return paired_values(mine, theirs, confidence, worst_sd=1.0)


def paired_values(
    base: Mapping[str, float], other: Mapping[str, float], confidence: float = 0.95, worst_sd: float = 0.0
) -> dict[str, Any]:
    """`other` minus `base` over the keys (tasks) both have, as `paired_difference` (any per-task value: a
    value metric, a self-play lake's survival); `worst_sd` stands in for the sd of a single difference."""
    d = [value - base[key] for key, value in other.items() if key in base]
    if not d:
        raise ValueError("paired_difference: the two runs share no task")
    mean, se = mean_and_stderr(d, worst_sd=worst_sd)
    z = statistics.NormalDist().inv_cdf(0.5 + confidence / 2)
    return {"n": len(d), "difference": mean, "low": mean - z * se, "high": mean + z * se, "stderr": se,
            "won": sum(x > 0 for x in d), "lost": sum(x < 0 for x in d)}  # fmt: skip


def overall_scores(
    success: dict[str, dict[str, float]],
) -> tuple[dict[str, float | None], dict[str, float | None]]:
    """AgentBench's overall score from success[model][env]: (score per model, weight per env).

    weight_e = 1 / mean_m success[m][e] (None when no model succeeded: the env is left out);
    score_m = mean over weighted envs of success[m][e] x weight_e (None when no env has a weight).

    Equivalent to: for each env, divide every model's success by the models' mean success; average."""
    models = list(success)
    envs = list(next(iter(success.values()))) if success else []
    weights: dict[str, float | None] = {}
    for env in envs:
        mean = sum(success[m][env] for m in models) / len(models)
        weights[env] = 1.0 / mean if mean > 0 else None
    scored = [e for e in envs if weights[e] is not None]
    overall: dict[str, float | None] = {
        m: (sum(success[m][e] * (weights[e] or 0.0) for e in scored) / len(scored) if scored else None)
        for m in models
    }
    return overall, weights


# ------------------------------------------------------------------------------------------ running
def env_maker(cfg: AgentEvalConfig, name: str) -> Callable[[], Environment]:
    settings = cfg.env_settings.get(name, {})
    if not isinstance(settings, dict):
        raise ConfigError(f"env_settings.{name}: expected a mapping of keyword arguments, got {settings!r}")
    return partial(load_environment, name, **settings)


def eval_tasks(cfg: AgentEvalConfig, name: str) -> list[Task]:
    env = env_maker(cfg, name)()
    try:
        tasks = list(env.tasks("test"))
    finally:
        env.close()
    if not tasks:
        raise ConfigError(f"env {name}: no test tasks")
    return tasks[: cfg.limit] if cfg.limit else tasks


def check(cfg: AgentEvalConfig) -> None:
    if not cfg.policy and not cfg.endpoint:
        raise ConfigError("agent-eval needs a model: --policy DIR (repeatable) or --endpoint URL")
    if not cfg.envs:
        raise ConfigError("agent-eval needs environments: --envs calc,db,os (names or module:Class)")
    names = cfg.policy + cfg.endpoint
    if len(set(names)) != len(names):
        raise ConfigError(f"a model is named twice: {names}")
    if len(set(cfg.envs)) != len(cfg.envs):
        raise ConfigError(f"an environment is named twice: {cfg.envs}")
    for policy in cfg.policy:  # a missing directory is refused before anything is written
        if policy.startswith(("/", ".", "~")) and not Path(policy).expanduser().exists():
            raise ConfigError(f"policy {policy}: no such model directory")
    for url in cfg.endpoint:
        if not url.startswith(("http://", "https://")):
            raise ConfigError(
                f"endpoint {url}: expected the http(s) URL of an OpenAI-compatible server (/v1)"
            )


def local_runner(cfg: AgentEvalConfig, policy: str) -> Callable[..., list[Episode]]:
    from rlhfkit.models.loading import context_length, load_causal_lm
    from rlhfkit.rollout.engine import RolloutEngine

    model, tokenizer = load_causal_lm(policy, trust_remote_code=cfg.trust_remote_code)
    model.requires_grad_(False).eval()
    if cfg.agent.max_tokens > (context := context_length(model)):
        raise ConfigError(f"agent.max_tokens={cfg.agent.max_tokens} exceeds {policy}'s context, {context}")
    engine = RolloutEngine(model, tokenizer)
    generator = torch.Generator().manual_seed(cfg.seed)

    def run(make_env: Callable[[], Environment], tasks: list[Task]) -> list[Episode]:
        return run_episodes(engine, make_env, tasks, cfg.sampling, cfg.agent, generator)

    return run


def endpoint_runner(cfg: AgentEvalConfig, url: str) -> Callable[..., list[Episode]]:
    from rlhfkit.chat.llm import EndpointLLM

    llm = EndpointLLM(url)

    def run(make_env: Callable[[], Environment], tasks: list[Task]) -> list[Episode]:
        return chat_episodes(llm, make_env, tasks, cfg.sampling, cfg.agent, cfg.seed)

    return run


def run_agent_eval(cfg: AgentEvalConfig) -> dict[str, Any]:
    """Check the settings and every environment's tasks, then run and score each model; see the module
    docstring. Returns what agent_eval.json holds."""
    from rlhfkit.evaluation.agent_report import agent_report_html

    check(cfg)
    tasks = {name: eval_tasks(cfg, name) for name in cfg.envs}  # bad env names fail before any model loads
    out = Path(cfg.output)
    claim_run_dir(cfg, out)
    models = [(p, partial(local_runner, cfg, p)) for p in cfg.policy]
    models += [(u, partial(endpoint_runner, cfg, u)) for u in cfg.endpoint]
    results: dict[str, dict[str, Any]] = {}
    episodes: dict[str, dict[str, list[Episode]]] = {}
    lines: list[str] = []
    with progress() as bar:
        for model, build in models:
            runner = build()
            results[model], episodes[model] = {}, {}
            for name in cfg.envs:
                task = bar.add_task(
                    f"{Path(model).name or model} / {name}", total=len(tasks[name]), status=""
                )
                done: list[Episode] = []
                for lo in range(0, len(tasks[name]), cfg.batch_size):
                    done += runner(env_maker(cfg, name), tasks[name][lo : lo + cfg.batch_size])
                    bar.update(task, completed=len(done))
                episodes[model][name], results[model][name] = done, summarize(done, cfg.success_threshold)
                lines += [
                    json.dumps({"model": model, "env": name, "success": succeeded(e, cfg.success_threshold),
                                "metrics": e.info.get("metrics") or {}, **e.to_json()}, ensure_ascii=False)
                    for e in done
                ]  # fmt: skip
    success = {m: {e: r["success"] for e, r in envs.items()} for m, envs in results.items()}
    overall, weights = overall_scores(success)
    note = (
        "One model: every weight is 1 / its own success, so its overall score is 1.0 by construction; "
        "compare models in one run (--policy A --policy B) for a meaningful overall score."
        if len(results) == 1
        else f"Weights: 1 / the mean success of the {len(results)} models of this run in each environment."
    )
    first = next(iter(episodes))
    paired = {
        m: {e: paired_difference(episodes[first][e], episodes[m][e], cfg.success_threshold) for e in cfg.envs}
        for m in list(episodes)[1:]
    }
    report = {
        "models": list(results), "envs": list(cfg.envs), "results": results, "weights": weights,
        "overall": overall, "overall_note": note, "paired_vs": first, "paired": paired,
        "settings": to_dict(cfg),
    }  # fmt: skip
    write_atomic(out / "episodes.jsonl", "".join(line + "\n" for line in lines))
    write_atomic(out / "agent_eval.json", json.dumps(report, indent=2) + "\n")
    write_atomic(out / "report.html", agent_report_html(report, episodes, cfg.show_episodes))
    for model in results:
        score = overall[model]
        per_env = [
            f"{e} {r['success']:.1%} [{r['low']:.1%}, {r['high']:.1%}]" for e, r in results[model].items()
        ]
        console.print(f"{model}: overall {'—' if score is None else f'{score:.3f}'}; {', '.join(per_env)}")
    for model, envs in paired.items():
        per_env = [f"{e} {d['difference']:+.1%} [{d['low']:+.1%}, {d['high']:+.1%}]" for e, d in envs.items()]
        console.print(f"{model} - {first}, same tasks: {', '.join(per_env)}")
    return report
