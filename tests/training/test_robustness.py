"""Failure handling users can trust (issue 19): every bad setting and oversized or invalid text is one line
naming the key or file:line:field with exit 2 and nothing written; divergence stops the run and keeps the
last good checkpoint; a stopped run resumes with a lower learning rate; I/O errors while saving are one
line; non-finite rewards name their source."""

from __future__ import annotations

import errno
import json
import math
import resource
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from tests.conftest import write_jsonl
from tests.helpers import sft_config
from typer.testing import CliRunner

from rlhfkit.cli import app
from rlhfkit.errors import DivergenceError, SaveError
from rlhfkit.trainers.sft import SFTTrainer, prepare_sft, run_sft
from rlhfkit.training.checkpoint import list_checkpoints

pytestmark = pytest.mark.usefixtures("one_thread")


def sft_cli(model: Path, data: Path, out: Path, *sets: str, extra: tuple[str, ...] = ()) -> tuple[int, str]:
    flags = [a for s in ["data.eval_fraction=0", "train.threads=1", *sets] for a in ("--set", s)]
    args = ["sft", "--model", str(model), "--data", str(data), "--output", str(out), *flags, *extra]
    result = CliRunner().invoke(app, args)
    return result.exit_code, result.output


def error_line(output: str) -> str:
    """The one line a user error prints (progress lines before it aside), and no traceback."""
    assert "Traceback" not in output, output
    lines = [ln for ln in output.strip().splitlines() if ln.startswith("error")]
    assert len(lines) == 1, output
    assert lines[0].startswith("error: ") and output.strip().endswith(lines[0]), output
    return lines[0]


# ------------------------------------------------------------------------------------------- settings
BAD_SETTINGS = [
    ("train.batch_size=0", "train.batch_size: must be >= 1, got 0"),
    ("train.max_steps=-5", "train.max_steps: must be >= 0, got -5"),
    ("train.lr=-1e-3", "train.lr: must be > 0, got -0.001"),
    ("train.lr=.nan", "train.lr: expected a finite number, got nan"),
    ("train.lr=.inf", "train.lr: expected a finite number, got inf"),
    ("data.eval_fraction=1.5", "data.eval_fraction: must be >= 0 and < 1, got 1.5"),
    ("train.threads=-2", "train.threads: must be >= 0, got -2"),
    ("train.grad_accum=0", "train.grad_accum: must be >= 1, got 0"),
    ("train.save_every=-1", "train.save_every: must be >= 0, got -1"),
    ("train.keep_checkpoints=0", "train.keep_checkpoints: must be >= 1, got 0"),
    ("train.warmup_steps=-1", "train.warmup_steps: must be >= 0, got -1"),
    ("train.epochs=0", "train.epochs: must be > 0, got 0.0"),
    ("train.max_grad_norm=-1", "train.max_grad_norm: must be >= 0, got -1.0"),
    ("train.scheduler=bogus", "train.scheduler: 'bogus' is not one of 'constant', 'linear', 'cosine'"),
    ("train.guard.spike_factor=0.5", "train.guard.spike_factor: must be > 1, got 0.5"),
    ("data.max_length=1", "data.max_length: must be >= 2, got 1"),
    ("lora.r=0", "lora.r: must be >= 1, got 0"),
    ("lora.dropout=1.0", "lora.dropout: must be >= 0 and < 1, got 1.0"),
    ("train.batch_size=2.5", "train.batch_size: expected an integer, got 2.5"),
]


@pytest.mark.parametrize(("setting", "message"), BAD_SETTINGS, ids=[s for s, _ in BAD_SETTINGS])
def test_every_bad_setting_is_one_line_naming_the_key(
    tiny_model: Path, memory_data: Path, tmp_path: Path, setting: str, message: str
):
    out = tmp_path / "out"
    code, output = sft_cli(tiny_model, memory_data, out, setting)
    assert code == 2
    assert error_line(output) == f"error: {message}"
    assert not out.exists()  # nothing written: the corrected command finds a clean directory
    code, _ = sft_cli(tiny_model, memory_data, out, "train.max_steps=1")
    assert code == 0


@pytest.mark.parametrize(
    ("setting", "message"),
    [("sampling.temperature=-1", "sampling.temperature: must be >= 0"),
     ("sampling.top_p=0", "sampling.top_p: must be > 0 and <= 1"),
     ("num_generations=1", "num_generations: must be >= 2"),
     ("beta=-0.1", "beta: must be >= 0")],
)  # fmt: skip
def test_rl_settings_are_checked_before_anything_runs(tiny_model: Path, tmp_path: Path, setting, message):
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "hi"}])
    out = tmp_path / "out"
    args = ["grpo", "--policy", str(tiny_model), "--prompts", str(prompts), "--output", str(out),
            "--reward-fn", "tests.helpers:constant", "--set", setting]  # fmt: skip
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2
    assert error_line(result.output).startswith(f"error: {message}")
    assert not out.exists()


# ------------------------------------------------------------------------------------------- texts
@pytest.mark.slow
def test_a_10_mb_record_is_refused_before_tokenising_in_little_memory(tiny_model: Path, tmp_path: Path):
    rows = [{"prompt": "Item 1?", "completion": "ok."}, {"prompt": "Item 2?", "completion": "x" * 10_000_000}]
    data = write_jsonl(tmp_path / "huge.jsonl", rows)
    out = tmp_path / "out"
    # the peak is read in the child from /proc/self/status (VmHWM: this process image's own high-water
    # mark; rusage would also count the pages of the big pytest process it was forked from)
    peak_file = tmp_path / "peak.txt"
    wrapper = (
        "import atexit, re, sys\n"
        "def peak():\n"
        "    status = open('/proc/self/status').read()\n"
        f"    open({str(peak_file)!r}, 'w').write(re.search(r'VmHWM:\\s+(\\d+)', status).group(1))\n"
        "atexit.register(peak)\n"
        "from rlhfkit.cli import app\n"
        "sys.argv = ['rlhfkit', *sys.argv[1:]]\n"
        "app()\n"
    )
    cmd = [sys.executable, "-c", wrapper, "sft", "--model", str(tiny_model), "--data", str(data),
           "--output", str(out)]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr
    line = error_line(done.stderr)
    assert line.startswith(
        f"error: {data}:2: field 'completion': is 10000007 characters long with its prompt"
    )
    assert not out.exists()
    peak = int(peak_file.read_text()) * 1024  # kB
    assert 100 << 20 < peak < 1 << 30, f"peak RSS {peak / 2**20:.0f} MiB"  # a real reading, under 1 GiB


def test_truncation_cuts_a_huge_answer_before_tokenising(tiny_model: Path, tmp_path: Path):
    rows = [{"prompt": "Item 1?", "completion": "ab" * 2_000_000}, {"prompt": "Item 2?", "completion": "ok."}]
    data = write_jsonl(tmp_path / "huge.jsonl", rows)
    cfg = sft_config(tiny_model, data, tmp_path / "o", "data.max_length=40", "data.truncation=true")
    train, _ = prepare_sft(cfg)
    assert len(train[0]) == 40  # cut to max_length, from a text cut to characters first


def test_a_lone_surrogate_is_one_line_naming_line_and_field(tiny_model: Path, tmp_path: Path):
    data = tmp_path / "bad.jsonl"
    data.write_text(
        '{"prompt": "fine", "completion": "ok"}\n{"prompt": "bad \\ud800 text", "completion": "ok"}\n'
    )
    code, output = sft_cli(tiny_model, data, tmp_path / "out")
    assert code == 2
    assert error_line(output) == (
        f"error: {data}:2: field 'prompt': is not valid Unicode: "
        "surrogates not allowed ('\\ud800' at character 4)"
    )


def test_score_refuses_an_answer_longer_than_the_context(tiny_model: Path, tmp_path: Path):
    from rlhfkit.models.loading import build_reward_model, save_model

    rm_dir = tmp_path / "rm"
    save_model(*build_reward_model(str(tiny_model)), rm_dir)
    data = write_jsonl(
        tmp_path / "a.jsonl",
        [{"prompt": "q", "completion": "ok"}, {"prompt": "q", "completion": "y" * 1_000_000}],
    )
    result = CliRunner().invoke(
        app, ["score", "--reward", str(rm_dir), "--data", str(data), "--output", str(tmp_path / "s.jsonl")]
    )
    assert result.exit_code == 2
    assert error_line(result.output).startswith(
        f"error: {data}:2: field 'completion': is 1000001 characters long"
    )
    assert not (tmp_path / "s.jsonl").exists()
    result = CliRunner().invoke(
        app, ["score", "--reward", str(rm_dir), "--data", str(data), "--max-length", "64"]
    )
    assert error_line(result.output).startswith(f"error: {data}:2: field 'completion'")


def test_an_rl_prompt_of_10_mb_is_refused_on_characters(tiny_model: Path, tmp_path: Path):
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "hi"}, {"prompt": "z" * 10_000_000}])
    out = tmp_path / "out"
    args = ["grpo", "--policy", str(tiny_model), "--prompts", str(prompts), "--output", str(out),
            "--reward-fn", "tests.helpers:constant"]  # fmt: skip
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2
    assert error_line(result.output) == (
        f"error: {prompts}:2: field 'prompt': is 10000000 characters long, "
        "far more than max_prompt_length=256 tokens hold"
    )
    assert not out.exists()


# ------------------------------------------------------------------------------------------- divergence
def test_divergence_stops_keeps_the_good_checkpoint_and_resumes_with_a_lower_lr(
    tiny_model: Path, memory_data: Path, tmp_path: Path
):
    out = tmp_path / "run"
    sets = (
        "train.max_steps=6",
        "train.batch_size=4",
        "train.save_every=1",
        "train.lr=1e3",
        "train.warmup_steps=0",
    )
    code, output = sft_cli(tiny_model, memory_data, out, *sets)
    assert code == 2
    line = error_line(output)
    assert "error: training diverged: loss " in line and "at step 2 is" in line
    assert f"the last good checkpoint is {out / 'checkpoints' / 'step-00000000'}" not in line  # no step 0
    assert "no good checkpoint was written" in line or "the last good checkpoint is" in line
    assert not (out / "model.safetensors").exists()  # the collapsed model is never saved as the result
    # the weights after step 1 made the spike: that checkpoint is set aside, never resumed from
    assert list_checkpoints(out / "checkpoints") == []
    assert (out / "checkpoints" / "diverged-step-00000001").is_dir()

    # the advice works: the same command with a lower learning rate and --resume-with-changes
    code, output = sft_cli(tiny_model, memory_data, out, *sets[:-2], "train.lr=3e-3", "train.warmup_steps=0",
                           extra=("--resume-with-changes",))  # fmt: skip
    assert code == 0, output
    assert "resuming with a changed setting: train.lr: 1000.0 -> 0.003" in output
    history = [json.loads(x) for x in (out / "config_history.jsonl").read_text().splitlines()]
    assert history[-1]["changes"] == ["train.lr: 1000.0 -> 0.003"]
    assert (out / "model.safetensors").exists()
    losses = [json.loads(x)["loss"] for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == 6 and all(math.isfinite(v) and v < 10 for v in losses)


def test_resume_with_changes_refuses_an_unsafe_change_naming_the_key(
    tiny_model: Path, memory_data: Path, tmp_path: Path
):
    out = tmp_path / "run"
    assert sft_cli(tiny_model, memory_data, out, "train.max_steps=2", "train.batch_size=4")[0] == 0
    code, output = sft_cli(tiny_model, memory_data, out, "train.max_steps=2", "train.batch_size=8",
                           extra=("--resume-with-changes",))  # fmt: skip
    assert code == 2
    assert "cannot resume with train.batch_size changed (4 -> 8)" in error_line(output)
    code, output = sft_cli(tiny_model, memory_data, out, "train.max_steps=2", "train.lr=1e-4")
    assert code == 2 and "--resume-with-changes" in error_line(output)  # the refusal says what to do


def test_resume_with_a_lower_lr_continues_from_the_checkpoint(
    tiny_model: Path, memory_data: Path, tmp_path: Path
):
    """A run stopped at step 3 and resumed with another lr equals a run whose lr changed at step 3."""
    sets = ["train.max_steps=6", "train.batch_size=4", "train.save_every=3", "train.scheduler=constant"]

    class Stop(Exception):
        pass

    out = tmp_path / "run"
    cfg = sft_config(tiny_model, memory_data, out, *sets, "train.lr=3e-3")
    trainer = SFTTrainer(cfg, *prepare_sft(cfg))

    def stop(loop, metrics):
        if loop.step == 3:
            raise Stop

    trainer.callbacks.append(stop)
    with pytest.raises(Stop):
        trainer.run()
    code, _ = sft_cli(tiny_model, memory_data, out, *sets, "train.lr=1e-3", extra=("--resume-with-changes",))
    assert code == 0
    lrs = [json.loads(x)["lr"] for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert lrs == [3e-3] * 3 + [1e-3] * 3


def test_the_guard_sees_dead_gradients_and_a_uniform_model(
    tiny_model: Path, memory_data: Path, tmp_path: Path
):
    cfg = sft_config(tiny_model, memory_data, tmp_path / "o", "train.guard.zero_grad_steps=3")
    trainer = SFTTrainer(cfg, *prepare_sft(cfg))
    trainer.output_dir.mkdir(parents=True)
    trainer.check_divergence(4.0, 0.5)
    trainer.step = 1
    trainer.check_divergence(3.9, 0.0)  # one zero gradient norm: could be chance
    trainer.step = 2
    trainer.check_divergence(3.9, 0.0)
    trainer.step = 3
    with pytest.raises(DivergenceError, match="the gradient norm has been 0 since step 2"):
        trainer.check_divergence(3.9, 0.0)
    fresh = SFTTrainer(cfg, *prepare_sft(cfg))
    with pytest.raises(DivergenceError, match="predicts the uniform distribution"):
        fresh.check_divergence(fresh.uniform_loss, 0.0)
    fresh.check_divergence(fresh.uniform_loss, 0.3)  # a random model is near uniform but still learns
    off = SFTTrainer(
        sft_config(tiny_model, memory_data, tmp_path / "p", "train.guard.enabled=false"), *prepare_sft(cfg)
    )
    off.check_divergence(1e9, 0.0)  # off means off


# ------------------------------------------------------------------------------------------- rewards
def nan_for_long(prompts, completions, **fields):
    return [float("nan") if len(c) > 3 else 1.0 for c in completions]


def test_a_nan_reward_names_the_function_and_the_rows(tiny_model: Path, tmp_path: Path):
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"prompt": f"question {i}"} for i in range(4)])
    out = tmp_path / "out"
    args = ["grpo", "--policy", str(tiny_model), "--prompts", str(prompts), "--output", str(out),
            "--reward-fn", "tests.training.test_robustness:nan_for_long", "--set", "prompts_per_step=2",
            "--set", "num_generations=2", "--set", "sampling.max_new_tokens=8",
            "--set", "sampling.temperature=1.0", "--set", "train.threads=1"]  # fmt: skip
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2
    line = error_line(result.output)
    assert (
        "reward 'nan_for_long' (tests.training.test_robustness:nan_for_long) returned non-finite scores"
        in line
    )
    assert f"(prompt {prompts}:" in line and "nan)" in line
    assert "iteration 1 was not trained on and no checkpoint was written yet" in line


# ------------------------------------------------------------------------------------------- disk
def test_disk_full_during_a_checkpoint_is_one_line_and_the_run_resumes(
    tiny_model: Path, memory_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    from rlhfkit.training import checkpoint

    sets = ["train.max_steps=6", "train.batch_size=4", "train.save_every=2", "train.lr=3e-3"]
    reference = tmp_path / "reference"
    run_sft(sft_config(tiny_model, memory_data, reference, *sets))
    out = tmp_path / "run"
    real_save = checkpoint.save_file
    calls = []

    def full_disk(tensors, path, *args, **kwargs):
        calls.append(path)
        if "step-00000004" in path:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(tensors, path, *args, **kwargs)

    monkeypatch.setattr(checkpoint, "save_file", full_disk)
    with pytest.raises(SaveError) as info:
        run_sft(sft_config(tiny_model, memory_data, out, *sets))
    message = str(info.value)
    assert message.startswith(f"disk full while writing checkpoint {out / 'checkpoints' / 'step-00000004'}")
    assert f"the last good checkpoint is {out / 'checkpoints' / 'step-00000002'}" in message
    assert not [
        p for p in (out / "checkpoints").iterdir() if p.name.startswith(".tmp")
    ]  # nothing half-written
    monkeypatch.setattr(checkpoint, "save_file", real_save)  # space freed: the same command resumes exactly
    run_sft(sft_config(tiny_model, memory_data, out, *sets))
    from tests.helpers import max_diff

    assert max_diff(reference, out) <= 1e-6


@pytest.mark.slow
def test_a_real_write_failure_of_the_final_model_is_one_line(
    tiny_model: Path, memory_data: Path, tmp_path: Path
):
    """The kernel refuses a file over RLIMIT_FSIZE (EFBIG): the final save fails for real, mid-write."""
    out = tmp_path / "run"
    weights = (tiny_model / "model.safetensors").stat().st_size

    def limit_file_size():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write fails with EFBIG instead of killing us
        resource.setrlimit(resource.RLIMIT_FSIZE, (weights // 2, weights // 2))

    cmd = [sys.executable, "-m", "rlhfkit.cli", "sft", "--model", str(tiny_model), "--data", str(memory_data),
           "--output", str(out), "--set", "train.max_steps=2", "--set", "data.eval_fraction=0"]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, preexec_fn=limit_file_size, timeout=300)
    assert done.returncode == 2, done.stderr
    line = error_line(done.stderr)
    assert line.startswith(f"error: File too large while writing the model to {out}")
    assert "no checkpoint was written yet" in line
    assert not (out / "model.safetensors").exists() and not list(out.glob(".model-*"))
