"""rlhfkit's training step on a machine another process is using: is the slowdown proportional to the CPU
taken, or several-fold (issue 20)? A B A B in fresh processes, the same worker as `side_by_side.py`.

    .venv/bin/python bench/contention.py --trainer sft --steps 4 --rounds 2

Conditions, each run in a fresh worker process:
  quiet            nothing else runs
  busy             one CPU-bound Python process (a busy loop) runs beside the worker all the time
and the worker's thread setting in each (`--settings`): 2 threads with libgomp's default wait policy (spin
300,000 rounds, then sleep), with OMP_WAIT_POLICY=PASSIVE (sleep at once) or a shorter GOMP_SPINCOUNT, and 1
thread. On 2 cores a busy neighbour takes one
core's worth, so a fair slowdown of a 2-thread step is about 2x at most (1.33x if the step is only 2/3
parallel); a spin-waiting team whose peer thread is descheduled can lose far more.
Prints the median s/step of every (condition, setting) and the ratio busy/quiet; JSON to bench/results/.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from common import REPO, run_child

BENCH = REPO / "bench"
SETTINGS = {
    "2 threads, default wait": (2, {}),
    "2 threads, OMP_WAIT_POLICY=PASSIVE": (2, {"OMP_WAIT_POLICY": "PASSIVE"}),
    "1 thread": (1, {}),
    "2 threads, GOMP_SPINCOUNT=10000": (2, {"GOMP_SPINCOUNT": "10000"}),
    "2 threads, GOMP_SPINCOUNT=100000": (2, {"GOMP_SPINCOUNT": "100000"}),
}


def run_worker(
    trainer: str, threads: int, env_extra: dict[str, str], args: argparse.Namespace, tmp: Path
) -> list[float]:
    out = tmp / f"{trainer}-{threads}-{len(list(tmp.iterdir()))}.json"
    cmd = [sys.executable, str(BENCH / "workers" / "rlhfkit_worker.py"), "--trainer", trainer,
           "--steps", str(args.steps), "--warmup", str(args.warmup), "--out", str(out), "--model", args.model,
           "--data-dir", args.data_dir, "--threads", str(threads)]  # fmt: skip
    env = {**os.environ, **env_extra, "PYTHONPATH": os.pathsep.join([str(REPO / "src"), str(BENCH)])}
    code, _, _ = run_child(cmd, env, out.with_suffix(".log"))
    if code != 0:
        sys.exit(f"worker failed:\n{out.with_suffix('.log').read_text()[-2000:]}")
    record = json.loads(out.read_text())
    return [step["seconds"] for step in record["steps"][record["warmup"] :]]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trainer", default="sft", choices=["sft", "rm", "dpo", "grpo", "ppo"])
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--data-dir", default=str(REPO.parent / "shared" / "bench-data"))
    parser.add_argument("--settings", nargs="*", default=list(SETTINGS)[:3], help=f"of {list(SETTINGS)}")
    args = parser.parse_args()

    from rlhfkit.models.loading import resolve_model

    args.model = resolve_model(args.model)
    times: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory(prefix="rlhfkit-contention-") as tmp:
        for _ in range(args.rounds):
            for condition in ("quiet", "busy"):
                neighbour = None
                if condition == "busy":  # a CPU-bound process beside the worker, the whole run long
                    neighbour = subprocess.Popen([sys.executable, "-c", "while True: pass"])
                try:
                    for name in args.settings:
                        threads, env = SETTINGS[name]
                        key = f"{condition} | {name}"
                        times.setdefault(key, []).extend(
                            run_worker(args.trainer, threads, env, args, Path(tmp))
                        )
                        print(f"{key}: {statistics.median(times[key]):.2f} s/step so far", flush=True)
                finally:
                    if neighbour is not None:
                        neighbour.kill()
                        neighbour.wait()
    print(f"\n{args.trainer}, median s/step over {args.rounds} rounds x {args.steps} steps")
    for name in args.settings:
        quiet, busy = (statistics.median(times[f"{c} | {name}"]) for c in ("quiet", "busy"))
        print(f"  {name:36s} quiet {quiet:7.2f}  busy {busy:7.2f}  busy/quiet {busy / quiet:5.2f}")
    stamp = dt.datetime.now().strftime("%Y-%m-%d-%H%M")
    path = BENCH / "results" / f"contention-{args.trainer}-{stamp}.json"
    path.write_text(json.dumps({"args": vars(args), "step_seconds": times}, indent=1))
    print(f"records: {path}")


if __name__ == "__main__":
    main()
