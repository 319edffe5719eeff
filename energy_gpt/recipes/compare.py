"""`energy-gpt compare`: train the same model once per attention solver and compare them.

    energy-gpt compare --output_dir outputs/compare                       # embedded synthetic task, no network
    energy-gpt compare --solvers gd,momentum --train_file corpus.txt --tokenizer_name gpt2 --output_dir out

Every run starts from the same seed (so the same initial weights: the solvers only add per-layer / per-head scalars
set from the config), sees the same batches in the same order, for the same number of steps, with the same learning
rate schedule. Only `attention_solver` changes. The output folder, written atomically (all or nothing), holds:

- `comparison.md`: final validation loss, steps each solver needs to reach the `gd` run's final validation loss,
  training tokens/s and peak memory of each solver;
- `loss_curves.csv` / `loss_curves.json`: the training and validation loss curves (the JSON also has the table);
- `loss_curves.png`: a plot of both curves.

Without `--dataset_name` / `--train_file` / `--validation_file` the task is the embedded longest-increasing-subsequence
task of `energy_gpt.recipes.synthetic`; with them it is causal-LM text, prepared exactly as `energy-gpt pretrain` does.
"""

import contextlib
import csv
import ctypes
import ctypes.util
import dataclasses
import gc
import io
import logging
import os
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
import torch
from transformers import (
    HfArgumentParser,
    Trainer,
    TrainerCallback,
    TrainingArguments,
    default_data_collator,
    set_seed,
)

from ..io_utils import (
    atomic_directory,
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_text,
)
from ..modeling import ATTENTION_SOLVERS, EnergyGPTForCausalLM
from .arguments import ModelArguments
from .common import (
    build_config,
    build_model,
    build_tokenizer,
    limit_samples,
    setup_logging,
)
from .pretrain import (
    DataTrainingArguments,
    build_lm_datasets,
    load_raw_datasets,
    resolve_block_size,
)
from .synthetic import (
    LISTask,
    answer_entropy,
    build_lis_dataset,
    build_lis_tokenizer,
    generate_lis_examples,
)

logger = logging.getLogger(__name__)

REFERENCE_SOLVER = "gd"
# A small model trained from scratch, prepended to --config_overrides when there is no --config_name (the user's
# own overrides come later and win). No dropout: the synthetic data never repeats, and noise would blur the curves.
DEFAULT_MODEL_OVERRIDES = "n_layer=4,n_embd=64,n_head=4,resid_pdrop=0.0,embd_pdrop=0.0,attn_pdrop=0.0"
DEFAULT_TEXT_BLOCK_SIZE = 128
NOT_REACHED = "not reached"

# TrainingArguments defaults of `compare` (any of them can be changed on the command line): a few-minute CPU run.
TRAINING_DEFAULTS = {
    "output_dir": "outputs/compare",
    "max_steps": 400,
    "learning_rate": 2e-3,
    "lr_scheduler_type": "cosine",
    "warmup_steps": 0.05,
    "weight_decay": 0.01,
    "per_device_train_batch_size": 64,
    "per_device_eval_batch_size": 256,
    "eval_strategy": "steps",
    "eval_steps": 50,
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


@dataclass
class CompareArguments:
    """What to compare and the shape of the embedded synthetic task."""

    solvers: str = field(
        default=",".join(ATTENTION_SOLVERS),
        metadata={"help": f"Comma-separated solvers to train, in this order; any of {list(ATTENTION_SOLVERS)}. The "
                          f"'steps to reach' column needs {REFERENCE_SOLVER!r}."},
    )
    overwrite: bool = field(
        default=False, metadata={"help": "Replace a non-empty --output_dir (only once the new comparison is complete)."}
    )
    torch_num_threads: int = field(
        default=1,
        metadata={"help": "CPU threads for PyTorch's operators (torch.set_num_threads); 0 keeps PyTorch's default (one "
                          "per core). 1 by default: the default model is so small that a second thread gains little, "
                          "and on a busy machine spinning OpenMP threads made each step ~10x slower in our measurements."},
    )
    lis_min_length: int = field(default=4, metadata={"help": "Synthetic task: shortest number sequence."})
    lis_max_length: int = field(default=10, metadata={"help": "Synthetic task: longest number sequence."})
    lis_max_value: int = field(default=16, metadata={"help": "Synthetic task: numbers are drawn from [0, max_value)."})
    num_train_examples: int | None = field(
        default=None,
        metadata={"help": "Synthetic task: training examples (default: enough for every step to see new ones)."},
    )
    num_validation_examples: int = field(
        default=512, metadata={"help": "Synthetic task: validation examples (a separate seed from the training ones)."}
    )

    def __post_init__(self):
        unknown = [name for name in self.solver_list() if name not in ATTENTION_SOLVERS]
        if unknown or not self.solver_list():
            raise ValueError(f"--solvers {self.solvers!r}: unknown or empty; allowed values: {list(ATTENTION_SOLVERS)}.")
        if len(set(self.solver_list())) != len(self.solver_list()):
            raise ValueError(f"--solvers {self.solvers!r} names a solver twice.")
        if self.num_train_examples is not None and self.num_train_examples <= 0:
            raise ValueError(f"--num_train_examples must be a positive integer, got {self.num_train_examples}.")
        if self.torch_num_threads < 0:
            raise ValueError(f"--torch_num_threads must be >= 0 (0: PyTorch's default), got {self.torch_num_threads}.")
        if self.num_validation_examples <= 0:
            raise ValueError(f"--num_validation_examples must be a positive integer, got {self.num_validation_examples}.")
        self.lis_task()  # validates the --lis_* values early

    def solver_list(self) -> list[str]:
        return [name.strip() for name in self.solvers.split(",") if name.strip()]

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
    """Records one run: the training loss Trainer logs, every validation loss, the time spent in training steps
    (from `on_step_begin` to `on_step_end`: forward, backward, clipping and optimizer step; evaluation and logging
    excluded) and peak memory."""

    def __init__(self, memory_meter: PeakMemoryMeter):
        self.memory_meter = memory_meter
        self.train_curve: list[dict[str, float]] = []
        self.validation_curve: list[dict[str, float]] = []
        self.step_seconds = 0.0
        self._step_started: float | None = None

    def on_train_begin(self, args, state, control, **kwargs):
        self.memory_meter.start()

    def on_step_begin(self, args, state, control, **kwargs):
        self.memory_meter.step_begin()
        self._step_started = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        if self.memory_meter.on_cuda:
            torch.cuda.synchronize(self.memory_meter.device)
        self.step_seconds += time.perf_counter() - self._step_started
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
    train_dataset: Any
    eval_dataset: Any
    model_fields: dict[str, Any]  # config fields the data fixes (vocabulary, positions, special tokens)
    name: str  # short, for the plot title
    description: str  # one sentence, for the table
    blind_guess_loss: float | None = None  # loss of a model that ignores the input (synthetic task only)


def prepare_synthetic_task(compare_args: CompareArguments, training_args: TrainingArguments) -> PreparedTask:
    """The LIS task: its tokenizer, train and validation datasets, and the config fields the model needs."""
    task = compare_args.lis_task()
    tokenizer = build_lis_tokenizer(task)
    num_train_examples = compare_args.num_train_examples
    if num_train_examples is None:
        total_batch = (
            training_args.per_device_train_batch_size * training_args.gradient_accumulation_steps
            * training_args.world_size
        )
        num_train_examples = training_args.max_steps * total_batch if training_args.max_steps > 0 else 20_000
    # Separate seeds: validation sequences are (almost surely) not training sequences.
    train_dataset = build_lis_dataset(task, tokenizer, num_train_examples, seed=training_args.seed)
    blind_loss = answer_entropy(generate_lis_examples(task, num_train_examples, seed=training_args.seed))
    eval_dataset = build_lis_dataset(task, tokenizer, compare_args.num_validation_examples, seed=training_args.seed + 1)
    model_fields = {
        "vocab_size": len(tokenizer),
        "n_positions": task.block_length,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    description = (
        f"longest increasing subsequence (embedded): {num_train_examples} training / "
        f"{compare_args.num_validation_examples} validation sequences of {task.min_length}-{task.max_length} numbers "
        f"in [0, {task.max_value}), {task.block_length} tokens each; loss on the answer token only (guessing the answer "
        f"from its distribution alone, without reading the numbers, scores {blind_loss:.3f})"
    )
    return PreparedTask(
        tokenizer, train_dataset, eval_dataset, model_fields, "longest increasing subsequence", description, blind_loss
    )


def prepare_text_task(
    data_args: CompareDataArguments, model_args: ModelArguments, training_args: TrainingArguments
) -> PreparedTask:
    """Causal-LM text, prepared as in `energy-gpt pretrain` (tokenize, pack into blocks of --block_size)."""
    if data_args.streaming:
        raise ValueError("--streaming is not supported by compare: every solver must see the same finite data.")
    tokenizer = build_tokenizer(model_args)
    if data_args.block_size is None:
        data_args.block_size = DEFAULT_TEXT_BLOCK_SIZE
    raw_datasets = load_raw_datasets(data_args, model_args)
    probe_config = build_config(model_args)  # only to check --block_size against n_positions
    block_size = resolve_block_size(data_args, probe_config, tokenizer)
    lm_datasets = build_lm_datasets(raw_datasets, data_args, tokenizer, block_size, training_args)
    if "train" not in lm_datasets or "validation" not in lm_datasets:
        raise ValueError("compare needs a train and a validation split (--train_file, optionally --validation_file).")
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
    return PreparedTask(tokenizer, train_dataset, eval_dataset, {}, f"causal LM on {Path(source).name}", description)


# --------------------------------------------------------------------------------------------------------------------
# Training


def build_solver_model(
    solver: str, model_args: ModelArguments, tokenizer, model_fields: dict[str, Any], seed: int
) -> EnergyGPTForCausalLM:
    """A fresh model with `solver`. Seeding right before building gives every solver the same initial weights: the
    solvers differ only by their beta / lambda scalars, which are set from the config, not drawn at random."""
    set_seed(seed)  # the data order is the same for every run too: Trainer seeds its sampler from `args.seed`
    config = build_config(model_args, attention_solver=solver, **model_fields)
    return build_model(EnergyGPTForCausalLM, model_args, config, tokenizer)


def train_one_solver(
    solver: str, task: PreparedTask, model_args: ModelArguments, training_args: TrainingArguments, run_dir: Path
) -> dict[str, Any]:
    """Train one solver on `task`; return its curves and measurements."""
    model = build_solver_model(solver, model_args, task.tokenizer, task.model_fields, seed=training_args.seed)
    run_args = dataclasses.replace(training_args, output_dir=str(run_dir))
    recorder = SolverRunRecorder(PeakMemoryMeter(run_args.device))
    trainer = Trainer(
        model=model,
        args=run_args,
        train_dataset=task.train_dataset,
        eval_dataset=task.eval_dataset,
        processing_class=task.tokenizer,
        data_collator=default_data_collator,
        callbacks=[recorder],
    )
    logger.warning(f"*** {solver}: training {sum(p.numel() for p in model.parameters()):,} parameters ***")
    trainer.evaluate()  # step 0: the curves start from the (shared) initial model
    train_output = trainer.train()
    if recorder.validation_curve[-1]["step"] != trainer.state.global_step:
        trainer.evaluate()  # the final validation loss is always measured at the last step
    tokens = trainer.state.num_input_tokens_seen
    return {
        "train": recorder.train_curve,
        "validation": recorder.validation_curve,
        "final_validation_loss": recorder.validation_curve[-1]["loss"],
        "steps": trainer.state.global_step,
        "train_tokens": int(tokens),
        "train_step_seconds": recorder.step_seconds,
        "tokens_per_second": tokens / recorder.step_seconds if recorder.step_seconds > 0 else float("nan"),
        "peak_memory_mib": recorder.memory_meter.peak_bytes / 2**20,
        "train_runtime_seconds": train_output.metrics.get("train_runtime"),
        "num_parameters": sum(p.numel() for p in model.parameters()),
    }


def steps_to_reach(validation_curve: list[dict[str, float]], target_loss: float) -> int | None:
    """First evaluated step whose validation loss is at most `target_loss` (None if never)."""
    for point in validation_curve:
        if point["loss"] <= target_loss:
            return int(point["step"])
    return None


def summarize(results: dict[str, dict[str, Any]]) -> None:
    """Add `steps_to_reference_final_loss` to every run (None when not reached or without a gd run)."""
    reference = results.get(REFERENCE_SOLVER)
    for run in results.values():
        run["steps_to_reference_final_loss"] = (
            steps_to_reach(run["validation"], reference["final_validation_loss"]) if reference else None
        )


# --------------------------------------------------------------------------------------------------------------------
# Outputs


def render_table(results: dict[str, dict[str, Any]], header_lines: list[str], memory_description: str) -> str:
    reference = results.get(REFERENCE_SOLVER)
    lines = ["# EnergyGPT solver comparison", "", *header_lines, ""]
    lines += [
        (f"| solver | final validation loss | steps to reach {REFERENCE_SOLVER}'s final validation loss | "
        "training tokens/s | peak memory (MiB) |"),
        "|---|---:|---:|---:|---:|",
    ]
    for solver, run in results.items():
        if reference is None:
            steps = f"n/a (no {REFERENCE_SOLVER} run)"
        elif run["steps_to_reference_final_loss"] is None:
            steps = NOT_REACHED
        else:
            steps = str(run["steps_to_reference_final_loss"])
        lines.append(
            f"| {solver} | {run['final_validation_loss']:.4f} | {steps} | {run['tokens_per_second']:,.0f} | "
            f"{run['peak_memory_mib']:.1f} |"
        )
    lines += [
        "",
        (f"- Steps to reach: the first evaluated step (every `eval_steps`) whose validation loss is at most the "
        f"`{REFERENCE_SOLVER}` run's final validation loss."),
        ("- Tokens/s: input tokens (padding included) divided by the time spent in training steps (forward, backward, "
        "optimizer; evaluation and logging excluded)."),
        f"- Peak memory: {memory_description}.",
        "",
    ]
    return "\n".join(lines)


def render_csv(results: dict[str, dict[str, Any]]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["solver", "split", "step", "loss"])
    for solver, run in results.items():
        for split in ("train", "validation"):
            for point in run[split]:
                writer.writerow([solver, split, point["step"], repr(point["loss"])])
    return buffer.getvalue()


def render_plot(results: dict[str, dict[str, Any]], title: str, blind_guess_loss: float | None = None) -> bytes:
    """Training loss, validation loss, and the validation loss of the second half of training on its own scale (the
    first steps fall from log(vocab) and would flatten the differences between solvers)."""
    import matplotlib

    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    last_step = max(point["step"] for run in results.values() for point in run["validation"])
    panels = [
        ("training loss (logging window mean)", "train", 0),
        ("validation loss", "validation", 0),
        ("validation loss, second half", "validation", last_step / 2),
    ]
    for axis, (panel_title, split, first_step) in zip(axes, panels):
        for solver, run in results.items():
            points = [p for p in run[split] if p["step"] >= first_step]
            if points:
                axis.plot([p["step"] for p in points], [p["loss"] for p in points],
                          marker="." if split == "validation" else None, label=solver)
        if blind_guess_loss is not None and split == "validation" and first_step == 0:
            axis.axhline(blind_guess_loss, color="gray", linestyle="--", linewidth=1, label="blind guess")
        axis.set_title(panel_title)
        axis.set_xlabel("step")
        axis.grid(alpha=0.3)
    axes[0].set_ylabel("loss (nats / token)")
    axes[1].legend()  # the panel with every solver and the blind-guess line
    figure.suptitle(title, fontsize=10)
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100)
    plt.close(figure)
    return buffer.getvalue()


def write_outputs(
    output_dir: Path, results: dict[str, dict[str, Any]], settings: dict[str, Any], header_lines: list[str],
    memory_description: str,
) -> dict[str, Path]:
    paths = {kind: output_dir / name for kind, name in OUTPUT_FILES.items()}
    atomic_write_text(paths["table"], render_table(results, header_lines, memory_description))
    atomic_write_text(paths["csv"], render_csv(results))
    atomic_write_json(paths["json"], {"settings": settings, "memory_measure": memory_description, "solvers": results})
    title = f"EnergyGPT solvers on {settings['task_name']}: {settings['max_steps']} steps, seed {settings['seed']}"
    atomic_write_bytes(paths["plot"], render_plot(results, title, settings.get("blind_guess_loss")))
    return paths


# --------------------------------------------------------------------------------------------------------------------
# Entry point


def parse_args(argv: list[str] | None):
    parser = HfArgumentParser((CompareArguments, ModelArguments, CompareDataArguments, TrainingArguments))
    parser.set_defaults(**TRAINING_DEFAULTS)
    argv = list(sys.argv[1:] if argv is None else argv)
    if len(argv) == 1 and argv[0].endswith(".json"):
        return parser.parse_json_file(json_file=os.path.abspath(argv[0]))
    return parser.parse_args_into_dataclasses(args=argv)


def check_model_arguments(model_args: ModelArguments) -> None:
    if model_args.attention_solver is not None:
        raise ValueError("compare trains every solver of --solvers; do not pass --attention_solver.")
    if model_args.model_name_or_path is not None:
        raise ValueError("compare trains every solver from scratch; --model_name_or_path is not supported "
                         "(use --config_name / --config_overrides for the model shape).")
    if model_args.use_lora:
        raise ValueError("compare trains full models; --use_lora is not supported.")


def describe_run(
    task: PreparedTask, solvers: list[str], model_args: ModelArguments, training_args: TrainingArguments,
    total_seconds: float,
) -> tuple[dict[str, Any], list[str]]:
    """The settings every run shared (for the JSON) and their summary lines (for the table's header)."""
    config = build_config(model_args, attention_solver=solvers[0], **task.model_fields)
    model = {name: getattr(config, name) for name in (
        "n_layer", "n_embd", "n_head", "n_positions", "vocab_size", "momentum_beta", "newton_lambda",
        "learn_solver_params", "nag_lookahead")}
    scheduler = getattr(training_args.lr_scheduler_type, "value", training_args.lr_scheduler_type)
    batch = training_args.per_device_train_batch_size * training_args.gradient_accumulation_steps
    batch *= training_args.world_size
    settings = {
        "task": task.description,
        "task_name": task.name,
        "blind_guess_loss": task.blind_guess_loss,
        "solvers": solvers,
        "model": model,
        "max_steps": training_args.max_steps,
        "learning_rate": training_args.learning_rate,
        "lr_scheduler_type": scheduler,
        "train_batch_size": batch,
        "seed": training_args.seed,
        "device": str(training_args.device),
        "torch_threads": torch.get_num_threads(),
        "total_seconds": total_seconds,
    }
    header_lines = [
        f"- Task: {task.description}.",
        (f"- Model: {model['n_layer']} layers, n_embd {model['n_embd']}, {model['n_head']} heads, trained from scratch; "
        f"momentum_beta {model['momentum_beta']}, newton_lambda {model['newton_lambda']}."),
        (f"- Training: {training_args.max_steps} steps of {batch} sequences, learning rate {training_args.learning_rate} "
        f"({scheduler}), seed {training_args.seed}, same data order for every solver; device {settings['device']}, "
        f"{settings['torch_threads']} CPU thread(s); {total_seconds:.0f} s in all."),
    ]
    return settings, header_lines


def main(argv: list[str] | None = None) -> int:
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # One output folder and one timing per solver: several ranks would race on both.
        raise RuntimeError("compare runs as a single process; start it with python / energy-gpt, not torchrun.")
    compare_args, model_args, data_args, training_args = parse_args(argv)
    setup_logging(training_args)
    check_model_arguments(model_args)
    training_args.include_num_input_tokens_seen = "all"  # tokens/s needs Trainer's count of input tokens
    if model_args.config_name is None:
        model_args.config_overrides = ",".join(filter(None, (DEFAULT_MODEL_OVERRIDES, model_args.config_overrides)))

    with torch_threads(compare_args.torch_num_threads):
        set_seed(training_args.seed)
        if data_args.use_synthetic_task:
            task = prepare_synthetic_task(compare_args, training_args)
        else:
            task = prepare_text_task(data_args, model_args, training_args)

        solvers = compare_args.solver_list()
        final_dir = Path(training_args.output_dir)
        started = time.perf_counter()
        with atomic_directory(final_dir, overwrite=compare_args.overwrite) as staging:
            results = {}
            for solver in solvers:
                results[solver] = train_one_solver(solver, task, model_args, training_args, staging / "runs" / solver)
                logger.warning(f"*** {solver}: final validation loss {results[solver]['final_validation_loss']:.4f} ***")
            summarize(results)
            settings, header_lines = describe_run(task, solvers, model_args, training_args, time.perf_counter() - started)
            memory_description = PeakMemoryMeter.describe(training_args.device)
            _remove_empty_dirs(staging / "runs")
            write_outputs(staging, results, settings, header_lines, memory_description)

    table_path, plot_path = final_dir / OUTPUT_FILES["table"], final_dir / OUTPUT_FILES["plot"]
    print(table_path.read_text())
    print(f"Comparison table: {table_path}")
    print(f"Loss curves plot: {plot_path}")
    print(f"Loss curves data: {final_dir / OUTPUT_FILES['csv']}, {final_dir / OUTPUT_FILES['json']}")
    return 0


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


def _remove_empty_dirs(root: Path) -> None:
    """Drop the per-solver Trainer folders that stayed empty (nothing is saved unless --save_strategy asks)."""
    if not root.is_dir():
        return
    for path in sorted(root.rglob("*"), key=lambda p: len(p.parts), reverse=True) + [root]:
        if path.is_dir() and not any(path.iterdir()):
            path.rmdir()


if __name__ == "__main__":
    sys.exit(main())
