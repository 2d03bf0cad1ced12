"""Classification metrics, always keyed by class name (never by bare index)."""

from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np
from sklearn.metrics import confusion_matrix, f1_score, precision_recall_fscore_support, roc_auc_score


def _auc(binary_truth: np.ndarray, scores: np.ndarray) -> float | None:
    if binary_truth.min() == binary_truth.max():
        return None  # undefined with one class only
    return float(roc_auc_score(binary_truth, scores))


def compute_metrics(y_true: Sequence[int], probs: np.ndarray, classes: Sequence[str]) -> dict[str, Any]:
    """The metrics.json schema: n, classes, accuracy, macro_f1, macro_auc, confusion_matrix, per_class."""
    y_true = np.asarray(y_true, dtype=int)
    probs = np.asarray(probs, dtype=np.float64)
    k = len(classes)
    y_pred = probs.argmax(axis=1)
    labels = list(range(k))
    cm = confusion_matrix(y_true, y_pred, labels=labels)
    precision, recall, f1, support = precision_recall_fscore_support(
        y_true, y_pred, labels=labels, zero_division=0
    )
    per_class: dict[str, dict[str, Any]] = {}
    aucs = []
    for i, name in enumerate(classes):
        negatives = cm.sum() - cm[i].sum()
        true_neg = negatives - (cm[:, i].sum() - cm[i, i])
        auc = _auc((y_true == i).astype(int), probs[:, i])
        if auc is not None:
            aucs.append(auc)
        per_class[name] = {
            "precision": float(precision[i]),
            "recall": float(recall[i]),
            "specificity": float(true_neg / negatives) if negatives else None,
            "f1": float(f1[i]),
            "auc": auc,
            "support": int(support[i]),
        }
    return {
        "n": int(len(y_true)),
        "classes": list(classes),
        "accuracy": float((y_pred == y_true).mean()) if len(y_true) else math.nan,
        "macro_f1": float(f1_score(y_true, y_pred, labels=labels, average="macro", zero_division=0)),
        "macro_auc": float(np.mean(aucs)) if aucs else None,
        "confusion_matrix": cm.tolist(),
        "per_class": per_class,
    }
