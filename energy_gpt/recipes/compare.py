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
"""

import contextlib
import copy
import csv
import ctypes
import ctypes.util
import dataclasses
import difflib
import gc
import hashlib
import io
import json
import logging
import math
import os
import platform
import re
import shutil
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import torch
import transformers
from transformers import (
    AutoTokenizer,
    PreTrainedTokenizerFast,
    Trainer,
    TrainerCallback,
    TrainingArguments,
    default_data_collator,
    set_seed,
)

from .. import modeling
from ..io_utils import (
    atomic_directory,
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_text,
)
from ..modeling import ATTENTION_SOLVERS, EnergyGPTConfig, EnergyGPTForCausalLM
from .arguments import ModelArguments
from .common import (
    build_config,
    build_model,
    build_tokenizer,
    limit_samples,
    recipe_command,
    recipe_parser,
    setup_logging,
)
from .pretrain import DataTrainingArguments, build_lm_datasets, load_raw_datasets
from .stats import (
    loss_at_step,
    paired_difference,
    steps_to_reach,
    summarize_values,
    verdict,
)
from .synthetic import (
    VALIDATION_SEED,
    LISTask,
    blind_guess_loss,
    build_lis_dataset,
    build_lis_tokenizer,
)

logger = logging.getLogger(__name__)

REFERENCE_SOLVER = "gd"
# A small model trained from scratch, prepended to --config_overrides when there is no --config_name (the user's
# own overrides come later and win). No dropout: the synthetic data never repeats, and noise would blur the curves.
DEFAULT_MODEL_OVERRIDES = "n_layer=4,n_embd=64,n_head=4,resid_pdrop=0.0,embd_pdrop=0.0,attn_pdrop=0.0"
DEFAULT_TEXT_BLOCK_SIZE = 128
DEFAULT_NUM_SEEDS = 2
DEFAULT_TOKENIZER_VOCAB_SIZE = 4096
TARGET_FRACTIONS = (0.25, 0.5, 0.75, 1.0)  # points of gd's curve whose loss the other solvers must reach
BPE_SPECIAL_TOKEN = "<|endoftext|>"  # bos, eos and pad of a trained BPE (GPT-2's convention)
RUNS_DIRNAME, RUN_FILE, TOKENIZER_DIRNAME = "runs", "run.json", "tokenizer"

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
# Config keys that do not describe the model (bookkeeping written by transformers).
NON_MODEL_CONFIG_KEYS = frozenset({"transformers_version", "_name_or_path", "architectures", "auto_map", "model_type"})


# --------------------------------------------------------------------------------------------------------------------
# Config overrides: `field=value,field=value`, for any config field


def _split_top_level(text: str, separator: str) -> list[str]:
    """Split at `separator` outside brackets, so a list value (`attention_solver=[gd,nag]`) stays whole."""
    parts, depth, current = [], 0, []
    for char in text:
        depth += char in "[("
        depth -= char in ")]"
        if char == separator and depth == 0:
            parts.append("".join(current))
            current = []
        else:
            current.append(char)
    parts.append("".join(current))
    return parts


def parse_override_value(text: str) -> Any:
    """`true` / `false` -> bool, `none` / `null` -> None, numbers -> int / float, `[a,b]` -> list, else the string."""
    text = text.strip()
    lowered = text.lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    if lowered in ("none", "null"):
        return None
    for number_type in (int, float):
        with contextlib.suppress(ValueError):
            return number_type(text)
    if text.startswith("[") and text.endswith("]"):
        inner = text[1:-1].strip()
        return [parse_override_value(item) for item in _split_top_level(inner, ",")] if inner else []
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "'\"":
        return text[1:-1]
    return text


def parse_config_overrides(text: str | None, flag: str, separator: str = ",") -> dict[str, Any]:
    """`"n_layer=2,pad_token_id=0"` -> {"n_layer": 2, "pad_token_id": 0} (later fields win)."""
    fields: dict[str, Any] = {}
    for item in _split_top_level(text or "", separator):
        if not item.strip():
            continue
        name, has_value, value = item.partition("=")
        if not has_value or not name.strip():
            raise ValueError(f"{flag}: {item.strip()!r} is not of the form field=value.")
        fields[name.strip()] = parse_override_value(value)
    return fields


def config_field_names(config: EnergyGPTConfig) -> set[str]:
    return (set(config.to_dict()) | set(config.attribute_map)) - NON_MODEL_CONFIG_KEYS


def apply_config_fields(config: EnergyGPTConfig, fields: dict[str, Any], flag: str) -> EnergyGPTConfig:
    """Set `fields` on `config` and validate it; an unknown field or a rejected value raises a `ValueError` that names
    the flag and the field."""
    known = config_field_names(config)
    for name, value in fields.items():
        if name not in known:
            close = difflib.get_close_matches(name, sorted(known), n=3)
            hint = f"; did you mean {' or '.join(close)}?" if close else "."
            raise ValueError(f"{flag}: {name!r} is not a field of {type(config).__name__}{hint}")
        current = getattr(config, name, None)
        if isinstance(current, float) and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)  # `resid_pdrop=0` means 0.0
        setattr(config, name, value)
    try:
        config._validate_config()
    except ValueError as error:
        raise ValueError(f"{flag}: {error}") from error
    return config


# --------------------------------------------------------------------------------------------------------------------
# Arguments


@dataclass(frozen=True)
class SolverSpec:
    """One entry of --solvers: a solver name (anything `EnergyGPTConfig(attention_solver=...)` accepts) and config
    overrides for this entry only, written `solver:field=value:field=value`."""

    label: str
    solver: str
    overrides: dict[str, Any]

    @property
    def dirname(self) -> str:
        return re.sub(r"[^A-Za-z0-9_.+=-]+", "_", self.label)

    @property
    def is_reference(self) -> bool:
        return self.solver == REFERENCE_SOLVER and not self.overrides


def parse_solver_specs(text: str) -> list[SolverSpec]:
    specs = []
    for entry in (part.strip() for part in text.split(",")):
        if not entry:
            continue
        solver, _, overrides = entry.partition(":")
        flag = f"--solvers entry {entry!r}"
        spec = SolverSpec(entry, solver.strip(), parse_config_overrides(overrides, flag, separator=":"))
        # Any solver the config accepts (compositions, later solvers and energies): the config is the judge.
        apply_config_fields(EnergyGPTConfig(), {"attention_solver": spec.solver, **spec.overrides}, flag)
        specs.append(spec)
    if not specs:
        raise ValueError(f"--solvers {text!r} is empty; registered solvers: {list(ATTENTION_SOLVERS)}.")
    labels = [spec.label for spec in specs]
    if len(set(labels)) != len(labels):
        raise ValueError(f"--solvers {text!r} names an entry twice.")
    if len({spec.dirname for spec in specs}) != len(specs):
        raise ValueError(f"--solvers {text!r}: two entries differ only in characters folder names cannot hold.")
    return specs


@dataclass
class CompareArguments:
    """What to compare, how many seeds, where to resume from, and the shape of the embedded synthetic task."""

    solvers: str | None = field(
        default=None,
        metadata={"help": "Comma-separated solvers to train, in this order (default: every registered solver, read "
                          "when the comparison starts): any `attention_solver` the config accepts "
                          f"(registered: {list(ATTENTION_SOLVERS)}, compositions such as 'nag+newton_light'). An entry "
                          "may carry its own config overrides after colons, e.g. 'momentum:momentum_form=ema'. The "
                          f"speed and verdict columns compare against {REFERENCE_SOLVER!r} (or --baseline_dir)."},
    )
    attention_energies: str | None = field(
        default=None,
        metadata={"help": "Comma-separated attention energies, e.g. 'softmax,linear,gated_linear': every --solvers entry "
                          "runs on every energy (entries on other energies get ':attention_energy=...'; pairs that do "
                          "not exist, such as newton on a linear energy, are left out with a note). Default: the "
                          "entries as given (softmax)."},
    )
    seeds: str | None = field(
        default=None, metadata={"help": "Comma-separated seeds, e.g. '1,2,3' (default: --num_seeds seeds from --seed)."}
    )
    num_seeds: int | None = field(
        default=None,
        metadata={"help": f"Seeds --seed, --seed + 1, ... (default {DEFAULT_NUM_SEEDS}); not with --seeds."},
    )
    resume: bool = field(
        default=False,
        metadata={"help": "Continue the comparison in --output_dir: reuse the finished (solver, seed) runs whose "
                          "settings match, train the others."},
    )
    overwrite: bool = field(
        default=False, metadata={"help": "Remove the results of an earlier comparison in --output_dir and start anew."}
    )
    baseline_dir: str | None = field(
        default=None,
        metadata={"help": f"Output folder of an earlier compare whose {REFERENCE_SOLVER!r} runs (same settings and "
                          f"seeds) are the reference, when {REFERENCE_SOLVER!r} is not in --solvers."},
    )
    reach_tolerance: float = field(
        default=1e-3,
        metadata={"help": "Nats: a solver that ends within this of a target loss counts as reaching it (so a "
                          "0.0001-nat difference cannot turn 'the last step' into 'not reached')."},
    )
    tokenizer_vocab_size: int = field(
        default=DEFAULT_TOKENIZER_VOCAB_SIZE,
        metadata={"help": "Text without --tokenizer_name: vocabulary of the byte-level BPE trained on the training "
                          "text (saved with the results)."},
    )
    torch_num_threads: int = field(
        default=1,
        metadata={"help": "CPU threads for PyTorch's operators (torch.set_num_threads); 0 keeps PyTorch's default (one "
                          "per core). 1 by default: the default model is so small that a second thread gains little, "
                          "on a busy machine spinning OpenMP threads made each step ~10x slower in our measurements, "
                          "and a fixed count keeps the losses reproducible."},
    )
    lis_min_length: int = field(default=4, metadata={"help": "Synthetic task: shortest number sequence."})
    lis_max_length: int = field(default=10, metadata={"help": "Synthetic task: longest number sequence."})
    lis_max_value: int = field(default=16, metadata={"help": "Synthetic task: numbers are drawn from [0, max_value)."})
    num_train_examples: int | None = field(
        default=None,
        metadata={"help": "Synthetic task: training examples per seed (default: enough for every step to see new "
                          "ones)."},
    )
    num_validation_examples: int = field(
        default=512, metadata={"help": "Synthetic task: validation examples (the same for every seed)."}
    )

    def __post_init__(self):
        self.solver_specs()  # validates every entry early, with the config's own messages
        if self.seeds is not None and self.num_seeds is not None:
            raise ValueError("Pass --seeds or --num_seeds, not both.")
        if self.num_seeds is not None and self.num_seeds <= 0:
            raise ValueError(f"--num_seeds must be a positive integer, got {self.num_seeds}.")
        if self.seeds is not None:
            self.seed_list(0)
        if self.resume and self.overwrite:
            raise ValueError("Pass --resume (continue) or --overwrite (start anew), not both.")
        if self.reach_tolerance < 0:
            raise ValueError(f"--reach_tolerance must be >= 0, got {self.reach_tolerance}.")
        if self.tokenizer_vocab_size <= 256:
            raise ValueError(
                f"--tokenizer_vocab_size must be larger than 256 (the byte alphabet), got {self.tokenizer_vocab_size}."
            )
        if self.num_train_examples is not None and self.num_train_examples <= 0:
            raise ValueError(f"--num_train_examples must be a positive integer, got {self.num_train_examples}.")
        if self.torch_num_threads < 0:
            raise ValueError(f"--torch_num_threads must be >= 0 (0: PyTorch's default), got {self.torch_num_threads}.")
        if self.num_validation_examples <= 0:
            raise ValueError(f"--num_validation_examples must be a positive integer, got {self.num_validation_examples}.")
        self.lis_task()  # validates the --lis_* values early

    def solver_entries(self) -> str:
        return ",".join(ATTENTION_SOLVERS) if self.solvers is None else self.solvers

    def solver_specs(self) -> list[SolverSpec]:
        if not self.attention_energies:
            return parse_solver_specs(self.solver_entries())
        entries = []
        for energy in (name.strip() for name in self.attention_energies.split(",") if name.strip()):
            for entry in (part.strip() for part in self.solver_entries().split(",") if part.strip()):
                entry = entry if energy == "softmax" else f"{entry}:attention_energy={energy}"
                try:
                    parse_solver_specs(entry)
                except ValueError as error:
                    if "attention_energy" in str(error) and "does not exist" in str(error):
                        logger.info(f"--attention_energies: left out {entry!r} ({error})")
                        continue
                    raise ValueError(f"--attention_energies {self.attention_energies!r}: {error}") from error
                entries.append(entry)
        return parse_solver_specs(",".join(entries))

    def seed_list(self, first_seed: int) -> list[int]:
        if self.seeds is None:
            return list(range(first_seed, first_seed + (self.num_seeds or DEFAULT_NUM_SEEDS)))
        try:
            seeds = [int(seed) for seed in self.seeds.split(",") if seed.strip()]
        except ValueError:
            raise ValueError(f"--seeds {self.seeds!r} must be comma-separated integers, e.g. '1,2,3'.") from None
        if not seeds or len(set(seeds)) != len(seeds):
            raise ValueError(f"--seeds {self.seeds!r} must name at least one seed, each once.")
        return seeds

    def lis_task(self) -> LISTask:
        return LISTask(min_length=self.lis_min_length, max_length=self.lis_max_length, max_value=self.lis_max_value)


@dataclass
class CompareDataArguments(DataTrainingArguments):
    """`pretrain`'s text options; with none of --dataset_name / --train_file / --validation_file the synthetic task
    is used instead (no default Hub dataset, so the default run needs no network)."""

    def __post_init__(self):
        self.use_synthetic_task = not (self.dataset_name or self.train_file or self.validation_file)
        if not self.use_synthetic_task:
            super().__post_init__()


# --------------------------------------------------------------------------------------------------------------------
# Measuring a run


def _release_freed_heap() -> None:
    """Return freed heap pages to the OS (glibc), so the next run's RSS baseline is not inflated by the last run."""
    gc.collect()
    libc_name = ctypes.util.find_library("c")
    if libc_name:
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(libc_name).malloc_trim(0)


class PeakMemoryMeter:
    """Peak memory during training steps (evaluation excluded), in bytes.

    CUDA: the largest `torch.cuda.max_memory_allocated()` over the steps (tensors only: weights, optimizer state,
    activations, gradients). CPU: the process's resident set size (RSS) sampled every `interval` seconds by a
    background thread while a step runs, minus the RSS just before training; `tracemalloc` cannot see torch's
    allocations. The CPU figure is approximate (allocator caching, sampling) but comparable between solvers.
    """

    def __init__(self, device: torch.device, interval: float = 0.002):
        self.on_cuda = device.type == "cuda"
        self.device = device
        self.interval = interval
        self.peak_bytes = 0
        self._in_step = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._process = psutil.Process()
        self._baseline = 0

    @staticmethod
    def describe(device: torch.device) -> str:
        if device.type == "cuda":
            return "peak torch.cuda.max_memory_allocated() during training steps"
        return "peak process RSS during training steps minus the RSS before training (psutil sampling, approximate)"

    def start(self) -> None:
        if self.on_cuda:
            return
        _release_freed_heap()
        self._baseline = self._process.memory_info().rss
        self._thread = threading.Thread(target=self._sample, name="peak-memory-meter", daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        while not self._stop.is_set():
            if self._in_step.wait(timeout=0.05):
                self.peak_bytes = max(self.peak_bytes, self._process.memory_info().rss - self._baseline)
                time.sleep(self.interval)

    def step_begin(self) -> None:
        if self.on_cuda:
            torch.cuda.reset_peak_memory_stats(self.device)
        self._in_step.set()

    def step_end(self) -> None:
        if self.on_cuda:
            self.peak_bytes = max(self.peak_bytes, torch.cuda.max_memory_allocated(self.device))
        else:
            self.peak_bytes = max(self.peak_bytes, self._process.memory_info().rss - self._baseline)
        self._in_step.clear()

    def stop(self) -> None:
        self._stop.set()
        self._in_step.set()  # wake the sampler so it sees the stop flag
        if self._thread is not None:
            self._thread.join()


class SolverRunRecorder(TrainerCallback):
    """Records one run: the training loss Trainer logs, every validation loss, the duration of every training step
    (from `on_step_begin` to `on_step_end`: forward, backward, clipping and optimizer step; evaluation and logging
    excluded) and peak memory."""

    def __init__(self, memory_meter: PeakMemoryMeter):
        self.memory_meter = memory_meter
        self.train_curve: list[dict[str, float]] = []
        self.validation_curve: list[dict[str, float]] = []
        self.step_durations: list[float] = []
        self._step_started: float | None = None

    def on_train_begin(self, args, state, control, **kwargs):
        self.memory_meter.start()

    def on_step_begin(self, args, state, control, **kwargs):
        self.memory_meter.step_begin()
        self._step_started = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        if self.memory_meter.on_cuda:
            torch.cuda.synchronize(self.memory_meter.device)
        self.step_durations.append(time.perf_counter() - self._step_started)
        self.memory_meter.step_end()

    def on_train_end(self, args, state, control, **kwargs):
        self.memory_meter.stop()

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs:
            self.train_curve.append({"step": state.global_step, "loss": float(logs["loss"])})

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        if metrics and "eval_loss" in metrics:
            point = {"step": state.global_step, "loss": float(metrics["eval_loss"])}
            if self.validation_curve and self.validation_curve[-1]["step"] == point["step"]:
                self.validation_curve[-1] = point  # the same step evaluated twice (end of training): keep one
            else:
                self.validation_curve.append(point)


# --------------------------------------------------------------------------------------------------------------------
# Data


@dataclass
class PreparedTask:
    tokenizer: Any
    eval_dataset: Any
    train_dataset_for: Callable[[int], Any]  # seed -> training dataset (the synthetic task draws one per seed)
    model_fields: dict[str, Any]  # config fields the data fixes (vocabulary, positions, special tokens)
    name: str  # short, for the plot title
    description: str  # one sentence, for the table
    tokenizer_description: str
    tokens_per_sequence: int
    blind_guess_loss: float | None = None  # loss of a model that ignores the input (synthetic task only)
    trained_tokenizer: bool = False  # a BPE trained here, to be saved with the results


def special_token_fields(tokenizer) -> dict[str, Any]:
    """The model's vocabulary and special-token ids, from its tokenizer."""
    return {
        "vocab_size": len(tokenizer),
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }


def prepare_synthetic_task(compare_args: CompareArguments, training_args: TrainingArguments) -> PreparedTask:
    """The LIS task: its tokenizer, one training set per seed, the (shared) validation set, and the config fields."""
    task = compare_args.lis_task()
    tokenizer = build_lis_tokenizer(task)
    num_train_examples = compare_args.num_train_examples
    if num_train_examples is None:
        total_batch = (
            training_args.per_device_train_batch_size * training_args.gradient_accumulation_steps
            * training_args.world_size
        )
        num_train_examples = training_args.max_steps * total_batch if training_args.max_steps > 0 else 20_000
    # The validation set has a seed of its own (a string: no integer training seed can produce the same sequences),
    # so every seed and every solver is measured on the same examples.
    eval_dataset = build_lis_dataset(task, tokenizer, compare_args.num_validation_examples, seed=VALIDATION_SEED)
    train_datasets: dict[int, Any] = {}

    def train_dataset_for(seed: int):
        if seed not in train_datasets:
            train_datasets[seed] = build_lis_dataset(task, tokenizer, num_train_examples, seed=seed)
        return train_datasets[seed]

    blind_loss = blind_guess_loss(task)
    description = (
        f"longest increasing subsequence (embedded): {num_train_examples} training sequences per seed / "
        f"{compare_args.num_validation_examples} validation sequences of {task.min_length}-{task.max_length} numbers "
        f"in [0, {task.max_value}), {task.block_length} tokens each; loss on the answer token only (guessing the answer "
        f"from its distribution alone, without reading the numbers, scores {blind_loss:.3f})"
    )
    return PreparedTask(
        tokenizer, eval_dataset, train_dataset_for, {**special_token_fields(tokenizer), "n_positions": task.block_length},
        "longest increasing subsequence", description, f"word-level, built in code ({len(tokenizer)} tokens)",
        task.block_length, blind_loss,
    )


def load_gpt2_bpe_files(folder: Path) -> PreTrainedTokenizerFast:
    """GPT-2's tokenizer from its original files (`encoder.json`, `vocab.bpe`), as in ../shared/data/gpt2-tokenizer."""
    from transformers import GPT2TokenizerFast

    # `vocab=` / `merges=` (paths): transformers 5 ignores `vocab_file=` / `merges_file=` here without a word.
    return GPT2TokenizerFast(vocab=str(folder / "encoder.json"), merges=str(folder / "vocab.bpe"))


def load_named_tokenizer(model_args: ModelArguments):
    """--tokenizer_name: a Hub id, a saved tokenizer folder, or a folder of GPT-2's original BPE files."""
    name = model_args.tokenizer_name
    folder = Path(name)
    saved_files = ("tokenizer.json", "tokenizer_config.json", "vocab.json")
    if folder.is_dir() and (folder / "encoder.json").is_file() and (folder / "vocab.bpe").is_file() and not any(
        (folder / file).exists() for file in saved_files
    ):
        tokenizer = load_gpt2_bpe_files(folder)
    else:
        try:
            tokenizer = build_tokenizer(model_args)
        except (OSError, ValueError, TypeError, KeyError) as error:
            raise ValueError(
                f"--tokenizer_name {name!r}: no tokenizer could be loaded ({type(error).__name__}: {error}). Pass a Hub "
                "id, a folder written by save_pretrained(), or a folder with GPT-2's encoder.json and vocab.bpe; or "
                "leave --tokenizer_name out to train a byte-level BPE on --train_file (--tokenizer_vocab_size)."
            ) from error
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def text_column_of(dataset, data_args: DataTrainingArguments) -> str:
    columns = list(dataset.features)
    return data_args.text_column or ("text" if "text" in columns else columns[0])


def train_bpe_tokenizer(train_split, text_column: str, vocab_size: int) -> PreTrainedTokenizerFast:
    """A byte-level BPE (GPT-2's scheme: any text is encodable, no unknown token) of `vocab_size` tokens trained on
    the training split only, with one special token that serves as bos, eos and pad."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=[BPE_SPECIAL_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    batches = (batch[text_column] for batch in train_split.iter(batch_size=1000))
    backend.train_from_iterator(batches, trainer=trainer, length=len(train_split))
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token=BPE_SPECIAL_TOKEN, eos_token=BPE_SPECIAL_TOKEN, pad_token=BPE_SPECIAL_TOKEN
    )


def prepare_text_task(
    compare_args: CompareArguments, data_args: CompareDataArguments, model_args: ModelArguments,
    training_args: TrainingArguments, saved_tokenizer_dir: Path | None,
) -> PreparedTask:
    """Causal-LM text, prepared as in `energy-gpt pretrain` (tokenize, pack into blocks of --block_size). The
    tokenizer: --tokenizer_name; else the one an earlier (resumed) comparison trained; else a new byte-level BPE."""
    if data_args.streaming:
        raise ValueError("--streaming is not supported by compare: every solver must see the same finite data.")
    block_size = data_args.block_size or DEFAULT_TEXT_BLOCK_SIZE
    data_args.block_size = block_size
    raw_datasets = load_raw_datasets(data_args, model_args)
    if "train" not in raw_datasets or "validation" not in raw_datasets:
        raise ValueError("compare needs a train and a validation split (--train_file, optionally --validation_file).")
    trained = False
    if model_args.tokenizer_name is not None:
        tokenizer = load_named_tokenizer(model_args)
        tokenizer_description = f"{model_args.tokenizer_name} ({len(tokenizer):,} tokens)"
    elif saved_tokenizer_dir is not None:
        tokenizer = AutoTokenizer.from_pretrained(saved_tokenizer_dir)
        tokenizer_description = (
            f"byte-level BPE of {len(tokenizer):,} tokens trained on the training split (saved in {TOKENIZER_DIRNAME}/)"
        )
        logger.info(f"Using the tokenizer an earlier run trained: {saved_tokenizer_dir}")
    else:
        train_split = raw_datasets["train"]
        started = time.perf_counter()
        tokenizer = train_bpe_tokenizer(train_split, text_column_of(train_split, data_args), compare_args.tokenizer_vocab_size)
        trained = True
        tokenizer_description = (
            f"byte-level BPE of {len(tokenizer):,} tokens trained on the training split (saved in {TOKENIZER_DIRNAME}/)"
        )
        logger.info(
            f"No --tokenizer_name: trained a byte-level BPE of {len(tokenizer):,} tokens on the training split in "
            f"{time.perf_counter() - started:.1f} s; it is saved with the results in {TOKENIZER_DIRNAME}/ "
            "(--tokenizer_vocab_size sets its size)."
        )
    lm_datasets = build_lm_datasets(raw_datasets, data_args, tokenizer, block_size, training_args)
    train_dataset = limit_samples(lm_datasets["train"], data_args.max_train_samples, streaming=False)
    eval_dataset = limit_samples(lm_datasets["validation"], data_args.max_eval_samples, streaming=False)
    for name, dataset in (("train", train_dataset), ("validation", eval_dataset)):
        if len(dataset) == 0:
            raise ValueError(f"The {name} split has no block of {block_size} tokens; lower --block_size.")
    source = data_args.dataset_name or ", ".join(filter(None, (data_args.train_file, data_args.validation_file)))
    description = (
        f"causal LM on {source}: {len(train_dataset)} training / {len(eval_dataset)} validation blocks of "
        f"{block_size} tokens"
    )
    # Positions: the block size (a 1024-row table for 128-token blocks would be dead weight), unless overridden.
    fields = {**special_token_fields(tokenizer), "n_positions": block_size}
    return PreparedTask(
        tokenizer, eval_dataset, lambda seed: train_dataset, fields, f"causal LM on {Path(source).name}", description,
        tokenizer_description, block_size, trained_tokenizer=trained,
    )


# --------------------------------------------------------------------------------------------------------------------
# Model configs


def build_base_config(model_args: ModelArguments, task: PreparedTask) -> EnergyGPTConfig:
    """The config every run shares: --config_name (or a default config), then the fields the data fixes (vocabulary,
    special tokens, positions), then --config_overrides (which win), then the solver flags."""
    if model_args.config_name is not None:
        config = build_config(dataclasses.replace(model_args, config_overrides=None))
    else:
        config = EnergyGPTConfig()
    apply_config_fields(config, task.model_fields, "the tokenizer / data")
    apply_config_fields(config, parse_config_overrides(model_args.config_overrides, "--config_overrides"),
                        "--config_overrides")
    apply_config_fields(config, model_args.solver_overrides(), "the solver flags")
    if config.vocab_size < len(task.tokenizer):
        raise ValueError(
            f"--config_overrides: vocab_size={config.vocab_size} is smaller than the tokenizer's {len(task.tokenizer)} "
            "tokens; leave vocab_size out to take it from the tokenizer."
        )
    if config.n_positions < task.tokens_per_sequence:
        raise ValueError(
            f"n_positions={config.n_positions} is shorter than the {task.tokens_per_sequence}-token sequences; raise "
            "n_positions in --config_overrides or lower --block_size."
        )
    return config


def build_run_config(base_config: EnergyGPTConfig, spec: SolverSpec) -> EnergyGPTConfig:
    config = copy.deepcopy(base_config)
    return apply_config_fields(config, {"attention_solver": spec.solver, **spec.overrides}, f"--solvers entry {spec.label!r}")


def config_settings(config: EnergyGPTConfig) -> dict[str, Any]:
    return {key: value for key, value in sorted(config.to_dict().items()) if key not in NON_MODEL_CONFIG_KEYS}


def count_parameters(model: torch.nn.Module) -> int:
    return sum({parameter.data_ptr(): parameter.numel() for parameter in model.parameters()}.values())  # tied once


# --------------------------------------------------------------------------------------------------------------------
# Settings a finished run must match to be reused


def dataset_sha256(dataset) -> str:
    """Hash of every column's values: the runs' identity is the data they saw, however it was produced."""
    digest = hashlib.sha256()
    for name in sorted(dataset.column_names):
        digest.update(name.encode())
        for batch in dataset.with_format("numpy", columns=[name]).iter(batch_size=8192):
            values = batch[name]
            rows = values if values.dtype == object else [values]
            for row in rows:
                row = np.ascontiguousarray(row, dtype=np.int64)
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
# Training one (solver, seed) run


def learned_solver_values(model: torch.nn.Module, task: PreparedTask, args: TrainingArguments) -> dict[str, Any] | None:
    """`energy_gpt.modeling.solver_report(model)` (ARCH_V2 contract: the learned per-layer solver parameters and
    Newton's bound-engagement fractions), after one validation batch run while the solvers record their statistics.
    None while the modeling package has no `solver_report`."""
    if not hasattr(modeling, "solver_report"):
        return None
    record_statistics = getattr(modeling, "record_solver_statistics", None)
    if record_statistics is not None:
        count = min(len(task.eval_dataset), args.per_device_eval_batch_size)
        batch = default_data_collator([task.eval_dataset[index] for index in range(count)])
        device = next(model.parameters()).device
        model.eval()
        with torch.no_grad(), record_statistics(model):
            model(**{key: value.to(device) for key, value in batch.items()})
    return modeling.solver_report(model)


def train_one_run(
    spec: SolverSpec, seed: int, config: EnergyGPTConfig, task: PreparedTask, model_args: ModelArguments,
    training_args: TrainingArguments, run_dir: Path,
) -> dict[str, Any]:
    """Train `spec` with `seed` (weights and data order); return its curves and measurements."""
    set_seed(seed)  # right before building: every solver of this seed starts from the same weights
    model = build_model(EnergyGPTForCausalLM, model_args, config, task.tokenizer)
    run_args = dataclasses.replace(training_args, output_dir=str(run_dir / "trainer"), seed=seed)
    recorder = SolverRunRecorder(PeakMemoryMeter(run_args.device))
    trainer = Trainer(
        model=model,
        args=run_args,  # Trainer seeds its sampler from args.seed: the same data order for every solver of this seed
        train_dataset=task.train_dataset_for(seed),
        eval_dataset=task.eval_dataset,
        processing_class=task.tokenizer,
        data_collator=default_data_collator,
        callbacks=[recorder],
    )
    started = time.perf_counter()
    trainer.evaluate()  # step 0: the curves start from the (shared) initial model
    trainer.train()
    if recorder.validation_curve[-1]["step"] != trainer.state.global_step:
        trainer.evaluate()  # the final validation loss is always measured at the last step
    wall_seconds = time.perf_counter() - started
    tokens = int(trainer.state.num_input_tokens_seen)
    step_seconds = math.fsum(recorder.step_durations)
    durations = np.asarray(recorder.step_durations) if recorder.step_durations else np.zeros(1)
    validation_losses = [point["loss"] for point in recorder.validation_curve]
    result = {
        "label": spec.label,
        "solver": spec.solver,
        "solver_overrides": spec.overrides,
        "seed": seed,
        "train": recorder.train_curve,
        "validation": recorder.validation_curve,
        "final_validation_loss": validation_losses[-1],
        "best_validation_loss": min(validation_losses),
        "steps": trainer.state.global_step,
        "train_tokens": tokens,
        "train_step_seconds": step_seconds,
        "step_seconds_quantiles": dict(zip(("p10", "median", "p90"), np.quantile(durations, [0.1, 0.5, 0.9]).tolist())),
        "tokens_per_second": tokens / step_seconds if step_seconds > 0 else float("nan"),
        "peak_memory_mib": recorder.memory_meter.peak_bytes / 2**20,
        "wall_seconds": wall_seconds,
        "num_parameters": count_parameters(model),
        "solver_report": learned_solver_values(trainer.model, task, run_args),
    }
    return result


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


# --------------------------------------------------------------------------------------------------------------------
# Aggregation over seeds


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


# --------------------------------------------------------------------------------------------------------------------
# Outputs


def _mean_sd(summary: dict[str, Any], digits: int, thousands: bool = False) -> str:
    if summary.get("mean") is None:
        return "–"
    pattern = f"{{:,.{digits}f}}" if thousands else f"{{:.{digits}f}}"
    text = pattern.format(summary["mean"])
    if summary.get("sd") is not None:
        text += " ± " + pattern.format(summary["sd"])
    return text


def _difference(difference: dict[str, Any], digits: int) -> str:
    if difference.get("mean") is None:
        return "–"
    text = f"{difference['mean']:+.{digits}f}"
    if difference.get("low") is not None:
        text += f" [{difference['low']:+.{digits}f}, {difference['high']:+.{digits}f}]"
    return text


def _reach_cell(steps: dict[str, Any], seconds: dict[str, Any]) -> str:
    if steps["of"] == 0:
        return "n/a"
    if steps["n"] == 0:
        return f"not reached (0/{steps['of']})"
    text = f"{_mean_sd(steps, 0)} ({_mean_sd(seconds, 1)} s)"
    if steps["n"] < steps["of"]:
        text += f", reached in {steps['n']}/{steps['of']} seeds"
    return text


def render_table(
    summary: dict[str, dict[str, Any]], header_lines: list[str], reference_label: str | None, memory_description: str,
    tolerance: float,
) -> str:
    lines = ["# EnergyGPT solver comparison", "", *header_lines, ""]
    reference_name = reference_label or REFERENCE_SOLVER
    lines += [
        "## Validation loss (mean ± sd over seeds)",
        "",
        (f"| solver | parameters | seeds | final loss | best loss | final perplexity | Δ final loss vs "
         f"{reference_name} [95 % CI] | verdict | training tokens/s | peak memory (MiB) |"),
        "|---|---:|---:|---:|---:|---:|---:|---|---:|---:|",
    ]
    for label, entry in summary.items():
        comparison = entry["vs_reference"]
        if label == reference_label:
            difference, verdict_text = "0 (reference)", "reference"
        elif comparison is None:
            difference, verdict_text = "n/a", f"no {REFERENCE_SOLVER} run (add it to --solvers or pass --baseline_dir)"
        else:
            difference = _difference(comparison["final_validation_loss"], 4)
            verdict_text = comparison["final_validation_loss"]["verdict"]
        lines.append(
            f"| {label} | {entry['num_parameters']:,} | {len(entry['seeds'])} | "
            f"{_mean_sd(entry['final_validation_loss'], 4)} | {_mean_sd(entry['best_validation_loss'], 4)} | "
            f"{_mean_sd(entry['perplexity'], 3)} | {difference} | {verdict_text} | "
            f"{_mean_sd(entry['tokens_per_second'], 0, thousands=True)} | {_mean_sd(entry['peak_memory_mib'], 1)} |"
        )
    fractions = [target_label(fraction) for fraction in TARGET_FRACTIONS]
    if reference_label is not None and reference_label in summary:
        lines += [
            "",
            (f"## Speed: steps (seconds) to reach {reference_name}'s validation loss at {' / '.join(fractions)} of "
             "its training (mean ± sd over seeds)"),
            "",
            "| solver | " + " | ".join(fractions) + " |",
            "|---|" + "---:|" * len(fractions),
        ]
        for label, entry in summary.items():
            cells = [_reach_cell(entry["steps_to_target"][key], entry["seconds_to_target"][key]) for key in fractions]
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
        lines += [
            "",
            f"## Speed against {reference_name}: paired difference in steps [95 % CI] and verdict",
            "",
            "| solver | " + " | ".join(fractions) + " |",
            "|---|" + "---|" * len(fractions),
        ]
        for label, entry in summary.items():
            if label == reference_label or entry["vs_reference"] is None:
                continue
            cells = []
            for key in fractions:
                difference = entry["vs_reference"]["steps_to_target"][key]
                prefix = f"{_difference(difference, 1)}: " if difference.get("mean") is not None else ""
                cells.append(prefix + difference["verdict"])
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
    learned = {label: entry["solver_report"] for label, entry in summary.items() if entry.get("solver_report")}
    if learned:
        num_layers = max(len(values) for report in learned.values() for values in report.values())
        lines += [
            "",
            "## What the solvers learned (end of training; mean over seeds, per-head values averaged over heads)",
            "",
            "| solver | quantity | " + " | ".join(f"layer {layer}" for layer in range(num_layers)) + " |",
            "|---|---|" + "---:|" * num_layers,
        ]
        for label, report in learned.items():
            for name, values in report.items():
                cells = ["–" if value is None else f"{value:.3f}" for value in values]
                cells += ["–"] * (num_layers - len(cells))
                lines.append(f"| {label} | {name} | " + " | ".join(cells) + " |")
    lines += [
        "",
        ("- Final / best loss: validation loss at the last step / lowest over the evaluations (every `eval_steps`); "
         "perplexity = exp(final loss), averaged over seeds."),
        (f"- Δ vs {reference_name}: per seed, this solver's final loss minus {reference_name}'s of the same seed "
         "(same initial weights and data order), averaged; the interval is the 95 % Student-t interval of that mean. "
         "`better` / `worse` only when the interval excludes zero; otherwise no difference was detected at this "
         "number of seeds (which is not evidence of no difference). One seed gives no interval and no verdict."),
        (f"- Speed: per seed, the target is {reference_name}'s validation loss at 25 / 50 / 75 / 100 % of its steps "
         "(linearly interpolated between evaluations); a solver's steps are where its own interpolated curve first "
         f"comes down to the target (ending within {tolerance:g} nats of it counts as reaching it at that evaluation); "
         "seconds = steps × its mean training-step time. `faster` / `slower`: the 95 % interval of the paired "
         "difference in steps excludes zero."),
        ("- Tokens/s: input tokens (padding included) divided by the time spent in training steps (forward, "
         "backward, optimizer; evaluation and logging excluded); ± is the spread over seeds, which includes the "
         "machine's load."),
        f"- Peak memory: {memory_description}.",
        "",
    ]
    return "\n".join(lines)


def render_csv(runs: dict[str, dict[int, dict[str, Any]]]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["solver", "seed", "split", "step", "loss"])
    for label, by_seed in runs.items():
        for seed, run in by_seed.items():
            for split in ("train", "validation"):
                for point in run[split]:
                    writer.writerow([label, seed, split, point["step"], repr(point["loss"])])
    return buffer.getvalue()


def _band(curves: list[list[dict[str, float]]]) -> tuple[list[float], np.ndarray, np.ndarray, np.ndarray]:
    """Steps every curve has, and the mean / min / max loss over the curves at those steps."""
    steps = sorted(set.intersection(*({point["step"] for point in curve} for curve in curves)))
    losses = np.array([[{p["step"]: p["loss"] for p in curve}[step] for step in steps] for curve in curves])
    return steps, losses.mean(axis=0), losses.min(axis=0), losses.max(axis=0)


def render_plot(
    runs: dict[str, dict[int, dict[str, Any]]], reference_label: str | None, title: str,
    blind_guess: float | None = None,
) -> bytes:
    """Training loss, validation loss, the validation loss of the second half of training on its own scale, and each
    solver's validation loss minus the reference's of the same seed: mean over seeds, band from min to max."""
    import matplotlib

    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(2, 2, figsize=(14, 9))
    last_step = max(point["step"] for by_seed in runs.values() for run in by_seed.values() for point in run["validation"])
    colors = {label: plt.get_cmap("tab10")(index % 10) for index, label in enumerate(runs)}
    panels = [
        (axes[0, 0], "training loss (logging window mean)", "train", 0),
        (axes[0, 1], "validation loss", "validation", 0),
        (axes[1, 0], "validation loss, second half of training", "validation", last_step / 2),
    ]
    for axis, panel_title, split, first_step in panels:
        for label, by_seed in runs.items():
            curves = [[p for p in run[split] if p["step"] >= first_step] for run in by_seed.values()]
            if not all(curves):
                continue
            steps, mean, low, high = _band(curves)
            axis.plot(steps, mean, marker="." if split == "validation" else None, color=colors[label],
                      label=f"{label} (n={len(curves)})")
            if len(curves) > 1:
                axis.fill_between(steps, low, high, color=colors[label], alpha=0.15, linewidth=0)
        if blind_guess is not None and split == "validation" and first_step == 0:
            axis.axhline(blind_guess, color="gray", linestyle="--", linewidth=1, label="blind guess")
        axis.set_title(panel_title)
        axis.set_ylabel("loss (nats / token)")
    difference_axis = axes[1, 1]
    reference = runs.get(reference_label, {}) if reference_label else {}
    if reference:
        for label, by_seed in runs.items():
            differences = []
            for seed, run in by_seed.items():
                if seed in reference:
                    reference_losses = {p["step"]: p["loss"] for p in reference[seed]["validation"]}
                    differences.append([{"step": p["step"], "loss": p["loss"] - reference_losses[p["step"]]}
                                        for p in run["validation"] if p["step"] in reference_losses])
            if differences and all(differences):
                steps, mean, low, high = _band(differences)
                difference_axis.plot(steps, mean, marker=".", color=colors[label], label=label)
                if len(differences) > 1:
                    difference_axis.fill_between(steps, low, high, color=colors[label], alpha=0.15, linewidth=0)
        difference_axis.axhline(0.0, color="black", linewidth=0.8)
        difference_axis.set_title(f"validation loss minus {reference_label}'s (same seed); below 0: better")
        difference_axis.set_ylabel("Δ loss (nats / token)")
    else:
        difference_axis.text(0.5, 0.5, f"no {REFERENCE_SOLVER} run to compare with", ha="center", va="center")
        difference_axis.set_axis_off()
    for axis in axes.flat:
        if axis.axison:
            axis.set_xlabel("step")
            axis.grid(alpha=0.3)
    axes[0, 1].legend(fontsize=9)
    figure.suptitle(f"{title}\nlines: mean over seeds; bands: min to max over seeds", fontsize=11)
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100)
    plt.close(figure)
    return buffer.getvalue()


def write_outputs(output_dir: Path, report: dict[str, Any], table: str, plot_title: str | None) -> None:
    """The aggregated files, each written atomically (a reader never sees a half-written table). `plot_title=None`
    leaves the plot as it is (drawing it takes longer than a tiny run)."""
    runs = report["runs"]
    atomic_write_text(output_dir / OUTPUT_FILES["table"], table)
    atomic_write_text(output_dir / OUTPUT_FILES["csv"], render_csv(runs))
    json_report = {**report, "runs": {label: {str(seed): run for seed, run in by_seed.items()}
                                      for label, by_seed in runs.items()}}
    atomic_write_json(output_dir / OUTPUT_FILES["json"], json_report)
    if plot_title is not None:
        plot = render_plot(runs, report["reference"]["label"], plot_title, report["settings"].get("blind_guess_loss"))
        atomic_write_bytes(output_dir / OUTPUT_FILES["plot"], plot)


# --------------------------------------------------------------------------------------------------------------------
# Description of the run (table header)


def machine_description(device: torch.device) -> dict[str, Any]:
    cpu_model = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    description = {
        "cpu": cpu_model,
        "cpu_count": os.cpu_count(),
        "usable_cpus": usable,
        "torch_threads": torch.get_num_threads(),
        "device": str(device),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
    }
    with contextlib.suppress(ImportError):
        from .. import __version__ as energy_gpt_version

        description["energy_gpt"] = energy_gpt_version
    return description


def header_lines(
    task: PreparedTask, base_config: EnergyGPTConfig, specs: list[SolverSpec], seeds: list[int],
    training_args: TrainingArguments, machine: dict[str, Any], timing: dict[str, Any], command: str,
    reference: dict[str, Any],
) -> list[str]:
    config = base_config
    scheduler = getattr(training_args.lr_scheduler_type, "value", training_args.lr_scheduler_type)
    batch = training_args.per_device_train_batch_size * training_args.gradient_accumulation_steps
    batch *= training_args.world_size
    warmup = training_args.get_warmup_steps(training_args.max_steps) if training_args.max_steps > 0 else "n/a"
    overridden = [f"{spec.label}" for spec in specs if spec.overrides]
    precision = ", ".join(flag for flag in ("bf16", "fp16", "tf32") if getattr(training_args, flag, None)) or "fp32"
    device = machine["gpu"] or machine["cpu"]
    lines = [
        f"- Task: {task.description}.",
        (f"- Tokenizer: {task.tokenizer_description}; model vocabulary {config.vocab_size:,}, bos / eos / pad ids "
         f"{config.bos_token_id} / {config.eos_token_id} / {config.pad_token_id}."),
        (f"- Model: {config.n_layer} layers, n_embd {config.n_embd}, {config.n_head} heads, n_positions "
         f"{config.n_positions}, dropout resid / embd / attn {config.resid_pdrop} / {config.embd_pdrop} / "
         f"{config.attn_pdrop}, trained from scratch (parameters per solver below). Solvers: "
         f"{', '.join(spec.label for spec in specs)}"
         + (f" (entries with their own config overrides: {', '.join(overridden)})" if overridden else "") + "."),
        (f"- Training: {training_args.max_steps} steps of {batch} sequences × {task.tokens_per_sequence} tokens, "
         f"{training_args.optim.value if hasattr(training_args.optim, 'value') else training_args.optim} at learning "
         f"rate {training_args.learning_rate:g}, {scheduler} schedule with {warmup} warm-up steps, weight decay "
         f"{training_args.weight_decay:g}; validation every {training_args.eval_steps} steps; {precision}. Within a "
         "seed every solver starts from the same weights and sees the same batches in the same order."),
        f"- Seeds: {', '.join(map(str, seeds))} (n = {len(seeds)}).",
        f"- Reference: {reference['description']}.",
        (f"- Machine: {device} on {machine['device']}; {machine['cpu_count']} CPUs ({machine['usable_cpus']} usable), "
         f"{machine['torch_threads']} torch thread(s); Python {machine['python']}, torch {machine['torch']}, "
         f"transformers {machine['transformers']}, energy-gpt {machine.get('energy_gpt', '?')}."),
        (f"- Wall time: {_duration(timing['wall_seconds'])} in this invocation ({timing['trained']} runs trained, "
         f"{timing['reused']} reused); the {timing['finished']} finished runs took {_duration(timing['run_seconds'])} "
         f"to train and evaluate ({timing['finished']}/{timing['planned']} runs finished)."),
        f"- Command: `{command}`",
    ]
    return lines


def _duration(seconds: float) -> str:
    minutes, seconds = divmod(round(seconds), 60)
    return f"{minutes} min {seconds} s" if minutes else f"{seconds} s"


# --------------------------------------------------------------------------------------------------------------------
# Entry point


def parse_args(argv: list[str]):
    parser = recipe_parser((CompareArguments, ModelArguments, CompareDataArguments, TrainingArguments), __doc__)
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


@contextlib.contextmanager
def torch_threads(count: int):
    """Use `count` CPU threads for PyTorch inside the block (0: leave as is), then restore the caller's setting."""
    previous = torch.get_num_threads()
    if count:
        torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


@contextlib.contextmanager
def deterministic_algorithms(enabled: bool):
    """`torch.use_deterministic_algorithms(True, warn_only=True)` inside the block (an op without a deterministic
    implementation warns instead of failing), then the caller's setting again."""
    previous = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    if enabled:
        torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(previous[0], warn_only=previous[1])


def _remove_empty_dirs(root: Path) -> None:
    """Drop the Trainer folders that stayed empty (nothing is saved unless --save_strategy asks)."""
    if not root.is_dir():
        return
    for path in sorted(root.rglob("*"), key=lambda p: len(p.parts), reverse=True) + [root]:
        if path.is_dir() and not any(path.iterdir()):
            path.rmdir()


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # One output folder and one timing per run: several ranks would race on both.
        raise RuntimeError("compare runs as a single process; start it with python / energy-gpt, not torchrun.")
    started = time.perf_counter()
    compare_args, model_args, data_args, training_args = parse_args(argv)
    setup_logging(training_args)
    check_model_arguments(model_args)
    training_args.include_num_input_tokens_seen = "all"  # tokens/s needs Trainer's count of input tokens
    if model_args.config_name is None:
        model_args.config_overrides = ",".join(filter(None, (DEFAULT_MODEL_OVERRIDES, model_args.config_overrides)))
    specs = compare_args.solver_specs()
    seeds = compare_args.seed_list(training_args.seed)
    output_dir = Path(training_args.output_dir)
    check_output_dir(output_dir, compare_args)
    reference_spec = next((spec for spec in specs if spec.is_reference), None)
    if reference_spec is not None and compare_args.baseline_dir:
        raise ValueError(f"--baseline_dir is for comparisons without {REFERENCE_SOLVER!r} in --solvers; this one "
                         f"trains its own {REFERENCE_SOLVER!r} runs.")

    with (
        torch_threads(compare_args.torch_num_threads),
        deterministic_algorithms(training_args.device.type == "cpu"),
        sigterm_raises_system_exit(),
    ):
        # Everything that can fail on the arguments fails here, before the output folder is touched.
        saved_tokenizer = output_dir / TOKENIZER_DIRNAME
        if data_args.use_synthetic_task:
            task = prepare_synthetic_task(compare_args, training_args)
        else:
            use_saved = compare_args.resume and model_args.tokenizer_name is None and saved_tokenizer.is_dir()
            task = prepare_text_task(compare_args, data_args, model_args, training_args,
                                     saved_tokenizer if use_saved else None)
        base_config = build_base_config(model_args, task)
        configs = {spec.label: build_run_config(base_config, spec) for spec in specs}
        shared = as_json({
            "task": task.description,
            "validation_data_sha256": dataset_sha256(task.eval_dataset),
            "tokenizer_sha256": tokenizer_sha256(task.tokenizer),
            "model": config_settings(base_config),
            "training": training_settings(training_args),
            "torch_num_threads": compare_args.torch_num_threads,
            "device_type": training_args.device.type,
        })
        train_hashes = {seed: dataset_sha256(task.train_dataset_for(seed)) for seed in seeds}

        def run_settings(spec: SolverSpec, seed: int) -> dict[str, Any]:
            return {"shared": shared, "solver": spec.solver, "solver_overrides": spec.overrides, "seed": seed,
                    "train_data_sha256": train_hashes[seed]}

        plan = [(spec, seed) for seed in seeds for spec in specs]  # interleaved: an interruption keeps whole seeds
        defaults = default_settings()
        finished: dict[str, dict[int, dict[str, Any]]] = {spec.label: {} for spec in specs}
        for spec, seed in plan:
            existing = read_run(run_directory(output_dir, spec.dirname, seed)) if compare_args.resume else None
            if existing is None:
                continue
            expected = run_settings(spec, seed)
            differences = []
            if existing.get("settings_sha256") != settings_sha256(expected):
                differences = settings_differences(expected, existing.get("settings", {}), defaults)
            if differences:
                raise ValueError(
                    f"--resume: the finished run {spec.label!r} seed {seed} in {output_dir} was trained with other "
                    f"settings (differs in {describe_differences(differences) or 'its settings hash'}); pass "
                    "--overwrite to start anew or choose another --output_dir."
                )
            finished[spec.label][seed] = existing
        reference_label, reference_description = None, f"none (no plain {REFERENCE_SOLVER} run)"
        baseline_runs: dict[int, dict[str, Any]] = {}
        if reference_spec is not None:
            reference_label = reference_spec.label
            reference_description = f"the {REFERENCE_SOLVER} runs of this comparison"
        elif compare_args.baseline_dir:
            baseline_runs = load_baseline_runs(Path(compare_args.baseline_dir), seeds, shared, train_hashes, defaults)
            reference_label = REFERENCE_SOLVER
            reference_description = (
                f"the {REFERENCE_SOLVER} runs of --baseline_dir {compare_args.baseline_dir} (same settings and seeds)"
            )

        start_output_dir(output_dir, compare_args)
        if task.trained_tokenizer:
            with atomic_directory(saved_tokenizer, overwrite=True) as staging:
                task.tokenizer.save_pretrained(staging)
        machine = machine_description(training_args.device)
        command = recipe_command("compare", argv)
        memory_description = PeakMemoryMeter.describe(training_args.device)
        plot_title = (f"EnergyGPT solvers on {task.name}: {training_args.max_steps} steps, seeds "
                      f"{', '.join(map(str, seeds))}")
        reused = sum(len(by_seed) for by_seed in finished.values())
        trained, plot_is_current = 0, False

        def rebuild_outputs(plot: bool) -> str:
            runs = {**({REFERENCE_SOLVER: baseline_runs} if baseline_runs else {}),
                    **{label: {seed: by_seed[seed] for seed in seeds if seed in by_seed}
                       for label, by_seed in finished.items()}}
            runs = {label: by_seed for label, by_seed in runs.items() if by_seed}
            summary = aggregate(runs, reference_label, compare_args.reach_tolerance)
            timing = {
                "wall_seconds": time.perf_counter() - started, "trained": trained, "reused": reused,
                "finished": sum(len(by_seed) for by_seed in finished.values()), "planned": len(plan),
                "run_seconds": math.fsum(run["wall_seconds"] for by_seed in finished.values() for run in by_seed.values()),
            }
            reference = {"label": reference_label, "description": reference_description}
            lines = header_lines(task, base_config, specs, seeds, training_args, machine, timing, command, reference)
            table = render_table(summary, lines, reference_label, memory_description, compare_args.reach_tolerance)
            report = {
                "command": command, "seeds": seeds, "solvers": [spec.label for spec in specs],
                "reference": reference, "settings": {**shared, "task_name": task.name,
                                                     "blind_guess_loss": task.blind_guess_loss},
                "machine": machine, "timing": timing, "memory_measure": memory_description,
                "summary": summary, "runs": runs,
            }
            write_outputs(output_dir, report, table, plot_title if plot else None)
            return table

        for index, (spec, seed) in enumerate(plan, start=1):
            if seed in finished[spec.label]:
                logger.info(f"[{index}/{len(plan)}] {spec.label}, seed {seed}: finished earlier, reused")
                continue
            config = configs[spec.label]
            logger.info(f"[{index}/{len(plan)}] {spec.label}, seed {seed}: training ({config.n_layer} layers, "
                        f"{training_args.max_steps} steps)")
            run_dir = run_directory(output_dir, spec.dirname, seed)
            try:
                with atomic_directory(run_dir, overwrite=True) as staging:
                    result = train_one_run(spec, seed, config, task, model_args, training_args, staging)
                    expected = run_settings(spec, seed)
                    result.update(settings=expected, settings_sha256=settings_sha256(expected))
                    _remove_empty_dirs(staging / "trainer")
                    atomic_write_json(staging / RUN_FILE, result)
            except BaseException:
                _remove_empty_dirs(run_dir.parent)  # the solver's folder, when this was to be its first run
                raise
            finished[spec.label][seed] = result
            trained += 1
            logger.info(
                f"[{index}/{len(plan)}] {spec.label}, seed {seed}: final validation loss "
                f"{result['final_validation_loss']:.4f} (best {result['best_validation_loss']:.4f}), "
                f"{result['tokens_per_second']:,.0f} tokens/s, {result['wall_seconds']:.0f} s; saved in {run_dir}"
            )
            # The table after every run; the plot once a seed is complete (and at the end).
            seed_complete = index == len(plan) or plan[index][1] != seed
            rebuild_outputs(plot=seed_complete)
            plot_is_current = seed_complete
        table = rebuild_outputs(plot=not plot_is_current)

    print(table)
    print(f"Comparison table: {output_dir / OUTPUT_FILES['table']}")
    print(f"Loss curves plot: {output_dir / OUTPUT_FILES['plot']}")
    print(f"Loss curves data: {output_dir / OUTPUT_FILES['csv']}, {output_dir / OUTPUT_FILES['json']}")
    print(f"Per-run results: {output_dir / RUNS_DIRNAME}/<solver>/seed-<seed>/{RUN_FILE}")
    return 0


__all__ = [
    "CompareArguments",
    "SolverSpec",
    "aggregate",
    "apply_config_fields",
    "main",
    "parse_config_overrides",
    "parse_solver_specs",
    "render_table",
]


if __name__ == "__main__":
    sys.exit(main())
