"""Score predictions and write an evaluation folder: metrics with bootstrap intervals and ECE, metrics.json,
confusion_matrix.png, roc.png, reliability.png and predictions.csv. Training runs and ``cxrnn evaluate``
both come through here, so every evaluation carries the same fields."""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from cxrnn.utils.atomic import atomic_write_text
from cxrnn.data.dataset import Dataset
from cxrnn.evaluation.bootstrap import DEFAULT_BOOTSTRAP, bootstrap_ci
from cxrnn.evaluation.calibration import calibration_summary, plot_reliability
from cxrnn.evaluation.metrics import compute_metrics
from cxrnn.evaluation.plots import plot_confusion_matrix, plot_roc
from cxrnn.models.bundle import ModelBundle
from cxrnn.inference.predictor import Predictor

Progress = Callable[[int, int], None]


@dataclass
class EvalResult:
    metrics: dict[str, Any]
    y_true: np.ndarray
    probs: np.ndarray
    paths: list[str]
    errors: list[str] = field(default_factory=list)


def evaluate_dataset(bundle: ModelBundle, dataset: Dataset, progress: Progress | None = None,
                     batch_size: int = 16) -> EvalResult:
    """Predict every image of ``dataset`` (whose classes must be the model's) and score it."""
    if list(dataset.classes) != list(bundle.classes):
        raise ValueError(f"dataset classes {dataset.classes} differ from the model's {bundle.classes}")
    predictions = Predictor(bundle, batch_size=batch_size).predict_paths(
        [s.path for s in dataset.samples], progress=progress)
    labels = dataset.labels()
    keep = [i for i, p in enumerate(predictions) if p.error is None]
    errors = [p.error for p in predictions if p.error is not None]
    probs = np.array([[predictions[i].probabilities[c] for c in bundle.classes] for i in keep])  # type: ignore[index]
    probs = probs.reshape(len(keep), len(bundle.classes))
    y_true = labels[keep]
    paths = [str(dataset.samples[i].path) for i in keep]
    return EvalResult(compute_metrics(y_true, probs, bundle.classes), y_true, probs, paths, errors)


def score_predictions(y_true: np.ndarray, probs: np.ndarray, classes: Sequence[str], n_boot: int = DEFAULT_BOOTSTRAP,
                      seed: int = 0) -> dict[str, Any]:
    """Metrics of ``probs`` against ``y_true`` plus ``ci`` (percentile bootstrap, when ``n_boot`` > 0),
    ``ece`` and ``reliability`` (15 bins)."""
    metrics = compute_metrics(y_true, probs, classes)
    if n_boot > 0:
        metrics["ci"] = bootstrap_ci(y_true, probs, classes, n_boot, seed)
    summary = calibration_summary(probs, y_true)
    metrics["ece"] = summary["ece"]
    metrics["reliability"] = summary["reliability"]
    return metrics


def evaluate_to_dir(bundle: ModelBundle, dataset: Dataset, out_dir: str | Path, n_boot: int = DEFAULT_BOOTSTRAP,
                    seed: int = 0, progress: Progress | None = None, batch_size: int = 16) -> EvalResult:
    """``cxrnn evaluate``: predict ``dataset`` with ``bundle`` and write the evaluation folder."""
    result = evaluate_dataset(bundle, dataset, progress=progress, batch_size=batch_size)
    result.metrics = score_predictions(result.y_true, result.probs, bundle.classes, n_boot, seed)
    write_evaluation(out_dir, result.y_true, result.probs, bundle.classes, result.paths, result.metrics)
    return result


def write_evaluation(out_dir: str | Path, y_true: np.ndarray, probs: np.ndarray, classes: Sequence[str],
                     paths: Sequence[str] | None = None, metrics: dict[str, Any] | None = None,
                     before: np.ndarray | None = None) -> dict[str, Any]:
    """metrics.json + confusion_matrix.png + roc.png (+ reliability.png when there are test images, + 
    predictions.csv when paths are given). ``before``: the uncalibrated probabilities, drawn as a second
    reliability curve."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    metrics = metrics or compute_metrics(y_true, probs, classes)
    atomic_write_text(out / "metrics.json", json.dumps(metrics, indent=2))
    plot_confusion_matrix(metrics["confusion_matrix"], classes, out / "confusion_matrix.png")
    plot_roc(y_true, probs, classes, out / "roc.png")
    if len(y_true):
        plot_reliability(probs, y_true, out / "reliability.png", before=before)
    if paths is not None:
        buf = io.StringIO()
        writer = csv.writer(buf)
        writer.writerow(["path", "label", "predicted", *[f"p_{c}" for c in classes]])
        for path, truth, row in zip(paths, y_true, probs):
            writer.writerow([path, classes[int(truth)], classes[int(np.argmax(row))], *[f"{p:.6f}" for p in row]])
        atomic_write_text(out / "predictions.csv", buf.getvalue())
    return metrics
