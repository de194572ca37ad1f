"""RL health: the ways an RL run goes wrong while its loss looks fine, watched every iteration.

A supervised loss that explodes is caught by the loop's divergence guard; an RL surrogate loss may
legitimately sit near zero or go negative, so RL runs need other signals. `HealthMonitor` reads quantities
the trainers already log each iteration and compares them with the run's own start (its first iteration):

  check       fires when                                                     metric read
  entropy     policy entropy < `entropy_floor` x its start value (collapse)  entropy
  kl          KL to the reference > `kl_max`, or grows by > `kl_rate` in     kl (per answer, nats)
              one iteration (blow-up)
  looping     the share of samples that repeat a token n-gram (within one    repeat_share
              answer or turn) rises by more than `repeat_rise` above its
              start
  unfinished  the share of samples that never reach EOS rises by more than  eos_rate
              `unfinished_rise` above its start
  length      the mean answer length leaves [start / length_factor,           answer_length
              start x length_factor]
  hacking     over the last `window` iterations the reward rises while the   score,
              reward model's agreement with fresh labels falls by more than   rm_online_accuracy
              `agreement_drop` (online feedback only: nothing else has
              fresh labels)

`train.health.action` says what firing does: "warn" prints one line the first time a check fires, marks
`health_<check>` = 1 in that iteration's metrics (and every later one while it still fires), and the
report says so; "stop" ends the run with one line (exit 2) naming the last good checkpoint: the iteration
that fired is not saved, and `--resume-with-changes` continues from that checkpoint with other settings.
The monitor's start values, recent history and events are checkpointed, so a resumed run judges as the
whole run would have; OUTPUT/health.json holds the thresholds and events for the report.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal, TypeGuard

import torch

from rlhfkit.config import setting

CHECKS = ("entropy", "kl", "looping", "unfinished", "length", "hacking")
HEALTH_FILE = "health.json"


@dataclass
class HealthConfig:
    """RL health checks (see `training.health`); each threshold is relative to the run's first iteration."""

    enabled: bool = True
    """Watch every RL iteration (PPO, GRPO, RLOO, `grpo --env`)."""
    action: Literal["warn", "stop"] = "warn"
    """What a firing check does: one warning line and a mark in metrics and the report, or stop (exit 2)
    keeping the last good checkpoint."""
    entropy_floor: float = setting(0.2, ge=0, le=1)
    """Entropy collapse: policy entropy below this fraction of its start value."""
    kl_max: float = setting(10.0, gt=0)
    """KL blow-up: KL to the reference (nats per answer) above this."""
    kl_rate: float = setting(3.0, gt=0)
    """KL blow-up: KL rising by more than this (nats per answer) in one iteration."""
    repeat_ngram: int = setting(4, ge=2)
    """Looping: a sample loops when some run of this many tokens occurs `repeat_count` times in it."""
    repeat_count: int = setting(3, ge=2)
    """Looping: occurrences of the same n-gram that make a sample a loop."""
    repeat_rise: float = setting(0.25, gt=0, le=1)
    """Looping: the share of looping samples rising this much above its start."""
    unfinished_rise: float = setting(0.25, gt=0, le=1)
    """The share of samples that never reach EOS rising this much above its start."""
    length_factor: float = setting(3.0, gt=1)
    """Mean answer length more than this factor above or below its start."""
    window: int = setting(8, ge=2)
    """Reward hacking: iterations compared (first half against second half). The agreement of one
    iteration's few groups is noisy (sd about 0.1 on the pipeline's 8 groups), so halves of 4 iterations
    keep a 0.15 drop about two standard deviations from chance (replayed on logged runs: bench/RESULTS.md)."""
    agreement_drop: float = setting(0.15, gt=0, le=1)
    """Reward hacking: the reward model's agreement with fresh labels falling this much over the window
    while the reward rises."""


def repeat_share(ids: torch.Tensor, mask: torch.Tensor, n: int, count: int) -> float:
    """Share of rows (B,) in which one run of masked tokens (B, T) contains some n-gram at least `count`
    times. A run is an answer, or one assistant turn of an agent episode (observations are masked out):
    a tool call's syntax said once a turn is no loop, the same phrase three times in one turn is."""
    loops = 0
    for row, m in zip(ids.tolist(), mask.bool().tolist(), strict=True):
        runs: list[list[int]] = [[]]
        for token, keep in zip(row, m, strict=True):
            if keep:
                runs[-1].append(token)
            elif runs[-1]:
                runs.append([])
        loops += any(_repeats(tokens, n, count) for tokens in runs)
    return loops / max(len(ids), 1)


def _repeats(tokens: list[int], n: int, count: int) -> bool:
    seen: dict[tuple[int, ...], int] = {}
    for i in range(len(tokens) - n + 1):
        gram = tuple(tokens[i : i + n])
        seen[gram] = seen.get(gram, 0) + 1
        if seen[gram] >= count:
            return True
    return False


def _finite(value: Any) -> TypeGuard[float]:
    return isinstance(value, int | float) and math.isfinite(value)


class HealthMonitor:
    """Judges each iteration's metrics against the run's start; see the module docstring."""

    def __init__(self, cfg: HealthConfig) -> None:
        self.cfg = cfg
        self.start: dict[str, float] = {}  # first finite value of each watched metric
        self.last: dict[str, float] = {}  # previous iteration's value (KL rate)
        self.history: list[dict[str, float]] = []  # the last `window` iterations' score and agreement
        self.events: dict[str, dict[str, Any]] = {}  # check -> first and last iteration it fired, count, text

    def thresholds(self) -> dict[str, float]:
        """The limits as values of the metrics, for the report's plots (once the start is known)."""
        c, s = self.cfg, self.start
        out = {"kl": c.kl_max}
        if "entropy" in s:
            out["entropy"] = c.entropy_floor * s["entropy"]
        if "repeat_share" in s:
            out["repeat_share"] = min(1.0, s["repeat_share"] + c.repeat_rise)
        if "eos_rate" in s:
            out["eos_rate"] = max(0.0, s["eos_rate"] - c.unfinished_rise)
        if "answer_length" in s:
            out["answer_length_low"] = s["answer_length"] / c.length_factor
            out["answer_length_high"] = s["answer_length"] * c.length_factor
        return out

    def check(self, metrics: dict[str, float]) -> dict[str, str]:
        """{check: what is wrong} for the checks that fire on this iteration's metrics."""
        c = self.cfg
        for key in ("entropy", "repeat_share", "eos_rate", "answer_length"):
            if key not in self.start and _finite(metrics.get(key)):
                self.start[key] = float(metrics[key])
        fired: dict[str, str] = {}
        s, m = self.start, metrics
        if _finite(ent := m.get("entropy")) and "entropy" in s and ent < c.entropy_floor * s["entropy"]:
            fired["entropy"] = (
                f"policy entropy {ent:.4g} fell below {c.entropy_floor:g} x its start {s['entropy']:.4g} "
                "(train.health.entropy_floor)"
            )
        if _finite(kl := m.get("kl")):
            if kl > c.kl_max:
                fired["kl"] = f"KL to the reference {kl:.4g} nats exceeds train.health.kl_max={c.kl_max:g}"
            elif "kl" in self.last and kl - self.last["kl"] > c.kl_rate:
                fired["kl"] = (
                    f"KL to the reference rose {kl - self.last['kl']:.4g} nats in one iteration, to {kl:.4g} "
                    f"(train.health.kl_rate={c.kl_rate:g})"
                )
            self.last["kl"] = kl
        if _finite(r := m.get("repeat_share")) and r > s["repeat_share"] + c.repeat_rise:
            fired["looping"] = (
                f"{r:.0%} of the samples repeat a {c.repeat_ngram}-token run {c.repeat_count} times, "
                f"{s['repeat_share']:.0%} at the start (train.health.repeat_rise)"
            )
        if _finite(e := m.get("eos_rate")) and e < s["eos_rate"] - c.unfinished_rise:
            fired["unfinished"] = (
                f"{1 - e:.0%} of the samples never reach EOS, {1 - s['eos_rate']:.0%} at the start "
                "(train.health.unfinished_rise)"
            )
        if _finite(n := m.get("answer_length")) and s.get("answer_length", 0) > 0:
            ratio = n / s["answer_length"]
            if not 1 / c.length_factor <= ratio <= c.length_factor:
                fired["length"] = (
                    f"mean answer length {n:.1f} tokens is {ratio:.2f} x its start {s['answer_length']:.1f} "
                    f"(train.health.length_factor={c.length_factor:g})"
                )
        if _finite(m.get("score")) and _finite(m.get("rm_online_accuracy")):
            self.history = [*self.history, {"score": m["score"], "agreement": m["rm_online_accuracy"]}]
            self.history = self.history[-c.window :]
            if len(self.history) == c.window:
                half = c.window // 2
                early, late = self.history[:half], self.history[-half:]
                rise = _mean(late, "score") - _mean(early, "score")
                drop = _mean(early, "agreement") - _mean(late, "agreement")
                if rise > 0 and drop > c.agreement_drop:
                    fired["hacking"] = (
                        f"the reward rose {rise:.3g} over {c.window} iterations while the reward model's "
                        f"agreement with fresh labels fell {drop:.0%} (train.health.agreement_drop)"
                    )
        return fired

    def record(self, iteration: int, fired: dict[str, str]) -> list[str]:
        """Note the checks that fired at `iteration`; returns those that fired for the first time."""
        new = [name for name in fired if name not in self.events]
        for name, text in fired.items():
            event = self.events.setdefault(name, {"first": iteration, "count": 0, "text": text})
            event.update(last=iteration, count=event["count"] + 1)
        return new

    def summary(self) -> dict[str, Any]:
        """What the report shows (OUTPUT/health.json): the settings, the thresholds and the events."""
        return {"config": dataclasses.asdict(self.cfg), "start": dict(self.start),
                "thresholds": self.thresholds(), "events": self.events}  # fmt: skip

    def state_dict(self) -> dict[str, Any]:
        return {"start": dict(self.start), "last": dict(self.last), "history": list(self.history),
                "events": {k: dict(v) for k, v in self.events.items()}}  # fmt: skip

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.start, self.last = dict(state["start"]), dict(state["last"])
        self.history, self.events = list(state["history"]), {k: dict(v) for k, v in state["events"].items()}


def _mean(rows: Sequence[dict[str, float]], key: str) -> float:
    return sum(r[key] for r in rows) / len(rows)
