"""Kept caches across generate calls (rollout.turns): rows that go on from their cache get the tokens and
log-probs that prefilling their whole sequence gives (`RolloutEngine.generate`), on the CPU fast path and
the generic path of three model families; rows join and leave between calls; the batched prefill of the new
tokens equals each row's alone and a full prefill; backends that cannot keep a cache fall back."""

from __future__ import annotations

import pytest
import torch
from tests.helpers import EOS, PAD, VOCAB, family_model, rollout_engine
from transformers import GPT2Config, GPT2LMHeadModel

from rlhfkit.rollout import Rollout, RolloutEngine, SamplingConfig
from rlhfkit.rollout.turns import TurnCaches

pytestmark = pytest.mark.usefixtures("one_thread")

STARTS = [[5, 6, 7, 8, 9, 10, 11], [5, 6, 7, 8, 20, 21], [40, 41], [5, 6, 7, 8, 30, 31, 32, 33]]


def gpt2() -> torch.nn.Module:
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=256, eos_token_id=EOS)
    return GPT2LMHeadModel(config).eval()


ENGINES = {
    "llama-llama_cpu": lambda: rollout_engine(family_model("llama"), "llama_cpu"),
    "llama-generic": lambda: rollout_engine(family_model("llama"), "generic"),
    "qwen2-generic": lambda: rollout_engine(family_model("qwen2"), "generic"),
    "gpt2-generic": lambda: rollout_engine(gpt2(), "generic"),
}


@pytest.fixture(scope="module", params=list(ENGINES))
def engine(request: pytest.FixtureRequest) -> RolloutEngine:
    return ENGINES[request.param]()


def observation(row: int, turn: int) -> list[int]:
    """Tokens appended after a row's turn: a different length for each row and turn."""
    return [50 + (row * 7 + turn * 3 + j) % 60 for j in range(1 + (row + 2 * turn) % 5)]


def real(r: Rollout, i: int) -> tuple[list[int], list[float]]:
    on = r.completion_mask[i].bool()
    return r.completion_ids[i][on].tolist(), r.logprobs[i][on].tolist()


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_rows_going_on_from_their_cache_get_the_tokens_of_a_full_prefill(
    engine: RolloutEngine, temperature: float
):
    """Five calls; row 3 joins at the second and row 1 leaves after the third (the others then run alongside a
    row with no cache); row 0's caller keeps only part of one turn, so only the common prefix is reused."""
    config = SamplingConfig(max_new_tokens=9, temperature=temperature)
    caches = TurnCaches(engine)
    assert caches.keeps
    seqs = {i: list(s) for i, s in enumerate(STARTS[:3])}
    for turn in range(5):
        if turn == 1:
            seqs[3] = list(STARTS[3])
        if turn == 3:
            del seqs[1]
            caches.drop([1])
        keys = sorted(seqs)
        full = engine.generate([seqs[k] for k in keys], config, torch.Generator().manual_seed(turn))
        kept = caches.generate(keys, [seqs[k] for k in keys], config, torch.Generator().manual_seed(turn))
        assert torch.equal(kept.completion_ids, full.completion_ids), f"turn {turn}"
        assert torch.equal(kept.completion_mask, full.completion_mask) and torch.equal(kept.ended, full.ended)
        torch.testing.assert_close(kept.logprobs, full.logprobs, atol=1e-5, rtol=0)
        if turn > 1:  # what was prefilled: at most the last token and the observation, not the history
            width = 1 + max(len(observation(k, turn - 1)) for k in keys)
            assert kept.prompt_ids.shape[1] <= width < min(len(seqs[k]) for k in keys)
        for i, k in enumerate(keys):
            tokens, _ = real(full, i)
            if k == 0 and turn == 2:
                tokens = tokens[: len(tokens) // 2]  # a turn cut short by its caller
            seqs[k] += tokens + observation(k, turn)
    assert len(caches) == 3  # row 1's cache was dropped


def test_batched_prefill_of_new_tokens_equals_each_row_alone_and_a_full_prefill(engine: RolloutEngine):
    """The next-token logits after `resume`: of all rows in one forward, of each row resumed alone, and of the
    backend's `start` over the whole sequences, agree."""
    caches = TurnCaches(engine)
    keys = list(range(len(STARTS)))
    first = caches.generate(
        keys, [list(s) for s in STARTS], SamplingConfig(max_new_tokens=6, temperature=0.0)
    )
    seqs = [list(s) + real(first, k)[0] + observation(k, 0) for k, s in enumerate(STARTS)]
    kv = [caches.kept[k].kv for k in keys]
    new = [s[caches.kept[k].kv.shape[3] :] for k, s in zip(keys, seqs, strict=True)]
    assert all(caches.kept[k].tokens == s[: len(s) - len(x)] for k, s, x in zip(keys, seqs, new, strict=True))
    backend = caches.backend
    with torch.inference_mode():
        together = backend.resume(kv, new, 1)  # (B, V)
        backend.release()
        alone = torch.cat([backend.resume([c], [x], 1) for c, x in zip(kv, new, strict=True)])  # (B, V)
        backend.release()
        from rlhfkit.rollout import left_pad

        ids, mask = left_pad(seqs, PAD)
        prefilled = backend.start(seqs, ids, mask, 1)  # (B, V)
        backend.release()
    torch.testing.assert_close(together, alone, atol=2e-5, rtol=0)
    torch.testing.assert_close(together, prefilled, atol=2e-5, rtol=0)


def test_backends_that_cannot_keep_a_cache_prefill_the_whole_sequence():
    """The static-cache backend, ``keep=False``, and a sliding-window cache (which ``export`` declines) keep
    nothing and sample what `generate` samples."""
    config = SamplingConfig(max_new_tokens=5)
    sliding = family_model("qwen2", use_sliding_window=True, sliding_window=4, max_window_layers=0)
    cases = [
        (rollout_engine(family_model("qwen2"), "hf_static"), True),
        (rollout_engine(family_model("llama"), "llama_cpu"), False),
        (rollout_engine(sliding, "generic"), True),
    ]
    for engine, keep in cases:
        caches = TurnCaches(engine, keep=keep)
        seqs = [list(s) for s in STARTS]
        for turn in range(2):
            full = engine.generate(seqs, config, torch.Generator().manual_seed(turn))
            got = caches.generate(list(range(4)), seqs, config, torch.Generator().manual_seed(turn))
            assert torch.equal(got.completion_ids, full.completion_ids)
            torch.testing.assert_close(got.logprobs, full.logprobs, atol=1e-5, rtol=0)
            seqs = [s + real(full, i)[0] + [60, 61] for i, s in enumerate(seqs)]
        assert len(caches) == 0, engine.backend_name


def test_keys_must_be_distinct():
    caches = TurnCaches(rollout_engine(family_model("llama"), "llama_cpu"))
    with pytest.raises(ValueError, match="distinct key"):
        caches.generate([1, 1], [[5, 6], [7, 8]], SamplingConfig(max_new_tokens=2))
