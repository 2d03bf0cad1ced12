"""Out-of-distribution gate: how far an image's backbone features lie from the training images' features.

At training time the spatially mean-pooled backbone features of the training images are summarised by
their mean and a Ledoit-Wolf shrinkage covariance (the sample covariance is singular when there are fewer
images than channels). An input's score is its Mahalanobis distance to that distribution; it is flagged
above the 99th percentile of the training images' own distances.

Those training distances are taken out of fold: a distance to statistics fitted on the same images is
biased low (markedly so with ~100 images in 1280 dimensions), and a threshold taken from it would flag
most unseen in-distribution images. Every training image is scored by statistics fitted without it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

import numpy as np
import torch
from torch import nn

FEATURE = "backbone feature map, spatial mean"
METHOD = "mahalanobis (Ledoit-Wolf covariance)"
MIN_IMAGES = 10


def pool_features(feature_maps: np.ndarray | torch.Tensor) -> np.ndarray:
    """(N, C, H, W) backbone maps -> (N, C) float64 spatial means."""
    maps = feature_maps.detach().cpu().numpy() if isinstance(feature_maps, torch.Tensor) else feature_maps
    return np.asarray(maps, dtype=np.float64).mean(axis=(2, 3))


def _fit_gaussian(pooled: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    from sklearn.covariance import LedoitWolf

    lw = LedoitWolf(assume_centered=False).fit(pooled)
    return lw.location_, lw.precision_


def _distances(pooled: np.ndarray, mean: np.ndarray, precision: np.ndarray) -> np.ndarray:
    diff = pooled - mean
    return np.sqrt(np.maximum(np.einsum("nc,cd,nd->n", diff, precision, diff), 0.0))


@dataclass
class OodStats:
    mean: np.ndarray  # (C,)
    precision: np.ndarray  # (C, C) inverse shrinkage covariance
    threshold: float
    quantile: float = 0.99
    n_images: int = 0
    training_quantiles: dict[str, float] = field(default_factory=dict)

    def score(self, pooled: np.ndarray) -> np.ndarray:
        """Mahalanobis distance of each (N, C) pooled feature row."""
        return _distances(np.asarray(pooled, dtype=np.float64), self.mean, self.precision)

    def flag(self, scores: np.ndarray) -> np.ndarray:
        return np.asarray(scores) > self.threshold

    def to_extras(self) -> dict[str, Any]:
        """Tensors and plain values only, so the model file still loads with weights_only=True."""
        return {
            "feature": FEATURE,
            "method": METHOD,
            "mean": torch.from_numpy(self.mean.astype(np.float32)),
            "precision": torch.from_numpy(self.precision.astype(np.float32)),
            "threshold": float(self.threshold),
            "quantile": float(self.quantile),
            "n_images": int(self.n_images),
            "training_quantiles": {k: float(v) for k, v in self.training_quantiles.items()},
        }

    @classmethod
    def from_extras(cls, extras: Mapping[str, Any] | None) -> "OodStats | None":
        """The stats stored in a bundle's ``extras`` (None for a model trained before the gate existed)."""
        d = (extras or {}).get("ood")
        if not d:
            return None

        def arr(v: Any) -> np.ndarray:
            return (v.numpy() if isinstance(v, torch.Tensor) else np.asarray(v)).astype(np.float64)

        return cls(mean=arr(d["mean"]), precision=arr(d["precision"]), threshold=float(d["threshold"]),
                   quantile=float(d.get("quantile", 0.99)), n_images=int(d.get("n_images", 0)),
                   training_quantiles=dict(d.get("training_quantiles", {})))

    def summary(self) -> dict[str, Any]:
        """What the model card says about the gate (no arrays)."""
        return {"feature": FEATURE, "method": METHOD, "threshold": self.threshold,
                "threshold_quantile": self.quantile, "n_training_images": self.n_images,
                "training_distance_quantiles": self.training_quantiles}


def fit_ood_stats(pooled: np.ndarray, quantile: float = 0.99, folds: int = 5, seed: int = 0) -> OodStats:
    """Fit the gate on (N, C) pooled training features; the threshold comes from out-of-fold distances."""
    pooled = np.asarray(pooled, dtype=np.float64)
    n = len(pooled)
    if n < MIN_IMAGES:
        raise ValueError(f"the out-of-distribution gate needs at least {MIN_IMAGES} training images, got {n}")
    folds = max(2, min(folds, n // 2))
    order = np.random.default_rng(seed).permutation(n)
    oof = np.empty(n)
    for part in np.array_split(order, folds):
        rest = np.setdiff1d(order, part)
        mean, precision = _fit_gaussian(pooled[rest])
        oof[part] = _distances(pooled[part], mean, precision)
    mean, precision = _fit_gaussian(pooled)
    qs = {f"p{int(q * 100)}": float(np.quantile(oof, q)) for q in (0.5, 0.9, 0.95, 0.99)}
    qs["max"] = float(oof.max())
    return OodStats(mean=mean, precision=precision, threshold=float(np.quantile(oof, quantile)),
                    quantile=quantile, n_images=n, training_quantiles=qs)


def pool_rows(feature_maps: Any, rows: np.ndarray, chunk: int = 256) -> np.ndarray:
    """Pooled features of ``feature_maps[rows]`` read a chunk at a time (the maps may be a memmap larger than RAM)."""
    rows = np.asarray(rows, dtype=np.int64)
    parts = [pool_features(np.asarray(feature_maps[np.sort(rows[i : i + chunk])])) for i in range(0, len(rows), chunk)]
    return np.concatenate(parts) if parts else np.zeros((0, 0))


def ood_extras(pooled: np.ndarray, log=None) -> dict[str, Any] | None:
    """``bundle.extras["ood"]`` fitted on the training images' (N, C) pooled features, or None (with a log
    line saying why) when there are too few of them."""
    try:
        stats = fit_ood_stats(pooled)
    except ValueError as exc:
        if log:
            log(f"no out-of-distribution gate: {exc}")
        return None
    if log:
        log(f"out-of-distribution gate: threshold {stats.threshold:.2f} "
            f"(out-of-fold 99th percentile over {stats.n_images} training images)")
    return stats.to_extras()


class MahalanobisScore(nn.Module):
    """The same distance as :meth:`OodStats.score`, as a module so it travels inside ONNX/TorchScript exports."""

    def __init__(self, stats: OodStats | None, channels: int):
        super().__init__()
        mean = stats.mean if stats is not None else np.zeros(channels)
        precision = stats.precision if stats is not None else np.zeros((channels, channels))
        self.register_buffer("mean", torch.from_numpy(np.asarray(mean, dtype=np.float32)))
        self.register_buffer("precision", torch.from_numpy(np.asarray(precision, dtype=np.float32)))

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        diff = pooled - self.mean
        return torch.sqrt(torch.clamp(((diff @ self.precision) * diff).sum(dim=1), min=0.0))
