"""Training one (solver, seed) run of `energy-gpt compare` and measuring it: the model configs, the step-time and
peak-memory recorders, the learned solver values, and the process settings (threads, determinism) runs share."""

import contextlib
import copy
import ctypes
import ctypes.util
import dataclasses
import gc
import math
import os
import platform
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import torch
import transformers
from torch.utils.flop_counter import FlopCounterMode
from transformers import Trainer, TrainerCallback, TrainingArguments, default_data_collator, set_seed

from ... import record_solver_statistics, solver_report
from ...modeling import EnergyGPTConfig, EnergyGPTForCausalLM
from ..arguments import ModelArguments
from ..common import build_config, build_model
from .arguments import SolverSpec, apply_config_fields, parse_config_overrides
from .tasks import PreparedTask


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


def count_parameters(model: torch.nn.Module) -> int:
    return sum({parameter.data_ptr(): parameter.numel() for parameter in model.parameters()}.values())  # tied once


# --------------------------------------------------------------------------------------------------------------------
# Training one (solver, seed) run


def training_step_flops(model: torch.nn.Module, train_dataset, args: TrainingArguments) -> int:
    """FLOPs of one training step (forward and backward of one batch), counted by `FlopCounterMode`: matrix products
    and attention, the solvers' own products included; elementwise work and the optimizer are not counted. The random
    state is restored and the gradients cleared, so the run itself is unchanged."""
    batch_size = args.per_device_train_batch_size * args.gradient_accumulation_steps
    batch = default_data_collator([train_dataset[index] for index in range(min(batch_size, len(train_dataset)))])
    device = next(model.parameters()).device
    was_training = model.training
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), FlopCounterMode(
        display=False
    ) as counter:
        model.train()
        model(**{key: value.to(device) for key, value in batch.items()}).loss.backward()
    model.zero_grad(set_to_none=True)
    model.train(was_training)
    return int(counter.get_total_flops())


def training_flops_estimate(model: torch.nn.Module, tokens: int, sequence_length: int) -> int:
    """The closed-form estimate of a GPT-2 backbone's training FLOPs: per token, forward 2 FLOPs per weight of every
    matrix product (every 2-D parameter except the position table, the tied output projection included) plus
    4 * n_layer * n_ctx * n_embd for the attention scores and the weighted sum over all n_ctx = `sequence_length`
    positions; training is
    3 x forward (backward: twice the forward). It equals FlopCounterMode's count for `gd`; other solvers add their own
    products (Newton's curvature terms, for example), which only the counted figure includes."""
    config = model.config
    matrix_weights = sum(
        {parameter.data_ptr(): parameter.numel() for name, parameter in model.named_parameters()
         if parameter.dim() == 2 and "wpe" not in name}.values()
    )
    attention = 4 * config.n_layer * sequence_length * config.n_embd
    return 3 * (2 * matrix_weights + attention) * tokens


def labelled_accuracy(model: torch.nn.Module, dataset, args: TrainingArguments) -> float:
    """The fraction of labelled positions (labels != -100) whose most likely next token is the label (the model
    predicts labels[i] from the tokens before i): the synthetic tasks' metric on the validation set."""
    device = next(model.parameters()).device
    model.eval()
    correct = total = 0
    with torch.no_grad():
        for start in range(0, len(dataset), args.per_device_eval_batch_size):
            rows = [dataset[index] for index in range(start, min(start + args.per_device_eval_batch_size, len(dataset)))]
            batch = {key: value.to(device) for key, value in default_data_collator(rows).items()}
            labels = batch.pop("labels")[:, 1:]
            predictions = model(**batch).logits[:, :-1].argmax(dim=-1)
            scored = labels != -100
            correct += int((predictions[scored] == labels[scored]).sum())
            total += int(scored.sum())
    return correct / total if total else float("nan")


def final_metric(model: torch.nn.Module, task: PreparedTask, args: TrainingArguments) -> float | None:
    """The task's metric on the validation set: its own evaluation, else labelled accuracy; None for loss-only tasks."""
    if task.metric is None:
        return None
    if task.evaluate_metric is not None:
        return task.evaluate_metric(model, task.eval_dataset, args.per_device_eval_batch_size)
    return labelled_accuracy(model, task.eval_dataset, args)


def learned_solver_values(model: torch.nn.Module, task: PreparedTask, args: TrainingArguments) -> dict[str, Any]:
    """`energy_gpt.solver_report(model, input_ids)` (the learned per-layer solver parameters and decay gates, Newton's
    bound-engagement fractions, and the energy-descent check per layer and head), on one validation batch run while the
    solvers record their statistics."""
    count = min(len(task.eval_dataset), args.per_device_eval_batch_size)
    batch = default_data_collator([task.eval_dataset[index] for index in range(count)])
    device = next(model.parameters()).device
    model.eval()
    with torch.no_grad(), record_solver_statistics(model):
        model(**{key: value.to(device) for key, value in batch.items()})
    if "input_ids" not in batch:  # real-valued inputs: the energy-descent check needs token ids, so it is left out
        return solver_report(model)
    attention_mask = batch.get("attention_mask")
    return solver_report(model, batch["input_ids"].to(device),
                         None if attention_mask is None else attention_mask.to(device))


def train_one_run(
    spec: SolverSpec, seed: int, config: EnergyGPTConfig, task: PreparedTask, model_args: ModelArguments,
    training_args: TrainingArguments, run_dir: Path,
) -> dict[str, Any]:
    """Train `spec` with `seed` (weights and data order); return its curves and measurements."""
    set_seed(seed)  # right before building: every solver of this seed starts from the same weights
    model = build_model(task.model_class or EnergyGPTForCausalLM, model_args, config, task.tokenizer)
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
    flops_per_step = training_step_flops(trainer.model, task.train_dataset_for(seed), run_args)
    started = time.perf_counter()
    trainer.evaluate()  # step 0: the curves start from the (shared) initial model
    trainer.train()
    if recorder.validation_curve[-1]["step"] != trainer.state.global_step:
        trainer.evaluate()  # the final validation loss is always measured at the last step
    wall_seconds = time.perf_counter() - started
    tokens = int(trainer.state.num_input_tokens_seen) // task.values_per_token  # Trainer counts input numbers
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
        "training_flops": flops_per_step * trainer.state.global_step,
        "training_flops_estimate": training_flops_estimate(model, tokens, task.tokens_per_sequence),
        "final_metric": final_metric(trainer.model, task, run_args),
        "solver_report": learned_solver_values(trainer.model, task, run_args),
    }
    return result


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
        from ... import __version__ as energy_gpt_version

        description["energy_gpt"] = energy_gpt_version
    return description


__all__ = [
    "PeakMemoryMeter",
    "SolverRunRecorder",
    "build_base_config",
    "build_run_config",
    "count_parameters",
    "deterministic_algorithms",
    "machine_description",
    "torch_threads",
    "train_one_run",
]
