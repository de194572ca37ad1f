"""`rlhfkit pipeline --quick`: the whole chain on a tiny model, every stage loadable in plain transformers."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from rlhfkit.cli import app
from rlhfkit.training.checkpoint import list_checkpoints


def short_is_better(prompt: str, answer: str) -> float:
    """A user's own gold preference: fewer characters is better."""
    return -float(len(answer))


def evaluation_config(out: Path) -> dict:
    return json.loads((out / "eval" / "eval.json").read_text())["config"]


def run(*args: str) -> str:
    result = CliRunner().invoke(app, ["pipeline", "--quick", *args])
    assert result.exit_code == 0, result.output
    return result.output


@pytest.mark.slow
def test_quick_pipeline_end_to_end_and_resume(tmp_path: Path):
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    from rlhfkit.data.records import load_preferences

    out = tmp_path / "run"
    checkpointing = ("--set", "sft.train.save_every=2", "--set", "rl.grpo.train.save_every=1")
    run("--output", str(out), *checkpointing)
    # a finished stage's checkpoints are removed (its model is saved beside them), unless asked to keep them
    assert not any((out / stage / "checkpoints").exists() for stage in ("sft", "rm", "rl"))
    state = json.loads((out / "pipeline.json").read_text())
    assert [s["status"] for s in state["stages"].values()] == ["done"] * 6
    for name in ("sft", "rl"):
        AutoModelForCausalLM.from_pretrained(out / name, dtype=torch.float32)
    AutoModelForSequenceClassification.from_pretrained(out / "rm", dtype=torch.float32)
    # online feedback (GRPO, the default): the panel ranked the policy's groups and the reward model went on
    # learning; the evaluation used the one step C ended with
    AutoModelForSequenceClassification.from_pretrained(out / "rl" / "reward_model", dtype=torch.float32)
    assert evaluation_config(out)["reward"] == str(out / "rl" / "reward_model")
    rankings = load_preferences(out / "feedback" / "rankings.jsonl")  # the format `rlhfkit rm` reads
    assert len(rankings) >= 12
    rl_rows = [json.loads(x) for x in (out / "rl" / "metrics.jsonl").read_text().splitlines()]
    assert all("gold" in r for r in rl_rows if r["split"] == "train")  # watched, for the report
    assert any(r.get("rm_online_pairs", 0) > 0 for r in rl_rows if r["split"] == "train")
    evaluation = json.loads((out / "eval" / "eval.json").read_text())
    assert evaluation["n_prompts"] == 16 and 0.0 <= evaluation["win_rate"]["rate"] <= 1.0
    html = (out / "report.html").read_text()
    assert len(re.findall(r'<img [^>]*src="data:image/png;base64,', html)) >= 3
    assert len(list((out / "plots").glob("*.png"))) >= 3

    # a second run skips every finished stage (the report is rebuilt) and keeps their timings
    output = run("--output", str(out), *checkpointing)
    assert output.count("already done") == 5
    again = json.loads((out / "pipeline.json").read_text())
    assert {k: v["seconds"] for k, v in again["stages"].items() if k != "report"} == {
        k: v["seconds"] for k, v in state["stages"].items() if k != "report"
    }
    # a different configuration in the same directory is refused, with nothing run
    result = CliRunner().invoke(
        app, ["pipeline", "--quick", "--output", str(out), *checkpointing, "--set", "feedback.k=2"]
    )
    assert result.exit_code == 2 and "different configuration" in result.output


@pytest.mark.slow
def test_quick_pipeline_with_a_users_gold_preference_and_ppo(tmp_path: Path):
    out = tmp_path / "gold"
    run(
        "--output",
        str(out),
        "--set",
        "gold=tests.entry.test_pipeline:short_is_better",
        "--set",
        "rl.algorithm=ppo",
        "--set",
        "sft.train.save_every=2",
        "--set",
        "rm.train.save_every=2",
        "--set",
        "keep_checkpoints=true",
    )
    assert list_checkpoints(out / "sft" / "checkpoints") and list_checkpoints(out / "rm" / "checkpoints")
    rows = [json.loads(x) for x in (out / "feedback" / "rankings.jsonl").read_text().splitlines()]
    for row in rows:  # the labels come from the user's preference: gold = -length of each answer
        answers = [c[0]["content"] for c in row["completions"]]
        assert row["gold"] == [-float(len(a)) for a in answers]
    answers = [json.loads(x) for x in (out / "eval" / "answers.jsonl").read_text().splitlines()]
    assert all(a["policy_gold"] == -float(len(a["policy_answer"])) for a in answers)
    assert json.loads((out / "pipeline.json").read_text())["algorithm"] == "ppo"
    assert "advantage:" not in (out / "rl" / "config.yaml").read_text()  # PPO's config, not GRPO's
    assert not (out / "rl" / "reward_model").exists()  # PPO has no groups to rank: its reward model is frozen
    assert evaluation_config(out)["reward"] == str(out / "rm")


@pytest.mark.slow
def test_quick_pipeline_over_seeds_reports_mean_and_spread(tmp_path: Path):
    out = tmp_path / "seeds"
    output = run("--output", str(out), "--seeds", "2")
    summary = json.loads((out / "seeds.json").read_text())
    assert [r["seed"] for r in summary["seeds"]] == [0, 1]
    rates = [r["win_rate"] for r in summary["seeds"]]
    assert summary["mean_win_rate"] == pytest.approx(sum(rates) / 2)
    assert "mean win rate" in output and (out / "seed-1" / "report.html").exists()
    # each seed reaches every stage: seed 1's RL run and its sampling differ from seed 0's
    configs = [(out / f"seed-{s}" / "rl" / "config.yaml").read_text() for s in (0, 1)]
    assert "seed: 0" in configs[0] and "seed: 1" in configs[1]
    feedback = [(out / f"seed-{s}" / "feedback" / "rankings.jsonl").read_text() for s in (0, 1)]
    assert feedback[0] != feedback[1]
    bad = CliRunner().invoke(app, ["pipeline", "--quick", "--output", str(tmp_path / "x"), "--seeds", "-1"])
    assert bad.exit_code == 2 and "--seeds must be 0" in bad.output


def test_a_wrong_gold_is_refused_before_any_stage(tmp_path: Path):
    out = tmp_path / "never"
    result = CliRunner().invoke(
        app, ["pipeline", "--quick", "--output", str(out), "--set", "gold=no_such_mod:f"]
    )
    assert result.exit_code == 2 and "gold 'no_such_mod:f'" in result.output
    assert not out.exists()


def test_step_c_gets_the_panel_of_the_feedback_stage_and_its_own_online_settings(tmp_path: Path):
    from rlhfkit.config import load_config
    from rlhfkit.pipeline import Pipeline, PipelineConfig

    sets = [f"output={tmp_path}", "feedback.flip_prob=0.1", "feedback.annotators=3", "rm.train.lr=2e-6",
            "rl.grpo.online_feedback.lr=3e-5", "rl.grpo.online_feedback.micro_batch=8"]  # fmt: skip
    online = Pipeline(load_config(PipelineConfig, None, sets)).rl_config().online_feedback
    assert (online.labeler, online.annotators, online.flip_prob) == ("default", 3, 0.1)
    assert (online.lr, online.micro_batch) == (3e-5, 8)  # not step B's lr
    off = Pipeline(load_config(PipelineConfig, None, [*sets, "feedback.online=false"])).rl_config()
    assert off.online_feedback.labeler is None
