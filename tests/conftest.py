"""Shared fixtures: a tiny random Llama (character tokenizer, ChatML) and an isolated cache."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import pytest

# Tests never touch the user's cache (and never download anything).
os.environ.setdefault("RLHFKIT_CACHE", tempfile.mkdtemp(prefix="rlhfkit-test-cache-"))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from rlhfkit.tiny import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("tiny-llama"), seed=0)


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


MEMORY_ROWS = [
    {"messages": [{"role": "user", "content": f"Item {i}?"}, {"role": "assistant", "content": answer}]}
    for i, answer in enumerate(
        [
            "red fox.",
            "blue sky.",
            "green tea.",
            "gold ring.",
            "grey owl.",
            "pink rose.",
            "tan dune.",
            "jet ink.",
        ]
    )
]


@pytest.fixture()
def memory_data(tmp_path: Path) -> Path:
    """Eight short conversations whose answers a tiny model can memorise in a few dozen steps."""
    return write_jsonl(tmp_path / "memory.jsonl", MEMORY_ROWS)
