"""What a training run is made of besides the loop itself: its settings (`TrainConfig`, the divergence
guard's `GuardConfig`, the `StageConfig` every trainer's config extends, what `--resume-with-changes` may
change), seeding and RNG state, the learning-rate schedule, and the seeded, length-grouped data order.

Everything here is a pure function of the config and the step, which is what makes resume exact.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal, cast

import numpy as np
import torch

from rlhfkit.config import setting
from rlhfkit.device import cuda_rng_states, set_cuda_rng_states
from rlhfkit.models.loading import LoraSettings
from rlhfkit.training.health import HealthConfig

# What `--resume-with-changes` may change in a stopped run (config.accept_changes): how fast and how long
# to go on, and the guard; never the model, the data or the batch geometry.
RESUMABLE = (
    "train.lr", "train.scheduler", "train.warmup_steps", "train.max_steps", "train.epochs",
    "train.max_grad_norm", "train.eval_every", "train.save_every", "train.keep_checkpoints",
    "train.log_every", "train.threads", "train.guard.", "train.device", "train.gradient_checkpointing",
    "train.health.",
)  # fmt: skip


@dataclass
class GuardConfig:
    """The divergence guard: stop a run whose loss explodes or whose model has collapsed (exit 2), set
    aside the checkpoints that hold the diverged weights, and say which one is the last good one."""

    enabled: bool = True
    """Check every step (off: for people who know their loss may legitimately jump)."""
    spike_factor: float = setting(10.0, gt=1)
    """Stop when a step's loss exceeds this many times max(1, median of the last `window` losses); only
    for losses that are positive by nature (SFT, reward model, DPO), not RL surrogate losses."""
    window: int = setting(10, ge=1)
    """Steps in the running median."""
    zero_grad_steps: int = setting(3, ge=1)
    """Stop after this many consecutive steps whose gradient norm is exactly 0 (a dead model)."""


@dataclass
class TrainConfig:
    """Settings of the shared training loop."""

    seed: int = setting(0, ge=0)
    """Seed of every random number generator (data order, sampling, head initialisation)."""
    lr: float = setting(2e-5, gt=0)
    """Peak learning rate of AdamW."""
    weight_decay: float = setting(0.0, ge=0)
    """AdamW weight decay."""
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    """AdamW betas."""
    adam_eps: float = setting(1e-8, gt=0)
    """AdamW epsilon."""
    scheduler: Literal["constant", "linear", "cosine"] = "cosine"
    """Learning-rate decay after warm-up (to 0 for linear and cosine)."""
    warmup_steps: int = setting(0, ge=0)
    """Optimizer steps of linear warm-up from 0 to `lr`."""
    epochs: float = setting(1.0, gt=0)
    """Passes over the training data (for trainers that have an epoch)."""
    max_steps: int = setting(0, ge=0)
    """Stop after this many optimizer steps (0: derived from `epochs`)."""
    batch_size: int = setting(8, ge=1)
    """Global batch: examples per optimizer step, over all accumulation steps and processes."""
    grad_accum: int = setting(1, ge=1)
    """Micro-batches per optimizer step in each process (batch_size / (grad_accum * processes) each)."""
    max_grad_norm: float = setting(1.0, ge=0)
    """Clip the global gradient norm to this value (0 disables clipping)."""
    eval_every: int = setting(0, ge=0)
    """Evaluate every N optimizer steps (0: only at the end)."""
    save_every: int = setting(50, ge=0)
    """Write a checkpoint every N steps (0: never mid-run); a restarted run resumes from the newest."""
    keep_checkpoints: int = setting(2, ge=1)
    """How many checkpoints to keep."""
    log_every: int = setting(1, ge=1)
    """Write train metrics every N steps."""
    threads: int = setting(0, ge=0)
    """CPU threads per process (0: all cores shared between the local processes)."""
    device: str = "auto"
    """Where to train: "auto" (the CUDA GPU when there is one, cuda:LOCAL_RANK under a launcher; then Apple
    "mps"; else "cpu"), or "cpu", "cuda", "cuda:N", "mps" by name."""
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    """"bf16": mixed precision (float32 master weights and optimizer state, bf16 autocast forward, frozen
    models in bf16); "fp32"; "auto": bf16 on a GPU that supports it, fp32 elsewhere (works on the CPU too)."""
    gradient_checkpointing: bool = False
    """Recompute each layer's activations in the backward pass: less memory, about 30% more compute."""
    sharding: Literal["none", "fsdp2"] = "none"
    """"fsdp2": shard the trainable models' parameters, gradients and optimizer state over the processes of a
    `torchrun` launch with torch's FSDP2 (`rlhfkit.training.sharding`); "none": each process holds them whole
    (DDP under a launcher)."""
    offload: bool = False
    """With sharding fsdp2 on GPUs: keep the shards in host memory (FSDP2's CPU offload): slower, for
    models whose state does not fit in GPU memory even when sharded."""
    optimizer: Literal["adamw", "adamw_8bit"] = "adamw"
    """AdamW, or AdamW with 8-bit moments (bitsandbytes, CUDA only: about 3/4 less optimizer memory)."""
    guard: GuardConfig = field(default_factory=GuardConfig)
    """The divergence guard."""
    health: HealthConfig = field(default_factory=HealthConfig)
    """RL health checks (entropy collapse, KL blow-up, looping, reward hacking): `rlhfkit.training.health`."""


@dataclass
class StageConfig:
    """What every trainer's config has besides its own settings: the model-code policy, LoRA and the
    shared loop. A trainer's config subclasses it and may redeclare `train` with its own defaults."""

    trust_remote_code: bool = False
    """Allow model code from model directories (off: only transformers' own architectures)."""
    lora: LoraSettings = field(default_factory=LoraSettings)
    """LoRA adapters instead of full fine-tuning (what else stays trained or frozen: the trainer's
    docstring; e.g. the reward model's head is trained in full, DPO's and RL's reference is the policy
    with its adapters disabled)."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """The shared training loop."""


def set_seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict[str, Any]:
    """Every global RNG state, in a checkpointable form ("cuda": one state per visible GPU, [] without)."""
    legacy_state = cast("tuple[str, np.ndarray, int, int, float]", np.random.get_state())  # legacy=True
    kind, keys, pos, has_gauss, cached = legacy_state
    return {
        "python": random.getstate(),
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached],
        "torch": torch.get_rng_state(),
        "cuda": cuda_rng_states(),
    }


def set_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    set_cuda_rng_states(state.get("cuda") or [])  # absent in checkpoints written before GPU support


def lr_lambda(cfg: TrainConfig, total_steps: int) -> Callable[[int], float]:
    """Multiplier of the peak learning rate at optimizer step `step` (linear warm-up, then decay)."""

    def fn(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / (cfg.warmup_steps + 1)
        if cfg.scheduler == "constant":
            return 1.0
        done = (step - cfg.warmup_steps) / max(1, total_steps - cfg.warmup_steps)
        done = min(max(done, 0.0), 1.0)
        if cfg.scheduler == "linear":
            return 1.0 - done
        return 0.5 * (1.0 + math.cos(math.pi * done))

    return fn


def epoch_order(lengths: list[int], batch_size: int, window: int, seed: int, epoch: int) -> list[int]:
    """A shuffled order of example indices for one epoch, grouped by length when window > 1: each window
    of `window * batch_size` shuffled examples is sorted by length and cut into batches, and the batches
    are shuffled, so a batch holds examples of similar length (little compute spent on padding)."""
    rng = random.Random(f"{seed}-{epoch}")
    order = list(range(len(lengths)))
    rng.shuffle(order)
    if window <= 1:
        return order
    span = window * batch_size
    batches = []
    for start in range(0, len(order), span):
        chunk = sorted(order[start : start + span], key=lambda i: lengths[i])
        batches += [chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size)]
    rng.shuffle(batches)
    return [i for batch in batches for i in batch]


def step_optimizer(optimizer: torch.optim.Optimizer, params: list[torch.nn.Parameter]) -> None:
    """`optimizer.step()`, then bump the version counter of every parameter.

    Fused optimizers write parameters without bumping their version counters; the rollout engine keys its
    derived weights (fused QKV, norm-folded projections) on `(data_ptr, _version)`, so without the bump it
    would keep sampling from the weights of before the step."""
    optimizer.step()
    torch._C._autograd._unsafe_set_version_counter(tuple(params), tuple(p._version + 1 for p in params))


class EpochStream:
    """The endless stream of shuffled epochs over a dataset; batch `step` holds stream positions
    [step * B, (step + 1) * B). A pure function of the step, so a resumed run sees exactly the data an
    uninterrupted run would have seen, with no replay; no example is dropped at an epoch's end."""

    def __init__(self, lengths: list[int], batch_size: int, seed: int, window: int = 1) -> None:
        self.lengths, self.batch_size, self.seed, self.window = lengths, batch_size, seed, window
        self._orders: dict[int, list[int]] = {}

    def _order(self, epoch: int) -> list[int]:
        if epoch not in self._orders:
            self._orders = {e: o for e, o in self._orders.items() if e == epoch - 1}  # at most two cached
            self._orders[epoch] = epoch_order(self.lengths, self.batch_size, self.window, self.seed, epoch)
        return self._orders[epoch]

    def batch(self, step: int) -> list[int]:
        n = len(self.lengths)
        positions = range(step * self.batch_size, (step + 1) * self.batch_size)
        return [self._order(pos // n)[pos % n] for pos in positions]
