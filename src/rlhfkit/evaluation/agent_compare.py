"""Agents side by side on the same held-out tasks: paired differences of success and of every value metric,
and on `commons` self-play; the evaluation stage of `rlhfkit pipeline --env` (`rlhfkit.agent_pipeline`).

    rows = [json.loads(line) for line in open("runs/x/eval/episodes.jsonl")]  # written by agent-eval
    paired = paired_metrics(rows, "support", {"sft": "runs/x/sft", "rlhf": "runs/x/rlhf"}, [("rlhf", "sft")])
    games = selfplay_comparison({"sft": "runs/x/sft", "rlhf": "runs/x/rlhf"}, tasks, sampling, seed=0)

A paired difference is taken task by task (`agent_eval.paired_values`: the mean of d_i = other_i - base_i
with a 95% normal interval), so the tasks' difficulty cancels: the test of whether a training step changed
success, or a value metric such as the deception rate, beyond the noise of which tasks were drawn. Value
metrics are the numbers of each episode's last `info["metrics"]` (0 / 1 for `support`'s rates).

Self-play (`evaluation.commons_selfplay`): every seat of each lake is the policy, greedy unless `sampling`
says otherwise; a lake is one paired unit (its survival, over-use, total catch, equality and efficiency).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from rlhfkit.agents.env import Task
from rlhfkit.console import console
from rlhfkit.evaluation.agent_eval import paired_values
from rlhfkit.fileio import write_atomic
from rlhfkit.rollout.engine import SamplingConfig

SUCCESS = "success"
SHOWN_GAMES = 2
"""Lakes per policy whose seats' conversations are kept for the report."""


def per_task_values(rows: Sequence[Mapping[str, Any]], model: str, env: str) -> dict[str, dict[str, float]]:
    """{value name: {task id: value}} of one model's episodes in one environment (rows of agent-eval's
    episodes.jsonl): "success" (0 / 1) and each number of the episode's `metrics`."""
    values: dict[str, dict[str, float]] = {SUCCESS: {}}
    for row in rows:
        if row.get("model") != model or row.get("env") != env:
            continue
        values[SUCCESS][row["task_id"]] = float(bool(row.get("success")))
        for name, value in (row.get("metrics") or {}).items():
            if isinstance(value, (int, float)):
                values.setdefault(name, {})[row["task_id"]] = float(value)
    return values


def paired_metrics(
    rows: Sequence[Mapping[str, Any]],
    env: str,
    models: Mapping[str, str],
    pairs: Sequence[tuple[str, str]],
) -> dict[str, dict[str, dict[str, Any]]]:
    """{"other - base": {value name: paired difference}} for each (other, base) of `pairs`, labels of
    `models` ({label: the model's name in the rows}); a value one of the two lacks is left out."""
    values = {label: per_task_values(rows, model, env) for label, model in models.items()}
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for other, base in pairs:
        names = [n for n in values[other] if n in values[base] and values[other][n] and values[base][n]]
        out[f"{other} - {base}"] = {
            name: paired_values(
                values[base][name], values[other][name], worst_sd=1.0 if name == SUCCESS else 0.0
            )
            for name in names
        }
    return out


def selfplay_comparison(
    policies: Mapping[str, str],
    tasks: Sequence[Task],
    sampling: SamplingConfig,
    seed: int,
    pairs: Sequence[tuple[str, str]] = (),
    env_settings: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Each policy ({label: model directory}) plays every lake of `tasks` in every seat: per policy the
    survival rate and lake metrics with their intervals (`summarize_games`), the paired differences of the
    lake metrics for `pairs`, and the seats' conversations of the first `SHOWN_GAMES` lakes."""
    from rlhfkit.agents.commons import CommonsEnvironment
    from rlhfkit.chat.llm import LocalLLM
    from rlhfkit.evaluation.commons_selfplay import self_play, summarize_games

    env = CommonsEnvironment(**(env_settings or {}))
    summaries: dict[str, Any] = {}
    lakes: dict[str, dict[str, dict[str, float]]] = {}
    shown: list[dict[str, Any]] = []
    for label, policy in policies.items():
        games = self_play(LocalLLM(policy), tasks, sampling, seed, env)
        summaries[label] = summarize_games(games)
        lakes[label] = {}
        for game in games:
            for name, value in game.info["metrics"].items():
                lakes[label].setdefault(name, {})[game.task_id] = float(value)
        for game in games[:SHOWN_GAMES]:
            shown += [{"model": label, "task_id": game.task_id, "seat": seat, **episode.to_json()}
                      for seat, episode in enumerate(game.seats)]  # fmt: skip
    paired = {
        f"{other} - {base}": {
            name: paired_values(lakes[base][name], lakes[other][name]) for name in lakes[other]
        }
        for other, base in pairs
    }
    return {"lakes": len(tasks), "results": summaries, "paired": paired, "games": shown}


def write_comparison(
    out: Path,
    env: str,
    models: Mapping[str, str],
    pairs: Sequence[tuple[str, str]],
    selfplay_tasks: Sequence[Task],
    sampling: SamplingConfig,
    seed: int,
    env_settings: Mapping[str, Any] | None = None,
) -> None:
    """After `agent-eval` of `models` ({label: model}) wrote OUT/episodes.jsonl: OUT/paired.json (`pairs`),
    and with self-play tasks OUT/selfplay.json and OUT/selfplay_games.jsonl; the differences are printed."""
    rows = [json.loads(x) for x in (out / "episodes.jsonl").read_text(encoding="utf-8").splitlines()]
    paired = paired_metrics(rows, env, models, pairs)
    write_atomic(out / "paired.json", json.dumps(paired, indent=2))
    for pair, values in paired.items():
        shown = [f"{k} {v['difference']:+.3f} [{v['low']:+.3f}, {v['high']:+.3f}]" for k, v in values.items()]
        console.print(f"{pair}: {', '.join(shown)}")
    if not selfplay_tasks:
        return
    games = selfplay_comparison(models, selfplay_tasks, sampling, seed, pairs, env_settings)
    shown_games = games.pop("games")
    write_atomic(
        out / "selfplay_games.jsonl", "".join(json.dumps(g, ensure_ascii=False) + "\n" for g in shown_games)
    )
    write_atomic(out / "selfplay.json", json.dumps(games, indent=2))
    for label, r in games["results"].items():
        over_use = r["metrics"]["over_use"]["mean"]
        console.print(
            f"self-play {label}: survival {r['survival_rate']:.1%} [{r['survival_low']:.1%}, "
            f"{r['survival_high']:.1%}], over-use {over_use:.1%}"
        )
