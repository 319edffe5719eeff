"""The statistics of `energy-gpt compare` over seeds, read from finished runs (`run.json` contents) only: per-seed
measures, their mean / sd, the paired differences to the reference solver with their verdicts, and the mean of what the
solvers learned. No training: everything here works on saved runs."""

import math
from typing import Any

import numpy as np

from ..stats import loss_at_step, paired_difference, steps_to_reach, summarize_values, verdict

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
        }
        for key in ("final_validation_loss", "best_validation_loss", "perplexity", "tokens_per_second", "peak_memory_mib"):
            entry[key] = summarize_values([measures[key] for measures in per_seed]).to_dict()
        paired = [measures for measures in per_seed if measures["seed"] in reference_runs]
        entry["vs_reference"] = None
        if reference_label is not None and paired:
            difference = paired_difference(
                [measures["final_validation_loss"] for measures in paired],
                [reference_runs[measures["seed"]]["final_validation_loss"] for measures in paired],
            )
            entry["vs_reference"] = {
                "seeds": [measures["seed"] for measures in paired],
                "final_validation_loss": {**difference.to_dict(), "verdict": verdict(difference, "better", "worse")},
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
    return summary


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


__all__ = ["TARGET_FRACTIONS", "aggregate", "mean_solver_report", "seed_measures", "target_label"]
