"""The statistics of `energy-gpt compare`: summaries over seeds, paired differences with a Student-t confidence
interval, its two-sided p-value and verdict in plain words, per-seed signs, Holm's correction for several comparisons
against one reference, paired ratios (step time) with an interval, and the interpolated "steps to reach a loss" of a
validation curve.

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
    p_value: float | None = None  # two-sided paired t-test of "mean difference = 0"; None without an interval
    higher: int = 0  # pairs whose difference is > 0 (the value above its reference)
    lower: int = 0  # pairs whose difference is < 0

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
    differences = [value - ref for value, ref in zip(values, reference)]
    summary = summarize_values(differences)
    signs = {"higher": sum(d > 0 for d in differences), "lower": sum(d < 0 for d in differences)}
    if summary.n < 2:
        return PairedDifference(summary.n, summary.mean, None, None, None, confidence, **signs)
    half_width = float(scipy_stats.t.ppf(0.5 + confidence / 2, summary.n - 1)) * summary.sd / math.sqrt(summary.n)
    return PairedDifference(
        summary.n, summary.mean, summary.sd, summary.mean - half_width, summary.mean + half_width, confidence,
        paired_t_p_value(summary), **signs,
    )


def paired_t_p_value(summary: Summary) -> float:
    """Two-sided p-value of the one-sample t-test "the mean of these differences is 0" (n - 1 degrees of freedom).
    Identical differences (sd 0) give 0 when they are not 0, else 1."""
    if summary.sd == 0:
        return 1.0 if summary.mean == 0 else 0.0
    t_statistic = summary.mean / (summary.sd / math.sqrt(summary.n))
    return float(2 * scipy_stats.t.sf(abs(t_statistic), summary.n - 1))


def holm_adjust(p_values: Sequence[float | None]) -> list[float | None]:
    """Holm's step-down adjustment for m = the number of p-values given (None: no test, left out of m and returned as
    None). Sorted ascending, the k-th smallest (k from 0) becomes max over j <= k of min(1, (m - j) * p_(j)); an
    adjusted p below the level controls the family-wise error rate of all m comparisons at that level."""
    tested = sorted((p, index) for index, p in enumerate(p_values) if p is not None)
    adjusted: list[float | None] = [None] * len(p_values)
    running = 0.0
    for rank, (p, index) in enumerate(tested):
        running = max(running, min(1.0, (len(tested) - rank) * p))
        adjusted[index] = running
    return adjusted


def adjusted_verdict(difference: PairedDifference, adjusted_p: float | None, lower: str, higher: str,
                     level: float = 1 - CONFIDENCE) -> str:
    """`verdict`, but the claim needs the Holm-adjusted p-value below `level` (not only the raw interval)."""
    if adjusted_p is None:
        return verdict(difference, lower, higher)
    if adjusted_p >= level:
        return f"no difference detected at {difference.n} seeds"
    return lower if difference.mean < 0 else higher


def sign_text(difference: PairedDifference, lower: str, higher: str) -> str:
    """Per-seed signs in words: "worse in 3/3 seeds", "better in 2/3 seeds, worse in 1/3"."""
    if difference.n == 0:
        return "–"
    counts = sorted(((difference.higher, higher), (difference.lower, lower)), key=lambda item: -item[0])
    parts = [f"{word} in {count}/{difference.n}" for count, word in counts if count]
    return (", ".join(parts) + " seeds") if parts else f"equal in {difference.n}/{difference.n} seeds"


@dataclass(frozen=True)
class PairedRatio:
    """Geometric mean of the per-pair ratios `value / reference` and its confidence interval (the t-interval of the
    mean log ratio, exponentiated); None where there is no interval (a single pair)."""

    n: int
    ratio: float | None
    low: float | None
    high: float | None
    confidence: float = CONFIDENCE

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def paired_ratio(values: Sequence[float], reference: Sequence[float], confidence: float = CONFIDENCE) -> PairedRatio:
    """Ratios within each pair (e.g. a solver's step time over gd's in the same seed, so the machine's load in that
    seed cancels as far as it hits both), summarised on the log scale."""
    if len(values) != len(reference):
        raise ValueError(f"paired_ratio needs as many values as references, got {len(values)} and {len(reference)}.")
    if any(value <= 0 for value in [*values, *reference]):
        raise ValueError("paired_ratio needs positive values.")
    difference = paired_difference([math.log(value) for value in values], [math.log(ref) for ref in reference],
                                   confidence)
    if difference.n == 0:
        return PairedRatio(0, None, None, None, confidence)
    if not difference.has_interval:
        return PairedRatio(difference.n, math.exp(difference.mean), None, None, confidence)
    return PairedRatio(difference.n, math.exp(difference.mean), math.exp(difference.low), math.exp(difference.high),
                       confidence)


def ratio_verdict(ratio: PairedRatio, lower: str, higher: str) -> str:
    if ratio.n == 0:
        return "no paired runs"
    if ratio.low is None:
        return "one seed: no interval, no verdict"
    if ratio.low <= 1.0 <= ratio.high:
        return f"no difference detected at {ratio.n} seeds"
    return lower if ratio.ratio < 1.0 else higher


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
    "PairedRatio",
    "Summary",
    "adjusted_verdict",
    "holm_adjust",
    "loss_at_step",
    "paired_difference",
    "paired_ratio",
    "paired_t_p_value",
    "ratio_verdict",
    "sign_text",
    "steps_to_reach",
    "summarize_values",
    "verdict",
]
