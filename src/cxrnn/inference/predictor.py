"""Prediction through the Python API: a loaded model, images or files in, class probabilities out."""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np

from cxrnn.data.dicom import AcquisitionPolicy, check_policy
from cxrnn.data.io import ImageReadError, read_image_checked
from cxrnn.inference.engines import Engine, OnnxEngine, TorchEngine, check_runtime
from cxrnn.inference.export import export_model
from cxrnn.inference.graph import OUTPUT_NAMES, InferenceModule
from cxrnn.models.bundle import ModelBundle, load_bundle
from cxrnn.models.conformal import ConformalSets
from cxrnn.models.ood import OodStats
from cxrnn.models.preprocess import to_input_tensor

Progress = Callable[[int, int], None]

# What the command line says once about a model file from before prediction sets (after "MODEL: ").
NO_CONFORMAL_NOTICE = "no conformal calibration (trained before prediction sets): predictions have no prediction_set"


def referral(prediction_set: Sequence[str] | None, ood: dict[str, Any] | None,
             coverage: float | None = None, label: str | None = None) -> tuple[bool, str | None]:
    """(refer, reason): refer to a radiologist when the prediction set is not exactly one class (empty or
    several), when its one class is not the top class ``label`` (class-conditional thresholds differ per
    class, so a set can keep a class the top probability did not pick), or when the image is out of
    distribution; the reasons joined with "; ". ``prediction_set`` None (a model without conformal
    calibration) leaves the decision to the OOD gate alone."""
    reasons = []
    if prediction_set is not None and len(prediction_set) != 1:
        if not prediction_set:
            reasons.append("empty prediction set: no class reaches the calibrated threshold")
        else:
            level = f" at {round(coverage * 100, 4):g}% coverage" if coverage is not None else ""
            reasons.append(f"prediction set {{{', '.join(prediction_set)}}}: the model cannot tell these apart{level}")
    elif prediction_set is not None and label is not None and prediction_set[0] != label:
        reasons.append(f"prediction set {{{prediction_set[0]}}} disagrees with the top class {label}")
    if ood and ood.get("flagged"):
        reasons.append("out of distribution: unlike the training images")
    return bool(reasons), "; ".join(reasons) or None


def _make_engine(bundle: ModelBundle, runtime: str, device: str, precision: str) -> Engine:
    """The inference graph of ``bundle`` behind the torch engine, or exported and behind the ONNX engine."""
    if runtime == "torch":
        return TorchEngine(InferenceModule(bundle), OUTPUT_NAMES, device, precision)
    if str(device) != "cpu" or precision != "fp32":
        raise ValueError("--device/--precision apply to the torch runtime; onnx runs fp32 on the CPU")
    # the session reads the whole file when it is made, so the exported file need not outlive this call
    with tempfile.TemporaryDirectory(prefix="cxrnn-onnx-") as tmp:
        return OnnxEngine(export_model(bundle, "onnx", Path(tmp) / "model.onnx"), OUTPUT_NAMES)


@dataclass
class Prediction:
    """One file's result; an unreadable file is a value with ``error`` set, so a batch never fails for one file."""

    path: str
    label: str | None = None
    probabilities: dict[str, float] | None = None
    error: str | None = None
    ood: dict[str, Any] | None = None  # {"score", "threshold", "flagged"}; None if the model has no OOD gate
    # Why this diagnosis may not apply (e.g. "lateral view (ViewPosition LL): ..."), one line each, no path.
    warnings: list[str] = field(default_factory=list)
    # The conformal prediction set (class names, model order); None when the model has no conformal calibration.
    prediction_set: list[str] | None = None
    refer: bool = False  # the set is not exactly one class, or the image is out of distribution
    refer_reason: str | None = None  # why ``refer``, one short sentence per reason joined with "; "

    def to_dict(self) -> dict[str, Any]:
        if self.error is not None:
            return {"path": self.path, "error": self.error}
        return {"path": self.path, "label": self.label, "probabilities": self.probabilities, "ood": self.ood,
                "warnings": list(self.warnings),
                "prediction_set": None if self.prediction_set is None else list(self.prediction_set),
                "refer": self.refer, "refer_reason": self.refer_reason}


class Predictor:
    """Holds a loaded model; ``predict_*`` apply its stored preprocessing and temperature.

    ``acquisition`` decides what ``predict_paths`` does with a DICOM object that is not a chest
    radiograph (a CT, an ultrasound, a hand): ``"refuse"`` makes it an error, ``"flag"`` predicts it
    with the reason in ``Prediction.warnings`` (see :func:`cxrnn.data.dicom.acquisition_findings`).
    """

    def __init__(self, bundle: ModelBundle, batch_size: int = 16, runtime: str = "torch", device: str = "cpu",
                 precision: str = "fp32", acquisition: AcquisitionPolicy = "refuse"):
        # the command line refuses the same values (exit 2); here they would loop forever or yield nothing
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be an integer >= 1, not {batch_size!r}")
        self.acquisition = check_policy(acquisition)
        self.bundle = bundle
        self.batch_size = batch_size
        self.bundle.net.eval()
        self.engine = _make_engine(bundle, check_runtime(runtime), device, precision)  # same outputs either way
        self.ood_stats = OodStats.from_extras(bundle.extras)
        # None for a model trained before prediction sets (see NO_CONFORMAL_NOTICE)
        self.conformal = ConformalSets.from_extras(bundle.extras)
        if self.conformal is not None and list(self.conformal.classes) != list(bundle.classes):
            raise ValueError(f"the model's conformal calibration is for classes {list(self.conformal.classes)}, "
                             f"the model has {list(bundle.classes)}")

    @classmethod
    def from_file(cls, path: str | Path, batch_size: int = 16, runtime: str = "torch", device: str = "cpu",
                  precision: str = "fp32", acquisition: AcquisitionPolicy = "refuse") -> "Predictor":
        """A predictor over a saved ``model.pt`` (loaded weights-only: a model file cannot run code)."""
        return cls(load_bundle(path), batch_size=batch_size, runtime=runtime, device=device, precision=precision,
                   acquisition=acquisition)

    @property
    def classes(self) -> list[str]:
        return self.bundle.classes

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
        """The gate's verdict on one score; None for a model trained before the gate existed, so callers
        report "no gate" instead of a pass the model never made."""
        if self.ood_stats is None:
            return None
        return {"score": float(score), "threshold": self.ood_stats.threshold,
                "flagged": bool(score > self.ood_stats.threshold)}

    def prediction_set(self, probs: np.ndarray) -> list[str] | None:
        """One image's conformal set (class names) from its probabilities (K,), applied in numpy so the torch
        and onnx engines give the same sets; None for a model without conformal calibration."""
        if self.conformal is None:
            return None
        return self.conformal.set_names(np.asarray(probs)[None, :])[0]

    def to_prediction(self, path: str, probs: np.ndarray, ood_score: float | None = None,
                      warnings: Sequence[str] = ()) -> Prediction:
        """One image's outputs as the record that the CLI, the API and the demo all report; ``warnings``
        are the reader's (``read_image_checked``). The prediction set and the referral are computed here,
        the one place every engine and every caller goes through."""
        ood = self.ood_result(ood_score) if ood_score is not None else None
        names = self.prediction_set(probs)
        label = self.classes[int(np.argmax(probs))]
        refer, reason = referral(names, ood, self.conformal.coverage if self.conformal else None, label)
        return Prediction(
            path=path,
            label=label,
            probabilities={c: float(p) for c, p in zip(self.classes, probs)},
            ood=ood,
            warnings=list(warnings),
            prediction_set=names,
            refer=refer,
            refer_reason=reason,
        )

    def read(self, source: str | Path | bytes, name: str | None = None) -> tuple[np.ndarray, list[str]]:
        """(image, warnings) of one file or upload under this predictor's acquisition policy; ImageReadError
        if it cannot be read or is refused. Pass the warnings on to ``to_prediction``."""
        return read_image_checked(source, name, acquisition=self.acquisition)

    def predict_paths(self, paths: Iterable[str | Path], progress: Progress | None = None) -> list[Prediction]:
        """One Prediction per path, in order; an unreadable (or refused) file gives a Prediction with ``error``."""
        paths = [str(p) for p in paths]
        results: list[Prediction | None] = [None] * len(paths)
        for start in range(0, len(paths), self.batch_size):
            images, slots, notes = [], [], []
            for i in range(start, min(start + self.batch_size, len(paths))):
                try:
                    image, warnings = self.read(paths[i])
                except ImageReadError as err:
                    results[i] = Prediction(path=paths[i], error=str(err))
                    continue
                images.append(image)
                slots.append(i)
                notes.append(warnings)
            if images:
                for i, probs, score, warnings in zip(slots, *self.predict_with_ood(images), notes):
                    results[i] = self.to_prediction(paths[i], probs, score, warnings)
            if progress:
                progress(min(start + self.batch_size, len(paths)), len(paths))
        return [r for r in results if r is not None]


def predict(model: str | Path | ModelBundle, paths: Iterable[str | Path],
            acquisition: AcquisitionPolicy = "refuse") -> list[Prediction]:
    """Convenience: ``cxrnn.inference.predictor.predict("run/model.pt", ["a.png"])``."""
    bundle = model if isinstance(model, ModelBundle) else load_bundle(model)
    return Predictor(bundle, acquisition=acquisition).predict_paths(paths)
