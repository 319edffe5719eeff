"""The arguments of `energy-gpt compare`: its own options (`CompareArguments`), the text options it shares with
`pretrain`, `--solvers` entries with their own config overrides, and `field=value` config overrides for any field."""

import contextlib
import difflib
import logging
import re
from dataclasses import dataclass, field
from typing import Any

from ...modeling import ATTENTION_SOLVERS, EnergyGPTConfig
from ..pretrain import DataTrainingArguments
from ..icl_regression import RegressionTask
from ..recall import InductionTask, MQARTask
from ..synthetic import LISTask

logger = logging.getLogger(__name__)

REFERENCE_SOLVER = "gd"
DEFAULT_NUM_SEEDS = 2
DEFAULT_TOKENIZER_VOCAB_SIZE = 4096
# Config keys that do not describe the model (bookkeeping written by transformers).
NON_MODEL_CONFIG_KEYS = frozenset({"transformers_version", "_name_or_path", "architectures", "auto_map", "model_type"})




@dataclass(frozen=True)
class Preset:
    """A named model shape and task where the solvers' differences show (docs/compare.md, "Presets"): its config
    overrides go before --config_overrides (yours win), its task applies unless --task is given."""

    name: str
    task: str
    config_overrides: str
    summary: str


PRESETS = {preset.name: preset for preset in (
    Preset("mqar-1layer", "mqar", "n_layer=1,n_embd=64,n_head=2",
           "MQAR with one layer of width 64 (2 heads): one attention step must match a key and fetch its value"),
    Preset("mqar-2layer", "mqar", "n_layer=2,n_embd=64,n_head=2",
           "MQAR with two layers of width 64 (2 heads), Zoology's usual depth"),
    Preset("induction-1layer", "induction", "n_layer=1,n_embd=64,n_head=2",
           "induction with one layer: an induction head needs a previous-token head below it, so one layer cannot "
           "copy except through what the solver's attention step adds"),
    Preset("induction-2layer", "induction", "n_layer=2,n_embd=64,n_head=2",
           "induction with two layers: the classic previous-token + induction-head circuit fits"),
)}


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
# --solvers and the options of compare itself


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
    preset: str | None = field(
        default=None,
        metadata={"help": "A named task and model shape (docs/compare.md, 'Presets'); --config_overrides and --task "
                          "still win.", "choices": list(PRESETS)},
    )
    task: str | None = field(
        default=None,
        metadata={"help": "What every run trains on: 'lis' (longest increasing subsequence, the default), 'mqar' "
                          "(multi-query associative recall), 'induction' (copy a repeated segment), 'icl_regression' "
                          "(in-context linear regression), or 'text' (chosen by --train_file / --validation_file / "
                          "--dataset_name). docs/compare.md describes each task, its metric and its chance level."},
    )
    mqar_vocab_size: int = field(default=256, metadata={"help": "mqar: vocabulary (keys: first half, values: second)."})
    mqar_sequence_length: int = field(default=64, metadata={"help": "mqar: tokens per sequence."})
    mqar_num_kv_pairs: int = field(default=8, metadata={"help": "mqar: key-value pairs (and queries) per sequence."})
    mqar_power_a: float = field(
        default=0.01,
        metadata={"help": "mqar: query positions are drawn with probability ∝ a·x^(a-1) (Zoology's power_a)."},
    )
    induction_vocab_size: int = field(default=64, metadata={"help": "induction: vocabulary of the random segment."})
    induction_segment_length: int = field(
        default=16, metadata={"help": "induction: length of the segment, shown twice."}
    )
    induction_max_gap: int = field(
        default=16, metadata={"help": "induction: the repeat follows after 0 to this many random tokens."}
    )
    icl_dimension: int = field(default=8, metadata={"help": "icl_regression: dimension d of x and w."})
    icl_num_pairs: int = field(default=32, metadata={"help": "icl_regression: (x, y) pairs per sequence."})
    icl_noise_std: float = field(default=0.0, metadata={"help": "icl_regression: standard deviation of y's noise."})
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
        from .tasks import TASKS  # the registry imports these arguments

        if self.task is not None and self.task not in TASKS:
            raise ValueError(f"--task {self.task!r} is not a task; choose one of {list(TASKS)}.")
        self.mqar_task()
        self.induction_task()
        self.icl_regression_task()

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

    def mqar_task(self) -> MQARTask:
        return MQARTask(vocab_size=self.mqar_vocab_size, sequence_length=self.mqar_sequence_length,
                        num_kv_pairs=self.mqar_num_kv_pairs, power_a=self.mqar_power_a)

    def induction_task(self) -> InductionTask:
        return InductionTask(vocab_size=self.induction_vocab_size, segment_length=self.induction_segment_length,
                             max_gap=self.induction_max_gap)

    def icl_regression_task(self) -> RegressionTask:
        return RegressionTask(dimension=self.icl_dimension, num_pairs=self.icl_num_pairs, noise_std=self.icl_noise_std)

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


__all__ = [
    "DEFAULT_NUM_SEEDS",
    "REFERENCE_SOLVER",
    "CompareArguments",
    "CompareDataArguments",
    "SolverSpec",
    "apply_config_fields",
    "config_field_names",
    "parse_config_overrides",
    "parse_override_value",
    "parse_solver_specs",
]
