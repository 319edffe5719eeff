"""The official GLUE metrics, computed locally with numpy / scipy (no Hub metric script, so they work offline).

Key names are those of the `glue` metric of `evaluate` (and so of `run_glue.py`'s `eval_results.json`):
cola -> matthews_correlation; sst2, mnli, qnli, rte, wnli -> accuracy; mrpc, qqp -> accuracy, f1;
stsb -> pearson, spearmanr.
"""

import numpy as np
from scipy import stats

GLUE_TASK_METRICS: dict[str, tuple[str, ...]] = {
    "cola": ("matthews_correlation",),
    "sst2": ("accuracy",),
    "mrpc": ("accuracy", "f1"),
    "qqp": ("accuracy", "f1"),
    "stsb": ("pearson", "spearmanr"),
    "mnli": ("accuracy",),
    "qnli": ("accuracy",),
    "rte": ("accuracy",),
    "wnli": ("accuracy",),
}


def accuracy(predictions, references) -> float:
    predictions, references = np.asarray(predictions), np.asarray(references)
    return float((predictions == references).mean())


def binary_f1(predictions, references, positive_label: int = 1) -> float:
    """F1 of the positive class (sklearn's `f1_score` default); 0.0 when there is no true or predicted positive."""
    predicted = np.asarray(predictions) == positive_label
    actual = np.asarray(references) == positive_label
    true_positives = np.sum(predicted & actual)
    denominator = predicted.sum() + actual.sum()
    return float(2 * true_positives / denominator) if denominator else 0.0


def matthews_correlation(predictions, references) -> float:
    """Matthews correlation coefficient for binary or multi-class labels (the R_K statistic, as sklearn); 0.0 when
    undefined (one of the label vectors is constant)."""
    predictions, references = np.asarray(predictions), np.asarray(references)
    labels = np.union1d(predictions, references)
    index = {label: i for i, label in enumerate(labels)}
    confusion = np.zeros((len(labels), len(labels)), dtype=np.float64)
    np.add.at(confusion, ([index[r] for r in references], [index[p] for p in predictions]), 1)
    true_counts, predicted_counts = confusion.sum(axis=1), confusion.sum(axis=0)
    correct, total = np.trace(confusion), confusion.sum()
    covariance = correct * total - predicted_counts @ true_counts
    variance_predicted = total**2 - predicted_counts @ predicted_counts
    variance_true = total**2 - true_counts @ true_counts
    if variance_predicted == 0 or variance_true == 0:
        return 0.0
    return float(covariance / np.sqrt(variance_predicted * variance_true))


def pearson_and_spearman(predictions, references) -> dict[str, float]:
    predictions, references = np.asarray(predictions, dtype=np.float64), np.asarray(references, dtype=np.float64)
    return {
        "pearson": float(stats.pearsonr(predictions, references)[0]),
        "spearmanr": float(stats.spearmanr(predictions, references)[0]),
    }


def glue_metrics(task_name: str, predictions, references) -> dict[str, float]:
    """The official metrics of a GLUE task. `predictions`: class ids (float scores for stsb)."""
    if task_name not in GLUE_TASK_METRICS:
        raise ValueError(f"Unknown GLUE task {task_name!r}; choose one of {sorted(GLUE_TASK_METRICS)}.")
    if task_name == "stsb":
        return pearson_and_spearman(predictions, references)
    if task_name == "cola":
        return {"matthews_correlation": matthews_correlation(predictions, references)}
    results = {"accuracy": accuracy(predictions, references)}
    if task_name in ("mrpc", "qqp"):
        results["f1"] = binary_f1(predictions, references)
    return results


def classification_metrics(predictions, references, is_regression: bool) -> dict[str, float]:
    """Metrics for a custom (non-GLUE) dataset, as `run_glue.py`: mse for regression, accuracy otherwise."""
    if is_regression:
        predictions, references = np.asarray(predictions, np.float64), np.asarray(references, np.float64)
        return {"mse": float(((predictions - references) ** 2).mean())}
    return {"accuracy": accuracy(predictions, references)}


__all__ = [
    "GLUE_TASK_METRICS",
    "accuracy",
    "binary_f1",
    "classification_metrics",
    "glue_metrics",
    "matthews_correlation",
    "pearson_and_spearman",
]
