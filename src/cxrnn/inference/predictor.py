"""Prediction through the Python API: a loaded model, images or files in, class probabilities out."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import torch

from cxrnn.data.io import ImageReadError, read_image
from cxrnn.models.bundle import ModelBundle, load_bundle
from cxrnn.models.preprocess import to_input_tensor

Progress = Callable[[int, int], None]


@dataclass
class Prediction:
    path: str
    label: str | None = None
    probabilities: dict[str, float] | None = None
    error: str | None = None
    ood: dict[str, Any] | None = None  # {"score", "threshold", "flagged"}; None if the model has no OOD gate

    def to_dict(self) -> dict[str, Any]:
        if self.error is not None:
            return {"path": self.path, "error": self.error}
        return {"path": self.path, "label": self.label, "probabilities": self.probabilities, "ood": self.ood}


class Predictor:
    """Holds a loaded model; ``predict_*`` apply its stored preprocessing and temperature."""

    def __init__(self, bundle: ModelBundle, batch_size: int = 16, runtime: str = "torch", device: str = "cpu",
                 precision: str = "fp32"):
        from cxrnn.inference.graph import make_engine
        from cxrnn.models.ood import OodStats

        self.bundle = bundle
        self.batch_size = batch_size
        self.bundle.net.eval()
        self.engine = make_engine(bundle, runtime)  # torch or onnxruntime: same outputs
        from cxrnn.inference.device import accelerate_engine

        self.engine = accelerate_engine(self.engine, device, precision)
        self.ood_stats = OodStats.from_extras(bundle.extras)

    @classmethod
    def from_file(cls, path: str | Path, batch_size: int = 16, runtime: str = "torch", device: str = "cpu",
                  precision: str = "fp32") -> "Predictor":
        return cls(load_bundle(path), batch_size=batch_size, runtime=runtime, device=device, precision=precision)

    @property
    def classes(self) -> list[str]:
        return self.bundle.classes

    def logits(self, images: Sequence[np.ndarray]) -> torch.Tensor:
        with torch.inference_mode():
            return self.bundle.net(to_input_tensor(images, self.bundle.preprocessing))

    def predict_arrays(self, images: Sequence[np.ndarray]) -> np.ndarray:
        """Probabilities (N, K) for grey [0,1] images, in batches."""
        return self.predict_with_ood(images)[0]

    def predict_with_ood(self, images: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        """(probabilities (N, K), out-of-distribution scores (N,)) for grey [0,1] images, in batches."""
        probs, scores = [], []
        for start in range(0, len(images), self.batch_size):
            out = self.engine(to_input_tensor(images[start : start + self.batch_size], self.bundle.preprocessing))
            probs.append(out["probabilities"])
            scores.append(out["ood_score"])
        if not probs:
            return np.zeros((0, len(self.classes)), dtype=np.float32), np.zeros(0, dtype=np.float32)
        return np.concatenate(probs), np.concatenate(scores)

    def ood_result(self, score: float) -> dict[str, Any] | None:
        if self.ood_stats is None:
            return None
        return {"score": float(score), "threshold": self.ood_stats.threshold,
                "flagged": bool(score > self.ood_stats.threshold)}

    def to_prediction(self, path: str, probs: np.ndarray, ood_score: float | None = None) -> Prediction:
        return Prediction(
            path=path,
            label=self.classes[int(np.argmax(probs))],
            probabilities={c: float(p) for c, p in zip(self.classes, probs)},
            ood=self.ood_result(ood_score) if ood_score is not None else None,
        )

    def predict_paths(self, paths: Iterable[str | Path], progress: Progress | None = None) -> list[Prediction]:
        """One Prediction per path, in order; an unreadable file gives a Prediction with ``error``."""
        paths = [str(p) for p in paths]
        results: list[Prediction | None] = [None] * len(paths)
        for start in range(0, len(paths), self.batch_size):
            images, slots = [], []
            for i in range(start, min(start + self.batch_size, len(paths))):
                try:
                    images.append(read_image(paths[i]))
                    slots.append(i)
                except ImageReadError as err:
                    results[i] = Prediction(path=paths[i], error=str(err))
            if images:
                for i, probs, score in zip(slots, *self.predict_with_ood(images)):
                    results[i] = self.to_prediction(paths[i], probs, score)
            if progress:
                progress(min(start + self.batch_size, len(paths)), len(paths))
        return [r for r in results if r is not None]


def predict(model: str | Path | ModelBundle, paths: Iterable[str | Path]) -> list[Prediction]:
    """Convenience: ``cxrnn.inference.predictor.predict("run/model.pt", ["a.png"])``."""
    bundle = model if isinstance(model, ModelBundle) else load_bundle(model)
    return Predictor(bundle).predict_paths(paths)
