"""Confusion matrix, ROC and risk-coverage plots, labelled with class names."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from sklearn.metrics import auc, roc_curve  # noqa: E402

from cxrnn.utils.atomic import atomic_write  # noqa: E402


def save_figure(fig: "plt.Figure", path: str | Path) -> Path:
    """Save ``fig`` as PNG through the one atomic-write helper and close it (two runs writing plots at once
    never see each other's half-written files)."""
    try:
        return atomic_write(path, lambda fh: fig.savefig(fh, format="png", dpi=120, bbox_inches="tight"))
    finally:
        plt.close(fig)


def plot_confusion_matrix(cm: Sequence[Sequence[int]], classes: Sequence[str], path: str | Path,
                          title: str = "Confusion matrix") -> Path:
    cm = np.asarray(cm)
    fig, ax = plt.subplots(figsize=(1.6 + 1.2 * len(classes), 1.2 + 1.2 * len(classes)))
    ax.imshow(cm, cmap="Blues")
    ax.set_xticks(range(len(classes)), classes, rotation=30, ha="right")
    ax.set_yticks(range(len(classes)), classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    threshold = cm.max() / 2 if cm.size else 0
    for i in range(cm.shape[0]):
        for j in range(cm.shape[1]):
            ax.text(j, i, str(cm[i, j]), ha="center", va="center",
                    color="white" if cm[i, j] > threshold else "black")
    return save_figure(fig, path)


def plot_roc(y_true: Sequence[int], probs: np.ndarray, classes: Sequence[str], path: str | Path) -> Path:
    y_true = np.asarray(y_true)
    fig, ax = plt.subplots(figsize=(5, 5))
    for i, name in enumerate(classes):
        truth = (y_true == i).astype(int)
        if truth.min() == truth.max():
            continue
        fpr, tpr, _ = roc_curve(truth, probs[:, i])
        ax.plot(fpr, tpr, label=f"{name} (AUC {auc(fpr, tpr):.3f})")
    ax.plot([0, 1], [0, 1], "k:", lw=1)
    ax.set_xlabel("false positive rate (1 - specificity)")
    ax.set_ylabel("true positive rate (sensitivity)")
    ax.set_title("ROC, one class vs rest")
    ax.legend(loc="lower right")
    return save_figure(fig, path)


def plot_risk_coverage(curve: Sequence[dict[str, Any]], operating_point: dict[str, Any] | None, path: str | Path,
                       target: float | None = None) -> Path:
    """Accuracy of the images kept against the share kept (most confident first), with the conformal
    rule's operating point (keep the singleton sets, refer the rest) as a marker."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5, 4.2))
    ax = fig.add_subplot()
    points = [(p["kept"], p["accuracy"]) for p in curve if p.get("accuracy") is not None]
    if points:
        ax.plot([k for k, _ in points], [a for _, a in points], "o-", ms=3,
                label="keep the most confident (top-class probability)")
    if operating_point and operating_point.get("kept_accuracy") is not None:
        label = "prediction sets: keep singletons, refer the rest"
        if target is not None:
            label += f" (coverage {target:g})"
        ax.plot([operating_point["kept"]], [operating_point["kept_accuracy"]], "r*", ms=12, label=label)
    elif operating_point and operating_point.get("kept") == 0:
        ax.text(0.02, 0.06, "prediction sets: no singleton, every image referred", transform=ax.transAxes,
                color="red", fontsize=8)
    ax.set_xlim(0, 1.02)
    ax.set_ylim(min([0.5] + [a for _, a in points]) - 0.02, 1.02)
    ax.set_xlabel("share of images kept (the rest referred)")
    ax.set_ylabel("accuracy of the kept images")
    ax.set_title("Risk-coverage")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower left", fontsize=8)
    return save_figure(fig, path)
