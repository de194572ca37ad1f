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
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

LOG_RATIO_CLAMP = 20.0
Metrics = dict[str, Tensor]
KLKind = Literal["k1", "k2", "k3"]
Aggregation = Literal["token", "sequence", "constant"]


# --------------------------------------------------------------------------------------------- masked stats
def _broadcast(x: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """``x`` as floating point and ``mask`` as a float mask of the same dtype, broadcast to a common shape."""
    dtype = x.dtype if x.is_floating_point() else torch.get_default_dtype()
    return torch.broadcast_tensors(x.to(dtype), mask.to(dtype))  # both broadcast(x, mask)-shaped


def masked_sum(x: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """sum_i m_i x_i over all entries (``dim=None``) or along ``dim``; entries with m_i = 0 contribute 0."""
    x, m = _broadcast(x, mask)  # same shape, e.g. (B, T)
    xm = torch.where(m != 0, x * m, 0.0)  # (B, T)
    return xm.sum() if dim is None else xm.sum(dim)  # () or x.shape without dim


def masked_mean(x: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """sum_i m_i x_i / max(sum_i m_i, 1): the mean over real entries, 0 when there are none."""
    x, m = _broadcast(x, mask)  # (B, T)
    count = m.sum() if dim is None else m.sum(dim)  # () or x.shape without dim
    return masked_sum(x, m, dim) / count.clamp(min=1)  # () or x.shape without dim


def masked_var(x: Tensor, mask: Tensor, unbiased: bool = True) -> Tensor:
    """Variance over the real entries: sum m (x - mean)^2 / n, times n / (n - 1) if ``unbiased`` (Bessel).

    Fewer than two real entries give 0 (not NaN).
    """
    x, m = _broadcast(x, mask)  # (B, T)
    var = masked_mean((x - masked_mean(x, m)) ** 2, m)  # ()
    if unbiased:
        n = m.sum()  # ()
        var = var * n / (n - 1).clamp(min=1)  # ()
    return var


def masked_whiten(
    x: Tensor, mask: Tensor, shift_mean: bool = True, eps: float = 1e-8, unbiased: bool = False
) -> Tensor:
    """whiten(x) = (x - mean) * rsqrt(var + eps) over real entries (+ mean again if ``shift_mean=False``).

    As ``whiten`` in OpenAI's lm-human-preferences (Ziegler et al. 2019), which uses the population variance
    (``tf.nn.moments``); ``unbiased=True`` gives TRL's variant. Masked-out entries of the output are 0.
    """
    x, m = _broadcast(x, mask)  # (B, T)
    mean = masked_mean(x, m)  # ()
    whitened = (x - mean) * torch.rsqrt(masked_var(x, m, unbiased=unbiased) + eps)  # (B, T)
    if not shift_mean:
        whitened = whitened + mean  # (B, T)
    return torch.where(m != 0, whitened, 0.0)  # (B, T)


def _masked_max(x: Tensor, mask: Tensor) -> Tensor:
    keep = mask.bool()  # (B, T)
    top = torch.where(keep, x, -torch.inf).amax()  # ()
    return torch.where(keep.any(), top, 0.0)  # (), 0 when nothing is real


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
) -> tuple[Tensor, Metrics]:
    """PPO clipped surrogate (Schulman et al. 2017), with DAPO's clip-higher (Yu et al. 2025).

        ratio = exp(logprobs - old_logprobs);
        l_t = max(-A ratio, -A clip(ratio, 1 - clip_low, 1 + clip_high))

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
    loss = aggregate_loss(torch.maximum(pg_loss1, pg_loss2), completion_mask, aggregation, max_len)  # ()
    with torch.no_grad():
        metrics = {
            "clip_frac": masked_mean((pg_loss2 > pg_loss1).to(ratio.dtype), completion_mask),
            "approx_kl": masked_mean(kl_estimate(old_logprobs, logprobs, "k3"), completion_mask),
            "ratio_mean": masked_mean(ratio, completion_mask),
            "ratio_min": -_masked_max(-ratio, completion_mask),
            "ratio_max": _masked_max(ratio, completion_mask),
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


# ------------------------------------------------------------------------------------------ logits helpers
def entropy_from_logits(logits: Tensor) -> Tensor:
    """Entropy of softmax(logits) per position: H = logsumexp(z) - sum_v softmax(z)_v z_v. (..., V) -> (...).

    Stable for any finite logits (no log of a probability is taken). fp16/bf16 logits are computed in fp32.
    """
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()  # (..., V)
    probs = torch.softmax(logits, dim=-1)  # (..., V)
    return torch.logsumexp(logits, dim=-1) - (probs * logits).sum(dim=-1)  # (...)


def gather_logprobs(logits: Tensor, tokens: Tensor, temperature: float = 1.0) -> Tensor:
    """log softmax(logits / temperature)[token] = z_token - logsumexp(z), z = logits / temperature.

    logits (..., V), tokens (...) long -> (...). Gathers before normalising, so no full-vocab log_softmax
    output is built; a scaled copy is made only when temperature != 1 and an fp32 copy only for fp16/bf16
    input (logsumexp in half precision is too inaccurate).
    """
    if temperature <= 0:
        raise ValueError(f"gather_logprobs: temperature must be > 0, got {temperature}")
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()  # (..., V)
    if temperature != 1.0:
        logits = logits / temperature  # (..., V)
    picked = logits.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)  # (...)
    return picked - torch.logsumexp(logits, dim=-1)  # (...)


class _LogprobEntropy(torch.autograd.Function):
    """log softmax(z)[token] with its gradient, and (no gradient) the entropy of softmax(z), over (N, V)
    float32 logits in few passes over memory: the probabilities are built once, in one buffer, and the
    backward pass turns that buffer into the gradient in place (onehot - p) x g."""

    @staticmethod
    def forward(ctx: Any, logits: Tensor, tokens: Tensor, want_entropy: bool) -> tuple[Tensor, Tensor]:
        peak = logits.amax(-1, keepdim=True)  # (N, 1)
        probs = torch.sub(logits, peak).exp_()  # (N, V) unnormalised
        total = probs.sum(-1, keepdim=True)  # (N, 1)
        probs.div_(total)  # (N, V) softmax
        lse = (peak + total.log()).squeeze(-1)  # (N,)
        logprob = logits.gather(-1, tokens[:, None]).squeeze(-1) - lse  # (N,)
        entropy = logprob.new_zeros(0)
        if want_entropy:  # H = lse - sum_v p_v z_v, the dot product row by row without an (N, V) temporary
            entropy = lse - torch.bmm(probs[:, None, :], logits[:, :, None]).view(-1)  # (N,)
        ctx.mark_non_differentiable(entropy)
        ctx.save_for_backward(probs, tokens)
        return logprob, entropy

    @staticmethod
    def backward(ctx: Any, grad_logprob: Tensor, _grad_entropy: Tensor) -> tuple[Tensor, None, None]:
        probs, tokens = ctx.saved_tensors
        grad = probs.mul_(-grad_logprob[:, None])  # (N, V): the saved buffer becomes -g p (runs once)
        grad.scatter_add_(-1, tokens[:, None], grad_logprob[:, None])  # + g at the token
        return grad, None, None


def token_logprobs_entropy(
    logits: Tensor, tokens: Tensor, temperature: float = 1.0, entropy: bool = True
) -> tuple[Tensor, Tensor | None]:
    """(log softmax(z)[token], entropy of softmax(z)) with z = logits / temperature, for (N, V) logits and
    (N,) tokens -> (N,), (N,) (entropy None when not asked for; it never carries a gradient).

    The same values as `gather_logprobs` and `entropy_from_logits` in about a third of their memory traffic
    (the (N, V) logits of a 49k vocabulary are the largest tensors of an RL step). Its backward pass may run
    only once (no `retain_graph`)."""
    if temperature <= 0:
        raise ValueError(f"token_logprobs_entropy: temperature must be > 0, got {temperature}")
    if logits.dtype != torch.float32:
        logits = logits.float()  # (N, V)
    if temperature != 1.0:
        logits = logits / temperature  # (N, V)
    logprob, ent = _LogprobEntropy.apply(logits, tokens, entropy)
    return logprob, (ent if entropy else None)


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
