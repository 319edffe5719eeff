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
