"""Tests for rlhfkit.losses against hand-computed numbers (the arithmetic is written next to each value)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from rlhfkit import losses as L


def t(*rows: object) -> torch.Tensor:
    """float32 tensor from nested lists (shorthand)."""
    return torch.tensor(rows[0] if len(rows) == 1 else list(rows), dtype=torch.float32)


def close(actual: torch.Tensor | float, expected: object, tol: float = 1e-6) -> None:
    actual = torch.as_tensor(actual, dtype=torch.float64)
    torch.testing.assert_close(actual, torch.as_tensor(expected, dtype=torch.float64), atol=tol, rtol=tol)


# ------------------------------------------------------------------------------------------- masked stats
X = t([1.0, 2.0, 3.0, 100.0], [4.0, 5.0, 0.0, 0.0])
MASK = t([1.0, 1.0, 1.0, 0.0], [1.0, 1.0, 0.0, 0.0])  # real entries 1, 2, 3, 4, 5


@pytest.mark.parametrize("mask", [MASK, MASK.bool()])
def test_masked_sum_mean_var(mask: torch.Tensor) -> None:
    close(L.masked_sum(X, mask), 15.0)  # 1+2+3+4+5
    close(L.masked_sum(X, mask, dim=-1), [6.0, 9.0])
    close(L.masked_mean(X, mask), 3.0)  # 15 / 5
    close(L.masked_mean(X, mask, dim=-1), [2.0, 4.5])  # 6/3, 9/2
    # deviations from 3: -2,-1,0,1,2 -> squares sum 10; population 10/5 = 2, sample 10/4 = 2.5
    close(L.masked_var(X, mask, unbiased=False), 2.0)
    close(L.masked_var(X, mask), 2.5)


def test_masked_stats_ignore_non_finite_padding_and_empty_mask() -> None:
    x = t([1.0, float("inf"), float("nan")])
    close(L.masked_mean(x, t([1.0, 0.0, 0.0])), 1.0)
    zero = torch.zeros(3)
    close(L.masked_mean(x, zero), 0.0)
    close(L.masked_var(t([1.0, 2.0, 3.0]), zero), 0.0)
    close(L.masked_var(t([1.0, 2.0, 3.0]), t([0.0, 1.0, 0.0])), 0.0)  # one entry: 0, not NaN


def test_masked_whiten() -> None:
    # mean 3, population var 2: (x - 3) / sqrt(2 + 1e-8) = [-2, -1, 0, 1, 2] / 1.41421356
    out = L.masked_whiten(X, MASK)
    expected = t([-1.41421356, -0.70710678, 0.0, 0.0], [0.70710678, 1.41421356, 0.0, 0.0])
    close(out, expected)
    close(L.masked_mean(out, MASK), 0.0)
    close(L.masked_var(out, MASK, unbiased=False), 1.0, tol=1e-5)
    assert (out[MASK == 0] == 0).all()
    kept = L.masked_whiten(X, MASK, shift_mean=False)  # + 3 again: 3 - 1.41421356 = 1.58578644 ...
    close(kept, t([1.58578644, 2.29289322, 3.0, 0.0], [3.70710678, 4.41421356, 0.0, 0.0]))
    close(L.masked_mean(kept, MASK), 3.0)
    # TRL variant, sample var 2.5: 2 / sqrt(2.5) = 1.26491106
    close(L.masked_whiten(X, MASK, unbiased=True)[1, 1], 1.26491106)


def test_masked_whiten_all_masked_is_zero_with_zero_grads() -> None:
    x = torch.randn(2, 3, requires_grad=True)
    out = L.masked_whiten(x, torch.zeros(2, 3))
    assert torch.equal(out, torch.zeros(2, 3))
    out.sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and (x.grad == 0).all()


# ----------------------------------------------------------------------------------------- Bradley-Terry
CHOSEN, REJECTED = t([2.0, 0.5]), t([1.0, 1.5])  # differences r_c - r_r = [1, -1]


def test_bradley_terry_plain() -> None:
    loss, m = L.bradley_terry_loss(CHOSEN, REJECTED)
    # -log sigmoid(1) = log(1 + e^-1) = 0.31326169; -log sigmoid(-1) = log(1 + e) = 1.31326169
    close(loss, (0.31326169 + 1.31326169) / 2)  # 0.81326169
    close(m["rewards/accuracy"], 0.5)
    close(m["rewards/margin"], 0.0)  # (1 - 1) / 2
    close(m["rewards/chosen"], 1.25)  # (2 + 0.5) / 2
    close(m["rewards/rejected"], 1.25)  # (1 + 1.5) / 2
    assert all(not v.requires_grad and v.dim() == 0 for v in m.values())


def test_bradley_terry_margin_weights_centering() -> None:
    loss, _ = L.bradley_terry_loss(CHOSEN, REJECTED, margin=1.0)
    # logits 1-1 = 0, -1-1 = -2: log 2 = 0.69314718, log(1 + e^2) = 2.12692801; mean 1.41003760
    close(loss, 1.41003760)
    loss, _ = L.bradley_terry_loss(CHOSEN, REJECTED, margin=t([0.0, 1.0]))
    close(loss, (0.31326169 + 2.12692801) / 2)  # per-pair margins
    loss, m = L.bradley_terry_loss(CHOSEN, REJECTED, weights=t([3.0, 1.0]))
    close(loss, (3 * 0.31326169 + 1.31326169) / 4)  # 0.56326169
    close(m["rewards/accuracy"], 0.75)  # weight 3 of 4 on the correct pair
    # centering: (r_c + r_r)^2 = 3^2, 2^2 -> mean 6.5; 0.81326169 + 0.01 * 6.5 = 0.87826169
    loss, m = L.bradley_terry_loss(CHOSEN, REJECTED, centering_coef=0.01)
    close(loss, 0.87826169)
    close(m["loss/centering"], 6.5)


def test_bradley_terry_no_pairs_is_zero() -> None:
    r = torch.zeros(0, requires_grad=True)
    loss, m = L.bradley_terry_loss(r, r.detach(), centering_coef=0.1)
    assert loss.item() == 0.0 and all(torch.isfinite(v) for v in m.values())


# ----------------------------------------------------------------------------------------------- rankings
def test_ranking_pairs_with_ties() -> None:
    assert L.ranking_pairs([0, 1, 1, 2]) == [(0, 1), (0, 2), (0, 3), (1, 3), (2, 3)]
    assert L.ranking_pairs(torch.tensor([2, 0, 1])) == [(1, 0), (2, 0), (1, 2)]
    assert L.ranking_pairs([0, 0, 0]) == []
    assert L.ranking_pairs([0]) == []


def test_ranking_loss_with_ties() -> None:
    rewards = t([3.0, 2.0, 1.0, 0.0])
    loss, m = L.ranking_loss(rewards, [0, 1, 1, 2])
    # pairs (0,1),(0,2),(0,3),(1,3),(2,3) -> differences 1, 2, 3, 2, 1; n_pairs = 5 (the tie (1,2) is dropped)
    # -log sigmoid: 0.31326169, 0.12692801, 0.04858735, 0.12692801, 0.31326169 -> sum 0.92896675 / 5
    close(loss, 0.18579335)
    close(m["rewards/accuracy"], 1.0)
    # no ties: K = 3 -> C(3, 2) = 3 pairs, differences 1, 2, 1 -> (2 * 0.31326169 + 0.12692801) / 3
    loss, _ = L.ranking_loss(t([2.0, 1.0, 0.0]), [0, 1, 2])
    close(loss, 0.25115046)
    loss, _ = L.ranking_loss(t([2.0, 1.0]), [0, 0])  # all tied: no pair, loss 0
    assert loss.item() == 0.0
    with pytest.raises(ValueError):
        L.ranking_loss(t([1.0, 2.0]), [0, 1, 2])


def test_pairwise_from_rankings_weights() -> None:
    # prompt 7: ranks [0, 1] -> 1 pair (w 1); prompt 3: ranks [0, 1, 1, 2] -> 5 pairs (w 1/5); prompt 5: tie
    group = [7, 7, 3, 3, 3, 3, 5, 5]
    ranks = [0, 1, 0, 1, 1, 2, 0, 0]
    pairs = L.pairwise_from_rankings(group, ranks)
    columns = (pairs.chosen_index.tolist(), pairs.rejected_index.tolist(), pairs.weights.tolist())
    got = sorted(zip(*columns, strict=True))
    expected = [(0, 1, 1.0)] + [(2 + i, 2 + j, 0.2) for i, j in [(0, 1), (0, 2), (0, 3), (1, 3), (2, 3)]]
    assert [(c, r) for c, r, _ in got] == [(c, r) for c, r, _ in expected]
    close([w for *_, w in got], [w for *_, w in expected])
    # loss: prompt 7 difference 1 -> 0.31326169; prompt 3 as in test_ranking_loss_with_ties -> 0.18579335
    rewards = t([1.0, 0.0, 3.0, 2.0, 1.0, 0.0, 4.0, 4.0])
    loss, _ = L.batched_ranking_loss(rewards, group, ranks)
    close(loss, (0.31326169 + 0.18579335) / 2)  # 0.24952752; the all-tied prompt 5 does not count


def test_batched_ranking_equals_per_prompt_loop() -> None:
    gen = torch.Generator().manual_seed(0)
    ks = [2, 4, 3, 1, 5, 3]
    rank_lists = [[0, 1], [0, 1, 1, 2], [2, 0, 1], [0], [1, 0, 3, 3, 2], [0, 0, 0]]
    rewards = torch.randn(sum(ks), generator=gen, requires_grad=True)
    group = torch.repeat_interleave(torch.arange(len(ks)), torch.tensor(ks))
    flat_ranks = [r for ranks in rank_lists for r in ranks]
    loss, metrics = L.batched_ranking_loss(rewards, group, flat_ranks, centering_coef=0.05)
    per_prompt, offsets = [], [0, *torch.tensor(ks).cumsum(0).tolist()]
    for ranks, start, end in zip(rank_lists, offsets[:-1], offsets[1:], strict=True):
        if L.ranking_pairs(ranks):  # prompts with no comparable pair carry no weight
            per_prompt.append(L.ranking_loss(rewards[start:end], ranks, centering_coef=0.05))
    loop_loss = torch.stack([loss for loss, _ in per_prompt]).mean()
    close(loss, loop_loss.item())
    for key in metrics:
        close(metrics[key], torch.stack([m[key] for _, m in per_prompt]).mean())
    (grad_batched,) = torch.autograd.grad(loss, rewards)
    (grad_loop,) = torch.autograd.grad(loop_loss, rewards)
    close(grad_batched, grad_loop)


# ------------------------------------------------------------------------------------------------------ KL
def test_kl_estimators() -> None:
    logprobs, ref = t([math.log(0.5), math.log(0.25)]), t([math.log(0.25), math.log(0.5)])
    # log_ratio = [log 2, -log 2] = [0.69314718, -0.69314718]
    close(L.kl_estimate(logprobs, ref, "k1"), [0.69314718, -0.69314718])
    close(L.kl_estimate(logprobs, ref, "k2"), [0.24022651, 0.24022651])  # 0.5 * 0.48045301
    # k3 = exp(-lr) - 1 + lr: 0.5 - 1 + 0.69314718 = 0.19314718; 2 - 1 - 0.69314718 = 0.30685282
    close(L.kl_estimate(logprobs, ref, "k3"), [0.19314718, 0.30685282])
    with pytest.raises(ValueError):
        L.kl_estimate(logprobs, ref, "k4")  # type: ignore[arg-type]


def test_k3_non_negative_and_finite() -> None:
    log_ratio = torch.cat([torch.randn(1000) * 3, t([0.0, 1e-8, -1e-8, 100.0, -100.0])])
    k3 = L.kl_estimate(log_ratio, torch.zeros_like(log_ratio), "k3")
    assert torch.isfinite(k3).all() and (k3 >= 0).all()
    assert k3[-5:-2].abs().max() < 1e-7
    close(k3[-2], math.exp(-20) - 1 + 100)  # exp argument clamped to -20
    close(k3[-1], math.exp(20) - 1 - 100, tol=1e-6)  # 4.85165195e8 - 101


def test_adaptive_kl_controller() -> None:
    ctl = L.AdaptiveKLController(value=0.1, target=6.0, horizon=10000)
    # e = clip(12 / 6 - 1, -0.2, 0.2) = 0.2 -> 0.1 * (1 + 0.2 * 256 / 10000) = 0.1 * 1.00512 = 0.100512
    assert ctl.update(12.0, 256) == pytest.approx(0.100512, abs=1e-12)
    low = L.AdaptiveKLController(value=0.1, target=6.0, horizon=10000)
    # e = clip(0 / 6 - 1) = clip(-1) = -0.2 -> 0.1 * (1 - 0.00512) = 0.099488
    assert low.update(0.0, 256) == pytest.approx(0.099488, abs=1e-12)
    near = L.AdaptiveKLController(value=0.1, target=6.0, horizon=10000)
    # e = 6.6 / 6 - 1 = 0.1 (inside the clip) -> 0.1 * (1 + 0.1 * 100 / 10000) = 0.1001
    assert near.update(torch.tensor(6.6), 100) == pytest.approx(0.1001, rel=1e-6)
    with pytest.raises(ValueError):
        L.AdaptiveKLController(value=0.1, target=0.0)


def test_kl_controller_state_dict_round_trip() -> None:
    ctl = L.make_kl_controller(0.1, target=6.0, horizon=10000)
    assert isinstance(ctl, L.AdaptiveKLController)
    ctl.update(12.0, 256)
    state = json.loads(json.dumps(ctl.state_dict()))
    fresh = L.make_kl_controller(0.5, target=1.0, horizon=1)
    fresh.load_state_dict(state)
    assert fresh == ctl and fresh.value == pytest.approx(0.100512)
    fixed = L.make_kl_controller(0.05)
    assert isinstance(fixed, L.FixedKLController)
    assert fixed.update(100.0, 256) == 0.05
    other = L.FixedKLController(1.0)
    other.load_state_dict(json.loads(json.dumps(fixed.state_dict())))
    assert other.value == 0.05
    with pytest.raises(ValueError):
        other.load_state_dict(state)  # adaptive state into a fixed controller


def test_kl_penalized_rewards_last_real_token() -> None:
    scores = t([1.0, 2.0, 3.0, 4.0])
    logprobs, ref = torch.zeros(4, 4), torch.full((4, 4), -0.5)  # k1 = 0.5 per token
    mask = t(
        [1.0, 1.0, 0.0, 0.0],  # right padded: last real token at 1
        [0.0, 0.0, 1.0, 1.0],  # leading zeros (left padded prompt): last real token at 3
        [0.0, 1.0, 1.0, 0.0],  # both: last real token at 2
        [0.0, 0.0, 0.0, 0.0],  # no real token: no score
    )
    rewards, kl = L.kl_penalized_rewards(scores, logprobs, ref, mask, kl_coef=0.1)
    close(kl, 0.5 * mask)
    # -0.1 * 0.5 = -0.05 per real token, + score on the last one: -0.05 + 1 = 0.95, -0.05 + 2 = 1.95 ...
    expected = t(
        [-0.05, 0.95, 0.0, 0.0],
        [0.0, 0.0, -0.05, 1.95],
        [0.0, -0.05, 2.95, 0.0],
        [0.0, 0.0, 0.0, 0.0],
    )
    close(rewards, expected)
    rewards_bool, _ = L.kl_penalized_rewards(scores, logprobs, ref, mask.bool(), kl_coef=0.1, kind="k2")
    close(rewards_bool[0], [-0.0125, 0.9875, 0.0, 0.0])  # k2 = 0.5 * 0.25 = 0.125 -> -0.0125


# ----------------------------------------------------------------------------------------------------- GAE
def test_gae_hand_example() -> None:
    rewards, values = t([[0.0, 0.0, 1.0]]), t([[0.5, 0.6, 0.7]])
    adv, ret = L.compute_gae(rewards, values, torch.ones(1, 3), gamma=1.0, lam=0.95)
    # t=2: delta = 1 + 0 - 0.7 = 0.3;   A2 = 0.3
    # t=1: delta = 0 + 0.7 - 0.6 = 0.1; A1 = 0.1 + 0.95 * 0.3 = 0.385
    # t=0: delta = 0 + 0.6 - 0.5 = 0.1; A0 = 0.1 + 0.95 * 0.385 = 0.46575
    close(adv, [[0.46575, 0.385, 0.3]])
    close(ret, [[0.96575, 0.985, 1.0]])  # A + V


def test_gae_masked_rows() -> None:
    rewards = t([0.0, 1.0, 5.0], [7.0, 0.0, 1.0], [9.0, 9.0, 9.0])
    values = t([0.5, 0.6, 9.0], [9.0, 0.5, 0.6], [1.0, 2.0, 3.0])
    mask = t([1.0, 1.0, 0.0], [0.0, 1.0, 1.0], [0.0, 0.0, 0.0])
    adv, ret = L.compute_gae(rewards, values, mask, gamma=1.0, lam=0.95)
    # row 0 (right padded): t=1: delta = 1 + 0 - 0.6 = 0.4 = A1; t=0: delta = 0 + 0.6 - 0.5 = 0.1,
    #   A0 = 0.1 + 0.95 * 0.4 = 0.48. The padded reward 5 and value 9 are ignored.
    # row 1 (leading zero): t=2: delta = 1 - 0.6 = 0.4 = A2; t=1: delta = 0 + 0.6 - 0.5 = 0.1, A1 = 0.48
    close(adv, t([0.48, 0.4, 0.0], [0.0, 0.48, 0.4], [0.0, 0.0, 0.0]))
    close(ret, t([0.98, 1.0, 0.0], [0.0, 0.98, 1.0], [0.0, 0.0, 0.0]))
    # gamma < 1: row [1, 1] values [0, 0], gamma 0.5, lam 1: A1 = 1; A0 = 1 + 0.5 * 1 = 1.5
    adv, _ = L.compute_gae(t([[1.0, 1.0]]), torch.zeros(1, 2), torch.ones(1, 2).bool(), gamma=0.5, lam=1.0)
    close(adv, [[1.5, 1.0]])


# -------------------------------------------------------------------------------------------- policy loss
def test_policy_loss_ratio_one() -> None:
    logprobs = t([[-1.0, -2.0, -0.5]])
    adv = t([[1.0, -2.0, 0.5]])
    loss, m = L.policy_loss(logprobs, logprobs.clone(), adv, torch.ones(1, 3))
    close(loss, 0.16666667)  # -mean(A) = -(1 - 2 + 0.5) / 3
    close(m["clip_frac"], 0.0)
    close(m["approx_kl"], 0.0)
    close(m["ratio_mean"], 1.0)
    close(m["ratio_max"], 1.0)


def test_policy_loss_clipping() -> None:
    ratios = t([[1.5, 1.5, 0.5, 0.5]])
    adv = t([[1.0, -1.0, -1.0, 1.0]])
    loss, m = L.policy_loss(ratios.log(), torch.zeros(1, 4), adv, torch.ones(1, 4))
    # token 0: max(-1.5, -1.2) = -1.2 (clipped);  token 1: max(1.5, 1.2) = 1.5
    # token 2: max(0.5, 0.8) = 0.8 (clipped);     token 3: max(-0.5, -0.8) = -0.5
    close(loss, (-1.2 + 1.5 + 0.8 - 0.5) / 4)  # 0.15
    close(m["clip_frac"], 0.5)
    # k3 = r - 1 - log r: 1.5 -> 0.5 - 0.40546511 = 0.09453489; 0.5 -> -0.5 + 0.69314718 = 0.19314718
    close(m["approx_kl"], (0.09453489 + 0.19314718) / 2)
    close(m["ratio_mean"], 1.0)
    close(m["ratio_max"], 1.5)
    close(m["ratio_min"], 0.5)


def test_policy_loss_clip_higher() -> None:
    ratios = t([[1.25, 1.5, 0.5]])
    adv = t([[1.0, 1.0, -1.0]])
    loss, m = L.policy_loss(
        ratios.log(), torch.zeros(1, 3), adv, torch.ones(1, 3), clip_low=0.2, clip_high=0.28
    )
    # 1.25 < 1.28 not clipped: -1.25; 1.5 clipped at 1.28: -1.28; 0.5 clipped at 1 - 0.2: 0.8
    close(loss, (-1.25 - 1.28 + 0.8) / 3)  # -0.57666667
    close(m["clip_frac"], 2 / 3)
    loss_sym, _ = L.policy_loss(ratios.log(), torch.zeros(1, 3), adv, torch.ones(1, 3))
    close(loss_sym, (-1.2 - 1.2 + 0.8) / 3)  # symmetric 0.2: 1.25 is clipped too


def test_policy_loss_aggregations_ragged() -> None:
    adv = t([1.0, 2.0, 3.0, 4.0], [5.0, 6.0, 0.0, 0.0])
    mask = t([1.0, 1.0, 1.0, 1.0], [1.0, 0.0, 0.0, 0.0])
    zeros = torch.zeros(2, 4)  # ratio 1, so the per-token loss is -A

    def run(**kw: object) -> torch.Tensor:
        return L.policy_loss(zeros, zeros, adv, mask, **kw)[0]  # type: ignore[arg-type]

    close(run(aggregation="token"), -3.0)  # -(1 + 2 + 3 + 4 + 5) / 5
    close(run(aggregation="sequence"), -3.75)  # (-(10 / 4) - 5 / 1) / 2
    close(run(aggregation="constant"), -1.875)  # -15 / (2 * 4)
    close(run(aggregation="constant", max_len=8), -0.9375)  # -15 / (2 * 8)
    with pytest.raises(ValueError):
        run(aggregation="mean")
    # per-sequence advantages (B,) broadcast over tokens: -(2 * 4 + (-1) * 1) / 5 = -1.4
    loss, _ = L.policy_loss(zeros, zeros, t([2.0, -1.0]), mask)
    close(loss, -1.4)


def test_policy_loss_extreme_log_ratio_is_finite() -> None:
    logprobs = t([[100.0, -100.0]]).requires_grad_()
    loss, m = L.policy_loss(logprobs, torch.zeros(1, 2), t([[-1.0, 1.0]]), torch.ones(1, 2))
    # token 0: ratio exp(20) = 4.85165195e8, A = -1 -> max(4.85e8, 1.2); token 1: ratio exp(-20), A = 1
    #   -> max(-2.06e-9, -0.8) = -2.06e-9. Mean = (4.85165195e8 - 2.06e-9) / 2
    close(loss, 4.85165195e8 / 2, tol=1e-6)
    loss.backward()
    assert logprobs.grad is not None and torch.isfinite(logprobs.grad).all()
    assert all(torch.isfinite(v) for v in m.values())


def test_policy_and_value_loss_all_masked() -> None:
    logprobs = torch.randn(2, 3, requires_grad=True)
    values = torch.randn(2, 3, requires_grad=True)
    mask = torch.zeros(2, 3)
    for aggregation in ("token", "sequence", "constant"):
        loss, m = L.policy_loss(logprobs, torch.randn(2, 3), torch.randn(2, 3), mask, aggregation=aggregation)
        assert loss.item() == 0.0 and all(torch.isfinite(v) for v in m.values())
        (grad,) = torch.autograd.grad(loss, logprobs)
        assert torch.isfinite(grad).all() and (grad == 0).all()
    loss, m = L.value_loss(values, torch.randn(2, 3), torch.randn(2, 3), mask.bool())
    assert loss.item() == 0.0 and all(torch.isfinite(v) for v in m.values())
    (grad,) = torch.autograd.grad(loss, values)
    assert torch.isfinite(grad).all() and (grad == 0).all()


# --------------------------------------------------------------------------------------------- value loss
def test_value_loss_clipped() -> None:
    values, old = t([[1.5, 1.1, 1.5]]), t([[1.0, 1.0, 1.0]])
    returns = t([[2.0, 0.0, 1.3]])
    loss, m = L.value_loss(values, old, returns, torch.ones(1, 3), clip_range=0.2)
    # token 0: (1.5 - 2)^2 = 0.25; clipped 1.2 -> (1.2 - 2)^2 = 0.64 -> 0.64 (clipped branch)
    # token 1: (1.1 - 0)^2 = 1.21; clipped 1.1 (inside range) -> 1.21 -> 1.21 (equal: not counted clipped)
    # token 2: (1.5 - 1.3)^2 = 0.04; clipped 1.2 -> 0.01 -> 0.04
    close(loss, 0.5 * (0.64 + 1.21 + 0.04) / 3)  # 0.315
    close(m["vf_clip_frac"], 1 / 3)
    loss, m = L.value_loss(values, old, returns, torch.ones(1, 3), clip_range=None)
    close(loss, 0.5 * (0.25 + 1.21 + 0.04) / 3)  # 0.25
    close(m["vf_clip_frac"], 0.0)


def test_explained_variance() -> None:
    returns, values = t([1.0, 2.0, 3.0, 4.0]), t([1.0, 2.0, 3.0, 3.0])
    # residual [0, 0, 0, 1]: var = 0.25 - 0.0625 = 0.1875; var(R) = 1.25 -> 1 - 0.15 = 0.85
    close(L.explained_variance(values, returns, torch.ones(4)), 0.85)
    close(L.explained_variance(values, returns, t([1.0, 1.0, 1.0, 0.0])), 1.0)  # perfect on real entries
    close(L.explained_variance(values, torch.ones(4), torch.ones(4)), 0.0)  # Var(R) = 0 -> 0, not NaN


# ------------------------------------------------------------------------------------------ logits helpers
def test_gather_logprobs() -> None:
    logits = t([[0.0, math.log(3.0)]])
    # softmax = [1/4, 3/4]: log 0.75 = -0.28768207
    close(L.gather_logprobs(logits, torch.tensor([1])), [-0.28768207])
    # T = 2: logits/2 = [0, log sqrt 3] -> p0 = 1 / (1 + 1.73205081) -> log = -1.00505254
    close(L.gather_logprobs(logits, torch.tensor([0]), temperature=2.0), [-1.00505254])
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 5, 11, generator=gen) * 4
    tokens = torch.randint(0, 11, (2, 5), generator=gen)
    for temp in (1.0, 0.7):
        ref = torch.log_softmax(logits / temp, dim=-1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
        close(L.gather_logprobs(logits, tokens, temperature=temp), ref, tol=1e-5)
    assert L.gather_logprobs(logits.bfloat16(), tokens).dtype == torch.float32
    with pytest.raises(ValueError):
        L.gather_logprobs(logits, tokens, temperature=0.0)


def test_entropy_from_logits() -> None:
    close(L.entropy_from_logits(torch.full((2, 3, 50), 7.0)), torch.full((2, 3), math.log(50)))  # log V
    # p = [1/4, 3/4]: -(0.25 log 0.25 + 0.75 log 0.75) = 0.34657359 + 0.21576155 = 0.56233514
    close(L.entropy_from_logits(t([[0.0, math.log(3.0)]])), [0.56233514])
    close(L.entropy_from_logits(t([[0.0, 1000.0]])), [0.0])  # huge logit: no overflow


def test_token_logprobs_entropy_values_and_gradient() -> None:
    lp, ent = L.token_logprobs_entropy(t([[0.0, math.log(3.0)], [1000.0, 0.0]]), torch.tensor([1, 1]))
    # row 0: p = [1/4, 3/4] -> log 0.75, H = 0.56233514; row 1: a huge logit, no overflow: log p1 = -1000, H 0
    close(lp, [-0.28768207, -1000.0])
    close(ent, [0.56233514, 0.0])
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 13, generator=gen) * 4
    tokens = torch.randint(0, 13, (6,), generator=gen)
    upstream = torch.randn(6, generator=gen)
    for temp in (1.0, 0.7):
        plain = logits.clone().requires_grad_(True)
        expected = L.gather_logprobs(plain, tokens, temperature=temp)
        (expected * upstream).sum().backward()
        fused = logits.clone().requires_grad_(True)
        got, ent = L.token_logprobs_entropy(fused, tokens, temperature=temp)
        (got * upstream).sum().backward()
        close(got, expected, tol=1e-5)
        close(ent, L.entropy_from_logits(logits / temp), tol=1e-5)
        close(fused.grad, plain.grad, tol=1e-5)
        assert not ent.requires_grad
    assert L.token_logprobs_entropy(logits, tokens, entropy=False)[1] is None
    with pytest.raises(ValueError):
        L.token_logprobs_entropy(logits, tokens, temperature=0.0)


# --------------------------------------------------------------------------------------- GRPO / RLOO
def test_group_advantages() -> None:
    rewards = t([1.0, 2.0, 3.0, 5.0, 5.0, 5.0])
    adv, zero_var = L.group_advantages(rewards, group_size=3)
    # group 0: mean 2, centered [-1, 0, 1], sample std sqrt(2 / 2) = 1 -> +-1 / (1 + 1e-4) = +-0.99990001
    # group 1: all 5 -> zero variance -> exactly 0
    close(adv, [-0.99990001, 0.0, 0.99990001, 0.0, 0.0, 0.0])
    assert zero_var.tolist() == [False, True]
    assert (adv[3:] == 0).all()
    adv, _ = L.group_advantages(rewards, group_size=3, scale="none")
    close(adv, [-1.0, 0.0, 1.0, 0.0, 0.0, 0.0])
    # batch std: mean 3.5, squared deviations 6.25 + 2.25 + 0.25 + 3 * 2.25 = 15.5, / 5 = 3.1,
    # sqrt = 1.76068169 -> 1 / (1.76068169 + 1e-4) = 0.56792958
    adv, _ = L.group_advantages(rewards, group_size=3, scale="batch")
    close(adv, [-0.56792958, 0.0, 0.56792958, 0.0, 0.0, 0.0])
    adv, zero_var = L.group_advantages(t([0.1, 0.1, 0.1]), group_size=3)  # rounding must not leak
    assert (adv == 0).all() and zero_var.tolist() == [True]
    adv, zero_var = L.group_advantages(t([1.0, 2.0]), group_size=1)
    assert (adv == 0).all() and zero_var.all()
    with pytest.raises(ValueError):
        L.group_advantages(rewards, group_size=4)


def test_rloo_advantages() -> None:
    adv = L.rloo_advantages(t([1.0, 2.0, 3.0, 6.0, 4.0, 4.0, 4.0, 4.0]), group_size=4)
    # group 0: A_0 = 1 - (2 + 3 + 6) / 3 = -2.66666667; A_1 = 2 - 10/3 = -1.33333333; A_2 = 3 - 3 = 0;
    #   A_3 = 6 - (1 + 2 + 3) / 3 = 4. Group 1: all equal -> 0.
    close(adv, [-2.66666667, -1.33333333, 0.0, 4.0, 0.0, 0.0, 0.0, 0.0])
    close(L.rloo_advantages(t([1.0, 0.0]), group_size=2), [1.0, -1.0])  # 1 - 0, 0 - 1
    with pytest.raises(ValueError, match="group_size >= 2"):
        L.rloo_advantages(t([1.0, 2.0]), group_size=1)


# ---------------------------------------------------------------------------------------------------- DPO
# pc = -1, rc = -2, pr = -3, rr = -2: h = (-1 + 2) - (-3 + 2) = 1 - (-1) = 2; beta = 0.1 -> beta h = 0.2
DPO_ARGS = (t([-1.0]), t([-3.0]), t([-2.0]), t([-2.0]))


def test_dpo_sigmoid() -> None:
    loss, m = L.dpo_loss(*DPO_ARGS, beta=0.1)
    close(loss, 0.59813887)  # -log sigmoid(0.2) = log(1 + e^-0.2) = log(1.81873075)
    close(m["rewards/chosen"], 0.1)  # 0.1 * (-1 + 2)
    close(m["rewards/rejected"], -0.1)  # 0.1 * (-3 + 2)
    close(m["rewards/margin"], 0.2)
    close(m["rewards/accuracy"], 1.0)


def test_cdpo_label_smoothing() -> None:
    loss, _ = L.dpo_loss(*DPO_ARGS, beta=0.1, label_smoothing=0.1)
    # 0.9 * 0.59813887 + 0.1 * (-log sigmoid(-0.2) = log(1 + e^0.2) = 0.79813887) = 0.61813887
    close(loss, 0.61813887)


def test_ipo() -> None:
    loss, _ = L.dpo_loss(*DPO_ARGS, beta=0.1, loss_type="ipo")
    close(loss, 9.0)  # (2 - 1 / (2 * 0.1))^2 = (2 - 5)^2
    with pytest.raises(ValueError):
        L.dpo_loss(*DPO_ARGS, beta=0.1, loss_type="hinge")  # type: ignore[arg-type]
