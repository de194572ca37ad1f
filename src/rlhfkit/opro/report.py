"""report.html of an OPRO run: the paper's figure (every proposal's score by step, and the best so far), the
optimizer against random search at equal evaluations, the results table and the final meta-prompt.

The page is built with the pipeline report's parts (`rlhfkit.evaluation.report`): self-contained, no
script, every model-written text escaped.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

from rlhfkit.evaluation.report import esc, figure, figure_html, fmt, page_html, png_bytes, table_html
from rlhfkit.fileio import write_atomic
from rlhfkit.opro.task import Task, best_score


def _best_so_far(scores: list[float], higher: bool) -> list[float]:
    out: list[float] = []
    for s in scores:
        out.append(s if not out else (max(out[-1], s) if higher else min(out[-1], s)))
    return out


def progress_plot(task: Task, history: Any, baseline: list[float]) -> bytes:
    entries = history.entries
    fig, (by_step, by_eval) = figure(2)
    by_step.scatter(
        [e["step"] for e in entries], [e["score"] for e in entries], s=8, alpha=0.5, label="proposal"
    )
    steps = sorted({e["step"] for e in entries})
    best = [best_score(task, [e for e in entries if e["step"] <= s]) for s in steps]
    by_step.plot(steps, best, color="C3", label="best so far")
    by_step.set_xlabel("step")
    by_step.set_ylabel("score" if task.higher_is_better else "objective (lower is better)")
    llm_scores = [e["score"] for e in entries if e["step"] > 0]
    by_eval.plot(range(1, len(llm_scores) + 1), _best_so_far(llm_scores, task.higher_is_better), label="LLM")
    by_eval.plot(range(1, len(baseline) + 1), baseline, label="random search")
    by_eval.set_xlabel("scored solutions")
    by_eval.set_ylabel("best so far")
    if not task.higher_is_better and min(e["score"] for e in entries) > 0:
        by_step.set_yscale("log")
        by_eval.set_yscale("log")
    for ax in (by_step, by_eval):
        ax.legend(fontsize=8)
    return png_bytes(fig)


def _instance(task: Task) -> str:
    described = task.describe()
    return ", ".join(f"{k} {v}" for k, v in described.items() if k not in ("points", "optimum", "heuristics"))


def write_report(out: Path, cfg: Any, task: Task, history: Any, result: dict[str, Any]) -> Path:
    baseline = result["random_search"]["curve"]
    rows = [
        ["steps", str(result["steps"])],
        ["solutions scored (unique, valid)", str(result["scored"])],
        ["malformed / duplicate proposals", f"{result['malformed']} / {result['duplicates']}"],
        ["best found", f"{fmt(result['best']['score'], 6)} at {esc(result['best']['solution'])}"],
        [
            "best start / best proposal",
            f"{fmt(result['start_best'], 6)} / {fmt(result['proposals_best'], 6)}",
        ],
        ["optimum reached", f"step {result['optimum_step']}" if result["optimum_found"] else "no"],
        [
            "random search at equal evaluations from the same starts, best",
            fmt(result["random_search"]["best"], 6),
        ],
    ]
    for name, accuracy in result.get("test_accuracy", {}).items():
        rows.append([f"held-out accuracy: {esc(name)}", f"{accuracy:.1f}%"])
    if "gap" in result:
        gaps = f"{fmt(result['gap'], 3, pct=True)} / {fmt(result['random_search']['gap'], 3, pct=True)}"
        rows.append(["optimality gap (LLM / random search)", gaps])
        for name, gap in result["instance"]["heuristic_gaps"].items():
            rows.append([f"gap of {name.replace('_', ' ')}", fmt(gap, 3, pct=True)])
    title = f"OPRO {task.name}: {cfg.optimizer}"
    shown = history.best(task, task.max_shown)
    meta_prompt = task.meta_prompt(shown, random.Random(cfg.seed * 7919 + history.step + 1))
    body = [
        f"<h1>{esc(title)}</h1>",
        f"<p class='meta'>{esc(_instance(task))}</p>",
        "<h2>Results</h2>",
        table_html(["", "value"], rows),
        "<h2>Progress</h2>",
        figure_html(
            progress_plot(task, history, baseline),
            "progress",
            "Left: every scored proposal by step (step 0: the starting solutions) and the best so far. "
            "Right: best so far against the number of scored solutions, the LLM against uniformly random "
            "solutions.",
        ),
        "<h2>The last meta-prompt</h2>",
        f"<pre>{esc(meta_prompt)}</pre>",
    ]
    path = out / "report.html"
    write_atomic(path, page_html(title, body))
    return path
