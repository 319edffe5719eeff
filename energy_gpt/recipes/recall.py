"""Recall tasks of `energy-gpt compare`, generated in code and deterministic per seed: multi-query associative recall
(MQAR, as Zoology defines it) and induction (copying a repeated segment). Both are sequences of token ids with labels
only where an answer is scored (`IGNORE_INDEX` elsewhere); the metric is the accuracy on those positions.

MQAR (Arora et al. 2023, "Zoology: Measuring and Improving Recall in Efficient Language Models", the generator
`multiquery_ar` of HazyResearch/zoology): keys come from the first half of the vocabulary and values from the second;
a sequence starts with `num_kv_pairs` distinct key-value pairs `k1 v1 k2 v2 ...`, then every key is queried once, at
an even offset of the rest of the sequence drawn with probability proportional to `power_a * x ** (power_a - 1)`
(x = 1, 2, ...: with a small `power_a` most queries come early, a few far away), each followed by its value; the other
positions hold random tokens. The model is scored on predicting each queried key's value (the token after the query).

Induction: a random segment of `segment_length` tokens, a random number (0 to `max_gap`) of random tokens, then the
same segment again, then random tokens to the fixed length; the model is scored on every token of the repeat after its
first (which no model can know), i.e. on continuing a sequence it has seen before. The gap varies, so the copy is not
at a fixed distance that position embeddings alone could find: the model has to look up what followed the current
token earlier (an induction head).
"""

import math
from dataclasses import dataclass

import numpy as np
from datasets import Dataset
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from .synthetic import IGNORE_INDEX

SPECIAL_TOKENS = ("<pad>", "<bos>", "<eos>", "<unk>")
FIRST_TOKEN_ID = len(SPECIAL_TOKENS)  # task token t has id FIRST_TOKEN_ID + t


def numbered_tokenizer(num_tokens: int, model_max_length: int) -> PreTrainedTokenizerFast:
    """Word-level tokenizer of the task tokens "0" .. "num_tokens - 1" after the four special tokens (pad first)."""
    vocab = {token: index for index, token in enumerate(SPECIAL_TOKENS)}
    vocab.update({str(token): FIRST_TOKEN_ID + token for token in range(num_tokens)})
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", bos_token="<bos>", eos_token="<eos>",
                                   unk_token="<unk>", model_max_length=model_max_length)


def _rng(seed: int | str) -> np.random.Generator:
    """A private generator per (task, seed): a string seed (the validation set's) is hashed stably."""
    if isinstance(seed, str):
        seed = int.from_bytes(seed.encode(), "little") % 2**63
    return np.random.default_rng(seed)


@dataclass(frozen=True)
class MQARTask:
    """Shape of the MQAR sequences. Zoology's smallest configurations use vocab 8192, sequence length 64 and 4 to 16
    pairs; the defaults here keep the vocabulary small (256) so a CPU run takes seconds, not minutes."""

    vocab_size: int = 256
    sequence_length: int = 64
    num_kv_pairs: int = 8
    power_a: float = 0.01

    def __post_init__(self):
        if self.vocab_size < 4 or self.vocab_size % 2:
            raise ValueError(f"--mqar_vocab_size must be an even number >= 4, got {self.vocab_size}.")
        if not 1 <= self.num_kv_pairs < self.vocab_size // 2:
            raise ValueError(f"--mqar_num_kv_pairs must be in 1..{self.vocab_size // 2 - 1} (distinct keys from half "
                             f"the vocabulary), got {self.num_kv_pairs}.")
        if self.sequence_length < 4 * self.num_kv_pairs:
            raise ValueError(f"--mqar_sequence_length must be >= 4 * --mqar_num_kv_pairs ({4 * self.num_kv_pairs}: the "
                             f"pairs, then a key and its value per query), got {self.sequence_length}.")
        if not 0 < self.power_a <= 1:
            raise ValueError(f"--mqar_power_a must be in (0, 1], got {self.power_a}.")

    @property
    def chance_accuracy(self) -> float:
        """Guessing a value without reading the sequence: one of vocab_size / 2 value tokens."""
        return 1 / (self.vocab_size // 2)

    @property
    def context_guess_accuracy(self) -> float:
        """Guessing one of the sequence's own values without matching the key."""
        return 1 / self.num_kv_pairs


def generate_mqar(task: MQARTask, num_examples: int, seed: int | str) -> tuple[np.ndarray, np.ndarray]:
    """(input ids, labels) of shape (num_examples, sequence_length), in task token numbers (0 .. vocab_size - 1) and
    IGNORE_INDEX; labels[i] is the value at position i where a query's key is at i - 1 (causal-LM convention: the
    model predicts labels[i] from the tokens before i)."""
    rng = _rng(seed)
    half, pairs, length = task.vocab_size // 2, task.num_kv_pairs, task.sequence_length
    context = 2 * pairs
    space = (length - context) // 2  # query slots: even offsets after the pairs, each a key and its value
    gap_weights = task.power_a * np.arange(1, space + 1, dtype=np.float64) ** (task.power_a - 1)
    gap_weights /= gap_weights.sum()
    inputs = rng.integers(0, task.vocab_size, size=(num_examples, length))  # the non-query positions: random tokens
    labels = np.full((num_examples, length), IGNORE_INDEX, dtype=np.int64)
    for row in range(num_examples):
        keys = rng.choice(half, size=pairs, replace=False)
        values = half + rng.choice(half, size=pairs, replace=False)
        inputs[row, 0:context:2], inputs[row, 1:context:2] = keys, values
        slots = rng.choice(space, size=pairs, replace=False, p=gap_weights)
        key_positions = context + 2 * slots
        inputs[row, key_positions], inputs[row, key_positions + 1] = keys, values
        labels[row, key_positions + 1] = values
    return inputs, labels


@dataclass(frozen=True)
class InductionTask:
    """A random segment of `segment_length` tokens from `vocab_size`, a gap of 0 to `max_gap` random tokens, then the
    segment again."""

    vocab_size: int = 64
    segment_length: int = 16
    max_gap: int = 16

    def __post_init__(self):
        if self.vocab_size < 2:
            raise ValueError(f"--induction_vocab_size must be >= 2, got {self.vocab_size}.")
        if self.segment_length < 2:
            raise ValueError(f"--induction_segment_length must be >= 2, got {self.segment_length}.")
        if self.max_gap < 0:
            raise ValueError(f"--induction_max_gap must be >= 0, got {self.max_gap}.")

    @property
    def sequence_length(self) -> int:
        return 2 * self.segment_length + self.max_gap

    @property
    def chance_accuracy(self) -> float:
        return 1 / self.vocab_size


def generate_induction(task: InductionTask, num_examples: int, seed: int | str) -> tuple[np.ndarray, np.ndarray]:
    """(input ids, labels): the segment, a random gap, the segment again, random tokens to the end; labels on the
    repeat's tokens after its first (IGNORE_INDEX elsewhere)."""
    rng = _rng(seed)
    length = task.segment_length
    inputs = rng.integers(0, task.vocab_size, size=(num_examples, task.sequence_length))
    labels = np.full_like(inputs, IGNORE_INDEX)
    starts = length + rng.integers(0, task.max_gap + 1, size=num_examples)
    for row, start in enumerate(starts):
        inputs[row, start:start + length] = inputs[row, :length]
        labels[row, start + 1:start + length] = inputs[row, 1:length]
    return inputs, labels


def token_dataset(inputs: np.ndarray, labels: np.ndarray) -> Dataset:
    """Task token numbers -> tokenizer ids (`numbered_tokenizer`), every position attended."""
    ids = inputs + FIRST_TOKEN_ID
    shifted_labels = np.where(labels == IGNORE_INDEX, IGNORE_INDEX, labels + FIRST_TOKEN_ID)
    return Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": np.ones_like(ids).tolist(),
                              "labels": shifted_labels.tolist()})


def majority_accuracy(answers: list[int]) -> float:
    """Accuracy of always giving the most frequent answer."""
    values, counts = np.unique(np.asarray(answers), return_counts=True)
    return float(counts.max() / counts.sum()) if len(values) else math.nan


__all__ = [
    "FIRST_TOKEN_ID",
    "InductionTask",
    "MQARTask",
    "generate_induction",
    "generate_mqar",
    "majority_accuracy",
    "numbered_tokenizer",
    "token_dataset",
]
