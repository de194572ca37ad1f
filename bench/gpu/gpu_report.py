"""results.md of the GPU check (bench/gpu/gpu_bench.py): the tables for bench/RESULTS.md, from results.json.

Besides the speed tables, the two things a first GPU run must answer: the peak GPU memory of every stage
(`torch.cuda.max_memory_allocated`, reset at each rollout variant and each trainer), and how far the
sampler's log-probs are from the trainer's (`SAMPLER_KEYS`, read from each rlhfkit run's metrics.jsonl where
the trainers log them).
"""

from __future__ import annotations

import argparse
import statistics
import sys
from typing import Any

SAMPLER_KEYS = ("mismatch_logprob_abs_mean", "mismatch_logprob_abs_max", "ratio_first_minibatch")
"""Logged by the RL trainers every iteration: mean / max |sampler log p - trainer log p| of the rollout's
tokens, and the PPO ratio of the first minibatch (1 when the two agree)."""


def gib(record: dict[str, Any]) -> str:
    """A record's peak GPU memory in GiB, "-" when it has none (the CPU rehearsal, a failed stage)."""
    return f"{record['gpu_peak_bytes'] / 2**30:.2f}" if "gpu_peak_bytes" in record else "-"


def stage_peaks(record: dict[str, Any]) -> str:
    """One line for check.log: the peak GPU memory of each part of a stage's record (variants, trainers)."""
    parts = record.get("variants", record)
    peaks = [
        f"{name} {gib(r)} GiB" for name, r in parts.items() if isinstance(r, dict) and "gpu_peak_bytes" in r
    ]
    return ", ".join(peaks) or "no GPU memory recorded"


def summary(values: list[float]) -> str:
    return f"{statistics.mean(values):.3g} ({min(values):.3g}..{max(values):.3g})" if values else "-"


def sampler_rows(res: dict[str, Any], a: argparse.Namespace) -> list[str]:
    """The sampler/trainer table: per rlhfkit trainer that logged `SAMPLER_KEYS`, over its steps."""
    lines = []
    for name, st in res["stages"].items():
        if not (name.startswith("train/") and name.endswith("/rlhfkit")):
            continue
        for trainer in a.trainers.split(","):
            logged = (st.get(trainer) or {}).get("sampler_trainer") or {}
            if not logged:
                continue
            cells = [summary(logged.get(key) or []) for key in SAMPLER_KEYS]
            steps = max(len(v) for v in logged.values())
            lines.append(f"| {name.split('/')[1]} | {trainer} | {steps} | {' | '.join(cells)} |")
    return lines


def last_line(error: Any) -> str:
    """The line of an error (a traceback tail) that says what went wrong, short enough for a table cell."""
    text = error[-1] if isinstance(error, list) and error else str(error)
    return text.strip().replace("|", "/")[:150]


def fmt(x: float | None, spec: str = ".3f") -> str:
    return "" if x is None else format(x, spec)


def markdown(res: dict[str, Any], a: argparse.Namespace) -> str:
    env = res["environment"]
    notes = [st.get("tokenizer") for n, st in res["stages"].items() if n.startswith("generate/")]
    tokenizer = next((x for x in notes if x), "unknown")
    lines = [
        f"# rlhfkit on the GPU, side by side ({res['started']})",
        "",
        "```",
        res.get("command") or " ".join(sys.argv),
        "```",
        f"{env.get('gpu', 'no GPU')}, torch {env['torch']} (CUDA {env.get('cuda')}), transformers "
        f"{env.get('transformers')}, TRL {env.get('trl')}; random-weight models, tokenizer: {tokenizer}; "
        f"inputs bench/gpu/data.",
        "",
    ]
    if "pytest_cuda" in res:
        p = res["pytest_cuda"]
        lines += [
            f"`pytest -m cuda`: exit {p['exit']}, {p['summary']}",
            *(f"- {x}" for x in p["failures"]),
            "",
        ]
    lines += [
        f"## Rollout: {a.batch} prompts x {a.new_tokens} new tokens, T 1.0, no EOS stop, bf16 on a GPU "
        f"(fp32 on the CPU), median of {a.repeats} warm runs",
        "",
        "| model | backend | s/rollout | tok/s | vs model.generate | abs Δ log p vs HF forward, mean / max "
        "| peak GPU GiB |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, st in res["stages"].items():
        if not name.startswith("generate/"):
            continue
        shape = name.split("/", 1)[1]
        if "variants" not in st:
            lines.append(f"| {shape} | failed: {last_line(st.get('error'))} | | | | | |")
            continue
        base = st["variants"].get("hf_generate", {}).get("median_s")
        mm = st.get("mismatch_vs_hf_forward", {})
        for v, r in st["variants"].items():
            if "median_s" not in r:
                lines.append(f"| {shape} | {v} | failed: {last_line(r.get('error'))} | | | | |")
                continue
            ratio = f"{base / r['median_s']:.2f}x" if base else ""
            drift = ""
            if v == st.get("auto_backend", "cuda_static") and "abs_diff_mean" in mm:
                drift = f"{mm['abs_diff_mean']:.2e} / {mm['abs_diff_max']:.2e}"
            lines.append(
                f"| {shape} | {v} | {r['median_s']:.3f} | {r['tokens_per_s']:,.0f} | {ratio} | {drift} "
                f"| {gib(r)} |"
            )
    lines += [
        "",
        f"## Training steps: medians of {a.steps} steps after {a.warmup} warm-up (s/step); rlhfkit "
        f"train.device={a.device}, train.precision={a.precision}; TRL 1.16 bf16 autocast over fp32 weights, "
        "no vLLM",
        "",
        "| model | trainer | rlhfkit s/step | TRL s/step | TRL / rlhfkit | peak GPU GiB rlhfkit / TRL |",
        "|---|---|---|---|---|---|",
    ]
    shapes = {n.split("/")[1] for n in res["stages"] if n.startswith("train/")}
    for shape in sorted(shapes, key=a.shapes.split(",").index):
        sides = {s: res["stages"].get(f"train/{shape}/{s}", {}) for s in ("rlhfkit", "trl")}
        for trainer in a.trainers.split(","):
            cells = []
            for s in ("rlhfkit", "trl"):
                r = sides[s].get(trainer) or {
                    "error": sides[s].get(
                        "error", res["stages"].get(f"train/{shape}", {}).get("error", "not run")
                    )
                }
                cells.append(r)
            med = [c.get("median_s") for c in cells]
            text = [
                fmt(m) if m is not None else "failed: " + last_line(c.get("error"))
                for m, c in zip(med, cells, strict=True)
            ]
            ratio = f"{med[1] / med[0]:.2f}x" if None not in med and med[0] else ""
            mem = " / ".join(
                fmt(c.get("gpu_peak_bytes", 0) / 2**30, ".1f") if "gpu_peak_bytes" in c else "-"
                for c in cells
            )
            lines.append(f"| {shape} | {trainer} | {text[0]} | {text[1]} | {ratio} | {mem} |")
    rows = sampler_rows(res, a)
    lines += [
        "",
        "## Sampler vs trainer (rlhfkit): mean over the logged steps (min..max)",
        "",
        "| model | trainer | steps | abs Δ log p mean | abs Δ log p max | ratio, first minibatch |",
        "|---|---|---|---|---|---|",
        *(rows or [f"| | no rlhfkit trainer logged {', '.join(SAMPLER_KEYS)} | | | | |"]),
    ]
    return "\n".join(lines) + "\n"
