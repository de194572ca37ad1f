"""The HTML report of `rlhfkit pipeline --env` (`rlhfkit.agent_pipeline`): one self-contained page.

    from rlhfkit.evaluation.agent_pipeline_report import build_agent_report
    build_agent_report("runs/pipeline-support")      # -> report.html and plots/*.png in the run

It reads what the pipeline writes into the run directory (each part optional, a missing one is a note):
    pipeline.json                           stage timings, env, model, gold
    eval/agent_eval.json, eval/episodes.jsonl   `agent-eval` of sft, rl_env and rlhf on held-out tasks
    eval/paired.json                        paired differences, success and every value metric
    eval/selfplay.json, selfplay_games.jsonl    commons: each policy in every seat of a lake
    episodes/feedback.json                  the panel's rankings of the SFT policy's episodes
    sft/, rm/, rl_env/, rlhf/ metrics.jsonl     training curves

Every text a model or an environment wrote goes through `report.esc` (`agent_report.turn_html`); the page has
no script and a Content-Security-Policy that allows none (`report.page_html`).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rlhfkit.errors import RlhfkitError
from rlhfkit.evaluation.agent_report import turn_html
from rlhfkit.evaluation.report import (
    curves_plot,
    esc,
    figure,
    figure_html,
    fmt,
    note_html,
    page_html,
    png_bytes,
    read_metrics,
    series,
    table_html,
    timings_html,
)
from rlhfkit.fileio import write_atomic

LABELS = {"sft": "SFT", "rl_env": "RL on the env's return", "rlhf": "RLHF"}
SHOWN_TASKS = 3
"""Held-out tasks whose episodes are shown turn by turn (the first ones, not picked)."""
RL_KEYS = [
    ("score", "reward (what the run optimised)"),
    ("reward_env", "environment's return"),
    ("gold", "gold (the panel's preference)"),
    ("kl", "KL to the SFT policy (nats)"),
]
LAKE_KEYS = ("survival_months", "over_use", "total_catch", "equality", "efficiency")


def read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def label(model: str) -> str:
    """A policy's name in the report: its stage ("rlhf" -> "RLHF"), or the model as given."""
    name = Path(model).name
    return LABELS.get(name, model)


def cell(r: dict[str, Any], pct: bool = False) -> str:
    """value [low, high] of an interval record: a mean ("mean" or "success"), or a paired "difference"
    (signed; in percentage points with `pct`)."""
    if "difference" in r:
        scale, spec = (100.0, "+.1f") if pct else (1.0, "+.3f")
        low, high = f"{scale * r['low']:{spec}}", f"{scale * r['high']:{spec}}"
        return f"{scale * r['difference']:{spec}} [{low}, {high}]" + (" pts" if pct else "")
    value = r["mean"] if "mean" in r else r["success"]
    return f"{fmt(value, pct=pct)} [{fmt(r['low'], pct=pct)}, {fmt(r['high'], pct=pct)}]"


# ------------------------------------------------------------------------------------------ tables
def results_html(ev: dict[str, Any]) -> str:
    """Per policy: tasks, success and each value metric with its 95% interval, the mean return."""
    env = ev["envs"][0]
    results = {m: ev["results"][m][env] for m in ev["models"]}
    names = list(dict.fromkeys(n for r in results.values() for n in r["metrics"]))  # the env's order
    rows = []
    for model, r in results.items():
        metrics = [cell(r["metrics"][n]) if n in r["metrics"] else "—" for n in names]
        rows.append([esc(label(model)), str(r["n"]), cell(r, pct=True), *metrics, fmt(r["mean_reward"])])
    header = ["policy", "tasks", "success [95% CI]", *map(esc, names), "mean return"]
    return table_html(header, rows, numeric=range(1, len(header)))


def paired_html(paired: dict[str, dict[str, Any]]) -> str:
    """One row per comparison (other - base), one column per value: the paired difference and interval."""
    names = list(dict.fromkeys(n for values in paired.values() for n in values))
    rows = []
    for pair, values in paired.items():
        other, base = pair.split(" - ")
        cells = [cell(values[n], pct=n == "success") if n in values else "—" for n in names]
        rows.append([esc(f"{label(other)} − {label(base)}"), *cells])
    return table_html(["comparison", *map(esc, names)], rows, numeric=range(1, len(names) + 1))


def selfplay_html(sp: dict[str, Any]) -> str:
    rows = []
    for model, r in sp["results"].items():
        lakes = [cell(r["metrics"][k]) if k in r["metrics"] else "—" for k in LAKE_KEYS]
        survival = {"mean": r["survival_rate"], "low": r["survival_low"], "high": r["survival_high"]}
        rows.append([esc(label(model)), str(r["games"]), cell(survival, pct=True), *lakes])
    header = ["policy", "lakes", "survival rate [95% CI]", *LAKE_KEYS]
    parts = [table_html(header, rows, numeric=range(1, len(header)))]
    if sp.get("paired"):
        parts.append("<p class='meta'>Paired by lake:</p>" + paired_html(sp["paired"]))
    return "".join(parts)


def feedback_html(fb: dict[str, Any]) -> str:
    metrics = ", ".join(f"{k} {fmt(v)}" for k, v in fb.get("metrics", {}).items())
    text = (
        f"{fb['items']} ranked groups from {fb['episodes']} episodes of the SFT policy "
        f"({fb['tasks_skipped']} tasks skipped: fewer than two episodes the gold tells apart); the panel's "
        f"labels agree with the gold on {fmt(fb['label_agreement_with_gold'], pct=True)} of pairs; mean gold "
        f"{fmt(fb['mean_gold'])}. Value metrics of the sampled episodes: {metrics or 'none'}."
    )
    return f"<p>{esc(text)}</p>"


# ------------------------------------------------------------------------------------------ curves, episodes
def with_env_return(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """A run whose reward is the environment's return alone logs it as `score`: copy it to `reward_env`."""
    return [
        {**r, "reward_env": r["score"]} if "reward_env" not in r and "score" in r else dict(r) for r in rows
    ]


def runs_plot(runs: dict[str, list[dict[str, Any]]], keys: Sequence[tuple[str, str]]) -> bytes | None:
    """One panel per key that some run logged, every run's train series on it; None when none has any."""
    present = [(k, t) for k, t in keys if any(series(rows, k)[0] for rows in runs.values())]
    if not present:
        return None
    fig, axes = figure(len(present))
    for ax, (key, title) in zip(axes, present, strict=True):
        for name, rows in runs.items():
            steps, values = series(rows, key)
            if steps:
                ax.plot(steps, values, label=name, lw=1.4)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("iteration")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    return png_bytes(fig)


def episode_block(row: dict[str, Any]) -> str:
    """One episode of agent-eval's episodes.jsonl, collapsed, turn by turn; all text escaped."""
    metrics = ", ".join(f"{k} {fmt(v)}" for k, v in (row.get("metrics") or {}).items())
    outcome = "success" if row.get("success") else "no success"
    head = (f"{label(row['model'])}: {outcome}, return {fmt(row.get('reward'))}, {row.get('turns')} turns, "
            f"ended by {row.get('reason')}; {metrics}")  # fmt: skip
    turns = "".join(turn_html(m) for m in row.get("messages", []))
    return f"<details><summary>{esc(head)}</summary>{turns}</details>"


def episodes_html(rows: Sequence[dict[str, Any]]) -> str:
    tasks = list(dict.fromkeys(r["task_id"] for r in rows))[:SHOWN_TASKS]
    parts = []
    for task in tasks:
        mine = [r for r in rows if r["task_id"] == task]
        asked = next(
            (m.get("content", "") for m in mine[0].get("messages", []) if m.get("role") == "user"), ""
        )
        parts.append(f"<p class='prompt'>{esc(task)}: {esc(asked)}</p>")
        parts += [episode_block(r) for r in mine]
    return "".join(parts)


def games_html(games: Sequence[dict[str, Any]]) -> str:
    """The first lake each policy played in self-play: seat 0's conversation."""
    parts = []
    for g in games:
        if g.get("seat") == 0 and g["task_id"] == games[0]["task_id"]:
            head = (f"{label(g['model'])}, {g['task_id']}, seat 0: return {fmt(g.get('reward'))} (its catch "
                    f"in sustainable seasons), {g.get('turns')} months")  # fmt: skip
            turns = "".join(turn_html(m) for m in g.get("messages", []))
            parts.append(f"<details><summary>{esc(head)}</summary>{turns}</details>")
    return "".join(parts)


# ------------------------------------------------------------------------------------------ the report
def build_agent_report(run_dir: str | Path, output: str | Path | None = None) -> Path:
    """Write the agent pipeline's report (default RUN/report.html) and RUN/plots/*.png; returns its path."""
    run = Path(run_dir)
    if not run.is_dir():
        raise RlhfkitError(
            f"{run}: no such run directory (give the directory `rlhfkit pipeline --env` wrote)"
        )
    out = Path(output) if output is not None else run / "report.html"
    pipeline = read_json(run / "pipeline.json") or {}
    ev, paired = read_json(run / "eval" / "agent_eval.json"), read_json(run / "eval" / "paired.json")
    sp, fb = read_json(run / "eval" / "selfplay.json"), read_json(run / "episodes" / "feedback.json")
    episodes = read_metrics(run / "eval" / "episodes.jsonl")
    games = read_metrics(run / "eval" / "selfplay_games.jsonl")

    title = f"rlhfkit agent pipeline: {pipeline.get('env', '?')} ({run.resolve().name})"
    meta = " · ".join(f"{k}: {pipeline[k]}" for k in ("env", "model", "gold") if pipeline.get(k))
    body = [
        f"<h1>{esc(title)}</h1>",
        f"<p class='meta'>{esc(meta)}</p>",
        "<h2>Results on held-out tasks</h2>",
    ]
    if ev:
        body.append(results_html(ev))
        body.append(note_html(
            "Greedy episodes on the environment's test tasks. Success is the environment's ground truth; the "
            "value metrics are the means of each episode's metrics (0/1 ones are rates), with 95% normal "
            "intervals."))  # fmt: skip
    else:
        body.append(note_html("No eval/agent_eval.json in this run: the evaluation stage has not run."))
    if paired:
        body.append("<h2>Paired differences on the same tasks</h2>" + paired_html(paired))
        body.append(note_html(
            "Other minus base, task by task, with a 95% normal interval (success in percentage points): the "
            "tasks' difficulty cancels; an interval that excludes 0 is a difference beyond the draw of "
            "tasks."))  # fmt: skip
    if sp:
        body.append(f"<h2>Self-play: every seat is the policy ({sp['lakes']} lakes)</h2>" + selfplay_html(sp))
    body.append("<h2>Feedback on episodes</h2>")
    body.append(feedback_html(fb) if fb else note_html("No episodes/feedback.json in this run."))
    body.append("<h2>Stage timings</h2>" + timings_html(pipeline, ()))  # as they ran: pipeline.json's order

    plots: dict[str, tuple[bytes, str]] = {}
    rl = {LABELS[n]: with_env_return(read_metrics(run / n / "metrics.jsonl")) for n in ("rl_env", "rlhf")}
    figures = [
        ("rl_curves", runs_plot(rl, RL_KEYS), "Both RL runs, means over each iteration's episodes (training "
         "temperature): the reward each optimised, the environment's return, the gold it never saw, the KL."),
        ("rm_online", runs_plot(rl, [("rm_online_accuracy", "RM agreement with new labels")]),
         "RLHF with online feedback: the reward model's agreement with the panel's ranking of each new "
         "batch, before it learns from it."),
        ("sft_loss", curves_plot(read_metrics(run / "sft" / "metrics.jsonl"), [("loss", "SFT loss")]),
         "Cross-entropy per answer token of the demonstrations' turns."),
        ("rm_curves", curves_plot(read_metrics(run / "rm" / "metrics.jsonl"),
                                  [("loss", "RM loss"), ("accuracy", "pairwise accuracy")]),
         "Bradley-Terry loss and the share of episode pairs ordered like the panel."),
    ]  # fmt: skip
    body.append("<h2>Training curves</h2>")
    for name, png, caption in figures:
        if png is not None:
            plots[name] = (png, caption)
            body.append(figure_html(png, name, caption))
    if not plots:
        body.append(note_html("No training metrics in this run."))

    body.append("<h2>Episodes turn by turn</h2>")
    if episodes:
        body.append(
            f"<p class='meta'>The first {SHOWN_TASKS} held-out tasks, each policy's episode (not picked).</p>"
        )
        body.append(episodes_html(episodes))
    else:
        body.append(note_html("No eval/episodes.jsonl in this run."))
    if games:
        body.append("<h3>Self-play</h3>" + games_html(games))

    for name, (png, _) in plots.items():
        write_atomic(run / "plots" / f"{name}.png", png)
    write_atomic(out, page_html(title, body))
    return out
