"""What each image says about itself besides its anatomy, and whether that alone predicts the label.

A classifier that sees only metadata (size, bit depth, mode, file format, global intensity statistics,
the statistics of the corners and borders where scanners burn in text and markers, and the source)
should do no better than always guessing the largest class. If it does, the labels can be learnt
without looking at the lungs: a shortcut a CNN will happily take.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from cxrnn.data.io import ImageReadError, as_read_error, read_image, sniff_format
from cxrnn.utils.hashing import bytes_digest

CORNER = 0.15  # corner patches: 15% of each side, where burned-in labels and markers sit
BORDER = 0.05  # border strips: 5% of the side (collimation edges, padding)


@dataclass
class ImageMeta:
    path: str
    width: int
    height: int
    bit_depth: int
    mode: str
    format: str
    file_bytes: int
    stats: dict[str, float] = field(default_factory=dict)
    sha256: str = ""  # of the file's bytes: the key of every cache, so nothing else reads the file for it


def _header(data: bytes, fmt: str) -> tuple[str, int]:
    """(mode, bits per sample) from the file header without decoding pixels."""
    if fmt == "dicom":
        import pydicom

        ds = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True, force=True)
        bits = int(getattr(ds, "BitsStored", 0) or getattr(ds, "BitsAllocated", 0) or 0)
        return f"DICOM-{getattr(ds, 'PhotometricInterpretation', '?')}", bits
    from PIL import Image

    with Image.open(io.BytesIO(data)) as im:
        mode = im.mode
        bits = {"1": 1, "L": 8, "P": 8, "LA": 8, "RGB": 8, "RGBA": 8, "I;16": 16, "I;16B": 16, "I;16L": 16,
                "I": 32, "F": 32}.get(mode, 8)
        if mode == "I" and im.format == "PNG":
            bits = 16
        return mode, bits


def region_stats(image: np.ndarray) -> dict[str, float]:
    """Global intensity statistics plus those of the four corners and four border strips."""
    h, w = image.shape
    ch, cw = max(1, round(h * CORNER)), max(1, round(w * CORNER))
    bh, bw = max(1, round(h * BORDER)), max(1, round(w * BORDER))
    regions = {
        "all": image,
        "corner_tl": image[:ch, :cw], "corner_tr": image[:ch, -cw:],
        "corner_bl": image[-ch:, :cw], "corner_br": image[-ch:, -cw:],
        "border_top": image[:bh], "border_bottom": image[-bh:],
        "border_left": image[:, :bw], "border_right": image[:, -bw:],
    }
    stats: dict[str, float] = {}
    for name, r in regions.items():
        stats[f"{name}_mean"] = float(r.mean())
        stats[f"{name}_std"] = float(r.std())
        stats[f"{name}_max"] = float(r.max())
    p1, p50, p99 = np.percentile(image, [1, 50, 99])
    stats.update(all_p1=float(p1), all_p50=float(p50), all_p99=float(p99))
    return stats


def read_metadata(paths: Sequence[str | Path], progress: Callable[[int, int], None] | None = None,
                  on_image: Callable[[np.ndarray, str], None] | None = None
                  ) -> tuple[list[ImageMeta | None], list[str]]:
    """Metadata per path (None plus one 'PATH: reason' error for a file that cannot be read).

    ``on_image(image, sha256)`` sees every decoded image while it is in memory, so that a command that
    needs the pixels for something else too (the audit's duplicate hashes) does not decode them again."""
    out: list[ImageMeta | None] = []
    errors: list[str] = []
    for k, p in enumerate(paths):
        try:
            data = Path(p).read_bytes()
            sha256 = bytes_digest(data)
            fmt = sniff_format(data) or "unknown"
            image = read_image(data, name=str(p))
            if on_image is not None:
                on_image(image, sha256)
            try:
                mode, bits = _header(data, fmt)
            except Exception:  # the pixels decoded, so an odd header only loses two columns
                mode, bits = "unknown", 0
            out.append(ImageMeta(str(p), image.shape[1], image.shape[0], bits, mode, fmt, len(data),
                                 region_stats(image), sha256))
        except (ImageReadError, OSError) as exc:
            errors.append(str(as_read_error(p, exc)))
            out.append(None)
        if progress:
            progress(k + 1, len(paths))
    return out, errors


def feature_matrix(metas: Sequence[ImageMeta], sources: Sequence[str | None] | None = None
                   ) -> tuple[np.ndarray, list[str]]:
    """Numeric design matrix: numbers as they are, categories (mode, format, source) one-hot."""
    numeric = ["width", "height", "bit_depth", "file_bytes"]
    stat_names = list(metas[0].stats) if metas else []
    columns = [np.array([getattr(m, c) for m in metas], dtype=float) for c in numeric]
    names = list(numeric)
    columns.append(np.array([m.width / max(1, m.height) for m in metas], dtype=float))
    names.append("aspect")
    for s in stat_names:
        columns.append(np.array([m.stats[s] for m in metas], dtype=float))
        names.append(s)
    categorical = {"mode": [m.mode for m in metas], "format": [m.format for m in metas]}
    if sources is not None and any(s for s in sources):
        categorical["source"] = [s or "" for s in sources]
    for cat, values in categorical.items():
        levels = sorted(set(values))
        if len(levels) < 2:
            continue  # a constant column tells the classifier nothing
        for level in levels:
            columns.append(np.array([v == level for v in values], dtype=float))
            names.append(f"{cat}={level}")
    return np.stack(columns, axis=1) if columns else np.zeros((len(metas), 0)), names


def chance_accuracy(labels: np.ndarray) -> float:
    """Accuracy of always answering the largest class: the bar a content-free classifier reaches."""
    return float(np.bincount(labels).max() / len(labels)) if len(labels) else float("nan")


def cross_validated_accuracy(x: np.ndarray, y: np.ndarray, groups: np.ndarray | None = None, folds: int = 5,
                             seed: int = 0) -> dict[str, Any]:
    """Out-of-fold accuracy of a random forest, with the chance level and a binomial p-value against it."""
    from scipy.stats import binomtest
    from sklearn.ensemble import RandomForestClassifier
    from sklearn.model_selection import StratifiedGroupKFold, StratifiedKFold

    y = np.asarray(y, dtype=int)
    smallest = int(np.bincount(y)[np.bincount(y) > 0].min()) if len(y) else 0
    folds = min(folds, smallest)
    chance = chance_accuracy(y)
    if folds < 2 or x.shape[1] == 0:
        return {"accuracy": None, "chance": chance, "folds": folds, "reason": "too few images per class"}
    pred = np.empty_like(y)
    if groups is not None and len(np.unique(groups)) >= folds:
        splits = StratifiedGroupKFold(folds, shuffle=True, random_state=seed).split(x, y, groups)
    else:
        splits = StratifiedKFold(folds, shuffle=True, random_state=seed).split(x, y)
    for train, test in splits:
        clf = RandomForestClassifier(n_estimators=100, min_samples_leaf=2, random_state=seed, n_jobs=-1)
        clf.fit(x[train], y[train])
        pred[test] = clf.predict(x[test])
    correct = int((pred == y).sum())
    accuracy = correct / len(y)
    p_value = float(binomtest(correct, len(y), min(max(chance, 1e-9), 1 - 1e-9), alternative="greater").pvalue)
    clf = RandomForestClassifier(n_estimators=100, min_samples_leaf=2, random_state=seed, n_jobs=-1).fit(x, y)
    return {"accuracy": accuracy, "chance": chance, "skill": (accuracy - chance) / (1 - chance) if chance < 1 else 0.0,
            "p_value": p_value, "folds": folds, "n": int(len(y)), "importances": clf.feature_importances_}


def metadata_shortcut(metas: Sequence[ImageMeta], labels: np.ndarray, sources: Sequence[str | None] | None = None,
                      groups: np.ndarray | None = None, seed: int = 0) -> dict[str, Any]:
    """Cross-validated accuracy of predicting the label from metadata alone, with the most used features."""
    x, names = feature_matrix(metas, sources)
    result = cross_validated_accuracy(x, labels, groups, seed=seed)
    importances = result.pop("importances", None)
    if importances is not None:
        order = np.argsort(-importances)[:8]
        result["top_features"] = [{"feature": names[i], "importance": float(importances[i])} for i in order]
    result["features"] = names
    return result
