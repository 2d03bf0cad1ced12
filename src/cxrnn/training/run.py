"""``cxrnn train``: dataset -> split -> cached features -> head (or fine-tuning) -> model + metrics.

Every artefact of a run lands in its run directory: config.yaml, model.pt, history.csv, metrics.json,
confusion_matrix.png, roc.png, predictions.csv and report.md.
"""

from __future__ import annotations

import csv
import io
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from cxrnn.data.dataset import Dataset, load_dataset
from cxrnn.data.splits import kfold, train_val_test_split
from cxrnn.utils.atomic import atomic_write_text
from cxrnn.evaluation.scoring import write_evaluation
from cxrnn.evaluation.honest import add_uncertainty, calibrate, head_logits, leave_one_source_out, report_sections, split_groups
from cxrnn.evaluation.metrics import compute_metrics
from cxrnn.evaluation.report import write_report
from cxrnn.features.matrix import FeatureRows
from cxrnn.features.store import FeatureStore
from cxrnn.models.backbones import create_backbone
from cxrnn.models.bundle import ModelBundle, build_network, save_bundle
from cxrnn.training.config import TrainConfig
from cxrnn.training.loop import fit_head, rows_logits

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


def train(cfg: TrainConfig, progress: Progress | None = None, log: Log | None = None) -> TrainResult:
    cfg.validate()
    log = log or (lambda msg: None)
    run_dir = Path(cfg.out)
    run_dir.mkdir(parents=True, exist_ok=True)
    cfg.to_yaml(run_dir / "config.yaml")
    timings: dict[str, float] = {}

    dataset = load_dataset(cfg.data)
    classes = dataset.classes
    log(f"{len(dataset)} images, classes {', '.join(classes)}")
    if cfg.finetune:
        from cxrnn.training.finetune import train_finetune

        return train_finetune(cfg, dataset, run_dir, progress=progress, log=log)

    t0 = time.perf_counter()
    backbone = create_backbone(cfg.backbone, cfg.weights, seed=cfg.seed)
    store = FeatureStore(backbone, cfg.cache_dir, dtype=cfg.feature_dtype, precision=cfg.precision,
                         device=cfg.device, workers=cfg.workers, image_cache=cfg.image_cache,
                         runtime=cfg.extract_runtime)
    extracted = store.extract(
        [s.path for s in dataset.samples],
        batch_size=cfg.extract_batch_size,
        progress=(lambda d, t: progress("extract", d, t)) if progress else None,
        strict=cfg.strict,
        warn=lambda msg: log(msg),
    )
    timings["extract_s"] = time.perf_counter() - t0
    from cxrnn.utils import distributed

    if not distributed.info().is_main:  # under torchrun the others helped extract; rank 0 trains the head
        return TrainResult(run_dir, run_dir / "model.pt", {}, [], timings=timings)
    if extracted.errors:
        log(f"skipped {len(extracted.errors)} unreadable file(s)")
    kept = extracted.kept
    features = extracted.features
    labels = dataset.labels()[kept]
    groups = group_array(dataset, cfg.group_by)
    groups = groups[kept] if groups is not None else None
    paths = [str(dataset.samples[i].path) for i in kept]
    groups, dedup_info = split_groups(paths, groups, cfg.dedup, cfg.near_duplicate_threshold, cfg.cache_dir, log,
                                      cfg.align_threshold)

    split = train_val_test_split(labels, cfg.test_size, 0.0 if cfg.folds else cfg.val_size, cfg.seed, groups)
    hw = (features.shape[-2], features.shape[-1])
    head_options = dict(cfg.head_options)
    if cfg.head == "paper":
        head_options.setdefault("lstm_units", backbone.spec.paper_head.lstm_units)
        head_options.setdefault("dense", list(backbone.spec.paper_head.dense))
        head_options.setdefault("freeze_rnn", cfg.freeze_rnn)

    def new_network(seed: int):
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            net, fhw = build_network(backbone, cfg.head, len(classes), head_options)
        if fhw != hw:
            raise RuntimeError(f"cached feature maps are {hw}, the network expects {fhw}")
        return net.freeze_backbone()

    def epoch_progress(row: dict) -> None:
        if progress:
            progress("epoch", row["epoch"], cfg.epochs)

    t0 = time.perf_counter()
    fold_rows: list[dict] = []
    if cfg.folds:
        best = None
        rest = np.concatenate([split.train, split.val])
        for k, (tr, va) in enumerate(kfold(labels, rest, cfg.folds, cfg.seed, groups)):
            net = new_network(cfg.seed + k)  # every fold starts fresh: no warm start across folds
            fit = fit_head(net.head, FeatureRows(features, tr), labels[tr], FeatureRows(features, va), labels[va],
                           cfg, cfg.seed + k, on_epoch=epoch_progress)
            val_probs = _probs(net.head, FeatureRows(features, va))
            test_probs = _probs(net.head, FeatureRows(features, split.test))
            row = {
                "fold": k + 1,
                "n_train": int(len(tr)),
                "n_val": int(len(va)),
                "best_epoch": fit.best_epoch,
                "val_loss": fit.best_val_loss,
                "val": _summary(compute_metrics(labels[va], val_probs, classes)),
                "test": _summary(compute_metrics(labels[split.test], test_probs, classes)),
            }
            fold_rows.append(row)
            log(f"fold {k + 1}/{cfg.folds}: val acc {row['val']['accuracy']:.3f}, test acc {row['test']['accuracy']:.3f}")
            if progress:
                progress("fold", k + 1, cfg.folds)
            if best is None or fit.best_val_loss < best[1].best_val_loss:
                best = (net, fit, k + 1)
                calibration_idx = va  # the kept fold's validation part fits the temperature
        net, fit, best_fold = best  # type: ignore[misc]
        log(f"kept fold {best_fold} (lowest validation loss) as the model")
    else:
        net = new_network(cfg.seed)
        fit = fit_head(net.head, FeatureRows(features, split.train), labels[split.train],
                       FeatureRows(features, split.val), labels[split.val], cfg, cfg.seed, on_epoch=epoch_progress)
        calibration_idx = split.val
    timings["fit_s"] = time.perf_counter() - t0

    temperature, uncalibrated, test_probs, calibration = calibrate(
        head_logits(net.head, features, calibration_idx), labels[calibration_idx],
        head_logits(net.head, features, split.test), labels[split.test])
    test_paths = [paths[i] for i in split.test]
    metrics = compute_metrics(labels[split.test], test_probs, classes)
    metrics["split"] = {"train": int(len(split.train)), "val": int(len(split.val)), "test": int(len(split.test)),
                        "seed": cfg.seed, "group_by": cfg.group_by, **dedup_info}
    metrics["calibration"] = calibration
    add_uncertainty(metrics, labels[split.test], test_probs, classes, run_dir, cfg.bootstrap, cfg.seed, uncalibrated)
    if cfg.leave_one_source_out:
        metrics["leave_one_source_out"] = leave_one_source_out(
            [dataset.samples[i].source for i in kept], labels, features, groups, cfg, new_network, classes, log)
    if fold_rows:
        metrics["folds"] = fold_rows
        metrics["cv"] = _fold_stats(fold_rows)
    write_evaluation(run_dir, labels[split.test], test_probs, classes, test_paths, metrics)

    bundle = ModelBundle(
        net=net,
        classes=list(classes),
        preprocessing=backbone.preprocessing,
        backbone_name=backbone.spec.name,
        weights_id=backbone.weights_id,
        head_name=cfg.head,
        head_options=head_options,
        feature_hw=hw,
        config=cfg.to_dict(),
        temperature=temperature,
        metrics={k: metrics[k] for k in ("n", "accuracy", "macro_f1", "macro_auc") if k in metrics},
        extras={"training_data": _data_summary(dataset, labels, split)},
    )
    from cxrnn.models.ood import ood_extras

    # The gate's statistics come from every image the model was fitted on, never from the test split.
    ood = ood_extras(features, np.concatenate([split.train, split.val]), log)
    if ood is not None:
        bundle.extras["ood"] = ood
    model_path = save_bundle(bundle, run_dir / "model.pt")
    _write_history(run_dir / "history.csv", fit.history)
    result = TrainResult(
        run_dir=run_dir,
        model_path=model_path,
        metrics=metrics,
        history=fit.history,
        folds=fold_rows,
        timings=timings,
        cache={"cached": extracted.n_cached, "computed": extracted.n_computed},
        skipped=[str(e) for e in extracted.errors],
    )
    write_report(run_dir, cfg, result, extra_sections=report_sections(metrics))
    return result


def _probs(head: torch.nn.Module, features) -> np.ndarray:
    """Class probabilities for feature maps (array or lazy FeatureRows), computed batch by batch."""
    logits = rows_logits(head, features)
    return torch.softmax(logits, dim=1).numpy() if len(features) else np.zeros((0, 0))


def _summary(m: dict[str, Any]) -> dict[str, Any]:
    return {k: m[k] for k in ("n", "accuracy", "macro_f1", "macro_auc")}


def _fold_stats(rows: list[dict]) -> dict[str, Any]:
    stats: dict[str, Any] = {}
    for part in ("val", "test"):
        for key in ("accuracy", "macro_f1", "macro_auc"):
            values = [r[part][key] for r in rows if r[part][key] is not None]
            if values:
                stats[f"{part}_{key}"] = {"mean": float(np.mean(values)), "std": float(np.std(values, ddof=1)) if len(values) > 1 else 0.0}
    return stats


def _data_summary(dataset: Dataset, labels: np.ndarray, split) -> dict[str, Any]:
    counts = {c: int((labels == i).sum()) for i, c in enumerate(dataset.classes)}
    return {"root": str(dataset.root), "n_images": int(len(labels)), "per_class": counts,
            "n_train": int(len(split.train)), "n_val": int(len(split.val)), "n_test": int(len(split.test))}


def _write_history(path: Path, history: list[dict]) -> None:
    buf = io.StringIO()
    if history:
        columns = list(dict.fromkeys(k for row in history for k in row))
        writer = csv.DictWriter(buf, fieldnames=columns)
        writer.writeheader()
        writer.writerows(history)
    atomic_write_text(path, buf.getvalue())


def load_metrics(run_dir: str | Path) -> dict[str, Any]:
    return json.loads((Path(run_dir) / "metrics.json").read_text())
