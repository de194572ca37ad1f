"""The guards every optimizer step of the project goes through, before its update is applied.

`checked_update` is the one place a gradient becomes an update: clip the gradient norm, refuse a
non-finite loss or norm (the update is not applied, the gradients are dropped), run the caller's last
check (the divergence guard), step, bump the parameters' version counters (`training.step_optimizer`) and
zero the gradients. The training loop (`loop.TrainLoop.optimize`) and the online reward model
(`online.OnlineRewardModel.update`) both call it; `tests/entry/test_architecture.py` keeps any other
module from constructing an optimizer or clipping gradients on its own.

`DivergenceGuard` (`train.guard`) watches a supervised loss for spikes and a model for dead gradients; it
only judges, the loop decides what to do with the checkpoints.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from rlhfkit.errors import NonFiniteLossError
from rlhfkit.training.settings import GuardConfig, step_optimizer

ClipFn = Callable[[Sequence[torch.nn.Parameter], float], torch.Tensor | None]


def clip_norm(params: Sequence[torch.nn.Parameter], max_norm: float) -> torch.Tensor:
    """torch's global-norm clip (the loop uses accelerate's, which also gathers sharded gradients); over
    FSDP2's DTensor gradients it is the global norm too, as a DTensor (`checked_update` reads it whole)."""
    return torch.nn.utils.clip_grad_norm_(list(params), max_norm)


def checked_update(
    optimizer: torch.optim.Optimizer,
    params: Sequence[torch.nn.Parameter],
    loss: float,
    max_grad_norm: float,
    where: str,
    clip: ClipFn = clip_norm,
    before_step: Callable[[float, float], None] | None = None,
    bump: Sequence[torch.nn.Parameter] | None = None,
    then: Callable[[], str] = str,
) -> float:
    """Clip, check, step, zero; returns the gradient norm before clipping (nan when `clip` gives none).

    `max_grad_norm` 0 only measures the norm. A non-finite loss or norm raises NonFiniteLossError naming
    `where` ("at step 12") with the gradients dropped; `then()` is appended to its message (what was kept,
    what to do). `before_step(loss, grad_norm)` may raise to refuse the update (the divergence guard).
    `bump`: the parameters whose version counters the step bumps (default `params`; none when sharded)."""
    norm = clip(params, max_grad_norm if max_grad_norm > 0 else math.inf)
    if norm is not None and hasattr(norm, "full_tensor"):  # the norm of FSDP2's sharded gradients (DTensor)
        norm = norm.full_tensor()
    grad_norm = math.nan if norm is None else float(norm)
    if not (math.isfinite(loss) and (math.isfinite(grad_norm) or norm is None)):
        optimizer.zero_grad(set_to_none=True)
        what = "loss" if not math.isfinite(loss) else "gradient norm"
        raise NonFiniteLossError(
            f"non-finite {what} {where} (loss={loss}, grad_norm={grad_norm}); the update was not applied"
            + then()
        )
    if before_step is not None:
        try:
            before_step(loss, grad_norm)
        except Exception:
            optimizer.zero_grad(set_to_none=True)
            raise
    step_optimizer(optimizer, list(params if bump is None else bump))
    optimizer.zero_grad(set_to_none=True)
    return grad_norm


@dataclass
class DivergenceGuard:
    """Loss spikes (losses positive by nature only) and runs of zero gradient norms (`train.guard`)."""

    cfg: GuardConfig
    positive_loss: bool = True
    watch_zero_gradients: bool = True
    uniform_loss: float | None = None

    def __post_init__(self) -> None:
        self.recent: list[float] = []  # the running window of losses
        self.zero_since: int | None = None  # first step of the current run of zero gradient norms

    def check(self, loss: float, grad_norm: float, step: int) -> tuple[str, int] | None:
        """(what is wrong, the first step whose weights are bad) for step `step`'s loss and gradient norm,
        or None. The loss comes from the weights after step `step - 1`: when it spikes those weights are
        the diverged ones; a run of zero norms that started at step s condemns the weights after s - 1."""
        if not self.cfg.enabled:
            return None
        if self.positive_loss and self.recent:
            median = statistics.median(self.recent)
            if loss > self.cfg.spike_factor * max(median, 1.0):
                ratio = loss / max(median, 1e-12)
                what = f"loss {loss:.4g} at step {step} is {ratio:.3g}x the median {median:.4g}"
                what += " of the steps before it"
                return what, step - 1
        if self.watch_zero_gradients:
            self.zero_since = (self.zero_since or step) if grad_norm == 0.0 else None
            since = self.zero_since
            uniform = (
                self.uniform_loss is not None and abs(loss - self.uniform_loss) < 1e-3 * self.uniform_loss
            )
            if since is not None and (step - since + 1 >= self.cfg.zero_grad_steps or uniform):
                what = "the model predicts the uniform distribution and " if uniform else ""
                return f"{what}the gradient norm has been 0 since step {since} (loss {loss:.4g})", since - 1
        self.recent = [*self.recent, loss][-self.cfg.window :]
        return None
