"""Pruning levels of Appendix G (SPEC §2) and the largest-remainder rounding rule."""

from fractions import Fraction

import pytest

from fedscore.errors import FedscoreError
from fedscore.federated import LEVELS, level_ratios


def test_the_four_levels_for_ten_workers_are_exactly_the_papers():
    assert level_ratios("F", 10) == [1.0] * 10
    assert level_ratios("L", 10) == [1.0] * 8 + [0.75] * 2
    assert level_ratios("M", 10) == [1.0] * 6 + [0.8] * 2 + [0.75] * 2
    assert level_ratios("S", 10) == [1.0] * 6 + [0.75] * 4
    assert level_ratios("M") == level_ratios("M", n_workers=10)  # the paper's N is the default


def test_multiples_of_five_split_exactly():
    assert level_ratios("L", 5) == [1.0] * 4 + [0.75]
    assert level_ratios("M", 20) == [1.0] * 12 + [0.8] * 4 + [0.75] * 4


def test_seven_workers_follow_the_largest_remainder_rule():
    # F: 7 full
    assert level_ratios("F", 7) == [1.0] * 7
    # L: quotas 5.6, 1.4 -> floors 5, 1; the one left goes to the larger remainder (0.6)
    assert level_ratios("L", 7) == [1.0] * 6 + [0.75]
    # M: quotas 4.2, 1.4, 1.4 -> 4, 1, 1; the 0.8 and 0.75 groups tie at 0.4: first listed
    assert level_ratios("M", 7) == [1.0] * 4 + [0.8] * 2 + [0.75]
    # S: quotas 4.2, 2.8 -> 4, 2; the one left goes to the 0.8 remainder (the pruned group)
    assert level_ratios("S", 7) == [1.0] * 4 + [0.75] * 3


def test_one_worker_is_always_full():
    for level in LEVELS:
        assert level_ratios(level, 1) == [1.0]


@pytest.mark.parametrize("level", sorted(LEVELS))
def test_group_sizes_sum_to_n_and_stay_within_one_of_the_exact_quota(level):
    for n in range(1, 41):
        ratios = level_ratios(level, n)
        assert len(ratios) == n
        for percent, ratio in LEVELS[level]:
            quota = Fraction(percent * n, 100)
            assert abs(ratios.count(ratio) - quota) < 1


def test_explicit_ratios_are_checked_and_passed_through():
    assert level_ratios([1.0, 0.5, 0.25]) == [1.0, 0.5, 0.25]
    assert level_ratios((0.9, 0.9), n_workers=2) == [0.9, 0.9]
    with pytest.raises(FedscoreError, match="3 entries for 4 workers"):
        level_ratios([1.0, 0.5, 0.25], n_workers=4)
    with pytest.raises(FedscoreError, match="keep ratio of worker 1 must be in"):
        level_ratios([1.0, 0.0])


def test_level_names_are_case_insensitive_and_unknown_ones_are_refused():
    assert level_ratios("m", 10) == level_ratios("M", 10)
    with pytest.raises(FedscoreError, match="unknown pruning level 'X'"):
        level_ratios("X", 10)
    with pytest.raises(FedscoreError, match="n_workers must be at least 1"):
        level_ratios("F", 0)
