r"""`energy-gpt pretrain`: causal-LM pretraining of an EnergyGPT model with `Trainer`, with the arguments of
transformers' `run_clm.py`.

    energy-gpt pretrain --config_overrides "n_layer=4,n_embd=256,n_head=4" --attention_solver momentum \
        --tokenizer_name openai-community/gpt2 --dataset_name JeanKaddour/minipile --block_size 512 \
        --do_train --do_eval --max_steps 2000 --output_dir runs/momentum

Texts are tokenized, concatenated and cut into blocks of --block_size tokens ("packing", as run_clm.py); with
--pack_across_documents false every block comes from one document (a document's last block is padded, and padding
carries no loss). --streaming reads the data as it trains (needs --max_steps); --resume_from_checkpoint last
continues a killed run at the same data position. The evaluation reports the loss and its perplexity.
"""

import logging
import sys
from dataclasses import dataclass, field
from itertools import chain
from pathlib import Path

import numpy as np
from datasets import IterableDatasetDict, load_dataset
from transformers import Trainer, TrainingArguments, default_data_collator, set_seed

from ..modeling import EnergyGPTForCausalLM
from .arguments import ModelArguments
from .common import (
    RecipeTrainer,
    argument_error_exit,
    build_config,
    build_model,
    build_tokenizer,
    data_files_and_builder,
    finish,
    limit_samples,
    parse_recipe_args,
    perplexity,
    recipe_command,
    save_results,
    setup_logging,
    train_and_save,
    wrap_with_lora,
)
from .metrics import accuracy

logger = logging.getLogger(__name__)

DEFAULT_PRETRAIN_DATASET = "JeanKaddour/minipile"
TEXT_FILE_BUILDERS = {"txt": "text", "text": "text", "json": "json", "jsonl": "json", "csv": "csv", "parquet": "parquet"}


@dataclass
class DataTrainingArguments:
    """Which text to train and evaluate on, and how to cut it into blocks."""

    dataset_name: str | None = field(
        default=None,
        metadata={"help": f"Dataset on the Hub (default {DEFAULT_PRETRAIN_DATASET} when no --train_file / "
                          "--validation_file is given)."},
    )
    dataset_config_name: str | None = field(default=None, metadata={"help": "Configuration name of the dataset."})
    train_file: str | None = field(
        default=None, metadata={"help": "Training text: a .txt, .json/.jsonl, .csv or .parquet file."}
    )
    validation_file: str | None = field(default=None, metadata={"help": "Validation text, same formats."})
    text_column: str | None = field(
        default=None, metadata={"help": "Column holding the text (default: 'text', else the first column)."}
    )
    validation_split_percentage: int = field(
        default=5, metadata={"help": "Percent of the train split held out for validation when there is none."}
    )
    block_size: int | None = field(
        default=None,
        metadata={"help": "Length of the packed training blocks (default: the model's n_positions, at most 1024)."},
    )
    max_train_samples: int | None = field(default=None, metadata={"help": "Keep only this many training blocks."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Keep only this many evaluation blocks."})
    streaming: bool = field(
        default=False,
        metadata={"help": "Stream the dataset instead of downloading it all (as run_clm.py; needs --max_steps)."},
    )
    pack_across_documents: bool = field(
        default=True,
        metadata={"help": "true (run_clm.py): concatenate all texts, then cut blocks, so a block may span documents. "
                          "false: cut every document into its own blocks; its last block is padded (masked, no loss)."},
    )
    text_sample_by: str = field(
        default="line",
        metadata={"help": "What one document of a .txt file is: a line (the `datasets` default), a paragraph (text "
                          "between blank lines) or the whole file.", "choices": ["line", "paragraph", "document"]},
    )
    keep_linebreaks: bool = field(default=True, metadata={"help": "Keep line breaks of .txt files."})
    preprocessing_num_workers: int | None = field(default=None, metadata={"help": "Processes for preprocessing."})
    overwrite_cache: bool = field(default=False, metadata={"help": "Recompute the cached preprocessed datasets."})

    def __post_init__(self):
        if self.dataset_name is None and self.train_file is None and self.validation_file is None:
            self.dataset_name = DEFAULT_PRETRAIN_DATASET
        if self.dataset_name is not None and (self.train_file or self.validation_file):
            raise ValueError("Pass either --dataset_name or --train_file / --validation_file, not both.")
        if not 0 < self.validation_split_percentage < 100:
            raise ValueError(
                f"--validation_split_percentage must be in 1..99, got {self.validation_split_percentage}."
            )
        if self.block_size is not None and self.block_size <= 0:
            raise ValueError(f"--block_size must be a positive integer, got {self.block_size}.")
        for flag, path in (("--train_file", self.train_file), ("--validation_file", self.validation_file)):
            if path is not None and not Path(path).is_file():
                raise FileNotFoundError(
                    f"{flag} {path!r}: no such file; pass an existing file, one of "
                    f"{', '.join('.' + extension for extension in TEXT_FILE_BUILDERS)}."
                )
        if self.train_file or self.validation_file:
            data_files_and_builder(self.train_file, self.validation_file, TEXT_FILE_BUILDERS)  # the extensions


def check_training_steps(training_args, required: bool) -> None:
    """`--max_steps`: a positive number of steps, or (where `required` is False) -1 to train --num_train_epochs."""
    max_steps = training_args.max_steps
    if max_steps > 0 or (max_steps == -1 and not required):
        return
    allowed = "a positive integer" if required else "a positive integer, or -1 to train --num_train_epochs epochs"
    raise ValueError(f"--max_steps must be {allowed}; got {max_steps}.")


def load_raw_datasets(data_args: DataTrainingArguments, model_args: ModelArguments):
    """A DatasetDict (IterableDatasetDict when streaming) with `train` and, if possible, `validation`."""
    if data_args.dataset_name is not None:
        load_kwargs = {"path": data_args.dataset_name, "name": data_args.dataset_config_name}
    else:
        data_files, builder = data_files_and_builder(data_args.train_file, data_args.validation_file, TEXT_FILE_BUILDERS)
        load_kwargs = {"path": builder, "data_files": data_files}
        if builder == "text":
            load_kwargs.update(keep_linebreaks=data_args.keep_linebreaks, sample_by=data_args.text_sample_by)
    load_kwargs.update(cache_dir=model_args.cache_dir, token=model_args.token, streaming=data_args.streaming)
    raw_datasets = load_dataset(**load_kwargs)
    if "validation" in raw_datasets or "train" not in raw_datasets:
        return raw_datasets
    percent = data_args.validation_split_percentage
    if data_args.streaming:
        # Every example whose index modulo 100 falls below the percentage goes to validation.
        train = raw_datasets["train"]
        return IterableDatasetDict(
            train=train.filter(lambda _, index: index % 100 >= percent, with_indices=True),
            validation=train.filter(lambda _, index: index % 100 < percent, with_indices=True),
        )
    raw_datasets["validation"] = load_dataset(**load_kwargs, split=f"train[:{percent}%]")
    raw_datasets["train"] = load_dataset(**load_kwargs, split=f"train[{percent}%:]")
    return raw_datasets


def resolve_block_size(data_args: DataTrainingArguments, config, tokenizer) -> int:
    limit = min(config.n_positions, tokenizer.model_max_length)
    if data_args.block_size is None:
        return min(1024, limit)
    if data_args.block_size > config.n_positions:
        raise ValueError(
            f"--block_size {data_args.block_size} is longer than the model's n_positions ({config.n_positions})."
        )
    return data_args.block_size


def build_lm_datasets(raw_datasets, data_args: DataTrainingArguments, tokenizer, block_size: int, training_args):
    """Tokenize and cut into blocks of `block_size` tokens (labels = input_ids; the model shifts): across documents
    (concatenated first) or within each document (`--pack_across_documents false`)."""
    splits = list(raw_datasets.keys())
    first_split = raw_datasets[splits[0]]
    # A filtered stream (the validation carve-out) no longer knows its features: read them off the first example.
    column_names = list(first_split.features) if first_split.features is not None else list(next(iter(first_split)))
    text_column = data_args.text_column or ("text" if "text" in column_names else column_names[0])
    if text_column not in column_names:
        raise ValueError(f"--text_column {text_column!r} is not a column of the dataset; columns: {column_names}.")

    def tokenize(examples):
        return tokenizer(examples[text_column])

    def group_texts(examples):
        concatenated = {key: list(chain(*examples[key])) for key in examples}
        total_length = len(concatenated["input_ids"]) // block_size * block_size  # drop the remainder
        result = {key: [ids[i : i + block_size] for i in range(0, total_length, block_size)]
                  for key, ids in concatenated.items()}
        result["labels"] = result["input_ids"].copy()
        return result

    def split_documents(examples):
        # Every block holds one document's tokens; the tail is padded, masked and ignored by the loss (-100).
        result = {"input_ids": [], "attention_mask": [], "labels": []}
        for ids in examples["input_ids"]:
            for start in range(0, len(ids), block_size):
                chunk = ids[start : start + block_size]
                padding = block_size - len(chunk)
                result["input_ids"].append(chunk + [tokenizer.pad_token_id] * padding)
                result["attention_mask"].append([1] * len(chunk) + [0] * padding)
                result["labels"].append(chunk + [-100] * padding)
        return result

    map_kwargs = {}
    if not data_args.streaming:
        map_kwargs = {"num_proc": data_args.preprocessing_num_workers, "load_from_cache_file": not data_args.overwrite_cache}
    with training_args.main_process_first(desc="dataset map tokenization"):
        tokenized = raw_datasets.map(tokenize, batched=True, remove_columns=column_names, **map_kwargs)
    if data_args.pack_across_documents:
        with training_args.main_process_first(desc="grouping texts together"):
            return tokenized.map(group_texts, batched=True, **map_kwargs)
    # Rows change count: the tokenizer's columns go, the blocks replace them.
    tokenizer_columns = list(tokenizer("x").keys())
    with training_args.main_process_first(desc="cutting documents into blocks"):
        return tokenized.map(split_documents, batched=True, remove_columns=tokenizer_columns, **map_kwargs)


def preprocess_logits_for_metrics(logits, labels):
    if isinstance(logits, tuple):
        logits = logits[0]
    return logits.argmax(dim=-1)  # keep only the predicted ids, not the (blocks x block_size x vocab) logits


def compute_metrics(eval_predictions):
    predictions, labels = eval_predictions
    # The prediction at position t is for token t + 1; padding (-100) is not scored.
    predictions, labels = np.asarray(predictions)[:, :-1].reshape(-1), np.asarray(labels)[:, 1:].reshape(-1)
    scored = labels != -100
    return {"accuracy": accuracy(predictions[scored], labels[scored])}


def parse_arguments(argv: list[str]) -> tuple[ModelArguments, DataTrainingArguments, TrainingArguments]:
    """Parse and check every argument that can be checked without loading data or models."""
    model_args, data_args, training_args = parse_recipe_args(DataTrainingArguments, argv, __doc__)
    if not (training_args.do_train or training_args.do_eval):
        raise ValueError("Nothing to do: pass --do_train and/or --do_eval.")
    if data_args.streaming and training_args.do_train and training_args.max_steps <= 0:
        raise ValueError("--streaming needs --max_steps (a streamed dataset has no length to count epochs from).")
    check_training_steps(training_args, required=False)
    if model_args.tokenizer_name is None and model_args.model_name_or_path is None:
        raise ValueError("--tokenizer_name is required for a new model (a Hub id such as openai-community/gpt2 or a "
                         "local folder), or pass --model_name_or_path.")
    return model_args, data_args, training_args


def run(argv: list[str] | None = None, arguments: tuple | None = None) -> tuple[Trainer, dict[str, float]]:
    """Train and/or evaluate; return the trainer and all metrics (what `all_results.json` holds). `arguments`:
    what `parse_arguments(argv)` returned, when the caller parsed them already."""
    argv = list(sys.argv[1:] if argv is None else argv)
    model_args, data_args, training_args = arguments or parse_arguments(argv)
    setup_logging(training_args)
    set_seed(training_args.seed)

    raw_datasets = load_raw_datasets(data_args, model_args)
    tokenizer = build_tokenizer(model_args)
    # Saved with the model: batched pipelines and padded generation find the pad token (eos for GPT-2 tokenizers).
    config = build_config(model_args, pad_token_id=tokenizer.pad_token_id)
    model = build_model(EnergyGPTForCausalLM, model_args, config, tokenizer)
    model = wrap_with_lora(model, model_args, task_type="CAUSAL_LM")

    block_size = resolve_block_size(data_args, config, tokenizer)
    lm_datasets = build_lm_datasets(raw_datasets, data_args, tokenizer, block_size, training_args)
    train_dataset = eval_dataset = None
    if training_args.do_train:
        if "train" not in lm_datasets:
            raise ValueError("--do_train needs a train split (--train_file or a dataset with one).")
        train_dataset = limit_samples(lm_datasets["train"], data_args.max_train_samples, data_args.streaming)
    if training_args.do_eval:
        if "validation" not in lm_datasets:
            raise ValueError("--do_eval needs a validation split (--validation_file or a train split to carve).")
        eval_dataset = limit_samples(lm_datasets["validation"], data_args.max_eval_samples, data_args.streaming)
    for name, dataset in (("train", train_dataset), ("validation", eval_dataset)):
        if dataset is not None and not data_args.streaming and len(dataset) == 0:
            raise ValueError(f"The {name} split has no block of {block_size} tokens; lower --block_size.")

    dataset_names = [data_args.dataset_name] if data_args.dataset_name else None
    trainer = RecipeTrainer(
        model=model,
        args=training_args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        processing_class=tokenizer,
        data_collator=default_data_collator,
        compute_metrics=compute_metrics if training_args.do_eval else None,
        preprocess_logits_for_metrics=preprocess_logits_for_metrics if training_args.do_eval else None,
        card_command=recipe_command("pretrain", argv),
        card_datasets=dataset_names,
        base_model=model_args.model_name_or_path,
    )

    all_metrics: dict[str, float] = {}
    if training_args.do_train:
        train_samples = None if data_args.streaming else len(train_dataset)
        all_metrics.update(train_and_save(trainer, model_args, train_samples=train_samples))

    if training_args.do_eval:
        logger.info("*** Evaluate ***")
        metrics = trainer.evaluate()
        if not data_args.streaming:
            metrics["eval_samples"] = len(eval_dataset)
        elif data_args.max_eval_samples is not None:
            metrics["eval_samples"] = data_args.max_eval_samples
        metrics["perplexity"] = perplexity(metrics["eval_loss"])
        save_results(trainer, "eval", metrics)
        all_metrics.update(metrics)

    if training_args.do_train:
        finish(trainer, {"finetuned_from": model_args.model_name_or_path, "tasks": "text-generation"})
    return trainer, all_metrics


def main(argv: list[str] | None = None) -> int:
    """`energy-gpt pretrain`: a bad argument ends it at once with one line on stderr and exit status 2."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        arguments = parse_arguments(argv)
    except (ValueError, FileNotFoundError) as error:
        return argument_error_exit("pretrain", error)
    run(argv, arguments)
    return 0


if __name__ == "__main__":
    sys.exit(main())
