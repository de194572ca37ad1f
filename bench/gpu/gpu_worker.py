"""One side of the GPU side-by-side: several trainers in one process, each through the CPU bench's worker.

    python bench/gpu/gpu_worker.py --side rlhfkit --trainers sft,rm,dpo,grpo --device cuda --precision auto \
        --model /tmp/gpu-models/smollm2-135m --data-dir bench/gpu/data --steps 8 --warmup 1 --out-dir /tmp/w

The trainers, their settings and the per-step timing are exactly those of `bench/workers/rlhfkit_worker.py`
and `bench/workers/trl_worker.py` (see their docstrings); this wrapper only moves them to the GPU:

* rlhfkit: ``train.device`` / ``train.precision`` added to the `train` section every worker builds (the
  same as ``--set train.device=cuda --set train.precision=auto`` on the command line).
* TRL: ``use_cpu=False`` and ``bf16=True`` (TRL's own default; fp32 master weights under bf16 autocast,
  the model loaded in float32 as on the CPU bench) unless ``--precision fp32``.

One process per side runs every trainer in turn (a python + torch + TRL start is ~10 s, a quarter of the
check's budget); a trainer that fails writes its error and the next one runs. Each trainer's JSON gets the
peak GPU memory of its run (reset before it) and, on the rlhfkit side, the sampler/trainer mismatch its run
logged in metrics.jsonl (`gpu_report.SAMPLER_KEYS`, one value per step, as "sampler_trainer").

Timing note: a step's seconds are the CPU's wall time between the loop's (or TRL's callback's) step
boundaries; both sides read a loss or metric back every step, which waits for the GPU, so over consecutive
steps the medians are GPU time too.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import torch

BENCH = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(BENCH), str(BENCH / "workers"), str(BENCH / "gpu")]
from gpu_report import SAMPLER_KEYS  # noqa: E402

LOGGED: dict[str, list[float]] = {}
"""`SAMPLER_KEYS` of the running rlhfkit trainer's metrics.jsonl, per step (read after every step: the run's
directory is a temporary one, gone when the worker returns)."""


def read_logged(metrics: Path) -> dict[str, list[float]]:
    rows = [json.loads(x) for x in metrics.read_text().splitlines()] if metrics.is_file() else []
    rows = [r for r in rows if r.get("split") == "train"]
    return {k: [r[k] for r in rows if k in r] for k in SAMPLER_KEYS if any(k in r for r in rows)}


def patch_rlhfkit(device: str, precision: str) -> None:
    import rlhfkit_worker

    from rlhfkit.training.settings import TrainConfig

    names = {f.name for f in dataclasses.fields(TrainConfig)}
    extra = {k: v for k, v in (("device", device), ("precision", precision)) if k in names}
    if device != "cpu" and "device" not in extra:
        raise SystemExit("this rlhfkit has no train.device setting: it cannot train on the GPU yet")
    original = rlhfkit_worker.train_base

    def train_base(*args: object) -> dict:
        return {**original(*args), **extra}

    rlhfkit_worker.train_base = train_base
    for name, build in list(rlhfkit_worker.BUILDERS.items()):

        def logged_build(args: Any, out: str, total: int, rec: Any, build: Any = build) -> Any:
            trainer = build(args, out, total, rec)
            trainer.callbacks.append(
                lambda loop, metrics: LOGGED.update(read_logged(Path(out) / "metrics.jsonl"))
            )
            return trainer

        rlhfkit_worker.BUILDERS[name] = logged_build


def patch_trl(device: str, precision: str) -> None:
    import trl_worker

    original = trl_worker.common_args

    def common_args(*args: object) -> dict:
        out = original(*args)
        if device != "cpu":
            out.update(use_cpu=False, bf16=precision != "fp32")
        return out

    trl_worker.common_args = common_args


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--side", choices=["rlhfkit", "trl"], required=True)
    ap.add_argument("--trainers", default="sft,rm,dpo,grpo")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--precision", default="auto")
    ap.add_argument("--model", required=True)
    ap.add_argument("--data-dir", required=True)
    ap.add_argument("--max-length", type=int, default=256)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--threads", type=int, default=4)
    ap.add_argument("--out-dir", required=True)
    args = ap.parse_args()
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if args.side == "rlhfkit":
        patch_rlhfkit(args.device, args.precision)
        import rlhfkit_worker as worker
    else:
        patch_trl(args.device, args.precision)
        import trl_worker as worker
    cuda = args.device == "cuda" and torch.cuda.is_available()
    for trainer in [t for t in args.trainers.split(",") if t]:
        out = out_dir / f"{trainer}-{args.side}.json"
        sys.argv = [
            f"{args.side}_worker.py",
            *("--trainer", trainer, "--steps", str(args.steps), "--warmup", str(args.warmup)),
            *("--model", args.model, "--data-dir", args.data_dir, "--max-length", str(args.max_length)),
            *("--threads", str(args.threads), "--out", str(out)),
        ]
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        LOGGED.clear()
        t0 = time.perf_counter()
        print(f"== {args.side} {trainer}", flush=True)
        try:
            worker.main()
            record = json.loads(out.read_text())
        except BaseException as exc:  # a failed trainer is reported; the next one still runs
            if isinstance(exc, KeyboardInterrupt):
                raise
            tail = traceback.format_exc().strip().splitlines()[-6:]
            print("\n".join(tail), flush=True)
            record = {"error": tail}
        record["wall_seconds"] = time.perf_counter() - t0
        if LOGGED:
            record["sampler_trainer"] = dict(LOGGED)
        if cuda:
            torch.cuda.synchronize()
            record["gpu_peak_bytes"] = torch.cuda.max_memory_allocated()
        out.write_text(json.dumps(record, indent=1))
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
