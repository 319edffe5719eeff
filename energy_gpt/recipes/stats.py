"""The statistics of `energy-gpt compare`: summaries over seeds, paired differences with a Student-t confidence
interval and their verdict in plain words, and the interpolated "steps to reach a loss" of a validation curve.

A curve is a list of `{"step": int, "loss": float}` points in increasing step order (what compare records at every
evaluation). Everything here is pure Python (plus `scipy.stats.t` for the interval), so it is easy to check by hand.
"""

import itertools
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

from scipy import stats as scipy_stats

CONFIDENCE = 0.95

Curve = Sequence[dict[str, float]]


@dataclass(frozen=True)
class Summary:
    """Mean and sample standard deviation (n - 1 in the denominator; None for fewer than 2 values)."""

    n: int
    mean: float | None
    sd: float | None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def summarize_values(values: Sequence[float]) -> Summary:
    values = [float(value) for value in values]
    n = len(values)
    if n == 0:
        return Summary(0, None, None)
    mean = math.fsum(values) / n
    sd = math.sqrt(math.fsum((value - mean) ** 2 for value in values) / (n - 1)) if n > 1 else None
    return Summary(n, mean, sd)


@dataclass(frozen=True)
class PairedDifference:
    """Mean of the per-seed differences `value - reference`, their standard deviation and the two-sided Student-t
    confidence interval of the mean (None with a single pair: one difference says nothing about the spread)."""

    n: int
    mean: float | None
    sd: float | None
    low: float | None
    high: float | None
    confidence: float = CONFIDENCE

    @property
    def has_interval(self) -> bool:
        return self.low is not None

    @property
    def includes_zero(self) -> bool:
        return self.has_interval and self.low <= 0.0 <= self.high

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def paired_difference(
    values: Sequence[float], reference: Sequence[float], confidence: float = CONFIDENCE
) -> PairedDifference:
    """`values[i] - reference[i]` for every pair i (e.g. one pair per seed), summarised with a t-interval."""
    if len(values) != len(reference):
        raise ValueError(f"paired_difference needs as many values as references, got {len(values)} and {len(reference)}.")
    summary = summarize_values([value - ref for value, ref in zip(values, reference)])
    if summary.n < 2:
        return PairedDifference(summary.n, summary.mean, None, None, None, confidence)
    half_width = float(scipy_stats.t.ppf(0.5 + confidence / 2, summary.n - 1)) * summary.sd / math.sqrt(summary.n)
    return PairedDifference(
        summary.n, summary.mean, summary.sd, summary.mean - half_width, summary.mean + half_width, confidence
    )


def verdict(difference: PairedDifference, lower: str, higher: str) -> str:
    """`lower` / `higher` when the interval excludes zero on that side, otherwise no claim. With one pair there is no
    interval, and the verdict says so instead of guessing."""
    if difference.n == 0:
        return "no paired runs"
    if not difference.has_interval:
        return "one seed: no interval, no verdict"
    if difference.includes_zero:
        return f"no difference detected at {difference.n} seeds"
    return lower if difference.mean < 0 else higher


# --------------------------------------------------------------------------------------------------------------------
# Curves


def loss_at_step(curve: Curve, step: float) -> float:
    """The curve's loss at `step`, linearly interpolated between the two evaluations around it."""
    if not curve:
        raise ValueError("loss_at_step: empty curve.")
    if step <= curve[0]["step"]:
        return float(curve[0]["loss"])
    for before, after in itertools.pairwise(curve):
        if step <= after["step"]:
            fraction = (step - before["step"]) / (after["step"] - before["step"])
            return float(before["loss"] + fraction * (after["loss"] - before["loss"]))
    return float(curve[-1]["loss"])


def steps_to_reach(curve: Curve, target: float, tolerance: float = 0.0) -> float | None:
    """The first step at which the curve, linearly interpolated between evaluations, comes down to `target`.

    Interpolation makes the result move continuously with the losses instead of jumping by a whole `eval_steps`. A
    curve that never goes below `target` but comes within `tolerance` of it counts as reaching it at its first
    evaluation within the tolerance, so a difference smaller than `tolerance` at the end of training cannot turn "the
    last step" into "not reached". None: never within `tolerance` of the target.
    """
    if not curve:
        return None
    if curve[0]["loss"] <= target:
        return float(curve[0]["step"])
    for before, after in itertools.pairwise(curve):
        if after["loss"] <= target:
            fraction = (before["loss"] - target) / (before["loss"] - after["loss"])
            return float(before["step"] + fraction * (after["step"] - before["step"]))
    for point in curve:
        if point["loss"] <= target + tolerance:
            return float(point["step"])
    return None


__all__ = [
    "CONFIDENCE",
    "PairedDifference",
    "Summary",
    "loss_at_step",
    "paired_difference",
    "steps_to_reach",
    "summarize_values",
    "verdict",
]
