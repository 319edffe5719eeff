"""The `energy-gpt compare` command: parse and check every argument, plan the (solver, seed) runs, train the missing
ones, and rebuild the report after each. `main` is a straight pipeline of these stages."""

import logging
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from transformers import TrainingArguments

from ...io_utils import atomic_directory, atomic_write_json
from ...modeling import EnergyGPTConfig
from ..arguments import ModelArguments
from ..common import argument_error_exit, recipe_command, recipe_parser, setup_logging
from ..pretrain import check_training_steps
from . import runner
from .analysis import aggregate
from .arguments import PRESETS, REFERENCE_SOLVER, CompareArguments, CompareDataArguments, SolverSpec
from .report import duration_text, header_lines, render_table, write_outputs
from .store import (
    OUTPUT_FILES,
    RUN_FILE,
    RUNS_DIRNAME,
    _remove_empty_dirs,
    as_json,
    check_output_dir,
    config_settings,
    dataset_sha256,
    default_settings,
    describe_differences,
    load_baseline_runs,
    read_run,
    run_directory,
    settings_differences,
    settings_sha256,
    sigterm_raises_system_exit,
    start_output_dir,
    tokenizer_sha256,
    training_settings,
)
from .tasks import TOKENIZER_DIRNAME, PreparedTask, TaskInputs, prepare_task

logger = logging.getLogger(__name__)

# A small model trained from scratch, prepended to --config_overrides when there is no --config_name (the user's
# own overrides come later and win). No dropout: the synthetic data never repeats, and noise would blur the curves.
DEFAULT_MODEL_OVERRIDES = "n_layer=4,n_embd=64,n_head=4,resid_pdrop=0.0,embd_pdrop=0.0,attn_pdrop=0.0"

# TrainingArguments defaults of `compare` (any of them can be changed on the command line): a few-minute CPU run.
TRAINING_DEFAULTS = {
    "output_dir": "outputs/compare",
    "max_steps": 200,
    "learning_rate": 2e-3,
    "lr_scheduler_type": "cosine",
    "warmup_steps": 0.05,
    "weight_decay": 0.01,
    "per_device_train_batch_size": 64,
    "per_device_eval_batch_size": 256,
    "eval_strategy": "steps",
    "eval_steps": 25,
    "logging_steps": 25,
    "save_strategy": "no",
    "report_to": "none",
    "log_level": "warning",
    "dataloader_pin_memory": False,  # tiny batches: nothing to gain, and a warning on CPU
}


# --------------------------------------------------------------------------------------------------------------------
# Arguments


def parse_args(argv: list[str]):
    from . import __doc__ as description

    parser = recipe_parser((CompareArguments, ModelArguments, CompareDataArguments, TrainingArguments), description)
    parser.set_defaults(**TRAINING_DEFAULTS)
    if len(argv) == 1 and argv[0].endswith(".json"):
        return parser.parse_json_file(json_file=os.path.abspath(argv[0]))
    return parser.parse_args_into_dataclasses(args=argv)


def check_model_arguments(model_args: ModelArguments) -> None:
    if model_args.attention_solver is not None:
        raise ValueError("compare trains every entry of --solvers; do not pass --attention_solver.")
    if model_args.model_name_or_path is not None:
        raise ValueError("compare trains every solver from scratch; --model_name_or_path is not supported "
                         "(use --config_name / --config_overrides for the model shape).")
    if model_args.use_lora:
        raise ValueError("compare trains full models; --use_lora is not supported.")


# --------------------------------------------------------------------------------------------------------------------
# The plan: every argument checked, the task prepared, the finished runs found; nothing written yet


@dataclass
class Comparison:
    """Everything a comparison needs once its arguments are checked."""

    argv: list[str]
    started: float
    compare_args: CompareArguments
    model_args: ModelArguments
    training_args: TrainingArguments
    specs: list[SolverSpec]
    seeds: list[int]
    output_dir: Path
    task: PreparedTask
    base_config: EnergyGPTConfig
    configs: dict[str, EnergyGPTConfig]
    shared: dict[str, Any]
    train_hashes: dict[int, str]
    plan: list[tuple[SolverSpec, int]]
    finished: dict[str, dict[int, dict[str, Any]]]
    reference: dict[str, Any]
    baseline_runs: dict[int, dict[str, Any]] = field(default_factory=dict)
    trained: int = 0
    reused: int = 0

    def run_settings(self, spec: SolverSpec, seed: int) -> dict[str, Any]:
        return {"shared": self.shared, "solver": spec.solver, "solver_overrides": spec.overrides, "seed": seed,
                "train_data_sha256": self.train_hashes[seed]}


def run_plan(specs: list[SolverSpec], seeds: list[int]) -> list[tuple[SolverSpec, int]]:
    """Interleaved by seed (an interruption keeps whole seeds): every solver of the first seed, then of the second.
    The order rotates with the seed (the k-th seed starts at the k-th solver), so no solver always runs first, on a
    cold process, or last, after the others' memory churn."""
    plan = []
    for index, seed in enumerate(seeds):
        start = index % len(specs)
        plan += [(spec, seed) for spec in specs[start:] + specs[:start]]
    return plan


def find_finished_runs(comparison: Comparison) -> None:
    """--resume: the finished runs whose settings match; a finished run with other settings is an error."""
    defaults = default_settings()
    for spec, seed in comparison.plan:
        existing = read_run(run_directory(comparison.output_dir, spec.dirname, seed))
        if existing is None:
            continue
        expected = comparison.run_settings(spec, seed)
        differences = []
        if existing.get("settings_sha256") != settings_sha256(expected):
            differences = settings_differences(expected, existing.get("settings", {}), defaults)
        if differences:
            raise ValueError(
                f"--resume: the finished run {spec.label!r} seed {seed} in {comparison.output_dir} was trained with "
                f"other settings (differs in {describe_differences(differences) or 'its settings hash'}); pass "
                "--overwrite to start anew or choose another --output_dir."
            )
        comparison.finished[spec.label][seed] = existing
    comparison.reused = sum(len(by_seed) for by_seed in comparison.finished.values())


def choose_reference(comparison: Comparison) -> None:
    """The reference runs: this comparison's plain gd, or --baseline_dir's."""
    reference_spec = next((spec for spec in comparison.specs if spec.is_reference), None)
    baseline_dir = comparison.compare_args.baseline_dir
    if reference_spec is not None:
        comparison.reference = {"label": reference_spec.label,
                                "description": f"the {REFERENCE_SOLVER} runs of this comparison"}
    elif baseline_dir:
        comparison.baseline_runs = load_baseline_runs(
            Path(baseline_dir), comparison.seeds, comparison.shared, comparison.train_hashes, default_settings())
        comparison.reference = {
            "label": REFERENCE_SOLVER,
            "description": f"the {REFERENCE_SOLVER} runs of --baseline_dir {baseline_dir} (same settings and seeds)",
        }


def prepare(argv: list[str], started: float) -> Comparison:
    """Check every argument, prepare the task and the configs, and find the finished runs; raise on any bad argument
    before the output folder is touched."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # One output folder and one timing per run: several ranks would race on both.
        raise RuntimeError("compare runs as a single process; start it with python / energy-gpt, not torchrun.")
    compare_args, model_args, data_args, training_args = parse_args(argv)
    check_model_arguments(model_args)
    check_training_steps(training_args, required=True)  # every run trains the same number of steps
    setup_logging(training_args)
    training_args.include_num_input_tokens_seen = "all"  # tokens/s needs Trainer's count of input tokens
    preset = PRESETS.get(compare_args.preset)
    if preset is not None:
        compare_args.task = compare_args.task or preset.task
    if model_args.config_name is None:
        model_args.config_overrides = ",".join(filter(None, (
            DEFAULT_MODEL_OVERRIDES, preset.config_overrides if preset else None, model_args.config_overrides)))
    specs = compare_args.solver_specs()
    seeds = compare_args.seed_list(training_args.seed)
    output_dir = Path(training_args.output_dir)
    check_output_dir(output_dir, compare_args)
    if compare_args.baseline_dir and any(spec.is_reference for spec in specs):
        raise ValueError(f"--baseline_dir is for comparisons without {REFERENCE_SOLVER!r} in --solvers; this one "
                         f"trains its own {REFERENCE_SOLVER!r} runs.")

    saved_tokenizer = output_dir / TOKENIZER_DIRNAME
    use_saved = compare_args.resume and model_args.tokenizer_name is None and saved_tokenizer.is_dir()
    task = prepare_task(TaskInputs(compare_args, data_args, model_args, training_args,
                                   saved_tokenizer if use_saved else None))
    base_config = runner.build_base_config(model_args, task)
    shared = as_json({
        "task": task.description,
        "validation_data_sha256": dataset_sha256(task.eval_dataset),
        "tokenizer_sha256": tokenizer_sha256(task.tokenizer),
        "model": config_settings(base_config),
        "training": training_settings(training_args),
        "torch_num_threads": compare_args.torch_num_threads,
        "device_type": training_args.device.type,
    })
    comparison = Comparison(
        argv=argv, started=started, compare_args=compare_args, model_args=model_args, training_args=training_args,
        specs=specs, seeds=seeds, output_dir=output_dir, task=task, base_config=base_config,
        configs={spec.label: runner.build_run_config(base_config, spec) for spec in specs}, shared=shared,
        train_hashes={seed: dataset_sha256(task.train_dataset_for(seed)) for seed in seeds},
        plan=run_plan(specs, seeds), finished={spec.label: {} for spec in specs},
        reference={"label": None, "description": f"none (no plain {REFERENCE_SOLVER} run)"},
    )
    if compare_args.resume:
        find_finished_runs(comparison)
    choose_reference(comparison)
    return comparison


# --------------------------------------------------------------------------------------------------------------------
# Training and reporting


def complete_seeds(comparison: Comparison) -> list[int]:
    """The seeds whose every planned run has finished."""
    return [seed for seed in comparison.seeds
            if all(seed in comparison.finished[spec.label] for spec in comparison.specs)]


def plot_title(comparison: Comparison) -> str:
    """Names the seeds whose runs have all finished (a band over seeds that have not is not what the plot shows)."""
    complete = complete_seeds(comparison)
    seeds = ", ".join(map(str, complete)) or "none complete yet"
    if len(complete) < len(comparison.seeds):
        seeds += f" ({len(complete)} of {len(comparison.seeds)} planned seeds complete)"
    return (f"EnergyGPT solvers on {comparison.task.name}: {comparison.training_args.max_steps} steps, "
            f"seeds {seeds}")


def rebuild_outputs(comparison: Comparison, draw_plot: bool) -> str:
    """The table, CSV, JSON (and the plot when `draw_plot`) from every finished run; returns the table."""
    seeds = comparison.seeds
    runs = {**({REFERENCE_SOLVER: comparison.baseline_runs} if comparison.baseline_runs else {}),
            **{label: {seed: by_seed[seed] for seed in seeds if seed in by_seed}
               for label, by_seed in comparison.finished.items()}}
    runs = {label: by_seed for label, by_seed in runs.items() if by_seed}
    reference_label = comparison.reference["label"]
    summary = aggregate(runs, reference_label, comparison.compare_args.reach_tolerance)
    finished_runs = [run for by_seed in comparison.finished.values() for run in by_seed.values()]
    timing = {
        "wall_seconds": time.perf_counter() - comparison.started, "trained": comparison.trained,
        "reused": comparison.reused, "finished": len(finished_runs), "planned": len(comparison.plan),
        "run_seconds": math.fsum(run["wall_seconds"] for run in finished_runs),
    }
    task, training_args = comparison.task, comparison.training_args
    command = recipe_command("compare", comparison.argv)
    machine = runner.machine_description(training_args.device)
    memory_description = runner.PeakMemoryMeter.describe(training_args.device)
    lines = header_lines(task, comparison.base_config, comparison.specs, seeds, training_args, machine, timing,
                         command, comparison.reference)
    table = render_table(summary, lines, reference_label, memory_description, comparison.compare_args.reach_tolerance,
                         task.metric, task.chance, task.baselines)
    report = {
        "command": command, "seeds": seeds, "solvers": [spec.label for spec in comparison.specs],
        "reference": comparison.reference,
        "settings": {**comparison.shared, "task_name": task.name, "blind_guess_loss": task.blind_guess_loss,
                     "metric": task.metric, "chance": task.chance, "chance_description": task.chance_description,
                     "baselines": task.baselines},
        "machine": machine, "timing": timing, "memory_measure": memory_description,
        "summary": summary, "runs": runs,
    }
    write_outputs(comparison.output_dir, report, table, plot_title(comparison) if draw_plot else None)
    return table


def train_and_save_run(comparison: Comparison, spec: SolverSpec, seed: int) -> dict[str, Any]:
    """Train one run in a staging folder that becomes `runs/<solver>/seed-<seed>/` only once `run.json` is written."""
    run_dir = run_directory(comparison.output_dir, spec.dirname, seed)
    try:
        with atomic_directory(run_dir, overwrite=True) as staging:
            result = runner.train_one_run(spec, seed, comparison.configs[spec.label], comparison.task,
                                          comparison.model_args, comparison.training_args, staging)
            expected = comparison.run_settings(spec, seed)
            result.update(settings=expected, settings_sha256=settings_sha256(expected))
            _remove_empty_dirs(staging / "trainer")
            atomic_write_json(staging / RUN_FILE, result)
    except BaseException:
        _remove_empty_dirs(run_dir.parent)  # the solver's folder, when this was to be its first run
        raise
    return result


def remaining_time(comparison: Comparison, runs_left: int) -> str:
    """`about 3 min 10 s for the 9 runs left (mean of the 3 runs trained so far: 21 s)`."""
    trained = [run["wall_seconds"] for by_seed in comparison.finished.values() for run in by_seed.values()]
    mean = math.fsum(trained) / len(trained)
    return (f"about {duration_text(mean * runs_left)} for the {runs_left} runs left (mean of the {len(trained)} runs "
            f"so far: {duration_text(mean)})")


def execute(comparison: Comparison) -> str:
    """Train every run not finished yet, in plan order, rebuilding the outputs after each; returns the final table."""
    start_output_dir(comparison.output_dir, comparison.compare_args)
    task, training_args = comparison.task, comparison.training_args
    if task.trained_tokenizer:
        with atomic_directory(comparison.output_dir / TOKENIZER_DIRNAME, overwrite=True) as staging:
            task.tokenizer.save_pretrained(staging)
    plan, plot_is_current = comparison.plan, False
    runs_left = sum(seed not in comparison.finished[spec.label] for spec, seed in plan)
    for index, (spec, seed) in enumerate(plan, start=1):
        progress = f"[{index}/{len(plan)}] {spec.label}, seed {seed}"
        if seed in comparison.finished[spec.label]:
            logger.info(f"{progress}: finished earlier, reused")
            continue
        config = comparison.configs[spec.label]
        logger.info(f"{progress}: training ({config.n_layer} layers, {training_args.max_steps} steps)")
        result = train_and_save_run(comparison, spec, seed)
        comparison.finished[spec.label][seed] = result
        comparison.trained += 1
        runs_left -= 1
        logger.info(
            f"{progress}: final validation loss {result['final_validation_loss']:.4f} (best "
            f"{result['best_validation_loss']:.4f}), {result['tokens_per_second']:,.0f} tokens/s, "
            f"{result['wall_seconds']:.0f} s; saved in {run_directory(comparison.output_dir, spec.dirname, seed)}"
        )
        if runs_left:
            logger.info(f"Time left: {remaining_time(comparison, runs_left)}")
        # The table after every run; the plot once a seed is complete (and at the end).
        seed_complete = index == len(plan) or plan[index][1] != seed
        rebuild_outputs(comparison, draw_plot=seed_complete)
        plot_is_current = seed_complete
    return rebuild_outputs(comparison, draw_plot=not plot_is_current)


def print_summary(table: str, output_dir: Path) -> None:
    print(table)
    print(f"Comparison table: {output_dir / OUTPUT_FILES['table']}")
    print(f"Loss curves plot: {output_dir / OUTPUT_FILES['plot']}")
    print(f"Loss curves data: {output_dir / OUTPUT_FILES['csv']}, {output_dir / OUTPUT_FILES['json']}")
    print(f"Per-run results: {output_dir / RUNS_DIRNAME}/<solver>/seed-<seed>/{RUN_FILE}")


ARGUMENT_ERRORS = (ValueError, FileExistsError, FileNotFoundError, RuntimeError)


def train_and_report(comparison: Comparison) -> int:
    """Train what is missing under the comparison's process settings, then print the table and where the files are."""
    with (
        runner.torch_threads(comparison.compare_args.torch_num_threads),
        runner.deterministic_algorithms(comparison.training_args.device.type == "cpu"),
        sigterm_raises_system_exit(),
    ):
        table = execute(comparison)
    print_summary(table, comparison.output_dir)
    return 0


def run(argv: list[str] | None = None) -> int:
    """The comparison; a bad argument raises (before anything is written)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    return train_and_report(prepare(argv, time.perf_counter()))


def main(argv: list[str] | None = None) -> int:
    """`energy-gpt compare`: a bad argument ends it at once with one line on stderr and exit status 2."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        comparison = prepare(argv, time.perf_counter())
    except ARGUMENT_ERRORS as error:
        return argument_error_exit("compare", error)
    return train_and_report(comparison)


__all__ = [
    "DEFAULT_MODEL_OVERRIDES",
    "TRAINING_DEFAULTS",
    "Comparison",
    "execute",
    "main",
    "parse_args",
    "prepare",
    "run",
]
