"""Benchmark: multi-turn episodes with each episode's KV cache kept across turns ("kept") against prefilling
the whole history every turn ("full", ``keep_cache=False``: what every turn did before), same seed, same
tokens, float32 on the CPU, in one process, A B A B.

``turns``: a long episode on SmolLM2-135M-Instruct (``--episodes`` of them, batched). The environment answers
every turn with a tool result of about ``--obs-tokens`` tokens and the episode runs ``--turns`` turns. After
the runner has read the template's end-of-turn token, the engine's stop token is swapped for one the model
never writes, so every turn samples exactly ``--new-tokens`` tokens (cut turns are closed by the template's
end token, as the runner does) and both paths do the same decode work each turn: what differs is the
prefill, the whole history (full) or the last token and the observation (kept). Prints the sampling time of
each turn (median over rounds) and checks that both paths gave the same tokens.

``agent-eval``: `run_agent_eval` (``rlhfkit agent-eval``) on ``--env`` (``--limit`` test tasks in one batch,
greedy, the episode limits given here) with each path: wall time (model loading included), the sampling
time, and that the results and episodes are the same. The untuned model answers ``calc`` in one turn (it
never calls the tool), so only a multi-turn environment shows the difference: ``commons``, where every
turn is a month of the season whatever the model writes.

``selfplay``: `commons_selfplay.self_play` of ``--limit`` test lakes (every seat the model, ``--turns``
months) through `LocalLLM` with each seat's cache kept from month to month, and without
(``keep_cache=False``: every month prefills every seat's season so far), A B A B: wall time and whether the
games are the same.

Usage:
  python bench/bench_episode_kv.py turns [--turns 12] [--episodes 2] [--obs-tokens 150] [--new-tokens 32]
  python bench/bench_episode_kv.py agent-eval [--env commons] [--limit 4] [--turns 12] [--new-tokens 32]
  python bench/bench_episode_kv.py selfplay [--limit 2] [--turns 12] [--new-tokens 32]
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, ClassVar

import torch

REGISTERED = "smollm2-135m-instruct"
print = functools.partial(print, flush=True)  # progress shows up when piped


class Timing:
    """Which path the episode runner takes (`keep`) and the sampling time of each of its turns: installed as
    `rlhfkit.agents.episode.TurnCaches`, the one object the runner samples through."""

    keep: ClassVar[bool] = True
    turns: ClassVar[list[float]] = []
    prefilled: ClassVar[list[int]] = []  # tokens prefilled per row, each turn (the rollout's padded prompt)

    @classmethod
    def install(cls) -> None:
        from rlhfkit.agents import episode
        from rlhfkit.rollout.turns import TurnCaches

        class Timed(TurnCaches):
            def __init__(self, engine: Any, keep: bool = True) -> None:
                super().__init__(engine, keep=keep and cls.keep)

            def generate(self, *args: Any, **kwargs: Any) -> Any:
                start = time.perf_counter()
                rollout = super().generate(*args, **kwargs)
                cls.turns.append(time.perf_counter() - start)
                cls.prefilled.append(rollout.prompt_ids.shape[1])
                return rollout

        episode.TurnCaches = Timed  # type: ignore[misc]

    @classmethod
    def reset(cls, keep: bool) -> None:
        cls.keep, cls.turns, cls.prefilled = keep, [], []


def long_env(obs_tokens: int, tokenizer: Any) -> Any:
    """An environment that never ends on its own and answers each turn with a tool result of ~obs_tokens."""
    from rlhfkit.agents.env import Environment, StepResult, Task

    line, text = 0, ""
    while len(tokenizer(text, add_special_tokens=False)["input_ids"]) < obs_tokens:
        text += f"row {line}: sensor {line % 7} reads {(line * 37) % 101}.{line % 10} units, status ok\n"
        line += 1

    class LongToolEnv(Environment):
        name = "long_tool"

        def tools(self) -> list:
            return []

        def tasks(self, split: str) -> list[Task]:
            return [Task(f"{split}-{i}", f"Watch sensor {i} and report anything unusual.") for i in range(64)]

        def reset(self, task: Task) -> list[dict]:
            self.turn = 0
            return [{"role": "user", "content": task.prompt}]

        def step(self, message: dict) -> Any:
            self.turn += 1
            return StepResult(
                [{"role": "tool", "name": "read_log", "content": f"[turn {self.turn}]\n{text}"}]
            )

    return LongToolEnv


def run_turns(args: argparse.Namespace) -> None:
    from rlhfkit.agents.episode import AgentLimits, EpisodeRunner
    from rlhfkit.models.loading import load_causal_lm
    from rlhfkit.rollout import RolloutEngine, SamplingConfig

    model, tok = load_causal_lm(args.model)
    model.requires_grad_(False).eval()
    engine = RolloutEngine(model, tok)
    env = long_env(args.obs_tokens, tok)
    tasks = env().tasks("test")[: args.episodes]
    limits = AgentLimits(max_turns=args.turns, max_tokens=8000, max_new_tokens=args.new_tokens)
    sampling = SamplingConfig(temperature=1.0)
    never = tok.vocab_size - 1  # a token the model does not write: every turn samples max_new_tokens
    print(f"{type(model).__name__} backend={engine.backend_name} threads={torch.get_num_threads()}")
    print(f"{args.episodes} episodes x {args.turns} turns, {args.new_tokens} new tokens a turn, "
          f"observations of ~{args.obs_tokens} tokens")  # fmt: skip

    def play(keep: bool, turns: int) -> tuple[list[Any], list[float], list[int]]:
        runner = EpisodeRunner(engine, replace_turns(limits, turns), keep_cache=keep)
        eos = engine.eos_token_ids
        engine.eos_token_ids = [never]
        try:
            Timing.reset(keep)
            episodes = runner.run(env, tasks, sampling, torch.Generator().manual_seed(args.seed))
        finally:
            engine.eos_token_ids = eos
        return episodes, list(Timing.turns), list(Timing.prefilled)

    play(True, 1)  # warm-up: derived weights, oneDNN packing, allocator
    times: dict[bool, list[list[float]]] = {True: [], False: []}
    results: dict[bool, Any] = {}
    prefilled: dict[bool, list[int]] = {}
    for rnd in range(args.rounds):
        for keep in (True, False):
            start = time.perf_counter()
            episodes, turns, widths = play(keep, args.turns)
            name = "kept" if keep else "full"
            print(f"  round {rnd + 1} {name}: {time.perf_counter() - start:.1f}s")
            times[keep].append(turns)
            results[keep], prefilled[keep] = episodes, widths
    kept, full = results[True], results[False]
    same = all(a.completion_ids == b.completion_ids for a, b in zip(kept, full, strict=True))
    pairs = [
        (x, y)
        for a, b in zip(kept, full, strict=True)
        if same
        for x, y in zip(a.logprobs, b.logprobs, strict=True)
    ]
    diff = max((abs(x - y) for x, y in pairs), default=float("nan"))
    lengths = [len(e.prompt_ids) + len(e.completion_ids) for e in kept]
    print(f"same tokens: {same}; max |logprob difference| {diff:.2e}; episode lengths {lengths} tokens")
    print()
    print("| turn | prefilled tokens per row, full | full (s) | prefilled, kept | kept (s) | full / kept |")
    print("|---:|---:|---:|---:|---:|---:|")
    for i in range(args.turns):
        f = statistics.median(r[i] for r in times[False])
        k = statistics.median(r[i] for r in times[True])
        print(f"| {i + 1} | {prefilled[False][i]} | {f:.2f} | {prefilled[True][i]} | {k:.2f} | {f / k:.2f} |")
    total_f = statistics.median(sum(r) for r in times[False])
    total_k = statistics.median(sum(r) for r in times[True])
    print(f"| all | | {total_f:.1f} | | {total_k:.1f} | {total_f / total_k:.2f} |")


def replace_turns(limits: Any, turns: int) -> Any:
    from dataclasses import replace

    return replace(limits, max_turns=turns)


def run_agent_eval(args: argparse.Namespace) -> None:
    from rlhfkit.agents.episode import AgentLimits
    from rlhfkit.evaluation.agent_eval import AgentEvalConfig
    from rlhfkit.evaluation.agent_eval import run_agent_eval as evaluate

    out = Path(tempfile.mkdtemp(prefix="bench-episode-kv-"))
    limits = AgentLimits(max_turns=args.turns, max_tokens=args.max_tokens, max_new_tokens=args.new_tokens)
    print(
        f"agent-eval --policy {args.model} --envs {args.env} --set limit={args.limit} --set batch_size="
        f"{args.limit} --set agent.max_turns={args.turns} --set agent.max_tokens={args.max_tokens} --set "
        f"agent.max_new_tokens={args.new_tokens}; threads {torch.get_num_threads()}; outputs under {out}"
    )
    walls: dict[bool, list[float]] = {True: [], False: []}
    sampling: dict[bool, list[float]] = {True: [], False: []}
    runs: dict[bool, Path] = {}
    for rnd in range(1 - args.warmup, args.rounds + 1):  # round 0: warm-up
        for keep in (True, False):
            name = "kept" if keep else "full"
            cfg = AgentEvalConfig(
                policy=[args.model], envs=[args.env], limit=args.limit, batch_size=args.limit, agent=limits,
                output=str(out / f"{name}-{rnd}"),
            )  # fmt: skip
            Timing.reset(keep)
            start = time.perf_counter()
            evaluate(cfg)
            wall = time.perf_counter() - start
            print(f"  {'warm-up' if rnd == 0 else f'round {rnd}'} {name}: {wall:.1f}s "
                  f"(sampling {sum(Timing.turns):.1f}s in {len(Timing.turns)} turns)")  # fmt: skip
            if rnd:
                walls[keep].append(wall)
                sampling[keep].append(sum(Timing.turns))
                runs[keep] = Path(cfg.output)
    a, b = (json.loads((runs[k] / "agent_eval.json").read_text()) for k in (True, False))
    same_results = a["results"] == b["results"]
    ea, eb = (
        [json.loads(x) for x in (runs[k] / "episodes.jsonl").read_text().splitlines()] for k in (True, False)
    )
    same_episodes = [e["messages"] for e in ea] == [e["messages"] for e in eb]
    turns = [e["turns"] for e in ea]
    print(f"same results: {same_results}; same episodes: {same_episodes}; turns per episode: "
          f"mean {statistics.mean(turns):.2f}, max {max(turns)}; success "
          f"{a['results'][args.model][args.env]['success']:.3f}")  # fmt: skip
    print()
    print("| path | wall (s) | sampling (s) |")
    print("|---|---:|---:|")
    for keep in (False, True):
        wall, samp = statistics.median(walls[keep]), statistics.median(sampling[keep])
        name = "KV kept across turns" if keep else "full prefill each turn"
        print(f"| {name} | {wall:.1f} | {samp:.1f} |")


def run_selfplay(args: argparse.Namespace) -> None:
    from rlhfkit.agents.commons import CommonsEnvironment
    from rlhfkit.chat.llm import LocalLLM
    from rlhfkit.evaluation.commons_selfplay import self_play
    from rlhfkit.rollout.engine import SamplingConfig

    env = CommonsEnvironment(months=args.turns)
    tasks = env.tasks("test")[: args.limit]
    seats = sum(len(t.data["names"]) for t in tasks)
    sampling = SamplingConfig(max_new_tokens=args.new_tokens, temperature=1.0)
    models = {keep: LocalLLM(args.model, keep_cache=keep) for keep in (True, False)}
    print(f"self-play of {len(tasks)} lakes ({seats} seats), {args.turns} months, {args.new_tokens} tokens "
          f"a turn, seed {args.seed}, threads {torch.get_num_threads()}")  # fmt: skip
    walls: dict[bool, list[float]] = {True: [], False: []}
    games: dict[bool, Any] = {}
    for rnd in range(1 - args.warmup, args.rounds + 1):
        for keep in (True, False):
            start = time.perf_counter()
            games[keep] = self_play(models[keep], tasks, sampling, args.seed, env)
            wall = time.perf_counter() - start
            print(f"  {'warm-up' if rnd == 0 else f'round {rnd}'} {'kept' if keep else 'full'}: {wall:.1f}s")
            if rnd:
                walls[keep].append(wall)
    same = [[s.messages for s in g.seats] for g in games[True]] == [
        [s.messages for s in g.seats] for g in games[False]
    ]
    months = [g.info["metrics"]["survival_months"] for g in games[True]]
    print(f"same games: {same}; months played per lake: {months}")
    print()
    print("| path | wall (s) |")
    print("|---|---:|")
    for keep in (False, True):
        name = "KV kept across months" if keep else "full prefill each month"
        print(f"| {name} | {statistics.median(walls[keep]):.1f} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("what", choices=["turns", "agent-eval", "selfplay"])
    ap.add_argument("--model", default=REGISTERED)
    ap.add_argument("--turns", type=int, default=12)
    ap.add_argument("--episodes", type=int, default=2)
    ap.add_argument("--obs-tokens", type=int, default=150)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--env", default="commons", help="agent-eval: the environment")
    ap.add_argument("--limit", type=int, default=4, help="agent-eval: test tasks, one batch")
    ap.add_argument("--max-tokens", type=int, default=4096, help="agent-eval: tokens per episode")
    ap.add_argument("--warmup", type=int, choices=[0, 1], default=1, help="agent-eval: a warm-up round first")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(" ".join([Path(sys.executable).name, *sys.argv]))
    Timing.install()
    if args.what == "turns":
        run_turns(args)
    elif args.what == "selfplay":
        run_selfplay(args)
    else:
        run_agent_eval(args)


if __name__ == "__main__":
    main()
