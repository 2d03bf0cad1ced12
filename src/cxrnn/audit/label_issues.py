"""Suspected label errors: out-of-fold class probabilities from a cheap model, then confident learning.

The cheap model is a standardised logistic regression on the pooled (spatial mean) frozen-backbone
features from the feature store (the model's backbone under ``--model``, else the default
``efficientnet_lite0`` with its offline ImageNet weights). Its class probabilities are out of fold:
``StratifiedGroupKFold`` over the duplicate groups (and patient ids, where the manifest repeats them), so
no copy of an image helps predict it; the folds are repeated with ``REPEATS`` shuffles and averaged,
which steadies the ranking on small sets. cleanlab's ``find_label_issues`` gives the flagged set and
``get_label_quality_scores`` (self-confidence: the out-of-fold probability of the given label) the
ranking; every image is ranked, because ``find_label_issues`` does not flag every true error.

With a weak cheap model the flags include its own mistakes as well as wrong labels: the report gives its
out-of-fold agreement with the given labels next to the flagged share.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from cxrnn.data.dataset import Dataset

DEFAULT_BACKBONE = "efficientnet_lite0"  # what the audit extracts with when it has no model
FOLDS = 5
REPEATS = 3  # shuffled repeats of the k folds, averaged
C = 0.01  # inverse L2 strength of the probe (1280 standardised features, ~100 training images a fold)
TOP = 50  # suspects listed in audit.json
GRID = 16  # suspects drawn in the thumbnail grid
GRID_NAME = "label_issues.png"

Progress = Callable[[int, int], None]


def pooled_features(dataset: Dataset, digests: Sequence[str | None] | None, cache_dir: str | Path | None = None,
                    bundle: Any = None, progress: Progress | None = None) -> tuple[np.ndarray, list[int], str]:
    """(N, C) spatial-mean features of the readable samples, their indices into ``dataset.samples`` and
    the backbone's name. ``digests`` (the files' sha256, None for a file found unreadable) spare a
    second read of files already in the store."""
    from cxrnn.features.store import FeatureStore
    from cxrnn.models.backbones import create_backbone

    backbone = bundle.net.backbone if bundle is not None else create_backbone(DEFAULT_BACKBONE)
    store = FeatureStore(backbone, cache_dir)
    fs = store.extract([s.path for s in dataset.samples], digests=digests, progress=progress,
                       warn=lambda msg: None)
    if not fs.kept:
        return np.zeros((0, 0), dtype=np.float32), [], backbone.spec.name
    return np.asarray(fs.features).mean(axis=(2, 3)), list(fs.kept), backbone.spec.name


def out_of_fold_probabilities(x: np.ndarray, y: np.ndarray, groups: np.ndarray, n_classes: int, folds: int,
                              seed: int = 0, repeats: int = REPEATS) -> np.ndarray:
    """(N, n_classes) class probabilities, each row from models that never saw that row's group."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedGroupKFold
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    total = np.zeros((len(y), n_classes))
    for r in range(repeats):
        cv = StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=seed + r)
        for train, test in cv.split(x, y, groups):
            clf = make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000, C=C))
            clf.fit(x[train], y[train])
            cols = clf.classes_  # a class missing from a training fold gets probability 0 there
            total[np.ix_(test, cols)] += clf.predict_proba(x[test])
    total /= repeats
    return total / np.clip(total.sum(axis=1, keepdims=True), 1e-12, None)


def find_suspects(x: np.ndarray, y: np.ndarray, groups: np.ndarray, classes: Sequence[str], paths: Sequence[str],
                  seed: int = 0, top: int = TOP) -> dict[str, Any]:
    """Confident learning over out-of-fold probabilities; ``{"reason": ...}`` when the set is too small."""
    import cleanlab
    from cleanlab.filter import find_label_issues
    from cleanlab.rank import get_label_quality_scores

    present = np.unique(y)
    if len(present) < 2:
        return {"reason": "fewer than two classes with readable images"}
    # cleanlab wants labels 0..K-1 over the classes present
    remap = {int(c): k for k, c in enumerate(present)}
    yk = np.array([remap[int(v)] for v in y])
    names = [classes[int(c)] for c in present]
    smallest = int(np.bincount(yk).min())
    folds = min(FOLDS, smallest, len(np.unique(groups)))
    if folds < 2:
        return {"reason": f"a class has {smallest} readable image(s): too few for {FOLDS}-fold (or even 2-fold) "
                          "out-of-fold probabilities"}
    probs = out_of_fold_probabilities(x, yk, groups, len(names), folds, seed)
    flagged = np.zeros(len(yk), dtype=bool)
    flagged[find_label_issues(yk, probs, return_indices_ranked_by="self_confidence")] = True
    scores = get_label_quality_scores(yk, probs, method="self_confidence")
    order = np.argsort(scores, kind="stable")
    suggested = probs.argmax(axis=1)
    suspects = [{"rank": r + 1, "path": str(paths[i]), "given": names[yk[i]], "suggested": names[suggested[i]],
                 "score": round(float(scores[i]), 4), "suggested_probability": round(float(probs[i, suggested[i]]), 4),
                 "flagged_by_cleanlab": bool(flagged[i])}
                for r, i in enumerate(order[:top])]
    return {"n": int(len(yk)), "n_flagged": int(flagged.sum()), "flagged_share": float(flagged.mean()),
            "oof_accuracy": float((suggested == yk).mean()), "folds": folds, "repeats": REPEATS,
            "method": "self_confidence", "cleanlab_version": cleanlab.__version__, "suspects": suspects}


def write_grid(suspects: Sequence[dict[str, Any]], path: str | Path, n: int = GRID, cols: int = 4) -> Path | None:
    """The top ``n`` suspects as captioned thumbnails (given -> suggested, score) in one PNG; None when
    there is none to draw. Files that cannot be read again are drawn as a blank tile."""
    from matplotlib.figure import Figure

    from cxrnn.data.io import read_image
    from cxrnn.utils.atomic import atomic_write_bytes

    shown = list(suspects[:n])
    if not shown:
        return None
    cols = min(cols, len(shown))
    rows = -(-len(shown) // cols)
    fig = Figure(figsize=(2.4 * cols, 2.7 * rows), dpi=100, layout="constrained")
    axes = np.atleast_1d(fig.subplots(rows, cols, squeeze=False)).ravel()
    for ax in axes:
        ax.set_axis_off()
    for ax, s in zip(axes, shown):
        try:
            image = read_image(s["path"])
            step = max(1, max(image.shape[:2]) // 256)  # a thumbnail needs no more than ~256 px
            ax.imshow(image[::step, ::step], cmap="gray", vmin=0, vmax=1)
        except Exception:  # noqa: BLE001 - a file gone since the audit read it: leave its tile blank
            pass
        ax.set_title(f"#{s['rank']} {s['given']} -> {s['suggested']}\nscore {s['score']:.3f}"
                     + (" (flagged)" if s["flagged_by_cleanlab"] else ""), fontsize=8)
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return atomic_write_bytes(path, buf.getvalue())
