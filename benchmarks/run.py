"""Benchmark every EnergyGPT solver against Hugging Face `GPT2LMHeadModel` (both SDPA) on the same dimensions, on CPU
or a GPU.

    python -m benchmarks.run                                   # CUDA if available, else CPU; small + GPT-2 small
    python -m benchmarks.run --device cuda --dtype bfloat16 --shape gpt2-small --seq_len 1024 --batch_size 8
    python -m benchmarks.run --shape small --repeats 3 --seq_lens 256 512
    python -m benchmarks.run --quick --output_dir /tmp/bench   # tiny smoke run (what the test suite does)
    python -m benchmarks.gpu                                   # the prepared one-call GPU run (see benchmarks/gpu.sh)

What is measured (all in one process, interleaved: every repetition runs every model once, in a rotating order, so
machine noise hits all models alike; ratios are taken per repetition, GPT-2 vs the model, then the median):
  * training step tokens/s: forward + backward + AdamW step on `labels = input_ids`;
  * forward tokens/s: `torch.no_grad()` forward, no cache;
  * generation tokens/s: greedy `generate` with the KV cache, exactly `--new_tokens` new tokens per sequence; before
    timing, every solver at its GPT-2-preserving settings (`function_preserving_settings`, e.g. beta = lambda = 0)
    must generate GPT-2's greedy tokens, token for token;
  * peak memory of one forward and one training step above the memory just before it (weights and AdamW state
    excluded): on CUDA `torch.cuda.max_memory_allocated`; on CPU the peak resident set size in a separate process
    (Linux `VmHWM`, reset through `/proc/self/clear_refs`, `MALLOC_MMAP_THRESHOLD_` so that frees reach the OS);
  * scaling with the sequence length (batch 1): forward time and forward / training peak memory.
The device is synchronised around every timed call. Solvers run at their config defaults (the registry's
from-scratch values). Writes `results.md`, `results.json`, `scaling.png` and `ratios.png` to `--output_dir`.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
import transformers

from energy_gpt import EnergyGPTConfig, EnergyGPTForCausalLM, equivalence
from energy_gpt.modeling import solvers_energy_gpt as solvers
from energy_gpt.io_utils import atomic_write_bytes, atomic_write_json, atomic_write_text

BASELINE = "gpt2"
SOLVERS = list(solvers.ATTENTION_SOLVERS)
# The energy axis (gd steps on the linear, gated-linear and Huber energies): no GPT-2-preserving settings exist.
ENERGIES = [name for name, energy in solvers.ATTENTION_ENERGIES.items() if not energy.reduces_to_gpt2] + [
    name for name in solvers.LOCAL_ENERGIES if solvers.LOCAL_ENERGIES[name] is not None]
MODEL_NAMES = [BASELINE, *SOLVERS, *ENERGIES]


def energy_fields(name: str) -> dict:
    """Config fields of a model name: a solver, or an energy (with the gd solver)."""
    if name in solvers.ATTENTION_ENERGIES:
        return {"attention_energy": name}
    if name in solvers.LOCAL_ENERGIES:
        return {"local_energy": name}
    return {"attention_solver": name}
CONV1D_SUFFIXES = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
SDPA_BACKENDS = ("flash", "efficient", "cudnn", "math")
NEWTON_PATHS = ("auto", "fused", "pytorch")
KERNEL_MODULE = "energy_gpt.modeling.newton_kernels_energy_gpt"


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
    "gpt2-medium": Shape("gpt2-medium", n_layer=24, n_embd=1024, n_head=16, vocab_size=50257, batch_size=4,
                         seq_len=256, prompt_len=16, new_tokens=16),
}
METRICS = ("train", "forward", "generate")


@dataclass(frozen=True)
class Settings:
    """How every model of a run executes (the same for GPT-2 and the solvers)."""

    device: str = "cpu"
    dtype: str = "float32"
    compile: bool = False
    sdpa_backend: str | None = None  # None: torch's choice
    newton_path: str = "auto"  # fused Triton kernels where the head rules select them, or force the PyTorch path

    @property
    def torch_device(self) -> torch.device:
        return torch.device(self.device)

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @property
    def is_cuda(self) -> bool:
        return self.torch_device.type == "cuda"

    @contextlib.contextmanager
    def attention(self) -> Iterator[None]:
        """The SDPA backend for every call (torch.nn.attention.sdpa_kernel), and the Newton path."""
        with contextlib.ExitStack() as stack:
            if self.sdpa_backend is not None:
                from torch.nn.attention import SDPBackend, sdpa_kernel

                backend = {"flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
                           "cudnn": SDPBackend.CUDNN_ATTENTION, "math": SDPBackend.MATH}[self.sdpa_backend]
                stack.enter_context(sdpa_kernel(backend))
            if self.newton_path == "pytorch":
                stack.enter_context(fused_newton_kernels_disabled())
            yield


@contextlib.contextmanager
def fused_newton_kernels_disabled() -> Iterator[None]:
    """Force the Newton head rules onto their PyTorch path: every `fused_kernels_available` reachable from
    `energy_gpt.modeling` (the kernel module's own and any name imported from it) answers False meanwhile."""
    patched = []
    for name, module in list(sys.modules.items()):
        if name.startswith("energy_gpt.modeling") and hasattr(module, "fused_kernels_available"):
            patched.append((module, module.fused_kernels_available))
            module.fused_kernels_available = lambda tensor: False
    try:
        yield
    finally:
        for module, original in patched:
            module.fused_kernels_available = original


def newton_kernels_status(settings: Settings) -> dict:
    """Whether the fused kernels can run here and whether the head rules call them (they are selected through
    `fused_kernels_available`, imported by a modeling module other than the kernel module)."""
    try:
        kernels = __import__(KERNEL_MODULE, fromlist=["fused_kernels_available"])
    except ImportError:
        return {"available": False, "wired": False}
    wired = any(value is kernels or value is kernels.fused_kernels_available
                for name, module in list(sys.modules.items())
                if name.startswith("energy_gpt.modeling.") and name != KERNEL_MODULE
                for value in list(vars(module).values()))
    return {"available": kernels.fused_kernels_available(torch.empty(0, device=settings.device)), "wired": wired}


# ----------------------------------------------------------------------------------------------------------- models
def build_model(name: str, shape: Shape, n_positions: int, settings: Settings, gpt2_state: dict | None = None,
                preserving: bool = False) -> torch.nn.Module:
    """`gpt2`: `GPT2LMHeadModel` (sdpa); a solver name: `EnergyGPTForCausalLM` at the config defaults (or, with
    `preserving`, at the settings where it computes GPT-2) with GPT-2's weights transplanted. On the run's device and
    dtype, dropout 0."""
    common = dict(
        vocab_size=shape.vocab_size, n_positions=n_positions, n_embd=shape.n_embd, n_layer=shape.n_layer,
        n_head=shape.n_head, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0,
    )
    if name == BASELINE:
        config = transformers.GPT2Config(**common)
        with settings.torch_device:  # initialise on the device (fast on a GPU), then cast
            model = transformers.GPT2LMHeadModel._from_config(config, attn_implementation="sdpa")
        return model.to(settings.torch_device, settings.torch_dtype)
    # The model's kernel paths are opt-in (default torch): `auto` / `fused` ask for the fused Newton kernels and
    # flash-linear-attention, which the head rules use where they can run.
    fast = settings.newton_path != "pytorch"
    common.update(newton_path="triton" if fast else "torch", linear_attention_path="fla" if fast else "torch")
    config = EnergyGPTConfig(**common, **energy_fields(name))
    if preserving:
        config = EnergyGPTConfig(**common, **energy_fields(name), **equivalence.function_preserving_settings(config))
    with settings.torch_device:
        model = EnergyGPTForCausalLM._from_config(config, attn_implementation="sdpa")
    if gpt2_state is not None:
        # Conv1D [in, out] -> Linear [out, in]; the solver tensors keep their configured initial values.
        state = {
            key: value.t().contiguous() if key.endswith(CONV1D_SUFFIXES) else value
            for key, value in gpt2_state.items()
            if not key.endswith((".attn.bias", ".attn.masked_bias"))
        }
        result = model.load_state_dict(state, strict=False)
        unexplained = [key for key in result.missing_keys if not equivalence.is_rule_tensor(key)]
        if result.unexpected_keys or unexplained:
            raise RuntimeError(f"weight transplant failed: {result.unexpected_keys=} {unexplained=}")
    return model.to(settings.torch_device, settings.torch_dtype)


def build_models(names: list[str], shape: Shape, n_positions: int, seed: int, settings: Settings
                 ) -> dict[str, torch.nn.Module]:
    torch.manual_seed(seed)
    gpt2 = build_model(BASELINE, shape, n_positions, settings)
    state = gpt2.state_dict()
    models = {name: gpt2 if name == BASELINE else build_model(name, shape, n_positions, settings, state)
              for name in names}
    if BASELINE not in names:
        del gpt2
    return models


def make_inputs(shape: Shape, batch_size: int, seq_len: int, seed: int, device: str = "cpu") -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(1, shape.vocab_size, (batch_size, seq_len), generator=generator).to(device)


def greedy_tokens(model: torch.nn.Module, prompt_ids: torch.Tensor, new_tokens: int, settings: Settings
                  ) -> torch.Tensor:
    model.eval()
    with settings.attention():
        output = model.generate(
            input_ids=prompt_ids, attention_mask=torch.ones_like(prompt_ids), do_sample=False,
            max_new_tokens=new_tokens, min_new_tokens=new_tokens, pad_token_id=0,
        )
    if output.shape[1] != prompt_ids.shape[1] + new_tokens:
        raise RuntimeError(f"generate returned {output.shape[1] - prompt_ids.shape[1]} new tokens, not {new_tokens}")
    return output[:, prompt_ids.shape[1]:]


class Workload:
    """The three timed calls of one model on fixed inputs."""

    def __init__(self, model: torch.nn.Module, input_ids: torch.Tensor, prompt_ids: torch.Tensor, new_tokens: int,
                 settings: Settings):
        self.model, self.input_ids, self.prompt_ids, self.new_tokens = model, input_ids, prompt_ids, new_tokens
        self.settings = settings
        self.optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
        # torch.compile covers the training step and the forward; `generate` runs the eager model (its own
        # compilation needs a static cache, a different workload).
        self.call = torch.compile(model) if settings.compile else model

    def train(self) -> None:
        self.model.train()
        with self.settings.attention():
            loss = self.call(input_ids=self.input_ids, labels=self.input_ids, use_cache=False).loss
            loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def forward(self) -> None:
        self.model.eval()
        with torch.no_grad(), self.settings.attention():
            self.call(input_ids=self.input_ids, use_cache=False)

    def generate(self) -> None:
        greedy_tokens(self.model, self.prompt_ids, self.new_tokens, self.settings)

    def tokens(self, metric: str) -> int:
        if metric == "generate":
            return self.prompt_ids.shape[0] * self.new_tokens
        return self.input_ids.numel()


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], None], device: torch.device = torch.device("cpu")) -> float:
    """Wall time of `fn` with the device synchronised before and after (queued GPU work is counted)."""
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - start


def run_interleaved(
    workloads: dict[str, Workload], metrics: tuple[str, ...], repeats: int, log: Callable[[str], None],
    device: torch.device = torch.device("cpu"),
) -> tuple[dict[str, dict[str, list[float]]], dict[str, dict[str, str]]]:
    """Seconds per call, `{metric: {model: [repeats]}}`: one warm-up call, then round-robin in a rotating order.
    A model whose warm-up raises (e.g. no SDPA kernel for its dtype under a forced backend) is left out of that metric
    and its error returned in `{metric: {model: message}}`; GPT-2 must run."""
    seconds: dict[str, dict[str, list[float]]] = {}
    errors: dict[str, dict[str, str]] = {}
    for metric in metrics:
        names = []
        for name, workload in workloads.items():
            try:
                timed(getattr(workload, metric), device)  # warm-up (allocator, lazy optimizer state, compilation)
                names.append(name)
            except Exception as error:  # noqa: BLE001 (reported in the table)
                if name == BASELINE:
                    raise
                errors.setdefault(metric, {})[name] = f"{type(error).__name__}: {str(error).splitlines()[0][:200]}"
                log(f"  {metric}: {name} failed: {errors[metric][name]}")
        seconds[metric] = {name: [] for name in names}
        for repeat in range(repeats):
            order = names[repeat % len(names):] + names[: repeat % len(names)]
            for name in order:
                seconds[metric][name].append(timed(getattr(workloads[name], metric), device))
        log(f"  {metric}: " + ", ".join(f"{n}={statistics.median(s):.4f}s" for n, s in seconds[metric].items()))
    return seconds, errors


def generation_check(models: dict[str, torch.nn.Module], shape: Shape, n_positions: int, prompt_ids: torch.Tensor,
                     settings: Settings, log: Callable[[str], None]) -> dict[str, dict]:
    """Every solver at its GPT-2-preserving settings, with GPT-2's weights, must generate GPT-2's greedy tokens.
    fp32: a mismatch is an error. fp16 / bf16: reported (different kernels may round a near-tie differently)."""
    expected = greedy_tokens(models[BASELINE], prompt_ids, shape.new_tokens, settings)
    state = models[BASELINE].state_dict()
    check = {}
    for name in models:
        if name == BASELINE or name in ENERGIES:  # other energies compute other functions: nothing to compare
            continue
        model = build_model(name, shape, n_positions, settings, state, preserving=True)
        tokens = greedy_tokens(model, prompt_ids, shape.new_tokens, settings)
        matching = int((tokens == expected).all(0).long().cumprod(0).sum())  # steps before the first divergence
        check[name] = {"equal": bool(torch.equal(tokens, expected)), "matching_steps": matching,
                       "steps": shape.new_tokens}
        del model
        if not check[name]["equal"]:
            message = (f"{name} at its GPT-2-preserving settings generated other tokens than GPT-2 after "
                       f"{matching} of {shape.new_tokens} steps")
            if settings.dtype == "float32":
                raise RuntimeError(message)
            log(f"  warning: {message} ({settings.dtype})")
    log("  generation check: " + ", ".join(f"{n}={'same tokens' if c['equal'] else 'DIFFERENT'}"
                                           for n, c in check.items()))
    return check


# ----------------------------------------------------------------------------------------------------------- memory
def _proc_status_kib(field: str) -> int:
    match = re.search(rf"^{field}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.MULTILINE)
    return int(match.group(1))


def _peak_increment_mib(fn: Callable[[], None], device: torch.device) -> float:
    """Peak memory during `fn` above the memory just before it: CUDA allocator statistics, or Linux VmHWM reset."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        fn()
        torch.cuda.synchronize(device)
        return (torch.cuda.max_memory_allocated(device) - before) / 2**20
    Path("/proc/self/clear_refs").write_text("5")  # reset the peak (VmHWM) to the current RSS
    before = _proc_status_kib("VmRSS")
    fn()
    # The kernel's RSS counters are batched per CPU (approximate to a few hundred KiB): tiny calls can read < 0.
    return max(0.0, (_proc_status_kib("VmHWM") - before) / 1024)


def memory_probe(tasks: list[dict], settings: Settings) -> list[dict]:
    """Forward and training-step peak increments per task (on CPU in a fresh process, see `measure_memory`)."""
    results = []
    for task in tasks:
        shape = SHAPES[task["shape"]]
        torch.manual_seed(0)
        model = build_model(task["model"], shape, n_positions=task["seq_len"], settings=settings)
        input_ids = make_inputs(shape, task["batch_size"], task["seq_len"], seed=1, device=settings.device)
        workload = Workload(model, input_ids, input_ids[:, :1], new_tokens=1, settings=settings)
        # Create the AdamW state up front (a zero-gradient step) so that it is part of the baseline, not the peak.
        for parameter in model.parameters():
            parameter.grad = torch.zeros_like(parameter)
        workload.optimizer.step()
        workload.optimizer.zero_grad(set_to_none=True)
        try:
            workload.forward()  # warm-up of one-time allocations (kernels, thread pools, compilation)
            workload.train()
            entry = {"forward_mib": _peak_increment_mib(workload.forward, settings.torch_device),
                     "train_mib": _peak_increment_mib(workload.train, settings.torch_device)}
        except Exception as error:  # noqa: BLE001 (reported as n/a, as in the timing tables)
            if task["model"] == BASELINE:
                raise
            entry = {"error": f"{type(error).__name__}: {str(error).splitlines()[0][:200]}"}
        results.append({**task, **entry})
        del model, workload
        gc.collect()
    return results


def measure_memory(tasks: list[dict], settings: Settings, log: Callable[[str], None]) -> list[dict] | None:
    """CUDA: in this process (allocator statistics). CPU: all probes in one separate process, where big frees are
    returned to the OS (mmap threshold) so that the resident size follows the live tensors."""
    if settings.is_cuda:
        return memory_probe(tasks, settings)
    if not Path("/proc/self/clear_refs").exists():
        log("memory: /proc/self/clear_refs not available (not Linux): peak memory not measured")
        return None
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "HF_HUB_OFFLINE": "1"}
    completed = subprocess.run(
        [sys.executable, "-m", "benchmarks.run", "--memory_probe", json.dumps({"tasks": tasks, **asdict(settings)})],
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
def benchmark_shape(shape: Shape, names: list[str], repeats: int, seed: int, settings: Settings, log) -> dict:
    log(f"shape {shape.name}: {asdict(shape)}, {repeats} repetitions, {asdict(settings)}")
    n_positions = max(shape.seq_len, shape.prompt_len + shape.new_tokens)
    models = build_models(names, shape, n_positions=n_positions, seed=seed, settings=settings)
    input_ids = make_inputs(shape, shape.batch_size, shape.seq_len, seed=seed + 1, device=settings.device)
    prompt_ids = input_ids[:, : shape.prompt_len]
    result = {"shape": asdict(shape), "repeats": repeats}
    if BASELINE in models and "gd" in models:  # sanity: gd is GPT-2
        with torch.no_grad(), settings.attention():
            difference = (models["gd"].eval()(input_ids).logits.float()
                          - models[BASELINE].eval()(input_ids).logits.float()).abs().max()
        log(f"  gd vs GPT-2 max |logit difference| = {difference.item():.3g}")
        result["gd_max_logit_difference"] = difference.item()
    if BASELINE in models:
        result["generation_check"] = generation_check(models, shape, n_positions, prompt_ids, settings, log)
    workloads = {name: Workload(model, input_ids, prompt_ids, shape.new_tokens, settings)
                 for name, model in models.items()}
    seconds, errors = run_interleaved(workloads, METRICS, repeats, log, settings.torch_device)
    result["timings"] = summarise(seconds, workloads)
    result["errors"] = errors
    del models, workloads
    gc.collect()
    return result


def benchmark_scaling(shape: Shape, names: list[str], seq_lens: list[int], repeats: int, seed: int,
                      settings: Settings, log) -> dict:
    log(f"scaling: {shape.name} dimensions, batch 1, sequence lengths {seq_lens}, {repeats} repetitions")
    models = build_models(names, shape, n_positions=max(seq_lens), seed=seed, settings=settings)
    forward = {}
    for seq_len in seq_lens:
        input_ids = make_inputs(shape, 1, seq_len, seed=seed + seq_len, device=settings.device)
        workloads = {name: Workload(model, input_ids, input_ids[:, :1], 1, settings) for name, model in models.items()}
        log(f" T={seq_len}")
        seconds, _ = run_interleaved(workloads, ("forward",), repeats, log, settings.torch_device)
        forward[seq_len] = summarise(seconds, workloads)["forward"]
    del models
    gc.collect()
    return {"shape": asdict(shape), "seq_lens": seq_lens, "repeats": repeats, "forward": forward}


def machine_info(settings: Settings | None = None) -> dict:
    cpu = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        match = re.search(r"^model name\s*:\s*(.+)$", cpuinfo.read_text(), re.MULTILINE)
        cpu = match.group(1) if match else cpu
    info = {
        "cpu": cpu, "logical_cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
        "platform": platform.platform(), "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "date": time.strftime("%Y-%m-%d %H:%M %Z"),
    }
    if torch.cuda.is_available():
        info["cuda"] = torch.version.cuda
        try:
            info["driver"] = subprocess.run(
                ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"], capture_output=True, text=True,
                check=True, timeout=30).stdout.strip().splitlines()[0]
        except (OSError, subprocess.SubprocessError, IndexError):
            info["driver"] = None
        try:
            import triton

            info["triton"] = triton.__version__
        except ImportError:
            info["triton"] = None
    if settings is not None:
        info["newton_kernels"] = newton_kernels_status(settings)
    return info


# ---------------------------------------------------------------------------------------------------------- reports
# The GPU targets, ratios to GPT-2 in the same run (meant for one GPU in bf16 at GPT-2 small width, T = 1024 and
# 4096): minimum training-step speed, minimum decoding speed, maximum training-memory ratio (and linear in T).
TARGETS = {
    "gd": {"train": 1.0, "generate": 0.9, "memory": 1.1},
    "momentum": {"train": 0.97, "generate": 0.9, "memory": 1.1},
    "nag": {"train": 0.97, "generate": 0.9, "memory": 1.1},
    "newton_light": {"train": 0.9, "generate": 0.9, "memory": 1.1},
    "newton": {"train": 0.8, "generate": 0.9, "memory": 1.1},
}
# Why each solver costs what it costs (the structure of the computation, true whatever the numbers say).
COST_NOTES = {
    "gd": "the same computation as GPT-2 (`nn.Linear` instead of `Conv1D`, one rule call per layer).",
    "momentum": "one extra `beta * m + g` per layer; `m` (B x T x d) is kept for the backward pass.",
    "nag": "the lookahead `x + beta * m` and its LayerNorm per layer, plus the momentum update.",
    "dense": "a learned weighted sum of the earlier layers' attention outputs, all kept for the backward pass.",
    "newton_light": "one more attention-shaped pass (`E_p[v*v]`: a second SDPA pass with values `v * v`, or the fused "
    "Triton kernel) and elementwise work; memory stays linear in T.",
    "newton": "`Sigma mu` needs a second pass over keys and values (`sum_i p_i (v_i . mu) v_i` and the trace): on the "
    "PyTorch path per query chunk the fp32 scores and softmax are recomputed and two attention-shaped matmuls run "
    "outside any fused kernel (about three times the attention work); the fused Triton kernel streams K / V tiles "
    "instead (flash-attention pattern, nothing T x S in memory). Either way training memory is linear in T.",
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
    return {(m["shape"], m["seq_len"], m["batch_size"], m["model"]): m for m in memory or [] if "error" not in m}


def _loglog_slope(xs: list[float], ys: list[float]) -> float | None:
    import math

    points = [(math.log(x), math.log(y)) for x, y in zip(xs, ys) if y > 0]
    if len(points) < 2:
        return None
    (x0, y0), (x1, y1) = points[-2], points[-1]
    return (y1 - y0) / (x1 - x0)


def _settings_of(results: dict) -> Settings:
    """The run's settings (results.json of earlier versions has none: CPU, fp32)."""
    return Settings(**results.get("settings", {}))


def describe_machine(results: dict) -> str:
    machine, settings = results["machine"], _settings_of(results)
    software = (f"Python {machine['python']}, torch {machine['torch']}, transformers {machine['transformers']}, "
                f"{machine['platform']}; {machine['date']}")
    if settings.device.startswith("cuda"):
        return (f"GPU: {machine.get('gpu')}, driver {machine.get('driver')}, CUDA {machine.get('cuda')}, triton "
                f"{machine.get('triton')}; CPU {machine['cpu']} ({machine['logical_cores']} logical cores); "
                f"{software}.")
    return (f"CPU: {machine['cpu']}, {machine['logical_cores']} logical cores (torch uses {machine['torch_threads']} "
            f"threads; shared with other jobs while measured); {software}.")


def render_markdown(results: dict) -> str:
    settings, lines = _settings_of(results), []
    add = lines.append
    device_name = "GPU" if settings.is_cuda else "CPU"
    add(f"# EnergyGPT benchmarks: every solver against Hugging Face GPT-2 ({device_name}, {settings.dtype})\n")
    add(f"Command: `{results['command']}`  ")
    add(describe_machine(results) + "  ")
    add(f"Settings: device {settings.device}, dtype {settings.dtype}, torch.compile {settings.compile}, SDPA backend "
        f"{settings.sdpa_backend or 'torch default'}, Newton path {settings.newton_path}"
        + (f" (fused kernels available: {results['machine']['newton_kernels']['available']}, called by the head "
           f"rules: {results['machine']['newton_kernels']['wired']})" if "newton_kernels" in results["machine"] else "")
        + ".\n")
    for note in results.get("notes", []):  # added by hand when results of several runs are combined
        add(f"Note: {note}\n")
    memory_how = ("`torch.cuda.max_memory_allocated` during one call minus the allocated memory just before it"
                  if settings.is_cuda else "the peak resident memory of one call above the resident memory just before "
                  "it, measured in a separate process")
    add("Models: `GPT2LMHeadModel` (sdpa) and `EnergyGPTForCausalLM` (sdpa) with GPT-2's weights transplanted; solvers "
        f"at their config defaults (the registry's from-scratch values), dropout 0, parameters in {settings.dtype}. "
        "Every repetition runs every model once in a rotating order, the device synchronised around every call; a "
        "ratio is GPT-2's time / the model's time in the same repetition (>1: faster than GPT-2); cells are "
        "`median [spread]`, the spread being the interquartile range with >= 4 repetitions, else min-max. Memory is "
        f"{memory_how} (weights and AdamW state excluded); ratio = model / GPT-2 (<1: less memory).\n")
    memory = _memory_index(results.get("memory"))
    for shape_result in results["shapes"]:
        shape, timings = shape_result["shape"], shape_result["timings"]
        add(f"## Shape `{shape['name']}`: {shape['n_layer']} layers x {shape['n_embd']}, {shape['n_head']} heads, "
            f"vocab {shape['vocab_size']}, batch {shape['batch_size']} x T={shape['seq_len']}; generation "
            f"{shape['prompt_len']} prompt + {shape['new_tokens']} new tokens; {shape_result['repeats']} repetitions\n")
        check = shape_result.get("generation_check")
        if check:
            same = [name for name, c in check.items() if c["equal"]]
            different = [f"{name} ({c['matching_steps']}/{c['steps']} steps)" for name, c in check.items()
                         if not c["equal"]]
            differ = f"; different for {', '.join(different)}" if different else ""
            add(f"Generation check (GPT-2-preserving settings, greedy tokens vs GPT-2): same tokens for "
                f"{', '.join(same) or 'none'}{differ}.\n")
        add("| model | train tok/s | forward tok/s | generate tok/s | train ratio | forward ratio | generate ratio "
            "| train mem MiB (ratio) | forward mem MiB (ratio) |")
        add("|---|---|---|---|---|---|---|---|---|")
        base_mem = memory.get((shape["name"], shape["seq_len"], shape["batch_size"], BASELINE))
        errors = shape_result.get("errors", {})
        names = set().union(*(timings[m] for m in METRICS), *(errors.get(m, {}) for m in METRICS))
        for name in _ordered(names):
            cells = [f"{timings[m][name]['tokens_per_s']['median']:.0f}" if name in timings[m] else "error"
                     for m in METRICS]
            cells += [_fmt_ratio(timings[m].get(name)) for m in METRICS]
            mem = memory.get((shape["name"], shape["seq_len"], shape["batch_size"], name))
            for key in ("train_mib", "forward_mib"):
                if mem is None:
                    cells.append("n/a")
                else:
                    ratio = f" ({mem[key] / base_mem[key]:.2f})" if base_mem and base_mem[key] > 0 else ""
                    cells.append(f"{mem[key]:.0f}{ratio}")
            add(f"| {name} | " + " | ".join(cells) + " |")
        for metric, failed in errors.items():
            for name, message in failed.items():
                add(f"\n{name} {metric}: error `{message}`")
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
                entry = scaling["forward"][t].get(name)
                if entry is None:
                    cells.append("error")
                    continue
                summary = Summary.of([1000 * s for s in entry["seconds"]])
                ratio = f" ({entry['ratio']['median']:.2f})" if "ratio" in entry else ""
                cells.append(f"{summary.median:.1f} [{summary.low:.1f}, {summary.high:.1f}]{ratio}")
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
    """Which of the GPU targets are met, judged on the largest shape measured, on this run's device and dtype."""
    if not results["shapes"]:
        return ""
    settings = _settings_of(results)
    shape_result = results["shapes"][-1]
    shape, timings = shape_result["shape"], shape_result["timings"]
    if BASELINE not in timings["train"]:
        return ""

    def key(name: str) -> tuple:
        return shape["name"], shape["seq_len"], shape["batch_size"], name

    base_mem = memory.get(key(BASELINE))
    lines = [f"## Targets (judged on {'GPU' if settings.is_cuda else 'CPU'}, {settings.dtype}, shape "
             f"`{shape['name']}` T={shape['seq_len']}, median ratios)\n",
             "The targets are set for one GPU in bf16 at GPT-2 small width; other devices only show the direction.\n",
             "| solver | target | measured (train / generate; train memory) | met? | why |",
             "|---|---|---|---|---|"]
    for name, target in TARGETS.items():
        if name not in timings["train"] or name not in timings["generate"]:
            continue
        speeds = {m: timings[m][name]["ratio"] for m in ("train", "generate")}
        met = all(speeds[m]["median"] >= target[m] for m in speeds)
        # A miss whose spread still reaches the target is not distinguishable from noise.
        within_noise = all(speeds[m]["high"] >= target[m] for m in speeds)
        text = f"train >= {target['train']}, decode >= {target['generate']}, train memory <= {target['memory']}x"
        measured = " / ".join(f"{speeds[m]['median']:.2f}" for m in speeds)
        mem = memory.get(key(name))
        if base_mem and mem and base_mem["train_mib"] > 0:
            memory_ratio = mem["train_mib"] / base_mem["train_mib"]
            measured += f"; {memory_ratio:.2f}"
            met = met and memory_ratio <= target["memory"]
        else:
            measured += "; memory n/a"
        if results.get("scaling"):
            slope = _loglog_slope(results["scaling"]["seq_lens"], [
                memory.get((results["scaling"]["shape"]["name"], t, 1, name), {}).get("train_mib", 0)
                for t in results["scaling"]["seq_lens"]
            ])
            text += ", linear memory in T"
            if slope is not None:
                measured += f"; memory slope {slope:.2f}"
                met = met and slope < 1.5
        verdict = "yes" if met else ("NO (speed within the spread)" if within_noise else "NO")
        lines.append(f"| {name} | {text} | {measured} | {verdict} | {COST_NOTES[name]} |")
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
            if any(name not in scaling["forward"][t] for t in seq_lens):
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
        figure.suptitle(f"Scaling with sequence length, `{shape_name}` dimensions, {_settings_of(results).device}, "
                         f"{_settings_of(results).dtype}")
        figure.tight_layout()
        buffer = io.BytesIO()
        figure.savefig(buffer, format="png", dpi=110)
        plt.close(figure)
        written.append(atomic_write_bytes(output_dir / "scaling.png", buffer.getvalue()))

    if results["shapes"]:
        figure, axes = plt.subplots(1, len(results["shapes"]), figsize=(7 * len(results["shapes"]), 4.5), squeeze=False)
        for axis, shape_result in zip(axes[0], results["shapes"]):
            timings = shape_result["timings"]
            names = [name for name in _ordered(timings["train"])
                     if name != BASELINE and all(name in timings[metric] for metric in METRICS)]
            width = 0.8 / len(METRICS)
            for index, metric in enumerate(METRICS):
                medians = [timings[metric][name]["ratio"]["median"] for name in names]
                errors = [[m - timings[metric][name]["ratio"]["low"] for m, name in zip(medians, names)],
                          [timings[metric][name]["ratio"]["high"] - m for m, name in zip(medians, names)]]
                positions = [i + (index - 1) * width for i in range(len(names))]
                axis.bar(positions, medians, width, yerr=errors, capsize=3, label=metric)
            axis.axhline(1.0, color="black", linewidth=0.8)
            axis.set_xticks(range(len(names)), names)
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
def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__.split("\n")[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default=default_device(),
                        help="Where the models run (default: cuda if available, else cpu).")
    parser.add_argument("--dtype", choices=list(DTYPES), default="float32",
                        help="Parameter and activation dtype of every model (default float32).")
    parser.add_argument("--compile", action="store_true", help="torch.compile the training step and the forward.")
    parser.add_argument("--sdpa_backend", choices=SDPA_BACKENDS, default=None,
                        help="Force one SDPA backend (torch.nn.attention.sdpa_kernel) for every call; a model with no "
                             "kernel under it is reported as an error (default: torch's choice).")
    parser.add_argument("--newton_path", choices=NEWTON_PATHS, default="auto",
                        help="auto: the fused Triton kernels where the head rules select them; pytorch: force the "
                             "PyTorch path; fused: like auto, but refuse to run without the kernels.")
    parser.add_argument("--shape", choices=["small", "gpt2-small", "gpt2-medium", "all"], default="all",
                        help="Which model shape(s) to time (default: all = small and gpt2-small).")
    parser.add_argument("--seq_len", type=int, help="Override the shapes' training / forward sequence length.")
    parser.add_argument("--batch_size", type=int, help="Override the shapes' batch size.")
    parser.add_argument("--prompt_len", type=int, help="Override the generation prompt length.")
    parser.add_argument("--new_tokens", type=int, help="Override the number of generated tokens.")
    parser.add_argument("--seq_lens", type=int, nargs="*", default=[256, 512, 1024, 2048],
                        help="Sequence lengths of the scaling study (batch 1); none to skip it.")
    parser.add_argument("--scaling_shape", choices=["small", "gpt2-small", "gpt2-medium"], default="small",
                        help="Dimensions of the scaling study (default small).")
    parser.add_argument("--repeats", type=int, default=5, help="Repetitions per model and metric (default 5).")
    parser.add_argument("--gpt2_small_repeats", type=int, default=3,
                        help="Repetitions at the GPT-2 small / medium shapes, slow on CPU (default 3).")
    parser.add_argument("--scaling_repeats", type=int, default=3, help="Repetitions of the scaling study (default 3).")
    parser.add_argument("--models", nargs="+", default=[BASELINE, *SOLVERS], choices=MODEL_NAMES,
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
    for flag in ("repeats", "gpt2_small_repeats", "scaling_repeats", "seq_len", "batch_size", "prompt_len",
                 "new_tokens"):
        if getattr(args, flag) is not None and getattr(args, flag) < 1:
            parser.error(f"--{flag} must be >= 1, got {getattr(args, flag)}.")
    if any(t < 2 for t in args.seq_lens):
        parser.error(f"--seq_lens must all be >= 2, got {args.seq_lens}.")
    if BASELINE not in args.models:
        parser.error(f"--models must include the baseline {BASELINE!r}: every number is a ratio to it.")
    if args.device == "cuda" and not torch.cuda.is_available() and args.memory_probe is None and not args.from_json:
        parser.error("--device cuda: torch sees no CUDA device here (torch.cuda.is_available() is False).")
    if args.device == "cpu" and args.sdpa_backend in ("flash", "cudnn"):
        parser.error(f"--sdpa_backend {args.sdpa_backend} exists on CUDA only; on cpu use efficient, math or none.")
    return args


def settings_from_args(args: argparse.Namespace) -> Settings:
    return Settings(device=args.device, dtype=args.dtype, compile=args.compile, sdpa_backend=args.sdpa_backend,
                    newton_path=args.newton_path)


def resolve_shape(name: str, args: argparse.Namespace) -> Shape:
    overrides = {field: getattr(args, field) for field in ("seq_len", "batch_size", "prompt_len", "new_tokens")
                 if getattr(args, field) is not None}
    return replace(SHAPES[name], **overrides)


def main(argv: list[str] | None = None) -> int:
    raw_argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(raw_argv)
    if args.memory_probe is not None:
        probe = json.loads(args.memory_probe)
        print(json.dumps(memory_probe(probe.pop("tasks"), Settings(**probe))))
        return 0

    def log(message: str) -> None:
        print(message, flush=True)

    if args.from_json is not None:
        if not args.from_json.is_file():
            raise SystemExit(f"--from_json {args.from_json}: no such file (expected a results.json of this command).")
        results = json.loads(args.from_json.read_text())
        write_report(results, args.output_dir)
        log(f"re-rendered {args.output_dir / 'results.md'} from {args.from_json}")
        return 0

    settings = settings_from_args(args)
    if args.quick:
        shapes, scaling_shape = [SHAPES["tiny"]], SHAPES["tiny"]
        seq_lens = sorted(set(args.seq_lens) & {16, 32}) or [16, 32]
        repeats = {"tiny": min(args.repeats, 2)}
        scaling_repeats = min(args.scaling_repeats, 2)
    else:
        names = ["small", "gpt2-small"] if args.shape == "all" else [args.shape]
        shapes, seq_lens = [resolve_shape(n, args) for n in names], sorted(args.seq_lens)
        scaling_shape = SHAPES[args.scaling_shape]
        repeats = {"small": args.repeats, "gpt2-small": args.gpt2_small_repeats, "gpt2-medium": args.gpt2_small_repeats}
        scaling_repeats = args.scaling_repeats
    if settings.newton_path == "fused" and not newton_kernels_status(settings)["available"]:
        raise SystemExit("--newton_path fused: the fused Newton kernels cannot run here (they need triton and CUDA).")

    started = time.perf_counter()
    results = {"command": "python -m benchmarks.run " + " ".join(raw_argv), "machine": machine_info(settings),
               "settings": asdict(settings), "shapes": []}
    log(f"machine: {results['machine']}")
    memory_tasks = [dict(model=m, shape=s.name, batch_size=s.batch_size, seq_len=s.seq_len)
                    for s in shapes for m in args.models]
    memory_tasks += [dict(model=m, shape=scaling_shape.name, batch_size=1, seq_len=t)
                     for t in seq_lens for m in args.models]
    if not args.no_memory:
        log(f"memory probe: {len(memory_tasks)} measurements")
        results["memory"] = measure_memory(memory_tasks, settings, log)
    for shape in shapes:
        results["shapes"].append(benchmark_shape(shape, args.models, repeats[shape.name], args.seed, settings, log))
    if seq_lens:
        results["scaling"] = benchmark_scaling(scaling_shape, args.models, seq_lens, scaling_repeats, args.seed,
                                               settings, log)
    results["wall_seconds"] = time.perf_counter() - started

    args.output_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(args.output_dir / "results.json", results)
    # JSON keys are strings: render from the round-tripped copy, exactly as `--from_json` does.
    write_report(json.loads((args.output_dir / "results.json").read_text()), args.output_dir)
    log(f"wrote {args.output_dir / 'results.md'} ({results['wall_seconds']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
