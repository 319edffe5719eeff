"""`energy-gpt compare --task icl_regression`: the generator, the closed-form baselines against plainly written loops,
the wrapper model's causality and loss, and a tiny end-to-end comparison."""

import json

import numpy as np
import pytest
import torch

from test_compare import SHORT_BUDGET

TINY_REGRESSION = ["--icl_dimension", "3", "--icl_num_pairs", "6", "--icl_noise_std", "0.1"]


def test_generator_is_deterministic_and_y_is_w_dot_x_plus_the_noise():
    from energy_gpt.recipes.icl_regression import RegressionTask, generate_icl_regression, regression_dataset

    noiseless = RegressionTask(dimension=4, num_pairs=10)
    inputs, targets, weights = generate_icl_regression(noiseless, 50, seed=7)
    assert inputs.shape == (50, 10, 4) and targets.shape == (50, 10) and weights.shape == (50, 4)
    for row_inputs, row_targets, row_weights in zip(inputs, targets, weights):
        for x, y in zip(row_inputs, row_targets):
            assert y == pytest.approx(sum(a * b for a, b in zip(x, row_weights)), abs=1e-12)
    again = generate_icl_regression(noiseless, 50, seed=7)
    other = generate_icl_regression(noiseless, 50, seed=8)
    assert all(np.array_equal(a, b) for a, b in zip((inputs, targets, weights), again))
    assert not np.array_equal(inputs, other[0])

    noisy = RegressionTask(dimension=4, num_pairs=10, noise_std=0.5)
    inputs, targets, weights = generate_icl_regression(noisy, 2000, seed=7)
    residuals = targets - np.einsum("bnd,bd->bn", inputs, weights)
    assert residuals.std() == pytest.approx(0.5, rel=0.03) and abs(residuals.mean()) < 0.02
    assert np.mean(np.sum(weights**2, axis=1)) == pytest.approx(1.0, abs=0.05)  # w ~ N(0, I / d): E|w|^2 = 1

    row = regression_dataset(inputs[:1], targets[:1])[0]
    points = np.asarray(row["points"])  # x tokens [x, 0] at even positions, y tokens [0, y] at odd
    assert points.shape == (20, 5)
    assert np.allclose(points[0::2, :4], inputs[0]) and np.all(points[0::2, 4] == 0)
    assert np.all(points[1::2, :4] == 0) and np.allclose(points[1::2, 4], targets[0])
    assert np.allclose(row["labels"], targets[0])


def test_least_squares_matches_a_loop_and_is_exact_on_noiseless_data_once_i_reaches_d():
    from energy_gpt.recipes.icl_regression import RegressionTask, generate_icl_regression, least_squares_predictions

    inputs, targets, _ = generate_icl_regression(RegressionTask(dimension=4, num_pairs=9), 40, seed=1)
    predictions = least_squares_predictions(inputs, targets)
    for b in range(len(inputs)):  # numpy's lstsq returns the minimum-norm solution of an underdetermined system
        for i in range(1, 9):
            estimate = np.linalg.lstsq(inputs[b, :i], targets[b, :i], rcond=None)[0]
            assert predictions[b, i] == pytest.approx(inputs[b, i] @ estimate, abs=1e-8)
    assert np.all(predictions[:, 0] == 0)
    errors = (predictions - targets) ** 2
    assert errors[:, 4:].max() < 1e-16  # i >= d: the prefix determines w
    assert errors[:, 1:4].mean(axis=0).min() > 0.05  # i < d: it does not


def test_one_gradient_step_matches_a_loop_and_its_best_step_minimises_the_error():
    from energy_gpt.recipes.icl_regression import (
        RegressionTask,
        best_step_size,
        generate_icl_regression,
        gradient_step_directions,
        mean_squared_error,
    )

    inputs, targets, _ = generate_icl_regression(RegressionTask(dimension=3, num_pairs=7, noise_std=0.2), 30, seed=2)
    directions = gradient_step_directions(inputs, targets)
    for b in range(len(inputs)):
        assert directions[b, 0] == 0
        for i in range(1, 7):
            weights = np.zeros(3)
            gradient = sum(-(targets[b, j] - weights @ inputs[b, j]) * inputs[b, j] for j in range(i)) / i
            weights = weights - 1.0 * gradient
            assert directions[b, i] == pytest.approx(inputs[b, i] @ weights, abs=1e-12)
    step = best_step_size(directions, targets)
    best = mean_squared_error(step * directions, targets)
    assert step > 0
    for other in (step * 0.9, step * 1.1, 1.0, 1 / 7):
        assert mean_squared_error(other * directions, targets) > best


def test_chance_is_the_second_moment_of_y():
    from energy_gpt.recipes.icl_regression import RegressionTask, baseline_errors, generate_icl_regression

    inputs, targets, _ = generate_icl_regression(RegressionTask(dimension=4, num_pairs=16, noise_std=0.5), 4000, seed=3)
    errors = baseline_errors(inputs, targets, noise_std=0.5)
    # E[y^2] = E|w|^2 + sigma^2 = 1.25; |w|^2 varies per sequence (variance 2/d): sd of the mean about 0.012.
    assert errors["predicting 0 (chance)"] == pytest.approx(1.25, abs=0.05)
    ridge = errors["ridge on the prefix, penalty d sigma^2 = 1 (the posterior mean: Bayes-optimal)"]
    one_step = next(value for name, value in errors.items() if name.startswith("one gradient step from w = 0, best"))
    assert ridge < one_step < errors["predicting 0 (chance)"]
    # Noisy least squares near i = d (a square, badly conditioned prefix) is far worse than ridge.
    assert errors["least squares on the prefix (minimum-norm while i < d)"] > ridge


def test_ridge_matches_a_loop_and_tends_to_least_squares_as_the_penalty_vanishes():
    from energy_gpt.recipes.icl_regression import (
        RegressionTask,
        generate_icl_regression,
        least_squares_predictions,
        ridge_predictions,
    )

    inputs, targets, _ = generate_icl_regression(RegressionTask(dimension=3, num_pairs=6, noise_std=0.3), 20, seed=4)
    predictions = ridge_predictions(inputs, targets, penalty=0.27)
    for b in range(len(inputs)):
        for i in range(1, 6):
            prefix = inputs[b, :i]
            estimate = np.linalg.inv(prefix.T @ prefix + 0.27 * np.eye(3)) @ prefix.T @ targets[b, :i]
            assert predictions[b, i] == pytest.approx(inputs[b, i] @ estimate, abs=1e-10)
    assert np.allclose(ridge_predictions(inputs, targets, 1e-10), least_squares_predictions(inputs, targets), atol=1e-4)


def test_the_wrapper_predicts_y_i_without_seeing_it_and_its_loss_is_the_mean_squared_error():
    from energy_gpt.modeling import EnergyGPTConfig
    from energy_gpt.recipes.icl_regression import (
        interleave_points,
        regression_dataset,
        regression_error,
        regression_model_class,
    )

    torch.manual_seed(0)
    config = EnergyGPTConfig(vocab_size=4, n_positions=12, n_layer=2, n_embd=16, n_head=2, bos_token_id=1,
                             eos_token_id=2, pad_token_id=0)
    model = regression_model_class(3)._from_config(config).eval()
    inputs, targets = np.random.default_rng(0).standard_normal((2, 6, 3)), np.random.default_rng(1).standard_normal((2, 6))
    points = torch.tensor(interleave_points(inputs, targets))
    labels = torch.tensor(targets, dtype=torch.float32)
    with torch.no_grad():
        output = model(points=points, labels=labels)
        changed = targets.copy()
        changed[:, 3:] += 5.0  # y_3 onwards: the predictions of y_0 .. y_3 must not move
        moved = model(points=torch.tensor(interleave_points(inputs, changed))).predictions
    assert output.predictions.shape == (2, 6)
    assert torch.equal(output.predictions[:, :4], moved[:, :4]) and not torch.allclose(output.predictions[:, 4:], moved[:, 4:])
    assert output.loss.item() == pytest.approx(((output.predictions - labels) ** 2).mean().item(), rel=1e-6)
    expected = ((output.predictions[:, 1:] - labels[:, 1:]) ** 2).mean().item()
    assert regression_error(model, regression_dataset(inputs, targets), batch_size=1) == pytest.approx(expected, rel=1e-5)


def test_real_valued_datasets_hash_every_bit():
    from datasets import Dataset

    from energy_gpt.recipes.compare.store import dataset_sha256

    first = Dataset.from_dict({"points": [[0.25, 0.5]], "labels": [[1.0]]})
    second = Dataset.from_dict({"points": [[0.25, 0.75]], "labels": [[1.0]]})  # the same after truncation to ints
    assert dataset_sha256(first) != dataset_sha256(second)


def test_bad_regression_options_are_named():
    from energy_gpt.recipes.compare import CompareArguments

    with pytest.raises(ValueError, match="--icl_num_pairs must be >= 2"):
        CompareArguments(task="icl_regression", icl_num_pairs=1)
    with pytest.raises(ValueError, match="--icl_dimension must be >= 1"):
        CompareArguments(task="icl_regression", icl_dimension=0)
    with pytest.raises(ValueError, match="--icl_noise_std must be >= 0"):
        CompareArguments(task="icl_regression", icl_noise_std=-1.0)


def test_a_tiny_regression_comparison_reports_the_error_beside_the_baselines(tmp_path):
    from energy_gpt.recipes.compare import main

    output_dir = tmp_path / "icl"
    assert main(["--output_dir", str(output_dir), "--task", "icl_regression", *TINY_REGRESSION, "--solvers", "gd",
                 "--seeds", "1", *SHORT_BUDGET, "--max_steps", "5", "--num_validation_examples", "256"]) == 0
    report = json.loads((output_dir / "loss_curves.json").read_text())
    run = report["runs"]["gd"]["1"]
    assert run["steps"] == 5 and run["train_tokens"] == 5 * 8 * 12  # tokens, not input numbers
    assert 0 < run["final_metric"] < 10
    settings = report["settings"]
    assert settings["chance"] == pytest.approx(1 + 0.1**2, abs=0.3)  # sd of the 256-sequence mean: about 0.07
    assert len(settings["baselines"]) == 4  # with noise: ridge too
    table = (output_dir / "comparison.md").read_text()
    assert "| mean squared error of y (pairs i >= 1) |" in table and f"| {settings['chance']:.4f} |" in table
    assert "| least squares on the prefix (minimum-norm while i < d) (closed form) |" in table
    assert "- Closed-form baselines on the same validation sequences: " in table
