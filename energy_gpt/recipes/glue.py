r"""`energy-gpt glue`: sequence-classification fine-tuning of an EnergyGPT model with `Trainer`, with the arguments of
transformers' `run_glue.py`.

    energy-gpt glue --model_name_or_path runs/momentum --task_name rte --do_train --do_eval \
        --max_seq_length 128 --per_device_train_batch_size 32 --learning_rate 2e-5 --num_train_epochs 3 \
        --output_dir runs/momentum-rte

Every GLUE task (cola, sst2, mrpc, qqp, stsb, mnli, qnli, rte, wnli) loads from `nyu-mll/glue`; or give
--train_file / --validation_file (csv, tsv, json/jsonl) with the task's columns (with --task_name: its text
columns, its metrics and its label names) or any `label` + one or two text columns (without: accuracy, or mse for
float labels). mnli is evaluated on validation_matched and validation_mismatched (keys with `_mm`).
The metrics are the official ones, computed locally (`energy_gpt.recipes.metrics`).
"""

import csv
import logging
import sys
from dataclasses import dataclass, field

import numpy as np
from datasets import load_dataset
from transformers import (
    DataCollatorWithPadding,
    EvalPrediction,
    Trainer,
    default_data_collator,
    set_seed,
)

from ..modeling import EnergyGPTForSequenceClassification
from .arguments import ModelArguments
from .common import (
    RecipeTrainer,
    build_config,
    build_model,
    build_tokenizer,
    data_files_and_builder,
    finish,
    limit_samples,
    parse_recipe_args,
    recipe_command,
    save_results,
    setup_logging,
    train_and_save,
    wrap_with_lora,
)
from .metrics import GLUE_TASK_METRICS, classification_metrics, glue_metrics

logger = logging.getLogger(__name__)

GLUE_DATASET = "nyu-mll/glue"
TASK_TO_KEYS: dict[str, tuple[str, str | None]] = {
    "cola": ("sentence", None),
    "mnli": ("premise", "hypothesis"),
    "mrpc": ("sentence1", "sentence2"),
    "qnli": ("question", "sentence"),
    "qqp": ("question1", "question2"),
    "rte": ("sentence1", "sentence2"),
    "sst2": ("sentence", None),
    "stsb": ("sentence1", "sentence2"),
    "wnli": ("sentence1", "sentence2"),
}
# Label names of nyu-mll/glue (ClassLabel order); stsb is a regression (one output).
TASK_LABEL_NAMES: dict[str, list[str] | None] = {
    "cola": ["unacceptable", "acceptable"],
    "mnli": ["entailment", "neutral", "contradiction"],
    "mrpc": ["not_equivalent", "equivalent"],
    "qnli": ["entailment", "not_entailment"],
    "qqp": ["not_duplicate", "duplicate"],
    "rte": ["entailment", "not_entailment"],
    "sst2": ["negative", "positive"],
    "stsb": None,
    "wnli": ["not_entailment", "entailment"],
}
CLASSIFICATION_FILE_BUILDERS = {"csv": "csv", "tsv": "csv", "json": "json", "jsonl": "json"}
TSV_QUOTING = {"minimal": csv.QUOTE_MINIMAL, "none": csv.QUOTE_NONE}


@dataclass
class DataTrainingArguments:
    """Which task / data to train and evaluate on, and how to tokenize it."""

    task_name: str | None = field(
        default=None, metadata={"help": "GLUE task.", "choices": sorted(TASK_TO_KEYS)}
    )
    dataset_name: str | None = field(
        default=None, metadata={"help": f"Dataset on the Hub (default {GLUE_DATASET} with --task_name)."}
    )
    dataset_config_name: str | None = field(
        default=None, metadata={"help": "Configuration of the dataset (default: the task name)."}
    )
    train_file: str | None = field(default=None, metadata={"help": "Training data: .csv, .tsv, .json or .jsonl."})
    validation_file: str | None = field(default=None, metadata={"help": "Validation data, same formats."})
    tsv_quoting: str = field(
        default="minimal",
        metadata={"help": "Quoting of .csv/.tsv files: 'minimal' (\"...\" quotes, pandas' default) or 'none' (the "
                          "original GLUE TSVs such as SST-2, whose sentences contain bare quote characters).",
                  "choices": sorted(TSV_QUOTING)},
    )
    max_seq_length: int = field(default=128, metadata={"help": "Longer inputs are truncated."})
    pad_to_max_length: bool = field(
        default=False, metadata={"help": "Pad every input to --max_seq_length (default: pad each batch dynamically)."}
    )
    max_train_samples: int | None = field(default=None, metadata={"help": "Keep only this many training examples."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Keep only this many evaluation examples."})
    preprocessing_num_workers: int | None = field(default=None, metadata={"help": "Processes for preprocessing."})
    overwrite_cache: bool = field(default=False, metadata={"help": "Recompute the cached preprocessed datasets."})

    def __post_init__(self):
        if self.task_name is not None:
            self.task_name = self.task_name.lower()
            if self.task_name not in TASK_TO_KEYS:
                raise ValueError(f"--task_name {self.task_name!r} is not a GLUE task; choose one of {sorted(TASK_TO_KEYS)}.")
        has_files = self.train_file is not None or self.validation_file is not None
        if self.dataset_name is not None and has_files:
            raise ValueError("Pass either --dataset_name or --train_file / --validation_file, not both.")
        if self.dataset_name is None and not has_files:
            if self.task_name is None:
                raise ValueError("Need --task_name, --dataset_name or --train_file / --validation_file.")
            self.dataset_name = GLUE_DATASET
        if self.dataset_name == GLUE_DATASET and self.dataset_config_name is None:
            if self.task_name is None:
                raise ValueError(f"--dataset_name {GLUE_DATASET} needs --task_name.")
            self.dataset_config_name = self.task_name
        if self.max_seq_length <= 0:
            raise ValueError(f"--max_seq_length must be a positive integer, got {self.max_seq_length}.")


def load_raw_datasets(data_args: DataTrainingArguments, model_args: ModelArguments):
    if data_args.dataset_name is not None:
        return load_dataset(
            data_args.dataset_name, data_args.dataset_config_name, cache_dir=model_args.cache_dir, token=model_args.token
        )
    data_files, builder = data_files_and_builder(
        data_args.train_file, data_args.validation_file, CLASSIFICATION_FILE_BUILDERS
    )
    kwargs = {}
    if builder == "csv":
        if any(path.lower().endswith(".tsv") for path in data_files.values()):
            kwargs["delimiter"] = "\t"
        # keep_default_na=False: a text such as "null" or "NA" stays text.
        kwargs.update(quoting=TSV_QUOTING[data_args.tsv_quoting], keep_default_na=False)
    return load_dataset(builder, data_files=data_files, cache_dir=model_args.cache_dir, **kwargs)


def text_columns(data_args: DataTrainingArguments, column_names: list[str]) -> tuple[str, str | None]:
    if data_args.task_name is not None:
        keys = TASK_TO_KEYS[data_args.task_name]
        missing = [key for key in keys if key is not None and key not in column_names]
        if missing:
            raise ValueError(f"Task {data_args.task_name!r} needs the columns {missing}; the data has {column_names}.")
        return keys
    # As run_glue.py: sentence1/sentence2 if present, else the first one or two non-label columns.
    if "sentence1" in column_names and "sentence2" in column_names:
        return "sentence1", "sentence2"
    candidates = [name for name in column_names if name not in ("label", "idx")]
    if not candidates:
        raise ValueError(f"No text column besides 'label' in the data (columns: {column_names}).")
    return (candidates[0], candidates[1]) if len(candidates) >= 2 else (candidates[0], None)


def label_scheme(data_args: DataTrainingArguments, raw_datasets) -> tuple[bool, list[str] | None]:
    """(is_regression, label names) of the task or of the data."""
    if data_args.task_name is not None:
        names = TASK_LABEL_NAMES[data_args.task_name]
        return names is None, names
    split = raw_datasets["train"] if "train" in raw_datasets else raw_datasets[next(iter(raw_datasets))]
    if "label" not in split.column_names:
        raise ValueError(f"The data needs a 'label' column; columns: {split.column_names}.")
    feature = split.features["label"]
    if hasattr(feature, "names"):  # ClassLabel
        return False, list(feature.names)
    if feature.dtype in ("float32", "float64"):
        return True, None
    labels = sorted({label for dataset in raw_datasets.values() for label in dataset["label"]})
    return False, [str(label) for label in labels]


def run(argv: list[str] | None = None) -> tuple[Trainer, dict[str, float]]:
    """Train and/or evaluate; return the trainer and all metrics (what `all_results.json` holds)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    model_args, data_args, training_args = parse_recipe_args(DataTrainingArguments, argv, __doc__)
    setup_logging(training_args)
    if not (training_args.do_train or training_args.do_eval):
        raise ValueError("Nothing to do: pass --do_train and/or --do_eval.")
    set_seed(training_args.seed)

    raw_datasets = load_raw_datasets(data_args, model_args)
    is_regression, label_names = label_scheme(data_args, raw_datasets)
    task_fields = {"num_labels": 1} if is_regression else {
        "num_labels": len(label_names),
        "id2label": dict(enumerate(label_names)),
        "label2id": {name: index for index, name in enumerate(label_names)},
    }
    if data_args.task_name is not None:
        task_fields["finetuning_task"] = data_args.task_name

    tokenizer = build_tokenizer(model_args)
    # The classifier pools the last token that is not padding, found from config.pad_token_id (eos for GPT-2).
    config = build_config(model_args, pad_token_id=tokenizer.pad_token_id, **task_fields)
    model = build_model(EnergyGPTForSequenceClassification, model_args, config, tokenizer)
    model = wrap_with_lora(model, model_args, task_type="SEQ_CLS")

    first_split = raw_datasets["train"] if "train" in raw_datasets else next(iter(raw_datasets.values()))
    column_names = first_split.column_names
    first_key, second_key = text_columns(data_args, column_names)
    max_seq_length = min(data_args.max_seq_length, config.n_positions)
    label_to_id = None if is_regression else {name: index for index, name in enumerate(label_names)}

    def to_label_id(label):
        if is_regression or label == -1:  # GLUE test splits carry -1
            return label
        if isinstance(label, str):
            if label not in label_to_id:
                raise ValueError(f"Unknown label {label!r}; expected one of {list(label_to_id)}.")
            return label_to_id[label]
        if data_args.task_name is not None or label_to_id is None:
            return int(label)
        return label_to_id[str(label)]

    def preprocess(examples):
        texts = (examples[first_key],) if second_key is None else (examples[first_key], examples[second_key])
        result = tokenizer(
            *texts,
            padding="max_length" if data_args.pad_to_max_length else False,
            max_length=max_seq_length,
            truncation=True,
        )
        if "label" in examples:
            result["label"] = [to_label_id(label) for label in examples["label"]]
        return result

    with training_args.main_process_first(desc="dataset map pre-processing"):
        processed = raw_datasets.map(
            preprocess,
            batched=True,
            num_proc=data_args.preprocessing_num_workers,
            remove_columns=column_names,
            load_from_cache_file=not data_args.overwrite_cache,
            desc="Running tokenizer on dataset",
        )

    train_dataset = None
    eval_datasets: dict[str, object] = {}
    if training_args.do_train:
        if "train" not in processed:
            raise ValueError("--do_train needs a train split (--train_file or a dataset with one).")
        train_dataset = limit_samples(processed["train"], data_args.max_train_samples, streaming=False)
    if training_args.do_eval:
        matched = "validation_matched" if data_args.task_name == "mnli" and "validation_matched" in processed else "validation"
        if matched not in processed:
            raise ValueError("--do_eval needs a validation split (--validation_file or a dataset with one).")
        eval_datasets[""] = limit_samples(processed[matched], data_args.max_eval_samples, streaming=False)
        if data_args.task_name == "mnli" and "validation_mismatched" in processed:
            eval_datasets["_mm"] = limit_samples(processed["validation_mismatched"], data_args.max_eval_samples, False)

    def compute_metrics(prediction: EvalPrediction) -> dict[str, float]:
        logits = prediction.predictions[0] if isinstance(prediction.predictions, tuple) else prediction.predictions
        predictions = np.squeeze(logits, axis=-1) if is_regression else np.argmax(logits, axis=-1)
        if data_args.task_name is not None:
            return glue_metrics(data_args.task_name, predictions, prediction.label_ids)
        return classification_metrics(predictions, prediction.label_ids, is_regression)

    if data_args.dataset_name is not None:
        dataset_names = [data_args.dataset_name]
    else:
        dataset_names = [f"glue/{data_args.task_name}"] if data_args.task_name else None
    trainer = RecipeTrainer(
        model=model,
        args=training_args,
        train_dataset=train_dataset,
        eval_dataset=eval_datasets.get(""),
        processing_class=tokenizer,
        data_collator=default_data_collator if data_args.pad_to_max_length else DataCollatorWithPadding(tokenizer),
        compute_metrics=compute_metrics,
        card_command=recipe_command("glue", argv),
        card_datasets=dataset_names,
        base_model=model_args.model_name_or_path,
    )

    all_metrics: dict[str, float] = {}
    if training_args.do_train:
        all_metrics.update(train_and_save(trainer, model_args, train_samples=len(train_dataset)))

    if training_args.do_eval:
        logger.info("*** Evaluate ***")
        eval_metrics: dict[str, float] = {}
        for suffix, eval_dataset in eval_datasets.items():
            metrics = trainer.evaluate(eval_dataset=eval_dataset)
            metrics["eval_samples"] = len(eval_dataset)
            eval_metrics.update({f"{key}{suffix}": value for key, value in metrics.items()})
        save_results(trainer, "eval", eval_metrics)
        all_metrics.update(eval_metrics)

    if training_args.do_train:
        push_kwargs = {"finetuned_from": model_args.model_name_or_path, "tasks": "text-classification"}
        finish(trainer, push_kwargs)
    return trainer, all_metrics


def main(argv: list[str] | None = None) -> int:
    run(argv)
    return 0


if __name__ == "__main__":
    sys.exit(main())


__all__ = ["GLUE_TASK_METRICS", "TASK_LABEL_NAMES", "TASK_TO_KEYS", "main", "run"]
