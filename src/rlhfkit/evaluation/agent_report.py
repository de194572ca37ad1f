"""The HTML page of `rlhfkit agent-eval`: overall scores, per-environment results, episodes turn by turn.
Every text a model or an environment wrote goes through `report.esc`; the page has no script."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from rlhfkit.agents.episode import Episode
from rlhfkit.evaluation.report import esc, fmt, note_html, page_html, table_html


def interval(r: dict[str, Any]) -> str:
    return f"{fmt(r['success'], pct=True)} [{fmt(r['low'], pct=True)}, {fmt(r['high'], pct=True)}]"


def paired_cell(d: dict[str, Any]) -> str:
    return f"{d['difference']:+.1%} [{d['low']:+.1%}, {d['high']:+.1%}] ({d['won']} won, {d['lost']} lost)"


def turn_html(message: dict[str, Any]) -> str:
    """One message: its role, its text, and its tool calls (name and arguments), all escaped."""
    role = message.get("role", "")
    who = f"{role} {message['name']}" if role == "tool" and message.get("name") else role
    calls = "".join(
        f"\n→ {c['function']['name']}({c['function']['arguments']})" for c in message.get("tool_calls") or []
    )
    return (
        f"<div><b>{esc(who)}</b><div class='answer'>{esc((message.get('content') or '') + calls)}</div></div>"
    )


def episode_html(episode: Episode) -> str:
    head = (f"{episode.task_id}: return {fmt(episode.reward)}, {episode.turns} turns, "
            f"{episode.tokens} tokens, ended by {episode.reason}")  # fmt: skip
    head += f" ({episode.error})" if episode.error else ""
    return (
        f"<details><summary>{esc(head)}</summary>{''.join(turn_html(m) for m in episode.messages)}</details>"
    )


def agent_report_html(
    report: dict[str, Any], episodes: dict[str, dict[str, list[Episode]]], show: int
) -> str:
    models, envs, results = report["models"], report["envs"], report["results"]
    meta = f"<p class='meta'>{esc(', '.join(models))} in {esc(', '.join(envs))}</p>"
    body = ["<h1>Agent evaluation</h1>", meta, "<h2>Overall</h2>"]
    rows = [[esc(m), fmt(report["overall"][m])] + [interval(results[m][e]) for e in envs] for m in models]
    weights = ["weight", "—"] + [fmt(report["weights"][e]) for e in envs]
    body.append(
        table_html(["model", "overall", *map(esc, envs)], [*rows, weights], numeric=range(1, len(envs) + 2))
    )
    body.append(note_html(
        "Success rates with 95% normal intervals. Overall (AgentBench): the mean over environments of "
        "success x weight, the weight being 1 / the mean success of the models of this run (an environment "
        f"no model solved is left out). {report['overall_note']}"))  # fmt: skip
    if report.get("paired"):
        body.append(f"<h2>Paired differences vs {esc(report['paired_vs'])}</h2>")
        rows = [[esc(m)] + [paired_cell(d[e]) for e in envs] for m, d in report["paired"].items()]
        body.append(table_html(["model", *map(esc, envs)], rows, numeric=range(1, len(envs) + 1)))
        body.append(note_html(
            "Success minus the first model's on the same tasks, with its 95% normal interval, and the "
            "tasks each one solved alone: the tasks' difficulty cancels, so this is the test of a gain."
        ))  # fmt: skip
    for env in envs:
        body.append(f"<h2>{esc(env)}</h2>")
        header = [
            "model",
            "tasks",
            "success [95% CI]",
            "mean return",
            "mean turns",
            "mean tokens",
            "end reasons",
        ]
        rows = []
        for m in models:
            r = results[m][env]
            reasons = ", ".join(f"{k}: {v}" for k, v in r["reasons"].items())
            rows.append([esc(m), str(r["n"]), interval(r), fmt(r["mean_reward"]), fmt(r["mean_turns"], 2),
                         fmt(r["mean_tokens"], 1), esc(reasons)])  # fmt: skip
        body.append(table_html(header, rows, numeric=range(1, 6)))
        for m in models:
            shown: Sequence[Episode] = episodes[m][env][:show]
            if shown:
                body.append(f"<p class='prompt'>{esc(m)}: the first {len(shown)} episodes</p>")
                body += [episode_html(e) for e in shown]
    return page_html("Agent evaluation", body)
