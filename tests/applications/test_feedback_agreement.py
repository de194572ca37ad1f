"""The agreement math on hand-computed and published numbers."""

from __future__ import annotations

import pytest

from rlhfkit.feedback.agreement import (
    agreement_report,
    dense_levels,
    krippendorff_alpha,
    leave_one_out,
    mid_ranks,
    pair_agreement,
)


def test_dense_levels_and_mid_ranks():
    assert dense_levels([2, 5, 2]) == (0, 1, 0)
    assert dense_levels([3, 1, 2]) == (2, 0, 1)
    assert mid_ranks((0, 1, 1)) == (1.0, 2.5, 2.5)
    assert mid_ranks((1, 0, 1, 2)) == (2.5, 1.0, 2.5, 4.0)


def test_pair_agreement_skips_pairs_either_side_ties():
    # pairs (0,1) (0,2) (1,2): b ties 0 and 2 -> 2 compared; b puts 1 above 0 (disagree), 1 above 2 (agree)
    assert pair_agreement((0, 1, 2), (1, 0, 1)) == (1, 2)
    assert pair_agreement((0, 1, 2), (0, 1, 2)) == (3, 3)
    assert pair_agreement((0, 0, 0), (0, 1, 2)) == (0, 0)


def test_leave_one_out_by_hand():
    # A and B agree fully, C swaps answers 1 and 2.
    # A vs mean mid-rank of B, C = mean((1,2,3), (1,3,2)) = (1, 2.5, 2.5): pair (1,2) is tied -> 2 of 2
    # C vs mean of A, B = (1, 2, 3): C agrees on (0,1), (0,2), disagrees on (1,2) -> 2 of 3
    a, b, c = (0, 1, 2), (0, 1, 2), (0, 2, 1)
    assert leave_one_out([a, b, c]) == [(2, 2), (2, 2), (2, 3)]
    assert leave_one_out([a]) == [(0, 0)]


def test_krippendorff_alpha_by_hand():
    # units (1,1), (2,2), (1,2): o_11 = 2, o_22 = 2, o_12 = o_21 = 1; n_1 = n_2 = 3, n = 6
    # D_o = o_12 + o_21 = 2; sum n_c n_k d2 = 2 * 3 * 3 = 18; alpha = 1 - 5 * 2 / 18 = 4/9
    units = [[1, 1], [2, 2], [1, 2]]
    assert krippendorff_alpha(units, "interval") == pytest.approx(4 / 9)
    assert krippendorff_alpha(units, "nominal") == pytest.approx(4 / 9)
    # with values 1 and 3 the interval d2 is 4 everywhere it is not 0: the ratio, hence alpha, is unchanged
    assert krippendorff_alpha([[1, 1], [3, 3], [1, 3]], "interval") == pytest.approx(4 / 9)
    assert krippendorff_alpha([[1, 1], [2, 2]]) == 1.0
    assert krippendorff_alpha([[1, 1], [1, 1]]) is None  # no variation: D_e = 0
    assert krippendorff_alpha([[1], [2]]) is None  # nothing pairable


def test_krippendorff_alpha_matches_the_published_example():
    # Krippendorff (2011), "Computing Krippendorff's Alpha-Reliability", 4 coders x 12 units with missing
    # values: alpha = 0.743 nominal, 0.815 ordinal, 0.849 interval.
    n = None
    coders = [
        [1, 2, 3, 3, 2, 1, 4, 1, 2, n, n, n],
        [1, 2, 3, 3, 2, 2, 4, 1, 2, 5, n, 3],
        [n, 3, 3, 3, 2, 3, 4, 2, 2, 5, 1, n],
        [1, 2, 3, 3, 2, 4, 4, 1, 2, 5, 1, n],
    ]
    units = [[v for v in unit if v is not None] for unit in zip(*coders, strict=True)]
    assert krippendorff_alpha(units, "nominal") == pytest.approx(0.743, abs=5e-4)
    assert krippendorff_alpha(units, "ordinal") == pytest.approx(0.815, abs=5e-4)
    assert krippendorff_alpha(units, "interval") == pytest.approx(0.849, abs=5e-4)


def test_report_micro_averages_and_ignores_single_rankings():
    a, b, c = (0, 1, 2), (0, 1, 2), (0, 2, 1)
    report = agreement_report({7: [("ann", a), ("bob", b), ("cat", c)], 8: [("ann", (1, 0))]})
    assert report.items == 1 and set(report.per_item) == {7}
    # pairwise: A-B 3/3, A-C 2/3, B-C 2/3 -> 7/9; leave-one-out: (2 + 2 + 2) / (2 + 2 + 3) = 6/7
    assert (report.pairwise.agree, report.pairwise.compared) == (7, 9)
    assert report.leave_one_out.value == pytest.approx(6 / 7)
    assert report.per_annotator["cat"].value == pytest.approx(2 / 3)
    # units are answers, values mid-ranks: (1,1,1), (2,2,3), (3,3,2). o_11 = 3, o_22 = o_33 = 1,
    # o_23 = o_32 = 2; n_c = 3 each, n = 9. D_o sum = 4; sum n_c n_k (c-k)^2 = 2 * 9 * (1 + 4 + 1) = 108;
    # alpha = 1 - 8 * 4 / 108 = 19/27
    assert report.alpha_interval == pytest.approx(19 / 27)
    assert agreement_report({}).pairwise.value is None
