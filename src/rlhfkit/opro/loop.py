"""The OPRO loop (Yang et al. 2023, "Large Language Models as Optimizers"): the LLM reads a meta-prompt
holding the best solutions so far with their scores, proposes new ones, they are scored and join the history.

    rlhfkit opro linreg --optimizer smollm2-135m-instruct --output runs/opro-linreg
    rlhfkit opro tsp --optimizer http://127.0.0.1:8000/v1 --set tsp.n=10 --set steps=100

Each step (as in the paper's code):
 1. the meta-prompt shows the task's best `max_shown` past solutions, worst first and best last, with scores;
 2. the optimizer samples `proposals` (8) answers at temperature 1.0, one conversation with n = 8;
 3. each answer is parsed; a malformed one, or one equal to a solution already scored, is counted and not
    scored (the paper's code re-samples malformed TSP traces; we count them, so every step costs the same);
 4. the new solutions are scored and join the history; the loop ends early at the task's optimum.
A baseline runs at the end with the same number of scored solutions: random search for every task (and the
task's own heuristics for TSP), so the report shows whether the LLM beat chance.

Exact resume: the state (history, counters, step) is written atomically after every step and the sampler
is seeded from (seed, step), so a run killed and started again ends as an uninterrupted one.
"""

from __future__ import annotations

import json
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from rlhfkit.chat.llm import LLM, load_llm
from rlhfkit.config import claim_run_dir, setting
from rlhfkit.console import console, progress
from rlhfkit.errors import ConfigError
from rlhfkit.fileio import write_atomic
from rlhfkit.models.loading import DEFAULT_MODEL
from rlhfkit.opro.linreg import LinearRegression, LinRegSettings
from rlhfkit.opro.prompt import PromptOptimisation, PromptSettings
from rlhfkit.opro.task import Task, best_score
from rlhfkit.opro.tsp import TravellingSalesman, TSPSettings
from rlhfkit.rollout.engine import SamplingConfig

STATE = "state.json"


@dataclass
class OPROConfig:
    """Settings of `rlhfkit opro`."""

    task: Literal["linreg", "tsp", "prompt"] = "linreg"
    """The problem to optimise."""
    optimizer: str = DEFAULT_MODEL
    """The LLM that proposes solutions: a model directory, a registered name or an OpenAI-compatible URL."""
    scorer: str | None = None
    """`prompt` only: the LLM whose instruction is optimised (default: the optimizer itself)."""
    output: str = "runs/opro"
    """Output directory: state.json (the history, for resuming), results.json, report.html."""
    steps: int = setting(50, ge=1)
    """Optimisation steps (the paper: 500); the loop stops earlier at the optimum."""
    proposals: int = setting(8, ge=1)
    """Solutions the optimizer proposes per step (the paper: 8)."""
    sampling: SamplingConfig = field(
        default_factory=lambda: SamplingConfig(max_new_tokens=160, temperature=1.0)
    )
    """How the optimizer samples (the paper: temperature 1.0; it allows 1024 tokens, we default to fewer
    because a (w, b) pair or a 10-city trace takes a few dozen)."""
    seed: int = setting(0, ge=0)
    """Seed of the optimizer's sampling and the random-search baseline."""
    linreg: LinRegSettings = field(default_factory=LinRegSettings)
    """The linear regression instance."""
    tsp: TSPSettings = field(default_factory=TSPSettings)
    """The travelling salesman instance."""
    prompt: PromptSettings = field(default_factory=PromptSettings)
    """The prompt optimisation task."""


def make_task(cfg: OPROConfig, scorer: LLM | None = None) -> Task:
    if cfg.task == "linreg":
        return LinearRegression(cfg.linreg)
    if cfg.task == "tsp":
        return TravellingSalesman(cfg.tsp)
    if scorer is None:
        raise ValueError("the prompt task needs a scorer LLM")
    return PromptOptimisation(cfg.prompt, scorer)


@dataclass
class History:
    """Every scored solution, in the order they were scored, and what was not scored."""

    entries: list[dict[str, Any]] = field(default_factory=list)  # {"step", "solution", "score", "text"?}
    malformed: int = 0
    duplicates: int = 0
    step: int = 0  # steps done
    optimum_step: int | None = None  # the step whose proposal reached the optimum

    def keys(self, task: Task) -> set[Any]:
        return {task.key(_solution(e["solution"])) for e in self.entries}

    def best(self, task: Task, count: int) -> list[tuple[Any, float]]:
        """The `count` best (solution, score) pairs, worst first and best last (the paper's order)."""
        ranked = sorted(self.entries, key=lambda e: e["score"], reverse=not task.higher_is_better)
        return [(_solution(e["solution"]), e["score"]) for e in ranked[-count:]]


def _solution(value: Any) -> Any:
    return tuple(value) if isinstance(value, list) else value  # JSON keeps tuples as lists


def optimise(cfg: OPROConfig, llm: LLM, task: Task, out: Path) -> History:
    """Run (or resume) the loop; the state is saved after every step."""
    state = out / STATE
    if state.is_file():
        history = History(**json.loads(state.read_text(encoding="utf-8")))
        console.print(f"[bold]opro[/]: resuming {out} after step {history.step}")
    else:
        history = History()
        for solution in task.initial(random.Random(cfg.seed)):
            if task.key(solution) not in history.keys(task):
                history.entries.append({"step": 0, "solution": solution, "score": task.score(solution)})
    with progress() as bar:
        job = bar.add_task(f"opro {task.name}", total=cfg.steps, completed=history.step, status="")
        while history.step < cfg.steps and history.optimum_step is None:
            step = history.step + 1
            shown = history.best(task, task.max_shown)
            prompt = task.meta_prompt(shown, random.Random(cfg.seed * 7919 + step))
            replies = llm.chat([[{"role": "user", "content": prompt}]], cfg.sampling, n=cfg.proposals,
                               seed=cfg.seed * 1_000_003 + step)[0]  # fmt: skip
            seen = history.keys(task)
            for reply in replies:
                solution = task.parse(reply.text)
                if solution is None:
                    history.malformed += 1
                    continue
                if task.key(solution) in seen:
                    history.duplicates += 1
                    continue
                seen.add(task.key(solution))
                score = task.score(solution)
                history.entries.append(
                    {"step": step, "solution": solution, "score": score, "text": reply.text}
                )
                if task.is_optimal(solution, score) and history.optimum_step is None:
                    history.optimum_step = step
            history.step = step
            write_atomic(state, json.dumps(history.__dict__))
            best = history.best(task, 1)[0][1]
            bar.update(job, completed=step, status=f"best {best:.4g}")
            if bar.disable and (step % 10 == 0 or history.optimum_step):
                console.print(f"opro step {step}/{cfg.steps}: best {best:.6g}, {len(history.entries)} scored")
    return history


def random_search(task: Task, evaluations: int, seed: int, start: float | None = None) -> list[float]:
    """Best score so far after each of `evaluations` distinct uniformly random solutions (the baseline at
    the LLM's number of scored solutions), starting from `start`: the best of the same starting solutions
    the LLM was shown, so both sides begin equal."""
    rng, seen, best = random.Random(seed + 104729), set(), start
    curve: list[float] = []
    attempts = 0
    while len(curve) < evaluations and attempts < 100 * evaluations:
        attempts += 1
        solution = task.random_solution(rng)
        if task.key(solution) in seen:
            continue
        seen.add(task.key(solution))
        score = task.score(solution)
        if best is None or (score > best if task.higher_is_better else score < best):
            best = score
        curve.append(best)
    return curve


def summarise(cfg: OPROConfig, task: Task, history: History, seconds: float) -> dict[str, Any]:
    """results.json: the instance, how the optimizer did, and the baselines at equal evaluations."""
    llm_entries = [e for e in history.entries if e["step"] > 0]
    initial = len(history.entries) - len(llm_entries)
    best_solution, best_value = history.best(task, 1)[0]
    start = best_score(task, [e for e in history.entries if e["step"] == 0])
    proposed = best_score(task, llm_entries)
    baseline = random_search(task, len(llm_entries), cfg.seed, start)
    result: dict[str, Any] = {
        "task": task.name,
        "instance": task.describe(),
        "optimizer": cfg.optimizer,
        "steps": history.step,
        "scored": len(llm_entries),
        "initial": initial,
        "malformed": history.malformed,
        "duplicates": history.duplicates,
        "proposals": history.step * cfg.proposals,
        "best": {
            "solution": list(best_solution) if isinstance(best_solution, tuple) else best_solution,
            "score": best_value,
        },
        "start_best": start,
        "proposals_best": proposed,
        "improved": proposed is not None
        and start is not None
        and (proposed > start if task.higher_is_better else proposed < start),
        "optimum_found": history.optimum_step is not None,
        "optimum_step": history.optimum_step,
        "unique_evaluations_to_optimum": (
            sum(1 for e in llm_entries if e["step"] <= history.optimum_step) if history.optimum_step else None
        ),
        "random_search": {
            "evaluations": len(baseline),
            "best": baseline[-1] if baseline else start,
            "curve": baseline,
        },
        "seconds": round(seconds, 1),
    }
    if isinstance(task, TravellingSalesman):
        result["gap"] = task.gap(best_value)
        result["random_search"]["gap"] = task.gap(result["random_search"]["best"])
    if isinstance(task, PromptOptimisation):
        result["test_accuracy"] = task.test_accuracies(best_solution)
    return result


def run_opro(cfg: OPROConfig, llm: LLM | None = None, export_episodes: str | None = None) -> dict[str, Any]:
    """Optimise, write results.json and report.html; returns the results."""
    from rlhfkit.opro.report import write_report

    if export_episodes and cfg.task == "prompt":
        raise ConfigError("--export-episodes: prompt tasks are not exported (scoring needs the scorer model)")
    out = Path(cfg.output)
    claim_run_dir(cfg, out)
    llm = llm or load_llm(cfg.optimizer)
    scorer = None
    if cfg.task == "prompt":
        scorer = llm if cfg.scorer in (None, cfg.optimizer) else load_llm(cfg.scorer)
    task = make_task(cfg, scorer)
    t0 = time.perf_counter()
    history = optimise(cfg, llm, task, out)
    result = summarise(cfg, task, history, time.perf_counter() - t0)
    write_atomic(out / "results.json", json.dumps(result, indent=2))
    write_report(out, cfg, task, history, result)
    if export_episodes:
        from rlhfkit.opro.episodes import episodes

        if cfg.task == "prompt":
            raise ConfigError(
                "--export-episodes: prompt tasks are not exported (scoring needs the scorer model)"
            )
        settings = cfg.linreg if cfg.task == "linreg" else cfg.tsp
        rows = episodes(task, settings, history.entries, history.step, cfg.seed)
        write_atomic(Path(export_episodes), "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
        result["episodes"] = len(rows)
    return result
