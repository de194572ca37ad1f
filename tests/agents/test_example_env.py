"""examples/inventory_env.py, the README's 20-line environment: it loads by `module:Class`, its tool's schema
comes from the docstring, a call and a final answer play out as the README says, and agent-eval runs it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from rlhfkit.agents import load_environment
from rlhfkit.agents.tools import tool_schema
from rlhfkit.data.toolcalls import ToolCall

REPO = Path(__file__).resolve().parents[2]


def test_inventory_environment_plays_an_episode():
    env = load_environment("examples.inventory_env:Inventory")
    train, test = env.tasks("train"), env.tasks("test")
    assert {t.prompt for t in train}.isdisjoint(t.prompt for t in test) and len(train) == 4 and len(test) == 2
    schema = tool_schema(env.tools()[0])["function"]
    assert schema["name"] == "stock" and schema["parameters"]["required"] == ["item"]
    task = test[0]  # pears (sorted: apples dates figs limes | pears plums)
    messages = env.reset(task)
    assert [m["role"] for m in messages] == ["system", "user"] and "pears" in messages[1]["content"]
    looked_up = env.step(
        {"role": "assistant", "content": "", "tool_calls": [ToolCall("stock", '{"item": "Limes"}')]}
    )
    assert (
        looked_up.observations == [{"role": "tool", "name": "stock", "content": "19"}] and not looked_up.done
    )
    wrong = env.step({"role": "assistant", "content": "It has 8.", "tool_calls": []})
    assert wrong.done and wrong.reward == 0.0
    env.reset(task)
    right = env.step({"role": "assistant", "content": "The shop has 7 pears.", "tool_calls": []})
    assert right.done and right.reward == 1.0 and right.info["reason"] == "answer"


@pytest.mark.slow
def test_agent_eval_runs_the_example(tiny_model: Path, tmp_path: Path):
    out = tmp_path / "eval"
    env = "examples.inventory_env:Inventory"
    cmd = [sys.executable, "-m", "rlhfkit.cli", "agent-eval", "--policy", str(tiny_model), "--envs", env,
           "--output", str(out), "--set", "agent.max_new_tokens=8"]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=REPO)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads((out / "agent_eval.json").read_text())
    text = json.dumps(result)
    assert "examples.inventory_env:Inventory" in text or "inventory" in text
    assert (out / "report.html").is_file()
