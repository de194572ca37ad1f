"""Sampler / trainer log-prob mismatch metrics and truncated importance sampling, by hand."""

from __future__ import annotations

import math

import pytest
import torch

from rlhfkit import losses

MASK = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])


def test_mismatch_metrics_by_hand() -> None:
    sampler = torch.tensor([[-1.0, -2.0, -5.0], [-0.5, 0.0, 0.0]])
    trainer = torch.tensor([[-1.1, -1.8, 9.0], [-0.5, 3.0, 0.0]])  # masked entries are wild: ignored
    m = losses.logprob_mismatch(sampler, trainer, MASK)
    # delta = trainer - sampler on real tokens: -0.1, +0.2, 0.0
    assert m["abs_diff_mean"].item() == pytest.approx(0.1)
    assert m["abs_diff_max"].item() == pytest.approx(0.2)
    assert m["ratio_mean"].item() == pytest.approx((math.exp(-0.1) + math.exp(0.2) + 1.0) / 3)
    k3 = [math.exp(d) - 1 - d for d in (-0.1, 0.2, 0.0)]
    assert m["kl"].item() == pytest.approx(sum(k3) / 3, rel=1e-5)  # float32 rounding of e^d - 1 - d
    same = losses.logprob_mismatch(sampler, sampler, MASK)
    assert same["abs_diff_mean"] == 0 and same["ratio_mean"] == 1 and same["kl"] == 0
    empty = losses.logprob_mismatch(sampler, trainer, torch.zeros_like(MASK))
    assert all(torch.isfinite(v) for v in empty.values())


def test_truncated_is_weights_by_hand() -> None:
    sampler = torch.tensor([[-2.0, -1.0, -1.0], [-3.0, -1.0, -1.0]])
    old = torch.tensor([[-1.0, -1.5, 50.0], [-3.0, 0.0, 0.0]])  # log ratios 1.0, -0.5, (masked), 0.0
    w, m = losses.truncated_is_weights(old, sampler, MASK, cap=2.0)
    assert torch.allclose(w, torch.tensor([[2.0, math.exp(-0.5), 0.0], [1.0, 0.0, 0.0]]))  # e^1 capped
    assert m["is_truncated_frac"].item() == pytest.approx(1 / 3)
    assert m["is_weight_mean"].item() == pytest.approx((math.e + math.exp(-0.5) + 1.0) / 3)
    with pytest.raises(ValueError, match="cap"):
        losses.truncated_is_weights(old, sampler, MASK, cap=0.0)


def test_policy_loss_is_weights() -> None:
    logprobs = torch.tensor([[-1.0, -2.0, -1.0], [-0.5, -1.0, -1.0]], requires_grad=True)
    old = torch.tensor([[-1.0, -2.0, -1.0], [-0.5, -1.0, -1.0]])
    adv = torch.tensor([1.0, -2.0])
    plain, _ = losses.policy_loss(logprobs, old, adv, MASK)
    ones, _ = losses.policy_loss(logprobs, old, adv, MASK, is_weights=torch.ones(2, 3))
    assert torch.equal(plain, ones)
    # ratio 1 everywhere: l_t = -A_t w_t; token mean over 3 real tokens: -(1 * 2 + 1 * 0.5 + (-2) * 1) / 3
    w = torch.tensor([[2.0, 0.5, 7.0], [1.0, 9.0, 9.0]])
    loss, _ = losses.policy_loss(logprobs, old, adv, MASK, is_weights=w)
    assert loss.item() == pytest.approx(-(2.0 + 0.5 - 2.0) / 3)
    loss.backward()  # the weights are constants: d loss / d logprobs = -A w / 3 at ratio 1
    assert torch.allclose(logprobs.grad, torch.tensor([[-2 / 3, -0.5 / 3, 0.0], [2 / 3, 0.0, 0.0]]))
