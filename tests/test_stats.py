"""`energy_gpt.recipes.stats`: summaries over seeds, paired t-intervals, verdicts and interpolated curve crossings,
checked against hand computations."""

import math

import pytest


def test_summary_is_mean_and_sample_standard_deviation():
    from energy_gpt.recipes.stats import summarize_values

    summary = summarize_values([1.0, 2.0, 4.0])
    assert summary.n == 3
    assert summary.mean == pytest.approx(7 / 3)
    # Sample variance: ((1 - 7/3)^2 + (2 - 7/3)^2 + (4 - 7/3)^2) / 2 = (16/9 + 1/9 + 25/9) / 2 = 7/3.
    assert summary.sd == pytest.approx(math.sqrt(7 / 3))
    assert summarize_values([5.0]).sd is None and summarize_values([5.0]).mean == 5.0
    assert summarize_values([]).mean is None


def test_paired_difference_t_interval_by_hand():
    from energy_gpt.recipes.stats import paired_difference, verdict

    # Differences 2, 3, 4: mean 3, sd 1, t(0.975, 2 df) = 4.302652729911275 -> half-width 4.3027 / sqrt(3) = 2.484.
    difference = paired_difference([12.0, 13.0, 14.0], [10.0, 10.0, 10.0])
    half_width = 4.302652729911275 / math.sqrt(3)
    assert (difference.n, difference.mean, difference.sd) == (3, pytest.approx(3.0), pytest.approx(1.0))
    assert difference.low == pytest.approx(3.0 - half_width) and difference.high == pytest.approx(3.0 + half_width)
    assert not difference.includes_zero and verdict(difference, "faster", "slower") == "slower"
    assert verdict(paired_difference([8.0, 7.0, 6.0], [10.0, 10.0, 10.0]), "faster", "slower") == "faster"
    # Differences 1, 2, 3: the same spread around a mean of 2 reaches below zero (2 - 2.484): no claim.
    assert paired_difference([11.0, 12.0, 13.0], [10.0, 10.0, 10.0]).includes_zero
    # An interval that straddles zero makes no claim, and says at how many seeds.
    straddling = paired_difference([1.0, -1.0, 0.5], [0.0, 0.0, 0.0])
    assert straddling.includes_zero
    assert verdict(straddling, "better", "worse") == "no difference detected at 3 seeds"


def test_one_seed_has_no_interval_and_no_verdict():
    from energy_gpt.recipes.stats import paired_difference, verdict

    difference = paired_difference([1.5], [1.0])
    assert difference.mean == pytest.approx(0.5) and difference.low is None and not difference.has_interval
    assert verdict(difference, "better", "worse") == "one seed: no interval, no verdict"
    with pytest.raises(ValueError, match="as many values as references"):
        paired_difference([1.0, 2.0], [1.0])


def test_loss_at_step_interpolates_between_evaluations():
    from energy_gpt.recipes.stats import loss_at_step

    curve = [{"step": 0, "loss": 4.0}, {"step": 10, "loss": 2.0}, {"step": 20, "loss": 1.0}]
    assert loss_at_step(curve, 5) == pytest.approx(3.0)
    assert loss_at_step(curve, 15) == pytest.approx(1.5)
    assert loss_at_step(curve, 20) == 1.0 and loss_at_step(curve, 0) == 4.0


def test_steps_to_reach_is_interpolated_and_does_not_flip_on_a_tiny_difference():
    from energy_gpt.recipes.stats import steps_to_reach

    curve = [{"step": 0, "loss": 4.0}, {"step": 10, "loss": 2.0}, {"step": 20, "loss": 1.0}]
    assert steps_to_reach(curve, 3.0) == pytest.approx(5.0)
    assert steps_to_reach(curve, 1.5) == pytest.approx(15.0)
    assert steps_to_reach(curve, 1.0) == pytest.approx(20.0)
    assert steps_to_reach(curve, 5.0) == 0.0
    # Ending 0.0001 nat above the target: with a tolerance it is reached at the last evaluation, not "never".
    assert steps_to_reach(curve, 0.9999, tolerance=1e-3) == 20.0
    assert steps_to_reach(curve, 0.9999) is None
    assert steps_to_reach(curve, 0.9, tolerance=1e-3) is None
    # A 0.0001-nat change of one loss moves the answer a little, not by a whole evaluation interval.
    nudged = [{"step": 0, "loss": 4.0}, {"step": 10, "loss": 2.0}, {"step": 20, "loss": 1.0001}]
    assert steps_to_reach(nudged, 1.5) == pytest.approx(15.0, abs=0.01)


def test_p_value_equals_scipys_paired_t_test_and_signs_are_counted():
    from scipy import stats

    from energy_gpt.recipes.stats import paired_difference, sign_text

    values, reference = [1.30, 1.25, 1.41, 1.28], [1.20, 1.27, 1.30, 1.21]
    difference = paired_difference(values, reference)
    assert difference.p_value == pytest.approx(stats.ttest_rel(values, reference).pvalue)
    assert (difference.higher, difference.lower) == (3, 1)
    assert sign_text(difference, "better", "worse") == "worse in 3/4, better in 1/4 seeds"
    assert sign_text(paired_difference([1.0, 2.0], [0.0, 0.0]), "better", "worse") == "worse in 2/2 seeds"
    assert paired_difference([1.0], [0.0]).p_value is None  # one pair: no test
    assert paired_difference([1.0, 1.0], [0.0, 0.0]).p_value == 0.0  # identical differences, not zero


def test_holm_adjustment_by_hand():
    from energy_gpt.recipes.stats import holm_adjust

    # m = 3 tested (None is no test): sorted 0.01, 0.03, 0.04 -> 3 * 0.01, 2 * 0.03, max(0.06, 1 * 0.04).
    assert holm_adjust([0.01, 0.04, None, 0.03]) == pytest.approx([0.03, 0.06, None, 0.06])
    assert holm_adjust([0.5, 0.6]) == pytest.approx([1.0, 1.0])  # capped at 1
    assert holm_adjust([0.02]) == pytest.approx([0.02])  # one comparison: unchanged
    assert holm_adjust([]) == []


def test_adjusted_verdict_needs_the_adjusted_p_value():
    from energy_gpt.recipes.stats import adjusted_verdict, paired_difference, verdict

    difference = paired_difference([12.0, 13.0, 14.0], [10.0, 10.0, 10.0])  # p = 0.035
    assert verdict(difference, "better", "worse") == "worse"
    assert adjusted_verdict(difference, 0.035, "better", "worse") == "worse"
    assert adjusted_verdict(difference, 0.105, "better", "worse") == "no difference detected at 3 seeds"


def test_paired_ratio_is_the_geometric_mean_with_a_log_scale_interval():
    from energy_gpt.recipes.stats import paired_ratio, ratio_verdict

    # Ratios 2, 2, 2 (sd 0 on the log scale): exactly 2 with a zero-width interval.
    ratio = paired_ratio([2.0, 4.0, 6.0], [1.0, 2.0, 3.0])
    assert ratio.ratio == pytest.approx(2.0) and ratio.low == pytest.approx(2.0) and ratio.high == pytest.approx(2.0)
    assert ratio_verdict(ratio, "faster", "slower") == "slower"
    # Ratios 1/2 and 2: geometric mean 1; log ratios -ln 2, +ln 2, sd ln2 * sqrt(2), t(0.975, 1) = 12.706.
    ratio = paired_ratio([1.0, 2.0], [2.0, 1.0])
    half_width = 12.706204736174698 * math.log(2) * math.sqrt(2) / math.sqrt(2)
    assert ratio.ratio == pytest.approx(1.0)
    assert ratio.low == pytest.approx(math.exp(-half_width)) and ratio.high == pytest.approx(math.exp(half_width))
    assert ratio_verdict(ratio, "faster", "slower") == "no difference detected at 2 seeds"
    assert ratio_verdict(paired_ratio([1.0], [2.0]), "faster", "slower") == "one seed: no interval, no verdict"
    with pytest.raises(ValueError, match="positive"):
        paired_ratio([0.0], [1.0])
