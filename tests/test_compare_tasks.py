"""The generated tasks of `energy-gpt compare --task`: each generator against a reference with a known answer, its
chance level computed and checked by simulation, determinism per seed, and a tiny end-to-end run per task."""

import json
from collections import Counter

import numpy as np
import pytest

from test_compare import SHORT_BUDGET


def test_mqar_every_query_is_answered_by_the_value_paired_with_its_key():
    from energy_gpt.recipes.recall import MQARTask, generate_mqar
    from energy_gpt.recipes.synthetic import IGNORE_INDEX

    task = MQARTask(vocab_size=64, sequence_length=48, num_kv_pairs=6)
    inputs, labels = generate_mqar(task, 300, seed=5)
    assert inputs.shape == labels.shape == (300, 48)
    for row_inputs, row_labels in zip(inputs, labels):
        keys, values = row_inputs[0:12:2], row_inputs[1:12:2]
        assert len(set(keys)) == 6 and len(set(values)) == 6  # distinct keys, distinct values
        assert all(key < 32 for key in keys) and all(value >= 32 for value in values)
        pairs = dict(zip(keys, values))
        scored = [i for i, label in enumerate(row_labels) if label != IGNORE_INDEX]
        assert len(scored) == 6 and all(i >= 13 for i in scored)  # one query per key, after the pairs
        assert sorted(row_inputs[i - 1] for i in scored) == sorted(keys)  # every key queried once
        for i in scored:  # the answer: the value paired with the queried key earlier in the sequence
            assert row_labels[i] == pairs[row_inputs[i - 1]] == row_inputs[i]
    again, _ = generate_mqar(task, 300, seed=5)
    other, _ = generate_mqar(task, 300, seed=6)
    assert np.array_equal(inputs, again) and not np.array_equal(inputs, other)


def test_mqar_query_positions_follow_the_power_law():
    from energy_gpt.recipes.recall import MQARTask, generate_mqar
    from energy_gpt.recipes.synthetic import IGNORE_INDEX

    # power_a = 1 is uniform over the 28 query slots; a small power_a puts most queries early.
    def mean_slot(power_a: float) -> float:
        task = MQARTask(vocab_size=64, sequence_length=64, num_kv_pairs=4, power_a=power_a)
        _, labels = generate_mqar(task, 400, seed=1)
        rows, positions = np.nonzero(labels != IGNORE_INDEX)
        return float(np.mean((positions - 1 - 8) / 2))

    assert mean_slot(1.0) == pytest.approx(27 / 2, abs=1.0)
    assert mean_slot(0.01) < mean_slot(0.5) < mean_slot(1.0)


def test_mqar_chance_levels_match_a_simulated_guesser():
    from energy_gpt.recipes.recall import MQARTask, generate_mqar
    from energy_gpt.recipes.synthetic import IGNORE_INDEX

    task = MQARTask(vocab_size=32, sequence_length=32, num_kv_pairs=4)
    inputs, labels = generate_mqar(task, 4000, seed=2)
    rng = np.random.default_rng(0)
    scored = labels != IGNORE_INDEX
    blind = rng.integers(16, 32, size=labels.shape)  # any value token, without reading
    assert (blind[scored] == labels[scored]).mean() == pytest.approx(task.chance_accuracy, abs=0.01)
    context_values = inputs[:, 1:8:2]
    picked = context_values[np.arange(len(inputs))[:, None], rng.integers(0, 4, size=labels.shape)]
    assert (picked[scored] == labels[scored]).mean() == pytest.approx(task.context_guess_accuracy, abs=0.015)


def test_induction_labels_are_the_repeated_segment_and_chance_is_one_over_the_vocabulary():
    from energy_gpt.recipes.recall import InductionTask, generate_induction
    from energy_gpt.recipes.synthetic import IGNORE_INDEX

    task = InductionTask(vocab_size=10, segment_length=6, max_gap=5)
    inputs, labels = generate_induction(task, 3000, seed=3)
    assert inputs.shape == (3000, 17)
    starts = set()
    for row_inputs, row_labels in zip(inputs, labels):
        scored = [i for i, label in enumerate(row_labels) if label != IGNORE_INDEX]
        start = scored[0] - 1  # the repeat's first token is not scored
        starts.add(start)
        assert scored == list(range(start + 1, start + 6)) and 6 <= start <= 11
        assert list(row_inputs[start:start + 6]) == list(row_inputs[:6])  # the segment again
        assert all(row_labels[i] == row_inputs[i] == row_inputs[i - start] for i in scored)
    assert starts == set(range(6, 12))  # every gap from 0 to max_gap occurs
    scored = labels != IGNORE_INDEX
    guesses = np.random.default_rng(0).integers(0, 10, size=labels.shape)
    assert (guesses[scored] == labels[scored]).mean() == pytest.approx(task.chance_accuracy, abs=0.01)
    again, _ = generate_induction(task, 3000, seed=3)
    assert np.array_equal(inputs, again)


def test_lis_chance_is_the_most_frequent_answer():
    from energy_gpt.recipes.recall import majority_accuracy
    from energy_gpt.recipes.synthetic import LISTask, generate_lis_examples

    answers = [example["lis_length"] for example in generate_lis_examples(LISTask(), 2000, seed=9)]
    assert majority_accuracy(answers) == max(Counter(answers).values()) / 2000
    assert majority_accuracy([1, 1, 2, 3]) == 0.5


def test_token_datasets_map_task_tokens_through_the_tokenizer():
    from energy_gpt.recipes.recall import MQARTask, generate_mqar, numbered_tokenizer, token_dataset

    task = MQARTask(vocab_size=16, sequence_length=16, num_kv_pairs=2)
    inputs, labels = generate_mqar(task, 4, seed=1)
    tokenizer = numbered_tokenizer(16, 16)
    dataset = token_dataset(inputs, labels)
    assert len(tokenizer) == 20 and tokenizer.pad_token_id == 0
    for row, row_inputs, row_labels in zip(dataset, inputs, labels):
        assert tokenizer.decode(row["input_ids"]).split() == [str(token) for token in row_inputs]
        for label, expected in zip(row["labels"], row_labels):
            assert label == (-100 if expected == -100 else tokenizer.convert_tokens_to_ids(str(expected)))


def test_tasks_are_registered_and_validated():
    from energy_gpt.recipes.compare import CompareArguments
    from energy_gpt.recipes.compare.tasks import TASKS

    assert list(TASKS) == ["lis", "mqar", "induction", "icl_regression", "text"]
    with pytest.raises(ValueError, match=r"--task 'sudoku' is not a task; choose one of \['lis', 'mqar'"):
        CompareArguments(task="sudoku")
    with pytest.raises(ValueError, match="--mqar_sequence_length must be >= 4 \\* --mqar_num_kv_pairs"):
        CompareArguments(task="mqar", mqar_num_kv_pairs=8, mqar_sequence_length=16)
    with pytest.raises(ValueError, match="--induction_segment_length must be >= 2"):
        CompareArguments(task="induction", induction_segment_length=1)


@pytest.mark.parametrize("task, options", [
    ("mqar", ["--mqar_vocab_size", "16", "--mqar_sequence_length", "16", "--mqar_num_kv_pairs", "2"]),
    ("induction", ["--induction_vocab_size", "8", "--induction_segment_length", "4", "--induction_max_gap", "2"]),
])
def test_a_tiny_comparison_reports_the_task_metric_beside_its_chance(tmp_path, task, options):
    from energy_gpt.recipes.compare import main

    output_dir = tmp_path / task
    assert main(["--output_dir", str(output_dir), "--task", task, *options, "--solvers", "gd", "--seeds", "1",
                 *SHORT_BUDGET]) == 0
    report = json.loads((output_dir / "loss_curves.json").read_text())
    run = report["runs"]["gd"]["1"]
    assert 0.0 <= run["final_metric"] <= 1.0
    chance = {"mqar": 1 / 8, "induction": 1 / 8}[task]
    assert report["settings"]["chance"] == pytest.approx(chance)
    table = (output_dir / "comparison.md").read_text()
    assert "## Task metric: " in table and f"| {chance:.4f} |" in table and "- Metric: " in table


def test_a_preset_sets_task_and_shape_and_explicit_options_win(tmp_path):
    from energy_gpt.recipes.compare import prepare
    from energy_gpt.recipes.compare.arguments import PRESETS

    assert {"mqar-1layer", "mqar-2layer", "induction-1layer", "induction-2layer"} <= set(PRESETS)
    tiny_mqar = ["--mqar_vocab_size", "16", "--mqar_sequence_length", "16", "--mqar_num_kv_pairs", "2"]
    base = ["--output_dir", str(tmp_path / "out"), "--solvers", "gd", "--seeds", "1", *SHORT_BUDGET]
    comparison = prepare([*base, *tiny_mqar, "--preset", "mqar-2layer"], 0.0)
    # SHORT_BUDGET's --config_overrides (2 layers, width 16) come after the preset's and win where they overlap.
    assert comparison.task.name == "mqar" and comparison.base_config.n_embd == 16
    comparison = prepare([*base[:6], "--max_steps", "2", "--preset", "induction-1layer",
                          "--induction_vocab_size", "8", "--induction_segment_length", "4"], 0.0)
    assert comparison.task.name == "induction"
    assert (comparison.base_config.n_layer, comparison.base_config.n_embd, comparison.base_config.n_head) == (1, 64, 2)
    comparison = prepare([*base, "--preset", "mqar-1layer", "--task", "lis"], 0.0)  # --task wins
    assert comparison.task.name == "longest increasing subsequence"
    assert not (tmp_path / "out").exists()  # prepare writes nothing
