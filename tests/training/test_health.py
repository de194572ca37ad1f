"""RL health (rlhfkit.training.health): runs that loop, blow up their KL or collapse their entropy say so,
as a warning or by stopping at the last good checkpoint; healthy runs of every RL trainer trigger nothing."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from tests.conftest import write_jsonl

from rlhfkit.config import load_config
from rlhfkit.errors import HealthError
from rlhfkit.trainers.grpo import GRPOConfig, RLOOConfig, run_grpo
from rlhfkit.trainers.ppo import PPOConfig, run_ppo
from rlhfkit.training.health import HealthConfig, HealthMonitor, repeat_share


def most_common_char(prompts: list[str], completions: list[str], **fields) -> list[float]:
    """Pays for repetition: the share of the answer's characters that are its most common one."""
    out = []
    for c in completions:
        chars = c.replace(" ", "")
        out.append(max((chars.count(x) for x in set(chars)), default=0) / max(len(chars), 1))
    return out


def one_answer(prompts: list[str], completions: list[str], **fields) -> list[float]:
    """Pays for one fixed answer, "abab", character by character."""
    return [sum(a == b for a, b in zip(c.replace(" ", ""), "abab", strict=False)) / 4 for c in completions]


def length_mod_3(prompts: list[str], completions: list[str], **fields) -> list[float]:
    return [float(len(c) % 3) for c in completions]


def run(cls: type, model: Path, tmp_path: Path, name: str, *sets: str) -> Path:
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"prompt": f"Write {i}."} for i in range(16)])
    out = tmp_path / name
    base = [
        f"policy={model}", f"prompts={prompts}", f"output={out}", "sampling.max_new_tokens=16",
        "sampling.temperature=1.0", "sample_every=0", "train.save_every=0",
    ]  # fmt: skip
    if cls in (GRPOConfig, RLOOConfig):
        base += ["prompts_per_step=4", "num_generations=4"]
    cfg = load_config(cls, None, base + list(sets))
    (run_ppo if cls is PPOConfig else run_grpo)(cfg)
    return out


def rows(out: Path) -> list[dict]:
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if '"train"' in x]


def fired(out: Path, check: str) -> list[int]:
    return [r["step"] for r in rows(out) if r.get(f"health_{check}")]


# ---- the checks, by hand ------------------------------------------------------------------------------
def test_repeat_share_counts_rows_with_an_ngram_said_often_enough():
    ids = torch.tensor(
        [[1, 2, 3, 1, 2, 3, 1, 2, 3], [1, 2, 3, 4, 5, 6, 7, 8, 9], [1, 2, 1, 2, 1, 2, 0, 0, 0]]
    )
    mask = torch.tensor([[1] * 9, [1] * 9, [1] * 6 + [0] * 3])
    assert repeat_share(ids, mask, n=3, count=3) == pytest.approx(1 / 3)  # row 0: (1, 2, 3) x 3
    assert repeat_share(ids, mask, n=2, count=3) == pytest.approx(2 / 3)  # row 2: (1, 2) x 3 too
    assert repeat_share(ids, torch.zeros_like(mask), n=2, count=2) == 0.0  # masked tokens never count
    turns = torch.tensor(
        [[7, 1, 2, 3, 0, 0, 1, 2, 3, 0, 1, 2, 3, 8], [1, 2, 3, 1, 2, 3, 1, 2, 3, 0, 0, 0, 5, 5]]
    )
    by_turn = torch.tensor([[1, 1, 1, 1, 0, 0, 1, 1, 1, 0, 1, 1, 1, 1], [1] * 9 + [0] * 3 + [1] * 2])
    assert repeat_share(turns, by_turn, n=3, count=3) == pytest.approx(1 / 2)  # row 0: once a turn, no loop
    assert repeat_share(turns, torch.ones_like(by_turn), n=3, count=3) == 1.0  # one run: row 0 loops too


def test_each_check_fires_on_its_own_signal_and_not_before():
    cfg = HealthConfig()
    start = {"entropy": 4.0, "kl": 0.0, "repeat_share": 0.1, "eos_rate": 0.9, "answer_length": 30.0}
    cases = {
        "entropy": {"entropy": 0.79},  # < 0.2 x 4.0
        "kl": {"kl": 10.5},  # > kl_max
        "looping": {"repeat_share": 0.36},  # > 0.1 + 0.25
        "unfinished": {"eos_rate": 0.64},  # < 0.9 - 0.25
        "length": {"answer_length": 9.9},  # < 30 / 3
    }
    for check, change in cases.items():
        monitor = HealthMonitor(cfg)
        assert monitor.check(dict(start)) == {}
        assert set(monitor.check({**start, **change})) == {check}, check
    near = {"entropy": 0.81, "kl": 2.9, "repeat_share": 0.34, "eos_rate": 0.66, "answer_length": 10.1}
    monitor = HealthMonitor(cfg)
    monitor.check(dict(start))
    assert monitor.check(near) == {}  # every value just inside its threshold
    assert set(monitor.check({**near, "kl": 6.0})) == {"kl"}  # +3.1 nats in one iteration > kl_rate


def test_reward_hacking_needs_rising_reward_and_falling_agreement():
    monitor = HealthMonitor(HealthConfig(window=4, agreement_drop=0.15))
    for score, agreement in [(0.1, 0.7), (0.2, 0.7), (0.3, 0.6), (0.4, 0.45)]:
        got = monitor.check({"score": score, "rm_online_accuracy": agreement})
    assert set(got) == {"hacking"}  # mean score 0.15 -> 0.35, agreement 0.70 -> 0.525
    calm = HealthMonitor(HealthConfig(window=4))
    for score, agreement in [(0.4, 0.7), (0.3, 0.7), (0.2, 0.5), (0.1, 0.4)]:  # agreement falls, reward too
        assert calm.check({"score": score, "rm_online_accuracy": agreement}) == {}


def test_the_monitor_state_round_trips():
    monitor = HealthMonitor(HealthConfig())
    monitor.check({"entropy": 4.0, "kl": 1.0})
    assert monitor.record(3, {"kl": "too far"}) == ["kl"] and monitor.record(4, {"kl": "further"}) == []
    again = HealthMonitor(HealthConfig())
    again.load_state_dict(json.loads(json.dumps(monitor.state_dict())))
    assert again.start == monitor.start and again.last == monitor.last
    assert again.events == {"kl": {"first": 3, "last": 4, "count": 2, "text": "too far"}}


# ---- on the tiny model -------------------------------------------------------------------------------
def test_a_reward_for_repetition_trips_the_looping_check(tiny_model: Path, tmp_path: Path, capsys):
    sets = [
        "reward_fn=tests.training.test_health:most_common_char",
        "train.lr=1e-2",
        "train.max_steps=20",
        "beta=0",
    ]
    out = run(GRPOConfig, tiny_model, tmp_path, "loop", *sets)
    steps = fired(out, "looping")
    assert steps and rows(out)[steps[0] - 1]["repeat_share"] > rows(out)[0]["repeat_share"] + 0.25
    assert (out / "model.safetensors").is_file()  # warn: the run finishes
    warnings = [ln for ln in capsys.readouterr().err.splitlines() if "RL health (looping)" in ln]
    assert len(warnings) == 1 and f"at iteration {steps[0]}" in warnings[0]  # warned once, one line


def test_a_huge_learning_rate_trips_the_kl_check(tiny_model: Path, tmp_path: Path):
    sets = ["reward_fn=tests.training.test_health:length_mod_3", "train.lr=5e-2", "train.max_steps=5"]
    out = run(GRPOConfig, tiny_model, tmp_path, "kl", *sets)
    assert fired(out, "kl") and all(r["kl"] > 3.0 for r in rows(out) if r.get("health_kl"))


def test_paying_for_one_answer_trips_the_entropy_check(tiny_model: Path, tmp_path: Path):
    sets = [
        "reward_fn=tests.training.test_health:one_answer",
        "train.lr=1e-2",
        "train.max_steps=20",
        "beta=0",
    ]
    out = run(GRPOConfig, tiny_model, tmp_path, "entropy", *sets)
    first = rows(out)[0]["entropy"]
    assert fired(out, "entropy") and all(
        r["entropy"] < 0.2 * first for r in rows(out) if r.get("health_entropy")
    )


STOP_CASES = {  # check -> (reward, settings): each run trips that check first
    "kl": ("length_mod_3", ["train.lr=5e-2", "train.max_steps=5"]),
    "looping": ("most_common_char", ["train.lr=1e-2", "train.max_steps=20", "beta=0"]),
    "entropy": (
        "one_answer",
        ["train.lr=1e-2", "train.max_steps=20", "beta=0", "train.health.repeat_rise=1"],
    ),
}


@pytest.mark.parametrize("check", sorted(STOP_CASES))
def test_stop_keeps_the_last_good_checkpoint_and_resumes_with_changes(
    check: str, tiny_model: Path, tmp_path: Path
):
    reward, sets = STOP_CASES[check]
    sets = [
        f"reward_fn=tests.training.test_health:{reward}",
        *sets,
        "train.save_every=1",
        "train.keep_checkpoints=30",
    ]
    with pytest.raises(HealthError) as caught:
        run(GRPOConfig, tiny_model, tmp_path, "stop", *sets, "train.health.action=stop")
    message = str(caught.value)
    assert "\n" not in message and f"{check}:" in message and "--resume-with-changes" in message
    out = tmp_path / "stop"
    at = int(message.split("at iteration ")[1].split(":")[0])
    assert f"step-{at - 1:08d}" in message  # the iteration that fired was not saved
    assert not (out / "checkpoints" / f"step-{at:08d}").exists() and not (out / "model.safetensors").exists()
    # continue with the check turned to a warning: resumes from that checkpoint and finishes
    from typer.testing import CliRunner

    from rlhfkit.cli import app

    prompts = tmp_path / "p.jsonl"
    args = ["grpo", "--policy", str(tiny_model), "--prompts", str(prompts), "--output", str(out),
            "--reward-fn", f"tests.training.test_health:{reward}", "--resume-with-changes"]  # fmt: skip
    base = ["sampling.max_new_tokens=16", "sampling.temperature=1.0", "sample_every=0", "prompts_per_step=4",
            "num_generations=4", *sets[1:], "train.health.action=warn"]  # fmt: skip
    result = CliRunner().invoke(app, args + [x for s in base for x in ("--set", s)])
    assert result.exit_code == 0, result.output
    steps = [r["step"] for r in rows(out)]
    assert (out / "model.safetensors").is_file() and steps == list(range(1, steps[-1] + 1))
    assert rows(out)[at - 1].get(f"health_{check}") == 1.0  # redone and marked, as warn does


@pytest.mark.parametrize("cls", [PPOConfig, GRPOConfig, RLOOConfig])
def test_a_healthy_run_of_each_trainer_triggers_nothing(cls: type, tiny_model: Path, tmp_path: Path):
    sets = ["reward_fn=tests.training.test_health:length_mod_3", "train.max_steps=4", "train.lr=1e-5"]
    if cls is PPOConfig:
        sets += ["rollout_batch=8", "train.batch_size=8"]
    out = run(cls, tiny_model, tmp_path, cls.__name__, *sets)
    got = rows(out)
    assert len(got) == 4 and not any(k.startswith("health_") for r in got for k in r)
    assert all("repeat_share" in r for r in got)
