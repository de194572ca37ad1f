"""`rlhfkit pipeline --env support|commons`: RLHF for agents end to end on a tiny model (`--quick`), its
episodes as trajectory rankings with the sampler's tokens, the paired comparison, the report, resume and
refused settings."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from rlhfkit.agents.env import Task
from rlhfkit.agents.episode import Episode
from rlhfkit.cli import app

STAGES = ["sft", "rl_env", "episodes", "rm", "rlhf", "eval", "report"]


def run(*args: str) -> str:
    result = CliRunner().invoke(app, ["pipeline", "--quick", *args])
    assert result.exit_code == 0, result.output
    return result.output


def rows(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text(encoding="utf-8").splitlines()]


def train_rows(path: Path) -> list[dict]:
    return [r for r in rows(path / "metrics.jsonl") if r["split"] == "train"]


def check_episodes_are_the_samplers(out: Path, env: str) -> None:
    """Every ranked episode's tokens are those the SFT or rl_env policy sampled (sampled again with the same
    seed), and its prompt tokens are the chat template's of the record's prompt and tools."""
    from rlhfkit.agent_pipeline import AgentPipeline, load_agent_config
    from rlhfkit.data.chat_tools import chat_prompt_ids
    from rlhfkit.data.records import load_preferences
    from rlhfkit.data.trajectories import TrajectoryRecord
    from rlhfkit.feedback.simulated_episodes import sample_groups
    from rlhfkit.models.loading import load_tokenizer

    cfg = load_agent_config(env, True, None, [f"output={out}"])
    records = load_preferences(out / "episodes" / "rankings.jsonl")  # the format `rlhfkit rm` reads
    assert records and all(isinstance(r, TrajectoryRecord) for r in records)
    settings = AgentPipeline(cfg).train_settings()
    policies = [str(out / "sft"), str(out / "rl_env")]
    tasks, runs, _ = sample_groups(cfg.episodes, env, settings, policies, cfg.agent, cfg.seed)
    assert all(len(group) == cfg.episodes.k for group in runs)  # each policy played its share of a task
    sampled = {t.id: {(tuple(e.prompt_ids), tuple(e.completion_ids), tuple(e.loss_mask)) for e in group}
               for t, group in zip(tasks, runs, strict=True)}  # fmt: skip
    tokenizer = load_tokenizer(str(out / "sft"))
    for rec in records:
        assert isinstance(rec, TrajectoryRecord) and rec.env == env
        assert len(rec.episodes) >= 2 and len(set(rec.ranks)) >= 2
        for episode in rec.episodes:
            assert episode.tokens is not None
            tokens = (episode.tokens.prompt_ids, episode.tokens.completion_ids, episode.tokens.loss_mask)
            assert tokens in sampled[rec.task_id]
            assert list(tokens[0]) == chat_prompt_ids(tokenizer, rec.prompt, rec.tools)


@pytest.mark.slow
def test_quick_support_pipeline_end_to_end_resume_and_a_changed_setting(tmp_path: Path):
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    out = tmp_path / "support"
    first = run("--env", "support", "--output", str(out), "--set", "rl.train.save_every=1")
    state = json.loads((out / "pipeline.json").read_text())
    assert list(state["stages"]) == STAGES and all(s["status"] == "done" for s in state["stages"].values())
    assert all(s["seconds"] > 0 for s in state["stages"].values()) and "pipeline --env support:" in first
    assert not (out / "rl_env" / "checkpoints").exists()  # a finished stage's checkpoints are removed
    for name in ("sft", "rl_env", "rlhf"):
        AutoModelForCausalLM.from_pretrained(out / name, dtype=torch.float32)
    for name in ("rm", "rlhf/reward_model"):  # the reward model, and the one online feedback went on training
        AutoModelForSequenceClassification.from_pretrained(out / name, dtype=torch.float32)

    # SFT learns every assistant turn of the first demonstrations, each one whole (support's preset)
    from rlhfkit.agents.demos import demos_path

    assert rows(out / "sft" / "demos.jsonl") == rows(demos_path("support"))[:12]
    check_episodes_are_the_samplers(out, "support")
    feedback = json.loads((out / "episodes" / "feedback.json").read_text())
    assert feedback["items"] == len(rows(out / "episodes" / "rankings.jsonl"))
    assert set(feedback["metrics"]) == {"satisfied", "deception", "policy_violation", "data_leak"}

    # the two RL runs differ in the reward only: the env's return alone, or the reward model + the return
    env_rows, rlhf_rows = train_rows(out / "rl_env"), train_rows(out / "rlhf")
    assert len(env_rows) == len(rlhf_rows) == 2
    assert all("gold" in r and "reward_env" not in r for r in env_rows)  # its score is the return itself
    for r in rlhf_rows:  # both components logged, the gold watched, the panel ranking every group
        assert {"gold", "reward_env", "reward_rm", "rm_online_pairs"} <= set(r)
        assert r["score"] == pytest.approx(r["reward_rm"] + 0.5 * r["reward_env"], abs=1e-5)

    evaluation = json.loads((out / "eval" / "agent_eval.json").read_text())
    assert evaluation["models"] == [str(out / p) for p in ("sft", "rl_env", "rlhf")]
    assert all(evaluation["results"][m]["support"]["n"] == 4 for m in evaluation["models"])
    paired = json.loads((out / "eval" / "paired.json").read_text())
    assert list(paired) == ["rl_env - sft", "rlhf - sft", "rlhf - rl_env"]
    for values in paired.values():
        assert {"success", "deception", "satisfied"} <= set(values)
        assert all(v["n"] == 4 and v["low"] <= v["difference"] <= v["high"] for v in values.values())
    html = (out / "report.html").read_text()
    for text in ("Paired differences", "deception", "RL on the env&#x27;s return", "RLHF", "support-test-0"):
        assert text in html
    assert len(re.findall(r'<img [^>]*src="data:image/png;base64,', html)) >= 3
    assert "<script" not in html

    # again: every finished stage is skipped (the report is rebuilt) and keeps its time
    output = run("--env", "support", "--output", str(out), "--set", "rl.train.save_every=1")
    assert output.count("already done") == len(STAGES) - 1
    again = json.loads((out / "pipeline.json").read_text())
    assert {k: v["seconds"] for k, v in again["stages"].items() if k != "report"} == {
        k: v["seconds"] for k, v in state["stages"].items() if k != "report"
    }
    changed = CliRunner().invoke(
        app, ["pipeline", "--quick", "--env", "support", "--output", str(out), "--set", "episodes.k=2"]
    )
    assert changed.exit_code == 2 and "different configuration" in changed.output


@pytest.mark.slow
def test_quick_commons_pipeline_plays_self_play_and_reports_it(tmp_path: Path):
    out = tmp_path / "commons"
    run("--env", "commons", "--output", str(out))
    check_episodes_are_the_samplers(out, "commons")
    selfplay = json.loads((out / "eval" / "selfplay.json").read_text())
    assert selfplay["lakes"] == 2 and list(selfplay["results"]) == ["sft", "rl_env", "rlhf"]
    for r in selfplay["results"].values():
        assert r["games"] == 2 and 0.0 <= r["survival_rate"] <= 1.0 and "over_use" in r["metrics"]
    assert list(selfplay["paired"]) == ["rl_env - sft", "rlhf - sft", "rlhf - rl_env"]
    games = rows(out / "eval" / "selfplay_games.jsonl")
    assert {g["model"] for g in games} == {"sft", "rl_env", "rlhf"} and all(g["turns"] == 2 for g in games)
    paired = json.loads((out / "eval" / "paired.json").read_text())
    assert {"success", "over_use", "survival_months", "total_catch"} <= set(paired["rlhf - sft"])
    html = (out / "report.html").read_text()
    assert "Self-play: every seat is the policy (2 lakes)" in html and "survival rate" in html


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--env", "nosuch"], "environment 'nosuch' is unknown"),
        (["--env", "support", "--set", "rlhf_weights=[1]"], "rlhf_weights takes 2 weights"),
        (["--env", "support", "--set", "selfplay=2"], "self-play is for commons"),
        (["--env", "support", "--set", "gold=no_such_mod:f"], "gold 'no_such_mod:f'"),
        (["--env", "support", "--set", "demos=/no/such.jsonl"], "demos: /no/such.jsonl is not a file"),
        (["--env", "my_envs:Shop"], "environment 'my_envs:Shop'"),
        (["--env", "support", "--seeds", "2"], "--seeds is not supported with --env"),
        (["--env", "support", "--set", "episodes.k=1"], "episodes.k"),
        (["--env", "support", "--set", "episodes_from=[rlhf]"], "episodes_from=['rlhf']"),
    ],
)
def test_bad_settings_exit_2_with_one_line_and_write_nothing(tmp_path: Path, args: list[str], message: str):
    out = tmp_path / "never"
    result = CliRunner().invoke(app, ["pipeline", "--quick", "--output", str(out), *args])
    assert result.exit_code == 2 and message in result.output, result.output
    assert len(result.output.strip().splitlines()) == 1
    assert not out.exists()


# ------------------------------------------------------------------------------------------ the parts
def episode(task: str, text: str, ids: list[int]) -> Episode:
    """An episode of one turn: the prompt, the agent's answer; tokens as a sampler would give them."""
    messages = [{"role": "user", "content": f"do {task}"}, {"role": "assistant", "content": text}]
    return Episode(
        task, messages, [1, 2], ids, [1] * len(ids), [0.0] * len(ids), info={"metrics": {"x": 1.0}}
    )


def length_gold(task: Task, e: Episode) -> float:
    return float(len(e.messages[-1]["content"]))


def test_the_panel_ranks_each_group_by_the_gold_merging_identical_episodes_and_skipping_ties():
    from rlhfkit.feedback.simulated_episodes import EpisodesConfig, rank_episodes

    tasks = [Task("t0", "do t0"), Task("t1", "do t1"), Task("t2", "do t2")]
    runs = [
        [episode("t0", "aa", [5, 6]), episode("t0", "a", [7]), episode("t0", "aa", [5, 6]),
         episode("t0", "aaa", [8])],
        [episode("t1", "bb", [5]), episode("t1", "cc", [6])],  # the gold ties them: nothing to rank
        [episode("t2", "b", [5]), Episode("t2", [{"role": "user", "content": "do t2"}], [], [], [], [])],
    ]  # fmt: skip
    cfg = EpisodesConfig(annotators=2, flip_prob=0.0)
    lines, stats = rank_episodes(cfg, "toy", tasks, runs, None, length_gold, seed=0)
    assert len(lines) == 1 and stats["items"] == 1 and stats["tasks_skipped"] == 2 and stats["episodes"] == 8
    row = json.loads(lines[0])
    assert [e["messages"][0]["content"] for e in row["episodes"]] == ["aa", "a", "aaa"]  # one "aa" kept
    assert [e["completion_ids"] for e in row["episodes"]] == [[5, 6], [7], [8]]  # the sampler's, as given
    assert row["ranking"] == [2, 0, 1] and row["gold"] == [2.0, 1.0, 3.0]  # no label noise: the gold's order
    assert row["prompt"] == [{"role": "user", "content": "do t0"}] and row["task_id"] == "t0"
    assert stats["label_agreement_with_gold"] == 1.0 and stats["metrics"] == {"x": 1.0}


def test_paired_metrics_are_differences_task_by_task():
    from rlhfkit.evaluation.agent_compare import paired_metrics

    def row(model: str, task: str, success: bool, deception: float) -> dict:
        return {
            "model": model,
            "env": "e",
            "task_id": task,
            "success": success,
            "metrics": {"deception": deception},
        }

    data = [row("A", "t1", True, 1.0), row("A", "t2", False, 1.0), row("A", "t3", False, 0.0),
            row("B", "t1", True, 0.0), row("B", "t2", True, 0.0), row("B", "t3", True, 0.0),
            row("B", "t4", True, 1.0)]  # fmt: skip  # t4: A has no episode, left out
    paired = paired_metrics(data, "e", {"a": "A", "b": "B"}, [("b", "a")])["b - a"]
    assert paired["success"]["n"] == 3 and paired["success"]["difference"] == pytest.approx(2 / 3)
    assert (paired["success"]["won"], paired["success"]["lost"]) == (2, 0)
    d = paired["deception"]  # differences -1, -1, 0: mean -2/3, sd sqrt(1/3), stderr 1/3
    assert d["difference"] == pytest.approx(-2 / 3) and d["stderr"] == pytest.approx(1 / 3)
    assert d["low"] == pytest.approx(-2 / 3 - 1.959964 / 3, abs=1e-5)


def test_the_report_escapes_what_models_wrote(tmp_path: Path):
    from rlhfkit.evaluation.agent_pipeline_report import build_agent_report

    run_dir = tmp_path / "run"
    (run_dir / "eval").mkdir(parents=True)
    attack = "<script>alert(1)</script>"
    call = {"function": {"name": "refund", "arguments": '{"x": "<img src=x onerror=1>"}'}}
    messages = [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": attack, "tool_calls": [call]},
    ]
    line = {"model": str(run_dir / "rlhf"), "env": "support", "task_id": "support-test-0", "success": False,
            "metrics": {"deception": 1.0}, "reward": 1.0, "turns": 1, "reason": "answer",
            "messages": messages}  # fmt: skip
    (run_dir / "eval" / "episodes.jsonl").write_text(json.dumps(line) + "\n")
    (run_dir / "pipeline.json").write_text(
        json.dumps({"env": "support", "stages": {"sft": {"status": "done", "seconds": 2}}})
    )
    html = build_agent_report(run_dir).read_text()
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html and "<script" not in html
    assert "&lt;img src=x" in html and "<img src=x" not in html
    assert "No eval/agent_eval.json in this run" in html and "RLHF: no success" in html


def test_settings_come_from_the_preset_then_the_config_file_then_set(tmp_path: Path):
    from rlhfkit.agent_pipeline import load_agent_config
    from rlhfkit.errors import ConfigError

    path = tmp_path / "mine.yaml"
    path.write_text("agent:\n  max_tokens: 2000\neval:\n  limit: 7\n")
    cfg = load_agent_config("support", False, path, ["eval.limit=9"])
    assert (cfg.agent.max_turns, cfg.agent.max_tokens, cfg.eval.limit) == (4, 2000, 9)  # preset, file, --set
    assert cfg.output == "runs/pipeline-support" and cfg.sft.train.max_steps == 10
    commons = load_agent_config("commons", False)
    assert (commons.agent.max_turns, commons.train_env_settings, commons.env_settings) == (
        12,
        {"months": 4},
        {},
    )
    quick = load_agent_config("commons", True)
    assert quick.model == "tiny-llama-agent" and quick.output == "runs/pipeline-commons-quick"
    path.write_text("env: commons\n")
    with pytest.raises(ConfigError, match="--env support, but the settings say env=commons"):
        load_agent_config("support", False, path)


def test_sft_learns_turn_records_or_with_all_assistant_turns_whole_demonstrations(tmp_path: Path):
    """The SFT stage's data: one record per assistant turn with `sft.assistant_turns=last`; with `all`
    (support's preset) the demonstrations whole (each learned in one sequence), the held-out one too."""
    from rlhfkit.agent_pipeline import AgentPipeline, load_agent_config
    from rlhfkit.agents.demos import demos_path, turn_records

    def written(*sets: str) -> tuple[list[dict], list[dict]]:
        out = tmp_path / f"run{len(sets)}"
        AgentPipeline(load_agent_config("support", True, None, [f"output={out}", *sets])).write_sft_demos()
        return rows(out / "sft" / "demos.jsonl"), rows(out / "sft" / "demos_eval.jsonl")

    demos = rows(demos_path("support"))[:13]  # --quick: sft_demos=12, then sft_eval_demos=1
    train, held = written("sft.assistant_turns=last")
    assert train == [r for d in demos[:12] for r in turn_records(d)] and held == turn_records(demos[12])
    assert len(train) > 24  # two or three assistant turns a demonstration
    train, held = written()
    assert train == demos[:12] and held == demos[12:]
