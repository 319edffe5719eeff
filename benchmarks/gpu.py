"""Every GPU measurement the GPU targets need, in one call (about 8 minutes on one H100), written to
`benchmarks/results-gpu.md` (and the raw numbers to `benchmarks/gpu/`).

    bash benchmarks/gpu.sh            # or: python -m benchmarks.gpu [--budget_s 480]

Stages, in order of importance (the report is rewritten after each, so a run cut short still leaves what it had):
  0. both paths of the model's opt-in kernels against each other (`newton_path` torch vs triton for `newton` /
     `newton_light`, `linear_attention_path` torch vs fla for the linear energies; fp32 logits and gradients): this
     decides whether the kernels, which have never run on a GPU, can become the default; a mismatch stops the run;
  1. the fused Newton kernels against their PyTorch reference on this GPU (fp32 and bf16, forward and gradients);
     a mismatch stops the run;
  2. bf16, GPT-2 small width: training step / forward / decoding, GPT-2 and every solver, T = 1024 (batch 8) and
     T = 4096 (batch 2); decoding generates 32 tokens after a prompt of T - 32 (the cache holds about T positions);
     peak memory of one training step and one forward;
  3. peak training memory at batch 1, T = 1024 ... 8192 (linear in T?);
  4. the head-level kernels against the PyTorch path and against GPT-2's attention (forward + backward);
  5. `newton` / `newton_light` with the PyTorch path forced (`--newton_path pytorch`), T = 1024 and 4096.
Stages 3-5 are skipped when the time budget is spent. Exits non-zero without CUDA.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import traceback
from dataclasses import asdict, replace
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parent
REPORT = BENCHMARKS / "results-gpu.md"
RAW = BENCHMARKS / "gpu"
RUNS = [  # name, T, batch
    ("T1024", 1024, 8),
    ("T4096", 4096, 2),
]
MEMORY_SEQ_LENS = [1024, 2048, 4096, 8192]
NEW_TOKENS = 32


def require_cuda() -> None:
    try:
        import torch
    except ImportError as error:
        raise SystemExit(f"benchmarks.gpu: torch is not importable ({error}).") from error
    if not torch.cuda.is_available():
        raise SystemExit("benchmarks.gpu: no CUDA device (torch.cuda.is_available() is False). This script measures "
                         "the GPU table only; run `python -m benchmarks.run --device cpu` for CPU figures.")
    missing = []
    for module in ("transformers", "triton", "energy_gpt"):
        try:
            __import__(module)
        except ImportError:
            missing.append(module)
    if missing:
        raise SystemExit(f"benchmarks.gpu: cannot import {missing} (pip install -e '.[gpu]' in this environment).")


class Report:
    """Collects every stage's results and rewrites results-gpu.md (and gpu/results.json) after each stage."""

    def __init__(self, command: str):
        from benchmarks import run

        self.started = time.perf_counter()
        self.data: dict = {"command": command, "machine": run.machine_info(run.Settings(device="cuda")), "stages": {}}

    def elapsed(self) -> float:
        return time.perf_counter() - self.started

    def stage(self, name: str, result) -> None:
        self.data["stages"][name] = result
        self.write()

    def write(self) -> None:
        from energy_gpt.io_utils import atomic_write_json, atomic_write_text

        RAW.mkdir(parents=True, exist_ok=True)
        atomic_write_json(RAW / "results.json", self.data)
        atomic_write_text(REPORT, render(self.data, self.elapsed()))


# (cell, config overrides, the path field, its default value, its opt-in value)
PATH_CELLS = [
    ("newton", dict(attention_solver="newton"), "newton_path", "torch", "triton"),
    ("newton_light", dict(attention_solver="newton_light"), "newton_path", "torch", "triton"),
    ("linear", dict(attention_energy="linear"), "linear_attention_path", "torch", "fla"),
    ("gated_linear", dict(attention_energy="gated_linear"), "linear_attention_path", "torch", "fla"),
]
PATH_TOLERANCE = 1e-3  # fp32, relative to the largest magnitude (tf32-free: the check disables it)


def check_model_paths(log, device: str = "cuda", seq_len: int = 512, cells: list | None = None) -> list[dict]:
    """Each opt-in kernel path against the default torch path in the same model (fp32 on the GPU, GPT-2 small width,
    T = 512, a left-padded batch): logits at the real positions and every gradient. Raises AssertionError on a
    mismatch (after logging), or when the opt-in path cannot run here (triton / fla missing)."""
    import copy

    import torch

    from energy_gpt import EnergyGPTConfig, EnergyGPTForCausalLM
    from energy_gpt.modeling import energies_energy_gpt, newton_kernels_energy_gpt

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    rows, failures = [], []
    for cell, overrides, field, default, opt_in in cells or PATH_CELLS:
        probe = torch.empty(0, device=device)
        available = (newton_kernels_energy_gpt.fused_kernels_available(probe) if field == "newton_path"
                     else energies_energy_gpt.use_fla(probe))
        if not available:
            failures.append(f"{cell}: {field}={opt_in!r} cannot run here (its kernels are not importable)")
            continue
        config = EnergyGPTConfig(n_layer=2, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, **overrides)
        torch.manual_seed(0)
        models = {}
        for path in (default, opt_in):
            path_config = copy.deepcopy(config)
            setattr(path_config, field, path)
            with torch.device(device):
                models[path] = EnergyGPTForCausalLM._from_config(path_config, attn_implementation="sdpa")
        models[opt_in].load_state_dict(models[default].state_dict())
        ids = torch.randint(0, config.vocab_size, (2, seq_len), device=device)
        mask = torch.ones_like(ids)
        mask[1, :37] = 0
        results = {}
        for path, model in models.items():
            output = model(ids, attention_mask=mask, labels=ids)
            output.loss.backward()
            results[path] = (output.logits.detach()[mask.bool()],
                             {key: value.grad for key, value in model.named_parameters() if value.grad is not None})

        def relative(a, b):
            return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()

        errors = {"logits": relative(results[opt_in][0], results[default][0])}
        for key, grad in results[default][1].items():
            errors[key] = relative(results[opt_in][1][key], grad)
        worst = max(errors, key=errors.get)
        row = {"cell": cell, "field": field, "paths": [default, opt_in], "max_error": errors[worst], "worst": worst,
               "tolerance": PATH_TOLERANCE, "ok": errors[worst] < PATH_TOLERANCE}
        rows.append(row)
        log(f"  {cell}: {field} {default} vs {opt_in}: max relative error {errors[worst]:.2e} ({worst}) "
            f"{'ok' if row['ok'] else 'MISMATCH'}")
        if not row["ok"]:
            failures.append(f"{cell}: {errors[worst]:.2e} at {worst}")
    if failures:
        raise AssertionError("; ".join(failures))
    return rows


def run_models(name: str, seq_len: int, batch: int, settings, models: list[str], repeats: int, log) -> dict:
    """benchmarks.run at GPT-2 small width for one (T, batch), with the memory of the same shape."""
    from benchmarks import run

    shape = replace(run.SHAPES["gpt2-small"], seq_len=seq_len, batch_size=batch, prompt_len=seq_len - NEW_TOKENS,
                    new_tokens=NEW_TOKENS)
    results = {"command": f"python -m benchmarks.gpu ({name})", "machine": run.machine_info(settings),
               "settings": asdict(settings), "shapes": []}
    results["memory"] = run.measure_memory(
        [dict(model=m, shape=shape.name, batch_size=batch, seq_len=seq_len) for m in models], settings, log)
    results["shapes"].append(run.benchmark_shape(shape, models, repeats, seed=0, settings=settings, log=log))
    run.write_report(json.loads(json.dumps(results)), RAW / name)
    (RAW / name / "results.json").write_text(json.dumps(results, indent=1))
    return results


def memory_scaling(settings, models: list[str], log) -> list[dict]:
    from benchmarks import run

    tasks = [dict(model=m, shape="gpt2-small", batch_size=1, seq_len=t) for t in MEMORY_SEQ_LENS for m in models]
    return run.measure_memory(tasks, settings, log)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gpu", description=__doc__.split("\n")[0])
    parser.add_argument("--budget_s", type=float, default=480.0,
                        help="Skip the optional stages (3-5) once this many seconds have passed (default 480).")
    parser.add_argument("--repeats", type=int, default=5, help="Repetitions per model and metric (default 5).")
    args = parser.parse_args(argv)
    require_cuda()

    from benchmarks import kernels, run

    def log(message: str) -> None:
        print(f"[{report.elapsed():6.0f} s] {message}", flush=True)

    report = Report("bash benchmarks/gpu.sh " + " ".join(argv or sys.argv[1:]))
    log(f"machine: {report.data['machine']}")
    log("stage 0: the opt-in kernel paths against the default torch path in the model")
    try:
        report.stage("path_check", check_model_paths(log))
    except AssertionError as error:
        report.stage("path_check_failed", str(error))
        log(f"path check FAILED: {error}")
        return 1
    log("stage 1: fused kernels against the reference")
    try:
        report.stage("kernel_check", kernels.check("cuda", ["float32", "bfloat16"], log))
    except AssertionError as error:
        report.stage("kernel_check_failed", str(error))
        log(f"kernel check FAILED: {error}")
        return 1

    settings = run.Settings(device="cuda", dtype="bfloat16")
    for name, seq_len, batch in RUNS:
        log(f"stage 2: models, bf16, T={seq_len} batch {batch}")
        report.stage(f"models_{name}", run_models(name, seq_len, batch, settings, run.MODEL_NAMES, args.repeats, log))

    optional = [
        ("memory_scaling", lambda: memory_scaling(settings, run.MODEL_NAMES, log)),
        ("head_timings", lambda: kernels.time_heads("cuda", "bfloat16", [1024, 4096], 8192, 10, log)),
    ] + [
        (f"pytorch_path_{name}", lambda name=name, seq_len=seq_len, batch=batch: run_models(
            f"{name}-pytorch-path", seq_len, batch, replace(settings, newton_path="pytorch"),
            ["gpt2", "newton", "newton_light"], args.repeats, log))
        for name, seq_len, batch in RUNS
    ]
    for stage, measure in optional:
        if report.elapsed() > args.budget_s:
            log(f"budget of {args.budget_s:.0f} s spent: {stage} skipped")
            report.data.setdefault("skipped", []).append(stage)
            continue
        log(f"stage: {stage}")
        try:
            report.stage(stage, measure())
        except Exception:  # noqa: BLE001 (an optional stage must not lose the others)
            report.stage(f"{stage}_failed", traceback.format_exc()[-3000:])
            log(f"{stage} failed:\n{traceback.format_exc()[-3000:]}")
    report.write()
    log(f"wrote {REPORT}")
    return 0


# ---------------------------------------------------------------------------------------------------------- report
def _targets_table(data: dict) -> list[str]:
    """The GPU targets per T: training-step and decoding ratios, training-memory ratio, memory slope in T."""
    from benchmarks import run

    stages = data["stages"]
    slopes = {}
    scaling_memory = stages.get("memory_scaling")
    if isinstance(scaling_memory, list):
        index = run._memory_index(scaling_memory)
        for model in run.MODEL_NAMES:
            values = [index.get(("gpt2-small", t, 1, model), {}).get("train_mib") for t in MEMORY_SEQ_LENS]
            if None not in values:
                slopes[model] = run._loglog_slope(MEMORY_SEQ_LENS, values)
    lines = ["| solver | T | train ratio (target) | decode ratio (target >= 0.9) | train memory ratio (target <= 1.1) "
             "| memory slope in T (1 = linear) | met? |", "|---|---|---|---|---|---|---|"]
    for name, _, _ in RUNS:
        results = stages.get(f"models_{name}")
        if not isinstance(results, dict):
            continue
        shape_result = results["shapes"][0]
        timings, shape = shape_result["timings"], shape_result["shape"]
        memory = run._memory_index(results.get("memory"))
        base = memory.get((shape["name"], shape["seq_len"], shape["batch_size"], run.BASELINE))
        for solver, target in run.TARGETS.items():
            train, decode = timings["train"].get(solver), timings["generate"].get(solver)
            mem = memory.get((shape["name"], shape["seq_len"], shape["batch_size"], solver))
            memory_ratio = mem["train_mib"] / base["train_mib"] if mem and base and base["train_mib"] > 0 else None
            slope = slopes.get(solver)
            met = (train is not None and train["ratio"]["median"] >= target["train"]
                   and decode is not None and decode["ratio"]["median"] >= target["generate"]
                   and memory_ratio is not None and memory_ratio <= target["memory"]
                   and (slope is None or slope < 1.5))
            lines.append(
                f"| {solver} | {shape['seq_len']} | {run._fmt_ratio(train)} (>= {target['train']}) | "
                f"{run._fmt_ratio(decode)} | {'n/a' if memory_ratio is None else f'{memory_ratio:.2f}'} | "
                f"{'n/a' if slope is None else f'{slope:.2f}'} | {'yes' if met else 'NO'} |")
    return lines


def render(data: dict, elapsed: float) -> str:
    from benchmarks import kernels, run

    machine, stages = data["machine"], data["stages"]
    lines = ["# EnergyGPT on a GPU: every solver against Hugging Face GPT-2 (bf16)\n",
             f"Command: `{data['command']}` ({elapsed:.0f} s)  ",
             f"GPU: {machine.get('gpu')}, driver {machine.get('driver')}, CUDA {machine.get('cuda')}; torch "
             f"{machine['torch']}, transformers {machine['transformers']}, triton {machine.get('triton')}, Python "
             f"{machine['python']}; {machine['date']}.  ",
             f"Fused Newton kernels: available {machine.get('newton_kernels', {}).get('available')}, called by the "
             f"head rules {machine.get('newton_kernels', {}).get('wired')}.\n"]
    if "path_check_failed" in stages:
        lines += ["## Kernel paths against the default torch path FAILED (nothing else was measured)\n",
                  f"```\n{stages['path_check_failed']}\n```\n"]
    if isinstance(stages.get("path_check"), list):
        lines += ["## 0. Opt-in kernel paths against the default torch path (fp32, T = 512, padded batch)\n",
                  "| cell | field | paths | max relative error | where | tolerance | ok |", "|---|---|---|---|---|---|---|"]
        lines += [f"| {row['cell']} | `{row['field']}` | {' vs '.join(row['paths'])} | {row['max_error']:.2e} | "
                  f"{row['worst']} | {row['tolerance']:g} | {'yes' if row['ok'] else 'NO'} |"
                  for row in stages["path_check"]]
        lines.append("")
    if "kernel_check_failed" in stages:
        lines += ["## Kernel check FAILED (nothing else was measured)\n",
                  f"```\n{stages['kernel_check_failed']}\n```\n"]
    if isinstance(stages.get("kernel_check"), list):
        lines += ["## 1. Fused kernels against the PyTorch reference on this GPU\n",
                  kernels.render_check(stages["kernel_check"])]
    if any(key.startswith("models_") for key in stages):
        lines += ["## Targets (bf16, GPT-2 small width, ratios to GPT-2 in the same run, median [spread])\n"]
        lines += _targets_table(data) + [""]
    for name, seq_len, batch in RUNS:
        if isinstance(stages.get(f"models_{name}"), dict):
            lines += [f"## 2. Models at T={seq_len}, batch {batch}\n",
                      f"Full table: [gpu/{name}/results.md](gpu/{name}/results.md).\n"]
    if isinstance(stages.get("memory_scaling"), list):
        lines += ["## 3. Peak training-step memory (MiB) at batch 1\n",
                  "| model | " + " | ".join(f"T={t}" for t in MEMORY_SEQ_LENS) + " |",
                  "|---|" + "---|" * len(MEMORY_SEQ_LENS)]
        index = run._memory_index(stages["memory_scaling"])
        for model in run.MODEL_NAMES:
            cells = [index.get(("gpt2-small", t, 1, model)) for t in MEMORY_SEQ_LENS]
            lines.append(f"| {model} | " + " | ".join("n/a" if c is None else f"{c['train_mib']:.0f}" for c in cells)
                         + " |")
        lines.append("")
    if isinstance(stages.get("head_timings"), list):
        lines += ["## 4. Head level: fused kernels vs the PyTorch path vs GPT-2's attention (bf16)\n",
                  kernels.render_timings(stages["head_timings"])]
    for name, seq_len, batch in RUNS:
        if isinstance(stages.get(f"pytorch_path_{name}"), dict):
            lines += [f"## 5. PyTorch path forced, T={seq_len}\n",
                      f"Table: [gpu/{name}-pytorch-path/results.md](gpu/{name}-pytorch-path/results.md).\n"]
    failed = [key for key in stages if key.endswith("_failed") and key not in ("kernel_check_failed", "path_check_failed")]
    for key in failed:
        lines += [f"## {key}\n", f"```\n{stages[key]}\n```\n"]
    if data.get("skipped"):
        lines.append(f"Skipped (time budget): {', '.join(data['skipped'])}.\n")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
