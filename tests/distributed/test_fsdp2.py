"""Sharded training (`train.sharding=fsdp2`) on two CPU processes over gloo, launched with torchrun as users
launch it: every trainer's two-process sharded run equals its one-process unsharded run (weights after
several steps, logged losses), a sharded run killed with SIGKILL resumes on two processes and on one and
ends where an uninterrupted run ends, and the saved models load in plain transformers.

The one-process runs go in this process (the command line through typer's runner); the sharded ones through
`tests/distributed/launch.py` under `python -m torch.distributed.run --standalone`, one at a time."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tests.conftest import MEMORY_ROWS, read_metrics, write_jsonl
from tests.helpers import good_word_pairs, grpo_prompts_file, max_diff
from typer.testing import CliRunner

from rlhfkit.cli import app

pytestmark = [pytest.mark.distributed, pytest.mark.usefixtures("one_thread")]

ROOT = Path(__file__).resolve().parents[2]
LAUNCH = Path(__file__).with_name("launch.py")
COMMON = ["train.threads=1", "train.save_every=0", "train.max_steps=3", "train.batch_size=8"]
RL = ["sampling.max_new_tokens=8", "sampling.temperature=1.0", "sample_every=0", "train.lr=1e-4"]
PPO = ["rollout_batch=8", "ppo_epochs=2", "no_eos_score=null", "reward_fn=tests.helpers:count_target"]
GROUPS = ["prompts_per_step=4", "num_generations=4", "reward_fn=tests.helpers:count_target"]
ENV = [
    "env=tests.trainers.test_agent_rl:LetterEnv", "agent.max_new_tokens=6", "agent.max_turns=2",
    "agent.max_tokens=120", "prompts_per_step=2", "num_generations=4",
]  # fmt: skip
# stage -> (command, model option, data option or None, settings)
STAGES: dict[str, tuple[str, str, str | None, list[str]]] = {
    "sft": ("sft", "--model", "sft", ["data.eval_fraction=0.25", "train.lr=1e-3"]),
    "rm": ("rm", "--model", "pairs", ["data.eval_fraction=0.25", "train.lr=1e-3"]),
    "dpo": ("dpo", "--policy", "pairs", ["data.eval_fraction=0.25", "train.lr=1e-4"]),
    "ppo": ("ppo", "--policy", "prompts", [*RL, *PPO]),
    "grpo": ("grpo", "--policy", "prompts", [*RL, *GROUPS, "num_iterations=2"]),
    # the trainer's own log-probs as the old ones: their distance to the sampler's is logged (mismatch_*)
    "rloo": ("rloo", "--policy", "prompts", [*RL, *GROUPS, "old_logprobs=trainer"]),
    "grpo_env": ("grpo", "--policy", None, [*RL, *ENV]),
}


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("dist-data")
    return {
        "sft": write_jsonl(root / "sft.jsonl", MEMORY_ROWS),
        "pairs": write_jsonl(root / "pairs.jsonl", good_word_pairs(16, 0)),
        "prompts": grpo_prompts_file(root, 16),
    }


def command(stage: str, model: Path, files: dict[str, Path], out: Path, *sets: str) -> list[str]:
    name, model_option, data, settings = STAGES[stage]
    args = [name, model_option, str(model), "--output", str(out)]
    if data is not None:
        args += ["--prompts" if data == "prompts" else "--data", str(files[data])]
    return args + [x for s in [*COMMON, *settings, *sets] for x in ("--set", s)]


def run_here(args: list[str]) -> None:
    """One process, no sharding: the reference run."""
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output


def torchrun(processes: int, args: list[str], kill_after: int = 0) -> subprocess.CompletedProcess:
    """`args` under torchrun on `processes` CPU processes, sharded; with `kill_after`, SIGKILLed after that
    step (torchrun then fails)."""
    kill = ["--kill-after", str(kill_after)] if kill_after else []
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={processes}",
           str(LAUNCH), *kill, *args, "--set", "train.sharding=fsdp2"]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "NO_COLOR": "1"}
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    if not kill_after:
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]
    return done


def losses(out: Path) -> list[float]:
    return [row["loss"] for row in read_metrics(out, "train")]


def assert_same_losses(a: Path, b: Path) -> None:
    la, lb = losses(a), losses(b)
    assert len(la) == len(lb) == 3
    assert la == pytest.approx(lb, rel=1e-4, abs=1e-5)


@pytest.mark.parametrize("stage", list(STAGES))
def test_two_sharded_processes_train_as_one(stage: str, tiny_model: Path, files: dict, tmp_path: Path):
    one, two = tmp_path / "one", tmp_path / "two"
    run_here(command(stage, tiny_model, files, one))
    torchrun(2, command(stage, tiny_model, files, two))
    assert max_diff(one, two) < 1e-5
    start, end = _weights(tiny_model), _weights(one)
    assert max(float((end[k] - start[k]).abs().max()) for k in start.keys() & end.keys()) > 1e-4  # trained
    assert_same_losses(one, two)
    train = read_metrics(two, "train")
    # each process holds about half of the parameters, gradients and AdamW state (uneven shards: +5%)
    numel = sum(t.numel() for d in (two, two / "value") if d.is_dir() for t in _weights(d).values())
    whole = numel * 4 * 4  # float32 parameters, gradients, two moments
    assert whole / 2 <= train[0]["state_mib"] * 2**20 <= whole / 2 * 1.1 + 1024
    if stage == "ppo":
        assert max_diff(one / "value", two / "value") < 1e-5
    if stage == "rloo":  # the trainer's log-probs from sharded weights equal the sampler's from gathered ones
        assert max(row["mismatch_logprob_abs_max"] for row in train) < 1e-5
    if stage in ("sft", "rm", "dpo"):
        assert [r["loss"] for r in read_metrics(one, "eval")] == pytest.approx(
            [r["loss"] for r in read_metrics(two, "eval")], rel=1e-5
        )
    if stage == "rm":  # the calibration on gathered weights: the same shift in the saved config
        shifts = [json.loads((d / "config.json").read_text())["rlhfkit_reward_shift"] for d in (one, two)]
        assert shifts[0] == pytest.approx(shifts[1], abs=1e-5)
    if stage in ("sft", "rm"):  # the gathered weights saved as a plain transformers model
        _assert_loads_in_transformers(two, reward=stage == "rm")


def _assert_loads_in_transformers(out: Path, reward: bool) -> None:
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    auto = AutoModelForSequenceClassification if reward else AutoModelForCausalLM
    model = auto.from_pretrained(out).eval()
    saved = _weights(out)
    state = model.state_dict()
    assert saved and all(torch.equal(state[k], v) for k, v in saved.items())
    with torch.no_grad():
        out_logits = model(torch.tensor([[5, 6, 7, 8, 9]])).logits  # (1, 5, V) or (1, 1)
    assert bool(torch.isfinite(out_logits).all())


def _weights(out: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(out / "model.safetensors"))


def test_sharded_run_killed_resumes_on_two_and_on_one_process(tiny_model: Path, files: dict, tmp_path: Path):
    """GRPO (sampling generator, optimizer moments, schedule): SIGKILL after step 3 of 4, checkpoints every
    2 steps (DCP shards); the same command resumes from step 2 on 2 processes, a copy of the run directory on
    1 process, and both end with the weights and losses of an uninterrupted one-process run."""
    sets = ["train.save_every=2", "train.max_steps=4", "train.scheduler=cosine"]
    whole, two = tmp_path / "whole", tmp_path / "two"
    run_here(command("grpo", tiny_model, files, whole, *sets))
    died = torchrun(2, command("grpo", tiny_model, files, two, *sets), kill_after=3)
    assert died.returncode != 0
    checkpoint = two / "checkpoints" / "step-00000002"
    assert (checkpoint / "sharded" / ".metadata").is_file() and (checkpoint / "state.json").is_file()
    assert not (two / "model.safetensors").exists()  # it never finished
    kept = tmp_path / "kept"
    shutil.copytree(two, kept)
    for processes in (2, 1):  # the same command; then again from the same checkpoint, on one process
        shutil.rmtree(two)
        shutil.copytree(kept, two)
        done = torchrun(processes, command("grpo", tiny_model, files, two, *sets))
        assert "resuming from" in done.stdout + done.stderr and "(step 2)" in done.stdout + done.stderr
        assert max_diff(whole, two) < 1e-5
        assert losses(two) == pytest.approx(losses(whole), rel=1e-4, abs=1e-5)
        assert len(losses(two)) == 4  # the steps after the checkpoint were logged once, not twice


def test_sharding_refuses_lora_in_one_line(tiny_model: Path, files: dict, tmp_path: Path):
    result = CliRunner().invoke(
        app, command("sft", tiny_model, files, tmp_path / "x", "train.sharding=fsdp2", "lora.enabled=true")
    )
    assert result.exit_code == 2
    assert "train.sharding=fsdp2 with LoRA is not supported" in result.output
