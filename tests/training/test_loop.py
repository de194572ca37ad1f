"""The shared training loop: exact resume, accumulation and DDP equivalence, guards, atomic checkpoints."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from tests.helpers import Stop, max_diff, sft_config

from rlhfkit.errors import ConfigError, NonFiniteLossError, SaveError
from rlhfkit.trainers.sft import SFTTrainer, prepare_sft, run_sft
from rlhfkit.training.checkpoint import latest_checkpoint, list_checkpoints, read_checkpoint

STEPS = ["train.max_steps=8", "train.lr=3e-3", "train.warmup_steps=2", "train.batch_size=4"]


def train_steps(out: Path) -> list[int]:
    return [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()]


def test_resume_after_crash_equals_uninterrupted(tiny_model: Path, memory_data: Path, tmp_path: Path):
    reference = tmp_path / "reference"
    run_sft(sft_config(tiny_model, memory_data, reference, *STEPS))

    out = tmp_path / "resumed"
    cfg = sft_config(tiny_model, memory_data, out, *STEPS, "train.save_every=3")
    trainer = SFTTrainer(cfg, *prepare_sft(cfg))

    def crash(loop, metrics):
        if loop.step == 5:  # checkpoint at step 3 exists; steps 4 and 5 are lost with the process
            raise Stop

    trainer.callbacks.append(crash)
    with pytest.raises(Stop):
        trainer.run()
    assert [s for s, _ in list_checkpoints(out / "checkpoints")] == [3]
    assert not (out / "model.safetensors").exists()
    run_sft(cfg)  # the same command again: resumes from step 3 with model, optimizer, RNG, data position
    assert max_diff(reference, out) <= 1e-6
    assert train_steps(out) == list(range(1, 9))  # no duplicated metric lines for the redone steps


@pytest.mark.slow
def test_sigkill_at_any_moment_then_resume_equals_uninterrupted(
    tiny_model: Path, memory_data: Path, tmp_path: Path
):
    sets = ["train.max_steps=60", "train.lr=3e-3", "train.batch_size=4", "train.save_every=5"]
    reference = tmp_path / "reference"
    run_sft(sft_config(tiny_model, memory_data, reference, *sets))

    out = tmp_path / "killed"
    flags = [a for s in [*sets, "data.eval_fraction=0"] for a in ("--set", s)]
    cmd = [sys.executable, "-m", "rlhfkit.cli", "sft", "--model", str(tiny_model), "--data", str(memory_data),
           "--output", str(out), *flags]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not (out / "checkpoints" / "step-00000010").exists() and time.time() < deadline:
        time.sleep(0.005)
    os.kill(proc.pid, signal.SIGKILL)  # no chance to clean up: maybe in the middle of a checkpoint write
    proc.wait()
    assert not (out / "trainer_state.json").exists(), "the run finished before it could be killed"
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    assert max_diff(reference, out) <= 1e-6
    assert not [p for p in (out / "checkpoints").iterdir() if p.name.startswith(".tmp")]


def test_gradient_accumulation_equivalence(tiny_model: Path, memory_data: Path, tmp_path: Path):
    # batch 8 x 1 micro-batch == batch 8 as 4 micro-batches of 2 (the loss is normalised by the tokens of
    # the whole global batch, not averaged per micro-batch, so the sequences' different lengths cancel)
    sets = ["train.max_steps=4", "train.lr=3e-3", "train.batch_size=8"]
    run_sft(sft_config(tiny_model, memory_data, tmp_path / "a", *sets, "train.grad_accum=1"))
    run_sft(sft_config(tiny_model, memory_data, tmp_path / "b", *sets, "train.grad_accum=4"))
    assert max_diff(tmp_path / "a", tmp_path / "b") <= 1e-5
    assert max_diff(tmp_path / "a", tiny_model) > 1e-3  # and the weights did move


@pytest.mark.slow
def test_ddp_two_processes_gloo_equals_one_process(tiny_model: Path, memory_data: Path, tmp_path: Path):
    sets = ["train.max_steps=4", "train.lr=3e-3", "train.batch_size=8", "data.eval_fraction=0"]
    base = ["sft", "--model", str(tiny_model), "--data", str(memory_data)]
    flags = [a for s in sets for a in ("--set", s)]
    subprocess.run([sys.executable, "-m", "rlhfkit.cli", *base, "--output", str(tmp_path / "one"), *flags],
                   check=True, capture_output=True)  # fmt: skip
    failures = []
    for attempt in range(2):
        # Known flake, not reproduced alone (9 of 9 runs pass): in about one full-suite run of three, a rank
        # dies with SIGABRT inside gloo before training starts. One retry in a fresh directory; each rank's
        # own stderr is kept so a second failure shows why.
        two, logs = tmp_path / f"two-{attempt}", tmp_path / f"logs-{attempt}"
        launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                  "--log-dir", str(logs), "--redirects", "3"]  # fmt: skip
        proc = subprocess.run([*launch, "-m", "rlhfkit.cli", *base, "--output", str(two), *flags],
                              capture_output=True, text=True)  # fmt: skip
        if proc.returncode == 0:
            break
        ranks = "\n".join(f"{p}: {p.read_text()[-1500:]}" for p in sorted(logs.rglob("stderr.log")))
        failures.append(f"attempt {attempt}: {proc.stderr[-800:]}\n{ranks}")
    assert proc.returncode == 0, "\n\n".join(failures)
    assert max_diff(tmp_path / "one", two) <= 1e-5
    assert max_diff(tmp_path / "one", tiny_model) > 1e-3


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(
    tiny_model: Path, memory_data: Path, tmp_path: Path
):
    out = tmp_path / "nan"
    cfg = sft_config(tiny_model, memory_data, out, *STEPS, "train.save_every=2")
    trainer = SFTTrainer(cfg, *prepare_sft(cfg))
    plain_loss = trainer.loss

    def poisoned(model, batch):
        loss, metrics = plain_loss(model, batch)
        return (loss * float("nan") if trainer.step == 4 else loss), metrics

    trainer.loss = poisoned
    with pytest.raises(NonFiniteLossError, match=r"non-finite loss at step 5 .*update was not applied"):
        trainer.run()
    tensors, state = read_checkpoint(out / "checkpoints" / "step-00000004")
    assert state["step"] == 4
    for name, param in trainer.model.named_parameters():  # the poisoned update was not applied
        assert torch.equal(param.detach(), tensors[name]), name
        assert torch.isfinite(param).all()


def test_config_change_refuses_to_resume(tiny_model: Path, memory_data: Path, tmp_path: Path):
    out = tmp_path / "run"
    run_sft(sft_config(tiny_model, memory_data, out, "train.max_steps=2"))
    with pytest.raises(ConfigError, match=r"different configuration \(train.lr: 2e-05 -> 0.001\)"):
        run_sft(sft_config(tiny_model, memory_data, out, "train.max_steps=2", "train.lr=1e-3"))
    assert run_sft(sft_config(tiny_model, memory_data, out, "train.max_steps=2")) == {}  # finished: skipped


def test_crash_during_checkpoint_write_leaves_previous_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    from rlhfkit.training import checkpoint

    root = tmp_path / "checkpoints"
    weights = {"w": torch.arange(4.0)}
    checkpoint.write_checkpoint(root, 1, weights, {"step": 1, "t": torch.ones(2)}, keep=2)

    def broken(tensors, path):
        Path(path).write_bytes(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(checkpoint, "save_file", broken)
    with pytest.raises(SaveError, match=r"^disk full while writing checkpoint .*step-00000002$"):
        checkpoint.write_checkpoint(root, 2, weights, {"step": 2}, keep=2)  # one line, no traceback
    assert [s for s, _ in checkpoint.list_checkpoints(root)] == [1]
    tensors, state = checkpoint.read_checkpoint(root / "step-00000001")
    assert (
        torch.equal(tensors["w"], weights["w"])
        and state["step"] == 1
        and torch.equal(state["t"], torch.ones(2))
    )


def test_state_round_trip_keeps_types():
    from rlhfkit.training.checkpoint import flatten_state, unflatten_state

    state = {
        "a": 1,
        "b": [1.5, None, "x"],
        3: {"t": torch.tensor([1, 2])},
        "g": torch.Generator().get_state(),
    }
    data, tensors = flatten_state(state)
    json.dumps(data)  # JSON-able
    back = unflatten_state(json.loads(json.dumps(data)), tensors)
    assert (
        back["a"] == 1 and back["b"] == [1.5, None, "x"] and torch.equal(back[3]["t"], torch.tensor([1, 2]))
    )
    assert torch.equal(back["g"], state["g"])


def test_rollout_engine_samples_from_the_weights_of_each_step(
    tiny_model: Path, memory_data: Path, tmp_path: Path
):
    """The fused AdamW kernel writes parameters in place without bumping their version counters; the loop
    bumps them, or the engine's derived weights (built before training) would go stale."""
    from tests.helpers import sequence_logprobs

    from rlhfkit.rollout import RolloutEngine, SamplingConfig

    cfg = sft_config(tiny_model, memory_data, tmp_path / "out", "train.max_steps=2", "train.lr=5e-2")
    train, _ = prepare_sft(cfg)
    trainer = SFTTrainer(cfg, train, [])
    engine = RolloutEngine(trainer.model, tokenizer=trainer.tokenizer)
    assert engine.fast_path
    prompts = [ex.input_ids[: ex.answer_start] for ex in train[:3]]
    sampling = SamplingConfig(max_new_tokens=6, temperature=1.0, stop_at_eos=False)
    errors = []

    def check(loop: SFTTrainer, metrics: dict[str, float]) -> None:
        r = engine.generate(prompts, sampling, torch.Generator().manual_seed(0))
        with torch.no_grad():
            ref = sequence_logprobs(loop.model, r.input_ids, r.attention_mask, r.completion_start)
        errors.append(float((r.logprobs - ref).abs().max()))

    engine.generate(prompts, sampling, torch.Generator().manual_seed(0))  # builds the derived weights
    trainer.callbacks.append(check)
    trainer.run()
    assert len(errors) == 2 and max(errors) < 1e-5, errors


def test_every_reduced_value_lives_on_the_runs_device(
    tiny_model: Path, memory_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    """NCCL, the backend of every GPU launch, all-reduces device tensors only; gloo takes CPU ones, so a real
    CPU launch cannot tell. One step as a pretend process of two on a pretend device ("meta": a tensor built
    on the CPU shows there) records where each tensor handed to the all-reduce lives."""
    cfg = sft_config(tiny_model, memory_data, tmp_path / "out", "train.max_steps=1", "train.batch_size=8")
    trainer = SFTTrainer(cfg, *prepare_sft(cfg))
    seen: list[torch.device] = []

    def reduce(tensor: torch.Tensor, reduction: str = "sum") -> torch.Tensor:
        seen.append(tensor.device)
        return torch.ones(1, dtype=torch.float64)  # a meta tensor has no value to sum: any finite one

    monkeypatch.setattr(trainer.accelerator, "reduce", reduce)
    trainer.world, trainer.device = 2, torch.device("meta")
    trainer.to_device = lambda batch: batch  # the batches stay where the model is
    trainer.optimize(trainer.micro_batches(trainer.step_examples(0)), trainer.loss)
    assert len(seen) >= 3 and set(seen) == {torch.device("meta")}, seen


@pytest.mark.slow
def test_two_process_rl_resume_restores_each_ranks_streams(tiny_model: Path, tmp_path: Path):
    """Each process samples from its own generator (seeded by rank) and RNG streams: a 2-process gloo GRPO
    run killed after a checkpoint and resumed equals the uninterrupted 2-process run only if the checkpoint
    holds every rank's state and each rank gets its own back (not rank 0's)."""
    import psutil
    from tests.helpers import grpo_prompts_file

    sets = ["sampling.max_new_tokens=8", "sampling.temperature=1.0", "prompts_per_step=4", "sample_every=0",
            "num_generations=4", "train.max_steps=8", "train.lr=1e-2", "train.save_every=2"]  # fmt: skip
    flags = [a for s in sets for a in ("--set", s)]
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
              "rlhfkit.cli", "grpo", "--policy", str(tiny_model),
              "--prompts", str(grpo_prompts_file(tmp_path)), "--reward-fn", "tests.helpers:count_target",
              *flags]  # fmt: skip

    def run(out: Path) -> None:
        proc = subprocess.run([*launch, "--output", str(out)], capture_output=True, text=True)
        # the gloo flake of the DDP test above, at exit: a rank may abort (SIGABRT) once the run finished
        finished = (out / "trainer_state.json").is_file()
        assert proc.returncode == 0 or (finished and "exitcode: -6" in proc.stderr), proc.stderr[-3000:]

    run(tmp_path / "reference")
    out = tmp_path / "killed"
    proc = subprocess.Popen([*launch, "--output", str(out)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)  # fmt: skip
    deadline = time.time() + 300
    while not (out / "checkpoints" / "step-00000002").exists() and time.time() < deadline:
        time.sleep(0.005)
    launcher = psutil.Process(proc.pid)
    victims = [*launcher.children(recursive=True), launcher]  # the ranks run in sessions of their own
    for victim in victims:
        victim.kill()  # SIGKILL, mid-run
    psutil.wait_procs(victims, timeout=30)
    proc.wait()
    assert not (out / "trainer_state.json").exists(), "the run finished before it could be killed"
    state = read_checkpoint(latest_checkpoint(out / "checkpoints"))[1]
    assert len(state["ranks"]) == 1  # rank 1's RNG and generator, beside rank 0's
    assert not torch.equal(state["ranks"][0]["extra"]["generator"], state["extra"]["generator"])
    run(out)  # the same command again: resumes
    assert max_diff(tmp_path / "reference", out) <= 1e-6
    scores = [[r["score"] for r in map(json.loads, (d / "metrics.jsonl").read_text().splitlines())]
              for d in (tmp_path / "reference", out)]  # fmt: skip
    assert scores[0] == scores[1]
