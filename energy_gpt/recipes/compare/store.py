"""The output folder of `energy-gpt compare`: one `runs/<solver>/seed-<seed>/run.json` per finished run, the settings a
finished run must match to be reused (`--resume`, `--baseline_dir`), and the clean-up of interrupted runs."""

import contextlib
import hashlib
import json
import logging
import shutil
import signal
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
from transformers import TrainingArguments

from ...modeling import EnergyGPTConfig
from .arguments import NON_MODEL_CONFIG_KEYS, REFERENCE_SOLVER, CompareArguments

logger = logging.getLogger(__name__)

RUNS_DIRNAME, RUN_FILE = "runs", "run.json"
OUTPUT_FILES = {
    "table": "comparison.md",
    "csv": "loss_curves.csv",
    "json": "loss_curves.json",
    "plot": "loss_curves.png",
}
# TrainingArguments that cannot change a run's numbers (where it is written, how it is logged or uploaded): left out
# of the settings a finished run must match to be reused. The seed is part of every run's own settings.
NON_RESULT_TRAINING_ARGUMENTS = frozenset({
    "output_dir", "logging_dir", "run_name", "seed", "disable_tqdm", "log_level", "log_level_replica",
    "log_on_each_node", "report_to", "push_to_hub", "hub_model_id", "hub_strategy", "hub_token", "hub_private_repo",
    "hub_always_push", "hub_revision", "resume_from_checkpoint", "save_strategy", "save_steps", "save_total_limit",
    "save_only_model", "save_on_each_node", "save_safetensors", "dataloader_num_workers", "dataloader_pin_memory",
    "dataloader_persistent_workers", "dataloader_prefetch_factor", "trackio_space_id", "project",
})


def config_settings(config: EnergyGPTConfig) -> dict[str, Any]:
    return {key: value for key, value in sorted(config.to_dict().items()) if key not in NON_MODEL_CONFIG_KEYS}


def dataset_sha256(dataset) -> str:
    """Hash of every column's values: the runs' identity is the data they saw, however it was produced."""
    digest = hashlib.sha256()
    for name in sorted(dataset.column_names):
        digest.update(name.encode())
        for batch in dataset.with_format("numpy", columns=[name]).iter(batch_size=8192):
            values = batch[name]
            rows = values if values.dtype == object else [values]
            for row in rows:
                # Real-valued columns (icl_regression) keep every bit; token columns hash as before.
                floating = np.issubdtype(np.asarray(row).dtype, np.floating)
                row = np.ascontiguousarray(row, dtype=np.float64 if floating else np.int64)
                digest.update(str(row.shape).encode())
                digest.update(row.tobytes())
    return digest.hexdigest()


def tokenizer_sha256(tokenizer) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    text = backend.to_str() if backend is not None else json.dumps(tokenizer.get_vocab(), sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()


def training_settings(training_args: TrainingArguments) -> dict[str, Any]:
    values = training_args.to_dict()
    return {key: values[key] for key in sorted(values) if key not in NON_RESULT_TRAINING_ARGUMENTS}


def as_json(settings: dict[str, Any]) -> dict[str, Any]:
    """`settings` as they read back from run.json (string keys, lists), so a stored run compares equal."""
    return json.loads(json.dumps(settings, sort_keys=True, default=str))


def settings_sha256(settings: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()
_MISSING = object()


def settings_differences(expected: Any, found: Any, defaults: Any = None, prefix: str = "") -> list[str]:
    """Dotted paths where two settings trees differ (for an error message a user can act on).

    A field `found` lacks is no difference when `expected` has the value `defaults` gives it: a field the config or
    TrainingArguments gained since the run was made (a newly registered energy's options, say), left at its default,
    cannot have changed the run.
    """
    if isinstance(expected, dict) and isinstance(found, dict):
        defaults = defaults if isinstance(defaults, dict) else {}
        differences = []
        for key in sorted(set(expected) | set(found), key=str):
            value, stored = expected.get(key, _MISSING), found.get(key, _MISSING)
            if stored is _MISSING and value is not _MISSING and _same(value, defaults.get(key, _MISSING)):
                continue
            differences += settings_differences(value, stored, defaults.get(key), f"{prefix}{key}.")
        return differences
    return [] if _same(expected, found) else [prefix.rstrip(".")]


def _same(first: Any, second: Any) -> bool:
    if first is _MISSING or second is _MISSING:
        return first is second
    return json.dumps(first, sort_keys=True, default=str) == json.dumps(second, sort_keys=True, default=str)


def default_settings() -> dict[str, Any]:
    """What every config / TrainingArguments field is by default, laid out as the settings are."""
    with contextlib.suppress(Exception):  # defaults only soften the check; without them it is simply strict
        defaults = TrainingArguments(output_dir="unused", report_to="none")
        return as_json({"shared": {"model": config_settings(EnergyGPTConfig()), "training": training_settings(defaults)}})
    return {}


def describe_differences(differences: list[str], limit: int = 8) -> str:
    shown = ", ".join(differences[:limit])
    return shown + (f" and {len(differences) - limit} more" if len(differences) > limit else "")


# --------------------------------------------------------------------------------------------------------------------
# The output folder: one folder per finished run, partial folders cleaned up


def run_directory(output_dir: Path, spec_dirname: str, seed: int) -> Path:
    return output_dir / RUNS_DIRNAME / spec_dirname / f"seed-{seed}"


def read_run(path: Path) -> dict[str, Any] | None:
    run_file = path / RUN_FILE
    return json.loads(run_file.read_text()) if run_file.is_file() else None


def is_compare_output(folder: Path) -> bool:
    return (folder / RUNS_DIRNAME).is_dir() or any((folder / name).exists() for name in OUTPUT_FILES.values())


def remove_stale_partials(output_dir: Path) -> list[Path]:
    """Remove what an interrupted comparison can leave: `io_utils`' hidden staging / backup folders
    (`.NAME.partial-*`, `.NAME.old-*`) and temporary files (`.NAME.*.tmp`), inside `output_dir` and beside it.
    A SIGTERM or Ctrl-C removes its own partial folder; a SIGKILL cannot, so a resume cleans up first."""
    candidates = [*output_dir.rglob(".*"), *output_dir.parent.glob(f".{output_dir.name}.partial-*")]
    removed = []
    for path in sorted(candidates, key=lambda p: len(p.parts)):
        if not path.exists():
            continue  # inside a folder removed just before
        if path.is_dir() and (".partial-" in path.name or ".old-" in path.name):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
        elif path.is_file() and path.name.endswith(".tmp"):
            path.unlink(missing_ok=True)
            removed.append(path)
    return removed


def _remove_empty_dirs(root: Path) -> None:
    """Drop the Trainer folders that stayed empty (nothing is saved unless --save_strategy asks)."""
    if not root.is_dir():
        return
    for path in sorted(root.rglob("*"), key=lambda p: len(p.parts), reverse=True) + [root]:
        if path.is_dir() and not any(path.iterdir()):
            path.rmdir()


def check_output_dir(output_dir: Path, compare_args: CompareArguments) -> None:
    """Refuse, before any work, to mix with or remove results the user did not ask about."""
    if output_dir.exists() and not output_dir.is_dir():
        raise FileExistsError(f"--output_dir {output_dir} exists and is not a directory.")
    if not (output_dir.is_dir() and any(output_dir.iterdir())):
        return
    if not (compare_args.resume or compare_args.overwrite):
        raise FileExistsError(
            f"--output_dir {output_dir} already exists and is not empty; pass --resume to continue that comparison "
            "(finished runs are reused) or --overwrite to replace it."
        )
    if not is_compare_output(output_dir):
        raise FileExistsError(
            f"--output_dir {output_dir} is not empty and holds no comparison (no {RUNS_DIRNAME}/, no "
            f"{OUTPUT_FILES['table']}); choose another --output_dir."
        )


def start_output_dir(output_dir: Path, compare_args: CompareArguments) -> None:
    """Called once everything is validated: `--overwrite` removes the earlier results now, `--resume` cleans up."""
    if compare_args.overwrite and output_dir.is_dir() and any(output_dir.iterdir()):
        logger.info(f"--overwrite: removing the earlier results in {output_dir}")
        shutil.rmtree(output_dir)
    if output_dir.is_dir():
        for path in remove_stale_partials(output_dir):
            logger.info(f"Removed a partial file / folder of an interrupted run: {path}")
        _remove_empty_dirs(output_dir / RUNS_DIRNAME)
    output_dir.mkdir(parents=True, exist_ok=True)


@contextlib.contextmanager
def sigterm_raises_system_exit() -> Iterator[None]:
    """SIGTERM (a scheduler's or `kill`'s stop) raises `SystemExit(143)` in the main thread, as Ctrl-C raises
    KeyboardInterrupt: the run in progress unwinds through its `atomic_directory`, which removes the partial folder,
    and the finished runs stay. The previous handler is restored afterwards."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def load_baseline_runs(
    baseline_dir: Path, seeds: list[int], shared: dict[str, Any], train_hashes: dict[int, str],
    defaults: dict[str, Any],
) -> dict[int, dict[str, Any]]:
    """The gd runs of an earlier comparison, one per seed, after checking that they were trained with the settings of
    this comparison (the solver aside)."""
    flag = f"--baseline_dir {baseline_dir}"
    if not baseline_dir.is_dir():
        raise ValueError(f"{flag}: no such folder.")
    runs, missing = {}, []
    for seed in seeds:
        run = read_run(run_directory(baseline_dir, REFERENCE_SOLVER, seed))
        if run is None or run["settings"].get("solver_overrides"):
            missing.append(seed)
            continue
        differences = settings_differences(
            {"shared": shared, "train_data_sha256": train_hashes[seed]},
            {"shared": run["settings"]["shared"], "train_data_sha256": run["settings"]["train_data_sha256"]},
            defaults,
        )
        if differences:
            raise ValueError(
                f"{flag}: its {REFERENCE_SOLVER} run of seed {seed} was trained with other settings than this "
                f"comparison (differs in {describe_differences(differences)}); the baseline must differ only in the solver."
            )
        runs[seed] = run
    if missing:
        raise ValueError(
            f"{flag} has no finished plain {REFERENCE_SOLVER} run for seed(s) {missing} (looked for "
            f"{RUNS_DIRNAME}/{REFERENCE_SOLVER}/seed-N/{RUN_FILE}); run them there with --resume, or pass --seeds it has."
        )
    return runs


__all__ = [
    "OUTPUT_FILES",
    "RUNS_DIRNAME",
    "RUN_FILE",
    "as_json",
    "check_output_dir",
    "config_settings",
    "dataset_sha256",
    "default_settings",
    "describe_differences",
    "load_baseline_runs",
    "read_run",
    "run_directory",
    "settings_differences",
    "settings_sha256",
    "sigterm_raises_system_exit",
    "start_output_dir",
    "tokenizer_sha256",
    "training_settings",
]
