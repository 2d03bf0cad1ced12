"""Class-conditional (Mondrian) split-conformal prediction sets, calibrated with crepes, stored as numbers.

Calibration: the nonconformity of an image for class k is 1 - p_k (crepes' ``hinge``, a.k.a. LAC), and
crepes' ``ConformalClassifier`` is fitted on the calibration images' scores for their true class with the
true class as the Mondrian bin, so each class gets its own guarantee: an image of class k has probability
>= ``coverage`` of k being in its set, for every k, not only on average.

Application must also run where crepes does not (the ONNX path, a server without it), so the fitted
calibrator is reduced to one threshold per class, by crepes' own non-smoothed rule: class k is in the set
iff (#{calibration scores of k >= s} + 1) / (n_k + 1) >= 1 - coverage, i.e. iff s <= t_k. ``prediction_sets``
applies the thresholds; a test checks it against crepes' ``predict_set`` on the same scores.

A class with fewer than 1/(1-coverage) - 1 calibration images cannot be covered at that level by any
threshold: its threshold is +inf (the class is in every set) and ``warnings`` says so, rather than a
false guarantee.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

EXTRAS_KEY = "conformal"
DEFAULT_COVERAGE = 0.9


def check_coverage(coverage: float) -> float:
    if isinstance(coverage, bool) or not isinstance(coverage, (int, float)) or not 0.0 < float(coverage) < 1.0:
        raise ValueError(f"coverage must be strictly between 0 and 1, not {coverage!r}")
    return float(coverage)


def nonconformity(probabilities: np.ndarray) -> np.ndarray:
    """(N, K) scores 1 - p_k: low when the model finds class k likely (crepes.extras.hinge without labels)."""
    return 1.0 - np.asarray(probabilities, dtype=np.float64)


@dataclass(frozen=True)
class ConformalSets:
    """Per-class thresholds on 1 - p_k; ``prediction_sets(probs)`` gives the (N, K) membership mask."""

    classes: tuple[str, ...]
    coverage: float
    thresholds: tuple[float, ...]  # +inf: the class is in every set (too few calibration images)
    calibration_counts: tuple[int, ...]
    calibrated_on: str  # which images: e.g. "validation split (also picked the epoch and temperature)"
    warnings: tuple[str, ...] = field(default=())

    @classmethod
    def calibrate(cls, probabilities: np.ndarray, labels: np.ndarray, classes: Sequence[str],
                  coverage: float = DEFAULT_COVERAGE, calibrated_on: str = "calibration images") -> "ConformalSets":
        """Fit on calibration ``probabilities`` (N, K) (already temperature-scaled) and integer ``labels`` (N,)."""
        from crepes import ConformalClassifier

        coverage = check_coverage(coverage)
        probs = np.asarray(probabilities, dtype=np.float64)
        labels = np.asarray(labels, dtype=np.int64)
        if probs.ndim != 2 or probs.shape[1] != len(classes) or len(labels) != len(probs):
            raise ValueError(f"need (N, {len(classes)}) probabilities and N labels, got {probs.shape} and {labels.shape}")
        scores = nonconformity(probs)[np.arange(len(labels)), labels]
        counts = np.bincount(labels, minlength=len(classes))
        present = counts > 0
        fitted = ConformalClassifier().fit(scores[np.isin(labels, np.flatnonzero(present))],
                                           bins=labels[np.isin(labels, np.flatnonzero(present))]) if present.any() else None
        thresholds, warnings = [], []
        needed = minimum_per_class(coverage)
        for k, name in enumerate(classes):
            own = np.sort(np.asarray(fitted.alphas)[np.asarray(fitted.bins) == k])[::-1] if counts[k] else np.zeros(0)
            thresholds.append(_crepes_threshold(own, coverage))
            if counts[k] < needed:
                warnings.append(f"class {name}: {int(counts[k])} calibration image(s), fewer than the {needed} that "
                                f"coverage {coverage:g} needs: '{name}' is put in every prediction set")
        return cls(tuple(classes), coverage, tuple(float(t) for t in thresholds), tuple(int(c) for c in counts),
                   calibrated_on, tuple(warnings))

    def prediction_sets(self, probabilities: np.ndarray) -> np.ndarray:
        """(N, K) bool: class k is in image n's set. Works on torch's and onnxruntime's float32 outputs alike."""
        probs = np.atleast_2d(np.asarray(probabilities, dtype=np.float64))
        return nonconformity(probs) <= np.asarray(self.thresholds)[None, :]

    def set_names(self, probabilities: np.ndarray) -> list[list[str]]:
        """Class names of each image's set, in the model's class order."""
        return [[c for c, keep in zip(self.classes, row) if keep] for row in self.prediction_sets(probabilities)]

    def to_extras(self) -> dict[str, Any]:
        """Plain numbers for ``model.pt`` (a weights-only load reads them)."""
        return {"classes": list(self.classes), "coverage": self.coverage, "thresholds": list(self.thresholds),
                "calibration_counts": list(self.calibration_counts), "calibrated_on": self.calibrated_on,
                "warnings": list(self.warnings), "score": "1 - p (hinge), class-conditional (Mondrian), crepes"}

    @classmethod
    def from_extras(cls, extras: dict[str, Any] | None) -> "ConformalSets | None":
        """The stored calibration of a model, or None for a model file from before conformal sets existed."""
        entry = (extras or {}).get(EXTRAS_KEY)
        if not entry:
            return None
        return cls(tuple(entry["classes"]), float(entry["coverage"]), tuple(float(t) for t in entry["thresholds"]),
                   tuple(int(c) for c in entry["calibration_counts"]), str(entry.get("calibrated_on", "")),
                   tuple(entry.get("warnings", ())))


def minimum_per_class(coverage: float) -> int:
    """Calibration images a class needs before a finite threshold can promise ``coverage``: 1/(1-coverage)
    (10 for 0.9), the rule the command line states."""
    return int(math.ceil(1.0 / (1.0 - coverage) - 1e-9))


def _crepes_threshold(descending_scores: np.ndarray, coverage: float) -> float:
    """crepes' non-smoothed rule as a threshold: a score s is in the set iff its p-value
    (#{scores >= s} + 1) / (n + 1) >= 1 - coverage (the same float crepes computes), i.e. iff at least
    m calibration scores are >= s, m the smallest count that passes; so the threshold is the m-th largest."""
    level = 1.0 - coverage
    n = len(descending_scores)
    needed = next(m for m in range(n + 1) if (m + 1) / (n + 1) >= level)  # m = n always passes
    return math.inf if needed == 0 else float(descending_scores[needed - 1])
