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
from ..pretrain import DataTrainingArguments, build_lm_datasets, load_raw_datasets
from ..synthetic import VALIDATION_SEED, blind_guess_loss, build_lis_dataset, build_lis_tokenizer
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
    num_train_examples = compare_args.num_train_examples
    if num_train_examples is None:
        total_batch = (
            training_args.per_device_train_batch_size * training_args.gradient_accumulation_steps
            * training_args.world_size
        )
        num_train_examples = training_args.max_steps * total_batch if training_args.max_steps > 0 else 20_000
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
    return PreparedTask(
        tokenizer, eval_dataset, train_dataset_for, {**special_token_fields(tokenizer), "n_positions": task.block_length},
        "longest increasing subsequence", description, f"word-level, built in code ({len(tokenizer)} tokens)",
        task.block_length, blind_loss,
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


__all__ = [
    "TOKENIZER_DIRNAME",
    "PreparedTask",
    "load_named_tokenizer",
    "prepare_synthetic_task",
    "prepare_text_task",
    "special_token_fields",
    "train_bpe_tokenizer",
]
