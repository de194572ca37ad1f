"""Are two runs the same run? Compares every metric of every stage of two run directories, times aside.

    python bench/compare_runs.py runs/before runs/after [--tolerance 0]

Reads each `metrics.jsonl` (and `eval/*.json`) under both directories, pairs the lines by (file, step,
split) and prints every value that differs beyond `--tolerance` (absolute), every key present on one side
only, and a last line `N values compared, M differ` (paths under the two directories count as equal).
Keys that measure time or speed (seconds, per_s, step_seconds) differ from run to run and are skipped.
Exit 1 when anything differs: a refactoring that claims "the same numbers" can be checked in one command.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path


def is_timing(key: str) -> bool:
    """Keys that measure time or speed: seconds_*, step_seconds, *_per_s, *_s, elapsed, mfu."""
    last = key.rsplit(".", 1)[-1]
    return "seconds" in key or last.endswith("_s") or last in ("elapsed", "mfu")


def flatten(value: object, prefix: str = "") -> dict[str, object]:
    if isinstance(value, dict):
        out: dict[str, object] = {}
        for k, v in value.items():
            out.update(flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    return {prefix: value}


def records(root: Path) -> dict[tuple[str, object, object], dict[str, object]]:
    """(file, step, split) -> that line's values, for every metrics.jsonl and eval json under `root`."""
    found: dict[tuple[str, object, object], dict[str, object]] = {}
    for path in sorted(root.rglob("metrics.jsonl")):
        rel = str(path.relative_to(root))
        seen: dict[tuple[object, object], int] = {}
        for line in path.read_text(encoding="utf-8").splitlines():
            row = json.loads(line)
            key = (row.get("step"), row.get("split"))
            seen[key] = seen.get(key, 0) + 1  # a split logged twice at one step (eval) keeps both
            found[(rel, *key, seen[key])] = row  # type: ignore[index]
    for path in sorted(root.rglob("*.json")):
        if "checkpoint" in str(path):
            continue
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError):
            continue
        if isinstance(data, dict):
            found[(str(path.relative_to(root)), None, None)] = flatten(data)
    return found


def differs(a: object, b: object, tolerance: float, roots: tuple[str, str]) -> bool:
    if isinstance(a, str) and isinstance(b, str):  # paths inside the run directories
        return a.replace(roots[0], roots[1]) != b
    if isinstance(a, float | int) and isinstance(b, float | int) and not isinstance(a, bool):
        if math.isnan(a) and math.isnan(b):
            return False
        return abs(float(a) - float(b)) > tolerance
    return a != b


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("before", type=Path)
    parser.add_argument("after", type=Path)
    parser.add_argument("--tolerance", type=float, default=0.0)
    args = parser.parse_args()
    before, after = records(args.before), records(args.after)
    compared = bad = 0
    for key in sorted(set(before) | set(after), key=str):
        if key not in before or key not in after:
            print(f"only in {'after' if key in after else 'before'}: {key}")
            bad += 1
            continue
        a, b = before[key], after[key]
        for name in sorted(set(a) | set(b)):
            if is_timing(name):
                continue
            compared += 1
            if name not in a or name not in b:
                print(f"{key} {name}: only in {'after' if name in b else 'before'}")
                bad += 1
            elif differs(a[name], b[name], args.tolerance, (str(args.before), str(args.after))):
                print(f"{key} {name}: {a[name]} -> {b[name]}")
                bad += 1
    print(f"{compared} values compared, {bad} differ")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
