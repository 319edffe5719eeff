"""What `energy-gpt compare` writes: the Markdown table with its header, the long CSV of every curve, the JSON report
and the loss-curve plot, all rendered from the aggregated summary and the finished runs."""

import csv
import io
from pathlib import Path
from typing import Any

import numpy as np
from transformers import TrainingArguments

from ...io_utils import atomic_write_bytes, atomic_write_json, atomic_write_text
from ...modeling import EnergyGPTConfig
from .analysis import TARGET_FRACTIONS, target_label
from .arguments import REFERENCE_SOLVER, SolverSpec
from .store import OUTPUT_FILES
from .tasks import PreparedTask


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


def _flops(value: float | None) -> str:
    """1.105e12 -> "1.11 T" (FLOPs in SI prefixes; the header says what is counted)."""
    if value is None:
        return "–"
    for prefix, scale in (("P", 1e15), ("T", 1e12), ("G", 1e9), ("M", 1e6)):
        if value >= scale:
            return f"{value / scale:.3g} {prefix}"
    return f"{value:,.0f}"


def _p_values(difference: dict[str, Any]) -> str:
    if difference.get("p_value") is None:
        return "–"
    text = f"{difference['p_value']:.3g}"
    if difference.get("holm_p_value") is not None:
        text += f" / {difference['holm_p_value']:.3g} (m = {difference['comparisons']})"
    return text


def _ratio(ratio: dict[str, Any] | None) -> str:
    if not ratio or ratio.get("ratio") is None:
        return "–"
    text = f"×{ratio['ratio']:.3f}"
    if ratio.get("low") is not None:
        text += f" [{ratio['low']:.3f}, {ratio['high']:.3f}]: {ratio['verdict']}"
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
    tolerance: float, metric: str | None = None, chance: float | None = None,
    baselines: dict[str, float] | None = None,
) -> str:
    lines = ["# EnergyGPT solver comparison", "", *header_lines, ""]
    reference_name = reference_label or REFERENCE_SOLVER
    lines += [
        "## Validation loss (mean ± sd over seeds)",
        "",
        (f"| solver | parameters | training FLOPs (estimate) | seeds | final loss | best loss | final perplexity | Δ final loss vs "
         f"{reference_name} [95 % CI] | per seed | verdict | p raw / Holm | verdict after Holm | step time vs "
         f"{reference_name} [95 % CI] | training tokens/s | peak memory (MiB) |"),
        "|---|---:|---:|---:|---:|---:|---:|---:|---|---|---:|---|---:|---:|---:|",
    ]
    for label, entry in summary.items():
        comparison = entry["vs_reference"]
        step_time = "–"
        if label == reference_label:
            difference, signs, verdict_text, p_values, holm_text = "0 (reference)", "–", "reference", "–", "reference"
            step_time = "1 (reference)"
        elif comparison is None:
            difference, signs, p_values, holm_text = "n/a", "–", "–", "–"
            verdict_text = f"no {REFERENCE_SOLVER} run (add it to --solvers or pass --baseline_dir)"
        else:
            final = comparison["final_validation_loss"]
            difference, signs, verdict_text = _difference(final, 4), final.get("signs", "–"), final["verdict"]
            p_values = _p_values(final)
            holm_text = final.get("holm_verdict", "–")
            step_time = _ratio(comparison.get("step_time"))
        lines.append(
            f"| {label} | {entry['num_parameters']:,} | {_flops(entry.get('training_flops_estimate'))} | {len(entry['seeds'])} | "
            f"{_mean_sd(entry['final_validation_loss'], 4)} | {_mean_sd(entry['best_validation_loss'], 4)} | "
            f"{_mean_sd(entry['perplexity'], 3)} | {difference} | {signs} | {verdict_text} | {p_values} | {holm_text} | "
            f"{step_time} | {_mean_sd(entry['tokens_per_second'], 0, thousands=True)} | "
            f"{_mean_sd(entry['peak_memory_mib'], 1)} |"
        )
    if metric is not None:
        lines += [
            "",
            f"## Task metric: {metric} (validation set, end of training; mean ± sd over seeds)",
            "",
            "| solver | parameters | training FLOPs (estimate) | seeds | " + metric + " | chance |",
            "|---|---:|---:|---:|---:|---:|",
        ]
        lines += [
            f"| {label} | {entry['num_parameters']:,} | {_flops(entry.get('training_flops_estimate'))} | "
            f"{len(entry['seeds'])} | {_mean_sd(entry.get('final_metric', {}), 4)} | "
            f"{'–' if chance is None else f'{chance:.4f}'} |"
            for label, entry in summary.items()
        ]
        # Closed-form predictors measured on the same validation sequences, for scale (no training, no seeds).
        lines += [f"| {name} (closed form) | – | – | – | {value:.4f} | {'–' if chance is None else f'{chance:.4f}'} |"
                  for name, value in (baselines or {}).items()]
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
        ("- Per seed: in how many seeds this solver's final loss is above (worse) / below (better) the reference's. "
         "p raw: two-sided paired t-test of the mean difference; Holm: adjusted for the m solvers compared with "
         f"{reference_name} (Holm's step-down), and the verdict after Holm claims `better` / `worse` only when the "
         "adjusted p is below 0.05."),
        (f"- Step time vs {reference_name}: per seed, this solver's mean training-step time over {reference_name}'s in "
         "the same seed; the geometric mean of these ratios with its 95 % interval (t-interval of the mean log "
         "ratio). Runs of a seed run one after the other, so machine load that varies between seeds cancels."),
        ("- Training FLOPs (estimate): 3 × (2 × the weights of every matrix product + 4 · n_layer · n_ctx · n_embd "
         "for attention) per training token: GPT-2's backbone, the same for every solver. run.json also keeps the "
         "count of torch.utils.flop_counter.FlopCounterMode on one training step × steps (`training_flops`), which "
         "includes a solver's own products but misses PyTorch's fused CPU attention kernel."),
        ("- Tokens/s: input tokens (padding included) divided by the time spent in training steps (forward, "
         "backward, optimizer; evaluation and logging excluded); ± is the spread over seeds, which includes the "
         "machine's load."),
        f"- Peak memory: {memory_description}.",
        *([("- What the solvers learned, on one validation batch: `energy_descent_fraction` is the fraction of "
            "token-heads whose attention energy the layer's step lowered, `energy_descent_mean_change` the mean change "
            "F(after) - F(before) (negative: descent; docs/solvers.md, 'Does a layer descend its energy?'); "
            "`decay_gate` is the learned per-head decay g_h (gated_linear, softmax_decay).")] if learned else []),
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
    metric_line = []
    if task.metric is not None:
        metric_line = [f"- Metric: {task.metric}; chance {task.chance:.4f} ({task.chance_description})."]
        if task.baselines:
            metric_line.append("- Closed-form baselines on the same validation sequences: " + "; ".join(
                f"{name} {value:.4f}" for name, value in task.baselines.items()) + ".")
    lines = [
        f"- Task: {task.description}.",
        *metric_line,
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
        (f"- Wall time: {duration_text(timing['wall_seconds'])} in this invocation ({timing['trained']} runs trained, "
         f"{timing['reused']} reused); the {timing['finished']} finished runs took {duration_text(timing['run_seconds'])} "
         f"to train and evaluate ({timing['finished']}/{timing['planned']} runs finished)."),
        f"- Command: `{command}`",
    ]
    return lines


def duration_text(seconds: float) -> str:
    minutes, seconds = divmod(round(seconds), 60)
    return f"{minutes} min {seconds} s" if minutes else f"{seconds} s"


__all__ = ["duration_text", "header_lines", "render_csv", "render_plot", "render_table", "write_outputs"]
