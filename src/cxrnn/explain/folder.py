"""Explain many files into a folder: per image NAME_cam.png, NAME_panel.png, NAME_cam.npy, plus an index.

Images stream through in batches; only a small dict per image (paths and probabilities) is kept, so
memory stays flat over thousands of files.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable

from cxrnn.data.dicom import AcquisitionPolicy
from cxrnn.explain.cam import CamExplainer, Explanation, cam_pass_predicts, predict_and_explain_paths
from cxrnn.explain.overlay import OutputNamer, write_explanation
from cxrnn.explain.registry import DEFAULT_METHOD
from cxrnn.models.bundle import ModelBundle
from cxrnn.utils.atomic import atomic_write_text

if TYPE_CHECKING:
    from cxrnn.inference.predictor import Prediction, Predictor

INDEX_NAME = "explanations.json"
MAX_CAM_BATCH = 8  # a CAM pass keeps the target layer's activations and gradients of the whole batch


class MapFolder:
    """Writes each explanation's files into ``out_dir`` as it comes and keeps the index entries."""

    def __init__(self, out_dir: str | Path, alpha: float = 0.4, colormap: str = "jet"):
        self.out = Path(out_dir)
        self.out.mkdir(parents=True, exist_ok=True)
        self.alpha, self.colormap = alpha, colormap
        self.namer = OutputNamer()
        self.entries: list[dict[str, Any]] = []

    def add(self, exp: Explanation) -> dict[str, str]:
        """Write one image's files (none for an unreadable file); returns {kind: path}."""
        files: dict[str, str] = {}
        if exp.error is None:
            files = write_explanation(exp, self.out, self.namer(exp.path), alpha=self.alpha, colormap=self.colormap)
        self.entries.append({**exp.to_dict(), **({"files": files} if files else {})})
        return files

    def finish(self, bundle: ModelBundle, method: str, layer: str, target: str | None) -> dict[str, Any]:
        """Write ``explanations.json`` and return it."""
        index = {
            "model": bundle.describe(),
            "method": method,
            "layer": layer,
            "target": target or "predicted",
            "n": sum(1 for e in self.entries if "error" not in e),
            "errors": sum(1 for e in self.entries if "error" in e),
            "images": self.entries,
        }
        atomic_write_text(self.out / INDEX_NAME, json.dumps(index, indent=2))
        return index


def explain_to_dir(
    bundle: ModelBundle,
    paths: Iterable[str | Path],
    out_dir: str | Path,
    method: str = DEFAULT_METHOD,
    target: str | None = None,
    layer: str | None = None,
    batch_size: int = MAX_CAM_BATCH,
    alpha: float = 0.4,
    colormap: str = "jet",
    progress: Callable[[int, int], None] | None = None,
    on_result: Callable[[Explanation, dict[str, str]], None] | None = None,
    acquisition: AcquisitionPolicy = "refuse",
) -> dict[str, Any]:
    """Write the maps of every readable file to ``out_dir`` and an index ``explanations.json``.

    A file that cannot be read (or, under ``acquisition`` "refuse", a DICOM that is not a chest radiograph)
    gets an ``error`` entry ("PATH: reason") and the batch goes on.
    ``on_result(explanation, files)`` is called for each image as soon as its files are written.
    """
    folder = MapFolder(out_dir, alpha=alpha, colormap=colormap)
    with CamExplainer(bundle, method=method, layer=layer, batch_size=batch_size) as explainer:
        for exp in explainer.explain_paths(paths, target=target, progress=progress, acquisition=acquisition):
            files = folder.add(exp)
            if on_result:
                on_result(exp, files)
        return folder.finish(bundle, method, explainer.layer_name, target)


def predict_and_explain_to_dir(
    predictor: "Predictor",
    paths: Iterable[str | Path],
    out_dir: str | Path,
    method: str = DEFAULT_METHOD,
    target: str | None = None,
    layer: str | None = None,
    alpha: float = 0.4,
    colormap: str = "jet",
    on_prediction: Callable[["Prediction"], None] | None = None,
) -> dict[str, Any]:
    """``cxrnn predict --cam``: each file's prediction and its maps, every file decoded once.

    Files go in the predictor's batches. Where the CAM pass computes the predictor's numbers
    (``cam_pass_predicts``: torch on the CPU in fp32) the whole batch is one CAM pass and the predictions
    come from it, identical to ``predictor.predict_paths``; otherwise the predictor's engine predicts the
    decoded images and the CAM pass runs in batches of at most ``MAX_CAM_BATCH``.
    ``on_prediction`` gets each file's Prediction, in order, as soon as its batch is done.
    """
    step = predictor.batch_size
    shared = cam_pass_predicts(predictor)
    folder = MapFolder(out_dir, alpha=alpha, colormap=colormap)
    with CamExplainer(predictor.bundle, method=method, layer=layer,
                      batch_size=step if shared else min(step, MAX_CAM_BATCH)) as explainer:
        for prediction, exp in predict_and_explain_paths(predictor, explainer, paths, target):
            if on_prediction:
                on_prediction(prediction)
            folder.add(exp)
        return folder.finish(predictor.bundle, method, explainer.layer_name, target)
