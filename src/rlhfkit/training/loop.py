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
import functools
import json
import os
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from rlhfkit.allocator import keep_freed_memory
from rlhfkit.config import claim_run_dir, validate
from rlhfkit.console import console, progress
from rlhfkit.device import check_sharded, make_accelerator, make_optimizer, resolve_runtime, to_device
from rlhfkit.errors import ConfigError, DivergenceError, SaveError
from rlhfkit.fileio import io_error_message, write_atomic
from rlhfkit.training import sharding
from rlhfkit.training.checkpoint import (
    SHARDED_DIR,
    clean_partial,
    gather_ranks,
    latest_checkpoint,
    rank_state,
    read_checkpoint,
    set_aside,
    write_checkpoint,
    write_sharded_checkpoint,
)
from rlhfkit.training.guard import DivergenceGuard, checked_update, clip_norm
from rlhfkit.training.settings import TrainConfig, lr_lambda, rng_state, set_rng_state, set_seed

Batch = Any
"""A micro-batch: a dict of tensors from `collate` (supervised trainers) or a typed batch such as RL's
`experience.Experience`; either carries `num_items`, its share of the loss normaliser."""
LossFn = Callable[[Any, Batch], tuple[torch.Tensor, dict[str, torch.Tensor]]]


class _Forward(torch.nn.Module):
    """Routes a trainer's loss function through one module call, so that DistributedDataParallel sees the
    forward pass (and synchronises gradients) even though trainers call sub-modules of the model."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, fn: LossFn, batch: Batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        return fn(self.model, batch)


class TrainLoop:
    """Base class of every trainer; see the module docstring. `self.stage` is the stage's whole config (an
    SFTConfig, a GRPOConfig, ...; a trainer narrows its type), `self.cfg` its `train` section."""

    stage: Any

    name = "train"
    positive_loss = True
    """The loss is positive by nature (cross-entropy, Bradley-Terry, DPO): the guard watches it for spikes."""
    uniform_loss: float | None = None
    """The loss of a model that predicts the uniform distribution (SFT: ln V), if there is one."""
    supports_sharding = True
    """The trainer runs under FSDP2 / DeepSpeed (its models only run inside `optimize` / `forward`)."""
    watch_zero_gradients: bool = True
    """A gradient norm of exactly 0 means a dead model (off for RL: a batch whose groups all got equal
    rewards, at the reference, legitimately has no gradient)."""

    def __init__(self, cfg: TrainConfig, model: Any, output_dir: str | Path, run_config: Any) -> None:
        validate(run_config)  # a config built in Python gets the checks a parsed one had
        keep_freed_memory()  # no page faults on the buffers every step re-allocates (rlhfkit.allocator)
        self.cfg = cfg
        self.model = model
        self.output_dir = Path(output_dir)
        self.stage = run_config
        self.runtime = resolve_runtime(cfg)  # the trainer placed its models with the same (device.py)
        self.accelerator = make_accelerator(self.runtime)
        self.device = self.accelerator.device
        self.world = self.accelerator.num_processes
        self.rank = self.accelerator.process_index
        self.is_main = self.accelerator.is_main_process
        threads = cfg.threads or max(1, (os.cpu_count() or 1) // self.accelerator.num_processes)
        torch.set_num_threads(threads)
        if cfg.batch_size % (cfg.grad_accum * self.world):
            raise ConfigError(
                f"train.batch_size={cfg.batch_size} is not divisible by grad_accum x processes = "
                f"{cfg.grad_accum} x {self.world}"
            )
        self.sharded = check_sharded(self.accelerator, cfg, run_config, self.supports_sharding)
        self.deepspeed = self.accelerator.distributed_type.value == "DEEPSPEED"
        self.fsdp2 = cfg.sharding == "fsdp2"  # torch's FSDP2 shards the model (`training.sharding`)
        engine: Any = _Forward(model)
        if self.fsdp2:
            sharding.check_fsdp2(cfg, run_config, self.runtime, self.sharded)
            sharding.init_distributed(self.runtime)
            self.sharded, engine = True, sharding.shard(engine, self.runtime, cfg)  # before the optimizer
        # The fused AdamW writes the parameters without bumping their version counters, which
        # `step_optimizer` does, so caches keyed on them (the rollout engine's derived weights) see updates.
        optimizer = make_optimizer(cfg, [p for p in model.parameters() if p.requires_grad], self.device)
        # model and optimizer in one call: accelerate's FSDP2 shards in place and remaps the optimizer's
        prepared = (engine, self.accelerator.prepare(optimizer)) if self.fsdp2 else None
        self.engine, self.optimizer = prepared or self.accelerator.prepare(engine, optimizer)
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.step = 0
        self.tokens_seen = 0
        self.callbacks: list[Callable[[TrainLoop, dict[str, float]], None]] = []
        """Called after every step (after its checkpoint is written) with the step's metrics."""
        self._scheduler: torch.optim.lr_scheduler.LambdaLR | None = None
        self._scheduler_step: Callable[[], None] = lambda: None
        self._full_state: dict[str, torch.Tensor] | None = None
        self._guard: DivergenceGuard | None = None

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
            self._scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer.optimizer, fn)
            self._scheduler_step = self.accelerator.prepare_scheduler(self._scheduler).step
        return self._scheduler

    def autocast(self) -> contextlib.AbstractContextManager:
        """The run's autocast (bf16 under train.precision=bf16) for forward passes outside `optimize`
        (evaluation, reference and value passes); `optimize` gets it from the prepared module."""
        return self.accelerator.autocast()

    def forward(self, fn: LossFn, batch: Batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """`fn(model, batch)` outside `optimize` (evaluation), under the run's autocast; through the prepared
        module where the weights are sharded (FSDP2, ZeRO-3), whose hooks gather them."""
        batch = self.to_device(batch)
        if self.sharded:
            return self._call(fn, batch)
        with self.autocast():
            return fn(self.model, batch)

    def _call(self, fn: LossFn, batch: Batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The prepared module's forward; under FSDP2 in the run's autocast (accelerate's has it built in)."""
        with self.autocast() if self.fsdp2 else contextlib.nullcontext():
            return self.engine(fn, batch)

    def full_weights(self) -> contextlib.AbstractContextManager:
        """Whole weights inside, on every process (FSDP2: gathered; each process enters), for what runs
        outside the loss: sampling, reference and value passes, evaluation, the final save."""
        return sharding.full_weights(self.engine if self.fsdp2 else None)

    def final_state(self, prefix: str = "") -> dict[str, torch.Tensor] | None:
        """The full state dict of the trained module's `prefix` part, gathered before `save_final` under
        FSDP2 / ZeRO-3 (None otherwise: `save_model` then reads the model's own weights)."""
        if self._full_state is None:
            return None
        start = f"model.{prefix}"
        return {k[len(start) :]: v for k, v in self._full_state.items() if k.startswith(start)}

    def to_device(self, batch: Any) -> Any:
        """A collated batch (built on the CPU) on the run's device."""
        return to_device(batch, self.device)

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
        """The sum of `value` over the processes, reduced on the run's device: NCCL, the backend of every
        GPU launch, all-reduces CUDA tensors only (gloo takes CPU ones: the CPU tests cannot tell)."""
        if self.world == 1:
            return value
        tensor = torch.tensor([value], dtype=torch.float64, device=self.device)  # (1,)
        return float(self.accelerator.reduce(tensor, reduction="sum").item())

    def optimize(self, batches: list[Batch], loss_fn: LossFn) -> dict[str, float]:
        """Accumulate gradients over `batches` (this process's share of a global batch), then step.

        Every batch's loss is a sum over items; dividing by the global item count makes the update
        independent of how the global batch is split into micro-batches and processes. Under FSDP2 an RL
        trainer hands in minibatches every process holds whole; each trains on its share (`shard`)."""
        if self.fsdp2:
            batches = [b.shard(self.rank, self.world) if hasattr(b, "shard") else b for b in batches]
        n_global = self._reduce(float(sum(float(batch_field(b, "num_items")) for b in batches)))
        scale = self.world / max(n_global, 1.0)
        sums: dict[str, float] = defaultdict(float)
        loss_total = 0.0
        for i, batch in enumerate(batches):
            last = i == len(batches) - 1
            no_sync = sharding.no_sync if self.fsdp2 else self.accelerator.no_sync
            sync = contextlib.nullcontext() if last or self.world == 1 else no_sync(self.engine)
            with sync:
                loss_sum, metric_sums = self._call(loss_fn, self.to_device(batch))
                if self.deepspeed:  # its engine divides by its accumulation steps and steps at the last
                    self.accelerator.deepspeed_engine_wrapped.backward(
                        loss_sum * scale * len(batches), sync_gradients=last
                    )
                else:
                    self.accelerator.backward(loss_sum * scale)
            loss_total += float(loss_sum.detach())
            for key, value in metric_sums.items():
                sums[key] += float(value)
            self.tokens_seen += int(batch_field(batch, "num_tokens"))
        loss_value = self._reduce(loss_total) / max(n_global, 1.0)
        lr = self.optimizer.param_groups[0]["lr"]
        # accelerate's clip also gathers the norm of FSDP-sharded gradients; DeepSpeed clips (and steps) in
        # its engine and returns no norm. Sharded parameters (DTensors, partitions) feed no rollout cache.
        grad_norm = checked_update(
            self.optimizer, self.params, loss_value, self.cfg.max_grad_norm, f"at step {self.step + 1}",
            clip=clip_norm if self.fsdp2 else self.accelerator.clip_grad_norm_,
            before_step=self.check_divergence, bump=[] if self.sharded else self.params, then=self._kept_note,
        )  # fmt: skip
        self._scheduler_step()
        metrics = {"loss": loss_value, "grad_norm": grad_norm, "lr": lr}
        if self.fsdp2:  # this process's parameters + gradients + optimizer state: 1/W of them when sharded
            metrics["state_mib"] = sharding.state_bytes(self.params, self.optimizer.optimizer) / 2**20
        for key, total in sums.items():
            metrics[key] = self._reduce(total) / max(n_global, 1.0)
        return metrics

    def _kept_note(self) -> str:
        kept = latest_checkpoint(self.output_dir / "checkpoints")
        where = f"the last good checkpoint {kept} is kept" if kept else "no checkpoint was written yet"
        return f" and {where}; lower train.lr or check the data"

    @property
    def guard(self) -> DivergenceGuard:
        """The divergence guard, made on first use (a trainer may set `uniform_loss` after `__init__`)."""
        if self._guard is None:
            self._guard = DivergenceGuard(
                self.cfg.guard, self.positive_loss, self.watch_zero_gradients, self.uniform_loss
            )
        return self._guard

    def check_divergence(self, loss: float, grad_norm: float) -> None:
        """The divergence guard (`train.guard`, `guard.DivergenceGuard`) on step `self.step + 1`, before its
        update is applied: on a spike or dead gradients, the checkpoints that hold the bad weights are set
        aside and the run stops naming the last good one."""
        found = self.guard.check(loss, grad_norm, self.step + 1)
        if found is None:
            return
        problem, first_bad = found
        kept = set_aside(self.output_dir / "checkpoints", first_bad) if self.is_main else None
        if kept is not None:
            where = (f"the last good checkpoint is {kept}; resume from it with a lower learning rate: the "
                     "same command with --resume-with-changes --set train.lr=...")  # fmt: skip
        else:
            where = "no good checkpoint was written; start again in a new --output with a lower train.lr"
        raise DivergenceError(
            f"training diverged: {problem}; the update was not applied and {where} "
            "(train.guard.enabled=false turns this check off)"
        )

    # ---- checkpoints -------------------------------------------------------------------------------
    def trainable_state(self) -> dict[str, torch.Tensor]:
        return {n: p.detach() for n, p in self.model.named_parameters() if p.requires_grad}

    def save_checkpoint(self) -> None:
        """Rank 0 writes it, with every rank's RNG and trainer state (`checkpoint.rank_state`): each process
        draws from its own streams (seeded `seed + rank`, an RL trainer's sampling generator)."""
        ranks = gather_ranks({"rng": rng_state(), "extra": self.extra_state()}, self.world)
        state = {"step": self.step, "tokens_seen": self.tokens_seen, "scheduler": self.scheduler.state_dict(),
                 **ranks[0], "ranks": ranks[1:]}  # fmt: skip
        root, keep = self.output_dir / "checkpoints", self.cfg.keep_checkpoints
        if self.fsdp2:  # every process writes its shards of the model and the optimizer (DCP)
            shards = functools.partial(sharding.save_shards, self.engine, self.optimizer.optimizer)
            write_sharded_checkpoint(root, self.step, state, keep, self.is_main, shards)
        elif self.is_main:
            state["optimizer"] = self.optimizer.state_dict()
            write_checkpoint(root, self.step, self.trainable_state(), state, keep)
        self.accelerator.wait_for_everyone()

    def load_checkpoint(self, path: Path) -> None:
        tensors, state = read_checkpoint(path)
        if self.fsdp2:  # DCP re-shards what any number of processes wrote
            sharding.load_shards(self.engine, self.optimizer.optimizer, path / SHARDED_DIR)
        else:
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
        # the learning rate and schedule come from this run's config (`--resume-with-changes` may have
        # changed them): the same product base_lr x lambda(step) LambdaLR computes, so an unchanged run
        # resumes bit for bit
        self.scheduler.base_lrs = [self.cfg.lr for _ in self.optimizer.param_groups]
        for group, base, fn in zip(
            self.optimizer.param_groups, self.scheduler.base_lrs, self.scheduler.lr_lambdas, strict=True
        ):
            group["initial_lr"] = base
            group["lr"] = base * fn(self.scheduler.last_epoch)
        own = rank_state(state, 0 if self.fsdp2 else self.rank)  # FSDP2: every process's state is alike
        if own is None:  # written by fewer processes: fresh RNG streams, rank 0's trainer state
            console.print(
                f"[yellow]warning[/]: {path} holds no state of process {self.rank}; not an exact resume"
            )
            own = {"rng": rng_state(), "extra": state["extra"]}
        set_rng_state(own["rng"])
        self.load_extra_state(own["extra"])
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
        write_atomic(path, "".join(ln + "\n" for ln in kept))

    # ---- run ---------------------------------------------------------------------------------------
    def prepare_output(self) -> bool:
        """Create the output directory (or check it belongs to this run). False when already finished."""
        for first in (True, False):  # rank 0 writes config.yaml before the others read it (no torn read)
            if self.is_main == first:
                claim_run_dir(self.stage, self.output_dir, write=self.is_main)
            self.accelerator.wait_for_everyone()
        state = self.output_dir / "trainer_state.json"
        return not (state.is_file() and json.loads(state.read_text(encoding="utf-8")).get("finished"))

    def run(self) -> dict[str, float]:
        """Train to the end (or resume and finish); I/O errors on the output directory (disk full, no
        permission) become one line naming the file and the last good checkpoint."""
        try:
            return self._run()
        except SaveError as exc:
            raise SaveError(f"{exc}; {self._last_good()}") from None
        except OSError as exc:
            raise SaveError(f"{io_error_message(exc)} while writing {exc.filename or self.output_dir}; "
                            f"{self._last_good()}") from None  # fmt: skip

    def _last_good(self) -> str:
        kept = latest_checkpoint(self.output_dir / "checkpoints")
        if kept is None:
            return "no checkpoint was written yet; the same command starts again once the problem is fixed"
        return (
            f"the last good checkpoint is {kept}; the same command resumes from it once the problem is fixed"
        )

    def _run(self) -> dict[str, float]:
        if not self.prepare_output():
            console.print(f"[bold]{self.name}[/]: {self.output_dir} already finished; nothing to do")
            return {}
        self._tb = _tensorboard(self.output_dir) if self.is_main else None
        ckpt_root = self.output_dir / "checkpoints"
        if self.is_main:
            clean_partial(ckpt_root)
        self.accelerator.wait_for_everyone()
        set_seed(self.cfg.seed + (0 if self.fsdp2 else self.rank))
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
                status = (
                    "skipped (no group to learn from)" if metrics.get("skipped")
                    else f"loss {metrics.get('loss', float('nan')):.4f}"
                )  # fmt: skip
                bar.update(task, completed=self.step, status=status)
                plain_every = max(1, total // 50)
                if bar.disable and self.is_main and (self.step % plain_every == 0 or self.step == total):
                    console.print(f"{self.name} step {self.step}/{total} {status} ({elapsed:.0f}s)")
                if self.cfg.eval_every and self.step % self.cfg.eval_every == 0 and self.step < total:
                    with self.full_weights():
                        self.log("eval", self.evaluate())
                if self.cfg.save_every and self.step % self.cfg.save_every == 0 and self.step < total:
                    self.save_checkpoint()
                for callback in self.callbacks:
                    callback(self, metrics)
        with self.full_weights():
            eval_metrics = self.evaluate()
        if eval_metrics:
            self.log("eval", eval_metrics)
        if self.sharded:  # every rank takes part in the gather; rank 0 gets the full weights
            get = sharding.full_state_dict if self.fsdp2 else self.accelerator.get_state_dict
            self._full_state = get(self.engine)
        with self.full_weights():  # a trainer that saves its models (not `final_state`) finds them whole
            if self.is_main:
                self.save_final()
                seconds = time.perf_counter() - start_time
                summary = {"finished": True, "step": self.step, "seconds_this_run": round(seconds, 2),
                           "steps_this_run": self.step - start_step,
                           "tokens_seen": self.tokens_seen}  # fmt: skip
                (self.output_dir / "trainer_state.json").write_text(json.dumps(summary, indent=2))
        if self._tb is not None:
            self._tb.close()
        self.accelerator.wait_for_everyone()
        return eval_metrics


def batch_field(batch: Batch, key: str) -> Any:
    """`batch[key]` of a dict batch, `batch.key` of a typed one; 0 when it has none."""
    return batch.get(key, 0) if isinstance(batch, dict) else getattr(batch, key, 0)


def _round(value: Any) -> Any:
    """6 significant digits (not decimals: a learning rate of 3e-7 must not be logged as 0)."""
    return float(f"{value:.6g}") if isinstance(value, float) else value


def _tensorboard(out: Path) -> Any:
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(str(out / "tensorboard"))
