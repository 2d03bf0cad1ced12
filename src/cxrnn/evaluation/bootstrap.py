"""Percentile bootstrap confidence intervals for the test metrics.

Resampling is vectorised: each replicate is a vector of multinomial counts over the test images,
so confusion matrices and AUCs of all replicates come from matrix products instead of 1000 calls.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

DEFAULT_BOOTSTRAP = 1000  # resamples behind every 95% interval unless told otherwise


def _weighted_auc(counts: np.ndarray, truth: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """AUC (Mann-Whitney, ties count half) of every replicate; NaN where a class is missing."""
    order = np.argsort(scores, kind="mergesort")
    s = scores[order]
    w = counts[:, order].astype(np.float64)
    pos = truth[order].astype(bool)
    starts = np.flatnonzero(np.r_[True, s[1:] != s[:-1]])  # tie groups
    wp = np.add.reduceat(np.where(pos, w, 0.0), starts, axis=1)
    wn = np.add.reduceat(np.where(~pos, w, 0.0), starts, axis=1)
    neg_below = np.cumsum(wn, axis=1) - wn
    total_p, total_n = wp.sum(axis=1), wn.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        auc = (wp * (neg_below + 0.5 * wn)).sum(axis=1) / (total_p * total_n)
    auc[(total_p == 0) | (total_n == 0)] = np.nan
    return auc


def bootstrap_replicates(y_true: Sequence[int], probs: np.ndarray, classes: Sequence[str], n_boot: int = DEFAULT_BOOTSTRAP,
                         seed: int = 0) -> dict[str, np.ndarray]:
    """Metric values of every bootstrap replicate, keyed like the ``ci`` entries."""
    return weighted_metrics(resample_counts(len(y_true), n_boot, seed), y_true, probs, classes)


def resample_counts(n: int, n_boot: int = DEFAULT_BOOTSTRAP, seed: int = 0) -> np.ndarray:
    """(B, N) multinomial counts: how often each of ``n`` images is drawn in each of ``n_boot`` resamples."""
    rng = np.random.default_rng(seed)
    return rng.multinomial(n, np.full(n, 1.0 / n), size=n_boot)


def percentile_interval(values: np.ndarray, level: float = 0.95) -> dict[str, float | None]:
    """``{"low", "high"}`` of the finite ``values`` (None when there are none): the percentile interval."""
    v = np.asarray(values, dtype=np.float64)
    v = v[np.isfinite(v)]
    if len(v) == 0:
        return {"low": None, "high": None}
    alpha = (1.0 - level) / 2
    # Bounds are replicate values themselves: interpolating between two 1.0 replicates gives
    # 0.9999999999999999, an interval that misses a perfect point estimate.
    return {"low": float(np.quantile(v, alpha, method="lower")), "high": float(np.quantile(v, 1 - alpha, method="higher"))}


def weighted_metrics(counts: np.ndarray, y_true: Sequence[int], probs: np.ndarray,
                     classes: Sequence[str]) -> dict[str, np.ndarray]:
    """Metrics of each row of ``counts`` (how often each image is drawn); all-ones gives the plain metrics."""
    y = np.asarray(y_true, dtype=int)
    probs = np.asarray(probs, dtype=np.float64)
    n, k = len(y), len(classes)
    n_boot = len(counts)
    pred = probs.argmax(axis=1)
    cell = np.zeros((n, k * k))
    cell[np.arange(n), y * k + pred] = 1.0
    cm = (counts @ cell).reshape(n_boot, k, k)  # (B, true, pred)
    total = cm.sum(axis=(1, 2))
    tp = np.diagonal(cm, axis1=1, axis2=2)
    actual, predicted = cm.sum(axis=2), cm.sum(axis=1)
    out: dict[str, np.ndarray] = {"accuracy": tp.sum(axis=1) / total}
    with np.errstate(invalid="ignore", divide="ignore"):
        recall = tp / actual
        precision = tp / predicted
        negatives = total[:, None] - actual
        specificity = (negatives - (predicted - tp)) / negatives
        f1 = np.where(actual + predicted > 0, 2 * tp / (actual + predicted), 0.0)
    # sklearn's macro F1 over all labels (zero_division=0): classes absent from both sides count 0.
    out["macro_f1"] = f1.mean(axis=1)
    aucs = np.stack([_weighted_auc(counts, (y == i).astype(int), probs[:, i]) for i in range(k)], axis=1)
    with np.errstate(invalid="ignore"):
        out["macro_auc"] = np.nanmean(np.where(np.isnan(aucs).all(axis=1, keepdims=True), 0, aucs), axis=1)
    out["macro_auc"][np.isnan(aucs).all(axis=1)] = np.nan
    out["macro_precision"] = np.nan_to_num(precision).mean(axis=1)
    out["macro_recall"] = np.nanmean(recall, axis=1) if k else recall
    for i, name in enumerate(classes):
        out[f"{name}/recall"] = recall[:, i]
        out[f"{name}/specificity"] = specificity[:, i]
        out[f"{name}/precision"] = precision[:, i]
        out[f"{name}/auc"] = aucs[:, i]
    return out


def bootstrap_ci(y_true: Sequence[int], probs: np.ndarray, classes: Sequence[str], n_boot: int = DEFAULT_BOOTSTRAP,
                 seed: int = 0, level: float = 0.95) -> dict[str, Any]:
    """Percentile intervals: ``{"level", "n_boot", "accuracy": {"low", "high"}, ..., "per_class": {...}}``."""
    if n_boot <= 0 or len(y_true) == 0:
        return {}
    reps = bootstrap_replicates(y_true, probs, classes, n_boot, seed)

    def interval(values: np.ndarray) -> dict[str, float | None]:
        return percentile_interval(values, level)

    ci: dict[str, Any] = {"level": level, "n_boot": int(n_boot), "method": "percentile bootstrap over test images"}
    for key in ("accuracy", "macro_f1", "macro_auc", "macro_precision", "macro_recall"):
        ci[key] = interval(reps[key])
    ci["per_class"] = {name: {m: interval(reps[f"{name}/{m}"]) for m in ("recall", "specificity", "precision", "auc")}
                       for name in classes}
    return ci
