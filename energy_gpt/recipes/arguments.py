"""Argument dataclasses shared by the recipes (`pretrain`, `glue`, `compare`), parsed with `HfArgumentParser` next to
`TrainingArguments`, in the style of transformers' `run_clm.py` / `run_glue.py`."""

from dataclasses import dataclass, field
from typing import Any

from ..peft_utils import LORA_TARGET_MODULES
from ..solver_cli import solver_arguments_dataclass

# EnergyGPT's attention (`c_attn`, `c_proj`) and MLP output (`c_proj`) are plain `nn.Linear`s: the usual GPT-2 LoRA
# targets, and PEFT's default for `energy_gpt`. The sequence-classification head `score` is trained in full (PEFT
# `modules_to_save`).
DEFAULT_LORA_TARGET_MODULES = ",".join(LORA_TARGET_MODULES)


# `--attention_solver`, `--attention_energy`, ... and one flag per registered solver field (`--momentum_beta`,
# `--newton_lambda`, ...), generated from the solver registry: unset means "keep the value of the config / checkpoint".
SolverArguments = solver_arguments_dataclass()


@dataclass
class ModelArguments(SolverArguments):
    """Which model, config and tokenizer to train (a checkpoint, or a fresh model), its solver, and LoRA options."""

    model_name_or_path: str | None = field(
        default=None,
        metadata={"help": "EnergyGPT checkpoint (Hub id or local folder) to start from. Leave unset to train a new "
                          "model from --config_name / --config_overrides."},
    )
    config_name: str | None = field(
        default=None,
        metadata={"help": "Config name or path, if not the same as --model_name_or_path (an EnergyGPT or GPT-2 "
                          "config). Without it and without --model_name_or_path, a default EnergyGPTConfig (GPT-2 "
                          "small shape) is used."},
    )
    config_overrides: str | None = field(
        default=None,
        metadata={"help": "Override config fields of a new model, e.g. 'n_layer=4,n_embd=256,n_head=4'. Not "
                          "allowed with --model_name_or_path (the weights fix the shapes)."},
    )
    tokenizer_name: str | None = field(
        default=None, metadata={"help": "Tokenizer name or path, if not the same as --model_name_or_path."}
    )
    cache_dir: str | None = field(default=None, metadata={"help": "Where to store files downloaded from the Hub."})
    model_revision: str = field(default="main", metadata={"help": "Model revision (branch, tag or commit id)."})
    token: str | None = field(default=None, metadata={"help": "Hub token for private models (default: `hf auth login`)."})
    trust_remote_code: bool = field(
        default=False, metadata={"help": "Allow code from the Hub (needed only for non-EnergyGPT remote code)."}
    )
    ignore_mismatched_sizes: bool = field(
        default=False,
        metadata={"help": "Start layers whose checkpoint shape differs anew (e.g. a classifier with another number "
                          "of labels)."},
    )
    dtype: str | None = field(
        default=None,
        metadata={"help": "Load the model in this dtype.", "choices": ["auto", "bfloat16", "float16", "float32"]},
    )

    # LoRA (PEFT).
    use_lora: bool = field(default=False, metadata={"help": "Train LoRA adapters instead of all weights."})
    lora_r: int = field(default=8, metadata={"help": "LoRA rank."})
    lora_alpha: int = field(default=16, metadata={"help": "LoRA alpha (the update is scaled by alpha / r)."})
    lora_dropout: float = field(default=0.05, metadata={"help": "Dropout on the LoRA input."})
    lora_target_modules: str = field(
        default=DEFAULT_LORA_TARGET_MODULES,
        metadata={"help": "Comma-separated module names that get LoRA adapters (EnergyGPT: c_attn, c_proj, c_fc), "
                          "or 'all-linear'."},
    )
    lora_train_solver_params: bool = field(
        default=False,
        metadata={"help": "Also train the solver scalars (momentum beta, Newton lambda) in full next to the adapters; "
                          "they are saved with the adapter and merged (PEFT modules_to_save)."},
    )
    merge_lora: bool = field(
        default=False,
        metadata={"help": "Merge the trained adapters into the weights and save a full model in --output_dir (the "
                          "adapter itself goes to --output_dir/lora_adapter). Default: save only the adapter."},
    )

    def __post_init__(self):
        if self.config_overrides is not None and self.model_name_or_path is not None:
            raise ValueError(
                "--config_overrides can't be used with --model_name_or_path (the checkpoint fixes the shapes); use the "
                "solver flags (--attention_solver, --momentum_beta, ...) to change the solver of a checkpoint."
            )
        if self.lora_r <= 0:
            raise ValueError(f"--lora_r must be a positive integer, got {self.lora_r}.")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError(f"--lora_dropout must be in [0, 1), got {self.lora_dropout}.")
        for flag in ("merge_lora", "lora_train_solver_params"):
            if getattr(self, flag) and not self.use_lora:
                raise ValueError(f"--{flag} needs --use_lora.")
        if not self.lora_target_list():
            raise ValueError("--lora_target_modules is empty; pass e.g. 'c_attn,c_proj'.")

    def solver_overrides(self) -> dict[str, Any]:
        """The solver fields given on the command line (config fields of the same names)."""
        return self.overrides()

    def lora_target_list(self) -> list[str] | str:
        if self.lora_target_modules.strip() == "all-linear":
            return "all-linear"
        return [name.strip() for name in self.lora_target_modules.split(",") if name.strip()]


__all__ = ["DEFAULT_LORA_TARGET_MODULES", "ModelArguments"]
