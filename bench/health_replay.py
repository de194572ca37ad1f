"""Replay the RL health checks over logged runs: which check fires at which iteration, for given settings.

    python bench/health_replay.py runs/pipeline/rl /tmp/other/rl --set window=4 --set window=8

Each run's metrics.jsonl (its "train" rows) goes through `training.health.HealthMonitor` as the trainer
fed it, once per settings variant (`--set KEY=VALUE` of `train.health`, one variant each; none: the
defaults), so thresholds are calibrated on real runs without training again. Prints, per run and variant,
the checks that fired with their first iteration and count, and the largest agreement drop seen while the
reward rose (the reward-hacking statistic).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

from rlhfkit.training.health import HealthConfig, HealthMonitor


def replay(rows: list[dict], cfg: HealthConfig) -> tuple[dict[str, list[int]], float]:
    monitor = HealthMonitor(cfg)
    fired: dict[str, list[int]] = {}
    worst = 0.0
    for i, row in enumerate(rows, start=1):
        for check in monitor.check(row):
            fired.setdefault(check, []).append(i)
        history = monitor.history
        if len(history) == cfg.window:
            half = cfg.window // 2
            rise = sum(h["score"] for h in history[-half:]) - sum(h["score"] for h in history[:half])
            drop = (
                sum(h["agreement"] for h in history[:half]) - sum(h["agreement"] for h in history[-half:])
            ) / half
            if rise > 0:
                worst = max(worst, drop)
    return fired, worst


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path, help="RL run directories (with metrics.jsonl)")
    parser.add_argument("--set", dest="sets", action="append", default=[], help="one variant: KEY=VALUE")
    args = parser.parse_args()
    variants = [("defaults", HealthConfig())]
    for spec in args.sets:
        key, _, value = spec.partition("=")
        field = {f.name: f for f in dataclasses.fields(HealthConfig)}[key]
        variants.append(
            (
                spec,
                dataclasses.replace(
                    HealthConfig(), **{key: type(getattr(HealthConfig(), field.name))(value)}
                ),
            )
        )
    for run in args.runs:
        lines = (run / "metrics.jsonl").read_text().splitlines()
        rows = [r for r in map(json.loads, lines) if r.get("split") == "train"]
        for name, cfg in variants:
            fired, worst = replay(rows, cfg)
            what = ", ".join(f"{c} at {its[0]} ({len(its)}x)" for c, its in fired.items()) or "nothing fired"
            print(
                f"{run} [{name}] {len(rows)} iterations: {what}; max agreement drop, reward up: {worst:.3f}"
            )


if __name__ == "__main__":
    main()
