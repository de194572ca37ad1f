"""How much annotators agree on rankings of the same answers: pure functions, no I/O.

A ranking is a tuple of *levels*, one per answer: 0 = best, tied answers share a level.

* Pairwise agreement (as in InstructGPT's inter-annotator figures): over every pair of answers that both
  rankings order strictly, the share they order the same way. Ties are left out, not counted as half.
* Leave-one-out agreement: each annotator's ranking against the consensus of the *other* annotators of
  the item (their mean mid-rank per answer); pairs the consensus ties are left out. It spots the
  annotator who disagrees with everyone, which plain pairwise figures average away.
* Krippendorff's alpha, ``1 - D_o / D_e`` (observed over chance disagreement), on mid-ranks: each
  (item, answer) is a unit and each annotator's mid-rank of that answer a value. Computed from the
  coincidence matrix as in Krippendorff, "Computing Krippendorff's Alpha-Reliability" (2011):

      o_ck = sum_u sum_{i != j in u} [v_i = c][v_j = k] / (m_u - 1),   n_c = sum_k o_ck,   n = sum_c n_c
      alpha = 1 - (n - 1) * sum_ck o_ck d2(c, k) / sum_ck n_c n_k d2(c, k)

  with d2 = (c - k)^2 (interval), (sum_{g from c to k} n_g - (n_c + n_k) / 2)^2 (ordinal), or [c != k]
  (nominal). Units with a single value are not pairable and drop out. 1 is perfect agreement, 0 is chance.

Totals are micro-averages (sum of agreeing pairs over sum of compared pairs), so an item with many
comparable pairs weighs more than one where the annotators tied almost everything.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from itertools import combinations
from typing import Literal

Metric = Literal["interval", "ordinal", "nominal"]


def dense_levels(values: Sequence[float]) -> tuple[int, ...]:
    """Rank numbers as a labeller gives them (smaller = better, equal = tie, gaps allowed) -> levels.

    Example: (2, 5, 2) -> (0, 1, 0).
    """
    order = sorted(set(values))
    return tuple(order.index(v) for v in values)


def mid_ranks(levels: Sequence[int]) -> tuple[float, ...]:
    """1-based positions, tied answers sharing the mean of their positions: (0, 1, 1) -> (1, 2.5, 2.5)."""
    out = []
    for level in levels:
        before = sum(1 for x in levels if x < level)
        tied = sum(1 for x in levels if x == level)
        out.append(before + (tied + 1) / 2)
    return tuple(out)


def pair_agreement(a: Sequence[float], b: Sequence[float]) -> tuple[int, int]:
    """(agreeing, compared) over the answer pairs that both rankings order strictly (lower = better)."""
    agree = compared = 0
    for i, j in combinations(range(len(a)), 2):
        if a[i] != a[j] and b[i] != b[j]:
            compared += 1
            agree += (a[i] < a[j]) == (b[i] < b[j])
    return agree, compared


def leave_one_out(rankings: Sequence[Sequence[int]]) -> list[tuple[int, int]]:
    """For each ranking, (agreeing, compared) against the mean mid-rank of all the others."""
    mids = [mid_ranks(r) for r in rankings]
    out = []
    for i, own in enumerate(mids):
        others = [m for j, m in enumerate(mids) if j != i]
        if not others:
            out.append((0, 0))
            continue
        consensus = [sum(col) / len(others) for col in zip(*others, strict=True)]
        out.append(pair_agreement(own, consensus))
    return out


def _d2(metric: Metric, c: float, k: float, n_by_value: Mapping[float, float]) -> float:
    if metric == "interval":
        return (c - k) ** 2
    if metric == "nominal":
        return float(c != k)
    lo, hi = min(c, k), max(c, k)
    between = sum(n for g, n in n_by_value.items() if lo <= g <= hi)
    return (between - (n_by_value[c] + n_by_value[k]) / 2) ** 2


def krippendorff_alpha(units: Sequence[Sequence[float]], metric: Metric = "interval") -> float | None:
    """Krippendorff's alpha over ``units``, each the values its coders gave (missing values left out).

    None when it is undefined: fewer than two pairable values, or no variation at all (D_e = 0).
    """
    coincidence: dict[tuple[float, float], float] = defaultdict(float)  # o_ck
    for values in units:
        m = len(values)
        if m < 2:
            continue
        for i, j in ((i, j) for i in range(m) for j in range(m) if i != j):
            coincidence[values[i], values[j]] += 1 / (m - 1)
    n_by_value: dict[float, float] = defaultdict(float)  # n_c
    for (c, _), o in coincidence.items():
        n_by_value[c] += o
    n = sum(n_by_value.values())
    if n < 2:
        return None
    observed = sum(o * _d2(metric, c, k, n_by_value) for (c, k), o in coincidence.items())
    expected = sum(
        n_by_value[c] * n_by_value[k] * _d2(metric, c, k, n_by_value) for c in n_by_value for k in n_by_value
    )
    if expected == 0:
        return None
    return 1 - (n - 1) * observed / expected


# ------------------------------------------------------------------------------------- the report
@dataclass
class Ratio:
    """Agreeing over compared pairs; ``value`` is None when nothing was compared."""

    agree: int = 0
    compared: int = 0

    def add(self, pair: tuple[int, int]) -> None:
        self.agree += pair[0]
        self.compared += pair[1]

    @property
    def value(self) -> float | None:
        return self.agree / self.compared if self.compared else None


@dataclass
class AgreementReport:
    """Agreement of the rankings of items labelled by two or more annotators."""

    items: int = 0  # items with >= 2 rankings
    pairwise: Ratio = field(default_factory=Ratio)
    leave_one_out: Ratio = field(default_factory=Ratio)
    alpha_interval: float | None = None
    alpha_ordinal: float | None = None
    per_item: dict[int, tuple[int, Ratio, Ratio]] = field(default_factory=dict)  # id -> (n, pairwise, LOO)
    per_annotator: dict[str, Ratio] = field(default_factory=dict)  # leave-one-out, per annotator


def agreement_report(rankings: Mapping[int, Sequence[tuple[str, Sequence[int]]]]) -> AgreementReport:
    """Pairwise, leave-one-out and alpha figures from ``{item: [(annotator, levels), ...]}``."""
    report = AgreementReport()
    units: list[list[float]] = []
    for item, labelled in rankings.items():
        if len(labelled) < 2:
            continue
        report.items += 1
        pairwise, loo = Ratio(), Ratio()
        levels = [lv for _, lv in labelled]
        for a, b in combinations(levels, 2):
            pairwise.add(pair_agreement(a, b))
        for (name, _), pair in zip(labelled, leave_one_out(levels), strict=True):
            loo.add(pair)
            report.per_annotator.setdefault(name, Ratio()).add(pair)
        report.pairwise.add((pairwise.agree, pairwise.compared))
        report.leave_one_out.add((loo.agree, loo.compared))
        report.per_item[item] = (len(labelled), pairwise, loo)
        mids = [mid_ranks(lv) for lv in levels]
        units += [list(column) for column in zip(*mids, strict=True)]  # one unit per answer
    report.alpha_interval = krippendorff_alpha(units, "interval")
    report.alpha_ordinal = krippendorff_alpha(units, "ordinal")
    return report
