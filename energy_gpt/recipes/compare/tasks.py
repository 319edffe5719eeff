"""What `energy-gpt compare` trains on: a `PreparedTask` (tokenizer, one training set per seed, the shared validation
set, the config fields the data fixes) built from the embedded synthetic task or from causal-LM text."""

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from transformers import AutoTokenizer, PreTrainedTokenizerFast, TrainingArguments

from ..arguments import ModelArguments
from ..common import build_tokenizer, limit_samples
from ..icl_regression import (
    baseline_errors,
    generate_icl_regression,
    regression_dataset,
    regression_error,
    regression_model_class,
)
from ..pretrain import DataTrainingArguments, build_lm_datasets, load_raw_datasets
from ..recall import (
    generate_induction,
    generate_mqar,
    majority_accuracy,
    numbered_tokenizer,
    token_dataset,
)
from ..synthetic import (
    BLIND_GUESS_EXAMPLES,
    BLIND_GUESS_SEED,
    VALIDATION_SEED,
    blind_guess_loss,
    build_lis_dataset,
    build_lis_tokenizer,
    generate_lis_examples,
)
from .arguments import CompareArguments, CompareDataArguments

logger = logging.getLogger(__name__)

DEFAULT_TEXT_BLOCK_SIZE = 128
BPE_SPECIAL_TOKEN = "<|endoftext|>"  # bos, eos and pad of a trained BPE (GPT-2's convention)
TOKENIZER_DIRNAME = "tokenizer"


@dataclass
class PreparedTask:
    tokenizer: Any
    eval_dataset: Any
    train_dataset_for: Callable[[int], Any]  # seed -> training dataset (the synthetic task draws one per seed)
    model_fields: dict[str, Any]  # config fields the data fixes (vocabulary, positions, special tokens)
    name: str  # short, for the plot title
    description: str  # one sentence, for the table
    tokenizer_description: str
    tokens_per_sequence: int
    blind_guess_loss: float | None = None  # loss of a model that ignores the input (synthetic task only)
    trained_tokenizer: bool = False  # a BPE trained here, to be saved with the results
    metric: str | None = None  # what `final_metric` measures (accuracy on the scored positions); None: loss only
    chance: float | None = None  # the metric of a model that does not read the input
    chance_description: str | None = None  # how `chance` is reached, for the table header
    # Tasks that are not token sequences: the model class to train (None: EnergyGPTForCausalLM), the metric's own
    # evaluation (None: accuracy of the labelled next tokens), closed-form baselines on the validation set (name ->
    # metric), and how many numbers of the model's main input make one token (for the token count).
    model_class: type | None = None
    evaluate_metric: Callable[[Any, Any, int], float] | None = None
    baselines: dict[str, float] | None = None
    values_per_token: int = 1


def special_token_fields(tokenizer) -> dict[str, Any]:
    """The model's vocabulary and special-token ids, from its tokenizer."""
    return {
        "vocab_size": len(tokenizer),
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }


def prepare_synthetic_task(compare_args: CompareArguments, training_args: TrainingArguments) -> PreparedTask:
    """The LIS task: its tokenizer, one training set per seed, the (shared) validation set, and the config fields."""
    task = compare_args.lis_task()
    tokenizer = build_lis_tokenizer(task)
    num_train_examples = default_num_train_examples(compare_args, training_args)
    # The validation set has a seed of its own (a string: no integer training seed can produce the same sequences),
    # so every seed and every solver is measured on the same examples.
    eval_dataset = build_lis_dataset(task, tokenizer, compare_args.num_validation_examples, seed=VALIDATION_SEED)
    train_datasets: dict[int, Any] = {}

    def train_dataset_for(seed: int):
        if seed not in train_datasets:
            train_datasets[seed] = build_lis_dataset(task, tokenizer, num_train_examples, seed=seed)
        return train_datasets[seed]

    blind_loss = blind_guess_loss(task)
    description = (
        f"longest increasing subsequence (embedded): {num_train_examples} training sequences per seed / "
        f"{compare_args.num_validation_examples} validation sequences of {task.min_length}-{task.max_length} numbers "
        f"in [0, {task.max_value}), {task.block_length} tokens each; loss on the answer token only (guessing the answer "
        f"from its distribution alone, without reading the numbers, scores {blind_loss:.3f})"
    )
    answers = [example["lis_length"] for example in generate_lis_examples(task, BLIND_GUESS_EXAMPLES, BLIND_GUESS_SEED)]
    return PreparedTask(
        tokenizer, eval_dataset, train_dataset_for, {**special_token_fields(tokenizer), "n_positions": task.block_length},
        "longest increasing subsequence", description, f"word-level, built in code ({len(tokenizer)} tokens)",
        task.block_length, blind_loss, metric="accuracy of the answer token", chance=majority_accuracy(answers),
        chance_description="always answering the most frequent length",
    )


def load_gpt2_bpe_files(folder: Path) -> PreTrainedTokenizerFast:
    """GPT-2's tokenizer from its original files (`encoder.json`, `vocab.bpe`), as in ../shared/data/gpt2-tokenizer."""
    from transformers import GPT2TokenizerFast

    # `vocab=` / `merges=` (paths): transformers 5 ignores `vocab_file=` / `merges_file=` here without a word.
    return GPT2TokenizerFast(vocab=str(folder / "encoder.json"), merges=str(folder / "vocab.bpe"))


def load_named_tokenizer(model_args: ModelArguments):
    """--tokenizer_name: a Hub id, a saved tokenizer folder, or a folder of GPT-2's original BPE files."""
    name = model_args.tokenizer_name
    folder = Path(name)
    saved_files = ("tokenizer.json", "tokenizer_config.json", "vocab.json")
    if folder.is_dir() and (folder / "encoder.json").is_file() and (folder / "vocab.bpe").is_file() and not any(
        (folder / file).exists() for file in saved_files
    ):
        tokenizer = load_gpt2_bpe_files(folder)
    else:
        try:
            tokenizer = build_tokenizer(model_args)
        except (OSError, ValueError, TypeError, KeyError) as error:
            raise ValueError(
                f"--tokenizer_name {name!r}: no tokenizer could be loaded ({type(error).__name__}: {error}). Pass a Hub "
                "id, a folder written by save_pretrained(), or a folder with GPT-2's encoder.json and vocab.bpe; or "
                "leave --tokenizer_name out to train a byte-level BPE on --train_file (--tokenizer_vocab_size)."
            ) from error
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def text_column_of(dataset, data_args: DataTrainingArguments) -> str:
    columns = list(dataset.features)
    return data_args.text_column or ("text" if "text" in columns else columns[0])


def train_bpe_tokenizer(train_split, text_column: str, vocab_size: int) -> PreTrainedTokenizerFast:
    """A byte-level BPE (GPT-2's scheme: any text is encodable, no unknown token) of `vocab_size` tokens trained on
    the training split only, with one special token that serves as bos, eos and pad."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=[BPE_SPECIAL_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    batches = (batch[text_column] for batch in train_split.iter(batch_size=1000))
    backend.train_from_iterator(batches, trainer=trainer, length=len(train_split))
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token=BPE_SPECIAL_TOKEN, eos_token=BPE_SPECIAL_TOKEN, pad_token=BPE_SPECIAL_TOKEN
    )


def prepare_text_task(
    compare_args: CompareArguments, data_args: CompareDataArguments, model_args: ModelArguments,
    training_args: TrainingArguments, saved_tokenizer_dir: Path | None,
) -> PreparedTask:
    """Causal-LM text, prepared as in `energy-gpt pretrain` (tokenize, pack into blocks of --block_size). The
    tokenizer: --tokenizer_name; else the one an earlier (resumed) comparison trained; else a new byte-level BPE."""
    if data_args.streaming:
        raise ValueError("--streaming is not supported by compare: every solver must see the same finite data.")
    block_size = data_args.block_size or DEFAULT_TEXT_BLOCK_SIZE
    data_args.block_size = block_size
    raw_datasets = load_raw_datasets(data_args, model_args)
    if "train" not in raw_datasets or "validation" not in raw_datasets:
        raise ValueError("compare needs a train and a validation split (--train_file, optionally --validation_file).")
    trained = False
    if model_args.tokenizer_name is not None:
        tokenizer = load_named_tokenizer(model_args)
        tokenizer_description = f"{model_args.tokenizer_name} ({len(tokenizer):,} tokens)"
    elif saved_tokenizer_dir is not None:
        tokenizer = AutoTokenizer.from_pretrained(saved_tokenizer_dir)
        tokenizer_description = (
            f"byte-level BPE of {len(tokenizer):,} tokens trained on the training split (saved in {TOKENIZER_DIRNAME}/)"
        )
        logger.info(f"Using the tokenizer an earlier run trained: {saved_tokenizer_dir}")
    else:
        train_split = raw_datasets["train"]
        started = time.perf_counter()
        tokenizer = train_bpe_tokenizer(train_split, text_column_of(train_split, data_args), compare_args.tokenizer_vocab_size)
        trained = True
        tokenizer_description = (
            f"byte-level BPE of {len(tokenizer):,} tokens trained on the training split (saved in {TOKENIZER_DIRNAME}/)"
        )
        logger.info(
            f"No --tokenizer_name: trained a byte-level BPE of {len(tokenizer):,} tokens on the training split in "
            f"{time.perf_counter() - started:.1f} s; it is saved with the results in {TOKENIZER_DIRNAME}/ "
            "(--tokenizer_vocab_size sets its size)."
        )
    lm_datasets = build_lm_datasets(raw_datasets, data_args, tokenizer, block_size, training_args)
    train_dataset = limit_samples(lm_datasets["train"], data_args.max_train_samples, streaming=False)
    eval_dataset = limit_samples(lm_datasets["validation"], data_args.max_eval_samples, streaming=False)
    for name, dataset in (("train", train_dataset), ("validation", eval_dataset)):
        if len(dataset) == 0:
            raise ValueError(f"The {name} split has no block of {block_size} tokens; lower --block_size.")
    source = data_args.dataset_name or ", ".join(filter(None, (data_args.train_file, data_args.validation_file)))
    description = (
        f"causal LM on {source}: {len(train_dataset)} training / {len(eval_dataset)} validation blocks of "
        f"{block_size} tokens"
    )
    # Positions: the block size (a 1024-row table for 128-token blocks would be dead weight), unless overridden.
    fields = {**special_token_fields(tokenizer), "n_positions": block_size}
    return PreparedTask(
        tokenizer, eval_dataset, lambda seed: train_dataset, fields, f"causal LM on {Path(source).name}", description,
        tokenizer_description, block_size, trained_tokenizer=trained,
    )


# --------------------------------------------------------------------------------------------------------------------
# Recall tasks and the registry


def default_num_train_examples(compare_args: CompareArguments, training_args: TrainingArguments) -> int:
    """--num_train_examples, else one fresh example per sequence the training reads."""
    if compare_args.num_train_examples is not None:
        return compare_args.num_train_examples
    total_batch = (training_args.per_device_train_batch_size * training_args.gradient_accumulation_steps
                   * training_args.world_size)
    return training_args.max_steps * total_batch


def prepare_generated_task(
    name: str, generate: Callable, shape: Any, vocab_size: int, sequence_length: int, metric: str,
    chance: float, chance_description: str, description: str, inputs: "TaskInputs",
) -> PreparedTask:
    """A task of generated token sequences: one training set per seed, the validation set from a seed of its own."""
    tokenizer = numbered_tokenizer(vocab_size, sequence_length)
    num_train = default_num_train_examples(inputs.compare_args, inputs.training_args)
    num_validation = inputs.compare_args.num_validation_examples
    eval_dataset = token_dataset(*generate(shape, num_validation, f"{name}-validation"))
    train_datasets: dict[int, Any] = {}

    def train_dataset_for(seed: int):
        if seed not in train_datasets:
            train_datasets[seed] = token_dataset(*generate(shape, num_train, seed))
        return train_datasets[seed]

    return PreparedTask(
        tokenizer, eval_dataset, train_dataset_for, {**special_token_fields(tokenizer), "n_positions": sequence_length},
        name, f"{description}; {num_train} training sequences per seed / {num_validation} validation sequences of "
              f"{sequence_length} tokens", f"word-level, built in code ({len(tokenizer)} tokens)", sequence_length,
        metric=metric, chance=chance, chance_description=chance_description,
    )


@dataclass(frozen=True)
class TaskInputs:
    """Everything a task may need to prepare itself."""

    compare_args: CompareArguments
    data_args: CompareDataArguments
    model_args: ModelArguments
    training_args: TrainingArguments
    saved_tokenizer_dir: Path | None


def prepare_mqar(inputs: TaskInputs) -> PreparedTask:
    shape = inputs.compare_args.mqar_task()
    return prepare_generated_task(
        "mqar", generate_mqar, shape, shape.vocab_size, shape.sequence_length,
        "accuracy on the queried values", shape.chance_accuracy,
        f"guessing a value token without reading (1/{shape.vocab_size // 2}); picking one of the sequence's own "
        f"{shape.num_kv_pairs} values scores {shape.context_guess_accuracy:.3f}",
        f"multi-query associative recall (Zoology's MQAR): vocabulary {shape.vocab_size}, {shape.num_kv_pairs} "
        f"key-value pairs, power_a {shape.power_a:g}; loss and accuracy on the queried values only", inputs,
    )


def prepare_induction(inputs: TaskInputs) -> PreparedTask:
    shape = inputs.compare_args.induction_task()
    return prepare_generated_task(
        "induction", generate_induction, shape, shape.vocab_size, shape.sequence_length,
        "accuracy on the copied tokens", shape.chance_accuracy, f"guessing a token (1/{shape.vocab_size})",
        f"induction: a random segment of {shape.segment_length} tokens from {shape.vocab_size}, 0 to {shape.max_gap} "
        "random tokens, then the segment again; loss and accuracy on the repeat's tokens after its first", inputs,
    )


def prepare_icl_regression(inputs: TaskInputs) -> PreparedTask:
    """In-context linear regression (energy_gpt.recipes.icl_regression): real-valued vectors through a linear
    read-in, the mean squared error of a linear read-out at the x tokens, beside closed-form baselines."""
    shape = inputs.compare_args.icl_regression_task()
    num_train = default_num_train_examples(inputs.compare_args, inputs.training_args)
    num_validation = inputs.compare_args.num_validation_examples
    validation_inputs, validation_targets, _ = generate_icl_regression(shape, num_validation, "icl_regression-validation")
    baselines = baseline_errors(validation_inputs, validation_targets, shape.noise_std)
    chance = baselines.pop("predicting 0 (chance)")
    train_datasets: dict[int, Any] = {}

    def train_dataset_for(seed: int):
        if seed not in train_datasets:
            train_datasets[seed] = regression_dataset(*generate_icl_regression(shape, num_train, seed)[:2])
        return train_datasets[seed]

    # No tokens: the special tokens alone give the (unused) token table its 4 rows and the config its special ids.
    tokenizer = numbered_tokenizer(0, shape.sequence_length)
    description = (
        f"in-context linear regression: per sequence w ~ N(0, I_{shape.dimension} / {shape.dimension}) and "
        f"{shape.num_pairs} pairs (x, y = w.x + noise), x ~ N(0, I_{shape.dimension}), noise sd {shape.noise_std:g}, "
        f"fed as {shape.sequence_length} vectors [x, 0], [0, y] through a linear read-in; a linear read-out at each x "
        f"predicts its y; loss: mean squared error over all pairs; {num_train} training sequences per seed / "
        f"{num_validation} validation sequences"
    )
    return PreparedTask(
        tokenizer, regression_dataset(validation_inputs, validation_targets), train_dataset_for,
        {**special_token_fields(tokenizer), "n_positions": shape.sequence_length}, "icl_regression", description,
        f"none: real-valued inputs ({len(tokenizer)} special tokens size the unused token table)",
        shape.sequence_length, metric="mean squared error of y (pairs i >= 1)", chance=chance,
        chance_description=f"predicting 0; in expectation E[y^2] = 1 + noise sd^2 = {1 + shape.noise_std ** 2:g}",
        model_class=regression_model_class(shape.dimension), evaluate_metric=regression_error, baselines=baselines,
        values_per_token=shape.point_width,
    )


@dataclass(frozen=True)
class TaskDefinition:
    """A task `--task` can name: how to prepare it, and one line for the documentation."""

    name: str
    summary: str
    prepare: Callable[[TaskInputs], PreparedTask]


TASKS: dict[str, TaskDefinition] = {}


def register_task(definition: TaskDefinition) -> None:
    TASKS[definition.name] = definition


register_task(TaskDefinition(
    "lis", "longest increasing subsequence (embedded default); accuracy of the answer token",
    lambda inputs: prepare_synthetic_task(inputs.compare_args, inputs.training_args)))
register_task(TaskDefinition("mqar", "multi-query associative recall; accuracy on the queried values", prepare_mqar))
register_task(TaskDefinition("induction", "copy a repeated segment; accuracy on the copied tokens", prepare_induction))
register_task(TaskDefinition(
    "icl_regression", "in-context linear regression; mean squared error beside least squares and one gradient step",
    prepare_icl_regression))
register_task(TaskDefinition(
    "text", "causal-LM text (--train_file / --dataset_name); loss and perplexity",
    lambda inputs: prepare_text_task(inputs.compare_args, inputs.data_args, inputs.model_args, inputs.training_args,
                                     inputs.saved_tokenizer_dir)))


def prepare_task(inputs: TaskInputs) -> PreparedTask:
    """The task `--task` names; without it, text when text data is given, else the embedded LIS task."""
    uses_text = not inputs.data_args.use_synthetic_task
    name = inputs.compare_args.task or ("text" if uses_text else "lis")
    if uses_text != (name == "text"):
        raise ValueError(f"--task {name}: --train_file / --validation_file / --dataset_name go with --task text only "
                         f"(tasks: {list(TASKS)}).")
    return TASKS[name].prepare(inputs)


__all__ = [
    "TASKS",
    "TOKENIZER_DIRNAME",
    "TaskDefinition",
    "TaskInputs",
    "prepare_task",
    "register_task",
    "PreparedTask",
    "load_named_tokenizer",
    "prepare_synthetic_task",
    "prepare_text_task",
    "special_token_fields",
    "train_bpe_tokenizer",
]
