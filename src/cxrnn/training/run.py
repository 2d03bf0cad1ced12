"""What every training run shares: the data preparation before the fit and the tail after it.

A run (``cxrnn.training.pipeline.train``) is: read the dataset -> the fitter reads the images (cached
features or decoded pixels) -> :func:`prepare_data` (duplicate-aware groups, split) -> fit ->
:func:`finish_run`. The two fitters (``training.frozen`` and ``training.finetune``) differ only in how
the network is fitted; everything after the fit comes from here, so every run gets the same
temperature scaling, bootstrap intervals, ECE, reliability diagram, conformal prediction sets (with
their test coverage and risk-coverage curve), out-of-distribution statistics, model file (with what
was measured, for the model card), history and report.

Every artefact of a run lands in its run directory: config.yaml, model.pt, history.csv, metrics.json,
confusion_matrix.png, roc.png, reliability.png, risk_coverage.png, predictions.csv and report.md.
"""

from __future__ import annotations

import csv
import io
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np

from cxrnn.audit.duplicates import duplicate_group_ids
from cxrnn.data.groups import combine_groups
from cxrnn.data.dataset import Dataset
from cxrnn.data.splits import Split, train_val_test_split
from cxrnn.evaluation.calibration import calibrate, softmax
from cxrnn.evaluation.report import write_report
from cxrnn.evaluation.scoring import conformal_metrics, score_predictions, write_evaluation
from cxrnn.models.bundle import BUNDLE_METRICS, ModelBundle, save_bundle
from cxrnn.models.conformal import EXTRAS_KEY as CONFORMAL_KEY, ConformalSets
from cxrnn.models.network import CxrNet
from cxrnn.models.ood import ood_extras
from cxrnn.models.backbones import Preprocessing
from cxrnn.training.config import TrainConfig
from cxrnn.utils.atomic import atomic_write_text

# (stage, done, total) -> None; stages: "extract", "epoch", "fold"
Progress = Callable[[str, int, int], None]
Log = Callable[[str], None]


@dataclass
class TrainResult:
    run_dir: Path
    model_path: Path
    metrics: dict[str, Any]
    history: list[dict]
    folds: list[dict] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    cache: dict[str, int] = field(default_factory=dict)
    skipped: list[str] = field(default_factory=list)


@dataclass
class PreparedData:
    """What a run knows before fitting: the readable images, their labels and the split over them.

    Positions in ``labels``, ``paths`` and the split index the readable images (``kept``), not the dataset.
    """

    dataset: Dataset
    kept: list[int]  # dataset positions of the readable images
    labels: np.ndarray
    paths: list[str]
    groups: np.ndarray | None  # manifest groups united with duplicate groups (None: every image alone)
    split: Split
    split_info: dict[str, Any]
    skipped: list[str] = field(default_factory=list)

    def sources(self) -> list[str | None]:
        return [self.dataset.samples[i].source for i in self.kept]


@dataclass
class FittedModel:
    """What a fitter hands to the shared tail."""

    net: CxrNet
    preprocessing: Preprocessing
    weights_id: str  # identity of the backbone's weights: keys the feature store
    head_options: dict[str, Any]
    feature_hw: tuple[int, int]
    history: list[dict]
    calibration_rows: np.ndarray  # rows whose logits fit the temperature
    calibration_logits: np.ndarray
    test_logits: np.ndarray
    pooled_features: Callable[[np.ndarray], np.ndarray]  # rows -> (N, C) mean-pooled backbone maps
    folds: list[dict] = field(default_factory=list)
    extra_metrics: dict[str, Any] = field(default_factory=dict)  # protocol results (leave-one-source-out)
    timings: dict[str, float] = field(default_factory=dict)
    cache: dict[str, int] = field(default_factory=dict)


def group_array(dataset: Dataset, column: str | None) -> np.ndarray | None:
    """Group ids for a group-wise split from a manifest column (patient_id, source or any extra column)."""
    if not column:
        return None
    values = []
    for s in dataset.samples:
        value = getattr(s, column, None) if column in ("patient_id", "source") else s.extra.get(column)
        if value in (None, ""):
            raise ValueError(f"--group-by {column}: {s.path} has no {column} (use a CSV manifest with that column)")
        values.append(str(value))
    return np.array(values)


def split_groups(paths: Sequence[str], manifest_groups: np.ndarray | None, cfg: TrainConfig, log: Log,
                 digests: Sequence[str | None] | None = None, hashes: Iterable[Any] = ()
                 ) -> tuple[np.ndarray | None, dict[str, Any]]:
    """Groups for the splitter: duplicate groups (exact + near) united with the manifest groups.

    ``digests`` (the files' sha256) and ``hashes`` (duplicate hashes computed while the fitter decoded
    the images) spare the duplicate pass reading and decoding every file a second time.
    """
    info: dict[str, Any] = {"dedup": cfg.dedup}
    if not cfg.dedup:
        return manifest_groups, info
    ids, report = duplicate_group_ids(paths, cfg.near_duplicate_threshold, cfg.cache_dir,
                                      align_threshold=cfg.align_threshold, digests=digests, hashes=hashes)
    n_in_groups = int(sum(len(g) for g in report.groups))
    info.update(duplicate_groups=len(report.groups), images_in_duplicate_groups=n_in_groups,
                near_duplicate_threshold=cfg.near_duplicate_threshold, align_threshold=report.align_threshold)
    if report.groups:
        log(f"{len(report.groups)} duplicate group(s) ({n_in_groups} images) kept on one side of every split")
    if not report.groups and manifest_groups is None:
        return None, info
    return combine_groups(ids, manifest_groups), info


def prepare_data(cfg: TrainConfig, dataset: Dataset, kept: Sequence[int], digests: Sequence[str | None],
                 skipped: Sequence[str], log: Log, val_size: float, hashes: Iterable[Any] = ()) -> PreparedData:
    """Labels, groups and the stratified split of the readable images (``digests`` per dataset sample;
    ``hashes``: duplicate hashes of the images the fitter decoded)."""
    kept = list(kept)
    labels = dataset.labels()[kept]
    # again after the fitter's read: unreadable files may have left a class too small
    check_class_counts({c: int((labels == i).sum()) for i, c in enumerate(dataset.classes)}, cfg, len(skipped))
    groups = group_array(dataset, cfg.group_by)
    groups = groups[kept] if groups is not None else None
    paths = [str(dataset.samples[i].path) for i in kept]
    groups, dedup_info = split_groups(paths, groups, cfg, log, digests=[digests[i] for i in kept], hashes=hashes)
    split = train_val_test_split(labels, cfg.test_size, val_size, cfg.seed, groups)
    _warn_missing_classes(split, labels, dataset.classes, val_size, log)
    info = {"train": int(len(split.train)), "val": int(len(split.val)), "test": int(len(split.test)),
            "seed": cfg.seed, "group_by": cfg.group_by, **dedup_info}
    return PreparedData(dataset, kept, labels, paths, groups, split, info, list(skipped))


def _warn_missing_classes(split: Split, labels: np.ndarray, classes: Sequence[str], val_size: float, log: Log) -> None:
    # The count rule (check_class_counts) cannot promise this for unbalanced classes or group-wise splits.
    for part, rows in (("test", split.test), ("validation", split.val if val_size > 0 else None)):
        if rows is None:
            continue
        absent = [c for i, c in enumerate(classes) if (labels == i).any() and not (labels[rows] == i).any()]
        if absent:
            log(f"warning: the {part} split holds no image of {', '.join(absent)}: give those classes more images")


def finish_run(cfg: TrainConfig, run_dir: Path, data: PreparedData, model: FittedModel, log: Log) -> TrainResult:
    """The shared tail of every run: temperature, test metrics with intervals and ECE, prediction sets
    (calibrated on the temperature's rows, measured on the test split), evaluation files, OOD statistics,
    model file (with what was measured, for the model card), history and report."""
    split, labels, classes = data.split, data.labels, data.dataset.classes
    temperature, uncalibrated, test_probs, calibration = calibrate(
        model.calibration_logits, labels[model.calibration_rows], model.test_logits, labels[split.test])
    metrics = score_predictions(labels[split.test], test_probs, classes, cfg.bootstrap, cfg.seed)
    metrics["split"] = data.split_info
    metrics["calibration"] = calibration
    metrics.update(model.extra_metrics)
    if model.folds:
        metrics["folds"] = model.folds
        metrics["cv"] = fold_stats(model.folds)
    sets = fit_prediction_sets(cfg, model, labels, classes, temperature, log)
    if sets is not None:
        metrics["conformal"] = conformal_metrics(sets, labels[split.test], test_probs, cfg.bootstrap, cfg.seed)
    write_evaluation(run_dir, labels[split.test], test_probs, classes, [data.paths[i] for i in split.test], metrics,
                     before=uncalibrated)

    bundle = ModelBundle(
        net=model.net,
        classes=list(classes),
        preprocessing=model.preprocessing,
        backbone_name=model.net.backbone.spec.name,
        weights_id=model.weights_id,
        head_name=cfg.head,
        head_options=model.head_options,
        feature_hw=model.feature_hw,
        config=cfg.to_dict(),
        temperature=temperature,
        metrics={k: metrics[k] for k in BUNDLE_METRICS if k in metrics},
        extras={"training_data": _data_summary(data)},
    )
    # The gate's statistics come from every image the model was fitted on, never from the test split.
    ood = ood_extras(model.pooled_features(np.concatenate([split.train, split.val])), log)
    if ood is not None:
        bundle.extras["ood"] = ood
    if sets is not None:
        bundle.extras[CONFORMAL_KEY] = sets.to_extras()
    model_path = save_bundle(bundle, run_dir / "model.pt")
    write_history(run_dir / "history.csv", model.history)
    result = TrainResult(run_dir=run_dir, model_path=model_path, metrics=metrics, history=model.history,
                         folds=model.folds, timings=model.timings, cache=model.cache, skipped=data.skipped)
    write_report(run_dir, cfg, result)
    return result


def fit_prediction_sets(cfg: TrainConfig, model: FittedModel, labels: np.ndarray, classes: Sequence[str],
                        temperature: float, log: Log) -> ConformalSets | None:
    """Class-conditional conformal sets at ``cfg.coverage``, calibrated on the temperature-scaled
    probabilities of the rows that fitted the temperature (the validation split, or with k-fold the kept
    fold's validation part); None, with a log line, when there are none."""
    rows = np.asarray(model.calibration_rows, dtype=int)
    if len(rows) == 0:
        log("no validation images: prediction sets skipped (the model gets no conformal calibration; "
            "use --val-size > 0 or --folds)")
        return None
    kfold = bool(cfg.folds and not cfg.finetune)
    where = (f"validation part of the kept fold of {cfg.folds}-fold cross-validation" if kfold
             else "validation split")
    picked = "picked the fold and its best epoch" if kfold else "picked the best epoch"
    calibrated_on = (f"{where} ({len(rows)} images; it also {picked} and fitted the temperature, "
                     "so coverage is checked on the test split)")
    probs = softmax(model.calibration_logits, temperature)
    sets = ConformalSets.calibrate(probs, labels[rows], classes, cfg.coverage, calibrated_on)
    for warning in sets.warnings:
        log(f"warning: prediction sets: {warning}")
    return sets


def fold_stats(rows: list[dict]) -> dict[str, Any]:
    """Mean and sample standard deviation of the folds' validation and test scores."""
    stats: dict[str, Any] = {}
    for part in ("val", "test"):
        for key in ("accuracy", "macro_f1", "macro_auc"):
            values = [r[part][key] for r in rows if r[part][key] is not None]
            if values:
                stats[f"{part}_{key}"] = {"mean": float(np.mean(values)),
                                          "std": float(np.std(values, ddof=1)) if len(values) > 1 else 0.0}
    return stats


def _data_summary(data: PreparedData) -> dict[str, Any]:
    counts = {c: int((data.labels == i).sum()) for i, c in enumerate(data.dataset.classes)}
    return {"root": str(data.dataset.root), "n_images": int(len(data.labels)), "per_class": counts,
            "n_train": int(len(data.split.train)), "n_val": int(len(data.split.val)),
            "n_test": int(len(data.split.test))}


def write_history(path: Path, history: list[dict]) -> None:
    """history.csv: one row per epoch, columns in first-seen order."""
    buf = io.StringIO()
    if history:
        columns = list(dict.fromkeys(k for row in history for k in row))
        writer = csv.DictWriter(buf, fieldnames=columns)
        writer.writeheader()
        writer.writerows(history)
    atomic_write_text(path, buf.getvalue())


def timer() -> Callable[[], float]:
    """Seconds since the call, for the run's timings."""
    start = time.perf_counter()
    return lambda: time.perf_counter() - start


def min_images_per_class(cfg: TrainConfig) -> tuple[int, str]:
    """The fewest images a class needs for the split ``cfg`` asks, and the rule in words.

    A class of ``n`` images gets about ``n * test_size`` of the stratified test split, so it needs
    ``ceil(1 / test_size)`` for one; what is left (``n * (1 - test_size)``) must hold one image for each
    part after it: training, and validation when ``val_size > 0`` (or each of the k folds).
    """
    folds = cfg.folds if cfg.folds and not cfg.finetune else 0  # fine-tuning ignores --folds
    if folds:
        parts, after = folds, f"one for each of the {folds} folds"
    elif cfg.val_size > 0:
        parts, after = 2, "one for training and one for validation"
    else:
        parts, after = 1, "one for training"
    for_test = math.ceil(1 / cfg.test_size - 1e-9)
    for_rest = math.ceil(parts / (1 - cfg.test_size) - 1e-9)
    rule = (f"ceil(1 / test_size {cfg.test_size:g}) = {for_test} for one in the test split, and "
            f"ceil({parts} / (1 - test_size)) = {for_rest} so that the rest holds {after}")
    return max(for_test, for_rest), rule


def check_class_counts(counts: dict[str, int], cfg: TrainConfig, skipped: int = 0) -> None:
    """Refuse a dataset the split asked cannot be made from: one class only, or a class too small.

    A single class would "train" a model that answers it to everything, and a class missing from the
    test or validation split is silently never measured or never early-stopped on.
    """
    after = f" (after skipping {skipped} unreadable file(s))" if skipped else ""
    present = {c: n for c, n in counts.items() if n > 0}
    if len(present) < 2:
        found = ", ".join(f"{c} {n}" for c, n in present.items()) or "no images"
        raise ValueError(f"{cfg.data}: training needs images of at least two classes, found {found}{after}")
    minimum, rule = min_images_per_class(cfg)
    few = {c: n for c, n in counts.items() if n < minimum}
    if few:
        listed = ", ".join(f"{c} {n}" for c, n in few.items())
        raise ValueError(f"{cfg.data}: too few images per class for the split asked{after}: {listed}; every class "
                         f"needs at least {minimum} ({rule})")
