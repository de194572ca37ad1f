"""Preference losses: Bradley-Terry and ranking losses for reward models, DPO / IPO / cDPO.

Shape letters and conventions: the `rlhfkit.losses` package docstring.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from rlhfkit.losses.masked import (
    Metrics,
)


# ---------------------------------------------------------------------------------------- reward modelling
def bradley_terry_loss(
    chosen_rewards: Tensor,
    rejected_rewards: Tensor,
    margin: Tensor | float | None = None,
    weights: Tensor | None = None,
    centering_coef: float = 0.0,
) -> tuple[Tensor, Metrics]:
    """Pairwise Bradley-Terry reward loss (Bradley & Terry 1952; Stiennon et al. 2020; Ouyang et al. 2022).

        loss = sum_b w_b * -log sigmoid(r_c - r_r - margin_b) / sum_b w_b
               + centering_coef * sum_b w_b (r_c + r_r)^2 / sum_b w_b

    ``margin`` is Llama 2's preference-strength margin (Touvron et al. 2023); the second term is reward
    centering (Eisenstein et al. 2023, "Helping or herding"), the plain mean of (r_c + r_r)^2 when
    ``weights`` is None. Weights default to 1; if they sum to 0 (e.g. no pairs) the loss is 0.
    """
    diff = chosen_rewards - rejected_rewards  # (B,)
    logits = diff if margin is None else diff - margin  # (B,)
    per_pair = -F.logsigmoid(logits)  # (B,)
    w = torch.ones_like(diff) if weights is None else weights.to(diff.dtype)  # (B,)
    w_sum = w.sum()  # ()
    denom = torch.where(w_sum > 0, w_sum, torch.ones_like(w_sum))  # ()

    def wmean(v: Tensor) -> Tensor:
        return (w * v).sum() / denom

    bt = wmean(per_pair)  # ()
    centering = wmean((chosen_rewards + rejected_rewards) ** 2)  # ()
    loss = bt + centering_coef * centering if centering_coef else bt  # ()
    with torch.no_grad():
        metrics = {
            "loss/bt": bt.detach(),
            "loss/centering": centering.detach(),
            "rewards/chosen": wmean(chosen_rewards.detach()),
            "rewards/rejected": wmean(rejected_rewards.detach()),
            "rewards/margin": wmean(diff.detach()),
            "rewards/accuracy": wmean((diff > 0).to(diff.dtype)),
        }
    return loss, metrics


def ranking_pairs(ranks: Sequence[int] | Tensor) -> list[tuple[int, int]]:
    """All (better, worse) answer-index pairs of one prompt; rank 0 is best, equal ranks are ties (no pair).

    Pairs are ordered by (min(i, j), max(i, j)): ranks [0, 1, 1, 2] -> (0,1), (0,2), (0,3), (1,3), (2,3).
    """
    r = ranks.tolist() if isinstance(ranks, Tensor) else list(ranks)
    k = len(r)
    return [(i, j) if r[i] < r[j] else (j, i) for i in range(k) for j in range(i + 1, k) if r[i] != r[j]]


def ranking_loss(
    rewards: Tensor, ranks: Sequence[int] | Tensor, centering_coef: float = 0.0
) -> tuple[Tensor, Metrics]:
    """InstructGPT ranking loss for ONE prompt's K ranked answers (Ouyang et al. 2022, Eq. 1).

        loss = -1/n_pairs * sum_{(w, l): rank_w < rank_l} log sigmoid(r_w - r_l)

    Tie convention: tied answers form no pair, and the normaliser n_pairs is the number of comparable
    (non-tied) pairs, so every prompt has total weight 1. With no ties n_pairs = C(K, 2), exactly
    InstructGPT's 1/C(K, 2). A prompt with no comparable pair (K = 1 or all tied) gives loss 0.
    rewards: (K,); ranks: K rank levels (0 = best).
    """
    if len(ranks) != rewards.shape[0]:
        raise ValueError(f"ranking_loss: {rewards.shape[0]} rewards but {len(ranks)} ranks")
    idx = torch.tensor(ranking_pairs(ranks), dtype=torch.long, device=rewards.device).reshape(-1, 2)  # (P, 2)
    return bradley_terry_loss(rewards[idx[:, 0]], rewards[idx[:, 1]], centering_coef=centering_coef)


class RankingPairs(NamedTuple):
    """Index tensors into a flat (N,) reward vector, plus per-pair weights 1 / n_pairs(prompt)."""

    chosen_index: Tensor  # (P,) long
    rejected_index: Tensor  # (P,) long
    weights: Tensor  # (P,) float


def pairwise_from_rankings(
    group_index: Tensor | Sequence[int], ranks: Tensor | Sequence[int]
) -> RankingPairs:
    """Turn a flat batch of ranked answers (prompts of varying K) into weighted Bradley-Terry pairs.

    group_index (N,) says which prompt each answer belongs to (any integer ids, e.g.
    ``torch.repeat_interleave(torch.arange(n_prompts), ks)``), ranks (N,) its rank level within the prompt.
    Each pair gets weight 1 / n_pairs(prompt), so ``bradley_terry_loss(r[c], r[l], weights=w)`` is the mean
    over prompts (with at least one pair) of ``ranking_loss`` (same tie convention). Needs no rewards, so it
    can run in the collate function. Builds an (N, N) comparison table; fine for N up to a few thousand.
    """
    group_index = torch.as_tensor(group_index)  # (N,)
    ranks = torch.as_tensor(ranks, device=group_index.device)  # (N,)
    better = (group_index[:, None] == group_index[None, :]) & (ranks[:, None] < ranks[None, :])  # (N, N)
    chosen, rejected = torch.nonzero(better, as_tuple=True)  # (P,), (P,)
    _, prompt = torch.unique(group_index, return_inverse=True)  # (N,) ids 0..n_prompts-1
    n_pairs = torch.bincount(prompt[chosen], minlength=group_index.numel())  # (N,) >= n_prompts entries
    weights = 1.0 / n_pairs[prompt[chosen]].to(torch.get_default_dtype())  # (P,)
    # equivalent to:
    #   for p in unique(group_index): members = where(group_index == p)
    #       pairs = ranking_pairs(ranks[members]); append (members[w], members[l], 1 / len(pairs)) for each
    return RankingPairs(chosen, rejected, weights)


def batched_ranking_loss(
    rewards: Tensor,
    group_index: Tensor | Sequence[int],
    ranks: Tensor | Sequence[int],
    centering_coef: float = 0.0,
) -> tuple[Tensor, Metrics]:
    """Mean over prompts of ``ranking_loss``, as one weighted ``bradley_terry_loss`` call. rewards: (N,)."""
    pairs = pairwise_from_rankings(torch.as_tensor(group_index, device=rewards.device), ranks)
    return bradley_terry_loss(
        rewards[pairs.chosen_index],
        rewards[pairs.rejected_index],
        weights=pairs.weights.to(rewards.dtype),
        centering_coef=centering_coef,
    )


# ------------------------------------------------------------------------------------------------- DPO
def dpo_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    beta: float,
    loss_type: Literal["sigmoid", "ipo"] = "sigmoid",
    label_smoothing: float = 0.0,
) -> tuple[Tensor, Metrics]:
    """DPO family on sequence log-probs (B,), with h = (pc - rc) - (pr - rr):

        sigmoid: -(1 - eps) log sigmoid(beta h) - eps log sigmoid(-beta h)   (DPO, Rafailov et al. 2023;
                 eps > 0 is conservative DPO, Mitchell 2023 "A note on DPO with noisy preferences")
        ipo:     (h - 1 / (2 beta))^2                                        (IPO, Azar et al. 2023, Eq. 17)

    Averaged over the batch. For IPO, TRL feeds length-averaged log-probs; that choice is the caller's.
    Metrics: rewards/chosen = mean beta (pc - rc), rewards/rejected, rewards/margin, rewards/accuracy.
    """
    chosen_logratio = policy_chosen_logps - ref_chosen_logps  # (B,)
    rejected_logratio = policy_rejected_logps - ref_rejected_logps  # (B,)
    h = chosen_logratio - rejected_logratio  # (B,)
    if loss_type == "sigmoid":
        eps = label_smoothing
        losses = -F.logsigmoid(beta * h) * (1 - eps) - F.logsigmoid(-beta * h) * eps  # (B,)
    elif loss_type == "ipo":
        losses = (h - 1 / (2 * beta)) ** 2  # (B,)
    else:
        raise ValueError(f"dpo_loss: loss_type must be 'sigmoid' or 'ipo', got {loss_type!r}")
    with torch.no_grad():
        chosen_rewards = beta * chosen_logratio.detach()  # (B,)
        rejected_rewards = beta * rejected_logratio.detach()  # (B,)
        metrics = {
            "rewards/chosen": chosen_rewards.mean(),
            "rewards/rejected": rejected_rewards.mean(),
            "rewards/margin": (chosen_rewards - rejected_rewards).mean(),
            "rewards/accuracy": (chosen_rewards > rejected_rewards).to(h.dtype).mean(),
        }
    return losses.mean(), metrics
