"""The statistics of `energy-gpt compare` over seeds, read from finished runs (`run.json` contents) only: per-seed
measures, their mean / sd, the paired differences to the reference solver with their verdicts, and the mean of what the
solvers learned. No training: everything here works on saved runs."""

import math
from typing import Any

import numpy as np

from ..stats import (
    PairedDifference,
    adjusted_verdict,
    holm_adjust,
    loss_at_step,
    paired_difference,
    paired_ratio,
    ratio_verdict,
    sign_text,
    steps_to_reach,
    summarize_values,
    verdict,
)

TARGET_FRACTIONS = (0.25, 0.5, 0.75, 1.0)  # points of gd's curve whose loss the other solvers must reach


def target_label(fraction: float) -> str:
    return f"{fraction:.0%}"


def seed_measures(run: dict[str, Any], reference: dict[str, Any] | None, tolerance: float) -> dict[str, Any]:
    """One run's numbers; steps / seconds to reach the reference's loss at each fraction of its training."""
    measures = {
        "seed": run["seed"],
        "final_validation_loss": run["final_validation_loss"],
        "best_validation_loss": run["best_validation_loss"],
        "perplexity": _perplexity(run["final_validation_loss"]),
        "tokens_per_second": run["tokens_per_second"],
        "step_seconds": run["train_step_seconds"] / run["steps"] if run["steps"] else None,
        "final_metric": run.get("final_metric"),
        "peak_memory_mib": run["peak_memory_mib"],
        "steps_to_target": {},
        "seconds_to_target": {},
    }
    if reference is None:
        return measures
    seconds_per_step = run["train_step_seconds"] / run["steps"] if run["steps"] else float("nan")
    for fraction in TARGET_FRACTIONS:
        target = loss_at_step(reference["validation"], fraction * reference["steps"])
        steps = steps_to_reach(run["validation"], target, tolerance)
        key = target_label(fraction)
        measures["steps_to_target"][key] = steps
        measures["seconds_to_target"][key] = None if steps is None else steps * seconds_per_step
    return measures


def _perplexity(loss: float) -> float:
    try:
        return math.exp(loss)
    except OverflowError:
        return float("inf")


def aggregate(
    runs: dict[str, dict[int, dict[str, Any]]], reference_label: str | None, tolerance: float
) -> dict[str, dict[str, Any]]:
    """Per solver: the per-seed measures, their mean / sd, and the paired differences to the reference (same seed)."""
    reference_runs = runs.get(reference_label, {}) if reference_label else {}
    summary = {}
    for label, by_seed in runs.items():
        if not by_seed:
            continue
        per_seed = [seed_measures(run, reference_runs.get(seed), tolerance) for seed, run in by_seed.items()]
        first_run = next(iter(by_seed.values()))
        entry: dict[str, Any] = {
            "seeds": [measures["seed"] for measures in per_seed],
            "per_seed": per_seed,
            "num_parameters": first_run["num_parameters"],
            # Older run.json files have no FLOP count: None, shown as "–".
            "training_flops": first_run.get("training_flops"),
            "training_flops_estimate": first_run.get("training_flops_estimate"),
        }
        for key in ("final_validation_loss", "best_validation_loss", "perplexity", "tokens_per_second", "peak_memory_mib"):
            entry[key] = summarize_values([measures[key] for measures in per_seed]).to_dict()
        metrics = [measures["final_metric"] for measures in per_seed if measures["final_metric"] is not None]
        entry["final_metric"] = summarize_values(metrics).to_dict()
        paired = [measures for measures in per_seed if measures["seed"] in reference_runs]
        entry["vs_reference"] = None
        if reference_label is not None and paired:
            difference = paired_difference(
                [measures["final_validation_loss"] for measures in paired],
                [reference_runs[measures["seed"]]["final_validation_loss"] for measures in paired],
            )
            entry["vs_reference"] = {
                "seeds": [measures["seed"] for measures in paired],
                "final_validation_loss": {**difference.to_dict(), "verdict": verdict(difference, "better", "worse"),
                                          "signs": sign_text(difference, "better", "worse")},
                "step_time": step_time_ratio(paired, reference_runs),
                "steps_to_target": {},
            }
        for unit in ("steps", "seconds"):
            entry[f"{unit}_to_target"] = {}
            for fraction in TARGET_FRACTIONS:
                key = target_label(fraction)
                values = [measures[f"{unit}_to_target"].get(key) for measures in paired]
                reached = [value for value in values if value is not None]
                entry[f"{unit}_to_target"][key] = {**summarize_values(reached).to_dict(), "of": len(values)}
        if entry["vs_reference"] is not None:
            for fraction in TARGET_FRACTIONS:
                key = target_label(fraction)
                values = [measures["steps_to_target"][key] for measures in paired]
                reference_values = [
                    seed_measures(reference_runs[m["seed"]], reference_runs[m["seed"]], tolerance)["steps_to_target"][key]
                    for m in paired
                ]
                if None in values or None in reference_values:
                    unreached = sum(value is None for value in values)
                    entry["vs_reference"]["steps_to_target"][key] = {
                        "verdict": f"not reached in {unreached}/{len(values)} seeds: no interval"}
                else:
                    difference = paired_difference(values, reference_values)
                    entry["vs_reference"]["steps_to_target"][key] = {
                        **difference.to_dict(), "verdict": verdict(difference, "faster", "slower")}
        entry["solver_report"] = mean_solver_report([run.get("solver_report") for run in by_seed.values()])
        summary[label] = entry
    adjust_for_comparisons(summary, reference_label)
    return summary


def step_time_ratio(paired: list[dict[str, Any]], reference_runs: dict[int, dict[str, Any]]) -> dict[str, Any] | None:
    """Mean training-step time over the reference's in the same seed (the seeds' machine load cancels as far as it
    hits both runs of a seed alike): geometric mean ratio with its 95 % interval and a verdict."""
    pairs = [(measures["step_seconds"], seed_measures(reference_runs[measures["seed"]], None, 0.0)["step_seconds"])
             for measures in paired]
    pairs = [(value, reference) for value, reference in pairs if value and reference]
    if not pairs:
        return None
    ratio = paired_ratio([value for value, _ in pairs], [reference for _, reference in pairs])
    return {**ratio.to_dict(), "verdict": ratio_verdict(ratio, "faster", "slower")}


def adjust_for_comparisons(summary: dict[str, dict[str, Any]], reference_label: str | None) -> None:
    """Holm's correction of the final-loss verdicts for the number of solvers compared with the reference: every
    comparison gets its adjusted p-value, the number of comparisons, and the verdict at the adjusted p-value."""
    compared = [label for label, entry in summary.items()
                if label != reference_label and entry["vs_reference"] is not None]
    differences = [summary[label]["vs_reference"]["final_validation_loss"] for label in compared]
    adjusted = holm_adjust([difference.get("p_value") for difference in differences])
    tested = sum(p is not None for p in adjusted)
    for difference, adjusted_p in zip(differences, adjusted):
        paired = PairedDifference(**{key: difference[key] for key in PairedDifference.__dataclass_fields__})
        difference.update(holm_p_value=adjusted_p, comparisons=tested,
                          holm_verdict=adjusted_verdict(paired, adjusted_p, "better", "worse"))


def mean_solver_report(reports: list[dict[str, Any] | None]) -> dict[str, list[float | None]] | None:
    """Per reported quantity, one value per layer: the mean over seeds (and over heads for per-head values)."""
    reports = [report for report in reports if report]
    if not reports:
        return None
    rows: dict[str, list[list[float]]] = {}

    def add(name: str, per_layer: list[Any]) -> None:
        row = rows.setdefault(name, [[] for _ in per_layer])
        for layer, value in enumerate(per_layer[: len(row)]):
            if value is None:
                continue
            row[layer].append(float(np.mean(value)))

    for report in reports:
        for name, per_layer in report.get("parameters", {}).items():
            add(name, per_layer)
        for name, per_layer in report.items():
            if name != "parameters" and isinstance(per_layer, list):
                add(name, per_layer)
    return {
        name: [float(np.mean(values)) if values else None for values in per_layer]
        for name, per_layer in rows.items()
        if any(per_layer)
    }


__all__ = [
    "TARGET_FRACTIONS",
    "adjust_for_comparisons",
    "aggregate",
    "mean_solver_report",
    "seed_measures",
    "step_time_ratio",
    "target_label",
]
