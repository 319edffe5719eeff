"""`energy-gpt compare`: train the same model once per attention solver and seed, and compare the solvers with
statistics over seeds.

    energy-gpt compare --output_dir outputs/compare                  # embedded synthetic task, 2 seeds, no network
    energy-gpt compare --solvers gd,nag,newton_light --num_seeds 3 --train_file input.txt --output_dir out
    energy-gpt compare --solvers "momentum,momentum:momentum_form=ema" --baseline_dir out --output_dir out-ema

Within a seed every run starts from the same initial weights, sees the same batches in the same order, for the same
number of steps, with the same learning-rate schedule: only the solver (and its `--solvers` overrides) changes. Runs
are interleaved by seed (every solver of the first seed, then of the second, ...), and each finished (solver, seed)
run is written at once to `runs/<solver>/seed-<seed>/run.json`; `--resume` reuses the finished runs whose settings
match. After every run the aggregated results are rebuilt from whatever has finished:

- `comparison.md`: the settings, then per solver mean ± sd over seeds of the final / best validation loss, perplexity,
  steps (and seconds) to reach the gd run's loss at 25 / 50 / 75 / 100 % of its training, tokens/s, peak memory and
  parameter count, with the paired difference to gd (95 % t-interval) and a verdict; and what each solver learned;
- `loss_curves.csv` / `loss_curves.json`: every seed's curves (the JSON also has every number of the table);
- `loss_curves.png`: mean curves with a band over seeds.

Without `--dataset_name` / `--train_file` / `--validation_file` the task is the embedded longest-increasing-subsequence
task of `energy_gpt.recipes.synthetic`; with them it is causal-LM text, prepared as `energy-gpt pretrain` does, with
the tokenizer of `--tokenizer_name` or else a byte-level BPE trained on the training text (saved in `tokenizer/`).

The package, by responsibility:

- `arguments`: the options of compare, `--solvers` entries and `field=value` config overrides;
- `tasks`: the tasks runs train on (a registry: the embedded synthetic tasks and causal-LM text);
- `runner`: training and measuring one (solver, seed) run;
- `store`: the output folder, `run.json` per run, the settings `--resume` / `--baseline_dir` check;
- `analysis`: statistics over seeds from saved runs (no training);
- `report`: the table, CSV, JSON and plot;
- `cli`: the command, a straight pipeline (`prepare` every argument, then `execute` the plan).
"""

from .analysis import TARGET_FRACTIONS, aggregate, mean_solver_report, seed_measures
from .arguments import (
    REFERENCE_SOLVER,
    CompareArguments,
    CompareDataArguments,
    SolverSpec,
    apply_config_fields,
    parse_config_overrides,
    parse_solver_specs,
)
from .cli import DEFAULT_MODEL_OVERRIDES, TRAINING_DEFAULTS, main, parse_args, prepare, run
from .report import render_csv, render_plot, render_table
from .runner import build_base_config, build_run_config, train_one_run
from .store import OUTPUT_FILES, default_settings, read_run, settings_differences
from .tasks import PreparedTask, load_named_tokenizer

__all__ = [
    "DEFAULT_MODEL_OVERRIDES",
    "OUTPUT_FILES",
    "REFERENCE_SOLVER",
    "TARGET_FRACTIONS",
    "TRAINING_DEFAULTS",
    "CompareArguments",
    "CompareDataArguments",
    "PreparedTask",
    "SolverSpec",
    "aggregate",
    "apply_config_fields",
    "build_base_config",
    "build_run_config",
    "default_settings",
    "load_named_tokenizer",
    "main",
    "mean_solver_report",
    "parse_args",
    "parse_config_overrides",
    "parse_solver_specs",
    "prepare",
    "read_run",
    "render_csv",
    "render_plot",
    "render_table",
    "run",
    "seed_measures",
    "settings_differences",
    "train_one_run",
]
