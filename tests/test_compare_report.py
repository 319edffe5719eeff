"""The statistics and the report of `energy-gpt compare` on saved `run.json` files, without training: paired
differences with per-seed signs, Holm's correction over the solvers compared with gd, step time paired within a seed,
the FLOPs and parameter columns, and the rotation of the solver order across seeds."""

import json
import math

import pytest

SEEDS = (1, 2, 3)
# Final validation losses per seed: "worse" is above gd in every seed by a steady margin, "noisy" crosses gd.
FINAL_LOSSES = {
    "gd": (1.00, 1.10, 0.95),
    "worse": (1.05, 1.16, 0.99),
    "noisy": (1.02, 1.07, 0.97),
}
STEP_SECONDS = {"gd": (0.010, 0.020, 0.012), "worse": (0.020, 0.041, 0.023), "noisy": (0.010, 0.021, 0.011)}


def saved_run(label: str, seed: int, index: int, with_flops: bool = True) -> dict:
    final = FINAL_LOSSES[label][index]
    steps = 8
    validation = [{"step": step, "loss": final + 0.5 * (1 - step / steps)} for step in (0, 4, 8)]
    run = {
        "label": label, "solver": label, "solver_overrides": {}, "seed": seed,
        "train": [{"step": 4, "loss": final + 0.3}, {"step": 8, "loss": final}], "validation": validation,
        "final_validation_loss": final, "best_validation_loss": final, "steps": steps, "train_tokens": 8 * 64,
        "train_step_seconds": STEP_SECONDS[label][index] * steps,
        "tokens_per_second": 8 * 64 / (STEP_SECONDS[label][index] * steps),
        "peak_memory_mib": 10.0, "wall_seconds": 2.0, "num_parameters": 1_334_016,
        "solver_report": None,
    }
    if with_flops:
        run["training_flops_estimate"] = 2_210_955_264 * steps
    return run


@pytest.fixture
def saved_runs(tmp_path):
    """The runs written as run.json files and read back, as compare reads them."""
    from energy_gpt.recipes.compare import read_run
    from energy_gpt.recipes.compare.store import run_directory

    runs = {}
    for label in FINAL_LOSSES:
        for index, seed in enumerate(SEEDS):
            folder = run_directory(tmp_path, label, seed)
            folder.mkdir(parents=True)
            (folder / "run.json").write_text(json.dumps(saved_run(label, seed, index, with_flops=label != "noisy")))
            runs.setdefault(label, {})[seed] = read_run(folder)
    return runs


def test_signs_holm_and_step_time_from_saved_runs(saved_runs):
    from scipy import stats

    from energy_gpt.recipes.compare import aggregate

    summary = aggregate(saved_runs, "gd", tolerance=1e-3)
    raw = {}
    for label in ("worse", "noisy"):
        final = summary[label]["vs_reference"]["final_validation_loss"]
        expected_p = stats.ttest_rel(FINAL_LOSSES[label], FINAL_LOSSES["gd"]).pvalue
        assert final["p_value"] == pytest.approx(expected_p)
        raw[label] = expected_p
        assert final["comparisons"] == 2
    # Holm with m = 2: the smaller p doubles, the larger is max(that, itself).
    smaller, larger = sorted(raw.values())
    adjusted = {label: (2 * smaller if p == smaller else max(2 * smaller, larger)) for label, p in raw.items()}
    for label in raw:
        final = summary[label]["vs_reference"]["final_validation_loss"]
        assert final["holm_p_value"] == pytest.approx(min(1.0, adjusted[label]))
        expected = "worse" if adjusted[label] < 0.05 else "no difference detected at 3 seeds"
        assert final["holm_verdict"] == expected
    assert summary["worse"]["vs_reference"]["final_validation_loss"]["signs"] == "worse in 3/3 seeds"
    assert summary["noisy"]["vs_reference"]["final_validation_loss"]["signs"] == "worse in 2/3, better in 1/3 seeds"
    # Step time over gd's in the same seed: geometric mean of the three ratios.
    ratios = [a / b for a, b in zip(STEP_SECONDS["worse"], STEP_SECONDS["gd"])]
    step_time = summary["worse"]["vs_reference"]["step_time"]
    assert step_time["ratio"] == pytest.approx(math.exp(sum(map(math.log, ratios)) / 3))
    assert step_time["low"] < step_time["ratio"] < step_time["high"] and step_time["verdict"] == "slower"


def test_table_shows_parameters_flops_signs_and_both_verdicts(saved_runs):
    from energy_gpt.recipes.compare import aggregate, render_table

    summary = aggregate(saved_runs, "gd", tolerance=1e-3)
    table = render_table(summary, ["- header line"], "gd", "peak memory measure", 1e-3)
    rows = {}  # the first table's row of each solver
    for line in table.splitlines():
        if line.startswith("| "):
            rows.setdefault(line.split(" | ")[0][2:], line)
    assert "| 1,334,016 | 17.7 G | 3 |" in rows["gd"]  # exact parameters; 2.21e9 FLOPs x 8 steps
    assert "| 1,334,016 | – | 3 |" in rows["noisy"]  # a run.json without a FLOP count
    worse = summary["worse"]["vs_reference"]["final_validation_loss"]
    assert f"| {worse['p_value']:.3g} / {worse['holm_p_value']:.3g} (m = 2) |" in rows["worse"]
    assert f"| worse in 3/3 seeds | {worse['verdict']} |" in rows["worse"]
    assert f"| {worse['holm_verdict']} |" in rows["worse"]
    assert "×" in rows["worse"] and ": slower |" in rows["worse"]
    assert "| 1 (reference) |" in rows["gd"]
    assert "Holm's step-down" in table and "4 · n_layer · n_ctx · n_embd" in table


def test_solver_order_rotates_across_seeds():
    from energy_gpt.recipes.compare import parse_solver_specs
    from energy_gpt.recipes.compare.cli import run_plan

    specs = parse_solver_specs("gd,nag,newton_light")
    plan = [(spec.label, seed) for spec, seed in run_plan(specs, [7, 8, 9, 10])]
    assert plan == [("gd", 7), ("nag", 7), ("newton_light", 7), ("nag", 8), ("newton_light", 8), ("gd", 8),
                    ("newton_light", 9), ("gd", 9), ("nag", 9), ("gd", 10), ("nag", 10), ("newton_light", 10)]
