"""Micro benchmark of the energy head rules: linear / gated_linear against softmax attention (SDPA), T = 256 .. 8192.

    python -m benchmarks.energies --repeats 5                       # T = 256 .. 8192 (~6 min on 2 shared cores)
    python -m benchmarks.energies --seq_lens 256 1024 --repeats 2 --output_dir /tmp/bench

Head level only (what differs between the energies): one attention layer's per-head computation on random
(B, H, T, D) queries, keys and values, fp32, CPU. The rules are the registered energies of
`modeling/energies_energy_gpt.py` (no model is built), with their config defaults (`elu_plus_one` features, `sum`
normalisation, the data-dependent gate) and the PyTorch chunked path. The baseline is `torch.nn.functional.scaled_dot_product_attention`
with `is_causal=True`, what EnergyGPT's `softmax` heads run with `attn_implementation="sdpa"`.

Measured, in one process and interleaved (every repetition runs every rule once, in a rotating order, after one
warm-up call each; ratios are taken within a repetition, then the median): forward time (`torch.no_grad()`) and
training time (forward + backward of the sum of the outputs). Peak memory is measured in one separate process started
with `MALLOC_MMAP_THRESHOLD_=65536` (freed tensors go back to the OS): the peak resident set size (Linux `VmHWM`,
reset through `/proc/self/clear_refs`) during one forward and one training call, minus the resident size just before
it. Writes `energies.md`, `energies.json` and `energies.png` to `--output_dir` (default `benchmarks/`).
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
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.nn.functional as F

from energy_gpt.modeling.energies_energy_gpt import LINEAR_CHUNK_SIZE
from energy_gpt.modeling.solvers_energy_gpt import ATTENTION_ENERGIES

REPO_ROOT = Path(__file__).resolve().parents[1]
BASELINE = "softmax-sdpa"
RULES = ("linear", "gated_linear")
NAMES = (BASELINE, *RULES)
METRICS = ("forward", "train")
DEFAULT_SEQ_LENS = (256, 512, 1024, 2048, 4096, 8192)


# The linear rules' config fields (shared ones once), whose defaults the benchmark runs.
FIELDS = tuple({f.name: f for name in RULES for f in ATTENTION_ENERGIES[name].fields}.values())


def build_heads(heads: int, head_dim: int) -> dict[str, callable]:
    """name -> `fn(query, key, value) -> output`, each rule with its config defaults."""
    config = SimpleNamespace(**{field.name: field.default for field in FIELDS}, num_attention_heads=heads,
                             hidden_size=heads * head_dim)
    attention = SimpleNamespace(scaling=head_dim**-0.5, training=True)
    functions = {BASELINE: lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True)}
    for name in RULES:
        rule = ATTENTION_ENERGIES[name].rule(config, layer_idx=0)
        functions[name] = lambda q, k, v, rule=rule: rule(attention, q, k, v, None, scaling=attention.scaling)[0]
    return functions


class Workload:
    def __init__(self, function, batch: int, heads: int, seq_len: int, head_dim: int, seed: int):
        generator = torch.Generator().manual_seed(seed)
        self.function = function
        self.inputs = [torch.randn(batch, heads, seq_len, head_dim, generator=generator) for _ in range(3)]

    def forward(self) -> None:
        with torch.no_grad():
            self.function(*self.inputs)

    def train(self) -> None:
        inputs = [tensor.detach().requires_grad_() for tensor in self.inputs]
        self.function(*inputs).sum().backward()


def timed(function) -> float:
    start = time.perf_counter()
    function()
    return time.perf_counter() - start


def median_and_spread(values: list[float]) -> dict:
    """Median with the interquartile range (>= 4 values) or min-max."""
    if len(values) >= 4:
        low, _, high = statistics.quantiles(values, n=4, method="inclusive")
    else:
        low, high = min(values), max(values)
    return {"median": statistics.median(values), "low": low, "high": high}


def time_sequence_length(args, seq_len: int, log) -> dict:
    functions = build_heads(args.heads, args.head_dim)
    workloads = {name: Workload(functions[name], args.batch, args.heads, seq_len, args.head_dim, args.seed)
                 for name in NAMES}
    seconds = {metric: {name: [] for name in NAMES} for metric in METRICS}
    for metric in METRICS:
        for name in NAMES:
            getattr(workloads[name], metric)()  # warm-up
        for repeat in range(args.repeats):
            order = NAMES[repeat % len(NAMES):] + NAMES[: repeat % len(NAMES)]
            for name in order:
                seconds[metric][name].append(timed(getattr(workloads[name], metric)))
    result = {}
    for metric in METRICS:
        baseline = seconds[metric][BASELINE]
        result[metric] = {
            name: {"seconds": times, "ms": median_and_spread([1000 * t for t in times]),
                   "speedup_vs_sdpa": median_and_spread([b / t for b, t in zip(baseline, times)])}
            for name, times in seconds[metric].items()
        }
    log(f"T={seq_len}: " + "; ".join(
        f"{metric} " + ", ".join(f"{n}={result[metric][n]['ms']['median']:.1f}ms" for n in NAMES) for metric in METRICS
    ))
    return result


# ----------------------------------------------------------------------------------------------------------- memory
def _proc_status_kib(field: str) -> int:
    return int(re.search(rf"^{field}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.MULTILINE).group(1))


def _peak_increment_mib(function) -> float:
    gc.collect()
    Path("/proc/self/clear_refs").write_text("5")  # reset the peak (VmHWM) to the current RSS
    before = _proc_status_kib("VmRSS")
    function()
    return max(0.0, (_proc_status_kib("VmHWM") - before) / 1024)


def memory_probe(args) -> list[dict]:
    """Runs in the separate process: peak increments of every rule and sequence length."""
    functions = build_heads(args.heads, args.head_dim)
    results = []
    for seq_len in args.seq_lens:
        for name in NAMES:
            workload = Workload(functions[name], args.batch, args.heads, seq_len, args.head_dim, args.seed)
            workload.forward()  # one-time allocations (thread pools, kernels)
            results.append({"name": name, "seq_len": seq_len, "forward_mib": _peak_increment_mib(workload.forward),
                            "train_mib": _peak_increment_mib(workload.train)})
            del workload
    return results


def measure_memory(args) -> list[dict] | None:
    if not Path("/proc/self/clear_refs").exists():
        return None
    argv = [sys.executable, "-m", "benchmarks.energies", "--memory_probe", "--seq_lens", *map(str, args.seq_lens),
            "--batch", str(args.batch), "--heads", str(args.heads), "--head_dim", str(args.head_dim)]
    completed = subprocess.run(argv, capture_output=True, text=True, cwd=REPO_ROOT, check=False,
                               env={**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"})
    if completed.returncode != 0:
        raise RuntimeError(f"memory probe failed:\n{completed.stderr[-4000:]}")
    return json.loads(completed.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------------------------------------------- report
def crossover(results: dict, metric: str, name: str) -> int | None:
    """The smallest measured T from which `name` is faster than SDPA (median speed-up > 1) at every longer T."""
    seq_lens = sorted(int(t) for t in results["timings"])
    faster = [results["timings"][str(t)][metric][name]["speedup_vs_sdpa"]["median"] > 1.0 for t in seq_lens]
    for index, seq_len in enumerate(seq_lens):
        if all(faster[index:]):
            return seq_len
    return None


def render_markdown(results: dict) -> str:
    settings = results["settings"]
    memory = {(m["name"], m["seq_len"]): m for m in results.get("memory") or []}
    lines = [
        "# Energy head rules: speed and memory against softmax attention (SDPA), CPU",
        "",
        f"Command: `{results['command']}`  ",
        f"Machine: {results['machine']}  ",
        (f"Shape: batch {settings['batch']}, {settings['heads']} heads of {settings['head_dim']}, fp32; "
         f"{settings['repeats']} interleaved repetitions per T. Rules with their config defaults "
         f"({results['defaults']}), PyTorch chunked path (chunk {results['chunk_size']})."),
        "",
        ("Speed-up = SDPA time / rule time within a repetition (median, spread in brackets; > 1: faster than SDPA). "
         "Memory = peak resident increment during one call (MiB)."),
        "",
        ("| T | metric | softmax-sdpa ms | linear ms | gated_linear ms | linear speed-up | gated_linear speed-up "
         "| memory sdpa / linear / gated (MiB) |"),
        "|---|---|---|---|---|---|---|---|",
    ]
    for seq_len in sorted(int(t) for t in results["timings"]):
        row = results["timings"][str(seq_len)]
        for metric in METRICS:
            ms = [f"{row[metric][n]['ms']['median']:.1f}" for n in NAMES]
            ratios = [f"{row[metric][n]['speedup_vs_sdpa']['median']:.2f}x "
                      f"[{row[metric][n]['speedup_vs_sdpa']['low']:.2f}-{row[metric][n]['speedup_vs_sdpa']['high']:.2f}]"
                      for n in RULES]
            mems = [memory.get((n, seq_len), {}).get(f"{metric}_mib") for n in NAMES]
            mem = " / ".join("n/a" if m is None else f"{m:.0f}" for m in mems)
            lines.append(f"| {seq_len} | {metric} | {' | '.join(ms)} | {' | '.join(ratios)} | {mem} |")
    lines += ["", "Where the lines cross (smallest measured T from which the rule is faster than SDPA at every longer T):",
              ""]
    for name in RULES:
        for metric in METRICS:
            point = crossover(results, metric, name)
            lines.append(f"- {name}, {metric}: {'not within the measured range' if point is None else f'T = {point}'}")
    lines.append("")
    return "\n".join(lines)


def render_plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    seq_lens = sorted(int(t) for t in results["timings"])
    memory = {(m["name"], m["seq_len"]): m for m in results.get("memory") or []}
    figure, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    for name in NAMES:
        style = {"marker": "o", "linestyle": "--" if name == BASELINE else "-", "label": name}
        for axis, metric in zip(axes[:2], METRICS):
            axis.plot(seq_lens, [results["timings"][str(t)][metric][name]["ms"]["median"] for t in seq_lens], **style)
        if memory:
            axes[2].plot(seq_lens, [memory[(name, t)]["train_mib"] for t in seq_lens], **style)
    titles = ("forward time (ms)", "training time, forward + backward (ms)", "training peak memory increment (MiB)")
    for axis, title in zip(axes, titles):
        axis.set(xscale="log", yscale="log", xlabel="sequence length T", title=title)
        axis.set_xticks(seq_lens, [str(t) for t in seq_lens])
        axis.minorticks_off()
        axis.grid(True, which="both", alpha=0.3)
    axes[0].legend()
    settings = results["settings"]
    figure.suptitle(f"Energy head rules vs softmax SDPA, CPU, batch {settings['batch']}, "
                    f"{settings['heads']} heads x {settings['head_dim']}")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.energies", description=__doc__.split("\n\n")[0])
    parser.add_argument("--seq_lens", type=int, nargs="+", default=list(DEFAULT_SEQ_LENS))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--head_dim", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch.set_num_threads (0: PyTorch's default). 1 by default: on a shared 2-core machine "
                             "spinning OpenMP threads made the timings vary by 10x or more between repetitions.")
    parser.add_argument("--no_memory", action="store_true")
    parser.add_argument("--output_dir", type=Path, default=REPO_ROOT / "benchmarks")
    parser.add_argument("--memory_probe", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.repeats < 1 or min(args.seq_lens) < 2 or min(args.batch, args.heads, args.head_dim) < 1:
        parser.error("--repeats, --batch, --heads, --head_dim must be >= 1 and --seq_lens >= 2")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.memory_probe:
        print(json.dumps(memory_probe(args)))
        return 0
    log = lambda message: print(message, flush=True)
    timings = {str(t): time_sequence_length(args, t, log) for t in sorted(args.seq_lens)}
    results = {
        "command": "python -m benchmarks.energies " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
                   f"torch {torch.__version__} ({torch.get_num_threads()} threads)",
        "settings": {k: v for k, v in vars(args).items() if k in ("batch", "heads", "head_dim", "repeats", "seed")},
        "defaults": ", ".join(f"{f.name}={f.default!r}" for f in FIELDS),
        "chunk_size": LINEAR_CHUNK_SIZE,
        "timings": timings,
        "memory": None if args.no_memory else measure_memory(args),
    }
    args.output_dir.mkdir(parents=True, exist_ok=True)
    (args.output_dir / "energies.json").write_text(json.dumps(results, indent=2))
    (args.output_dir / "energies.md").write_text(render_markdown(results))
    render_plot(results, args.output_dir / "energies.png")
    log(render_markdown(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
