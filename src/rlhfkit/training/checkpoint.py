"""Checkpoints that survive crashes and load without unpickling anything.

A checkpoint is a directory `checkpoints/step-00000042/` holding:
  model.safetensors    the trainable parameters (all weights, or only the LoRA adapters)
  state.safetensors    every other tensor of the training state (optimizer moments, RNG states, ...)
  state.json           everything else (step, scheduler, controller, RNG of Python/NumPy, ...), with
                       {"__tensor__": key} placeholders pointing into state.safetensors
Rank 0 writes it; the RNG and trainer state of every process go in (`rank_state`). A sharded run
(`train.sharding=fsdp2`) writes `sharded/` instead of model.safetensors: every process's shards of the
model and the optimizer state, through torch.distributed.checkpoint (`write_sharded_checkpoint`).
It is written into a temporary directory, every file and the directory are fsynced, and only then is it
renamed into place: a rename is atomic, so a crash leaves either the old set of checkpoints or the new
one, never a half-written checkpoint. Loading uses safetensors and json only (no pickle).
"""

from __future__ import annotations

import json
import re
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed
from safetensors.torch import load_file, save_file

from rlhfkit.fileio import fsync_dir, fsync_tree, saving

SHARDED_DIR = "sharded"
"""The folder of a sharded run's checkpoint that holds each process's shards (DCP) of model and optimizer."""
_STEP_DIR = re.compile(r"^step-(\d{8})$")


def flatten_state(obj: Any) -> tuple[Any, dict[str, torch.Tensor]]:
    """Split a nested state into JSON-able data and a flat dict of tensors (tuples become lists)."""
    tensors: dict[str, torch.Tensor] = {}

    def walk(value: Any, key: str) -> Any:
        if isinstance(value, torch.Tensor):
            tensors[key] = value.detach().cpu().contiguous()
            return {"__tensor__": key}
        if isinstance(value, dict):
            return {"__dict__": [[walk(k, f"{key}.k{i}"), walk(v, f"{key}.{i}")]
                                 for i, (k, v) in enumerate(value.items())]}  # fmt: skip
        if isinstance(value, list | tuple):
            return [walk(v, f"{key}.{i}") for i, v in enumerate(value)]
        if value is None or isinstance(value, bool | int | float | str):
            return value
        raise TypeError(f"cannot checkpoint a value of type {type(value).__name__} at {key}")

    return walk(obj, "s"), tensors


def unflatten_state(data: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """Inverse of flatten_state (sequences come back as lists; dict keys keep their types)."""
    if isinstance(data, dict):
        if "__tensor__" in data:
            return tensors[data["__tensor__"]]
        return {unflatten_state(k, tensors): unflatten_state(v, tensors) for k, v in data["__dict__"]}
    if isinstance(data, list):
        return [unflatten_state(v, tensors) for v in data]
    return data


def list_checkpoints(root: Path) -> list[tuple[int, Path]]:
    """Finished checkpoints under root, oldest first."""
    if not root.is_dir():
        return []
    found = []
    for child in root.iterdir():
        match = _STEP_DIR.match(child.name)
        if match and child.is_dir() and (child / "state.json").is_file():
            found.append((int(match.group(1)), child))
    return sorted(found)


def latest_checkpoint(root: Path) -> Path | None:
    found = list_checkpoints(root)
    return found[-1][1] if found else None


def write_checkpoint(
    root: Path, step: int, model_tensors: dict[str, torch.Tensor], state: dict[str, Any], keep: int
) -> Path:
    """Write checkpoint `step` atomically, then delete all but the newest `keep` checkpoints."""
    root.mkdir(parents=True, exist_ok=True)
    with saving(f"checkpoint {root / f'step-{step:08d}'}"):
        tmp = Path(tempfile.mkdtemp(prefix=f".tmp-step-{step:08d}-", dir=root))
        try:
            save_file({k: v.detach().cpu().contiguous() for k, v in model_tensors.items()},
                      str(tmp / "model.safetensors"))  # fmt: skip
            return _commit(tmp, root, step, state, keep)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)


def write_sharded_checkpoint(
    root: Path,
    step: int,
    state: dict[str, Any],
    keep: int,
    is_main: bool,
    write_shards: Callable[[Path], None],
) -> None:
    """Checkpoint `step` of a sharded run, as atomic as `write_checkpoint`: every process writes its shards
    (`write_shards(folder)`, a collective: DCP) into one temporary directory; after a barrier rank 0 adds
    the training state, fsyncs, and renames the directory into place. Every process calls it."""
    tmp = root / f".tmp-step-{step:08d}-sharded"
    with saving(f"checkpoint {root / f'step-{step:08d}'}"):
        if is_main:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        torch.distributed.barrier()
        write_shards(tmp / SHARDED_DIR)
        torch.distributed.barrier()
        if is_main:
            try:
                _commit(tmp, root, step, state, keep)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
    torch.distributed.barrier()


def _commit(tmp: Path, root: Path, step: int, state: dict[str, Any], keep: int) -> Path:
    """Add the training state to the checkpoint in `tmp`, fsync it, rename it into place, drop old ones."""
    final = root / f"step-{step:08d}"
    data, tensors = flatten_state(state)
    save_file(tensors, str(tmp / "state.safetensors"))
    (tmp / "state.json").write_text(json.dumps(data), encoding="utf-8")
    fsync_tree(tmp)
    if final.exists():  # a leftover from a run that crashed after this step: replace it
        shutil.rmtree(final)
    tmp.rename(final)
    fsync_dir(root)
    for _, old in list_checkpoints(root)[: -max(keep, 1)]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def gather_ranks(mine: Any, world: int) -> list[Any]:
    """`mine` of every process, in rank order, on every process: a collective, each process calls it (small
    objects: they are pickled, CPU tensors included)."""
    if world == 1:
        return [mine]
    gathered: list[Any] = [None] * world
    torch.distributed.all_gather_object(gathered, mine)
    return gathered


def rank_state(state: dict[str, Any], rank: int) -> dict[str, Any] | None:
    """Process `rank`'s {"rng", "extra"} (RNG states, trainer state) in a checkpoint's training state: rank
    0's at the top level, as a one-process run has them, the others' under "ranks" in rank order. None when
    the checkpoint holds none for it (written by fewer processes, or before states were kept per rank)."""
    if rank == 0:
        return state
    others = state.get("ranks") or []
    return others[rank - 1] if rank <= len(others) else None


def read_checkpoint(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(model tensors, training state) of a checkpoint directory (no model tensors in a sharded one: its
    shards are in `SHARDED_DIR`, read by `training.sharding.load_shards`)."""
    sharded = (path / SHARDED_DIR).is_dir()
    model_tensors = {} if sharded else load_file(str(path / "model.safetensors"))
    tensors = load_file(str(path / "state.safetensors"))
    state = unflatten_state(json.loads((path / "state.json").read_text(encoding="utf-8")), tensors)
    return model_tensors, state


def clean_partial(root: Path) -> None:
    """Remove temporary directories left by a crash in the middle of a checkpoint write."""
    if root.is_dir():
        for child in root.iterdir():
            if child.name.startswith(".tmp-step-"):
                shutil.rmtree(child, ignore_errors=True)


def set_aside(root: Path, first_bad: int) -> Path | None:
    """Rename the checkpoints of step >= `first_bad` to `diverged-step-...` (kept for inspection, never
    resumed from); returns the newest remaining one."""
    for step, path in list_checkpoints(root):
        if step >= first_bad:
            path.rename(path.with_name(f"diverged-{path.name}"))
    return latest_checkpoint(root)
