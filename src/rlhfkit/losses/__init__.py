"""Pure tensor math for RLHF: reward-model, PPO, GRPO/RLOO and DPO losses, KL estimators and GAE.

Shape letters, used in the shape comments (``# (B, T)``) throughout:
    B  batch (sequences, or preference pairs)      T  completion tokens per sequence (padded)
    K  answers ranked for one prompt               G  group size (completions sampled per prompt)
    V  vocabulary size                             N  answers in a flat batch of rankings
    P  (better, worse) pairs built from rankings

Conventions:
    * ``completion_mask`` is a float or bool (B, T) mask, 1 = real completion token. Every masked mean divides
      by ``mask.sum().clamp(min=1)``, so an all-masked batch gives a finite zero loss with zero gradients.
      Masked sums use ``torch.where``, so non-finite values at padded positions never leak into a result.
    * ``log_ratio`` = log pi - log pi_other is clamped to [-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP] before ``exp``.
    * Loss functions return ``(loss, metrics)``; metrics maps names to detached 0-dim tensors.
    * Reward / advantage builders (GAE, group advantages, RLOO, KL-penalised rewards) run under
      ``torch.no_grad()``: their outputs are constants for the losses.
"

One module per family, all names importable from here (`from rlhfkit import losses; losses.policy_loss`):
`masked` (masked statistics, shared constants), `preference` (reward-model ranking losses, DPO),
`policy` (KL, GAE, PPO, GRPO / RLOO), `logits` (log-probs and entropy), `mismatch` (sampler vs trainer
log-probs, truncated importance sampling). Only torch is imported.
"""

from rlhfkit.losses.logits import entropy_from_logits, gather_logprobs, token_logprobs_entropy
from rlhfkit.losses.masked import (
    LOG_RATIO_CLAMP,
    Aggregation,
    KLKind,
    Metrics,
    masked_max,
    masked_mean,
    masked_sum,
    masked_var,
    masked_whiten,
)
from rlhfkit.losses.mismatch import logprob_mismatch, truncated_is_weights
from rlhfkit.losses.policy import (
    ADVANTAGE_ESTIMATORS,
    AdaptiveKLController,
    FixedKLController,
    aggregate_loss,
    compute_gae,
    explained_variance,
    group_advantages,
    kl_estimate,
    kl_penalized_rewards,
    make_kl_controller,
    outcome_advantages,
    policy_loss,
    register_advantage,
    rloo_advantages,
    value_loss,
)
from rlhfkit.losses.preference import (
    RankingPairs,
    batched_ranking_loss,
    bradley_terry_loss,
    dpo_loss,
    pairwise_from_rankings,
    ranking_loss,
    ranking_pairs,
)

__all__ = [
    "ADVANTAGE_ESTIMATORS",
    "LOG_RATIO_CLAMP",
    "AdaptiveKLController",
    "Aggregation",
    "FixedKLController",
    "KLKind",
    "Metrics",
    "RankingPairs",
    "aggregate_loss",
    "batched_ranking_loss",
    "bradley_terry_loss",
    "compute_gae",
    "dpo_loss",
    "entropy_from_logits",
    "explained_variance",
    "gather_logprobs",
    "group_advantages",
    "kl_estimate",
    "kl_penalized_rewards",
    "logprob_mismatch",
    "make_kl_controller",
    "masked_max",
    "masked_mean",
    "masked_sum",
    "masked_var",
    "masked_whiten",
    "outcome_advantages",
    "pairwise_from_rankings",
    "policy_loss",
    "ranking_loss",
    "ranking_pairs",
    "register_advantage",
    "rloo_advantages",
    "token_logprobs_entropy",
    "truncated_is_weights",
    "value_loss",
]
