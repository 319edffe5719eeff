"""In-context linear regression for `energy-gpt compare --task icl_regression`: the generator, the closed-form
baselines measured on the same sequences, and the small wrapper that lets the causal EnergyGPT read real numbers.

Each sequence draws its own weights w ~ N(0, I_d / d) and n pairs (x_i, y_i = w . x_i + noise), x_i ~ N(0, I_d),
noise ~ N(0, sigma^2). The model sees 2n vectors of width d + 1, x_0, y_0, x_1, y_1, ...: an x token is [x_i, 0], a y
token [0, y_i]. At the x token of pair i it predicts y_i from the earlier pairs and x_i (causal attention keeps y_i
out of view). The chance level (predicting 0) is E[y^2] = E|w|^2 + sigma^2 = 1 + sigma^2.
"""

import math
from dataclasses import dataclass

import numpy as np
import torch
from datasets import Dataset
from torch import nn
from transformers.utils import ModelOutput

from ..modeling import EnergyGPTModel
from ..modeling.modeling_energy_gpt import EnergyGPTPreTrainedModel
from .recall import _rng


@dataclass(frozen=True)
class RegressionTask:
    """The shape of the in-context regression sequences."""

    dimension: int = 8
    num_pairs: int = 32
    noise_std: float = 0.0

    def __post_init__(self):
        if self.dimension < 1:
            raise ValueError(f"--icl_dimension must be >= 1, got {self.dimension}.")
        if self.num_pairs < 2:
            raise ValueError(f"--icl_num_pairs must be >= 2 (pair 0 has no prefix to learn from), got {self.num_pairs}.")
        if not self.noise_std >= 0:
            raise ValueError(f"--icl_noise_std must be >= 0, got {self.noise_std}.")

    @property
    def sequence_length(self) -> int:
        return 2 * self.num_pairs

    @property
    def point_width(self) -> int:
        return self.dimension + 1


def generate_icl_regression(task: RegressionTask, count: int, seed: int | str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """`count` sequences: inputs x (count, n, d), targets y (count, n) and the weights w (count, d), deterministic
    per seed (a string seed is hashed stably, as the validation set's)."""
    rng = _rng(seed)
    weights = rng.standard_normal((count, task.dimension)) / math.sqrt(task.dimension)
    inputs = rng.standard_normal((count, task.num_pairs, task.dimension))
    noise = rng.standard_normal((count, task.num_pairs)) * task.noise_std
    targets = np.einsum("bnd,bd->bn", inputs, weights) + noise
    return inputs, targets, weights


def interleave_points(inputs: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """The model's input vectors (count, 2n, d + 1): x tokens [x_i, 0] at even positions, y tokens [0, y_i] at odd."""
    count, num_pairs, dimension = inputs.shape
    points = np.zeros((count, 2 * num_pairs, dimension + 1), dtype=np.float32)
    points[:, 0::2, :dimension] = inputs
    points[:, 1::2, dimension] = targets
    return points


def regression_dataset(inputs: np.ndarray, targets: np.ndarray) -> Dataset:
    """Rows of `points` (the interleaved vectors) and `labels` (the n targets, predicted at the x tokens)."""
    return Dataset.from_dict({"points": interleave_points(inputs, targets).tolist(),
                              "labels": targets.astype(np.float32).tolist()})


# --------------------------------------------------------------------------------------------------------------------
# Closed-form baselines: predictions of y_i from the pairs before i and x_i, (count, n); pair 0 predicts 0.


def least_squares_predictions(inputs: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """Least squares on the prefix: w_hat = pinv(X_<i) y_<i, the minimum-norm solution while i < d."""
    predictions = np.zeros_like(targets, dtype=np.float64)
    for i in range(1, inputs.shape[1]):
        estimates = np.einsum("bdi,bi->bd", np.linalg.pinv(inputs[:, :i]), targets[:, :i])
        predictions[:, i] = np.einsum("bd,bd->b", inputs[:, i], estimates)
    return predictions


def ridge_predictions(inputs: np.ndarray, targets: np.ndarray, penalty: float) -> np.ndarray:
    """Ridge on the prefix: w_hat = (X'X + penalty I)^-1 X'y. With penalty = d sigma^2 it is the posterior mean of w
    under the task's prior N(0, I / d), the best any predictor can do in mean squared error. (Plain least squares
    has unbounded expected error near i = d when there is noise; ridge does not.)"""
    dimension = inputs.shape[2]
    predictions = np.zeros_like(targets, dtype=np.float64)
    for i in range(1, inputs.shape[1]):
        prefix = inputs[:, :i]
        gram = np.einsum("bid,bie->bde", prefix, prefix) + penalty * np.eye(dimension)
        estimates = np.linalg.solve(gram, np.einsum("bid,bi->bd", prefix, targets[:, :i])[..., None])[..., 0]
        predictions[:, i] = np.einsum("bd,bd->b", inputs[:, i], estimates)
    return predictions


def gradient_step_directions(inputs: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """x_i . (1/i) sum_{j<i} y_j x_j: the prediction of one gradient step of unit size from w = 0 on the prefix's mean
    squared error / 2 (its gradient at 0 is -(1/i) sum y_j x_j)."""
    sums = np.cumsum(targets[:, :, None] * inputs, axis=1)  # sums[:, i] = sum_{j<=i}
    directions = np.zeros_like(targets, dtype=np.float64)
    prefix_means = sums[:, :-1] / np.arange(1, inputs.shape[1])[None, :, None]
    directions[:, 1:] = np.einsum("bnd,bnd->bn", inputs[:, 1:], prefix_means)
    return directions


def best_step_size(directions: np.ndarray, targets: np.ndarray) -> float:
    """The one step size that minimises the mean squared error over pairs i >= 1 (least squares in one variable)."""
    a, y = directions[:, 1:], targets[:, 1:]
    denominator = float(np.sum(a * a))
    return float(np.sum(a * y)) / denominator if denominator > 0 else 0.0


def mean_squared_error(predictions: np.ndarray, targets: np.ndarray) -> float:
    """Mean over sequences and pairs i >= 1 (pair 0 has no prefix)."""
    return float(np.mean((predictions[:, 1:] - targets[:, 1:]) ** 2))


def baseline_errors(inputs: np.ndarray, targets: np.ndarray, noise_std: float = 0.0) -> dict[str, float]:
    """Mean squared error (pairs i >= 1) of the closed-form predictors and of predicting 0, on these sequences; with
    noise, also the Bayes-optimal ridge (penalty d sigma^2)."""
    directions = gradient_step_directions(inputs, targets)
    step = best_step_size(directions, targets)
    penalty = inputs.shape[2] * noise_std**2
    ridge = {} if noise_std == 0 else {
        f"ridge on the prefix, penalty d sigma^2 = {penalty:g} (the posterior mean: Bayes-optimal)": mean_squared_error(
            ridge_predictions(inputs, targets, penalty), targets)}
    return {
        "least squares on the prefix (minimum-norm while i < d)": mean_squared_error(
            least_squares_predictions(inputs, targets), targets),
        **ridge,
        f"one gradient step from w = 0, best fixed step {step:.3f} (fitted on these sequences)": mean_squared_error(
            step * directions, targets),
        "one gradient step from w = 0, step 1": mean_squared_error(directions, targets),
        "predicting 0 (chance)": mean_squared_error(np.zeros_like(targets), targets),
    }


# --------------------------------------------------------------------------------------------------------------------
# The model


@dataclass
class RegressionOutput(ModelOutput):
    loss: torch.Tensor | None = None
    predictions: torch.Tensor | None = None


class InContextRegressionModel(EnergyGPTPreTrainedModel):
    """`EnergyGPTModel` between a linear read-in (d + 1 -> n_embd, fed as `inputs_embeds`; the position table is
    added as for tokens) and a linear read-out (n_embd -> 1) at the x tokens; loss: mean squared error over all
    pairs. The token table `wte` is unused (the task's vocabulary is one token, so it costs n_embd weights)."""

    main_input_name = "points"
    point_dimension: int = 0  # d; set by `regression_model_class`

    def __init__(self, config):
        super().__init__(config)
        self.transformer = EnergyGPTModel(config)
        self.read_in = nn.Linear(self.point_dimension + 1, config.n_embd)
        self.read_out = nn.Linear(config.n_embd, 1)
        self.post_init()

    def forward(self, points: torch.Tensor, labels: torch.Tensor | None = None, **kwargs) -> RegressionOutput:
        hidden = self.transformer(inputs_embeds=self.read_in(points), return_dict=True).last_hidden_state
        predictions = self.read_out(hidden[:, 0::2]).squeeze(-1)  # at x_i: the prediction of y_i
        loss = None if labels is None else nn.functional.mse_loss(predictions.float(), labels.float())
        return RegressionOutput(loss=loss, predictions=predictions)


def regression_model_class(dimension: int) -> type[InContextRegressionModel]:
    """The wrapper for d-dimensional inputs (the read-in's width comes from the task, not from the config)."""
    return type(f"InContextRegressionModel{dimension}d", (InContextRegressionModel,), {"point_dimension": dimension})


def regression_error(model: nn.Module, dataset: Dataset, batch_size: int) -> float:
    """The model's mean squared error on pairs i >= 1 of `dataset`, as `baseline_errors` measures the baselines."""
    device = next(model.parameters()).device
    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(dataset), batch_size):
            rows = dataset.with_format("torch")[start:start + batch_size]
            labels = rows["labels"].to(device)
            predictions = model(points=rows["points"].to(device)).predictions
            errors = (predictions[:, 1:].double() - labels[:, 1:].double()) ** 2
            total += float(errors.sum())
            count += errors.numel()
    return total / count if count else float("nan")


__all__ = [
    "InContextRegressionModel",
    "RegressionTask",
    "baseline_errors",
    "best_step_size",
    "generate_icl_regression",
    "gradient_step_directions",
    "interleave_points",
    "least_squares_predictions",
    "mean_squared_error",
    "regression_dataset",
    "regression_error",
    "regression_model_class",
    "ridge_predictions",
]
