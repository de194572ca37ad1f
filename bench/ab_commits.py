"""rlhfkit against itself at another commit: did a change keep the speed? (A B A B in fresh processes.)

    .venv/bin/python bench/ab_commits.py --base e27d70c --trainers grpo,sft,rm,dpo --steps 3 --rounds 2

The rlhfkit worker (`bench/workers/rlhfkit_worker.py`, the one `side_by_side.py` runs) of `--base`
(checked out into a temporary git worktree, its own `src/` first on PYTHONPATH) and that of the working
tree run alternately, each run in a fresh process with the same model, data, threads and allocator.
Since TRL's side does not change, "the bench ratios hold" when the step times here agree. Prints the median
s/step of each side and their ratio; the records go to bench/results/ab-<date>.json.
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", required=True, help="the commit to compare the working tree with")
    parser.add_argument("--trainers", default="grpo,sft,rm,dpo")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--data-dir", default=str(REPO.parent / "shared" / "bench-data"))
    args = parser.parse_args()

    from rlhfkit.models import resolve_model

    model = resolve_model(args.model)
    results: dict[str, dict[str, list[float]]] = {}
    with tempfile.TemporaryDirectory(prefix="rlhfkit-ab-") as tmp:
        base_tree = Path(tmp) / "base"
        subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", str(base_tree), args.base],
                       check=True, capture_output=True)  # fmt: skip
        try:
            sides = {"base": base_tree, "head": REPO}  # each side runs its own worker on its own sources
            for trainer in args.trainers.split(","):
                results[trainer] = {"base": [], "head": []}
                for rnd in range(args.rounds):
                    for side, root in sides.items():
                        out = Path(tmp) / f"{trainer}-{side}-{rnd}.json"
                        worker = root / "bench" / "workers" / "rlhfkit_worker.py"
                        cmd = [sys.executable, str(worker), "--trainer", trainer,
                               "--steps", str(args.steps), "--warmup", str(args.warmup), "--out", str(out),
                               "--model", model, "--data-dir", args.data_dir]  # fmt: skip
                        env = {
                            **os.environ,
                            "PYTHONPATH": os.pathsep.join([str(root / "src"), str(root / "bench")]),
                        }
                        code, _, _ = run_child(cmd, env, Path(tmp) / f"{trainer}-{side}-{rnd}.log")
                        if code != 0:
                            log = (Path(tmp) / f"{trainer}-{side}-{rnd}.log").read_text()
                            sys.exit(f"{trainer} on {side} failed:\n{log[-2000:]}")
                        record = json.loads(out.read_text())
                        timed = record["steps"][record["warmup"] :]
                        results[trainer][side] += [step["seconds"] for step in timed]
                base, head = (statistics.median(results[trainer][s]) for s in ("base", "head"))
                ratio = head / base
                print(
                    f"{trainer}: base {base:.2f} s/step, head {head:.2f} s/step, head/base {ratio:.3f}",
                    flush=True,
                )
        finally:
            subprocess.run(
                ["git", "-C", str(REPO), "worktree", "remove", "--force", str(base_tree)], check=False
            )
    stamp = dt.datetime.now().strftime("%Y-%m-%d-%H%M")
    out = BENCH / "results" / f"ab-{stamp}.json"
    out.write_text(json.dumps({"base": args.base, "args": vars(args), "step_seconds": results}, indent=1))
    print(f"records: {out}")


if __name__ == "__main__":
    main()
