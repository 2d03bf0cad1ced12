"""Frozen-backbone fitting: features extracted once into the store, then the head trained on them.

The backbone never changes, so its maps are computed once per file (``cxrnn.features``) and every epoch,
fold, head and later run reads them from disk. While an image is decoded for extraction its duplicate
hashes are computed too, so the duplicate-aware split does not decode it a second time.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from cxrnn.audit.phash import hash_side
from cxrnn.data.dataset import Dataset
from cxrnn.features.matrix import FeatureRows
from cxrnn.features.store import FeatureStore
from cxrnn.models.backbones import Backbone, create_backbone
from cxrnn.models.bundle import build_network, paper_head_options
from cxrnn.models.network import CxrNet
from cxrnn.models.ood import pool_rows
from cxrnn.training.config import TrainConfig
from cxrnn.training.loop import fit_head, rows_logits
from cxrnn.training.protocols import fit_kfold, leave_one_source_out
from cxrnn.training.run import FittedModel, Log, PreparedData, Progress, prepare_data, timer
from cxrnn.utils import distributed


def network_factory(backbone: Backbone, cfg: TrainConfig, num_classes: int, hw: tuple[int, int]):
    """``new_network(seed)``: a fresh head on the frozen backbone, initialised from ``seed`` alone (the
    global RNG is left as it was, so a fold's model does not depend on what ran before it)."""
    head_options = head_options_for(backbone, cfg)

    def new_network(seed: int) -> CxrNet:
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            net, fhw = build_network(backbone, cfg.head, num_classes, head_options)
        if fhw != hw:
            raise RuntimeError(f"cached feature maps are {hw}, the network expects {fhw}")
        return net.freeze_backbone()

    return new_network, head_options


def head_options_for(backbone: Backbone, cfg: TrainConfig) -> dict[str, Any]:
    options = dict(cfg.head_options)
    if cfg.head == "paper":
        options = paper_head_options(backbone.spec, options, cfg.freeze_rnn)
    return options


def fit_frozen(cfg: TrainConfig, dataset: Dataset, progress: Progress | None = None, log: Log | None = None
               ) -> tuple[PreparedData, FittedModel] | None:
    """Extract (or reuse) the features, split, and train the head; None on torchrun ranks other than 0."""
    log = log or (lambda msg: None)
    elapsed = timer()
    backbone = create_backbone(cfg.backbone, cfg.weights, seed=cfg.seed, input_size=cfg.input_size)
    store = FeatureStore(backbone, cfg.cache_dir, dtype=cfg.feature_dtype, precision=cfg.precision,
                         device=cfg.device, workers=cfg.workers, image_cache=cfg.image_cache,
                         runtime=cfg.extract_runtime)
    extracted = store.extract(
        [s.path for s in dataset.samples],
        batch_size=cfg.extract_batch_size,
        progress=(lambda d, t: progress("extract", d, t)) if progress else None,
        strict=cfg.strict,
        warn=log,
        side=hash_side if cfg.dedup else None,
    )
    timings = {"extract_s": elapsed()}
    if not distributed.info().is_main:
        return None
    if extracted.errors:
        log(f"skipped {len(extracted.errors)} unreadable file(s)")
    features = extracted.features
    data = prepare_data(cfg, dataset, extracted.kept, extracted.digests, [str(e) for e in extracted.errors], log,
                        val_size=0.0 if cfg.folds else cfg.val_size, hashes=extracted.side.values())
    labels, split = data.labels, data.split
    hw = (features.shape[-2], features.shape[-1])
    new_network, head_options = network_factory(backbone, cfg, len(dataset.classes), hw)

    def logits(head: torch.nn.Module, rows: np.ndarray) -> np.ndarray:
        return rows_logits(head, FeatureRows(features, rows)).numpy() if len(rows) else np.zeros((0, 0))

    elapsed = timer()
    folds: list[dict] = []
    if cfg.folds:
        kept_fold = fit_kfold(features, data, cfg, new_network, logits, progress, log)
        net, history, folds = kept_fold.net, kept_fold.history, kept_fold.folds
        calibration_rows, calibration_logits, test_logits = kept_fold.val_rows, kept_fold.val_logits, kept_fold.test_logits
    else:
        net = new_network(cfg.seed)
        fit = fit_head(net.head, FeatureRows(features, split.train), labels[split.train],
                       FeatureRows(features, split.val), labels[split.val], cfg, cfg.seed,
                       on_epoch=(lambda row: progress("epoch", row["epoch"], cfg.epochs)) if progress else None)
        history, calibration_rows = fit.history, split.val
        calibration_logits, test_logits = logits(net.head, split.val), logits(net.head, split.test)
    timings["fit_s"] = elapsed()
    extra: dict[str, Any] = {}
    if cfg.leave_one_source_out:
        extra["leave_one_source_out"] = leave_one_source_out(data, features, cfg, new_network, logits, log)
    return data, FittedModel(
        net=net, preprocessing=backbone.preprocessing, weights_id=backbone.weights_id, head_options=head_options,
        feature_hw=hw, history=history, calibration_rows=calibration_rows, calibration_logits=calibration_logits,
        test_logits=test_logits, pooled_features=lambda rows: pool_rows(features, rows), folds=folds,
        extra_metrics=extra, timings=timings,
        cache={"cached": extracted.n_cached, "computed": extracted.n_computed})
