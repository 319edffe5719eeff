"""The embedded default task of `energy-gpt compare`: longest increasing subsequence (LIS), generated in code.

An earlier version of the EnergyGPT paper (arXiv 2511.00907) evaluated its attention variants on the LIS task. It suits
a from-scratch solver comparison on a CPU: it needs no download, every label is exact, and solving it needs the
position-to-position comparisons attention is for (the LIS length at a position depends on all earlier smaller
numbers: `dp[i] = 1 + max(dp[j] for j < i if x[j] < x[i])`), so the solvers' different attention steps matter.

Each example is one line of causal-LM text:

    3 7 1 9 4 = 3

the numbers, `=`, then the length of their longest *strictly* increasing subsequence (here 3 7 9). The tokenizer is a
word-level `PreTrainedTokenizerFast` built in code (one token per number, `=`, and `<pad>` / `<bos>` / `<eos>` /
`<unk>`), and it frames every line as `<bos> ... <eos>`. Only the answer is scored: the numbers are uniformly random, so
their loss (about `log(max_value)` nats per token) would swamp the part that can be learned. Every example is padded to
the same length, so each step trains on exactly `batch_size * block_length` tokens.
"""

import bisect
import math
import random
from collections import Counter
from dataclasses import dataclass

from datasets import Dataset
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

PAD_TOKEN, BOS_TOKEN, EOS_TOKEN, UNK_TOKEN, SEPARATOR = "<pad>", "<bos>", "<eos>", "<unk>", "="
IGNORE_INDEX = -100  # label value the causal-LM loss skips
# Seeds of the example streams that do not depend on the training seed. Strings: `random.Random` hashes them, so they
# can never coincide with an integer training seed (a validation set equal to some seed's training set).
VALIDATION_SEED = "lis-validation"
BLIND_GUESS_SEED = "lis-answer-distribution"
BLIND_GUESS_EXAMPLES = 20_000


@dataclass(frozen=True)
class LISTask:
    """Shape of the generated examples. Numbers are drawn uniformly from `[0, max_value)`, lengths from
    `[min_length, max_length]`; duplicates are allowed (the subsequence must be strictly increasing)."""

    min_length: int = 4
    max_length: int = 10
    max_value: int = 16

    def __post_init__(self):
        if not 1 <= self.min_length <= self.max_length:
            raise ValueError(
                f"--lis_min_length ({self.min_length}) must be >= 1 and <= --lis_max_length ({self.max_length})."
            )
        if self.max_value < 2:
            raise ValueError(f"--lis_max_value must be >= 2, got {self.max_value}.")

    @property
    def block_length(self) -> int:
        """Tokens per padded example: <bos>, the numbers, `=`, the answer, <eos>."""
        return self.max_length + 4


def longest_increasing_subsequence_length(numbers: list[int]) -> int:
    """Length of the longest strictly increasing subsequence, O(n log n) (patience sorting)."""
    # tails[k] = smallest possible last element of a strictly increasing subsequence of length k + 1.
    tails: list[int] = []
    for number in numbers:
        position = bisect.bisect_left(tails, number)  # bisect_left: an equal number does not extend (strict)
        if position == len(tails):
            tails.append(number)
        else:
            tails[position] = number
    return len(tails)


def generate_lis_examples(task: LISTask, num_examples: int, seed: int | str) -> list[dict]:
    """`num_examples` random sequences with their LIS length; the same `seed` always gives the same examples."""
    rng = random.Random(seed)  # private generator: independent of (and not disturbing) the global RNG state
    examples = []
    for _ in range(num_examples):
        length = rng.randint(task.min_length, task.max_length)
        numbers = [rng.randrange(task.max_value) for _ in range(length)]
        examples.append({"numbers": numbers, "lis_length": longest_increasing_subsequence_length(numbers)})
    return examples


def answer_entropy(examples: list[dict]) -> float:
    """Entropy (nats) of the LIS lengths: the validation loss of a model that predicts the answer without reading
    the numbers. A loss below it means the model computes something about the sequence."""
    counts = Counter(example["lis_length"] for example in examples)
    total = sum(counts.values())
    return -sum(count / total * math.log(count / total) for count in counts.values())


def blind_guess_loss(task: LISTask) -> float:
    """The validation loss of a model that knows the answers' distribution but does not read the numbers, estimated
    from a large sample of its own (independent of every training seed)."""
    return answer_entropy(generate_lis_examples(task, BLIND_GUESS_EXAMPLES, seed=BLIND_GUESS_SEED))


def example_to_text(example: dict) -> str:
    return " ".join(map(str, example["numbers"])) + f" {SEPARATOR} {example['lis_length']}"


def build_lis_tokenizer(task: LISTask) -> PreTrainedTokenizerFast:
    """Word-level tokenizer: one token per number (values and answers share the tokens 0..max), built without files."""
    largest_number = max(task.max_value - 1, task.max_length)
    vocab = {token: index for index, token in enumerate([PAD_TOKEN, BOS_TOKEN, EOS_TOKEN, UNK_TOKEN, SEPARATOR])}
    vocab.update({str(number): len(vocab) + number for number in range(largest_number + 1)})
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK_TOKEN))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.post_processor = processors.TemplateProcessing(
        single=f"{BOS_TOKEN} $A {EOS_TOKEN}",
        special_tokens=[(BOS_TOKEN, vocab[BOS_TOKEN]), (EOS_TOKEN, vocab[EOS_TOKEN])],
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        unk_token=UNK_TOKEN,
        padding_side="right",
        model_max_length=task.block_length,
    )


def build_lis_dataset(
    task: LISTask, tokenizer: PreTrainedTokenizerFast, num_examples: int, seed: int | str
) -> Dataset:
    """Tokenized causal-LM dataset (`input_ids`, `attention_mask`, `labels`) in which only the answer is labelled."""
    examples = generate_lis_examples(task, num_examples, seed)
    encoded = tokenizer(
        [example_to_text(example) for example in examples],
        padding="max_length",
        max_length=task.block_length,
        truncation=False,
    )
    separator_id = tokenizer.convert_tokens_to_ids(SEPARATOR)
    labels = []
    for input_ids in encoded["input_ids"]:
        answer_position = input_ids.index(separator_id) + 1
        example_labels = [IGNORE_INDEX] * len(input_ids)
        # The model shifts labels itself: label[i] = input_ids[i] is predicted from the tokens before i.
        example_labels[answer_position] = input_ids[answer_position]
        labels.append(example_labels)
    return Dataset.from_dict(
        {"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"], "labels": labels}
    )


__all__ = [
    "BLIND_GUESS_SEED",
    "VALIDATION_SEED",
    "LISTask",
    "answer_entropy",
    "blind_guess_loss",
    "build_lis_dataset",
    "build_lis_tokenizer",
    "example_to_text",
    "generate_lis_examples",
    "longest_increasing_subsequence_length",
]
