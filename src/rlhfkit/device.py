"""Where a run computes and in what precision, decided once from `train.device` and `train.precision`.

    resolve_device(cfg)            "auto" -> cuda:LOCAL_RANK (or cuda) when CUDA is present, then "mps",
                                   else "cpu"; an explicit device that is not there is a ConfigError
    resolve_precision(cfg, device) "auto" -> "bf16" on a CUDA GPU that supports it, else "fp32"
    resolve_runtime(cfg)           both, as a `Runtime`; on CUDA it also turns TF32 matmuls on (`enable_tf32`)

Precision "bf16" is mixed precision, not a bf16 model: every trainable weight and the optimizer state stay
float32 (the master weights), the forward runs under `torch.autocast(bfloat16)` (the loop's Accelerator,
`mixed_precision="bf16"`), and the gradients land in float32. Frozen models (the reference, reward models
during RL) hold bf16 weights under "bf16": they only run inference, and half the memory and bandwidth is the
whole point of a GPU run. On the CPU, "auto" stays float32 (bf16 is slower there), but "bf16" by name works
there too, which is how the tests exercise the bf16 paths without a GPU.

`place_model` is the one function that moves and casts a model (`models` calls it for every model it
loads or builds), and `to_device` moves a batch (tensors inside dicts, lists and dataclasses). The loop
gets its Accelerator (`make_accelerator`), its optimizer (`make_optimizer`) and the checks of a sharded
launch (`check_sharded`: FSDP2, DeepSpeed) from here; `cuda_rng_states` go into every checkpoint.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from typing import Any, Literal

import torch

from rlhfkit.errors import ConfigError

DEVICE_CHOICES = "auto, cpu, cuda, cuda:N or mps"


@dataclass(frozen=True)
class Runtime:
    """The resolved device and precision of a run."""

    device: torch.device
    precision: Literal["fp32", "bf16"]

    @property
    def mixed_precision(self) -> str:
        """accelerate's `mixed_precision` argument."""
        return "bf16" if self.precision == "bf16" else "no"

    @property
    def inference_dtype(self) -> torch.dtype:
        """dtype of frozen models (reference, reward): bf16 under bf16 precision, else float32."""
        return torch.bfloat16 if self.precision == "bf16" else torch.float32


CPU = Runtime(torch.device("cpu"), "fp32")
"""What a model gets when no runtime is given (tools outside training: `rlhfkit score`, evaluation)."""


def _local_rank() -> int | None:
    """This process's GPU index under a launcher (`accelerate launch`, `torchrun`), None outside one."""
    value = os.environ.get("LOCAL_RANK")
    return int(value) if value not in (None, "") else None


def _launched() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1") or 1) > 1


def resolve_device(cfg: Any) -> torch.device:
    """The device of `cfg.device` (a TrainConfig); see the module docstring."""
    name = str(getattr(cfg, "device", "auto")).strip().lower()
    if name == "auto":
        if torch.cuda.is_available():
            rank = _local_rank()
            return torch.device("cuda", rank if rank is not None else torch.cuda.current_device())
        if _mps_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name == "cpu":
        return torch.device("cpu")
    if name == "mps":
        if not _mps_available():
            raise ConfigError("train.device=mps but this torch has no usable Apple GPU (torch.backends.mps); "
                              "use train.device=auto or cpu")  # fmt: skip
        return torch.device("mps")
    if name == "cuda" or name.startswith("cuda:"):
        if not torch.cuda.is_available():
            build = f"CUDA {torch.version.cuda}" if torch.version.cuda else "a build without CUDA"
            raise ConfigError(f"train.device={name} but no CUDA GPU is available (torch {torch.__version__}, "
                              f"{build}); use train.device=auto or cpu")  # fmt: skip
        count = torch.cuda.device_count()
        if name == "cuda":
            rank = _local_rank()
            index = rank if rank is not None else torch.cuda.current_device()
        else:
            text = name.partition(":")[2]
            if not text.isdigit():
                raise ConfigError(f"train.device={name}: not a device; use {DEVICE_CHOICES}")
            index = int(text)
            if _launched():
                raise ConfigError(
                    f"train.device={name} pins one GPU, but this is one of several launched processes "
                    "(each uses cuda:LOCAL_RANK); use train.device=cuda or auto"
                )
        if index >= count:
            raise ConfigError(f"train.device={name}: GPU {index} does not exist ({count} visible)")
        return torch.device("cuda", index)
    raise ConfigError(f"train.device={name}: not a device; use {DEVICE_CHOICES}")


def _mps_available() -> bool:
    mps = getattr(torch.backends, "mps", None)
    return bool(mps is not None and mps.is_available())


def resolve_precision(cfg: Any, device: torch.device) -> Literal["fp32", "bf16"]:
    """ "fp32" or "bf16" for `cfg.precision` on `device`; see the module docstring."""
    name = str(getattr(cfg, "precision", "auto")).strip().lower()
    if name not in ("auto", "fp32", "bf16"):
        raise ConfigError(f"train.precision={name}: use auto, fp32 or bf16")
    cuda_bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
    if name == "auto":
        return "bf16" if cuda_bf16 else "fp32"
    if name == "bf16" and device.type == "cuda" and not cuda_bf16:
        gpu = torch.cuda.get_device_name(device)
        raise ConfigError(
            f"train.precision=bf16 but {gpu} ({device}) does not support bfloat16 (it needs compute "
            "capability 8.0+, e.g. A100, H100); use train.precision=fp32"
        )
    return "bf16" if name == "bf16" else "fp32"


def resolve_runtime(cfg: Any) -> Runtime:
    """Device and precision of a TrainConfig, with the device's global settings applied (TF32 on CUDA:
    float32 matmuls outside autocast, e.g. a float32 run, use the tensor cores at ~10-bit mantissa)."""
    device = resolve_device(cfg)
    runtime = Runtime(device, resolve_precision(cfg, device))
    if device.type == "cuda":
        torch.cuda.set_device(device)  # accelerate's "cuda" (one process) is the current device
        enable_tf32()
    return runtime


def enable_tf32() -> None:
    """TF32 for float32 matmuls and convolutions on CUDA, through the `fp32_precision` settings where torch
    has them (2.9+): torch refuses to read a TF32 state set through a mix of those and the legacy flags
    (`allow_tf32`, `set_float32_matmul_precision`), and transformers and TRL use the new ones."""
    if hasattr(torch.backends, "fp32_precision"):
        torch.backends.cuda.matmul.fp32_precision = "tf32"
        torch.backends.cudnn.conv.fp32_precision = "tf32"  # type: ignore[attr-defined]  # not in torch's stubs
        return
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    torch.set_float32_matmul_precision("high")


def place_model(model: Any, runtime: Runtime | None = None, *, frozen: bool = False) -> Any:
    """Move `model` to the run's device: trainable models in float32 (the master weights; autocast does the
    bf16 compute), frozen ones in `runtime.inference_dtype`, gradients off and in eval mode."""
    runtime = runtime or CPU
    dtype = runtime.inference_dtype if frozen else torch.float32
    model.to(device=runtime.device, dtype=dtype)
    if frozen:
        model.requires_grad_(False).eval()
    return model


def enable_gradient_checkpointing(model: Any) -> None:
    """Activation checkpointing of every decoder layer, non-reentrant (works with frozen inputs, LoRA and
    DDP's no_sync). Under it `prefix.shared_prompt_forward` runs rows unshared: a KV cache cannot be
    recomputed layer by layer."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x's name
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    if hasattr(model, "enable_input_require_grads"):
        model.enable_input_require_grads()  # LoRA: frozen embeddings must still give the blocks a grad input


def model_device(model: torch.nn.Module) -> torch.device:
    """The device of a model's first parameter (cpu for a model without parameters)."""
    first = next(iter(model.parameters()), None)
    return first.device if first is not None else torch.device("cpu")


def to_device(obj: Any, device: torch.device | str) -> Any:
    """`obj` with every tensor in it moved to `device` (dicts, lists, tuples and dataclasses are rebuilt,
    anything else is returned as is). A no-op (the same tensors) when they are already there."""
    device = torch.device(device)
    if isinstance(obj, torch.Tensor):
        # non-blocking only host -> GPU: a non-blocking copy back to the host may be read before it lands
        return obj.to(device, non_blocking=device.type == "cuda")
    if isinstance(obj, dict):
        return {k: to_device(v, device) for k, v in obj.items()}
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):  # a NamedTuple
        return type(obj)(*(to_device(v, device) for v in obj))
    if isinstance(obj, list | tuple):
        return type(obj)(to_device(v, device) for v in obj)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        changes = {f.name: to_device(getattr(obj, f.name), device) for f in dataclasses.fields(obj) if f.init}
        return dataclasses.replace(obj, **changes)
    return obj


def cuda_rng_states() -> list[torch.Tensor]:
    """Every visible GPU's RNG state (empty without CUDA), for exact resume."""
    return list(torch.cuda.get_rng_state_all()) if torch.cuda.is_available() else []


def set_cuda_rng_states(states: list[torch.Tensor]) -> None:
    """Restore `cuda_rng_states()`. A checkpoint from a GPU run loads on a CPU-only machine (the GPU states
    are then unused), and one from a machine with more GPUs restores the ones this machine has."""
    if not states or not torch.cuda.is_available():
        return
    count = torch.cuda.device_count()
    for index, state in enumerate(states[:count]):
        torch.cuda.set_rng_state(state.cpu(), index)


def make_accelerator(runtime: Runtime) -> Any:
    """The run's `accelerate.Accelerator`: on `runtime`'s device (cpu=True keeps it off a GPU), autocast in
    `runtime`'s precision; under `accelerate launch` it also takes DDP, FSDP2 or DeepSpeed from the launch
    config. The learning-rate schedule steps once per optimizer update (accelerate's default would step it
    once per process). accelerate keeps one global state per process, so a second run in the same process
    (tests, the pipeline) with another precision resets it; the process group (PartialState) is kept."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, PartialState

    before = PartialState._shared_state.get("device")
    if before is not None and before.type != runtime.device.type and not _launched():
        AcceleratorState._reset_state(reset_partial_state=True)  # one process: a CPU run, then a GPU run
    elif AcceleratorState._shared_state.get("_mixed_precision", runtime.mixed_precision) != (
        runtime.mixed_precision
    ):
        AcceleratorState._reset_state()
    return Accelerator(
        cpu=runtime.device.type == "cpu",
        mixed_precision=runtime.mixed_precision,
        step_scheduler_with_optimizer=False,
    )


def make_optimizer(cfg: Any, params: list[torch.nn.Parameter], device: torch.device) -> torch.optim.Optimizer:
    """AdamW over `params` as `cfg.optimizer` says (a TrainConfig): "adamw" is torch's fused kernel (one
    kernel for every parameter, on the CPU 0.08 s instead of 0.51 s per step for SmolLM2-135M); "adamw_8bit"
    is bitsandbytes' AdamW with 8-bit moments (CUDA only)."""
    kwargs = {"lr": cfg.lr, "betas": tuple(cfg.betas), "eps": cfg.adam_eps, "weight_decay": cfg.weight_decay}
    if cfg.optimizer == "adamw_8bit":
        try:
            import bitsandbytes as bnb
        except ImportError:
            raise ConfigError("train.optimizer=adamw_8bit needs the bitsandbytes package (pip install "
                              "bitsandbytes); use train.optimizer=adamw") from None  # fmt: skip
        if device.type != "cuda":
            raise ConfigError(f"train.optimizer=adamw_8bit runs on CUDA GPUs only, not on {device}; "
                              "use train.optimizer=adamw")  # fmt: skip
        return bnb.optim.AdamW8bit(params, **kwargs)
    return torch.optim.AdamW(params, fused=device.type in ("cpu", "cuda"), **kwargs)


def check_sharded(accelerator: Any, cfg: Any, run_config: Any, supported: bool) -> bool:
    """True when the launch shards the weights (FSDP2, DeepSpeed); refuses what rlhfkit does not support
    there, one line each; for DeepSpeed, writes the loop's batch geometry and clipping into its config."""
    kind = accelerator.distributed_type.value  # "FSDP", "DEEPSPEED", "MULTI_GPU", "MULTI_CPU", "NO", ...
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true" and kind != "FSDP":
        # accelerate (1.15, AcceleratorState) turns FSDP on only for multi-GPU/NPU/XPU processes, never for
        # CPU processes: they would run as plain DDP under an FSDP config, so say so instead
        raise ConfigError(f"the launch config asks for FSDP, but these processes run as {kind} (FSDP needs "
                          "GPUs); use examples/accelerate/ddp.yaml on the CPU")  # fmt: skip
    if kind not in ("FSDP", "DEEPSPEED"):
        return False
    engine = "FSDP2" if kind == "FSDP" else "DeepSpeed"
    if cfg.optimizer == "adamw_8bit":
        raise ConfigError(f"train.optimizer=adamw_8bit does not run under {engine} (bitsandbytes' AdamW "
                          "cannot take sharded parameters); use train.optimizer=adamw")  # fmt: skip
    if not supported:
        raise ConfigError(f"{type(run_config).__name__} cannot run under accelerate's {engine} (the "
                          "rollout engine and the reward-model calibration need whole weights on every "
                          "rank); shard it with torchrun and --set train.sharding=fsdp2, or use "
                          "ddp.yaml")  # fmt: skip
    if getattr(getattr(run_config, "lora", None), "enabled", False):
        raise ConfigError(f"LoRA under {engine} is not supported (the adapters are small: use ddp.yaml)")
    if cfg.save_every:
        raise ConfigError(f"mid-run checkpoints of sharded optimizer state are not written under "
                          f"accelerate's {engine}; set train.save_every=0, or shard with torchrun and --set "
                          "train.sharding=fsdp2, which writes them")  # fmt: skip
    if kind == "DEEPSPEED":
        ds = accelerator.state.deepspeed_plugin.deepspeed_config
        ds["train_micro_batch_size_per_gpu"] = cfg.batch_size // (cfg.grad_accum * accelerator.num_processes)
        ds["gradient_accumulation_steps"] = cfg.grad_accum
        ds["train_batch_size"] = cfg.batch_size
        ds["gradient_clipping"] = cfg.max_grad_norm
    return True
