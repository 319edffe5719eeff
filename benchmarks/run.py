"""Benchmark every EnergyGPT solver against Hugging Face `GPT2LMHeadModel` (both with SDPA) on the same dimensions.

    python -m benchmarks.run                        # small + GPT-2 small shapes, sequence-length scaling
    python -m benchmarks.run --shape small --repeats 3 --seq_lens 256 512
    python -m benchmarks.run --quick --output_dir /tmp/bench   # tiny smoke run (what the test suite does)

What is measured (all in one process, interleaved: every repetition runs every model once, in a rotating order, so
machine noise hits all models alike; ratios are taken per repetition, GPT-2 vs the model, then the median):
  * training step tokens/s: forward + backward + AdamW step on `labels = input_ids`;
  * forward tokens/s: `torch.no_grad()` forward, no cache;
  * generation tokens/s: greedy `generate` with the KV cache, exactly `--new_tokens` new tokens per sequence;
  * peak memory (CPU): in one separate process started with `MALLOC_MMAP_THRESHOLD_` so that freed tensors go back
    to the OS, the peak resident set size (Linux `VmHWM`, reset through `/proc/self/clear_refs`) during one forward
    and one training step, minus the resident size just before it (model, optimizer state and interpreter excluded);
  * scaling with the sequence length (batch 1, `small` dimensions): forward time and forward / training peak memory.
Writes `results.md`, `results.json`, `scaling.png` and `ratios.png` to `--output_dir`.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import transformers
from energy_gpt.modeling.solvers_energy_gpt import ATTENTION_SOLVERS

from energy_gpt import EnergyGPTConfig, EnergyGPTForCausalLM
from energy_gpt.io_utils import atomic_write_bytes, atomic_write_json, atomic_write_text

BASELINE = "gpt2"
SOLVERS = list(ATTENTION_SOLVERS)
MODEL_NAMES = [BASELINE, *SOLVERS]
# From-scratch solver parameters (a GPT-2 checkpoint would start at 0, where every solver *is* GPT-2).
SOLVER_PARAMS = dict(momentum_beta=0.5, newton_lambda=0.1)
CONV1D_SUFFIXES = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")


@dataclass(frozen=True)
class Shape:
    name: str
    n_layer: int
    n_embd: int
    n_head: int
    vocab_size: int
    batch_size: int
    seq_len: int
    prompt_len: int  # generation prompt
    new_tokens: int  # generated tokens per sequence


SHAPES = {
    "tiny": Shape("tiny", n_layer=2, n_embd=64, n_head=2, vocab_size=512, batch_size=2, seq_len=32, prompt_len=8,
                  new_tokens=4),
    # Runs in seconds; head_dim 64 as in GPT-2, a reduced vocabulary so that attention is not hidden by lm_head.
    "small": Shape("small", n_layer=4, n_embd=256, n_head=4, vocab_size=8192, batch_size=4, seq_len=128,
                   prompt_len=16, new_tokens=32),
    "gpt2-small": Shape("gpt2-small", n_layer=12, n_embd=768, n_head=12, vocab_size=50257, batch_size=4, seq_len=256,
                        prompt_len=16, new_tokens=16),
}
METRICS = ("train", "forward", "generate")


# ----------------------------------------------------------------------------------------------------------- models
def build_model(name: str, shape: Shape, n_positions: int, gpt2_state: dict | None = None) -> torch.nn.Module:
    """`gpt2`: `GPT2LMHeadModel` (sdpa); a solver name: `EnergyGPTForCausalLM` with GPT-2's weights transplanted."""
    common = dict(
        vocab_size=shape.vocab_size, n_positions=n_positions, n_embd=shape.n_embd, n_layer=shape.n_layer,
        n_head=shape.n_head, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0,
    )
    if name == BASELINE:
        config = transformers.GPT2Config(**common)
        return transformers.GPT2LMHeadModel._from_config(config, attn_implementation="sdpa")
    config = EnergyGPTConfig(**common, attention_solver=name, **SOLVER_PARAMS)
    model = EnergyGPTForCausalLM._from_config(config, attn_implementation="sdpa")
    if gpt2_state is not None:
        # Conv1D [in, out] -> Linear [out, in]; the solver scalars keep their from-scratch values.
        state = {
            key: value.t().contiguous() if key.endswith(CONV1D_SUFFIXES) else value
            for key, value in gpt2_state.items()
            if not key.endswith((".attn.bias", ".attn.masked_bias"))
        }
        result = model.load_state_dict(state, strict=False)
        unexplained = [key for key in result.missing_keys if not key.endswith(tuple(SOLVER_PARAMS))]
        if result.unexpected_keys or unexplained:
            raise RuntimeError(f"weight transplant failed: {result.unexpected_keys=} {unexplained=}")
    return model


def build_models(names: list[str], shape: Shape, n_positions: int, seed: int) -> dict[str, torch.nn.Module]:
    torch.manual_seed(seed)
    gpt2 = build_model(BASELINE, shape, n_positions)
    models = {name: gpt2 if name == BASELINE else build_model(name, shape, n_positions, gpt2.state_dict())
              for name in names}
    if BASELINE not in names:
        del gpt2
    return models


def make_inputs(shape: Shape, batch_size: int, seq_len: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(1, shape.vocab_size, (batch_size, seq_len), generator=generator)


class Workload:
    """The three timed calls of one model on fixed inputs."""

    def __init__(self, model: torch.nn.Module, input_ids: torch.Tensor, prompt_ids: torch.Tensor, new_tokens: int):
        self.model, self.input_ids, self.prompt_ids, self.new_tokens = model, input_ids, prompt_ids, new_tokens
        self.optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)

    def train(self) -> None:
        self.model.train()
        loss = self.model(input_ids=self.input_ids, labels=self.input_ids, use_cache=False).loss
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def forward(self) -> None:
        self.model.eval()
        with torch.no_grad():
            self.model(input_ids=self.input_ids, use_cache=False)

    def generate(self) -> None:
        self.model.eval()
        output = self.model.generate(
            input_ids=self.prompt_ids, attention_mask=torch.ones_like(self.prompt_ids), do_sample=False,
            max_new_tokens=self.new_tokens, min_new_tokens=self.new_tokens, pad_token_id=0,
        )
        assert output.shape[1] == self.prompt_ids.shape[1] + self.new_tokens

    def tokens(self, metric: str) -> int:
        if metric == "generate":
            return self.prompt_ids.shape[0] * self.new_tokens
        return self.input_ids.numel()


def timed(fn: Callable[[], None]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def run_interleaved(
    workloads: dict[str, Workload], metrics: tuple[str, ...], repeats: int, log: Callable[[str], None]
) -> dict[str, dict[str, list[float]]]:
    """Seconds per call, `{metric: {model: [repeats]}}`: one warm-up call, then round-robin in a rotating order."""
    names = list(workloads)
    seconds: dict[str, dict[str, list[float]]] = {metric: {name: [] for name in names} for metric in metrics}
    for metric in metrics:
        for name in names:
            getattr(workloads[name], metric)()  # warm-up (allocator, lazy optimizer state, kernels)
        for repeat in range(repeats):
            order = names[repeat % len(names):] + names[: repeat % len(names)]
            for name in order:
                seconds[metric][name].append(timed(getattr(workloads[name], metric)))
        log(f"  {metric}: " + ", ".join(f"{n}={statistics.median(s[-repeats:]):.3f}s" for n, s in seconds[metric].items()))
    return seconds


# ----------------------------------------------------------------------------------------------------------- memory
def _proc_status_kib(field: str) -> int:
    match = re.search(rf"^{field}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.MULTILINE)
    return int(match.group(1))


def _peak_increment_mib(fn: Callable[[], None]) -> float:
    """Peak resident memory during `fn` above the resident memory just before it (Linux VmHWM reset)."""
    gc.collect()
    Path("/proc/self/clear_refs").write_text("5")  # reset the peak (VmHWM) to the current RSS
    before = _proc_status_kib("VmRSS")
    fn()
    # The kernel's RSS counters are batched per CPU (approximate to a few hundred KiB): tiny calls can read < 0.
    return max(0.0, (_proc_status_kib("VmHWM") - before) / 1024)


def memory_probe(tasks: list[dict]) -> list[dict]:
    """Run in a fresh process (see `measure_memory`): forward and training-step peak increments per task."""
    results = []
    for task in tasks:
        shape = SHAPES[task["shape"]]
        torch.manual_seed(0)
        model = build_model(task["model"], shape, n_positions=task["seq_len"])
        input_ids = make_inputs(shape, task["batch_size"], task["seq_len"], seed=1)
        workload = Workload(model, input_ids, input_ids[:, :1], new_tokens=1)
        # Create the AdamW state up front (a zero-gradient step) so that it is part of the baseline, not the peak.
        for parameter in model.parameters():
            parameter.grad = torch.zeros_like(parameter)
        workload.optimizer.step()
        workload.optimizer.zero_grad(set_to_none=True)
        workload.forward()  # warm-up of one-time allocations (kernels, thread pools)
        results.append(
            {**task, "forward_mib": _peak_increment_mib(workload.forward), "train_mib": _peak_increment_mib(workload.train)}
        )
        del model, workload
        gc.collect()
    return results


def measure_memory(tasks: list[dict], log: Callable[[str], None]) -> list[dict] | None:
    """All memory probes in one separate process: big frees are returned to the OS there (mmap threshold), so the
    resident size follows the live tensors."""
    if not Path("/proc/self/clear_refs").exists():
        log("memory: /proc/self/clear_refs not available (not Linux): peak memory not measured")
        return None
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "HF_HUB_OFFLINE": "1"}
    completed = subprocess.run(
        [sys.executable, "-m", "benchmarks.run", "--memory_probe", json.dumps(tasks)],
        capture_output=True, text=True, env=env, cwd=Path(__file__).resolve().parents[1], check=False,
    )
    if completed.returncode != 0:
        raise RuntimeError(f"memory probe failed:\n{completed.stderr[-4000:]}")
    return json.loads(completed.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------------------------------------------- statistics
@dataclass
class Summary:
    median: float
    low: float  # first quartile (min for fewer than 4 values)
    high: float  # third quartile (max for fewer than 4 values)

    @classmethod
    def of(cls, values: list[float]) -> Summary:
        if len(values) >= 4:
            q1, _, q3 = statistics.quantiles(values, n=4, method="inclusive")
            return cls(statistics.median(values), q1, q3)
        return cls(statistics.median(values), min(values), max(values))


def summarise(seconds: dict[str, dict[str, list[float]]], workloads: dict[str, Workload]) -> dict:
    """Tokens/s per model and metric, and the per-repetition ratio to GPT-2 (>1: faster than GPT-2)."""
    table = {}
    for metric, per_model in seconds.items():
        table[metric] = {}
        for name, times in per_model.items():
            tokens = workloads[name].tokens(metric)
            entry = {"tokens_per_s": asdict(Summary.of([tokens / t for t in times])), "seconds": times}
            if BASELINE in per_model:
                entry["ratio"] = asdict(Summary.of([b / t for b, t in zip(per_model[BASELINE], times)]))
            table[metric][name] = entry
    return table


# ---------------------------------------------------------------------------------------------------------- running
def benchmark_shape(shape: Shape, names: list[str], repeats: int, seed: int, log) -> dict:
    log(f"shape {shape.name}: {asdict(shape)}, {repeats} repetitions")
    models = build_models(names, shape, n_positions=max(shape.seq_len, shape.prompt_len + shape.new_tokens), seed=seed)
    input_ids = make_inputs(shape, shape.batch_size, shape.seq_len, seed=seed + 1)
    prompt_ids = input_ids[:, : shape.prompt_len]
    if BASELINE in models and "gd" in models:  # sanity: gd is GPT-2
        with torch.no_grad():
            difference = (models["gd"].eval()(input_ids).logits - models[BASELINE].eval()(input_ids).logits).abs().max()
        log(f"  gd vs GPT-2 max |logit difference| = {difference.item():.3g}")
    workloads = {name: Workload(model, input_ids, prompt_ids, shape.new_tokens) for name, model in models.items()}
    result = {"shape": asdict(shape), "repeats": repeats,
              "timings": summarise(run_interleaved(workloads, METRICS, repeats, log), workloads)}
    del models, workloads
    gc.collect()
    return result


def benchmark_scaling(shape: Shape, names: list[str], seq_lens: list[int], repeats: int, seed: int, log) -> dict:
    log(f"scaling: {shape.name} dimensions, batch 1, sequence lengths {seq_lens}, {repeats} repetitions")
    models = build_models(names, shape, n_positions=max(seq_lens), seed=seed)
    forward = {}
    for seq_len in seq_lens:
        input_ids = make_inputs(shape, 1, seq_len, seed=seed + seq_len)
        workloads = {name: Workload(model, input_ids, input_ids[:, :1], 1) for name, model in models.items()}
        log(f" T={seq_len}")
        forward[seq_len] = summarise(run_interleaved(workloads, ("forward",), repeats, log), workloads)["forward"]
    del models
    gc.collect()
    return {"shape": asdict(shape), "seq_lens": seq_lens, "repeats": repeats, "forward": forward}


def machine_info() -> dict:
    cpu = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        match = re.search(r"^model name\s*:\s*(.+)$", cpuinfo.read_text(), re.MULTILINE)
        cpu = match.group(1) if match else cpu
    return {
        "cpu": cpu, "logical_cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
        "platform": platform.platform(), "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "date": time.strftime("%Y-%m-%d %H:%M %Z"),
    }


# ---------------------------------------------------------------------------------------------------------- reports
TARGETS = {  # solver -> (minimum speed ratio to GPT-2 on train/forward/generate, max training-memory ratio or None)
    "gd": (1.0, None),
    "momentum": (0.95, 1.1),
    "nag": (0.95, 1.1),
    "newton_light": (0.8, None),
    "newton": (0.6, None),
}
# Why each solver costs what it costs (the structure of the computation, true whatever the numbers say).
COST_NOTES = {
    "gd": "the same computation as GPT-2 (`nn.Linear` instead of `Conv1D`, one solver call per layer).",
    "momentum": "one extra `beta * m + g` per layer; `m` (B x T x d) is kept for the backward pass.",
    "nag": "the lookahead `x + beta * m` and its LayerNorm per layer, plus the momentum update.",
    "newton_light": "a second SDPA pass with values `v * v` (about one more attention per layer) and elementwise "
    "work; memory stays linear in T.",
    "newton": "`Sigma mu` needs the probabilities: per query chunk it recomputes the fp32 scores and softmax, then "
    "two attention-shaped matmuls (`mu . v_i` and the weighted sum of `v_i`) and the trace, i.e. about three times "
    "the attention FLOPs in plain matmul/softmax kernels (no fused flash kernel), and about 35 small ops per layer "
    "that dominate a one-token decoding step; the backward pass recomputes each chunk's probabilities (custom "
    "autograd function), which keeps training memory linear in T at the cost of time.",
}


def _ordered(names) -> list[str]:
    """GPT-2 first, then the solvers in registry order (results.json stores keys sorted)."""
    return [name for name in MODEL_NAMES if name in names]


def _fmt_ratio(entry: dict | None) -> str:
    if entry is None:
        return "n/a"
    ratio = entry["ratio"]
    return f"{ratio['median']:.2f} [{ratio['low']:.2f}, {ratio['high']:.2f}]"


def _memory_index(memory: list[dict] | None) -> dict:
    return {(m["shape"], m["seq_len"], m["batch_size"], m["model"]): m for m in memory or []}


def _loglog_slope(xs: list[float], ys: list[float]) -> float | None:
    import math

    points = [(math.log(x), math.log(y)) for x, y in zip(xs, ys) if y > 0]
    if len(points) < 2:
        return None
    (x0, y0), (x1, y1) = points[-2], points[-1]
    return (y1 - y0) / (x1 - x0)


def render_markdown(results: dict) -> str:
    machine, lines = results["machine"], []
    add = lines.append
    add("# EnergyGPT benchmarks: every solver against Hugging Face GPT-2 (CPU)\n")
    add(f"Command: `{results['command']}`  ")
    add(f"Machine: {machine['cpu']}, {machine['logical_cores']} logical cores (torch uses {machine['torch_threads']} "
        f"threads; shared with other jobs while measured), Python {machine['python']}, torch {machine['torch']}, "
        f"transformers {machine['transformers']}, {machine['platform']}; {machine['date']}.  ")
    add("GPU: " + (machine["gpu"] or "none available in this session, so the GPU table (bf16, `torch.compile`, flash "
                   "SDPA) is not produced.") + "\n")
    for note in results.get("notes", []):  # added by hand when results of several runs are combined
        add(f"Note: {note}\n")
    add("Models: `GPT2LMHeadModel` (sdpa) and `EnergyGPTForCausalLM` (sdpa) with GPT-2's weights transplanted and the "
        f"from-scratch solver parameters {SOLVER_PARAMS}, dropout 0, fp32. Every repetition runs every model once in a "
        "rotating order; a ratio is GPT-2's time / the model's time in the same repetition (>1: faster than GPT-2); "
        "cells are `median [spread]`, the spread being the interquartile range with >= 4 repetitions, else min-max. "
        "Memory is the peak resident memory of one call above the resident memory just before it (weights, AdamW state "
        "and interpreter excluded), measured in a separate process; ratio = model / GPT-2 (<1: less memory).\n")
    memory = _memory_index(results.get("memory"))
    for shape_result in results["shapes"]:
        shape, timings = shape_result["shape"], shape_result["timings"]
        add(f"## Shape `{shape['name']}`: {shape['n_layer']} layers x {shape['n_embd']}, {shape['n_head']} heads, "
            f"vocab {shape['vocab_size']}, batch {shape['batch_size']} x T={shape['seq_len']}; generation "
            f"{shape['prompt_len']} prompt + {shape['new_tokens']} new tokens; {shape_result['repeats']} repetitions\n")
        add("| model | train tok/s | forward tok/s | generate tok/s | train ratio | forward ratio | generate ratio "
            "| train mem MiB (ratio) | forward mem MiB (ratio) |")
        add("|---|---|---|---|---|---|---|---|---|")
        base_mem = memory.get((shape["name"], shape["seq_len"], shape["batch_size"], BASELINE))
        for name in _ordered(timings["train"]):
            cells = [f"{timings[m][name]['tokens_per_s']['median']:.0f}" for m in METRICS]
            cells += [_fmt_ratio(timings[m][name]) for m in METRICS]
            mem = memory.get((shape["name"], shape["seq_len"], shape["batch_size"], name))
            for key in ("train_mib", "forward_mib"):
                if mem is None:
                    cells.append("n/a")
                else:
                    ratio = f" ({mem[key] / base_mem[key]:.2f})" if base_mem and base_mem[key] > 0 else ""
                    cells.append(f"{mem[key]:.0f}{ratio}")
            add(f"| {name} | " + " | ".join(cells) + " |")
        add("")
    scaling = results.get("scaling")
    if scaling:
        shape, seq_lens = scaling["shape"], scaling["seq_lens"]
        add(f"## Scaling with the sequence length (`{shape['name']}` dimensions, batch 1, {scaling['repeats']} "
            "repetitions)\n")
        add("Forward time in ms, median [spread] (ratio to GPT-2); then the peak memory increments in MiB of a forward "
            "(no_grad) and of a training step. The last column is the log-log slope of training memory between the "
            "two longest lengths (1: linear, 2: quadratic).\n")
        header = " | ".join(f"T={t} fwd ms" for t in seq_lens)
        add(f"| model | {header} | " + " | ".join(f"T={t} fwd / train MiB" for t in seq_lens) + " | train-mem slope |")
        add("|---|" + "---|" * (2 * len(seq_lens) + 1))
        for name in _ordered(scaling["forward"][seq_lens[0]]):
            cells, train_mem = [], []
            for t in seq_lens:
                entry = scaling["forward"][t][name]
                ms = [1000 * s for s in entry["seconds"]]
                summary = Summary.of(ms)
                ratio = f" ({entry['ratio']['median']:.2f})" if "ratio" in entry else ""
                cells.append(f"{summary.median:.0f} [{summary.low:.0f}, {summary.high:.0f}]{ratio}")
            for t in seq_lens:
                mem = memory.get((shape["name"], t, 1, name))
                cells.append("n/a" if mem is None else f"{mem['forward_mib']:.0f} / {mem['train_mib']:.0f}")
                train_mem.append(None if mem is None else mem["train_mib"])
            slope = None if None in train_mem else _loglog_slope(seq_lens, train_mem)
            cells.append("n/a" if slope is None else f"{slope:.2f}")
            add(f"| {name} | " + " | ".join(cells) + " |")
        add("\n![scaling](scaling.png)\n")
    add("![ratios](ratios.png)\n")
    add(render_targets(results, memory))
    return "\n".join(lines) + "\n"


def render_targets(results: dict, memory: dict) -> str:
    """Which targets are met, judged on the largest shape measured (GPT-2 small when it ran)."""
    if not results["shapes"]:
        return ""
    shape_result = results["shapes"][-1]
    shape, timings = shape_result["shape"], shape_result["timings"]
    if BASELINE not in timings["train"]:
        return ""
    key = lambda name: (shape["name"], shape["seq_len"], shape["batch_size"], name)
    base_mem = memory.get(key(BASELINE))
    lines = [f"## Targets (ratios to GPT-2 on CPU, judged on shape `{shape['name']}`, median ratios)\n",
             "| solver | target | measured (train / forward / generate; train memory) | met? | why |",
             "|---|---|---|---|---|"]
    for name, (min_speed, max_memory) in TARGETS.items():
        if name not in timings["train"]:
            continue
        speeds = [timings[m][name]["ratio"]["median"] for m in METRICS]
        met = all(s >= min_speed for s in speeds)
        # A miss whose spread still reaches the target is not distinguishable from noise on this machine.
        within_noise = all(timings[m][name]["ratio"]["high"] >= min_speed for m in METRICS)
        target = f"speed >= {min_speed}"
        measured = " / ".join(f"{s:.2f}" for s in speeds)
        mem = memory.get(key(name))
        if base_mem and mem:
            memory_ratio = mem["train_mib"] / base_mem["train_mib"]
            measured += f"; {memory_ratio:.2f}"
            if max_memory is not None:
                target += f", train memory <= {max_memory}x"
                met = met and memory_ratio <= max_memory
        if name == "newton" and results.get("scaling"):
            slope = _loglog_slope(results["scaling"]["seq_lens"], [
                memory.get((results["scaling"]["shape"]["name"], t, 1, name), {}).get("train_mib", 0)
                for t in results["scaling"]["seq_lens"]
            ])
            target += ", linear memory in T"
            if slope is not None:
                measured += f"; memory slope {slope:.2f}"
                met = met and slope < 1.5
        verdict = "yes" if met else ("NO (speed within the spread)" if within_noise else "NO")
        lines.append(f"| {name} | {target} | {measured} | {verdict} | {COST_NOTES[name]} |")
    return "\n".join(lines) + "\n"


def render_plots(results: dict, output_dir: Path) -> list[Path]:
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    written = []
    memory = _memory_index(results.get("memory"))
    scaling = results.get("scaling")
    if scaling:
        seq_lens, shape_name = scaling["seq_lens"], scaling["shape"]["name"]
        figure, axes = plt.subplots(1, 3, figsize=(15, 4.5))
        for name in MODEL_NAMES:
            if name not in scaling["forward"][seq_lens[0]]:
                continue
            style = dict(marker="o", linestyle="--" if name == BASELINE else "-", label=name)
            axes[0].plot(seq_lens, [1000 * scaling["forward"][t][name]["tokens_per_s"]["median"] ** -1 * t
                                    for t in seq_lens], **style)
            mems = [memory.get((shape_name, t, 1, name)) for t in seq_lens]
            if None not in mems:
                axes[1].plot(seq_lens, [m["forward_mib"] for m in mems], **style)
                axes[2].plot(seq_lens, [m["train_mib"] for m in mems], **style)
        titles = ("forward time (ms)", "forward peak memory increment (MiB)", "training-step peak memory increment (MiB)")
        for axis, title in zip(axes, titles):
            axis.set(xscale="log", yscale="log", xlabel="sequence length T (batch 1)", title=title)
            axis.set_xticks(seq_lens, [str(t) for t in seq_lens])
            axis.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
            axis.grid(True, which="both", alpha=0.3)
        axes[0].legend()
        figure.suptitle(f"Scaling with sequence length, `{shape_name}` dimensions, CPU")
        figure.tight_layout()
        buffer = io.BytesIO()
        figure.savefig(buffer, format="png", dpi=110)
        plt.close(figure)
        written.append(atomic_write_bytes(output_dir / "scaling.png", buffer.getvalue()))

    if results["shapes"]:
        figure, axes = plt.subplots(1, len(results["shapes"]), figsize=(7 * len(results["shapes"]), 4.5), squeeze=False)
        for axis, shape_result in zip(axes[0], results["shapes"]):
            timings = shape_result["timings"]
            solvers = [name for name in _ordered(timings["train"]) if name != BASELINE]
            width = 0.8 / len(METRICS)
            for index, metric in enumerate(METRICS):
                medians = [timings[metric][name]["ratio"]["median"] for name in solvers]
                errors = [[m - timings[metric][name]["ratio"]["low"] for m, name in zip(medians, solvers)],
                          [timings[metric][name]["ratio"]["high"] - m for m, name in zip(medians, solvers)]]
                positions = [i + (index - 1) * width for i in range(len(solvers))]
                axis.bar(positions, medians, width, yerr=errors, capsize=3, label=metric)
            axis.axhline(1.0, color="black", linewidth=0.8)
            axis.set_xticks(range(len(solvers)), solvers)
            axis.set(ylabel="speed ratio to GPT-2 (>1 faster)", title=f"shape {shape_result['shape']['name']}")
            axis.legend()
        figure.tight_layout()
        buffer = io.BytesIO()
        figure.savefig(buffer, format="png", dpi=110)
        plt.close(figure)
        written.append(atomic_write_bytes(output_dir / "ratios.png", buffer.getvalue()))
    return written


def write_report(results: dict, output_dir: Path) -> None:
    """results.md and the PNG plots, from results as read back from results.json."""
    if results.get("scaling"):
        results["scaling"]["forward"] = {int(t): v for t, v in results["scaling"]["forward"].items()}
    output_dir.mkdir(parents=True, exist_ok=True)
    render_plots(results, output_dir)
    atomic_write_text(output_dir / "results.md", render_markdown(results))


# -------------------------------------------------------------------------------------------------------------- CLI
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__.split("\n")[0])
    parser.add_argument("--shape", choices=["small", "gpt2-small", "all"], default="all",
                        help="Which model shape(s) to time (default: all).")
    parser.add_argument("--seq_lens", type=int, nargs="*", default=[256, 512, 1024, 2048],
                        help="Sequence lengths of the scaling study (batch 1, small dimensions); none to skip it.")
    parser.add_argument("--repeats", type=int, default=5, help="Repetitions per model and metric (default 5).")
    parser.add_argument("--gpt2_small_repeats", type=int, default=3,
                        help="Repetitions at the GPT-2 small shape, which is slow on CPU (default 3).")
    parser.add_argument("--scaling_repeats", type=int, default=3, help="Repetitions of the scaling study (default 3).")
    parser.add_argument("--models", nargs="+", default=MODEL_NAMES, choices=MODEL_NAMES,
                        help="Models to compare (default: GPT-2 and every solver).")
    parser.add_argument("--output_dir", type=Path, default=Path(__file__).resolve().parent,
                        help="Where results.md, results.json and the PNG plots are written (default: benchmarks/).")
    parser.add_argument("--no_memory", action="store_true", help="Skip the peak-memory probe.")
    parser.add_argument("--quick", action="store_true",
                        help="Smoke run: a tiny shape, 2 repetitions, sequence lengths 16 and 32 (for the tests).")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--from_json", type=Path,
                        help="Only re-render results.md and the plots from a previous results.json (no measuring).")
    parser.add_argument("--memory_probe", help=argparse.SUPPRESS)  # internal: run memory probes (JSON task list)
    args = parser.parse_args(argv)
    for flag in ("repeats", "gpt2_small_repeats", "scaling_repeats"):
        if getattr(args, flag) < 1:
            parser.error(f"--{flag} must be >= 1, got {getattr(args, flag)}.")
    if any(t < 2 for t in args.seq_lens):
        parser.error(f"--seq_lens must all be >= 2, got {args.seq_lens}.")
    if BASELINE not in args.models:
        parser.error(f"--models must include the baseline {BASELINE!r}: every number is a ratio to it.")
    return args


def main(argv: list[str] | None = None) -> int:
    raw_argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(raw_argv)
    if args.memory_probe is not None:
        print(json.dumps(memory_probe(json.loads(args.memory_probe))))
        return 0

    def log(message: str) -> None:
        print(message, flush=True)

    if args.quick:
        shapes, seq_lens, scaling_shape = [SHAPES["tiny"]], sorted(set(args.seq_lens) & {16, 32}) or [16, 32], SHAPES["tiny"]
        repeats = {"tiny": min(args.repeats, 2)}
        scaling_repeats = min(args.scaling_repeats, 2)
    else:
        names = ["small", "gpt2-small"] if args.shape == "all" else [args.shape]
        shapes, seq_lens, scaling_shape = [SHAPES[n] for n in names], sorted(args.seq_lens), SHAPES["small"]
        repeats = {"small": args.repeats, "gpt2-small": args.gpt2_small_repeats}
        scaling_repeats = args.scaling_repeats

    if args.from_json is not None:
        if not args.from_json.is_file():
            raise SystemExit(f"--from_json {args.from_json}: no such file (expected a results.json of this command).")
        results = json.loads(args.from_json.read_text())
        write_report(results, args.output_dir)
        log(f"re-rendered {args.output_dir / 'results.md'} from {args.from_json}")
        return 0

    started = time.perf_counter()
    results = {"command": "python -m benchmarks.run " + " ".join(raw_argv), "machine": machine_info(), "shapes": []}
    log(f"machine: {results['machine']}")
    memory_tasks = [dict(model=m, shape=s.name, batch_size=s.batch_size, seq_len=s.seq_len)
                    for s in shapes for m in args.models]
    memory_tasks += [dict(model=m, shape=scaling_shape.name, batch_size=1, seq_len=t)
                     for t in seq_lens for m in args.models]
    if not args.no_memory:
        log(f"memory probe: {len(memory_tasks)} measurements in a separate process")
        results["memory"] = measure_memory(memory_tasks, log)
    for shape in shapes:
        results["shapes"].append(benchmark_shape(shape, args.models, repeats[shape.name], args.seed, log))
    if seq_lens:
        results["scaling"] = benchmark_scaling(scaling_shape, args.models, seq_lens, scaling_repeats, args.seed, log)
    results["wall_seconds"] = time.perf_counter() - started

    args.output_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(args.output_dir / "results.json", results)
    # JSON keys are strings: render from the round-tripped copy, exactly as `--from_json` does.
    write_report(json.loads((args.output_dir / "results.json").read_text()), args.output_dir)
    log(f"wrote {args.output_dir / 'results.md'} ({results['wall_seconds']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
