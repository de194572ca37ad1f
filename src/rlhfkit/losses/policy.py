"""Policy-optimisation math: KL estimators and controllers, KL-penalised rewards, GAE, the PPO policy and
value losses, GRPO / RLOO advantages.

Shape letters and conventions: the `rlhfkit.losses` package docstring.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor

from rlhfkit.losses.masked import (
    LOG_RATIO_CLAMP,
    Aggregation,
    KLKind,
    Metrics,
    masked_max,
    masked_mean,
    masked_sum,
    masked_var,
)


# ------------------------------------------------------------------------------------------------------ KL
def kl_estimate(logprobs: Tensor, ref_logprobs: Tensor, kind: KLKind = "k1") -> Tensor:
    """Per-token estimate of KL(pi || pi_ref) on samples of pi (Schulman 2020, "Approximating KL divergence").

    With log_ratio = log pi - log pi_ref and r = pi_ref / pi = exp(-log_ratio):
        k1 = log_ratio                      (unbiased, high variance, can be negative)
        k2 = 0.5 * log_ratio^2              (biased, low variance, >= 0)
        k3 = (r - 1) - log r = exp(-log_ratio) - 1 + log_ratio   (unbiased, >= 0)
    k3 uses expm1 on the clamped log-ratio and is clamped at 0 against rounding. Shapes: any, e.g. (B, T).
    """
    log_ratio = logprobs - ref_logprobs  # (B, T)
    if kind == "k1":
        return log_ratio
    if kind == "k2":
        return 0.5 * log_ratio**2  # (B, T)
    if kind == "k3":
        clamped = log_ratio.clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)  # (B, T)
        return (torch.expm1(-clamped) + log_ratio).clamp(min=0.0)  # (B, T)
    raise ValueError(f"kl_estimate: kind must be 'k1', 'k2' or 'k3', got {kind!r}")


@dataclass
class AdaptiveKLController:
    """Adaptive KL coefficient (Ziegler et al. 2019, "Fine-Tuning LMs from Human Preferences", Sec. 2.2).

        e = clip(KL_current / KL_target - 1, -0.2, 0.2);   value <- value * (1 + e * n_steps / horizon)

    ``update`` takes the measured KL (e.g. the batch mean of the summed per-token KL) and the sample count.
    """

    value: float
    target: float
    horizon: float = 10000

    def __post_init__(self) -> None:
        if self.target <= 0 or self.horizon <= 0:
            raise ValueError(f"AdaptiveKLController: target and horizon must be > 0, got {self}")

    def update(self, current_kl: float, n_steps: int) -> float:
        error = min(max(float(current_kl) / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + error * n_steps / self.horizon
        return self.value

    def state_dict(self) -> dict[str, Any]:
        return {"type": "adaptive", "value": self.value, "target": self.target, "horizon": self.horizon}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("type") != "adaptive":
            raise ValueError(f"AdaptiveKLController: cannot load state of type {state.get('type')!r}")
        self.value, self.target = float(state["value"]), float(state["target"])
        self.horizon = float(state["horizon"])


@dataclass
class FixedKLController:
    """Constant KL coefficient (Ziegler et al. 2019); same interface as AdaptiveKLController."""

    value: float

    def update(self, current_kl: float, n_steps: int) -> float:
        return self.value

    def state_dict(self) -> dict[str, Any]:
        return {"type": "fixed", "value": self.value}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("type") != "fixed":
            raise ValueError(f"FixedKLController: cannot load state of type {state.get('type')!r}")
        self.value = float(state["value"])


def make_kl_controller(
    init: float, target: float | None = None, horizon: float = 10000
) -> AdaptiveKLController | FixedKLController:
    """Fixed controller when ``target`` is None, adaptive otherwise."""
    if target is None:
        return FixedKLController(float(init))
    return AdaptiveKLController(float(init), float(target), float(horizon))


@torch.no_grad()
def kl_penalized_rewards(
    scores: Tensor,
    logprobs: Tensor,
    ref_logprobs: Tensor,
    completion_mask: Tensor,
    kl_coef: float,
    kind: KLKind = "k1",
) -> tuple[Tensor, Tensor]:
    """Per-token PPO rewards (Ziegler et al. 2019; Stiennon et al. 2020; Huang et al. 2024 "N+ details").

        rewards_t = -kl_coef * kl_t  (+ score at the last real token of the row)

    scores (B,); the others (B, T). The last real token is the last position where completion_mask is 1,
    whatever the padding side; rows with no real token get no score. Returns (rewards, kl), 0 at padding.
    """
    m = completion_mask.bool()  # (B, T)
    kl = torch.where(m, kl_estimate(logprobs, ref_logprobs, kind), 0.0)  # (B, T)
    rewards = -kl_coef * kl  # (B, T)
    positions = torch.arange(m.shape[-1], device=m.device).expand_as(m)  # (B, T)
    last = torch.where(m, positions, -1).amax(dim=-1)  # (B,) -1 = no real token
    rows = torch.nonzero(last >= 0, as_tuple=True)[0]  # (B',)
    rewards[rows, last[rows]] += scores.to(rewards.dtype)[rows]
    # equivalent to:
    #   for b in range(B):
    #       real = completion_mask[b].nonzero()
    #       if len(real): rewards[b, real[-1]] += scores[b]
    return rewards, kl


# ------------------------------------------------------------------------------------------ PPO: GAE, losses
@torch.no_grad()
def compute_gae(
    rewards: Tensor, values: Tensor, completion_mask: Tensor, gamma: float = 1.0, lam: float = 0.95
) -> tuple[Tensor, Tensor]:
    """Generalized Advantage Estimation (Schulman et al. 2016). rewards, values, mask: (B, T).

        delta_t = r_t + gamma * V_{t+1} - V_t;   A_t = delta_t + gamma * lam * A_{t+1};   returns = A + V

    Only real tokens form the trajectory: masked positions are skipped (the "next state" of a real token is
    the next real token of the row), and beyond the last real token V = 0 and A = 0. So right padding,
    left padding and holes all work. Masked-out entries of both outputs are 0. A plain backwards loop over
    T (cheap for T up to a few hundred; each step is vectorised over B).
    """
    m = completion_mask.bool()  # (B, T)
    rewards = rewards.to(values.dtype)  # (B, T)
    advantages = torch.zeros_like(values)  # (B, T)
    next_value = torch.zeros_like(values[:, 0])  # (B,)
    next_adv = torch.zeros_like(values[:, 0])  # (B,)
    for t in reversed(range(values.shape[1])):
        real = m[:, t]  # (B,)
        delta = rewards[:, t] + gamma * next_value - values[:, t]  # (B,)
        adv = delta + gamma * lam * next_adv  # (B,)
        advantages[:, t] = torch.where(real, adv, 0.0)
        next_adv = torch.where(real, adv, next_adv)  # (B,)
        next_value = torch.where(real, values[:, t], next_value)  # (B,)
    returns = torch.where(m, advantages + values, 0.0)  # (B, T)
    return advantages, returns


def aggregate_loss(
    per_token_loss: Tensor,
    completion_mask: Tensor,
    aggregation: Aggregation = "token",
    max_len: int | None = None,
) -> Tensor:
    """Reduce a (B, T) per-token loss to a scalar. All three are linear, so terms can be aggregated apart.

    "token":    sum_{b,t} m l / sum_{b,t} m                (PPO token mean; DAPO, Yu et al. 2025)
    "sequence": 1/B sum_b (sum_t m l / sum_t m)            (GRPO, Shao et al. 2024; empty rows count as 0)
    "constant": sum_{b,t} m l / (B * max_len)              (Dr. GRPO, Liu et al. 2025; max_len defaults to T,
                                                            pass the generation max length when padding less)
    """
    if aggregation == "token":
        return masked_mean(per_token_loss, completion_mask)
    if aggregation == "sequence":
        return masked_mean(per_token_loss, completion_mask, dim=-1).mean()
    if aggregation == "constant":
        length = per_token_loss.shape[-1] if max_len is None else max_len
        if length <= 0:
            raise ValueError(f"aggregate_loss: max_len must be > 0, got {max_len}")
        return masked_sum(per_token_loss, completion_mask) / (per_token_loss.shape[0] * length)
    raise ValueError(f"aggregate_loss: aggregation must be 'token', 'sequence', 'constant': {aggregation!r}")


def policy_loss(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    completion_mask: Tensor,
    clip_low: float = 0.2,
    clip_high: float | None = None,
    aggregation: Aggregation = "token",
    max_len: int | None = None,
    is_weights: Tensor | None = None,
) -> tuple[Tensor, Metrics]:
    """PPO clipped surrogate (Schulman et al. 2017), with DAPO's clip-higher (Yu et al. 2025).

        ratio = exp(logprobs - old_logprobs);
        l_t = w_t * max(-A ratio, -A clip(ratio, 1 - clip_low, 1 + clip_high))

    w_t: ``is_weights`` (B, T), constant per-token importance weights for samples drawn by a sampler other
    than pi_old (`mismatch.truncated_is_weights`); None: 1.

    clip_high defaults to clip_low. logprobs, old_logprobs, mask: (B, T); advantages (B, T) or (B,)
    (one per sequence, broadcast over its tokens). Aggregation: see ``aggregate_loss``.
    Metrics: clip_frac (share of real tokens where the clipped branch is active, i.e. larger), approx_kl
    (masked mean of k3 = ratio - 1 - log ratio, unbiased for KL(pi_old || pi) under pi_old's samples),
    ratio_mean / ratio_min / ratio_max over real tokens.
    """
    clip_high = clip_low if clip_high is None else clip_high
    log_ratio = (logprobs - old_logprobs).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)  # (B, T)
    ratio = torch.exp(log_ratio)  # (B, T)
    adv = advantages.unsqueeze(-1) if advantages.dim() == 1 else advantages  # (B, 1) or (B, T)
    pg_loss1 = -adv * ratio  # (B, T)
    pg_loss2 = -adv * ratio.clamp(1.0 - clip_low, 1.0 + clip_high)  # (B, T)
    pg_loss = torch.maximum(pg_loss1, pg_loss2)  # (B, T)
    if is_weights is not None:
        pg_loss = pg_loss * is_weights.detach()  # (B, T)
    loss = aggregate_loss(pg_loss, completion_mask, aggregation, max_len)  # ()
    with torch.no_grad():
        metrics = {
            "clip_frac": masked_mean((pg_loss2 > pg_loss1).to(ratio.dtype), completion_mask),
            "approx_kl": masked_mean(kl_estimate(old_logprobs, logprobs, "k3"), completion_mask),
            "ratio_mean": masked_mean(ratio, completion_mask),
            "ratio_min": -masked_max(-ratio, completion_mask),
            "ratio_max": masked_max(ratio, completion_mask),
        }
    return loss, {k: v.detach() for k, v in metrics.items()}


@torch.no_grad()
def explained_variance(values: Tensor, returns: Tensor, mask: Tensor) -> Tensor:
    """1 - Var(R - V) / Var(R) over real entries (OpenAI baselines); 0 when Var(R) = 0. 1 = perfect critic."""
    var_returns = masked_var(returns, mask, unbiased=False)  # ()
    var_residual = masked_var(returns - values, mask, unbiased=False)  # ()
    return torch.where(var_returns > 0, 1.0 - var_residual / var_returns.clamp(min=1e-30), 0.0)


def value_loss(
    values: Tensor,
    old_values: Tensor,
    returns: Tensor,
    completion_mask: Tensor,
    clip_range: float | None = 0.2,
) -> tuple[Tensor, Metrics]:
    """Clipped value loss of PPO2 (OpenAI baselines; Huang et al. 2022 "37 implementation details"). (B, T).

        V_clip = old_V + clip(V - old_V, -c, c);   loss = 0.5 * masked_mean(max((V - R)^2, (V_clip - R)^2))

    ``clip_range=None`` disables clipping. Metrics: vf_clip_frac (share of real tokens where the clipped
    term is larger), explained_variance, value_mean.
    """
    vf_loss1 = (values - returns) ** 2  # (B, T)
    if clip_range is None:
        per_token, clipped = vf_loss1, torch.zeros_like(vf_loss1)  # (B, T)
    else:
        values_clipped = old_values + (values - old_values).clamp(-clip_range, clip_range)  # (B, T)
        vf_loss2 = (values_clipped - returns) ** 2  # (B, T)
        per_token = torch.maximum(vf_loss1, vf_loss2)  # (B, T)
        clipped = (vf_loss2 > vf_loss1).to(values.dtype)  # (B, T)
    loss = 0.5 * masked_mean(per_token, completion_mask)  # ()
    with torch.no_grad():
        metrics = {
            "vf_clip_frac": masked_mean(clipped, completion_mask).detach(),
            "explained_variance": explained_variance(values.detach(), returns.detach(), completion_mask),
            "value_mean": masked_mean(values.detach(), completion_mask),
        }
    return loss, metrics


# ------------------------------------------------------------------------------- GRPO / RLOO advantages
def _groups(rewards: Tensor, group_size: int) -> Tensor:
    if group_size < 1 or rewards.dim() != 1 or rewards.shape[0] % group_size:
        raise ValueError(f"rewards must be (B,), B a multiple of group_size={group_size}: {rewards.shape}")
    floats = rewards if rewards.is_floating_point() else rewards.to(torch.get_default_dtype())  # (B,)
    return floats.view(-1, group_size)  # (B/G, G)


@torch.no_grad()
def group_advantages(
    rewards: Tensor, group_size: int, scale: Literal["group", "batch", "none"] = "group", eps: float = 1e-4
) -> tuple[Tensor, Tensor]:
    """GRPO group-relative advantages (Shao et al. 2024, DeepSeekMath): A_i = (r_i - mean_g) / (std + eps).

    rewards (B,) laid out as consecutive groups of G completions of the same prompt.
    scale="group": std of the group; "batch": std of all B rewards (Hu 2025, REINFORCE++ style / TRL
    scale_rewards="batch"); "none": no division (Dr. GRPO, Liu et al. 2025). The std is the SAMPLE std
    (Bessel, n - 1) as in TRL's ``torch.std``, so numbers match TRL runs; the population std would make all
    advantages sqrt(G / (G - 1)) times larger. Groups whose rewards are all equal get advantage exactly 0.
    Returns (advantages (B,), zero_variance (B/G,) bool) -- the latter for DAPO dynamic sampling.
    """
    grouped = _groups(rewards, group_size)  # (B/G, G)
    centered = grouped - grouped.mean(dim=1, keepdim=True)  # (B/G, G)
    zero_var = grouped.amax(dim=1) == grouped.amin(dim=1)  # (B/G,)
    if scale not in ("group", "batch", "none"):
        raise ValueError(f"group_advantages: scale must be 'group', 'batch' or 'none', got {scale!r}")
    if scale == "none" or group_size == 1:  # G = 1: every group has zero variance, all advantages are 0
        adv = centered  # (B/G, G)
    else:
        std = grouped.std(dim=1, keepdim=True) if scale == "group" else grouped.std()  # (B/G, 1) or ()
        adv = centered / (std + eps)  # (B/G, G)
    return torch.where(zero_var[:, None], 0.0, adv).reshape(-1), zero_var  # (B,), (B/G,)


@torch.no_grad()
def rloo_advantages(rewards: Tensor, group_size: int) -> Tensor:
    """REINFORCE Leave-One-Out advantages (Ahmadian et al. 2024, "Back to basics"; Kool et al. 2019).

        A_i = r_i - 1/(G-1) sum_{j != i} r_j = G/(G-1) * (r_i - mean_g)

    rewards (B,) in consecutive groups of G >= 2 -> (B,). Groups with equal rewards give exactly 0.
    """
    if group_size < 2:
        raise ValueError(f"rloo_advantages: leave-one-out needs group_size >= 2, got {group_size}")
    grouped = _groups(rewards, group_size)  # (B/G, G)
    adv = group_size / (group_size - 1) * (grouped - grouped.mean(dim=1, keepdim=True))  # (B/G, G)
    # equivalent to: adv[g, i] = grouped[g, i] - (grouped[g].sum() - grouped[g, i]) / (G - 1)
    zero_var = grouped.amax(dim=1) == grouped.amin(dim=1)  # (B/G,)
    return torch.where(zero_var[:, None], 0.0, adv).reshape(-1)  # (B,)


# ------------------------------------------------------------------- outcome advantages, by name
OutcomeAdvantage = Callable[..., tuple[Tensor, Tensor]]
"""(rewards (B,) in consecutive groups of G, G, **settings) -> (advantages (B,), zero variance (B/G,))."""

ADVANTAGE_ESTIMATORS: dict[str, OutcomeAdvantage] = {}
"""Outcome advantage estimators by name (the `advantage` setting of GRPO / RLOO); a new one is a function
and a `@register_advantage("name")` line."""


def register_advantage(name: str) -> Callable[[OutcomeAdvantage], OutcomeAdvantage]:
    def add(fn: OutcomeAdvantage) -> OutcomeAdvantage:
        ADVANTAGE_ESTIMATORS[name] = fn
        return fn

    return add


@register_advantage("grpo")
def grpo_outcome_advantages(
    rewards: Tensor, group_size: int, scale: Literal["group", "batch", "none"] = "group"
) -> tuple[Tensor, Tensor]:
    """`group_advantages` (scale: the `scale_rewards` setting)."""
    return group_advantages(rewards, group_size, scale)


@register_advantage("rloo")
def rloo_outcome_advantages(rewards: Tensor, group_size: int, **_: Any) -> tuple[Tensor, Tensor]:
    """`rloo_advantages`; a group has zero variance when all its advantages are 0."""
    advantages = rloo_advantages(rewards, group_size)  # (B,)
    return advantages, (advantages.view(-1, group_size) == 0).all(dim=1)  # (B,), (B/G,)


def outcome_advantages(name: str, rewards: Tensor, group_size: int, **settings: Any) -> tuple[Tensor, Tensor]:
    """The advantages of estimator `name` (see `ADVANTAGE_ESTIMATORS`)."""
    if name not in ADVANTAGE_ESTIMATORS:
        raise ValueError(
            f"unknown advantage estimator {name!r}; known: {', '.join(sorted(ADVANTAGE_ESTIMATORS))}"
        )
    return ADVANTAGE_ESTIMATORS[name](rewards, group_size, **settings)
