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
from cxrnn.evaluation.bootstrap import DEFAULT_BOOTSTRAP, bootstrap_ci, percentile_interval, resample_counts
from cxrnn.evaluation.calibration import calibration_summary, plot_reliability
from cxrnn.evaluation.metrics import compute_metrics
from cxrnn.evaluation.plots import plot_confusion_matrix, plot_risk_coverage, plot_roc
from cxrnn.models.bundle import ModelBundle
from cxrnn.models.conformal import ConformalSets
from cxrnn.inference.predictor import Predictor

Progress = Callable[[int, int], None]
Log = Callable[[str], None]

NO_CONFORMAL = "model has no conformal calibration (trained before prediction sets)"
RISK_COVERAGE_POINTS = 21  # shares of images kept: 100%, 95%, ..., 0%


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


def risk_coverage(y_true: np.ndarray, probs: np.ndarray, points: int = RISK_COVERAGE_POINTS) -> list[dict[str, Any]]:
    """Accuracy of the most confident images (top-class probability) for each share kept, from 100% down:
    ``[{"kept", "n_kept", "accuracy"}]``; accuracy is None where nothing is kept."""
    y = np.asarray(y_true, dtype=int)
    probs = np.asarray(probs, dtype=np.float64).reshape(len(y), -1)
    order = np.argsort(-probs.max(axis=1), kind="stable") if len(y) else np.zeros(0, dtype=int)
    correct = (probs.argmax(axis=1) == y)[order] if len(y) else np.zeros(0, dtype=bool)
    hits = np.concatenate([[0], np.cumsum(correct)])
    rows = []
    for share in np.linspace(1.0, 0.0, points):
        n_kept = int(round(float(share) * len(y)))
        rows.append({"kept": round(float(share), 6), "n_kept": n_kept,
                     "accuracy": float(hits[n_kept] / n_kept) if n_kept else None})
    return rows


def conformal_metrics(sets: ConformalSets, y_true: np.ndarray, probs: np.ndarray, n_boot: int = DEFAULT_BOOTSTRAP,
                      seed: int = 0, evaluated_on: str = "test split", level: float = 0.95) -> dict[str, Any]:
    """The ``conformal`` block of metrics.json: the calibration (target, where, counts, thresholds) and what
    the sets did on these images (empirical coverage overall and per class with percentile-bootstrap
    intervals, set sizes, accuracy on singletons, the referral operating point, the risk-coverage curve).

    A threshold of None is +inf (too few calibration images: the class is in every set); JSON has no inf.
    """
    classes = list(sets.classes)
    y = np.asarray(y_true, dtype=int)
    probs = np.asarray(probs, dtype=np.float64).reshape(len(y), len(classes))
    member = sets.prediction_sets(probs) if len(y) else np.zeros((0, len(classes)), dtype=bool)
    covered = member[np.arange(len(y)), y].astype(np.float64)
    size = member.sum(axis=1)
    singleton = size == 1
    right_singleton = (singleton & (covered > 0)).astype(np.float64)
    top = probs.argmax(axis=1) if len(y) else np.zeros(0, dtype=int)
    # The referral rule of cxrnn.inference.predictor.referral: kept when the set is exactly the top class.
    kept = singleton & member[np.arange(len(y)), top]
    right_kept = (kept & (top == y)).astype(np.float64)
    n = len(y)

    def mean(x: np.ndarray) -> float | None:
        return float(np.mean(x)) if len(x) else None

    boot = n_boot > 0 and n > 0
    counts = resample_counts(n, n_boot, seed).astype(np.float64) if boot else None

    def estimate(hit: np.ndarray, among: np.ndarray) -> dict[str, Any]:
        """Share of ``hit`` among the images flagged by ``among``, with its interval over the resamples."""
        k = int(among.sum())
        out: dict[str, Any] = {"estimate": float(hit[among].mean()) if k else None, "n": k}
        if counts is not None and k:
            with np.errstate(invalid="ignore", divide="ignore"):
                reps = (counts @ (hit * among)) / (counts @ among.astype(np.float64))
            out.update(percentile_interval(reps, level))
        else:
            out.update(low=None, high=None)
        return out

    everyone = np.ones(n, dtype=bool)
    singleton_accuracy = estimate(right_singleton, singleton)
    kept_accuracy = estimate(right_kept, kept)
    block: dict[str, Any] = {
        "method": "class-conditional (Mondrian) split conformal, score 1 - p (crepes)",
        "target_coverage": float(sets.coverage),
        "calibrated_on": sets.calibrated_on,
        "evaluated_on": f"{evaluated_on} ({n} images)",
        "calibration_counts": dict(zip(classes, (int(c) for c in sets.calibration_counts))),
        "thresholds": {c: (float(t) if np.isfinite(t) else None) for c, t in zip(classes, sets.thresholds)},
        "warnings": list(sets.warnings),
        "n": n,
        "coverage": estimate(covered, everyone),
        "per_class": {c: estimate(covered, y == i) for i, c in enumerate(classes)},
        "mean_set_size": mean(size.astype(np.float64)),
        "set_sizes": {"empty": mean((size == 0).astype(np.float64)), "singleton": mean(singleton.astype(np.float64)),
                      "multiple": mean((size > 1).astype(np.float64))},
        "singleton_accuracy": singleton_accuracy,
        # the rule "refer unless the set is exactly the top class" (out-of-distribution referral comes on top)
        "operating_point": {"referred": mean((~kept).astype(np.float64)), "kept": mean(kept.astype(np.float64)),
                            "kept_accuracy": kept_accuracy["estimate"],
                            "kept_accuracy_interval": [kept_accuracy["low"], kept_accuracy["high"]]},
        "risk_coverage": risk_coverage(y, probs),
        "ci": {"level": level, "n_boot": int(n_boot) if boot else 0, "method": "percentile bootstrap over the images"},
    }
    return block


def evaluate_to_dir(bundle: ModelBundle, dataset: Dataset, out_dir: str | Path, n_boot: int = DEFAULT_BOOTSTRAP,
                    seed: int = 0, progress: Progress | None = None, batch_size: int = 16,
                    log: Log | None = None) -> EvalResult:
    """``cxrnn evaluate``: predict ``dataset`` with ``bundle`` and write the evaluation folder. With the
    model's conformal calibration, metrics gain the ``conformal`` block for these images (and
    risk_coverage.png); a model without one gets a one-line note there and in ``log`` (default: stderr)."""
    result = evaluate_dataset(bundle, dataset, progress=progress, batch_size=batch_size)
    result.metrics = score_predictions(result.y_true, result.probs, bundle.classes, n_boot, seed)
    sets = ConformalSets.from_extras(bundle.extras)
    if sets is not None and list(sets.classes) == list(bundle.classes):
        result.metrics["conformal"] = conformal_metrics(sets, result.y_true, result.probs, n_boot, seed,
                                                        evaluated_on=f"data {dataset.root}")
    else:
        result.metrics["conformal"] = {"note": NO_CONFORMAL}
        (log or _stderr)(NO_CONFORMAL)
    write_evaluation(out_dir, result.y_true, result.probs, bundle.classes, result.paths, result.metrics)
    return result


def write_evaluation(out_dir: str | Path, y_true: np.ndarray, probs: np.ndarray, classes: Sequence[str],
                     paths: Sequence[str] | None = None, metrics: dict[str, Any] | None = None,
                     before: np.ndarray | None = None) -> dict[str, Any]:
    """metrics.json + confusion_matrix.png + roc.png (+ reliability.png when there are test images, +
    risk_coverage.png when metrics carry a ``conformal`` block with its curve, +
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
    conformal = metrics.get("conformal") or {}
    if conformal.get("risk_coverage") and len(y_true):
        plot_risk_coverage(conformal["risk_coverage"], conformal.get("operating_point"), out / "risk_coverage.png",
                           target=conformal.get("target_coverage"))
    if paths is not None:
        buf = io.StringIO()
        writer = csv.writer(buf)
        writer.writerow(["path", "label", "predicted", *[f"p_{c}" for c in classes]])
        for path, truth, row in zip(paths, y_true, probs):
            writer.writerow([path, classes[int(truth)], classes[int(np.argmax(row))], *[f"{p:.6f}" for p in row]])
        atomic_write_text(out / "predictions.csv", buf.getvalue())
    return metrics


def _stderr(message: str) -> None:
    import sys

    print(f"note: {message}", file=sys.stderr)
