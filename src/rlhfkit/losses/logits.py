"""Log-probabilities and entropies from logits, including the fused one-buffer log-prob + entropy.

Shape letters and conventions: the `rlhfkit.losses` package docstring.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor


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
