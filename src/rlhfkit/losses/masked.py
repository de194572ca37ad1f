"""Masked statistics over (B, T) completion tokens, and the constants every loss shares.

Shape letters and conventions: the `rlhfkit.losses` package docstring.
"""

from __future__ import annotations

from typing import Literal

import torch
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


def masked_max(x: Tensor, mask: Tensor) -> Tensor:
    keep = mask.bool()  # (B, T)
    top = torch.where(keep, x, -torch.inf).amax()  # ()
    return torch.where(keep.any(), top, 0.0)  # (), 0 when nothing is real
