"""`rlhfkit generate` through its command line: n answers per prompt as JSONL, seeded; a bad prompts file
is one line naming file:line:field, exit 2, and nothing is written."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from tests.conftest import write_jsonl

CLI = [sys.executable, "-m", "rlhfkit.cli", "generate"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=300, env=ENV)


@pytest.mark.slow
def test_generate_writes_n_seeded_answers_per_prompt(tmp_path: Path, tiny_model: Path):
    prompts = write_jsonl(tmp_path / "p.jsonl", [
        {"prompt": "Item 1?", "id": "a"}, {"prompt": [{"role": "user", "content": "Item 2?"}], "id": "b"},
    ])  # fmt: skip
    options = ["--model", str(tiny_model), "--prompts", str(prompts), "--n", "3",
               "--set", "sampling.max_new_tokens=5", "--set", "sampling.temperature=1.0"]  # fmt: skip
    done = run(*options, "--output", str(tmp_path / "out.jsonl"))
    assert done.returncode == 0, done.stderr
    rows = [json.loads(x) for x in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert [(r["id"], r["sample"]) for r in rows] == [
        ("a", 0),
        ("a", 1),
        ("a", 2),
        ("b", 0),
        ("b", 1),
        ("b", 2),
    ]
    for r in rows:
        assert 1 <= r["tokens"] <= 5 and r["finish_reason"] == ("length" if r["tokens"] == 5 else "stop")
        assert isinstance(r["completion"], str) and r["completion"] == r["completion"].strip()
    assert rows[1]["prompt"] == "Item 1?" and rows[3]["prompt"][0]["content"] == "Item 2?"
    again = run(*options, "--output", str(tmp_path / "again.jsonl"))
    assert (
        again.returncode == 0
        and (tmp_path / "again.jsonl").read_text() == (tmp_path / "out.jsonl").read_text()
    )


@pytest.mark.slow
def test_a_bad_prompts_file_is_one_line_and_exit_2(tmp_path: Path, tiny_model: Path):
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "fine"}, {"prompt": ""}])
    done = run("--model", str(tiny_model), "--prompts", str(prompts), "--output", str(tmp_path / "o.jsonl"))
    assert done.returncode == 2, done.stderr
    assert f"{prompts}:2: field 'prompt'" in done.stderr and "Traceback" not in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "o.jsonl").exists()
    long = write_jsonl(tmp_path / "long.jsonl", [{"prompt": "x" * 2000}])
    done = run("--model", str(tiny_model), "--prompts", str(long), "--output", str(tmp_path / "o.jsonl"))
    assert done.returncode == 2 and f"{long}:1: field 'prompt'" in done.stderr, done.stderr
