"""Evaluation protocols that train more than one head on the cached features: k-fold cross-validation
on the non-test part, and leave-one-source-out (each hospital held out in turn).

Every fold and every held-out source starts from a fresh head (no warm start across folds, unlike the
seed code), and nothing here ever sees the test split except to score it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch

from cxrnn.data.splits import holdout, kfold
from cxrnn.evaluation.bootstrap import bootstrap_ci
from cxrnn.evaluation.calibration import calibrate
from cxrnn.evaluation.metrics import compute_metrics
from cxrnn.features.matrix import FeatureRows
from cxrnn.models.network import CxrNet
from cxrnn.training.config import TrainConfig
from cxrnn.training.loop import fit_head
from cxrnn.training.run import PreparedData

NetworkFactory = Callable[[int], CxrNet]
HeadLogits = Callable[[torch.nn.Module, np.ndarray], np.ndarray]  # (head, feature rows) -> logits


@dataclass
class KeptFold:
    """The fold kept as the model (lowest validation loss), with the logits computed while scoring it."""

    net: CxrNet
    history: list[dict]
    folds: list[dict]
    val_rows: np.ndarray
    val_logits: np.ndarray
    test_logits: np.ndarray


def _probs(logits: np.ndarray) -> np.ndarray:
    return torch.softmax(torch.from_numpy(logits), dim=1).numpy() if len(logits) else np.zeros((0, 0))


def _summary(m: dict[str, Any]) -> dict[str, Any]:
    return {k: m[k] for k in ("n", "accuracy", "macro_f1", "macro_auc")}


def fit_kfold(features: np.ndarray, data: PreparedData, cfg: TrainConfig, new_network: NetworkFactory, logits: HeadLogits,
              progress: Callable[[str, int, int], None] | None, log: Callable[[str], None]) -> KeptFold:
    """k-fold on the non-test part of ``data``; each fold is scored on its validation part
    and on the test split, and the fold with the lowest validation loss is kept."""
    labels, split, classes = data.labels, data.split, data.dataset.classes
    rest = np.concatenate([split.train, split.val])
    rows: list[dict] = []
    kept: KeptFold | None = None
    best_loss, best_fold = np.inf, 0
    for k, (tr, va) in enumerate(kfold(labels, rest, cfg.folds, cfg.seed, data.groups)):
        net = new_network(cfg.seed + k)
        fit = fit_head(net.head, FeatureRows(features, tr), labels[tr], FeatureRows(features, va), labels[va],
                       cfg, cfg.seed + k,
                       on_epoch=(lambda row: progress("epoch", row["epoch"], cfg.epochs)) if progress else None)
        val_logits, test_logits = logits(net.head, va), logits(net.head, split.test)
        row = {
            "fold": k + 1,
            "n_train": int(len(tr)),
            "n_val": int(len(va)),
            "best_epoch": fit.best_epoch,
            "val_loss": fit.best_val_loss,
            "val": _summary(compute_metrics(labels[va], _probs(val_logits), classes)),
            "test": _summary(compute_metrics(labels[split.test], _probs(test_logits), classes)),
        }
        rows.append(row)
        log(f"fold {k + 1}/{cfg.folds}: val acc {row['val']['accuracy']:.3f}, test acc {row['test']['accuracy']:.3f}")
        if progress:
            progress("fold", k + 1, cfg.folds)
        if kept is None or fit.best_val_loss < best_loss:
            best_loss, best_fold = fit.best_val_loss, k + 1
            kept = KeptFold(net, fit.history, rows, va, val_logits, test_logits)
    assert kept is not None  # kfold yields cfg.folds >= 2 folds
    log(f"kept fold {best_fold} (lowest validation loss) as the model")
    return kept


def leave_one_source_out(data: PreparedData, features: np.ndarray, cfg: TrainConfig, new_network: NetworkFactory,
                         logits: HeadLogits, log: Callable[[str], None]) -> dict[str, Any]:
    """Hold out each source in turn: train (fresh) on the others, calibrate on their validation part, test on it."""
    sources, labels, classes = data.sources(), data.labels, data.dataset.classes
    if any(s is None for s in sources):
        raise ValueError("--leave-one-source-out needs a source for every image (a manifest with a source column)")
    names = sorted(set(sources))  # type: ignore[arg-type]
    if len(names) < 2:
        raise ValueError(f"--leave-one-source-out needs at least two sources, found {len(names)}")
    src = np.array(sources)
    rows: dict[str, Any] = {}
    for k, name in enumerate(names):
        test = np.flatnonzero(src == name)
        rest = np.flatnonzero(src != name)
        try:
            train, val = holdout(labels, cfg.val_size, cfg.seed + 1, data.groups, candidates=rest)
        except ValueError:  # too few groups or a class too small for a stratified hold-out
            train, val = rest, rest[:0]
        net = new_network(cfg.seed + 100 + k)
        fit_head(net.head, FeatureRows(features, train), labels[train], FeatureRows(features, val), labels[val],
                 cfg, cfg.seed + 100 + k)
        t, _, probs, cal = calibrate(logits(net.head, val), labels[val], logits(net.head, test), labels[test])
        m = compute_metrics(labels[test], probs, classes)
        row = {"n_train": int(len(train)), "n_val": int(len(val)), "n_test": int(len(test)),
               "accuracy": m["accuracy"], "macro_f1": m["macro_f1"], "macro_auc": m["macro_auc"],
               "per_class_recall": {c: m["per_class"][c]["recall"] for c in classes},
               "temperature": t, "ece": cal.get("ece_after", cal["ece_before"])}
        if cfg.bootstrap:
            row["ci"] = {key: v for key, v in bootstrap_ci(labels[test], probs, classes, cfg.bootstrap, cfg.seed).items()
                         if key in ("accuracy", "macro_f1", "macro_auc", "level", "n_boot")}
        rows[name] = row
        log(f"held out {name}: accuracy {row['accuracy']:.3f} on {len(test)} images")
    accs = [r["accuracy"] for r in rows.values()]
    return {"sources": rows, "mean_accuracy": float(np.mean(accs)),
            "std_accuracy": float(np.std(accs, ddof=1)) if len(accs) > 1 else 0.0}
