"""OPRO: the tasks' exact checkers, the meta-prompt layout of the paper, and the loop with a scripted
optimizer that reads the meta-prompt the way a model must (so parsing and bookkeeping are proven end to end);
then the real path through a local model and the CLI."""

from __future__ import annotations

import itertools
import json
import random
import re
from dataclasses import replace
from pathlib import Path

import pytest
from typer.testing import CliRunner

from rlhfkit.chat.llm import Completion
from rlhfkit.cli import app
from rlhfkit.config import load_config
from rlhfkit.opro.linreg import LinearRegression, LinRegSettings
from rlhfkit.opro.loop import OPROConfig, make_task, optimise, run_opro
from rlhfkit.opro.reasoning import TASKS, make_split
from rlhfkit.opro.tsp import (
    TravellingSalesman,
    TSPSettings,
    farthest_insertion,
    held_karp,
    tour_length,
    two_opt,
)

pytestmark = pytest.mark.usefixtures("one_thread")


class ScriptedOptimizer:
    """A stand-in LLM: reads the best solution from the END of the meta-prompt (where the paper puts it) and
    proposes small perturbations of it as text, with a malformed answer now and then; like a real sampler,
    what it writes depends only on the prompt and the seed."""

    name = "scripted"

    def __init__(self, malformed_every: int = 0) -> None:
        self.malformed_every = malformed_every
        self.calls = 0
        self.malformed_written = 0
        self.prompts: list[str] = []

    def chat(self, conversations, sampling, n=1, seed=None):
        rng = random.Random(seed)
        out = []
        for messages in conversations:
            prompt = messages[-1]["content"]
            self.prompts.append(prompt)
            replies = []
            for _ in range(n):
                self.calls += 1
                if self.malformed_every and rng.randrange(self.malformed_every) == 0:
                    self.malformed_written += 1
                    replies.append(Completion("I am not sure what to do.", 7, "stop"))
                    continue
                replies.append(Completion(self.propose(prompt, rng), 20, "stop"))
            out.append(replies)
        return out

    @staticmethod
    def first_prompt(cfg: OPROConfig) -> str:
        task = make_task(cfg)
        starts = [(s, task.score(s)) for s in task.initial(random.Random(cfg.seed))]
        ranked = sorted(starts, key=lambda p: p[1], reverse=not task.higher_is_better)
        return task.meta_prompt(ranked[-task.max_shown :], random.Random(cfg.seed * 7919 + 1))

    def propose(self, prompt: str, rng: random.Random) -> str:
        pairs = re.findall(r"w=(-?\d+), b=(-?\d+)\nvalue:", prompt)
        if pairs:
            w, b = map(int, pairs[-1])  # the best pair is shown last
            return f"A pair close to the best one: [{w + rng.randint(-2, 2)}, {b + rng.randint(-2, 2)}]"
        traces = re.findall(r"<trace> ([\d,]+) </trace>", prompt)
        tour = [int(t) for t in traces[-1].split(",")]
        i, j = sorted(rng.sample(range(1, len(tour)), 2))
        tour[i : j + 1] = reversed(tour[i : j + 1])  # a 2-opt move of the best trace
        return f"<trace> {','.join(map(str, tour))} </trace>"


# ------------------------------------------------------------------------------------------- checkers
@pytest.mark.parametrize(("w", "b"), [(15, 14), (17, 17), (16, 10), (3, 5), (25, 23), (2, 30), (36, -1)])
def test_linreg_optimum_is_the_true_pair_for_the_papers_cases(w: int, b: int):
    for seed in range(5):
        task = LinearRegression(LinRegSettings(w=w, b=b, seed=seed))
        assert task.optimum == (w, b)
        # exhaustive check around it: no integer pair within 5 does better
        around = [(w + i, b + j) for i in range(-5, 6) for j in range(-5, 6)]
        assert min(around, key=task.score) == (w, b)


def test_linreg_matches_the_papers_data_and_starts():
    import numpy as np

    task = LinearRegression(LinRegSettings(w=15, b=14, seed=0))
    np.random.seed(1)  # the paper's code: np.random.seed(i_rep + 1), then y = X w + b + randn(50)
    expected = (np.arange(50) + 1) * 15 + 14 + np.random.randn(50)
    assert np.allclose(task.y, expected)
    assert task.score((15, 14)) == pytest.approx(
        float(np.linalg.norm(expected - ((np.arange(50) + 1) * 15 + 14)) ** 2)
    )
    starts = task.initial(random.Random(0))
    assert len(starts) == 5 and all(10 <= w <= 20 and 10 <= b <= 20 for w, b in starts)


def test_tsp_exact_optimum_equals_brute_force_and_heuristics_are_tours():
    for seed in range(3):
        task = TravellingSalesman(TSPSettings(n=8, seed=seed))
        brute = min(tour_length(task.points, (0, *p)) for p in itertools.permutations(range(1, 8)))
        assert task.optimum_length == pytest.approx(brute)
        assert task.score(task.optimum) == pytest.approx(brute)
        for tour in (*task.heuristics.values(), farthest_insertion(task.points)):
            assert sorted(tour) == list(range(8)) and tour[0] == 0
            assert task.score(tour) >= brute - 1e-9
        assert task.score(two_opt(task.points, task.heuristics["nearest_neighbour"])) <= task.score(
            task.heuristics["nearest_neighbour"]
        )
    length, tour = held_karp([(0, 0), (0, 10), (10, 10), (10, 0)])
    assert length == pytest.approx(40.0) and tour in ((0, 1, 2, 3), (0, 3, 2, 1))


def test_parsers_take_the_last_answer_and_refuse_malformed_ones():
    lin = LinearRegression(LinRegSettings())
    assert lin.parse("first [1, 2] then [15.4, 13.6]") == (15, 14)
    assert lin.parse("w=15, b=14") is None
    tsp = TravellingSalesman(TSPSettings(n=5))
    assert tsp.parse("<trace> 0,1,2,3,4 </trace> better: <trace>0, 2, 1, 4, 3</trace>") == (0, 2, 1, 4, 3)
    assert tsp.parse("<trace> 1,0,2,3,4 </trace>") is None  # must start at 0
    assert tsp.parse("<trace> 0,1,2,3 </trace>") is None  # a city missing
    assert tsp.parse("<trace> 0,1,1,3,4 </trace>") is None  # a city twice
    assert tsp.parse("<trace> 0,a,2,3,4 </trace>") is None


def test_meta_prompt_has_the_papers_layout():
    task = LinearRegression(LinRegSettings())
    shown = [((10, 10), 5000.7), ((20, 12), 900.2), ((15, 13), 49.9)]  # worst first, best last
    prompt = task.meta_prompt(shown, random.Random(0))
    assert (
        "arranged in descending order based on their function values, where lower values are better" in prompt
    )
    assert (
        "input:\nw=10, b=10\nvalue:\n5000\n\ninput:\nw=20, b=12\nvalue:\n900\n\n"
        "input:\nw=15, b=13\nvalue:\n49" in prompt
    )
    assert prompt.endswith("The output must end with a pair [w, b], where w and b are numerical values.")
    tsp = TravellingSalesman(TSPSettings(n=4, seed=1))
    text = tsp.meta_prompt([((0, 1, 2, 3), 300.9), ((0, 2, 1, 3), 250.2)], random.Random(0))
    assert (
        "(0): (" in text
        and "<trace> 0,1,2,3 </trace>\nlength:\n300\n\n<trace> 0,2,1,3 </trace>\nlength:\n250" in text
    )


# ------------------------------------------------------------------------------------------- the loop
def test_scripted_optimizer_finds_the_linreg_optimum_and_the_books_balance(tmp_path: Path):
    cfg = load_config(
        OPROConfig, overrides=["task=linreg", f"output={tmp_path / 'lin'}", "steps=60", "seed=1"]
    )
    llm = ScriptedOptimizer(malformed_every=5)
    result = run_opro(cfg, llm)
    assert result["optimum_found"] and result["best"]["solution"] == [15, 14]
    assert result["steps"] == result["optimum_step"] < 60  # stopped at the optimum
    assert result["malformed"] == llm.malformed_written > 0  # each malformed answer counted once
    assert result["scored"] + result["malformed"] + result["duplicates"] == result["proposals"] == llm.calls
    # the meta-prompt never shows more than 20 pairs, and shows them worst first
    for prompt in llm.prompts:
        values = [int(v) for v in re.findall(r"value:\n(\d+)", prompt)]
        assert len(values) <= 20 and values == sorted(values, reverse=True)
    assert result["unique_evaluations_to_optimum"] == result["scored"]
    assert result["improved"] and result["start_best"] > result["proposals_best"] == result["best"]["score"]
    report = (tmp_path / "lin" / "report.html").read_text()
    assert "random search" in report and "<script" not in report


def test_scripted_optimizer_closes_the_tsp_gap(tmp_path: Path):
    cfg = load_config(
        OPROConfig, overrides=["task=tsp", "tsp.n=8", "tsp.seed=2", f"output={tmp_path / 't'}", "steps=80"]
    )
    task = make_task(cfg)
    start_gap = min(task.gap(task.score(t)) for t in task.initial(random.Random(cfg.seed)))
    result = run_opro(cfg, ScriptedOptimizer())
    assert start_gap > 0.2  # random tours are far from the optimum
    assert result["gap"] <= 0.02 and result["gap"] < result["random_search"]["gap"]
    assert result["improved"] and result["proposals_best"] < result["start_best"]
    # random search starts from the same best start and only improves on it
    assert result["random_search"]["curve"][0] <= result["start_best"]


def test_resume_after_a_crash_equals_an_uninterrupted_run(tmp_path: Path):
    sets = ["task=linreg", "linreg.w=36", "linreg.b=-1", f"output={tmp_path / 'a'}", "steps=12"]
    cfg = load_config(OPROConfig, overrides=sets)  # far from the starts: no early stop in 12 steps
    whole = run_opro(cfg, ScriptedOptimizer(malformed_every=7))
    assert whole["steps"] == 12 and not whole["optimum_found"]

    class Crash(Exception):
        pass

    class Crashing(ScriptedOptimizer):
        def chat(self, *args, **kwargs):
            if len(self.prompts) == 5:
                raise Crash
            return super().chat(*args, **kwargs)

    resumed_cfg = replace(cfg, output=str(tmp_path / "b"))
    with pytest.raises(Crash):
        run_opro(resumed_cfg, Crashing(malformed_every=7))
    state = json.loads((tmp_path / "b" / "state.json").read_text())
    assert state["step"] == 5
    again = run_opro(resumed_cfg, ScriptedOptimizer(malformed_every=7))
    for key in ("best", "scored", "duplicates", "malformed", "optimum_step"):
        assert again[key] == whole[key]
    first = json.loads((tmp_path / "a" / "state.json").read_text())["entries"]
    second = json.loads((tmp_path / "b" / "state.json").read_text())["entries"]
    assert [(e["step"], e["solution"], e["score"]) for e in first] == [
        (e["step"], e["solution"], e["score"]) for e in second
    ]


def test_a_local_model_runs_the_loop_through_the_cli(tiny_model: Path, tmp_path: Path):
    out = tmp_path / "cli"
    args = ["opro", "linreg", "--optimizer", str(tiny_model), "--output", str(out), "--set", "steps=2",
            "--set", "proposals=4", "--set", "sampling.max_new_tokens=12"]  # fmt: skip
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    data = json.loads((out / "results.json").read_text())
    assert data["steps"] == 2 and data["proposals"] == 8
    assert data["scored"] + data["malformed"] + data["duplicates"] == 8  # a random model: mostly malformed
    assert "opro: " in result.output and (out / "report.html").exists()
    bad = CliRunner().invoke(
        app, ["opro", "knapsack", "--optimizer", str(tiny_model), "--output", str(tmp_path / "x")]
    )
    assert bad.exit_code == 2 and "task: 'knapsack' is not one of 'linreg', 'tsp', 'prompt'" in bad.output
    assert not (tmp_path / "x").exists()


def test_optimise_is_deterministic_for_a_seed(tmp_path: Path):
    cfg = load_config(OPROConfig, overrides=["task=linreg", "steps=5", "linreg.w=3", "linreg.b=5"])
    task = make_task(cfg)
    a = optimise(replace(cfg, output=str(tmp_path / "a")), ScriptedOptimizer(), task, tmp_path / "a")
    b = optimise(replace(cfg, output=str(tmp_path / "b")), ScriptedOptimizer(), task, tmp_path / "b")
    assert a.entries == b.entries


# ------------------------------------------------------------------------------------------- prompts
@pytest.mark.parametrize("name", sorted(TASKS))
def test_every_reasoning_task_has_an_exact_checker(name: str):
    task = TASKS[name]
    train, test = make_split(task, 30, 10, seed=3)
    assert len({q for q, _ in train + test}) == 40  # distinct questions, train and test disjoint
    for question, answer in train:
        assert task.check(f"Let me think. The answer is {answer}", answer), (question, answer)
        assert task.check(f"{answer}", answer)
        wrong = {"True": "False", "False": "True", "Yes": "No", "No": "Yes"}.get(answer)
        if wrong is None and re.fullmatch(r"-?\d+", answer):
            wrong = str(int(answer) + 1)
        if wrong is not None:
            assert not task.check(f"The answer is {wrong}", answer)
    if name == "multistep_arithmetic":  # the answer is the expression's value
        for question, answer in train:
            expr = question.split("\n\n")[1].rstrip("= ")
            assert eval(expr, {"__builtins__": {}}) == int(answer)  # generated by us: safe to evaluate
    if name == "word_sorting":
        assert task.check("apple banana cherry", "apple banana cherry")
        assert not task.check("banana apple cherry", "apple banana cherry")
    if name == "dyck":
        assert task.check("The rest is ) ] }", ") ] }") and not task.check("] ) }", ") ] }")


class ScriptedScorer:
    """Answers right exactly when the instruction asks it to work "carefully"."""

    name = "scorer"

    def chat(self, conversations, sampling, n=1, seed=None):
        out = []
        for messages in conversations:
            text = messages[-1]["content"]
            question = text.split("\n", 1)[-1] if "\n" in text else text
            right = "carefully" in text.lower()
            answer = PROMPT_ANSWERS.get(question.strip(), "0")
            out.append([Completion(f"The answer is {answer if right else 'unknown'}", 5, "stop")])
        return out


class ScriptedInstructionWriter:
    """Reads the best instruction (the last <INS>...</INS> before the problems) and adds one word to it."""

    name = "writer"
    WORDS = ("now", "quickly", "please", "carefully")

    def chat(self, conversations, sampling, n=1, seed=None):
        prompt = conversations[0][-1]["content"]
        best = re.findall(r"<INS>(.*?)</INS>\nscore:", prompt)[-1]
        rng = random.Random(seed)
        return [[Completion(f"<INS>{best} {rng.choice(self.WORDS)}</INS>", 9, "stop") for _ in range(n)]]


PROMPT_ANSWERS: dict[str, str] = {}


def test_prompt_optimisation_finds_the_instruction_the_scorer_needs(tmp_path: Path):
    from rlhfkit.opro.prompt import PromptOptimisation, PromptSettings

    settings = PromptSettings(task="word_problems", train=6, test=6, seed=1)
    probe = PromptOptimisation(settings, ScriptedScorer())
    PROMPT_ANSWERS.update({q: a for q, a in probe.train + probe.test})
    layout = probe.meta_prompt([("Be brief.", 10.4), ("Let's solve the problem.", 50.0)], random.Random(0))
    assert "<INS>Be brief.</INS>\nscore:\n10\n\n<INS>Let's solve the problem.</INS>\nscore:\n50" in layout
    assert layout.count("input:\nQ: <INS>\n") == 3 and layout.endswith(
        "generally applicable to all problems above."
    )
    cfg = load_config(OPROConfig, overrides=["task=prompt", f"output={tmp_path / 'p'}", "steps=20",
                                             "prompt.task=word_problems", "prompt.train=6", "prompt.test=6",
                                             "prompt.seed=1"])  # fmt: skip
    task = PromptOptimisation(cfg.prompt, ScriptedScorer())
    history = optimise(cfg, ScriptedInstructionWriter(), task, tmp_path / "p")
    assert history.optimum_step is not None
    best, score = history.best(task, 1)[0]
    assert "carefully" in best and score == 100.0
    assert task.score("Let's solve the problem.") == 0.0
    accuracies = task.test_accuracies(best)
    assert accuracies == {"best found": 100.0, "initial": 0.0, "step by step": 0.0, "empty": 0.0}


def test_exported_episodes_train_an_optimizer_with_grpo(tiny_model: Path, tmp_path: Path):
    from rlhfkit.data.records import load_prompts
    from rlhfkit.opro.episodes import improvement

    cfg = load_config(OPROConfig, overrides=["task=linreg", f"output={tmp_path / 'o'}", "steps=6", "seed=2"])
    path = tmp_path / "episodes.jsonl"
    result = run_opro(cfg, ScriptedOptimizer(malformed_every=4), export_episodes=str(path))
    records = load_prompts(path)  # an RL prompt file
    assert len(records) == result["episodes"] == result["scored"]
    rows = [json.loads(x) for x in path.read_text().splitlines()]
    # the reward recomputes each recorded proposal's improvement over the best it was shown
    again = improvement([""] * len(rows), [r["completion"] for r in rows], [r["task"] for r in rows],
                        [r["settings"] for r in rows], [r["best_shown"] for r in rows])  # fmt: skip
    assert again == pytest.approx([r["improvement"] for r in rows])
    assert any(v > 0 for v in again) and improvement(
        [""], ["no pair"], ["linreg"], [rows[0]["settings"]], [1.0]
    ) == [-1.0]
    # the meta-prompt of a step-1 record is the one the optimizer saw first
    assert rows[0]["prompt"][0]["content"] == ScriptedOptimizer.first_prompt(cfg)
    out = tmp_path / "grpo"
    early = tmp_path / "early.jsonl"  # the first steps' meta-prompts: short enough for the tiny model
    early.write_text("".join(json.dumps(r) + "\n" for r in rows[:4]))
    args = ["grpo", "--policy", str(tiny_model), "--prompts", str(early), "--output", str(out),
            "--reward-fn", "rlhfkit.opro.episodes:improvement", "--set", "train.max_steps=1",
            "--set", "prompts_per_step=2", "--set", "num_generations=2", "--set", "sampling.max_new_tokens=8",
            "--set", "max_prompt_length=1024", "--set", "train.threads=1"]  # fmt: skip
    done = CliRunner().invoke(app, args)
    assert done.exit_code == 0, done.output
    metrics = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert metrics[0]["score"] == -1.0  # a random tiny model writes no pair: the reward says so
