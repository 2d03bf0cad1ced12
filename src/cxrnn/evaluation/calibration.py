"""Calibration: expected calibration error, reliability diagrams and temperature scaling.

Temperature scaling (Guo et al., 2017) divides the logits by one scalar T fitted on validation data;
it changes confidence but never the predicted class, so accuracy is untouched.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

DEFAULT_BINS = 15


def _bin_stats(probs: np.ndarray, y_true: np.ndarray, bins: int) -> list[dict[str, float]]:
    probs = np.asarray(probs, dtype=np.float64)
    y_true = np.asarray(y_true, dtype=int)
    confidence = probs.max(axis=1)
    correct = (probs.argmax(axis=1) == y_true).astype(float)
    edges = np.linspace(0.0, 1.0, bins + 1)
    # Right-closed bins: a confidence of exactly 1.0 belongs to the last bin.
    which = np.clip(np.searchsorted(edges, confidence, side="left") - 1, 0, bins - 1)
    rows = []
    for b in range(bins):
        sel = which == b
        rows.append({"low": float(edges[b]), "high": float(edges[b + 1]), "count": int(sel.sum()),
                     "confidence": float(confidence[sel].mean()) if sel.any() else float("nan"),
                     "accuracy": float(correct[sel].mean()) if sel.any() else float("nan")})
    return rows


def expected_calibration_error(probs: np.ndarray, y_true: np.ndarray, bins: int = DEFAULT_BINS) -> float:
    """Confidence-weighted |accuracy - confidence| over equal-width confidence bins (top-label ECE)."""
    n = len(y_true)
    if n == 0:
        return float("nan")
    return float(sum(r["count"] / n * abs(r["accuracy"] - r["confidence"])
                     for r in _bin_stats(probs, y_true, bins) if r["count"]))


def calibration_summary(probs: np.ndarray, y_true: np.ndarray, bins: int = DEFAULT_BINS) -> dict[str, Any]:
    rows = _bin_stats(probs, y_true, bins)
    return {"ece": expected_calibration_error(probs, y_true, bins), "bins": bins,
            "reliability": [{k: (None if isinstance(v, float) and np.isnan(v) else v) for k, v in r.items()}
                            for r in rows]}


def fit_temperature(logits: np.ndarray | torch.Tensor, y_true: np.ndarray, max_iter: int = 100) -> float:
    """T > 0 minimising the negative log-likelihood of softmax(logits / T) (LBFGS on log T)."""
    z = torch.as_tensor(np.asarray(logits), dtype=torch.float64)
    y = torch.as_tensor(np.asarray(y_true), dtype=torch.long)
    if len(z) == 0:
        return 1.0
    log_t = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([log_t], lr=0.1, max_iter=max_iter, line_search_fn="strong_wolfe")
    loss_fn = torch.nn.CrossEntropyLoss()

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = loss_fn(z / log_t.exp(), y)
        loss.backward()
        return loss

    optimizer.step(closure)
    t = float(log_t.exp().item())
    # A tiny or degenerate validation set can push T to an extreme; keep it in a sane range.
    return float(np.clip(t, 0.05, 20.0)) if np.isfinite(t) else 1.0


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    z = np.asarray(logits, dtype=np.float64) / temperature
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def plot_reliability(probs: np.ndarray, y_true: np.ndarray, path: str | Path, bins: int = DEFAULT_BINS,
                     title: str = "Reliability diagram", before: np.ndarray | None = None) -> Path:
    """Accuracy per confidence bin against the diagonal; ``before`` adds the uncalibrated curve."""
    from cxrnn.evaluation.plots import plt, save_figure

    fig, ax = plt.subplots(figsize=(5, 5))
    ax.plot([0, 1], [0, 1], "k:", lw=1, label="perfect calibration")
    curves = [("before temperature scaling", before), ("model", probs)] if before is not None else [("model", probs)]
    for label, p in curves:
        rows = [r for r in _bin_stats(p, y_true, bins) if r["count"]]
        ece = expected_calibration_error(p, y_true, bins)
        ax.plot([r["confidence"] for r in rows], [r["accuracy"] for r in rows], "o-",
                label=f"{label} (ECE {ece:.3f})")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel("confidence (top-class probability)")
    ax.set_ylabel("accuracy")
    ax.set_title(title)
    ax.legend(loc="upper left", fontsize=8)
    return save_figure(fig, path)


def calibrate(val_logits: np.ndarray, y_val: np.ndarray, test_logits: np.ndarray, y_test: np.ndarray
              ) -> tuple[float, np.ndarray, np.ndarray, dict[str, Any]]:
    """Fit T on validation logits; return (T, test probs before, after, the calibration block)."""
    before = softmax(test_logits)
    if len(val_logits) == 0:
        return 1.0, before, before, {"temperature": 1.0, "fitted_on": None,
                                     "ece_before": expected_calibration_error(before, y_test)}
    t = fit_temperature(val_logits, y_val)
    after = softmax(test_logits, t)
    block = {"temperature": t, "fitted_on": f"validation split ({len(y_val)} images)",
             "ece_before": expected_calibration_error(before, y_test),
             "ece_after": expected_calibration_error(after, y_test),
             "val_ece_before": expected_calibration_error(softmax(val_logits), y_val),
             "val_ece_after": expected_calibration_error(softmax(val_logits, t), y_val)}
    return t, before, after, block
