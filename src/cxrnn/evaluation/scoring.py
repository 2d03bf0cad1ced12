"""Evaluate a model on a dataset and write metrics.json, the plots and per-image predictions."""

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


def write_evaluation(out_dir: str | Path, y_true: np.ndarray, probs: np.ndarray, classes: Sequence[str],
                     paths: Sequence[str] | None = None, metrics: dict[str, Any] | None = None) -> dict[str, Any]:
    """metrics.json + confusion_matrix.png + roc.png (+ predictions.csv when paths are given)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    metrics = metrics or compute_metrics(y_true, probs, classes)
    atomic_write_text(out / "metrics.json", json.dumps(metrics, indent=2))
    plot_confusion_matrix(metrics["confusion_matrix"], classes, out / "confusion_matrix.png")
    plot_roc(y_true, probs, classes, out / "roc.png")
    if paths is not None:
        buf = io.StringIO()
        writer = csv.writer(buf)
        writer.writerow(["path", "label", "predicted", *[f"p_{c}" for c in classes]])
        for path, truth, row in zip(paths, y_true, probs):
            writer.writerow([path, classes[int(truth)], classes[int(np.argmax(row))], *[f"{p:.6f}" for p in row]])
        atomic_write_text(out / "predictions.csv", buf.getvalue())
    return metrics
