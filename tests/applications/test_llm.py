"""The LLM client over a local model: batched, seeded, n completions per conversation, finish reasons."""

from __future__ import annotations

from pathlib import Path

import pytest

from rlhfkit.chat.llm import LocalLLM, load_llm
from rlhfkit.rollout import SamplingConfig

pytestmark = pytest.mark.usefixtures("one_thread")

CHATS = [[{"role": "user", "content": "Item 1?"}], [{"role": "user", "content": "Say something long."}]]


def test_local_llm_gives_n_seeded_completions_per_conversation(tiny_model: Path):
    llm = load_llm(str(tiny_model), batch_size=4)
    assert isinstance(llm, LocalLLM)
    sampling = SamplingConfig(max_new_tokens=6, temperature=1.0)
    first = llm.chat(CHATS, sampling, n=3, seed=7)
    assert [len(c) for c in first] == [3, 3]
    assert llm.chat(CHATS, sampling, n=3, seed=7) == first  # same seed, same answers
    assert llm.chat(CHATS, sampling, n=3, seed=8) != first
    for completion in (c for row in first for c in row):
        assert 1 <= completion.tokens <= 6
        assert completion.finish_reason == ("length" if completion.tokens == 6 else "stop")
    # a conversation's answers do not depend on the others in the batch (row-independent sampling aside,
    # greedy decoding must agree exactly)
    greedy = SamplingConfig(max_new_tokens=6, temperature=0.0)
    alone = llm.chat(CHATS[1:], greedy)[0][0]
    together = llm.chat(CHATS, greedy)[1][0]
    assert alone == together
    with pytest.raises(ValueError, match="n must be at least 1"):
        llm.chat(CHATS, sampling, n=0)
