"""The shared-prompt forward equals the plain forward over the concatenated rows: values and gradients."""

from __future__ import annotations

import pytest
import torch

from rlhfkit.data.encoding import pad
from rlhfkit.losses import gather_logprobs
from rlhfkit.models.loading import decoder_and_head, load_causal_lm
from rlhfkit.models.prefix import SharedPromptBatch, answer_predictors, shared_prompt_forward
from rlhfkit.rollout import Rollout

PAD = 0
PREFIX = [1, 30, 31, 32, 33, 34]  # six tokens every prompt starts with, like a system prompt
PROMPTS = [
    [*PREFIX, 40, 41, 42],
    [*PREFIX, 40, 41, 42],  # the same prompt twice (a GRPO group)
    [*PREFIX, 50],  # shortest: one token after the prefix
    [*PREFIX, 60, 61, 62, 63, 64, 65],
    [*PREFIX, 40, 41, 42],
]
ANSWERS = [[70, 71, 72, 2], [73, 2], [74], [75, 76, 77, 78, 79, 2], [80, 81]]


@pytest.fixture(scope="module")
def model(tiny_model):
    torch.manual_seed(0)
    m, _ = load_causal_lm(str(tiny_model))
    for p in m.parameters():  # break the tiny model's symmetries so every weight matters
        p.data.add_(0.02 * torch.randn_like(p))
    return m


def plain_logprobs(model, prompts, answers) -> torch.Tensor:
    """Reference: one forward over right-padded prompt + answer rows, per-answer-token log-probs (B, T)."""
    ids, mask, pos = pad([p + a for p, a in zip(prompts, answers, strict=True)], PAD)
    logits = model(input_ids=ids, attention_mask=mask, position_ids=pos).logits  # (B, L, V)
    width = max(map(len, answers))
    out = torch.zeros(len(prompts), width)
    for i, (p, a) in enumerate(zip(prompts, answers, strict=True)):
        lp = gather_logprobs(logits[i, len(p) - 1 : len(p) + len(a) - 1], torch.tensor(a))  # (len a,)
        out[i, : len(a)] = lp
    return out


def shared_logprobs(model, batch: SharedPromptBatch) -> torch.Tensor:
    decoder, head = decoder_and_head(model)
    last, answers = shared_prompt_forward(decoder, batch)
    lp = gather_logprobs(head(answer_predictors(last, answers)), batch.answer_ids)  # (B, T)
    return lp * batch.answer_mask


def test_build_stores_each_distinct_prompt_once():
    batch = SharedPromptBatch.build(PROMPTS, ANSWERS, PAD)
    assert batch.prefix_ids.tolist() == [PREFIX]
    assert batch.inverse.tolist() == [0, 0, 1, 2, 0]
    assert batch.prompt_ids.tolist() == [[0, 0, 0, 40, 41, 42], [0, 0, 0, 0, 0, 50], [60, 61, 62, 63, 64, 65]]
    assert batch.prompt_lengths.tolist() == [len(p) for p in PROMPTS]
    assert batch.sequences() == [p + a for p, a in zip(PROMPTS, ANSWERS, strict=True)]
    plain = sum(len(p) + len(a) for p, a in zip(PROMPTS, ANSWERS, strict=True))
    assert (plain, batch.tokens_processed) == (61, 6 + 10 + 15)
    # one distinct prompt: no separate prefix level; too short a common prefix: none either
    assert SharedPromptBatch.build([PROMPTS[0]] * 3, ANSWERS[:3], PAD).prefix_ids.shape == (1, 0)
    assert SharedPromptBatch.build([[5, 6, 7], [5, 6, 8]], [[1], [2]], PAD).prefix_ids.shape == (1, 0)
    with pytest.raises(ValueError, match="at least one token"):
        SharedPromptBatch.build([[], [1]], [[1], [2]], PAD)


@pytest.mark.parametrize("min_shared", [4, 1000])  # with and without the separate prefix level
def test_logprobs_and_gradients_equal_the_plain_forward(model, min_shared):
    batch = SharedPromptBatch.build(PROMPTS, ANSWERS, PAD, min_shared=min_shared)
    assert batch.prefix_ids.shape[1] == (len(PREFIX) if min_shared == 4 else 0)
    weights = torch.randn(len(PROMPTS), max(map(len, ANSWERS)))  # an arbitrary loss over the tokens

    model.zero_grad()
    expected = plain_logprobs(model, PROMPTS, ANSWERS)
    (expected * weights).sum().backward()
    expected_grads = {n: p.grad.clone() for n, p in model.named_parameters()}

    model.zero_grad()
    got = shared_logprobs(model, batch)
    (got * weights).sum().backward()

    torch.testing.assert_close(got, expected, atol=2e-5, rtol=1e-5)
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, expected_grads[name], atol=1e-5, rtol=1e-4, msg=name)


def test_from_rollout_rows_and_select(model):
    ids, mask, _ = pad(PROMPTS, PAD, side="left")  # a rollout's left-padded prompts
    ans_ids, ans_mask, _ = pad(ANSWERS, PAD)
    rollout = Rollout(ids, mask, ans_ids, ans_mask, torch.zeros(ans_ids.shape), torch.zeros(len(ids)).bool())
    batch = SharedPromptBatch.from_rollout(rollout, PAD)
    assert batch.prefix_ids.tolist() == [PREFIX] and batch.prompt_ids.shape[0] == 3
    with torch.no_grad():
        full = shared_logprobs(model, batch)
        part = shared_logprobs(model, batch.select(torch.tensor([3, 1])))
        torch.testing.assert_close(full, plain_logprobs(model, PROMPTS, ANSWERS), atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(part, full[[3, 1]], atol=2e-5, rtol=1e-5)
