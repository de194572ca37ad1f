"""Sampler / trainer log-prob mismatch: how far the rollout's log-probs are from the trainer's, and the
truncated importance-sampling correction for it.

A fast sampler (bf16, a static KV cache, CUDA graphs, other kernels than the training forward) gives
slightly different log-probs than the trainer's forward of the same tokens: the samples come from
pi_sampler, while PPO / GRPO assume they come from pi_old (the trainer's policy before the update). Yao et
al. 2025, "Your Efficient RL Framework Secretly Brings You Off-Policy RL Training" (fengyao.notion.site/
off-policy-rl), correct it per token with a truncated importance weight:

    w_t = min(exp(log pi_old(y_t) - log pi_sampler(y_t)), C)          (TIS, C ~ 2)
    l_t = w_t * max(-A ratio_t, -A clip(ratio_t, 1 - eps, 1 + eps)),  ratio_t = pi_theta / pi_old

(`policy.policy_loss(..., is_weights=w)`). The weight is a constant (no gradient); truncating at C bounds
the variance that a rare token the sampler under-rated would bring. When the sampler matches the trainer
(float32 on the CPU: |delta| ~ 1e-6), w = 1 and nothing changes.

Shape letters and conventions: the `rlhfkit.losses` package docstring.
"""

from __future__ import annotations

import torch
from torch import Tensor

from rlhfkit.losses.masked import LOG_RATIO_CLAMP, Metrics, masked_max, masked_mean


@torch.no_grad()
def logprob_mismatch(sampler_logprobs: Tensor, trainer_logprobs: Tensor, completion_mask: Tensor) -> Metrics:
    """How far the sampler's per-token log-probs (B, T) are from the trainer's forward of the same tokens.

    Metrics over real tokens: ``abs_diff_mean`` / ``abs_diff_max`` of delta = trainer - sampler;
    ``ratio_mean`` = mean of exp(delta), the importance ratio PPO's first minibatch sees when its old
    log-probs are the sampler's (1 when they agree); ``kl`` = masked mean of k3 = exp(delta) - 1 - delta,
    an unbiased estimate of KL(sampler || trainer) on the sampler's tokens (>= 0; Schulman 2020).
    """
    delta = (trainer_logprobs - sampler_logprobs).float().clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)  # (B, T)
    ratio = torch.exp(delta)  # (B, T) pi_trainer / pi_sampler
    return {
        "abs_diff_mean": masked_mean(delta.abs(), completion_mask),
        "abs_diff_max": masked_max(delta.abs(), completion_mask),
        "ratio_mean": masked_mean(ratio, completion_mask),
        "kl": masked_mean((ratio - 1.0 - delta).clamp(min=0.0), completion_mask),
    }


@torch.no_grad()
def truncated_is_weights(
    old_logprobs: Tensor, sampler_logprobs: Tensor, completion_mask: Tensor, cap: float = 2.0
) -> tuple[Tensor, Metrics]:
    """Per-token truncated importance weights (B, T) w = min(exp(old_logprobs - sampler_logprobs), cap),
    0 at masked positions, for ``policy_loss(..., is_weights=w)`` (see the module docstring).

    old_logprobs: the trainer's log-probs of the sampled tokens before the update (pi_old); sampler_logprobs:
    the rollout's. Metrics: ``is_weight_mean`` (before truncation: how off-policy the batch is) and
    ``is_truncated_frac`` (share of real tokens whose weight was capped).
    """
    if cap <= 0:
        raise ValueError(f"truncated_is_weights: cap must be > 0, got {cap}")
    log_ratio = (old_logprobs - sampler_logprobs).float().clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)  # (B, T)
    raw = torch.exp(log_ratio)  # (B, T)
    weights = torch.where(completion_mask.bool(), raw.clamp(max=cap), 0.0)  # (B, T)
    metrics = {
        "is_weight_mean": masked_mean(raw, completion_mask),
        "is_truncated_frac": masked_mean((raw > cap).float(), completion_mask),
    }
    return weights, metrics
