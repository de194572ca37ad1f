"""`rlhfkit agent-eval`: the command end to end on two tiny models in an environment written here, the
interval and overall-score math by hand, an endpoint's multi-turn tool calls over the chat API, bad input."""

from __future__ import annotations

import html
import json
import math
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from rlhfkit.agents.env import Environment, StepResult, Task
from rlhfkit.agents.episode import AgentLimits
from rlhfkit.chat.llm import EndpointLLM
from rlhfkit.evaluation.agent_eval import chat_episodes, overall_scores, paired_difference, summarize
from rlhfkit.rollout import SamplingConfig

pytestmark = pytest.mark.usefixtures("one_thread")


class ParityEnv(Environment):
    """Turn 1 gets a tool result holding HTML; turn 2 is the answer: success when its length is even (a coin
    the greedy tiny model flips differently per task)."""

    name = "parity"

    def tasks(self, split):
        return [Task(f"{split}-{i}", f"Say {i}.") for i in range(6)]

    def reset(self, task):
        self.turn = 0
        return [{"role": "user", "content": task.prompt}]

    def step(self, message):
        self.turn += 1
        if self.turn == 1:
            return StepResult([{"role": "tool", "name": "look", "content": "<b>bold</b> & 'quoted'"}])
        ok = len(message["content"]) % 2 == 0
        return StepResult([], reward=float(ok), done=True, info={"success": ok})


def add(a: int, b: int) -> int:
    """Add two integers.

    Args:
        a: The first number.
        b: The second number.
    """
    return a + b


class AddEnv(Environment):
    name = "add"

    def tools(self):
        return [add]

    def tasks(self, split):
        return [Task("t0", "What is 2 + 3?", {"answer": "5"})]

    def reset(self, task):
        self.task = task
        return [{"role": "user", "content": task.prompt}]

    def step(self, message):
        if message["tool_calls"]:
            out = [{"role": "tool", "name": c.name, "content": str(add(**json.loads(c.arguments)))}
                   for c in message["tool_calls"]]  # fmt: skip
            return StepResult(out)
        return StepResult([], reward=float(message["content"] == self.task.data["answer"]), done=True)


def test_summary_interval_is_the_normal_interval_of_the_outcomes():
    from rlhfkit.agents.episode import Episode

    episodes = [Episode(f"t{i}", [], [1], [], [], [], reward=float(i < 3), turns=i % 2 + 1, reason="answer",
                        tokens=10 * i) for i in range(10)]  # fmt: skip
    episodes[9].reason = "max_turns"
    s = summarize(episodes, threshold=1.0)
    sd = math.sqrt((3 * 0.7**2 + 7 * 0.3**2) / 9)  # sample standard deviation of 3 ones and 7 zeros
    assert s["success"] == pytest.approx(0.3) and s["successes"] == 3 and s["n"] == 10
    assert s["low"] == pytest.approx(0.3 - 1.959964 * sd / math.sqrt(10), abs=1e-6)
    assert s["high"] == pytest.approx(0.3 + 1.959964 * sd / math.sqrt(10), abs=1e-6)
    assert (
        s["mean_turns"] == 1.5 and s["mean_tokens"] == 45.0 and s["reasons"] == {"answer": 9, "max_turns": 1}
    )
    # the environment's own verdict wins over the threshold
    episodes[0].info = {"success": False}
    assert summarize(episodes, threshold=1.0)["successes"] == 2


def test_paired_difference_counts_each_task_once_with_its_normal_interval():
    from rlhfkit.agents.episode import Episode

    def runs(wins: list[int]) -> list[Episode]:
        return [Episode(f"t{i}", [], [1], [], [], [], reward=float(w), turns=1, reason="answer", tokens=1)
                for i, w in enumerate(wins)]  # fmt: skip

    base, other = runs([1, 0, 0, 1, 0, 1, 0, 0]), runs([1, 1, 1, 0, 0, 1, 1, 0])
    d = paired_difference(base, list(reversed(other)), threshold=1.0)  # matched by task id, not position
    diffs = [0, 1, 1, -1, 0, 0, 1, 0]  # by hand: mean 2/8, sample sd sqrt((4 * 0.75^2 + ... ) / 7)
    sd = math.sqrt(sum((x - 0.25) ** 2 for x in diffs) / 7)
    assert d["n"] == 8 and d["difference"] == pytest.approx(0.25) and (d["won"], d["lost"]) == (3, 1)
    assert d["low"] == pytest.approx(0.25 - 1.959964 * sd / math.sqrt(8), abs=1e-6)
    assert d["high"] == pytest.approx(0.25 + 1.959964 * sd / math.sqrt(8), abs=1e-6)
    with pytest.raises(ValueError, match="share no task"):
        paired_difference(base, [Episode("x", [], [1], [], [], [], reward=1.0)], threshold=1.0)


def test_overall_score_weights_each_env_by_the_inverse_mean_success():
    overall, weights = overall_scores(
        {"A": {"x": 0.5, "y": 0.2, "z": 0.0}, "B": {"x": 0.3, "y": 0.0, "z": 0.0}}
    )
    assert weights == {"x": pytest.approx(2.5), "y": pytest.approx(10.0), "z": None}  # z: nobody solved it
    assert overall["A"] == pytest.approx((0.5 * 2.5 + 0.2 * 10) / 2)  # 1.625
    assert overall["B"] == pytest.approx((0.3 * 2.5 + 0.0) / 2)  # 0.375
    one, _ = overall_scores({"A": {"x": 0.25, "y": 0.9}})
    assert one == {"A": pytest.approx(1.0)}  # one model: 1.0 by construction
    assert overall_scores({"A": {"x": 0.0}}) == ({"A": None}, {"x": None})


def test_endpoint_episodes_call_tools_over_the_chat_api():
    bodies = []

    def server(request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content)
        bodies.append(body)
        if body["messages"][-1]["role"] == "user":
            call = {
                "id": "x1",
                "type": "function",
                "function": {"name": "add", "arguments": '{"a": 2, "b": 3}'},
            }
            message, reason = {"role": "assistant", "content": None, "tool_calls": [call]}, "tool_calls"
        else:
            message, reason = {"role": "assistant", "content": "5"}, "stop"
        choice = {"index": 0, "message": message, "finish_reason": reason}
        return httpx.Response(200, json={"choices": [choice], "usage": {"completion_tokens": 7}})

    llm = EndpointLLM("http://fake/v1", model="m")
    llm.client = httpx.Client(base_url="http://fake/v1", transport=httpx.MockTransport(server))
    [episode] = chat_episodes(llm, AddEnv, AddEnv().tasks("test"), SamplingConfig(temperature=0.0),
                              AgentLimits(max_turns=3, max_new_tokens=16))  # fmt: skip
    assert (episode.reason, episode.turns, episode.reward, episode.tokens) == ("answer", 2, 1.0, 14)
    assert bodies[0]["tools"][0]["function"]["name"] == "add" and bodies[0]["max_tokens"] == 16
    assert set(bodies[0]["tools"][0]["function"]) == {"name", "description", "parameters"}  # OpenAI's fields
    history = bodies[1]["messages"]
    assert history[1]["tool_calls"][0]["function"] == {"name": "add", "arguments": '{"a": 2, "b": 3}'}
    assert history[2] == {
        "role": "tool",
        "name": "add",
        "content": "5",
        "tool_call_id": history[1]["tool_calls"][0]["id"],
    }


def agent_eval(*args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "rlhfkit.cli", "agent-eval", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600,
                          env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})  # fmt: skip


@pytest.mark.slow
def test_agent_eval_cli_end_to_end(tiny_model: Path, tmp_path: Path):
    from rlhfkit.models.tiny import make_tiny_model

    other = make_tiny_model(tmp_path / "other", seed=1)
    out = tmp_path / "eval"
    env = "tests.applications.test_agent_eval:ParityEnv"
    sets = ["--set", "limit=4", "--set", "agent.max_new_tokens=12", "--set", "agent.max_tokens=300"]
    run = agent_eval(
        "--policy", str(tiny_model), "--policy", str(other), "--envs", env, "--output", str(out), *sets
    )
    assert run.returncode == 0, run.stderr
    report = json.loads((out / "agent_eval.json").read_text())
    assert report["models"] == [str(tiny_model), str(other)] and report["envs"] == [env]
    episodes = [json.loads(x) for x in (out / "episodes.jsonl").read_text().splitlines()]
    assert len(episodes) == 8 and all(e["turns"] == 2 and e["reason"] == "answer" for e in episodes)
    for model in report["models"]:
        r = report["results"][model][env]
        mine = [e for e in episodes if e["model"] == model]
        assert [e["task_id"] for e in mine] == ["test-0", "test-1", "test-2", "test-3"]
        wins = sum(len(e["messages"][3]["content"]) % 2 == 0 for e in mine)  # the answer's parity, again
        assert r["n"] == 4 and r["successes"] == wins and r["success"] == wins / 4
        assert r["reasons"] == {"answer": 4} and r["mean_turns"] == 2.0
    success = {m: {env: report["results"][m][env]["success"]} for m in report["models"]}
    assert report["overall"] == pytest.approx(overall_scores(success)[0])
    paired = report["paired"][str(other)][env]  # the second model minus the first, task by task
    first = {
        e["task_id"]: len(e["messages"][3]["content"]) % 2 == 0
        for e in episodes
        if e["model"] == str(tiny_model)
    }
    second = {
        e["task_id"]: len(e["messages"][3]["content"]) % 2 == 0 for e in episodes if e["model"] == str(other)
    }
    assert report["paired_vs"] == str(tiny_model) and paired["n"] == 4
    assert paired["difference"] == pytest.approx(sum(second[t] - first[t] for t in first) / 4)
    page = (out / "report.html").read_text()
    assert "&lt;b&gt;bold&lt;/b&gt; &amp; &#x27;quoted&#x27;" in page and "<b>bold</b>" not in page
    for e in episodes:  # every answer the models wrote is on the page, escaped
        assert html.escape(e["messages"][3]["content"], quote=True) in page
    assert "<script" not in page


def test_agent_eval_bad_input_is_one_line_exit_2(tiny_model: Path, tmp_path: Path):
    from typer.testing import CliRunner

    from rlhfkit.cli import app

    def invoke(*args: str):
        result = CliRunner().invoke(app, ["agent-eval", "--output", str(tmp_path / "never"), *args])
        return result.exit_code, result.output

    code, output = invoke("--envs", "tests.applications.test_agent_eval:ParityEnv")
    assert code == 2 and "needs a model" in output
    code, output = invoke("--policy", str(tiny_model), "--envs", "nosuchenv")
    assert code == 2 and "not a bundled environment" in output and len(output.strip().splitlines()) == 1
    code, output = invoke("--policy", str(tiny_model))
    assert code == 2 and "needs environments" in output
    code, output = invoke(
        "--policy", str(tmp_path / "nope"), "--envs", "tests.applications.test_agent_eval:ParityEnv"
    )
    assert code == 2 and "no such model directory" in output
    code, output = invoke(
        "--endpoint", "localhost:8000", "--envs", "tests.applications.test_agent_eval:ParityEnv"
    )
    assert code == 2 and "http(s) URL" in output
    code, output = invoke(
        "--policy",
        str(tiny_model),
        "--envs",
        "tests.applications.test_agent_eval:ParityEnv",
        "--set",
        "limit=-1",
    )
    assert code == 2 and "limit" in output
    assert not (tmp_path / "never").exists()


CALL_TEXT = '<tool_call>\n{"name": "add", "arguments": {"a": 2, "b": 3}}\n</tool_call>'


@pytest.fixture(scope="module")
def tool_model(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path, one_thread: None) -> Path:
    """The tiny model taught AddEnv's episode: call add(2, 3), then answer "5" from the tool's result, in the
    fallback format both the episode runner and `rlhfkit serve` render."""
    import torch

    from rlhfkit.data.chat_tools import fallback_messages, tool_schemas
    from rlhfkit.data.encoding import pad, prompt_answer_ids
    from rlhfkit.models.loading import load_causal_lm, save_model

    torch.manual_seed(0)
    model, tokenizer = load_causal_lm(str(tiny_model))
    question = [{"role": "user", "content": "What is 2 + 3?"}]
    call = {"id": "c", "type": "function", "function": {"name": "add", "arguments": '{"a": 2, "b": 3}'}}
    result = [{"role": "assistant", "content": "", "tool_calls": [call]}, {"role": "tool", "content": "5"}]
    tools = tool_schemas([add])
    examples = [
        (fallback_messages(question, tools), CALL_TEXT),
        (fallback_messages(question + result, tools), "5"),
    ]
    pairs = [prompt_answer_ids(tokenizer, p, [{"role": "assistant", "content": a}]) for p, a in examples]
    ids, mask, positions = pad([p + a for p, a in pairs], tokenizer.pad_token_id)  # (2, T) each
    labels = ids.masked_fill(mask == 0, -100)  # (2, T) the answers only
    for i, (p, _) in enumerate(pairs):
        labels[i, : len(p)] = -100
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model.train()
    for _ in range(300):
        loss = model(input_ids=ids, attention_mask=mask, position_ids=positions, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if loss.item() < 0.01:
            break
    return save_model(model.eval(), tokenizer, tmp_path_factory.mktemp("tool-model"))


@pytest.mark.slow
def test_a_local_policy_and_the_same_model_served_act_alike(tool_model: Path, tmp_path: Path):
    """The episode runner (tokens) and an endpoint (`rlhfkit serve`, chat API with tools=) render tools and
    tool results the same way: the same greedy model takes the same turns and both solve the task."""
    from tests.helpers import running_server

    with running_server(tool_model) as url:
        out = tmp_path / "both"
        sets = ["agent.max_new_tokens=80", "agent.max_tokens=1000", "agent.max_turns=3"]
        env = "tests.applications.test_agent_eval:AddEnv"
        run = agent_eval("--policy", str(tool_model), "--endpoint", url, "--envs", env, "--output", str(out),
                         *[x for s in sets for x in ("--set", s)])  # fmt: skip
    assert run.returncode == 0, run.stderr
    report = json.loads((out / "agent_eval.json").read_text())
    assert [report["results"][m][env]["success"] for m in report["models"]] == [1.0, 1.0]
    assert report["overall"] == {str(tool_model): 1.0, url: 1.0}
    local, served = [json.loads(x) for x in (out / "episodes.jsonl").read_text().splitlines()]
    assert local["messages"] == served["messages"] and local["turns"] == 2
    assert local["messages"][1]["tool_calls"][0]["function"] == {
        "name": "add",
        "arguments": '{"a": 2, "b": 3}',
    }
    assert local["messages"][-1] == {"role": "assistant", "content": "5"}


@pytest.mark.slow
def test_local_llm_chat_with_tools_returns_the_calls(tool_model: Path):
    from rlhfkit.chat.llm import LocalLLM
    from rlhfkit.data.chat_tools import tool_schemas
    from rlhfkit.data.toolcalls import ToolCall

    llm = LocalLLM(str(tool_model))
    question = [{"role": "user", "content": "What is 2 + 3?"}]
    [[reply]] = llm.chat(
        [question], SamplingConfig(max_new_tokens=80, temperature=0.0), tools=tool_schemas([add])
    )
    assert reply.tool_calls == (ToolCall("add", '{"a": 2, "b": 3}'),) and reply.text == ""
    [[plain]] = llm.chat([question], SamplingConfig(max_new_tokens=80, temperature=0.0))
    assert plain.tool_calls == () and plain.text != CALL_TEXT  # no tools in the prompt: not the taught turn


def test_a_refused_request_ends_only_its_episode_with_llm_error():
    def server(request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content)
        if "3" in body["messages"][0]["content"]:  # task 3's conversation is too long for this server
            return httpx.Response(400, json={"error": {"message": "context length exceeded"}})
        choice = {"index": 0, "message": {"role": "assistant", "content": "ok"}, "finish_reason": "stop"}
        return httpx.Response(200, json={"choices": [choice], "usage": {"completion_tokens": 2}})

    llm = EndpointLLM("http://fake/v1", model="m", retries=0)
    llm.client = httpx.Client(base_url="http://fake/v1", transport=httpx.MockTransport(server))
    episodes = chat_episodes(llm, ParityEnv, ParityEnv().tasks("test")[:5], SamplingConfig(), AgentLimits())
    assert [e.reason for e in episodes] == ["answer"] * 3 + ["llm_error"] + ["answer"]
    assert "HTTP 400: context length exceeded" in episodes[3].error and episodes[0].turns == 2
