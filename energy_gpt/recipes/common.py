"""What the recipes share: logging set-up, config / tokenizer / model building, LoRA wrapping, data files, the final
save (model or adapter, model card, push) and the `*_results.json` files of the transformers examples."""

import argparse
import inspect
import json
import logging
import math
import os
import shlex
import sys
from pathlib import Path
from typing import Any

import datasets
import torch
import transformers
from transformers import (
    AutoConfig,
    AutoTokenizer,
    HfArgumentParser,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    Trainer,
    TrainingArguments,
)

from ..io_utils import atomic_write_json
from ..model_card import write_model_card
from ..modeling import EnergyGPTConfig
from ..peft_utils import solver_modules_to_save
from .arguments import ModelArguments

logger = logging.getLogger(__name__)

LORA_ADAPTER_DIRNAME = "lora_adapter"


class RecipeHelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """The description keeps its layout (the example command); options show their defaults, as HfArgumentParser's."""


class RecipeArgumentParser(HfArgumentParser):
    """An `HfArgumentParser` whose errors (an unknown option, a value of the wrong type, a choice not offered) are one
    line on stderr and exit status 2, without the usage summary of ~150 TrainingArguments options."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {' '.join(message.split())}\n")


def argument_error_exit(command: str, error: BaseException) -> int:
    """Print a bad argument's error as one line on stderr, as `energy-gpt <command>: error: ...`; return 2."""
    print(f"energy-gpt {command}: error: {' '.join(str(error).split())}", file=sys.stderr)
    return 2


def recipe_parser(dataclass_types: tuple[type, ...], description: str | None) -> HfArgumentParser:
    """An `HfArgumentParser` whose `--help` starts with `usage: energy-gpt <command> [options] | ... ARGS.json` (the
    prog comes from sys.argv[0], which the `energy-gpt` command line sets), then `description` (a recipe's module
    docstring), then every option. The short usage line keeps the summary on the first screen: argparse's own would
    list all of TrainingArguments' ~150 options first."""
    return RecipeArgumentParser(
        dataclass_types,
        usage="%(prog)s [options]  |  %(prog)s ARGS.json",
        description=inspect.cleandoc(description) if description else None,
        formatter_class=RecipeHelpFormatter,
    )


def parse_recipe_args(
    data_arguments_class: type, argv: list[str], description: str | None = None
) -> tuple[ModelArguments, Any, TrainingArguments]:
    """(ModelArguments, data arguments, TrainingArguments) from the command line, or from one .json file."""
    use_cpu_data_parallel_without_accelerator()
    parser = recipe_parser((ModelArguments, data_arguments_class, TrainingArguments), description)
    if len(argv) == 1 and argv[0].endswith(".json"):
        return parser.parse_json_file(json_file=os.path.abspath(argv[0]))
    return parser.parse_args_into_dataclasses(args=argv)


def use_cpu_data_parallel_without_accelerator() -> None:
    """Under `torchrun` on a machine without GPU, accelerate starts the multi-process CPU (gloo) set-up only when told
    to use the CPU; without it every rank would silently train its own copy. Must run before TrainingArguments."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.accelerator.is_available():
        os.environ.setdefault("ACCELERATE_USE_CPU", "true")


def setup_logging(training_args: TrainingArguments) -> None:
    """As in the transformers examples: info logs on the main process, warnings elsewhere; progress bars from Trainer."""
    logging.basicConfig(
        format="%(asctime)s - %(levelname)s - %(name)s - %(message)s",
        datefmt="%m/%d/%Y %H:%M:%S",
        handlers=[logging.StreamHandler(sys.stdout)],
    )
    if training_args.should_log:
        transformers.utils.logging.set_verbosity_info()
    log_level = training_args.get_process_log_level()
    # Our own progress lines stay visible on the main process whatever --log_level quiets in the libraries.
    own_level = min(log_level, logging.INFO) if training_args.should_log else log_level
    logger.setLevel(own_level)
    logging.getLogger("energy_gpt").setLevel(own_level)
    datasets.utils.logging.set_verbosity(log_level)
    transformers.utils.logging.set_verbosity(log_level)
    transformers.utils.logging.enable_default_handler()
    transformers.utils.logging.enable_explicit_format()
    logger.info(
        f"Process rank: {training_args.process_index}, device: {training_args.device}, "
        f"distributed training: {training_args.parallel_mode.value == 'distributed'}, world size: "
        f"{training_args.world_size}"
    )


def hub_kwargs(model_args: ModelArguments) -> dict[str, Any]:
    return {
        "cache_dir": model_args.cache_dir,
        "revision": model_args.model_revision,
        "token": model_args.token,
        "trust_remote_code": model_args.trust_remote_code,
    }


def build_config(model_args: ModelArguments, **task_fields: Any) -> EnergyGPTConfig:
    """The model's config: from the checkpoint, from --config_name (EnergyGPT or GPT-2), or a default one; then
    --config_overrides, the solver flags and `task_fields` (e.g. num_labels), each checked by EnergyGPTConfig."""
    source = model_args.config_name or model_args.model_name_or_path
    if source is not None:
        config = AutoConfig.from_pretrained(source, **hub_kwargs(model_args))
        if not isinstance(config, EnergyGPTConfig):
            if model_args.config_name is None or config.model_type != "gpt2":
                raise ValueError(
                    f"{source!r} is a {config.model_type!r} config; the recipes train EnergyGPT models. Convert a GPT-2 "
                    "checkpoint first (`energy-gpt convert`), or pass a GPT-2 / EnergyGPT config as --config_name."
                )
            # A GPT-2 config carries over field for field (EnergyGPTConfig keeps GPT-2's names and defaults).
            gpt2_fields = {k: v for k, v in config.to_dict().items() if k not in ("model_type", "architectures", "auto_map")}
            config = EnergyGPTConfig(**gpt2_fields)
    else:
        config = EnergyGPTConfig()
        # Without overrides this is GPT-2 small's shape: worth a warning; with them the user chose the shape.
        log = logger.info if model_args.config_overrides else logger.warning
        log("No --model_name_or_path / --config_name: training a new model from a default EnergyGPTConfig.")
    if model_args.config_overrides:
        logger.info(f"Overriding config: {model_args.config_overrides}")
        try:
            config.update_from_string(model_args.config_overrides)
        except ValueError as error:
            raise ValueError(f"--config_overrides {model_args.config_overrides!r}: {error}") from error
    for name, value in {**model_args.solver_overrides(), **task_fields}.items():
        setattr(config, name, value)  # EnergyGPTConfig checks every field on assignment
    config._validate_config()  # cross-field checks (n_embd % n_head) once all overrides are in
    return config


def build_tokenizer(model_args: ModelArguments) -> PreTrainedTokenizerBase:
    source = model_args.tokenizer_name or model_args.model_name_or_path
    if source is None:
        raise ValueError(
            "A new model still needs a tokenizer: pass --tokenizer_name (e.g. openai-community/gpt2 or a local folder)."
        )
    tokenizer = AutoTokenizer.from_pretrained(source, **hub_kwargs(model_args))
    if tokenizer.pad_token is None:
        # GPT-2 tokenizers have no padding token: pad with eos, as is usual for GPT-2. Padded positions are masked
        # (attention_mask) and the classifier pools the last non-pad token.
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def build_model(
    model_class: type[PreTrainedModel], model_args: ModelArguments, config: EnergyGPTConfig, tokenizer
) -> PreTrainedModel:
    if model_args.model_name_or_path:
        dtype = model_args.dtype if model_args.dtype in ("auto", None) else getattr(torch, model_args.dtype)
        model = model_class.from_pretrained(
            model_args.model_name_or_path,
            config=config,
            dtype=dtype,
            ignore_mismatched_sizes=model_args.ignore_mismatched_sizes,
            **hub_kwargs(model_args),
        )
    else:
        model = model_class._from_config(config)
        n_params = sum({p.data_ptr(): p.numel() for p in model.parameters()}.values())
        logger.info(f"Training a new {config.attention_solver} model from scratch: {n_params:,} parameters")
    # Only grow the embeddings when the tokenizer needs it (a tiny test vocabulary stays tiny otherwise).
    if len(tokenizer) > model.get_input_embeddings().weight.shape[0]:
        model.resize_token_embeddings(len(tokenizer))
    generation_config = getattr(model, "generation_config", None)
    if generation_config is not None and generation_config.pad_token_id is None:
        generation_config.pad_token_id = config.pad_token_id  # padded generation without a warning
    return model


def wrap_with_lora(model: PreTrainedModel, model_args: ModelArguments, task_type: str) -> PreTrainedModel:
    """Wrap `model` in a PEFT LoRA model when --use_lora (`task_type`: "CAUSAL_LM" or "SEQ_CLS")."""
    if not model_args.use_lora:
        return model
    from peft import LoraConfig, get_peft_model

    # A new classification head has nothing to adapt from: train it in full and save it with the adapter; so are the
    # solver scalars when asked.
    modules_to_save = ["score"] if task_type == "SEQ_CLS" else []
    if model_args.lora_train_solver_params:
        modules_to_save += solver_modules_to_save(model)
    lora_config = LoraConfig(
        r=model_args.lora_r,
        lora_alpha=model_args.lora_alpha,
        lora_dropout=model_args.lora_dropout,
        target_modules=model_args.lora_target_list(),
        task_type=task_type,
        modules_to_save=modules_to_save or None,
    )
    try:
        peft_model = get_peft_model(model, lora_config)
    except ValueError as error:
        raise ValueError(
            f"--lora_target_modules {model_args.lora_target_modules!r}: {error} EnergyGPT's Linear layers are "
            "c_attn, c_proj (attention and MLP) and c_fc."
        ) from error
    peft_model.print_trainable_parameters()
    return peft_model


def data_files_and_builder(train_file: str | None, validation_file: str | None, allowed: dict[str, str]):
    """`data_files` and the `datasets` builder name for local files; `allowed` maps file extensions to builders."""
    data_files = {split: path for split, path in (("train", train_file), ("validation", validation_file)) if path}
    extensions = {Path(path).suffix.lstrip(".").lower() for path in data_files.values()}
    for split, path in data_files.items():
        extension = Path(path).suffix.lstrip(".").lower()
        if extension not in allowed:
            raise ValueError(f"--{split}_file {path!r}: unsupported extension {extension!r}; allowed: {sorted(allowed)}.")
    if len({allowed[extension] for extension in extensions}) > 1:
        raise ValueError(f"--train_file and --validation_file must have the same format, got {sorted(extensions)}.")
    return data_files, allowed[extensions.pop()]


LAST_CHECKPOINT_VALUES = ("last", "true", "True")


def resolve_resume_checkpoint(value: str | None, output_dir: str | Path) -> str | None:
    """`--resume_from_checkpoint PATH`, or `last` / `true` for the newest *complete* checkpoint in --output_dir.

    A checkpoint is complete once its trainer_state.json exists: the Trainer writes that file last, so a run killed
    while saving falls back to the checkpoint before instead of loading half-written files.
    """
    if value is None or value not in LAST_CHECKPOINT_VALUES:
        return value
    candidates = [
        path for path in Path(output_dir).glob("checkpoint-*")
        if path.name.split("-")[-1].isdigit() and (path / "trainer_state.json").is_file()
    ]
    if not candidates:
        raise ValueError(
            f"--resume_from_checkpoint {value}: no complete checkpoint (checkpoint-N/ with trainer_state.json) in "
            f"--output_dir {output_dir}. Pass a checkpoint path, or train without --resume_from_checkpoint."
        )
    return str(max(candidates, key=lambda path: int(path.name.split("-")[-1])))


def recipe_command(recipe: str, argv: list[str]) -> str:
    return shlex.join(["energy-gpt", recipe, *argv])


class RecipeTrainer(Trainer):
    """`Trainer` whose model card is EnergyGPT's (used for the saved folder and for `--push_to_hub`)."""

    def __init__(self, *args, card_command: str, card_datasets: list[str] | None, base_model: str | None, **kwargs):
        super().__init__(*args, **kwargs)
        self.card_command, self.card_datasets, self.base_model = card_command, card_datasets, base_model

    def create_model_card(self, **kwargs) -> None:
        if not self.is_world_process_zero():
            return
        if not (Path(self.args.output_dir) / "config.json").is_file():
            # A LoRA adapter folder (no config.json): PEFT's own card, which names the base model, as Trainer does.
            super().create_model_card(**kwargs)
            return
        write_model_card(
            self.args.output_dir, base_model=self.base_model, command=self.card_command, datasets=self.card_datasets
        )


def save_trained_model(trainer: RecipeTrainer, model_args: ModelArguments) -> None:
    """Save the model (or the LoRA adapter, or the merged model) and the tokenizer to --output_dir, like
    `trainer.save_model()`; only the main process writes. Every rank must call it (merging runs on each rank)."""
    if model_args.use_lora and model_args.merge_lora:
        trainer.save_model(str(Path(trainer.args.output_dir) / LORA_ADAPTER_DIRNAME), _internal_call=True)
        merged = trainer.accelerator.unwrap_model(trainer.model).merge_and_unload()
        # From now on the trainer (evaluation, push_to_hub) works with the merged full model.
        trainer.model = trainer.model_wrapped = merged
    # `_internal_call`: no "Model save" push here; `finish` pushes once, with the model card and the results.
    trainer.save_model(_internal_call=True)


def finish(trainer: RecipeTrainer, push_kwargs: dict[str, Any] | None = None) -> None:
    """Write the model card (main process) and push the output folder when --push_to_hub.

    A full checkpoint goes through `energy_gpt.hub.push`, so `--push_to_hub` uploads exactly the files that
    `energy-gpt push` validates (no pickled training_args.bin, logs or checkpoints); a LoRA adapter folder, which
    has no EnergyGPT config, goes through the Trainer's own push.
    """
    trainer.create_model_card()
    if not trainer.args.push_to_hub:
        return
    output_dir = Path(trainer.args.output_dir)
    if not (output_dir / "config.json").is_file():
        trainer.push_to_hub(**(push_kwargs or {}))
        return
    if trainer.is_world_process_zero():
        from energy_gpt.hub import push

        args = trainer.args
        push(
            output_dir,
            args.hub_model_id or output_dir.name,
            private=bool(args.hub_private_repo),
            revision=getattr(args, "hub_revision", None),
            commit_message=(push_kwargs or {}).get("commit_message", "End of training"),
            token=args.hub_token,
        )


def train_and_save(trainer: RecipeTrainer, model_args: ModelArguments, train_samples: int | None) -> dict[str, float]:
    """Train (resuming if asked), save the model and tokenizer, write train_results.json and the trainer state.

    `train_samples=None` (streaming: no length) counts the samples the optimizer steps consumed.
    """
    args = trainer.args
    train_result = trainer.train(
        resume_from_checkpoint=resolve_resume_checkpoint(args.resume_from_checkpoint, args.output_dir)
    )
    save_trained_model(trainer, model_args)
    if train_samples is None:
        train_samples = trainer.state.global_step * args.train_batch_size * args.gradient_accumulation_steps
        train_samples *= args.world_size
    metrics = dict(train_result.metrics, train_samples=train_samples)
    save_results(trainer, "train", metrics)
    trainer.save_state()
    return metrics


def save_results(trainer: Trainer, split: str, metrics: dict[str, float], combined: bool = True) -> None:
    """`{split}_results.json` and `all_results.json` as in the transformers examples, written atomically by the main
    process only."""
    trainer.log_metrics(split, metrics)
    if not trainer.is_world_process_zero():
        return
    output_dir = Path(trainer.args.output_dir)
    atomic_write_json(output_dir / f"{split}_results.json", metrics, indent=4)
    if combined:
        all_path = output_dir / "all_results.json"
        all_metrics = json.loads(all_path.read_text()) if all_path.exists() else {}
        all_metrics.update(metrics)
        atomic_write_json(all_path, all_metrics, indent=4)


def perplexity(loss: float) -> float:
    try:
        return math.exp(loss)
    except OverflowError:
        return float("inf")


def limit_samples(dataset, max_samples: int | None, streaming: bool):
    if max_samples is None:
        return dataset
    if streaming:
        return dataset.take(max_samples)
    return dataset.select(range(min(max_samples, len(dataset))))
