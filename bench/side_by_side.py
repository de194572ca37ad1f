"""rlhfkit against Hugging Face TRL, side by side on one machine: SFT, RM, DPO, GRPO, PPO and generation.

    .venv/bin/python bench/side_by_side.py                       # everything: ~1.5 h on the 2-core machine
    .venv/bin/python bench/side_by_side.py --trainers sft,dpo --steps 4 --rounds 2
    .venv/bin/python bench/side_by_side.py --model tiny-llama --steps 1 --warmup 0 --rounds 1   # smoke test

For each trainer, the rlhfkit worker (this venv) and the TRL worker (TRL's own venv) run alternately,
A B A B, `--rounds` times, each in a FRESH process (so peak RSS and allocator state are per side), each
doing `--warmup` untimed and `--steps` timed optimizer steps with the same data (shared/bench-data), model,
float32, 2 threads, batch sizes, lengths, group size and completion length (`common.SETTINGS`; the TRL
side's settings are listed in workers/trl_worker.py). Both run under the same allocator (`--allocator`).

TRL is installed here, never into the project: bench/.venv-trl holds trl==1.16.0 (the release
shared/ANCHORS.md measured), bench/.venv-trl-ppo trl==1.12.0 (the last release with PPO, in
trl.experimental; 1.16.0 has none), both with this venv's torch and transformers versions.

Reported per trainer and side (medians over every timed step of every round):
  s/step        seconds per optimizer step (GRPO/PPO: generation, scoring, reference and updates included)
  TRL/rlhfkit   ratio of the two s/step medians; "per token": the same for seconds per real token, since
                the two sides' batches differ in length (rlhfkit groups examples by length, TRL shuffles)
  tok/s         real (non-padding) tokens processed per second: prompt + answer tokens of the batch
  MFU           "6N" FLOPs of the work the side did (common.step_flops, minimal=False: its passes over the
                tokens it processed, the output layer on every one of them; rlhfkit runs each shared prompt
                once, TRL every row in full) per second, over the fp32 2048^3 matmul peak measured in this
                run (the higher of a measurement before and after the workers)
  floor         the fewest FLOPs the step must do (common.step_flops, minimal=True: forward/backward passes
                over the prefix trie of the step's sequences, so a prompt several rows share counts once;
                the output layer only where a log-prob is needed; each distinct prompt prefilled once for
                generation; generation, reference, value/reward and training passes) in seconds at the
                measured peak, the same definition for both sides; "% of floor" = floor / actual step
                time, i.e. how close the side is to the machine's limit
  peak RSS      maximum resident memory of the worker process (wait4), model loading included
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import json
import os
import statistics
import subprocess
import sys
import tempfile
from importlib import metadata
from pathlib import Path
from typing import Any

import torch
from common import REPO, SETTINGS, LlamaShape, load_average, matmul_peak, run_child, step_flops

from rlhfkit.allocator import KEEP

BENCH = REPO / "bench"
TRAINERS = ("sft", "rm", "dpo", "grpo", "ppo", "generate")
TRL_VERSION = "1.16.0"  # shared/ANCHORS.md
TRL_PPO_VERSION = "1.12.0"  # the last release with PPO (trl.experimental.ppo)
JEMALLOC = "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2"


def venv_for(trainer: str) -> tuple[Path, str]:
    if trainer == "ppo":
        return BENCH / ".venv-trl-ppo", TRL_PPO_VERSION
    return BENCH / ".venv-trl", TRL_VERSION


def ensure_trl_venv(path: Path, trl_version: str) -> None:
    """Create `path` with this venv's torch and transformers and the given TRL, unless it already is."""
    torch_version = metadata.version("torch").split("+")[0]  # the local CPU wheel, not a CUDA build
    specs = [
        f"torch=={torch_version}",
        f"transformers=={metadata.version('transformers')}",
        f"trl=={trl_version}",
    ]
    marker = path / "bench-installed.txt"
    if marker.is_file() and marker.read_text().split() == specs:
        return
    print(f"setting up {path.relative_to(REPO)}: {' '.join(specs)} (once)", flush=True)
    python = path / "bin" / "python"
    pip = [str(python), "-m", "pip", "install", "--quiet"]
    for cmd in (["python3", "-m", "venv", str(path)], [*pip, specs[0]], [*pip, *specs]):
        result = subprocess.run(cmd, capture_output=True, text=True)
        if result.returncode:
            tail = "\n".join(result.stderr.strip().splitlines()[-5:])
            raise SystemExit(f"setting up {path} failed: {' '.join(cmd)}\n{tail}")
    marker.write_text("\n".join(specs) + "\n")


# glibc malloc keeping freed memory: the thresholds rlhfkit.allocator.keep_freed_memory sets with mallopt
KEEP_ENV = {"MALLOC_MMAP_THRESHOLD_": str(KEEP), "MALLOC_TRIM_THRESHOLD_": str(KEEP)}


def child_env(allocator: str, jemalloc: str) -> dict[str, str]:
    """The environment of every worker: same threads and allocator on both sides, offline hub."""
    dropped = ("PYTHONPATH", "LD_PRELOAD", "MALLOC_CONF", "RLHFKIT_MALLOC", *KEEP_ENV)
    env = {k: v for k, v in os.environ.items() if k not in dropped}
    threads = str(SETTINGS.threads)
    env.update(
        OMP_NUM_THREADS=threads,
        MKL_NUM_THREADS=threads,
        TOKENIZERS_PARALLELISM="false",
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        PYTHONUNBUFFERED="1",
    )
    if allocator == "keep":  # what rlhfkit sets for itself (rlhfkit.allocator), given to TRL alike
        env.update(KEEP_ENV)
    elif allocator == "default":  # plain glibc on both sides: rlhfkit must not tune its own process
        env.update(RLHFKIT_MALLOC="system")
    elif allocator == "jemalloc":
        if not Path(jemalloc).is_file():
            raise SystemExit(f"--allocator jemalloc: no {jemalloc}; install libjemalloc2 or give --jemalloc")
        # never return memory to the OS (shared/ANCHORS.md): no page faults on the re-allocated logits
        env.update(LD_PRELOAD=jemalloc, MALLOC_CONF="dirty_decay_ms:-1,muzzy_decay_ms:-1")
    return env


def run_worker(side: str, trainer: str, args: argparse.Namespace, env: dict[str, str], work: Path) -> dict:
    """One measurement in a fresh process; its JSON, plus the peak RSS from wait4 and the load average."""
    if side == "rlhfkit":
        python, script = sys.executable, BENCH / "workers" / "rlhfkit_worker.py"
    else:
        python, script = str(venv_for(trainer)[0] / "bin" / "python"), BENCH / "workers" / "trl_worker.py"
    out = work / f"{trainer}-{side}-{len(list(work.iterdir()))}.json"
    options = {
        "trainer": trainer,
        "steps": args.steps,
        "warmup": args.warmup,
        "model": args.model_dir,
        "data-dir": args.data_dir,
        "max-length": args.max_length,
        "out": out,
    }
    cmd = [
        python,
        str(script),
        *(part for key, value in options.items() for part in (f"--{key}", str(value))),
    ]
    load = load_average()
    code, max_rss, seconds = run_child(cmd, env, out.with_suffix(".log"))
    if code != 0 or not out.is_file():
        tail = out.with_suffix(".log").read_text().strip().splitlines()[-8:]
        print(f"  {side} {trainer} FAILED (exit {code}):\n    " + "\n    ".join(tail), flush=True)
        return {"side": side, "trainer": trainer, "error": tail, "load": load}
    record = json.loads(out.read_text())
    record.update(max_rss=max_rss, wall_seconds=seconds, load=load)
    timed = [s["seconds"] for s in record["steps"][record["warmup"] :]]
    print(
        f"  {side:7s} {trainer}: {', '.join(f'{t:.2f}' for t in timed)} s/step "
        f"(load {load:.1f}, {max_rss / 2**30:.2f} GiB, {seconds:.0f} s wall)",
        flush=True,
    )
    return record


def summarize(trainer: str, runs: list[dict], shape: LlamaShape, peak: float) -> dict[str, Any]:
    """Medians over every timed step of every run of one side."""
    steps = [s for r in runs if "steps" in r for s in r["steps"][r["warmup"] :]]
    if not steps:
        return {"error": next((r.get("error") for r in runs), "no run")}
    seconds = [s["seconds"] for s in steps]
    key = "new_tokens" if trainer == "generate" else "real_tokens"
    tokens = [s[key] * (s["rows"] if trainer == "generate" else 1) for s in steps]
    floor = [step_flops(trainer, shape, s, minimal=True) for s in steps]
    model = [step_flops(trainer, shape, s, minimal=False) for s in steps]
    out: dict[str, Any] = {
        "steps": len(steps),
        "s_per_step": statistics.median(seconds),
        "all_seconds": seconds,
        "tokens_per_step": statistics.median(tokens),
        "tokens_per_s": statistics.median(t / s for t, s in zip(tokens, seconds, strict=True)),
        "seconds_per_token": statistics.median(s / t for t, s in zip(tokens, seconds, strict=True)),
        "mfu": statistics.median(f / s for f, s in zip(model, seconds, strict=True)) / (peak * 1e9),
        "floor_seconds": statistics.median(floor) / (peak * 1e9),
        "of_floor": statistics.median(f / s for f, s in zip(floor, seconds, strict=True)) / (peak * 1e9),
        "peak_rss": max(r["max_rss"] for r in runs if "max_rss" in r),
        "padded_tokens": statistics.median(s.get("padded_tokens", 0) for s in steps),
        "setup_seconds": statistics.median(r["setup_seconds"] or 0 for r in runs if "steps" in r),
        "versions": next(r["versions"] for r in runs if "versions" in r),
        "optimizer": next(r.get("optimizer") for r in runs if "steps" in r),
    }
    for extra in ("reference_seconds", "reference_pairs"):
        values = [r[extra] for r in runs if extra in r]
        if values:
            out[extra] = statistics.median(values)
    return out


NOTES = {
    "sft": "batch 8, max length {max_length}, completion-only loss, no packing",
    "rm": "8 pairs, max length {max_length}",
    "dpo": "8 pairs, max length {max_length}, beta 0.1; TRL: a separate reference model run every step "
    "(no precompute); rlhfkit: reference log-probs computed once for the data set before training",
    "grpo": "8 prompts x 4 generations, 64 tokens each (EOS stopping off on both sides), T 1.0, loss dapo, "
    "beta 0.04 (reference run), length reward (no reward model)",
    "ppo": "16 rollouts x 64 tokens, T 0.7, kl 0.05, 4 epochs x 1 minibatch; reward and value models from "
    "the same checkpoint; TRL side: TRL 1.12.0 trl.experimental.ppo (1.16.0 has no PPO)",
    "generate": "32 prompts x 64 new tokens, T 1.0, no EOS stop; TRL side: plain `model.generate` "
    "(what TRL's GRPO calls without vLLM), rlhfkit side: RolloutEngine",
}


def table(results: dict[str, dict[str, dict]]) -> list[str]:
    head = (
        "| trainer | side | s/step (median) | TRL/rlhfkit s/step | per token | tok/step | tok/s | MFU | "
        "floor s | % of floor | peak RSS |"
    )
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for trainer, sides in results.items():
        ours, theirs = sides.get("rlhfkit", {}), sides.get("trl", {})
        for side, r in (("rlhfkit", ours), ("trl", theirs)):
            label = "TRL " + r["versions"]["trl"] if side == "trl" and "versions" in r else side
            if "s_per_step" not in r:
                lines.append(f"| {trainer} | {label} | failed | | | | | | | | |")
                continue
            ratio = per_token = ""
            if side == "trl" and "s_per_step" in ours:
                ratio = f"{r['s_per_step'] / ours['s_per_step']:.2f}x"
                per_token = f"{r['seconds_per_token'] / ours['seconds_per_token']:.2f}x"
            lines.append(
                f"| {trainer} | {label} | {r['s_per_step']:.2f} (n={r['steps']}) | {ratio} | {per_token} | "
                f"{r['tokens_per_step']:,.0f} | {r['tokens_per_s']:,.0f} | {r['mfu']:.0%} | "
                f"{r['floor_seconds']:.2f} | {r['of_floor']:.0%} | {r['peak_rss'] / 2**30:.2f} GiB |"
            )
        if "reference_seconds" in ours:  # DPO: the one-off reference pass, amortised over an epoch
            per_step = ours["reference_seconds"] * SETTINGS.batch_size / max(ours["reference_pairs"], 1)
            total = ours["s_per_step"] + per_step
            ratio = f"{theirs['s_per_step'] / total:.2f}x" if "s_per_step" in theirs else ""
            once = f"{ours['reference_seconds']:.1f} s once for {ours['reference_pairs']:.0f} pairs"
            lines.append(
                f"| {trainer} | rlhfkit + reference pass amortised ({once}) | {total:.2f} | {ratio} |"
            )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trainers", default=",".join(TRAINERS), help=f"comma-separated, of {TRAINERS}")
    parser.add_argument("--steps", type=int, default=4, help="timed optimizer steps per run")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps at the start of each run")
    parser.add_argument("--rounds", type=int, default=2, help="A B rounds per trainer")
    parser.add_argument(
        "--model",
        default="smollm2-135m-instruct",
        help="registered name (e.g. tiny-llama for a smoke test) or model directory",
    )
    parser.add_argument(
        "--max-length",
        type=int,
        default=SETTINGS.max_length,
        help="SFT/RM/DPO length limit; a character-level tiny model needs ~1024",
    )
    parser.add_argument("--data-dir", default=str(REPO.parent / "shared" / "bench-data"))
    parser.add_argument(
        "--allocator",
        choices=["keep", "default", "jemalloc"],
        default="keep",
        help="the same for both sides: glibc keeping freed memory (rlhfkit's own setting), plain glibc, "
        "or jemalloc never returning memory",
    )
    parser.add_argument("--jemalloc", default=JEMALLOC, help="path of libjemalloc.so.2")
    parser.add_argument("--out-dir", default=str(BENCH / "results"))
    args = parser.parse_args()
    trainers = [t.strip() for t in args.trainers.split(",") if t.strip()]
    unknown = sorted(set(trainers) - set(TRAINERS))
    if unknown:
        raise SystemExit(f"--trainers: unknown {unknown}; choose from {', '.join(TRAINERS)}")
    torch.set_num_threads(SETTINGS.threads)
    from rlhfkit.models.loading import resolve_model

    args.model_dir = resolve_model(args.model)  # converts the embedded default once; TRL loads the same dir
    shape = LlamaShape.from_dir(args.model_dir)
    for path, version in sorted({venv_for(t) for t in trainers}):
        ensure_trl_venv(path, version)
    env = child_env(args.allocator, args.jemalloc)

    start = dt.datetime.now()
    peak_before = matmul_peak()
    print(
        f"model {args.model} ({args.model_dir}), allocator {args.allocator}, {SETTINGS.threads} threads; "
        f"matmul peak {peak_before:.0f} GFLOP/s; load {load_average():.1f}",
        flush=True,
    )
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = out_dir / f"side_by_side-{start:%Y-%m-%d-%H%M}"
    summary: dict[str, Any] = {
        "argv": sys.argv,
        "model_dir": args.model_dir,
        "allocator": args.allocator,
        "settings": dataclasses.asdict(SETTINGS),
        "peak_gflops": [peak_before],
    }
    runs: dict[str, dict[str, list[dict]]] = {t: {"rlhfkit": [], "trl": []} for t in trainers}
    summary["runs"] = runs
    with tempfile.TemporaryDirectory(prefix="side-by-side-") as tmp:
        work = Path(tmp)
        for trainer in trainers:
            print(f"{trainer}:", flush=True)
            for _ in range(args.rounds):
                for side in ("rlhfkit", "trl"):
                    runs[trainer][side].append(run_worker(side, trainer, args, env, work))
                    stem.with_suffix(".json").write_text(json.dumps(summary, indent=1))  # kept if we stop
    peak_after = matmul_peak()
    peak = max(peak_before, peak_after)
    summary["peak_gflops"].append(peak_after)
    loads = [r["load"] for sides in runs.values() for rs in sides.values() for r in rs]
    results = {
        t: {side: summarize(t, side_runs, shape, peak) for side, side_runs in sides.items()}
        for t, sides in runs.items()
    }

    optimizers = {
        f"{side} {r['optimizer']}"
        for t in results.values()
        for side, r in t.items()
        if r.get("optimizer") not in (None, "-")
    }
    lines = [
        f"# rlhfkit vs TRL, side by side ({start:%Y-%m-%d %H:%M})",
        "",
        "```",
        " ".join(["python", *sys.argv]),
        "```",
        f"Model {args.model} (float32), {SETTINGS.threads} threads, allocator {args.allocator}, "
        f"{args.warmup} warm-up + {args.steps} timed steps per run, {args.rounds} round(s) A B per trainer, "
        f"each run a fresh process. fp32 matmul peak {peak_before:.0f} GFLOP/s before, {peak_after:.0f} "
        f"after (MFU and floors use {peak:.0f}); load average {min(loads):.1f}-{max(loads):.1f} at the "
        "runs' starts.",
        "",
        *table(results),
        "",
        "Settings (both sides):",
        *(f"- {t}: {NOTES[t].format(max_length=args.max_length)}" for t in trainers),
        "- optimizers: " + "; ".join(sorted(optimizers)),
    ]
    text = "\n".join(lines) + "\n"
    print("\n" + text)
    stem.with_suffix(".md").write_text(text)
    summary["results"] = results
    stem.with_suffix(".json").write_text(json.dumps(summary, indent=1))
    print(f"written: {stem}.md and .json")


if __name__ == "__main__":
    main()
