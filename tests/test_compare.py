"""`energy-gpt compare` and its embedded synthetic task (longest increasing subsequence), on tiny budgets: arguments,
tokenizers, a multi-seed comparison checked against a hand computation, reproducibility, --baseline_dir, and an
interrupted comparison resumed."""

import csv
import itertools
import json
import logging
import math
import os
import random
import signal
import statistics

import pytest
import torch
from conftest import SHARED_DATA

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
TINY_MODEL = "n_layer=2,n_embd=16,n_head=2"
# A run of a few seconds: tiny model, tiny task, 6 steps, evaluation every 3.
SHORT_BUDGET = [
    "--config_overrides", TINY_MODEL,
    "--lis_min_length", "3", "--lis_max_length", "5", "--lis_max_value", "8",
    "--num_validation_examples", "16",
    "--max_steps", "6", "--eval_steps", "3", "--logging_steps", "2",
    "--per_device_train_batch_size", "8", "--per_device_eval_batch_size", "16",
    "--disable_tqdm", "true",
]
TINY_SOLVERS = ["gd", "nag:momentum_beta=0.25", "newton_light"]


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


def test_blind_guess_and_validation_set_do_not_depend_on_the_training_seed():
    from energy_gpt.recipes.synthetic import (
        VALIDATION_SEED,
        LISTask,
        answer_entropy,
        blind_guess_loss,
        generate_lis_examples,
    )

    task = LISTask(min_length=3, max_length=5, max_value=8)
    assert blind_guess_loss(task) == blind_guess_loss(task)
    assert abs(blind_guess_loss(task) - answer_entropy(generate_lis_examples(task, 5000, seed=1))) < 0.02
    validation = generate_lis_examples(task, 50, seed=VALIDATION_SEED)
    assert all(validation != generate_lis_examples(task, 50, seed=seed) for seed in range(5))


# ---------------------------------------------------------------------------------------------------------------------
# Arguments: solvers, per-solver overrides, config overrides, seeds


def test_config_override_values_are_typed():
    from energy_gpt.recipes.compare import parse_config_overrides

    parsed = parse_config_overrides("n_layer=2,resid_pdrop=0.5,learn_solver_params=false,pad_token_id=none,"
                                    "activation_function=gelu,attention_solver=[gd,nag]", "--config_overrides")
    assert parsed == {"n_layer": 2, "resid_pdrop": 0.5, "learn_solver_params": False, "pad_token_id": None,
                      "activation_function": "gelu", "attention_solver": ["gd", "nag"]}
    with pytest.raises(ValueError, match=r"--config_overrides: 'n_layer' is not of the form field=value"):
        parse_config_overrides("n_layer", "--config_overrides")


def test_any_config_field_can_be_overridden_or_the_error_names_it():
    from energy_gpt import EnergyGPTConfig
    from energy_gpt.recipes.compare import apply_config_fields

    config = apply_config_fields(EnergyGPTConfig(), {"pad_token_id": 0, "resid_pdrop": 0, "n_inner": 64}, "--flag")
    assert (config.pad_token_id, config.resid_pdrop, config.n_inner) == (0, 0.0, 64)
    assert isinstance(config.resid_pdrop, float)
    with pytest.raises(ValueError, match=r"--flag: 'pad_tokn_id' is not a field of EnergyGPTConfig; did you mean "
                                         r"pad_token_id"):
        apply_config_fields(EnergyGPTConfig(), {"pad_tokn_id": 0}, "--flag")
    with pytest.raises(ValueError, match=r"--flag: .*`n_head` \(5\)"):
        apply_config_fields(EnergyGPTConfig(), {"n_head": 5}, "--flag")
    with pytest.raises(ValueError, match="--flag: `resid_pdrop` must be a float in"):
        apply_config_fields(EnergyGPTConfig(), {"resid_pdrop": "high"}, "--flag")


def test_solver_entries_are_whatever_the_config_accepts_with_their_own_overrides():
    from energy_gpt.recipes.compare import CompareArguments, parse_solver_specs

    specs = parse_solver_specs("gd, nag+newton_light ,momentum:momentum_form=ema:momentum_beta=0.25")
    assert [(spec.label, spec.solver, spec.overrides) for spec in specs] == [
        ("gd", "gd", {}), ("nag+newton_light", "nag+newton_light", {}),
        ("momentum:momentum_form=ema:momentum_beta=0.25", "momentum", {"momentum_form": "ema", "momentum_beta": 0.25}),
    ]
    assert [spec.is_reference for spec in specs] == [True, False, False]
    assert ":" not in specs[2].dirname
    with pytest.raises(ValueError, match=r"--solvers entry 'adam': `attention_solver` must be one of"):
        CompareArguments(solvers="gd,adam")
    with pytest.raises(ValueError, match=r"--solvers entry 'momentum:momentum_betaa=0.3': 'momentum_betaa' is not a "
                                         r"field.*momentum_beta"):
        CompareArguments(solvers="momentum:momentum_betaa=0.3")
    with pytest.raises(ValueError, match=r"--solvers entry 'nag:momentum_beta=2'.*momentum_beta"):
        CompareArguments(solvers="nag:momentum_beta=2")
    with pytest.raises(ValueError, match="names an entry twice"):
        CompareArguments(solvers="gd,gd")
    with pytest.raises(ValueError, match="--seeds or --num_seeds, not both"):
        CompareArguments(seeds="1,2", num_seeds=2)
    with pytest.raises(ValueError, match="comma-separated integers"):
        CompareArguments(seeds="1,x")
    with pytest.raises(ValueError, match="--resume .* or --overwrite"):
        CompareArguments(resume=True, overwrite=True)
    assert CompareArguments(seeds="7,3").seed_list(42) == [7, 3]
    assert CompareArguments(num_seeds=3).seed_list(42) == [42, 43, 44]
    assert CompareArguments().seed_list(5) == [5, 6]


def test_model_takes_vocabulary_and_special_tokens_from_the_tokenizer_unless_overridden():
    from energy_gpt.recipes.arguments import ModelArguments
    from energy_gpt.recipes.compare import (
        PreparedTask,
        build_base_config,
        build_run_config,
        parse_solver_specs,
    )
    from energy_gpt.recipes.synthetic import LISTask, build_lis_tokenizer

    tokenizer = build_lis_tokenizer(LISTask())
    fields = {"vocab_size": len(tokenizer), "bos_token_id": tokenizer.bos_token_id,
              "eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id, "n_positions": 14}
    task = PreparedTask(tokenizer, None, None, fields, "t", "t", "t", tokens_per_sequence=14)
    config = build_base_config(ModelArguments(config_overrides=TINY_MODEL), task)
    assert (config.vocab_size, config.bos_token_id, config.eos_token_id, config.pad_token_id, config.n_positions) == (
        len(tokenizer), tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id, 14)
    overridden = build_base_config(ModelArguments(config_overrides=f"{TINY_MODEL},pad_token_id=3,vocab_size=64"), task)
    assert (overridden.pad_token_id, overridden.vocab_size) == (3, 64)
    with pytest.raises(ValueError, match="vocab_size=8 is smaller than the tokenizer's"):
        build_base_config(ModelArguments(config_overrides=f"{TINY_MODEL},vocab_size=8"), task)
    with pytest.raises(ValueError, match="n_positions=8 is shorter than the 14-token sequences"):
        build_base_config(ModelArguments(config_overrides=f"{TINY_MODEL},n_positions=8"), task)
    run_config = build_run_config(config, parse_solver_specs("nag:momentum_beta=0.25")[0])
    assert (run_config.attention_solver, run_config.momentum_beta, config.attention_solver) == ("nag", 0.25, "gd")


def test_every_solver_of_a_seed_starts_from_the_same_weights():
    from transformers import set_seed

    from energy_gpt import EnergyGPTForCausalLM
    from energy_gpt.recipes.arguments import ModelArguments
    from energy_gpt.recipes.common import build_model
    from energy_gpt.recipes.compare import (
        PreparedTask,
        build_base_config,
        build_run_config,
        parse_solver_specs,
    )
    from energy_gpt.recipes.synthetic import LISTask, build_lis_tokenizer

    tokenizer = build_lis_tokenizer(LISTask())
    task = PreparedTask(tokenizer, None, None, {"vocab_size": len(tokenizer), "n_positions": 14}, "t", "t", "t", 14)
    model_args = ModelArguments(config_overrides=TINY_MODEL)
    base = build_base_config(model_args, task)

    def initial_weights(solver: str, seed: int) -> dict:
        set_seed(seed)  # what train_one_run does right before building the model
        config = build_run_config(base, parse_solver_specs(solver)[0])
        return build_model(EnergyGPTForCausalLM, model_args, config, tokenizer).state_dict()

    reference = initial_weights("gd", 5)
    for solver in ("momentum", "newton", "dense"):
        state = initial_weights(solver, 5)
        assert set(reference) <= set(state)  # the solver only adds its own scalars
        assert all(torch.equal(reference[name], state[name]) for name in reference), solver
    assert not torch.equal(reference["transformer.wte.weight"], initial_weights("gd", 6)["transformer.wte.weight"])


# ---------------------------------------------------------------------------------------------------------------------
# Tokenizers for text


def test_tokenizer_folders_and_clear_errors(tmp_path):
    from energy_gpt.recipes.arguments import ModelArguments
    from energy_gpt.recipes.compare import load_named_tokenizer

    gpt2_files = SHARED_DATA / "gpt2-tokenizer"
    if gpt2_files.is_dir():  # GPT-2's original files (encoder.json, vocab.bpe), as in ../shared/data
        tokenizer = load_named_tokenizer(ModelArguments(tokenizer_name=str(gpt2_files)))
        assert len(tokenizer) == 50257 and tokenizer("Hello world")["input_ids"] == [15496, 995]
        assert tokenizer.eos_token_id == tokenizer.pad_token_id == 50256
    with pytest.raises(ValueError, match=r"--tokenizer_name '.*nowhere': no tokenizer could be loaded.*"
                                         r"--tokenizer_vocab_size"):
        load_named_tokenizer(ModelArguments(tokenizer_name=str(tmp_path / "nowhere")))


def english_corpus(path, lines: int = 400):
    rng = random.Random(0)
    words = ["the", "king", "and", "queen", "of", "england", "spoke", "to", "the", "people", "about", "war", "peace", "bread", "and", "the", "river", "that", "ran", "through", "the", "old", "town", "where", "children", "played"]
    path.write_text("\n".join(" ".join(rng.choice(words) for _ in range(rng.randint(5, 15))) for _ in range(lines)))
    return path


def test_text_without_tokenizer_trains_a_bpe_and_the_model_matches_it(tmp_path, caplog):
    from transformers import AutoTokenizer

    from energy_gpt.recipes.compare import main

    train_file = english_corpus(tmp_path / "train.txt")
    output_dir = tmp_path / "text"
    argv = ["--output_dir", str(output_dir), "--solvers", "gd", "--num_seeds", "1", "--train_file", str(train_file),
            "--tokenizer_vocab_size", "300", "--block_size", "16", "--config_overrides", "n_layer=1,n_embd=16,n_head=2",
            "--max_steps", "4", "--eval_steps", "2", "--logging_steps", "2", "--per_device_train_batch_size", "4",
            "--disable_tqdm", "true", "--cache_dir", str(tmp_path / "datasets-cache")]
    with caplog.at_level(logging.INFO, logger="energy_gpt.recipes.compare"):
        assert main(argv) == 0
    assert "trained a byte-level BPE of 300 tokens" in caplog.text and "tokenizer/" in caplog.text
    tokenizer = AutoTokenizer.from_pretrained(output_dir / "tokenizer")
    assert len(tokenizer) == 300 and tokenizer.eos_token == "<|endoftext|>"
    report = json.loads((output_dir / "loss_curves.json").read_text())
    model = report["settings"]["model"]
    assert (model["vocab_size"], model["n_positions"], model["eos_token_id"], model["pad_token_id"]) == (
        300, 16, tokenizer.eos_token_id, tokenizer.pad_token_id)
    run = report["runs"]["gd"]["42"]
    assert run["train_tokens"] == 4 * 4 * 16
    # n_embd 16, 2 heads, 1 layer: embeddings (300 + 16 positions) x 16, tied output, one block, final norm.
    block = 2 * 16 + 16 * 48 + 48 + 16 * 16 + 16 + 2 * 16 + 16 * 64 + 64 + 64 * 16 + 16
    assert run["num_parameters"] == (300 + 16) * 16 + block + 2 * 16
    table = (output_dir / "comparison.md").read_text()
    assert "byte-level BPE of 300 tokens trained on the training split" in table and "model vocabulary 300" in table
    assert "one seed: no interval, no verdict" not in table  # gd is the reference itself
    assert f"| gd | {run['num_parameters']:,} | " in table
    # Training FLOPs estimate, by hand: 3 x (2 x matrix weights + 4 n_layer n_ctx n_embd) per token. Matrix weights:
    # the tied embedding / output projection 300 x 16, c_attn 16 x 48, c_proj 16 x 16, c_fc 16 x 64, c_proj 64 x 16.
    matrix_weights = 300 * 16 + 16 * 48 + 16 * 16 + 16 * 64 + 64 * 16
    assert run["training_flops_estimate"] == 3 * (2 * matrix_weights + 4 * 1 * 16 * 16) * run["train_tokens"]
    # FlopCounterMode's count leaves out the fused CPU attention kernel (no attention mask here): the estimate is what
    # the table shows.
    assert 0 < run["training_flops"] <= run["training_flops_estimate"]


# ---------------------------------------------------------------------------------------------------------------------
# A tiny multi-seed comparison, and what it writes


@pytest.fixture(scope="module")
def tiny_comparison(tmp_path_factory):
    """gd, nag with its own beta and newton_light, seeds 3 and 4, each with its `solver_report`."""
    from energy_gpt.recipes.compare import main

    output_dir = tmp_path_factory.mktemp("tiny") / "compare"
    assert main(["--output_dir", str(output_dir), "--solvers", ",".join(TINY_SOLVERS), "--seeds", "3,4",
                 *SHORT_BUDGET]) == 0
    return output_dir


def test_multi_seed_run_writes_per_seed_runs_table_curves_and_band_plot(tiny_comparison):
    from PIL import Image

    output_dir = tiny_comparison
    assert sorted(p.name for p in output_dir.iterdir()) == sorted(
        ["comparison.md", "loss_curves.csv", "loss_curves.json", "loss_curves.png", "runs"])
    assert not [p for p in output_dir.parent.rglob(".*")]  # no hidden staging folder or temporary file left
    report = json.loads((output_dir / "loss_curves.json").read_text())
    assert report["solvers"] == TINY_SOLVERS and report["seeds"] == [3, 4]
    for label, spec_dir in zip(TINY_SOLVERS, ["gd", "nag_momentum_beta=0.25", "newton_light"]):
        for seed in (3, 4):
            run = json.loads((output_dir / "runs" / spec_dir / f"seed-{seed}" / "run.json").read_text())
            assert run == report["runs"][label][str(seed)]
            assert [p["step"] for p in run["validation"]] == [0, 3, 6] and [p["step"] for p in run["train"]] == [2, 4, 6]
            assert run["train_tokens"] == 6 * 8 * (5 + 4)  # steps x batch x block length (5 numbers + 4 framing)
            assert run["settings"]["seed"] == seed and len(run["settings_sha256"]) == 64
            assert all(math.isfinite(p["loss"]) and p["loss"] > 0 for p in run["train"] + run["validation"])
    # Seeds differ (weights, data), solvers of one seed start from the same model: their step-0 losses are close.
    runs = report["runs"]
    assert runs["gd"]["3"]["validation"][0]["loss"] != runs["gd"]["4"]["validation"][0]["loss"]
    assert runs["gd"]["3"]["train_tokens"] == runs["newton_light"]["3"]["train_tokens"]

    with open(output_dir / "loss_curves.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == len(TINY_SOLVERS) * 2 * (3 + 3)
    for row in rows:  # every seed's curves, the same numbers as the JSON
        assert {"step": int(row["step"]), "loss": float(row["loss"])} in runs[row["solver"]][row["seed"]][row["split"]]

    with Image.open(output_dir / "loss_curves.png") as image:
        assert image.format == "PNG" and image.size[0] > 1000 and image.size[1] > 700

    table = (output_dir / "comparison.md").read_text()
    for expected in ("- Seeds: 3, 4 (n = 2).", "model vocabulary 13,", "dropout resid / embd / attn 0.0 / 0.0 / 0.0",
                     "cosine schedule with 1 warm-up steps", "- Machine: ", "torch 2.", "transformers 5.", "energy-gpt 0.",
                     "- Wall time: ", "- Command: `energy-gpt compare --output_dir", "--seeds 3,4",
                     "| nag:momentum_beta=0.25 | ", "## What the solvers learned",
                     "## Speed: steps (seconds) to reach gd's validation loss at 25% / 50% / 75% / 100%"):
        assert expected in table, expected


def test_aggregated_numbers_equal_a_hand_computation_from_the_per_seed_runs(tiny_comparison):
    from scipy import stats

    report = json.loads((tiny_comparison / "loss_curves.json").read_text())
    runs, summary = report["runs"], report["summary"]
    table = (tiny_comparison / "comparison.md").read_text()
    gd_final = [runs["gd"][seed]["final_validation_loss"] for seed in ("3", "4")]
    for label in TINY_SOLVERS:
        final = [runs[label][seed]["final_validation_loss"] for seed in ("3", "4")]
        best = [min(p["loss"] for p in runs[label][seed]["validation"]) for seed in ("3", "4")]
        assert summary[label]["final_validation_loss"]["mean"] == pytest.approx(statistics.mean(final))
        assert summary[label]["final_validation_loss"]["sd"] == pytest.approx(statistics.stdev(final))
        assert summary[label]["best_validation_loss"]["mean"] == pytest.approx(statistics.mean(best))
        assert summary[label]["perplexity"]["mean"] == pytest.approx(statistics.mean(math.exp(x) for x in final))
        tokens = [runs[label][s]["train_tokens"] / runs[label][s]["train_step_seconds"] for s in ("3", "4")]
        assert summary[label]["tokens_per_second"]["mean"] == pytest.approx(statistics.mean(tokens))
        row = next(line for line in table.splitlines() if line.startswith(f"| {label} | "))
        assert f"| {statistics.mean(final):.4f} ± {statistics.stdev(final):.4f} |" in row
        if label == "gd":
            assert "| reference |" in row
            continue
        differences = [a - b for a, b in zip(final, gd_final)]
        half_width = stats.t.ppf(0.975, 1) * statistics.stdev(differences) / math.sqrt(2)
        paired = summary[label]["vs_reference"]["final_validation_loss"]
        assert paired["mean"] == pytest.approx(statistics.mean(differences))
        assert paired["low"] == pytest.approx(statistics.mean(differences) - half_width)
        assert paired["high"] == pytest.approx(statistics.mean(differences) + half_width)
        expected_verdict = ("no difference detected at 2 seeds" if paired["low"] <= 0 <= paired["high"]
                            else "better" if paired["mean"] < 0 else "worse")
        assert paired["verdict"] == expected_verdict and f"| {expected_verdict} |" in row
    # Steps to reach gd's loss at 50 % of its training (step 3, an evaluation): interpolated on each curve.
    for seed in ("3", "4"):
        target = runs["gd"][seed]["validation"][1]["loss"]
        curve = runs["newton_light"][seed]["validation"]
        expected = None
        for before, after in itertools.pairwise(curve):
            if after["loss"] <= target:
                expected = before["step"] + (before["loss"] - target) / (before["loss"] - after["loss"]) * 3
                break
        if expected is None and curve[-1]["loss"] <= target + 1e-3:
            expected = next(p["step"] for p in curve if p["loss"] <= target + 1e-3)
        per_seed = next(m for m in report["summary"]["newton_light"]["per_seed"] if m["seed"] == int(seed))
        assert per_seed["steps_to_target"]["50%"] == pytest.approx(expected)
    gd_steps = [m["steps_to_target"]["100%"] for m in report["summary"]["gd"]["per_seed"]]
    assert gd_steps == [6.0, 6.0]
    # What the solvers learned: nag has beta from layer 1 on (none at layer 0), newton_light one lambda per head.
    learned = summary["nag:momentum_beta=0.25"]["solver_report"]
    assert learned["momentum_beta"][0] is None and learned["momentum_beta"][1] == pytest.approx(0.25, abs=0.05)
    assert "newton_lambda" in summary["newton_light"]["solver_report"]
    assert all(value is not None for value in summary["newton_light"]["solver_report"]["newton_bound_engagement"])


def test_same_command_twice_gives_the_same_losses(tiny_comparison, tmp_path):
    """Reproducibility: a second run of the tiny comparison (here its first seed) reproduces every loss exactly."""
    from energy_gpt.recipes.compare import main

    output_dir = tmp_path / "again"
    assert main(["--output_dir", str(output_dir), "--solvers", ",".join(TINY_SOLVERS[:2]), "--seeds", "3",
                 *SHORT_BUDGET]) == 0
    first = json.loads((tiny_comparison / "loss_curves.json").read_text())["runs"]
    second = json.loads((output_dir / "loss_curves.json").read_text())["runs"]
    for label in TINY_SOLVERS[:2]:
        for split in ("train", "validation"):
            assert second[label]["3"][split] == first[label]["3"][split], (label, split)
        assert second[label]["3"]["settings_sha256"] == first[label]["3"]["settings_sha256"]
    table = (output_dir / "comparison.md").read_text()
    assert "one seed: no interval, no verdict" in table


def test_baseline_dir_supplies_gd_and_must_match_the_settings(tiny_comparison, tmp_path):
    from energy_gpt.recipes.compare import main, run

    output_dir = tmp_path / "without-gd"
    argv = ["--output_dir", str(output_dir), "--solvers", "newton_light", "--seeds", "3,4", *SHORT_BUDGET]
    with pytest.raises(ValueError, match=r"--baseline_dir .*differs in .*shared\.training\.max_steps"):
        run([*argv, "--baseline_dir", str(tiny_comparison), "--max_steps", "4"])
    with pytest.raises(ValueError, match=r"no finished plain gd run for seed\(s\) \[5\]"):
        run(["--output_dir", str(output_dir), "--solvers", "newton_light", "--seeds", "3,5", *SHORT_BUDGET,
              "--baseline_dir", str(tiny_comparison)])
    with pytest.raises(ValueError, match="--baseline_dir is for comparisons without 'gd'"):
        run(["--output_dir", str(output_dir), "--solvers", "gd", *SHORT_BUDGET, "--baseline_dir", str(tiny_comparison)])
    assert main([*argv, "--baseline_dir", str(tiny_comparison)]) == 0
    report = json.loads((output_dir / "loss_curves.json").read_text())
    earlier = json.loads((tiny_comparison / "loss_curves.json").read_text())
    assert report["reference"]["label"] == "gd" and str(tiny_comparison) in report["reference"]["description"]
    # The same (deterministic) newton_light runs, compared with the same gd runs: the same paired difference.
    # (Holm's m and the step times differ: here one solver is compared, there two; timings are the machine's.)
    now, before = report["summary"]["newton_light"]["vs_reference"], earlier["summary"]["newton_light"]["vs_reference"]
    for key in ("mean", "sd", "low", "high", "p_value", "verdict", "signs"):
        assert now["final_validation_loss"][key] == before["final_validation_loss"][key], key
    assert now["steps_to_target"] == before["steps_to_target"]
    assert sorted(p.name for p in (output_dir / "runs").iterdir()) == ["newton_light"]  # gd is not copied
    assert "the gd runs of --baseline_dir" in (output_dir / "comparison.md").read_text()


def test_interrupted_comparison_resumes_without_retraining_finished_runs(tmp_path, monkeypatch):
    """SIGTERM in the middle of the second seed: the partial run folder is removed, the first seed's runs and the
    table of what finished stay. A SIGKILL's leftovers are cleaned at the start of --resume, which trains only the
    missing runs."""
    from energy_gpt.recipes import compare
    from energy_gpt.recipes.compare import runner

    output_dir = tmp_path / "compare"
    argv = ["--output_dir", str(output_dir), "--solvers", "gd,nag", "--seeds", "1,2", *SHORT_BUDGET]
    trained = []
    original = runner.train_one_run

    def terminated_in_seed_2(spec, seed, config, task, model_args, training_args, run_dir):
        trained.append((spec.label, seed))
        if seed == 2:
            assert run_dir.name.startswith(".seed-2.partial-") and run_dir.is_dir()
            os.kill(os.getpid(), signal.SIGTERM)  # the handler raises SystemExit(143) right here
        return original(spec, seed, config, task, model_args, training_args, run_dir)

    monkeypatch.setattr(runner, "train_one_run", terminated_in_seed_2)
    handler_before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(SystemExit) as stopped:
        compare.main(argv)
    assert stopped.value.code == 128 + signal.SIGTERM
    assert signal.getsignal(signal.SIGTERM) == handler_before  # the caller's handler is back
    assert trained == [("gd", 1), ("nag", 1), ("nag", 2)]  # the second seed starts at the second solver
    assert not list(tmp_path.rglob(".*"))  # no hidden partial folder
    first_seed = {label: (output_dir / "runs" / label / "seed-1" / "run.json").read_text() for label in ("gd", "nag")}
    assert sorted(p.relative_to(output_dir).as_posix() for p in (output_dir / "runs").rglob("*")) == [
        "runs/gd", "runs/gd/seed-1", "runs/gd/seed-1/run.json", "runs/nag", "runs/nag/seed-1", "runs/nag/seed-1/run.json"]
    report = json.loads((output_dir / "loss_curves.json").read_text())  # the table of what finished
    assert report["timing"]["finished"] == 2 and list(report["runs"]["gd"]) == ["1"]

    # What a SIGKILL leaves behind: a staging folder and a temporary file.
    (output_dir / "runs" / "nag" / ".seed-2.partial-abc123").mkdir()
    (output_dir / ".comparison.md.xyz.tmp").write_text("half a table")
    with pytest.raises(FileExistsError, match="pass --resume"):
        compare.run(argv)

    trained.clear()
    monkeypatch.setattr(runner, "train_one_run", lambda *args: trained.append(args[:2]) or original(*args))
    assert compare.main([*argv, "--resume"]) == 0
    assert [(spec.label, seed) for spec, seed in trained] == [("nag", 2), ("gd", 2)]
    assert not list(tmp_path.rglob(".*"))
    assert {label: (output_dir / "runs" / label / "seed-1" / "run.json").read_text() for label in ("gd", "nag")} == (
        first_seed)
    report = json.loads((output_dir / "loss_curves.json").read_text())
    assert report["timing"]["reused"] == 2 and report["timing"]["trained"] == 2
    assert report["summary"]["nag"]["seeds"] == [1, 2]

    # Everything finished: a resume trains nothing; other settings are refused, naming what differs.
    trained.clear()
    assert compare.main([*argv, "--resume"]) == 0 and trained == []
    with pytest.raises(ValueError, match=r"--resume: the finished run 'gd' seed 1 .*differs in shared\.training\."
                                         r"learning_rate"):
        compare.run([*argv, "--resume", "--learning_rate", "1e-3"])


def test_settings_match_ignores_only_fields_added_since_at_their_default():
    """A run made before the config gained a field (e.g. a newly registered energy's option) still matches while that
    field keeps its default; any other difference is named."""
    from energy_gpt.recipes.compare import default_settings, settings_differences

    defaults = {"shared": {"model": {"n_layer": 12, "huber_delta": 1.0}}}
    current = {"shared": {"model": {"n_layer": 2, "huber_delta": 1.0}}, "seed": 1}
    stored = {"shared": {"model": {"n_layer": 2}}, "seed": 1}
    assert settings_differences(current, stored, defaults) == []
    changed = {"shared": {"model": {"n_layer": 2, "huber_delta": 2.0}}, "seed": 1}
    assert settings_differences(changed, stored, defaults) == ["shared.model.huber_delta"]
    assert settings_differences(current, {**stored, "seed": 2}, defaults) == ["seed"]
    removed = {"shared": {"model": {"n_layer": 2, "huber_delta": 1.0, "old_field": 1}}, "seed": 1}
    assert settings_differences(current, removed, defaults) == ["shared.model.old_field"]
    assert settings_differences(current, stored) == ["shared.model.huber_delta"]  # without defaults: strict
    real = default_settings()["shared"]
    assert real["model"]["n_layer"] == 12 and real["training"]["learning_rate"] == 5e-05


def test_compare_refuses_bad_arguments_and_keeps_existing_results(tmp_path, monkeypatch):
    from energy_gpt.recipes.compare import run

    output_dir = tmp_path / "compare"
    with pytest.raises(ValueError, match="--attention_solver"):
        run(["--output_dir", str(output_dir), "--attention_solver", "nag"])
    with pytest.raises(ValueError, match="--model_name_or_path is not supported"):
        run(["--output_dir", str(output_dir), "--model_name_or_path", "openai-community/gpt2"])

    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(RuntimeError, match="single process"):
        run(["--output_dir", str(output_dir)])
    monkeypatch.delenv("WORLD_SIZE")

    output_dir.mkdir()
    (output_dir / "comparison.md").write_text("previous results")
    with pytest.raises(FileExistsError, match="--overwrite"):
        run(["--output_dir", str(output_dir), "--solvers", "gd", *SHORT_BUDGET])
    # A run that fails on its arguments (here: a model shape the config rejects) leaves the previous results untouched.
    with pytest.raises(ValueError, match="--config_overrides: .*n_head"):
        run(["--output_dir", str(output_dir), "--solvers", "gd", "--overwrite", *SHORT_BUDGET,
              "--config_overrides", "n_layer=1,n_embd=16,n_head=3"])
    with pytest.raises(ValueError, match=r"--config_overrides: 'n_heads' is not a field"):
        run(["--output_dir", str(output_dir), "--solvers", "gd", "--overwrite", *SHORT_BUDGET,
              "--config_overrides", "n_heads=2"])
    assert (output_dir / "comparison.md").read_text() == "previous results"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["compare"]  # no staging folder left behind
    # A folder that holds something else is never removed, even with --overwrite.
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="holds no comparison"):
        run(["--output_dir", str(other), "--overwrite", *SHORT_BUDGET])
    assert (other / "notes.txt").read_text() == "mine"


def test_energies_as_an_axis_run_on_the_embedded_task(tmp_path):
    """`--attention_energies` crosses every --solvers entry with every energy; pairs that do not exist (Newton on a
    linear energy) are left out, the rest train and are compared against softmax gd."""
    import json

    from energy_gpt.recipes.compare import CompareArguments, main

    labels = [spec.label for spec in CompareArguments(
        solvers="gd,newton", attention_energies="softmax,linear,gated_linear").solver_specs()]
    assert labels == ["gd", "newton", "gd:attention_energy=linear", "gd:attention_energy=gated_linear"]

    output_dir = tmp_path / "energies"
    assert main(["--output_dir", str(output_dir), "--solvers", "gd,nag", "--attention_energies",
                 "softmax,linear,gated_linear", "--seeds", "1", *SHORT_BUDGET]) == 0
    table = (output_dir / "comparison.md").read_text()
    for label in ("nag:attention_energy=linear", "gd:attention_energy=gated_linear"):
        assert f"| {label} |" in table
    run = json.loads(next((output_dir / "runs").glob("*gated_linear*/seed-1/run.json")).read_text())
    assert run["solver_overrides"] == {"attention_energy": "gated_linear"}
