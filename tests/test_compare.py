"""`energy-gpt compare` and its embedded synthetic task (longest increasing subsequence), on tiny budgets."""

import csv
import json
import math
import random

import pytest
import torch

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
TINY_MODEL = "n_layer=1,n_embd=16,n_head=2"
# A run of a few seconds: tiny model, tiny task, 6 steps, evaluation every 3.
SHORT_BUDGET = [
    "--config_overrides", TINY_MODEL,
    "--lis_min_length", "3", "--lis_max_length", "5", "--lis_max_value", "8",
    "--num_validation_examples", "16",
    "--max_steps", "6", "--eval_steps", "3", "--logging_steps", "2",
    "--per_device_train_batch_size", "8", "--per_device_eval_batch_size", "16",
    "--disable_tqdm", "true", "--seed", "0",
]


def reference_lis_length(numbers: list[int]) -> int:
    """Independent O(n^2) dynamic programme: best[i] = longest strictly increasing subsequence ending at i."""
    best = []
    for i, number in enumerate(numbers):
        best.append(1 + max((best[j] for j in range(i) if numbers[j] < number), default=0))
    return max(best, default=0)


# ---------------------------------------------------------------------------------------------------------------------
# The synthetic task


@pytest.mark.parametrize(
    "numbers, expected",
    [([], 0), ([5], 1), ([3, 3, 3], 1), ([4, 3, 2, 1], 1), ([1, 2, 3, 4], 4), ([3, 7, 1, 9, 4], 3),
     ([2, 2, 3, 3, 4], 3), ([0, 8, 4, 12, 2, 10, 6, 14, 1, 9], 4)],
)
def test_lis_length_known_cases(numbers, expected):
    from energy_gpt.recipes.synthetic import longest_increasing_subsequence_length

    assert longest_increasing_subsequence_length(numbers) == expected == reference_lis_length(numbers)


def test_lis_length_matches_quadratic_reference_on_random_sequences():
    from energy_gpt.recipes.synthetic import longest_increasing_subsequence_length

    rng = random.Random(1234)
    for _ in range(500):
        numbers = [rng.randrange(rng.choice([2, 5, 40])) for _ in range(rng.randint(0, 25))]  # many duplicates too
        assert longest_increasing_subsequence_length(numbers) == reference_lis_length(numbers), numbers


def test_generated_examples_are_deterministic_per_seed_and_labelled_correctly():
    from energy_gpt.recipes.synthetic import LISTask, generate_lis_examples

    task = LISTask(min_length=4, max_length=9, max_value=12)
    first = generate_lis_examples(task, 200, seed=7)
    assert first == generate_lis_examples(task, 200, seed=7)
    assert first != generate_lis_examples(task, 200, seed=8)
    for example in first:
        assert 4 <= len(example["numbers"]) <= 9
        assert all(0 <= number < 12 for number in example["numbers"])
        assert example["lis_length"] == reference_lis_length(example["numbers"])
    # The global RNG is left alone (the generator has its own), so it cannot shift the training seed.
    random.seed(0)
    expected_next = random.random()
    random.seed(0)
    generate_lis_examples(task, 10, seed=3)
    assert random.random() == expected_next


def test_dataset_labels_only_the_answer_and_round_trips_through_the_tokenizer():
    from energy_gpt.recipes.synthetic import (
        IGNORE_INDEX,
        LISTask,
        build_lis_dataset,
        build_lis_tokenizer,
    )

    task = LISTask(min_length=3, max_length=7, max_value=10)
    tokenizer = build_lis_tokenizer(task)
    dataset = build_lis_dataset(task, tokenizer, num_examples=50, seed=3)
    for row in dataset:
        ids, labels, mask = row["input_ids"], row["labels"], row["attention_mask"]
        assert len(ids) == len(labels) == len(mask) == task.block_length
        text = tokenizer.decode(ids, skip_special_tokens=True).split()
        numbers, answer = [int(token) for token in text[: text.index("=")]], int(text[-1])
        assert answer == reference_lis_length(numbers)
        labelled = [i for i, label in enumerate(labels) if label != IGNORE_INDEX]
        assert len(labelled) == 1 and labels[labelled[0]] == ids[labelled[0]]
        assert tokenizer.convert_ids_to_tokens(ids[labelled[0]]) == str(answer)
        assert ids[0] == tokenizer.bos_token_id and ids[sum(mask) - 1] == tokenizer.eos_token_id
        assert all(token == tokenizer.pad_token_id for token in ids[sum(mask):])


def test_lis_task_rejects_bad_shapes():
    from energy_gpt.recipes.synthetic import LISTask

    with pytest.raises(ValueError, match="--lis_min_length"):
        LISTask(min_length=5, max_length=4)
    with pytest.raises(ValueError, match="--lis_max_value"):
        LISTask(max_value=1)


# ---------------------------------------------------------------------------------------------------------------------
# The comparison


def test_every_solver_starts_from_the_same_weights():
    from energy_gpt.recipes.arguments import ModelArguments
    from energy_gpt.recipes.compare import build_solver_model
    from energy_gpt.recipes.synthetic import LISTask, build_lis_tokenizer

    tokenizer = build_lis_tokenizer(LISTask())
    model_args = ModelArguments(config_overrides=TINY_MODEL)
    fields = {"vocab_size": len(tokenizer), "n_positions": LISTask().block_length}
    reference = build_solver_model("gd", model_args, tokenizer, fields, seed=5).state_dict()
    for solver in ("momentum", "newton"):
        state = build_solver_model(solver, model_args, tokenizer, fields, seed=5).state_dict()
        shared = set(reference) & set(state)
        assert shared == set(reference)  # the solver only adds its own scalars
        assert all(torch.equal(reference[name], state[name]) for name in shared)
    other_seed = build_solver_model("gd", model_args, tokenizer, fields, seed=6).state_dict()
    assert not torch.equal(reference["transformer.wte.weight"], other_seed["transformer.wte.weight"])


def test_steps_to_reach_and_table():
    from energy_gpt.recipes.compare import (
        NOT_REACHED,
        render_table,
        steps_to_reach,
        summarize,
    )

    curve = [{"step": 0, "loss": 3.0}, {"step": 10, "loss": 1.5}, {"step": 20, "loss": 1.2}]
    assert steps_to_reach(curve, 1.5) == 10
    assert steps_to_reach(curve, 1.0) is None
    run = {"tokens_per_second": 1000.0, "peak_memory_mib": 1.0}
    results = {
        "gd": {**run, "validation": curve, "final_validation_loss": 1.2},
        "nag": {**run, "validation": [{"step": 0, "loss": 3.0}, {"step": 10, "loss": 1.1}], "final_validation_loss": 1.1},
        "newton": {**run, "validation": [{"step": 0, "loss": 3.0}, {"step": 20, "loss": 1.3}], "final_validation_loss": 1.3},
    }
    summarize(results)
    assert [results[s]["steps_to_reference_final_loss"] for s in results] == [20, 10, None]
    table = render_table(results, [], "RSS")
    assert "| nag | 1.1000 | 10 |" in table and f"| newton | 1.3000 | {NOT_REACHED} |" in table
    # Without a gd run the column cannot be filled.
    del results["gd"]
    summarize(results)
    assert "n/a (no gd run)" in render_table(results, [], "RSS")


def test_compare_short_run_writes_table_curves_and_plot(tmp_path, capsys):
    from PIL import Image

    from energy_gpt.recipes.compare import main

    output_dir = tmp_path / "compare"
    solvers = ["gd", "momentum", "newton_light"]
    assert main(["--output_dir", str(output_dir), "--solvers", ",".join(solvers), *SHORT_BUDGET]) == 0

    assert sorted(path.name for path in output_dir.iterdir()) == sorted(
        ["comparison.md", "loss_curves.csv", "loss_curves.json", "loss_curves.png"]
    )
    printed = capsys.readouterr().out
    assert f"Comparison table: {output_dir / 'comparison.md'}" in printed
    assert f"Loss curves plot: {output_dir / 'loss_curves.png'}" in printed

    png = (output_dir / "loss_curves.png").read_bytes()
    assert png.startswith(PNG_SIGNATURE)
    with Image.open(output_dir / "loss_curves.png") as image:
        image.verify()
    with Image.open(output_dir / "loss_curves.png") as image:
        assert image.format == "PNG" and image.size[0] > 300 and image.size[1] > 200

    summary = json.loads((output_dir / "loss_curves.json").read_text())
    assert list(summary["solvers"]) == solvers
    assert summary["settings"]["max_steps"] == 6
    for solver, run in summary["solvers"].items():
        assert [point["step"] for point in run["validation"]] == [0, 3, 6], solver
        assert [point["step"] for point in run["train"]] == [2, 4, 6], solver
        losses = [point["loss"] for point in run["train"] + run["validation"]]
        assert all(math.isfinite(loss) and loss > 0 for loss in losses), solver
        assert run["final_validation_loss"] == run["validation"][-1]["loss"]
        assert run["train_tokens"] == 6 * 8 * (5 + 4)  # steps x batch x block length (5 numbers + 4 framing tokens)
        assert run["tokens_per_second"] > 0 and run["peak_memory_mib"] >= 0
    # The step-0 losses differ only through the solver (same initial weights), and training lowers the loss.
    gd = summary["solvers"]["gd"]
    assert gd["validation"][-1]["loss"] < gd["validation"][0]["loss"]
    assert gd["steps_to_reference_final_loss"] is not None

    with open(output_dir / "loss_curves.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert {row["solver"] for row in rows} == set(solvers)
    assert len(rows) == len(solvers) * (3 + 3)
    assert all(math.isfinite(float(row["loss"])) for row in rows)
    for row in rows:  # the CSV holds the same numbers as the JSON
        curve = summary["solvers"][row["solver"]][row["split"]]
        assert {"step": int(row["step"]), "loss": float(row["loss"])} in curve

    table = (output_dir / "comparison.md").read_text()
    for solver in solvers:
        assert f"| {solver} | {summary['solvers'][solver]['final_validation_loss']:.4f} |" in table
    assert "steps to reach gd's final validation loss" in table and "peak memory (MiB)" in table


@pytest.mark.parametrize("source_flag", ["--train_file", "--dataset_name"])
def test_compare_on_text(tmp_path, source_flag):
    """--train_file / --dataset_name switch to causal-LM text (here lines of numbers, read with a saved word-level
    tokenizer; --dataset_name gets a local dataset folder, which `datasets` resolves like a Hub id, offline)."""
    from energy_gpt.recipes.compare import main
    from energy_gpt.recipes.synthetic import (
        LISTask,
        build_lis_tokenizer,
        example_to_text,
        generate_lis_examples,
    )

    task = LISTask(min_length=3, max_length=6, max_value=8)
    tokenizer_dir = tmp_path / "tokenizer"
    build_lis_tokenizer(task).save_pretrained(tokenizer_dir)
    (tmp_path / "corpus").mkdir()
    train_file = tmp_path / "corpus" / "train.txt"
    train_file.write_text("\n".join(example_to_text(e) for e in generate_lis_examples(task, 300, seed=0)) + "\n")
    output_dir = tmp_path / "compare-text"
    source = str(train_file if source_flag == "--train_file" else train_file.parent)
    argv = ["--output_dir", str(output_dir), "--solvers", "gd,nag", source_flag, source,
            "--tokenizer_name", str(tokenizer_dir), "--block_size", "16", "--validation_split_percentage", "10",
            "--config_overrides", f"{TINY_MODEL},vocab_size={len(build_lis_tokenizer(task))},n_positions=16",
            "--max_steps", "4", "--eval_steps", "2", "--logging_steps", "2", "--per_device_train_batch_size", "4",
            "--disable_tqdm", "true", "--cache_dir", str(tmp_path / "datasets-cache")]
    assert main(argv) == 0
    summary = json.loads((output_dir / "loss_curves.json").read_text())
    assert summary["settings"]["task"].startswith(f"causal LM on {source}: ")
    for run in summary["solvers"].values():
        assert [point["step"] for point in run["validation"]] == [0, 2, 4]
        assert run["train_tokens"] == 4 * 4 * 16
        assert all(math.isfinite(point["loss"]) for point in run["train"] + run["validation"])


def test_compare_refuses_bad_arguments_and_keeps_existing_results(tmp_path, monkeypatch):
    from energy_gpt.recipes.compare import main

    output_dir = tmp_path / "compare"
    with pytest.raises(ValueError, match=r"--solvers 'gd,adam'.*allowed values: \['gd', 'momentum'"):
        main(["--output_dir", str(output_dir), "--solvers", "gd,adam"])
    with pytest.raises(ValueError, match="names a solver twice"):
        main(["--output_dir", str(output_dir), "--solvers", "gd,gd"])
    with pytest.raises(ValueError, match="--attention_solver"):
        main(["--output_dir", str(output_dir), "--attention_solver", "nag"])
    with pytest.raises(ValueError, match="--model_name_or_path is not supported"):
        main(["--output_dir", str(output_dir), "--model_name_or_path", "openai-community/gpt2"])

    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(RuntimeError, match="single process"):
        main(["--output_dir", str(output_dir)])
    monkeypatch.delenv("WORLD_SIZE")

    output_dir.mkdir()
    (output_dir / "comparison.md").write_text("previous results")
    with pytest.raises(FileExistsError, match="--overwrite"):
        main(["--output_dir", str(output_dir), "--solvers", "gd", *SHORT_BUDGET])
    # A run that fails half-way (here: a model shape the config rejects) leaves the previous results untouched.
    with pytest.raises(ValueError, match="n_head"):
        main(["--output_dir", str(output_dir), "--solvers", "gd", "--overwrite", *SHORT_BUDGET,
              "--config_overrides", "n_layer=1,n_embd=16,n_head=3"])
    assert (output_dir / "comparison.md").read_text() == "previous results"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["compare"]  # no staging folder left behind
