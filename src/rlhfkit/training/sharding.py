"""Sharded training with torch's own FSDP2 (`train.sharding: fsdp2`), in one place.

    torchrun --nproc-per-node 2 -m rlhfkit.cli sft --config sft.yaml --set train.sharding=fsdp2

`fully_shard` wraps every decoder layer of the trainable models (the classes a transformers model names in
`_no_split_modules`), then the loop's `_Forward` module as the root: a trainer's loss calls sub-modules
(the decoder stack, then the output layer on chosen positions), and the root's hooks gather what no layer
owns (embeddings, final norm, heads, tied weights) around that one call. Parameters, gradients and AdamW's
moments then live as `DTensor` shards, 1/W of them in each of the W processes; gradients are averaged over
the processes as DDP averages them, so the loop's loss normaliser is unchanged.

Where we depart from accelerate's FSDP plugin and why: accelerate (1.16) enables FSDP only on GPU processes,
so nothing sharded could run, or be tested, on CPU processes; torch's `fully_shard` over a `DeviceMesh` runs
over gloo on the CPU and NCCL on GPUs with the same code.

- Whole weights (`full_weights`): every FSDP module is unsharded (one all-gather a layer), so the model is
  an ordinary module for what runs outside the loss: the rollout engine, the reference and value passes,
  evaluation, the reward model's calibration and the final save. RL gathers once per iteration.
- Frozen models (the reference, reward models) are not sharded: each process holds them whole.
- Checkpoints: `torch.distributed.checkpoint` (DCP) writes each process's shards of the model and the
  optimizer; DCP re-shards on load, so a run resumes on another number of processes.
- Mixed precision: under `train.precision=bf16` the gathered parameters are bf16 (`MixedPrecisionPolicy`:
  half the all-gather bytes), gradients are reduced in float32 into float32 master shards.
- `train.offload` keeps the shards in host memory on a GPU run (`CPUOffloadPolicy`).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from rlhfkit.device import Runtime
from rlhfkit.errors import ConfigError

_gathers = [0]  # the version counter given to gathered parameters (see `full_weights`)


def check_fsdp2(cfg: Any, run_config: Any, runtime: Runtime, accelerate_sharded: bool) -> None:
    """Refuse, one line each, what `train.sharding=fsdp2` does not support."""
    if accelerate_sharded:
        raise ConfigError(
            "train.sharding=fsdp2 shards with torch's FSDP2 itself: launch with torchrun or a plain "
            "`accelerate launch` config, not accelerate's FSDP or DeepSpeed one"
        )
    if getattr(getattr(run_config, "lora", None), "enabled", False):
        raise ConfigError("train.sharding=fsdp2 with LoRA is not supported (the adapters are small: use "
                          "train.sharding=none under torchrun, which replicates the model)")  # fmt: skip
    if cfg.optimizer == "adamw_8bit":
        raise ConfigError("train.optimizer=adamw_8bit does not run with train.sharding=fsdp2 (bitsandbytes' "
                          "AdamW cannot take sharded parameters); use train.optimizer=adamw")  # fmt: skip
    if cfg.offload and runtime.device.type != "cuda":
        raise ConfigError(
            f"train.offload moves the sharded state from the GPU to host memory; this run is on "
            f"{runtime.device}, where it already is: set train.offload=false"
        )


def init_distributed(runtime: Runtime) -> None:
    """The default process group, if the launcher (or accelerate) has not made one: a one-process run
    (`torchrun --nproc-per-node 1`, or no launcher at all) shards over a mesh of one."""
    if dist.is_initialized():
        return
    backend = "nccl" if runtime.device.type == "cuda" else "gloo"
    if "MASTER_ADDR" in os.environ:
        dist.init_process_group(backend)
    else:
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)


def shard(root: torch.nn.Module, runtime: Runtime, cfg: Any) -> torch.nn.Module:
    """`fully_shard` each decoder layer of the models under `root`, then `root`; returns `root`."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard

    mesh = init_device_mesh(runtime.device.type, (dist.get_world_size(),))
    bf16 = runtime.precision == "bf16"
    kwargs: dict[str, Any] = {
        "mesh": mesh,
        "mp_policy": MixedPrecisionPolicy(
            param_dtype=torch.bfloat16 if bf16 else None, reduce_dtype=torch.float32 if bf16 else None
        ),
        "offload_policy": CPUOffloadPolicy() if cfg.offload else OffloadPolicy(),
    }
    layer_names = {name for m in root.modules() for name in getattr(m, "_no_split_modules", None) or []}
    layers = [m for m in root.modules() if type(m).__name__ in layer_names]
    if not layers:
        raise ConfigError(f"train.sharding=fsdp2: found no decoder layers to shard in {type(root).__name__} "
                          "(its transformers class names none in `_no_split_modules`)")  # fmt: skip
    for layer in layers:
        fully_shard(layer, **kwargs)
    fully_shard(root, **kwargs)
    # the root must be known before any layer runs on its own (sampling comes before the first update);
    # FSDP2 otherwise takes the first module to run forward as its root
    root._get_fsdp_state()._lazy_init()  # type: ignore[operator]  # FSDPModule's, not in the stubs
    return root


def fsdp_modules(root: torch.nn.Module) -> list[Any]:
    from torch.distributed.fsdp import FSDPModule

    return [m for m in root.modules() if isinstance(m, FSDPModule)]


@contextlib.contextmanager
def full_weights(root: torch.nn.Module | None) -> Iterator[None]:
    """Inside, every parameter under `root` is whole on every process (a collective: all enter it); no-op
    for None (an unsharded run). Forward passes inside keep the weights gathered (no re-gather a layer).

    The gathered parameters get a version counter no earlier gather had: the rollout engine rebuilds its
    derived weights when a parameter's (data_ptr, _version) changes, and a re-gathered parameter may sit at
    the same address with new values."""
    if root is None:
        yield
        return
    modules = fsdp_modules(root)
    for module in modules:
        module.unshard()
        module.set_reshard_after_forward(False, recurse=False)
    params = list(root.parameters())
    _gathers[0] = max([_gathers[0] + 1, *(p._version + 1 for p in params)])
    torch._C._autograd._unsafe_set_version_counter(tuple(params), (_gathers[0],) * len(params))
    try:
        yield
    finally:
        for module in modules:
            module.reshard()
            module.set_reshard_after_forward(True, recurse=False)


@contextlib.contextmanager
def no_sync(root: torch.nn.Module) -> Iterator[None]:
    """Accumulate a micro-batch's gradients unreduced: one reduce-scatter at the last micro-batch."""
    root.set_requires_gradient_sync(False)  # type: ignore[operator]  # FSDPModule's
    try:
        yield
    finally:
        root.set_requires_gradient_sync(True)  # type: ignore[operator]


def full_state_dict(root: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The whole model's state dict on rank 0, in CPU memory (empty on the other ranks); a collective."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    state: dict[str, torch.Tensor] = get_model_state_dict(root, options=options)  # type: ignore[assignment]
    # a tied weight (the output layer's is the embedding's) comes back once per name, as separate tensors;
    # keep its first name only, as `save_pretrained` does for a model's own tied weights
    first: dict[int, str] = {}
    for name, param in root.named_parameters(remove_duplicate=False):
        if first.setdefault(id(param), name) != name:
            state.pop(name, None)
    return state


def state_bytes(params: list[torch.nn.Parameter], optimizer: torch.optim.Optimizer) -> int:
    """Bytes this process holds of the trainable parameters, their gradients (as many again) and the
    optimizer state: the local shards under FSDP2."""

    def local(t: Any) -> int:
        t = t.to_local() if hasattr(t, "to_local") else t
        return t.numel() * t.element_size() if isinstance(t, torch.Tensor) else 0

    weights = sum(local(p) for p in params)
    moments = sum(local(v) for state in optimizer.state.values() for v in state.values())
    return 2 * weights + moments


# ---- sharded checkpoints -------------------------------------------------------------------------------
def save_shards(root: torch.nn.Module, optimizer: torch.optim.Optimizer, folder: Path) -> None:
    """Each process writes its shards of the model and optimizer state into `folder` (DCP); a collective."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_state, optim_state = get_state_dict(root, optimizer)
    dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=str(folder))


def load_shards(root: torch.nn.Module, optimizer: torch.optim.Optimizer, folder: Path) -> None:
    """Read `folder` (written by any number of processes) into this process's shards; a collective."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    model_state, optim_state = get_state_dict(root, optimizer)
    dcp.load({"model": model_state, "optim": optim_state}, checkpoint_id=str(folder))  # in place
    set_state_dict(root, optimizer, model_state_dict=model_state, optim_state_dict=optim_state)
