"""The one training loop every trainer runs on (SFT, reward model, DPO, PPO, GRPO, ...).

It owns what is easy to get subtly wrong and must not be copied per trainer: seeding, AdamW and the
learning-rate schedule, gradient accumulation and data-parallel gradient averaging with a *global* loss
normaliser, gradient clipping, the non-finite guard, progress, metrics, evaluation, atomic checkpoints and
exact resume (weights, optimizer, scheduler, every RNG state, the data position and trainer state).

A trainer subclasses `TrainLoop` and provides, for the supervised case, `step_examples(step)` (the global
batch of optimizer step `step`, a pure function of the step so that resuming needs no data replay),
`collate(examples)` and `loss(model, batch)`. RL trainers override `train_step` and call `optimize` once
per minibatch update.

Gradient accumulation and DDP are exact: `loss(model, batch)` returns a *sum* over its items (tokens,
pairs, ...) and the loop divides by the number of items in the whole global batch, counted across
micro-batches and processes, so batch 8 x 1 equals batch 2 x 4 equals 2 processes x 4 (up to float
summation order). DDP averages gradients over W processes, hence the factor W in `scale`.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from rlhfkit.checkpoint import clean_partial, latest_checkpoint, read_checkpoint, write_checkpoint
from rlhfkit.config import claim_run_dir
from rlhfkit.console import console, progress
from rlhfkit.errors import ConfigError, NonFiniteLossError
from rlhfkit.runtime import keep_freed_memory

Batch = dict[str, Any]
LossFn = Callable[[Any, Batch], tuple[torch.Tensor, dict[str, torch.Tensor]]]


@dataclass
class TrainConfig:
    """Settings of the shared training loop."""

    seed: int = 0
    """Seed of every random number generator (data order, sampling, head initialisation)."""
    lr: float = 2e-5
    """Peak learning rate of AdamW."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    """AdamW betas."""
    adam_eps: float = 1e-8
    """AdamW epsilon."""
    scheduler: Literal["constant", "linear", "cosine"] = "cosine"
    """Learning-rate decay after warm-up (to 0 for linear and cosine)."""
    warmup_steps: int = 0
    """Optimizer steps of linear warm-up from 0 to `lr`."""
    epochs: float = 1.0
    """Passes over the training data (for trainers that have an epoch)."""
    max_steps: int = 0
    """Stop after this many optimizer steps (0: derived from `epochs`)."""
    batch_size: int = 8
    """Global batch: examples per optimizer step, over all accumulation steps and processes."""
    grad_accum: int = 1
    """Micro-batches per optimizer step in each process (batch_size / (grad_accum * processes) each)."""
    max_grad_norm: float = 1.0
    """Clip the global gradient norm to this value (0 disables clipping)."""
    eval_every: int = 0
    """Evaluate every N optimizer steps (0: only at the end)."""
    save_every: int = 50
    """Write a checkpoint every N steps (0: never mid-run); a restarted run resumes from the newest."""
    keep_checkpoints: int = 2
    """How many checkpoints to keep."""
    log_every: int = 1
    """Write train metrics every N steps."""
    threads: int = 0
    """CPU threads per process (0: all cores shared between the local processes)."""


def set_seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict[str, Any]:
    """Every global RNG state, in a checkpointable form."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached],
        "torch": torch.get_rng_state(),
    }


def set_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])


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


class _Forward(torch.nn.Module):
    """Routes a trainer's loss function through one module call, so that DistributedDataParallel sees the
    forward pass (and synchronises gradients) even though trainers call sub-modules of the model."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, fn: LossFn, batch: Batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        return fn(self.model, batch)


class TrainLoop:
    """Base class of every trainer; see the module docstring."""

    name = "train"

    def __init__(self, cfg: TrainConfig, model: Any, output_dir: str | Path, run_config: Any) -> None:
        from accelerate import Accelerator

        keep_freed_memory()  # no page faults on the buffers every step re-allocates (rlhfkit.runtime)
        self.cfg = cfg
        self.model = model
        self.output_dir = Path(output_dir)
        self.run_config = run_config
        self.accelerator = Accelerator(cpu=True)
        self.world = self.accelerator.num_processes
        self.rank = self.accelerator.process_index
        self.is_main = self.accelerator.is_main_process
        threads = cfg.threads or max(1, (os.cpu_count() or 1) // self.accelerator.num_processes)
        torch.set_num_threads(threads)
        self.engine = self.accelerator.prepare_model(_Forward(model))
        self.params = [p for p in model.parameters() if p.requires_grad]
        if cfg.batch_size % (cfg.grad_accum * self.world):
            raise ConfigError(
                f"train.batch_size={cfg.batch_size} is not divisible by grad_accum x processes = "
                f"{cfg.grad_accum} x {self.world}"
            )
        # fused=True: one kernel for all of AdamW, 0.08 s instead of 0.51 s per step for SmolLM2-135M here
        # (the default on CPU is a Python loop of per-parameter ops). It writes the parameters without bumping
        # their version counters, which `step_optimizer` does, so caches keyed on them see the update.
        self.optimizer = torch.optim.AdamW(
            self.params, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.adam_eps, weight_decay=cfg.weight_decay,
            fused=True,
        )  # fmt: skip
        self.step = 0
        self.tokens_seen = 0
        self.callbacks: list[Callable[[TrainLoop, dict[str, float]], None]] = []
        """Called after every step (after its checkpoint is written) with the step's metrics."""
        self._scheduler: torch.optim.lr_scheduler.LambdaLR | None = None

    # ---- hooks for trainers ------------------------------------------------------------------------
    def total_steps(self) -> int:
        raise NotImplementedError

    def step_examples(self, step: int) -> list[Any]:
        """The global batch of optimizer step `step` (supervised trainers)."""
        raise NotImplementedError

    def collate(self, examples: list[Any]) -> Batch:
        """Tensors for one micro-batch; must contain `num_items`, the loss normaliser's share."""
        raise NotImplementedError

    def loss(self, model: Any, batch: Batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(sum of per-item losses, dict of per-item metric sums) of one micro-batch."""
        raise NotImplementedError

    def example_length(self, example: Any) -> int:
        """Used to sort a global batch before cutting it into micro-batches (less padding)."""
        return 0

    def evaluate(self) -> dict[str, float]:
        return {}

    def extra_state(self) -> dict[str, Any]:
        """Trainer state to checkpoint (e.g. a KL controller, a sampling generator)."""
        return {}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        pass

    def save_final(self) -> None:
        raise NotImplementedError

    # ---- the loop ----------------------------------------------------------------------------------
    @property
    def scheduler(self) -> torch.optim.lr_scheduler.LambdaLR:
        if self._scheduler is None:
            fn = lr_lambda(self.cfg, self.total_updates())
            self._scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, fn)
        return self._scheduler

    def total_updates(self) -> int:
        """Optimizer updates over the run (RL trainers do several per step)."""
        return self.total_steps()

    def train_step(self, step: int) -> dict[str, float]:
        """One optimizer step over the global batch of `step` (supervised trainers)."""
        examples = self.step_examples(step)
        return self.optimize(self.micro_batches(examples), self.loss)

    def micro_batches(self, examples: list[Any]) -> list[Batch]:
        """This process's micro-batches of a global batch: sorted by length, cut into equal parts."""
        order = sorted(range(len(examples)), key=lambda i: self.example_length(examples[i]))
        parts = self.cfg.grad_accum * self.world
        size = len(examples) // parts
        mine = range(self.rank * self.cfg.grad_accum, (self.rank + 1) * self.cfg.grad_accum)
        return [self.collate([examples[i] for i in order[k * size : (k + 1) * size]]) for k in mine]

    def _reduce(self, value: float) -> float:
        if self.world == 1:
            return value
        tensor = torch.tensor([value], dtype=torch.float64)
        return float(self.accelerator.reduce(tensor, reduction="sum").item())

    def optimize(self, batches: list[Batch], loss_fn: LossFn) -> dict[str, float]:
        """Accumulate gradients over `batches` (this process's share of a global batch), then step.

        Every batch's loss is a sum over items; dividing by the global item count makes the update
        independent of how the global batch is split into micro-batches and processes."""
        n_global = self._reduce(float(sum(float(b["num_items"]) for b in batches)))
        scale = self.world / max(n_global, 1.0)
        sums: dict[str, float] = defaultdict(float)
        loss_total = 0.0
        for i, batch in enumerate(batches):
            last = i == len(batches) - 1
            sync = (
                contextlib.nullcontext() if last or self.world == 1 else self.accelerator.no_sync(self.engine)
            )
            with sync:
                loss_sum, metric_sums = self.engine(loss_fn, batch)
                (loss_sum * scale).backward()
            loss_total += float(loss_sum.detach())
            for key, value in metric_sums.items():
                sums[key] += float(value)
            self.tokens_seen += int(batch.get("num_tokens", 0))
        loss_value = self._reduce(loss_total) / max(n_global, 1.0)
        if self.cfg.max_grad_norm > 0:
            grad_norm = float(torch.nn.utils.clip_grad_norm_(self.params, self.cfg.max_grad_norm))
        else:
            grad_norm = float(
                torch.norm(torch.stack([p.grad.norm() for p in self.params if p.grad is not None]))
            )
        if not (math.isfinite(loss_value) and math.isfinite(grad_norm)):
            self.optimizer.zero_grad(set_to_none=True)
            kept = latest_checkpoint(self.output_dir / "checkpoints")
            where = f"the last good checkpoint {kept} is kept" if kept else "no checkpoint was written yet"
            raise NonFiniteLossError(
                f"non-finite {'loss' if not math.isfinite(loss_value) else 'gradient norm'} at step "
                f"{self.step + 1} (loss={loss_value}, grad_norm={grad_norm}); the update was not applied "
                f"and {where}; lower train.lr or check the data"
            )
        lr = self.optimizer.param_groups[0]["lr"]
        step_optimizer(self.optimizer, self.params)
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        metrics = {"loss": loss_value, "grad_norm": grad_norm, "lr": lr}
        for key, value in sums.items():
            metrics[key] = self._reduce(value) / max(n_global, 1.0)
        return metrics

    # ---- checkpoints -------------------------------------------------------------------------------
    def trainable_state(self) -> dict[str, torch.Tensor]:
        return {n: p.detach() for n, p in self.model.named_parameters() if p.requires_grad}

    def save_checkpoint(self) -> None:
        if self.is_main:
            state = {
                "step": self.step,
                "tokens_seen": self.tokens_seen,
                "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(),
                "rng": rng_state(),
                "extra": self.extra_state(),
            }
            root = self.output_dir / "checkpoints"
            write_checkpoint(root, self.step, self.trainable_state(), state, self.cfg.keep_checkpoints)
        self.accelerator.wait_for_everyone()

    def load_checkpoint(self, path: Path) -> None:
        tensors, state = read_checkpoint(path)
        params = dict(self.model.named_parameters())
        expected = {n for n, p in params.items() if p.requires_grad}
        if set(tensors) != expected:
            missing = sorted(expected - set(tensors))[:3]
            raise ConfigError(f"{path}: checkpoint does not match the model (missing {missing})")
        with torch.no_grad():
            for name, tensor in tensors.items():
                params[name].copy_(tensor)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        set_rng_state(state["rng"])
        self.load_extra_state(state["extra"])
        self.step = int(state["step"])
        self.tokens_seen = int(state["tokens_seen"])

    # ---- metrics -----------------------------------------------------------------------------------
    def log(self, split: str, metrics: dict[str, float]) -> None:
        if not self.is_main:
            return
        record = {"step": self.step, "split": split, **{k: _round(v) for k, v in metrics.items()}}
        with open(self.output_dir / "metrics.jsonl", "a", encoding="utf-8") as fh:
            fh.write(json.dumps(record) + "\n")
        if self._tb is not None:
            for key, value in metrics.items():
                if isinstance(value, int | float):
                    self._tb.add_scalar(f"{split}/{key}", value, self.step)

    def _truncate_metrics(self) -> None:
        """After a resume, drop metric lines of steps that are about to be redone."""
        path = self.output_dir / "metrics.jsonl"
        if not self.is_main or not path.is_file():
            return
        kept = [
            ln for ln in path.read_text(encoding="utf-8").splitlines() if json.loads(ln)["step"] <= self.step
        ]
        tmp = path.with_suffix(".tmp")
        tmp.write_text("".join(ln + "\n" for ln in kept), encoding="utf-8")
        tmp.replace(path)

    # ---- run ---------------------------------------------------------------------------------------
    def prepare_output(self) -> bool:
        """Create the output directory (or check it belongs to this run). False when already finished."""
        claim_run_dir(self.run_config, self.output_dir, write=self.is_main)
        self.accelerator.wait_for_everyone()
        state = self.output_dir / "trainer_state.json"
        return not (state.is_file() and json.loads(state.read_text(encoding="utf-8")).get("finished"))

    def run(self) -> dict[str, float]:
        if not self.prepare_output():
            console.print(f"[bold]{self.name}[/]: {self.output_dir} already finished; nothing to do")
            return {}
        self._tb = _tensorboard(self.output_dir) if self.is_main else None
        ckpt_root = self.output_dir / "checkpoints"
        if self.is_main:
            clean_partial(ckpt_root)
        self.accelerator.wait_for_everyone()
        set_seed(self.cfg.seed + self.rank)
        _ = self.scheduler  # created before the first optimizer step (it counts them)
        latest = latest_checkpoint(ckpt_root)
        if latest is not None:
            self.load_checkpoint(latest)
            console.print(f"[bold]{self.name}[/]: resuming from {latest} (step {self.step})")
        self._truncate_metrics()
        total = self.total_steps()
        eval_metrics: dict[str, float] = {}
        start_time, start_step, start_tokens = time.perf_counter(), self.step, self.tokens_seen
        with progress(self.is_main) as bar:
            task = bar.add_task(self.name, total=total, completed=self.step, status="")
            while self.step < total:
                t0 = time.perf_counter()
                metrics = self.train_step(self.step)
                self.step += 1
                metrics["step_seconds"] = time.perf_counter() - t0
                elapsed = time.perf_counter() - start_time
                metrics["tokens_per_s"] = (self.tokens_seen - start_tokens) / max(elapsed, 1e-9)
                if self.step % max(self.cfg.log_every, 1) == 0 or self.step == total:
                    self.log("train", metrics)
                status = f"loss {metrics.get('loss', float('nan')):.4f}"
                bar.update(task, completed=self.step, status=status)
                plain_every = max(1, total // 50)
                if bar.disable and self.is_main and (self.step % plain_every == 0 or self.step == total):
                    console.print(f"{self.name} step {self.step}/{total} {status} ({elapsed:.0f}s)")
                if self.cfg.eval_every and self.step % self.cfg.eval_every == 0 and self.step < total:
                    self.log("eval", self.evaluate())
                if self.cfg.save_every and self.step % self.cfg.save_every == 0 and self.step < total:
                    self.save_checkpoint()
                for callback in self.callbacks:
                    callback(self, metrics)
        eval_metrics = self.evaluate()
        if eval_metrics:
            self.log("eval", eval_metrics)
        if self.is_main:
            self.save_final()
            seconds = time.perf_counter() - start_time
            summary = {"finished": True, "step": self.step, "seconds_this_run": round(seconds, 2),
                       "steps_this_run": self.step - start_step, "tokens_seen": self.tokens_seen}  # fmt: skip
            (self.output_dir / "trainer_state.json").write_text(json.dumps(summary, indent=2))
        if self._tb is not None:
            self._tb.close()
        self.accelerator.wait_for_everyone()
        return eval_metrics


def _round(value: Any) -> Any:
    """6 significant digits (not decimals: a learning rate of 3e-7 must not be logged as 0)."""
    return float(f"{value:.6g}") if isinstance(value, float) else value


def _tensorboard(out: Path) -> Any:
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(str(out / "tensorboard"))
