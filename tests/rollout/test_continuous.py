"""Continuous batching (rollout.continuous): rows that join a running batch at different steps and leave
when they end get the tokens they get alone, on both backends; caches are trimmed when long rows leave."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from rlhfkit.models.loading import load_causal_lm
from rlhfkit.rollout import RolloutEngine, SamplingConfig
from rlhfkit.rollout.continuous import DecodeBatch

pytestmark = pytest.mark.usefixtures("one_thread")

PROMPTS = [
    [5, 6, 7, 8, 9, 10, 11, 12, 13],
    [40, 41],
    [5, 6, 7, 8, 9, 10, 60, 61, 62, 63, 64, 65],
    [70, 71, 72],
]


@pytest.fixture(scope="module", params=[True, False], ids=["llama_cpu", "generic"])
def engine(request: pytest.FixtureRequest, tiny_model: Path) -> RolloutEngine:
    model, tokenizer = load_causal_lm(str(tiny_model))
    model.eval()
    # a made-up EOS no random model samples: rows end by their own max_new_tokens
    return RolloutEngine(model, tokenizer, eos_token_ids=[3], fast_path=request.param)


def alone(
    engine: RolloutEngine, prompt: list[int], config: SamplingConfig, seed: int
) -> tuple[list[int], list[float]]:
    rollout = engine.generate([prompt], config, torch.Generator().manual_seed(seed))
    real = rollout.completion_mask[0].bool()
    return rollout.completion_ids[0][real].tolist(), rollout.logprobs[0][real].tolist()


def run_staggered(
    engine: RolloutEngine, configs: list[SamplingConfig], joins: list[int]
) -> dict[int, tuple[list[int], list[float]]]:
    """Row i joins before step joins[i] and leaves after its max_new_tokens; returns each row's tokens and
    log-probs (which see every logit, so a wrong cache slot shows even where the argmax does not move)."""
    batch = DecodeBatch(engine)
    out: dict[int, tuple[list[int], list[float]]] = {}
    step = 0
    while len(out) < len(PROMPTS) or len(batch):
        new = [i for i, j in enumerate(joins) if j == step]
        if new:
            gens = [torch.Generator().manual_seed(100 + i) for i in new]
            assert batch.add(new, [PROMPTS[i] for i in new], [configs[i] for i in new], gens)
            out.update({i: ([], []) for i in new})
        if len(batch):
            tokens, logprobs = batch.sample()
            keep = []
            for key, token, logprob in zip(batch.keys, tokens.tolist(), logprobs.tolist(), strict=True):
                out[key][0].append(token)
                out[key][1].append(logprob)
                keep.append(len(out[key][0]) < configs[key].max_new_tokens)
            batch.advance(tokens, keep)
        step += 1
    return out


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_rows_joining_and_leaving_get_the_tokens_they_get_alone(engine: RolloutEngine, temperature: float):
    configs = [SamplingConfig(max_new_tokens=n, temperature=temperature) for n in (12, 3, 9, 5)]
    together = run_staggered(engine, configs, joins=[0, 2, 2, 6])  # a join into a running batch, twice
    for i, prompt in enumerate(PROMPTS):
        tokens, logprobs = alone(engine, prompt, configs[i], seed=100 + i)
        assert together[i][0] == tokens, f"row {i}"
        assert together[i][1] == pytest.approx(logprobs, abs=1e-5), f"row {i}"


def test_leaving_rows_free_their_slots_and_remove_cancels(engine: RolloutEngine):
    batch = DecodeBatch(engine)
    long, short = SamplingConfig(max_new_tokens=4), SamplingConfig(max_new_tokens=40)
    batch.add(["long"], [PROMPTS[2] * 6], [long], [None])  # 72 prompt tokens
    tokens, _ = batch.sample()
    batch.advance(tokens, [True])
    batch.add(["short"], [PROMPTS[1]], [short], [None])
    slots = batch.backend.cur
    tokens, _ = batch.sample()
    batch.advance(tokens, [False, True])  # the long-prompt row leaves: its prompt's slots go
    assert batch.keys == ["short"]
    assert batch.backend.cur < slots - 60
    batch.remove(["short"])
    assert len(batch) == 0 and batch.logits is None
    with pytest.raises(ValueError, match="max_new_tokens"):
        batch.add(["x"], [PROMPTS[0]], [SamplingConfig(max_new_tokens=1)], [None])
        batch.advance(batch.sample()[0], [True])
