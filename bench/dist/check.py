"""Sharded training (`train.sharding=fsdp2`, torch's FSDP2) against one process, for every trainer.

    python bench/dist/check.py OUTDIR [--steps 3] [--processes 2]      (bench/dist/check.sh wraps it)

For SFT, RM, DPO, PPO, GRPO, RLOO and multi-turn GRPO (`--env`) on the tiny random Llama: one run on one
process (sharded over a mesh of one: whole weights, the same code) and one on N sharded processes, both under
`torchrun`, then per trainer the max absolute difference of the saved weights and of the logged losses, and
each process's bytes of trainable parameters + gradients + AdamW state (`state_mib`, logged by the loop:
the local shards under FSDP2). Then the kill-and-resume check, sharded: GRPO with a checkpoint every 2
steps, SIGKILLed after step 3 and started again, against the uninterrupted sharded run. Prints a Markdown
table and writes it to OUTDIR/results.md. On a GPU machine the same command runs over NCCL (add
`train.device=cuda` through EXTRA_SETS, space-separated settings added to every run).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
LAUNCH = ROOT / "tests" / "distributed" / "launch.py"

RL = ["sampling.max_new_tokens=8", "sampling.temperature=1.0", "sample_every=0", "train.lr=1e-4"]
COUNT = "reward_fn=tests.helpers:count_target"
GROUPS = ["prompts_per_step=4", "num_generations=4", COUNT]
SUPERVISED = ["data.eval_fraction=0.25"]
ENV = ["env=tests.trainers.test_agent_rl:LetterEnv", "agent.max_new_tokens=6", "agent.max_turns=2",
       "agent.max_tokens=120", "prompts_per_step=2", "num_generations=4"]  # fmt: skip
TRAINERS: dict[str, tuple[list[str], list[str]]] = {
    "sft": (["sft", "--model", "{model}", "--data", "{sft}"], [*SUPERVISED, "train.lr=1e-3"]),
    "rm": (["rm", "--model", "{model}", "--data", "{pairs}"], [*SUPERVISED, "train.lr=1e-3"]),
    "dpo": (["dpo", "--policy", "{model}", "--data", "{pairs}"], [*SUPERVISED, "train.lr=1e-4"]),
    "ppo": (["ppo", "--policy", "{model}", "--prompts", "{prompts}"],
            [*RL, "rollout_batch=8", "ppo_epochs=2", "no_eos_score=null", COUNT]),
    "grpo": (["grpo", "--policy", "{model}", "--prompts", "{prompts}"], [*RL, *GROUPS, "num_iterations=2"]),
    "rloo": (["rloo", "--policy", "{model}", "--prompts", "{prompts}"], [*RL, *GROUPS]),
    "grpo --env": (["grpo", "--policy", "{model}"], [*RL, *ENV]),
}  # fmt: skip


def make_inputs(out: Path) -> dict[str, str]:
    """The tiny model and the data files, as the tests make them."""
    from tests.conftest import MEMORY_ROWS, write_jsonl
    from tests.helpers import good_word_pairs, grpo_prompts_file

    from rlhfkit.models.tiny import make_tiny_model

    out.mkdir(parents=True, exist_ok=True)
    model = out / "tiny-llama"
    if not (model / "config.json").is_file():
        make_tiny_model(model, seed=0)
    return {
        "model": str(model),
        "sft": str(write_jsonl(out / "sft.jsonl", MEMORY_ROWS)),
        "pairs": str(write_jsonl(out / "pairs.jsonl", good_word_pairs(16, 0))),
        "prompts": str(grpo_prompts_file(out, 16)),
    }


def launch(processes: int, args: list[str], sets: list[str], kill_after: int = 0) -> float:
    """One torchrun launch, sharded; returns its seconds. A failed launch (but a planned kill) stops."""
    kill = ["--kill-after", str(kill_after)] if kill_after else []
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={processes}",
           str(LAUNCH), *kill, *args]  # fmt: skip
    cmd += [
        x
        for s in [*sets, "train.sharding=fsdp2", *os.environ.get("EXTRA_SETS", "").split()]
        for x in ("--set", s)
    ]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "NO_COLOR": "1"}
    t0 = time.perf_counter()
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if done.returncode and not kill_after:
        sys.exit(f"failed: {' '.join(cmd)}\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}")
    return time.perf_counter() - t0


def weights(out: Path) -> dict[str, torch.Tensor]:
    found = {}
    for directory in (out, out / "value"):  # PPO's value model too
        if (directory / "model.safetensors").is_file():
            prefix = "value." if directory != out else ""
            found.update({prefix + k: v for k, v in load_file(str(directory / "model.safetensors")).items()})
    return found


def train_rows(out: Path) -> list[dict]:
    lines = (out / "metrics.jsonl").read_text().splitlines()
    return [row for row in map(json.loads, lines) if row["split"] == "train"]


def differences(a: Path, b: Path) -> tuple[float, float]:
    """(max |weight difference|, max |loss difference|) of two finished runs."""
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys(), (sorted(wa.keys() ^ wb.keys()))[:4]
    weight = max(float((wa[k] - wb[k]).abs().max()) for k in wa)
    la, lb = [r["loss"] for r in train_rows(a)], [r["loss"] for r in train_rows(b)]
    assert len(la) == len(lb), (len(la), len(lb))
    return weight, max(abs(x - y) for x, y in zip(la, lb, strict=True))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("outdir", type=Path)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument(
        "--trainers", default=",".join(TRAINERS), help="comma-separated; empty: only the resume"
    )
    opts = parser.parse_args()
    out, n = opts.outdir.resolve(), opts.processes
    inputs = make_inputs(out / "inputs")
    common = ["train.threads=1", "train.save_every=0", f"train.max_steps={opts.steps}", "train.batch_size=8"]
    lines = [
        f"{opts.steps} steps of each trainer on the tiny random Llama (2 layers, C 64, V 128), torch "
        f"{torch.__version__}; 1 process (FSDP2 over a mesh of one: whole weights) vs {n} sharded processes.",
        "",
        f"| trainer | max weight diff | max loss diff | state MiB/process, 1 | state MiB/process, {n} | "
        f"ratio | seconds 1 / {n} |",
        "|---|---|---|---|---|---|---|",
    ]
    print("\n".join(lines), flush=True)
    chosen = [name for name in opts.trainers.split(",") if name]
    for name, (template, sets) in ((name, TRAINERS[name]) for name in chosen):
        args = [part.format(**inputs) for part in template]
        runs = {}
        seconds = {}
        for processes in (1, n):
            runs[processes] = out / "runs" / f"{name.replace(' --', '_')}-{processes}"
            seconds[processes] = launch(
                processes, [*args, "--output", str(runs[processes])], [*common, *sets]
            )
        weight, loss = differences(runs[1], runs[n])
        mib = {p: train_rows(runs[p])[0]["state_mib"] for p in (1, n)}
        ratio = mib[n] / mib[1]
        line = (f"| {name} | {weight:.2e} | {loss:.2e} | {mib[1]:.3f} | {mib[n]:.3f} | {ratio:.3f} | "
                f"{seconds[1]:.0f} / {seconds[n]:.0f} |")  # fmt: skip
        lines.append(line)
        print(line, flush=True)
    # kill and resume, sharded: GRPO (sampling generator, AdamW moments, schedule), checkpoints every 2 steps
    args = [part.format(**inputs) for part in TRAINERS["grpo"][0]]
    sets = [*common, *TRAINERS["grpo"][1], "train.save_every=2", "train.max_steps=4"]
    whole, killed = out / "runs" / "resume-whole", out / "runs" / "resume-killed"
    launch(n, [*args, "--output", str(whole)], sets)
    launch(n, [*args, "--output", str(killed)], sets, kill_after=3)
    left = sorted(p.name for p in (killed / "checkpoints").iterdir())
    launch(n, [*args, "--output", str(killed)], sets)
    weight, loss = differences(whole, killed)
    tail = [
        "",
        f"Kill and resume, sharded ({n} processes): GRPO, 4 steps, a checkpoint every 2 (DCP shards), "
        f"SIGKILL after step 3 (left: {', '.join(left)}), the same command again: max weight diff "
        f"{weight:.2e}, max loss diff {loss:.2e} against the uninterrupted sharded run.",
    ]
    lines += tail
    print("\n".join(tail), flush=True)
    (out / "results.md").write_text("\n".join(lines) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
