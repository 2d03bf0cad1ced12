"""Stratified train/validation/test splits and k-fold, optionally keeping groups together.

Groups (patient, source, or near-duplicate cluster) never straddle a split: members of one group all
land on the same side, so copies of one image cannot leak from training into test.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from sklearn.model_selection import StratifiedGroupKFold, StratifiedKFold, train_test_split


@dataclass(frozen=True)
class Split:
    train: np.ndarray
    val: np.ndarray
    test: np.ndarray


def holdout(
    labels: np.ndarray,
    fraction: float,
    seed: int,
    groups: np.ndarray | None = None,
    candidates: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Split ``candidates`` (default: all indices) into (keep, held_out) with ~fraction held out."""
    idx = np.arange(len(labels)) if candidates is None else np.asarray(candidates)
    if fraction <= 0:
        return idx, idx[:0]
    if groups is None:
        # A stratified hold-out needs at least one image per class on each side; small datasets get
        # that minimum rather than an error.
        n_classes = len(np.unique(labels[idx]))
        n_out = min(max(int(np.ceil(fraction * len(idx))), n_classes), len(idx) - n_classes)  # sklearn rounds up too
        if n_out < n_classes:
            raise ValueError(f"{len(idx)} images are too few for a stratified {fraction:.0%} hold-out")
        keep, out = train_test_split(idx, test_size=n_out, stratify=labels[idx], random_state=seed)
        return np.sort(keep), np.sort(out)
    # sklearn refuses more folds than the largest class has members: small sets hold out 1/that instead.
    largest_class = int(np.unique(labels[idx], return_counts=True)[1].max())
    n_splits = max(2, min(int(round(1.0 / fraction)), largest_class))
    n_groups = len(np.unique(groups[idx]))
    if n_groups < n_splits:
        raise ValueError(f"only {n_groups} groups: too few for a {fraction:.0%} group-wise hold-out")
    splitter = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed)
    keep, out = next(splitter.split(idx, labels[idx], groups[idx]))
    return np.sort(idx[keep]), np.sort(idx[out])


def train_val_test_split(
    labels: np.ndarray,
    test_size: float = 0.2,
    val_size: float = 0.1,
    seed: int = 0,
    groups: np.ndarray | None = None,
) -> Split:
    """Test first (``test_size`` of all), then validation (``val_size`` of the rest)."""
    rest, test = holdout(labels, test_size, seed, groups)
    train, val = holdout(labels, val_size, seed + 1, groups, candidates=rest)
    return Split(train, val, test)


def kfold(
    labels: np.ndarray,
    candidates: np.ndarray,
    folds: int,
    seed: int = 0,
    groups: np.ndarray | None = None,
) -> list[tuple[np.ndarray, np.ndarray]]:
    """(train, val) index pairs over ``candidates`` only — the test part never enters a fold."""
    candidates = np.asarray(candidates)
    y = labels[candidates]
    if groups is None:
        splitter = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
        parts = splitter.split(candidates, y)
    else:
        splitter = StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=seed)
        parts = splitter.split(candidates, y, groups[candidates])
    return [(np.sort(candidates[tr]), np.sort(candidates[va])) for tr, va in parts]
